//! The basic backend as the seed project's users call it: its methods beyond `StateBackend`
//! (metadata, TTL, batches, cleanup, checkpoints by UUID, statistics, sizes, vacuum, health,
//! close).

use std::time::Duration;

use processor::state::{ErrorKind, PostgresStateBackend, StateBackend, StateError};

use crate::basic_config::setup;
use crate::support;

#[tokio::test]
async fn metadata_ttl_batches_and_cleanup() {
    let (config, _, _) = setup("basic_extra");
    let b = PostgresStateBackend::new(config).await.unwrap();
    let metadata = serde_json::json!({"source": "kafka", "partition": 5});
    b.put_with_metadata(b"window:123", b"data", metadata)
        .await
        .unwrap();
    assert_eq!(b.get(b"window:123").await.unwrap(), Some(b"data".to_vec()));
    b.put_with_ttl(b"ttl_key", b"ttl_value", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(b.contains(b"ttl_key").await.unwrap());
    let entries: Vec<(&[u8], &[u8])> = vec![(b"batch1", b"value1"), (b"batch2", b"value2")];
    b.batch_put(&entries).await.unwrap();
    assert_eq!(b.count().await.unwrap(), 4);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!b.contains(b"ttl_key").await.unwrap());
    assert_eq!(b.count().await.unwrap(), 3);
    assert_eq!(b.cleanup_expired().await.unwrap(), 1);
    assert_eq!(b.cleanup_expired().await.unwrap(), 0);
    let bad = b
        .put_with_ttl(b"k", b"v", Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
}

/// A checkpoint round trip by UUID: taken, the state changed, restored to what it was.
#[tokio::test]
async fn a_checkpoint_round_trip_by_uuid() {
    let (config, _, _) = setup("basic_ckpt");
    let b = PostgresStateBackend::new(config).await.unwrap();
    for (k, v) in [("a", "1"), ("b", "22"), ("c", "333")] {
        b.put(k.as_bytes(), v.as_bytes()).await.unwrap();
    }
    let checkpoint_id = b.create_checkpoint().await.unwrap();
    b.put(b"a", b"changed").await.unwrap();
    b.delete(b"b").await.unwrap();
    b.put(b"d", b"new").await.unwrap();
    let checkpoints = b.list_checkpoints().await.unwrap();
    let info = checkpoints
        .iter()
        .find(|c| c.checkpoint_id == checkpoint_id)
        .unwrap();
    assert_eq!(info.row_count, 3);
    assert_eq!(
        info.data_size, 9,
        "three one-byte keys and six bytes of values"
    );
    assert!(info.created_at <= chrono::Utc::now());
    b.restore_checkpoint(checkpoint_id).await.unwrap();
    let mut keys = b.list_keys(b"").await.unwrap();
    keys.sort();
    assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(b.get(b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(b.get(b"b").await.unwrap(), Some(b"22".to_vec()));
    let unknown = b
        .restore_checkpoint(uuid::Uuid::new_v4())
        .await
        .unwrap_err();
    assert!(matches!(unknown, StateError::RestoreFailed(_)), "{unknown}");
    assert_eq!(b.get(b"c").await.unwrap(), Some(b"333".to_vec()));
}

#[tokio::test]
async fn statistics_sizes_vacuum_health_and_close() {
    let (config, _, _) = setup("basic_stats");
    let b = PostgresStateBackend::new(config).await.unwrap();
    b.put(b"k1", b"12345").await.unwrap();
    b.put(b"k2", b"678").await.unwrap();
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"12345".to_vec()));
    assert_eq!(b.get(b"missing").await.unwrap(), None);
    b.delete(b"k2").await.unwrap();
    let stats = b.stats().await;
    assert_eq!(stats.put_count, 2);
    assert_eq!(stats.get_count, 2);
    assert_eq!(stats.delete_count, 1);
    assert_eq!(stats.bytes_written, 2 + 5 + 2 + 3);
    assert_eq!(stats.bytes_read, 5);
    assert!(stats.query_count >= 5);
    b.vacuum().await.unwrap();
    let (total_size, table_size) = b.table_stats().await.unwrap();
    assert!(
        table_size > 0 && total_size > table_size,
        "{total_size} {table_size}"
    );
    assert!(b.health_check().await.unwrap());

    let other = b.clone();
    b.close().await;
    let e = other.get(b"k1").await.unwrap_err();
    assert!(matches!(e, StateError::NotInitialized(_)), "{e}");
    assert!(!b.health_check().await.unwrap());
}

/// A checkpoint taken before checkpoints had UUIDs (or by an older pgstate since) is listed
/// with the UUID migration 010 derives from its id and its counted size, and restores by it.
#[tokio::test]
async fn a_checkpoint_from_before_uuids_restores_by_its_derived_uuid() {
    let (config, schema, _) = setup("basic_old_ckpt");
    let b = PostgresStateBackend::new(config).await.unwrap();
    b.put(b"k", b"vvv").await.unwrap();
    let taken = b.create_checkpoint().await.unwrap();
    let db = support::raw(&support::url()).await;
    let forget = format!(
        "UPDATE \"{schema}\".state_checkpoints SET checkpoint_uuid = NULL, data_size = NULL \
         RETURNING md5(state_table || ':' || id)::uuid::text"
    );
    let derived: String = db.query_one(&forget, &[]).await.unwrap().get(0);
    let derived = uuid::Uuid::parse_str(&derived).unwrap();
    assert_ne!(derived, taken);
    b.put(b"k", b"changed").await.unwrap();
    let info = b.list_checkpoints().await.unwrap().remove(0);
    assert_eq!(info.checkpoint_id, derived);
    assert_eq!(info.data_size, 4);
    b.restore_checkpoint(derived).await.unwrap();
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"vvv".to_vec()));
    assert!(b.restore_checkpoint(taken).await.is_err());
}
