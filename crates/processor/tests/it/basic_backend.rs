//! The basic backend as the seed project's users call it: `PostgresConfig`'s builders and
//! what each does on a real server, and the basic backend's methods beyond `StateBackend`.

use std::time::Duration;

use processor::state::{ErrorKind, PostgresConfig, PostgresStateBackend, StateBackend, StateError};

use crate::capture::Capture;
use crate::support;

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A configuration on a schema of its own, its sessions named `app`.
fn setup(tag: &str) -> (PostgresConfig, String, String) {
    let (schema, app) = (support::unique(tag), support::unique("app"));
    let url = with_param(&support::url(), &format!("application_name={app}"));
    let config = PostgresConfig::new(url)
        .with_schema_name(schema.clone())
        .with_pool_size(1, 4);
    (config, schema, app)
}

#[tokio::test]
async fn the_table_and_schema_names_are_the_ones_used() {
    let (config, schema, _) = setup("basic_names");
    let b = PostgresStateBackend::new(config.with_table_name("orders_state"))
        .await
        .unwrap();
    b.put(b"order:1", b"paid").await.unwrap();
    let db = support::raw(&support::url()).await;
    let sql = format!("SELECT value FROM \"{schema}\".orders_state WHERE key = 'order:1'");
    let value: Vec<u8> = db.query_one(&sql, &[]).await.unwrap().get(0);
    assert_eq!(value, b"paid");
}

#[tokio::test]
async fn the_ssl_mode_is_enforced() {
    for (mode, tls) in [("require", true), ("disable", false)] {
        let (config, _, app) = setup("basic_ssl");
        let b = PostgresStateBackend::new(config.with_ssl_mode(mode))
            .await
            .unwrap();
        assert!(b.health_check().await.unwrap());
        let sessions = support::sessions(&app).await;
        assert!(!sessions.is_empty());
        assert!(
            sessions.iter().all(|(_, on)| *on == tls),
            "{mode}: {sessions:?}"
        );
    }
    // verify-full needs the server's CA, which the URL does not name: refused, not weakened.
    let (config1, _, _) = setup("basic_ssl");
    let e = PostgresStateBackend::new(config1.with_ssl_mode("verify-full"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StateError::Configuration(m) if m.contains("root certificate")),
        "{e}"
    );
    // An unknown mode is refused before anything connects.
    let (config2, _, app) = setup("basic_ssl");
    let e = PostgresStateBackend::new(config2.with_ssl_mode("sometimes"))
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Configuration(_)), "{e}");
    assert!(support::sessions(&app).await.is_empty());
}

/// `with_timeout` bounds connecting: a server that accepts the connection and never answers
/// fails `new()` with a timeout.
#[tokio::test]
async fn the_connect_timeout_fires() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config = PostgresConfig::new(format!("postgresql://postgres@127.0.0.1:{port}/postgres"))
        .with_ssl_mode("disable")
        .with_timeout(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(60), PostgresStateBackend::new(config))
        .await
        .expect("new() returns")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    eprintln!("refused after {:?}", started.elapsed());
    drop(silent);
}

/// `with_timeout` bounds each operation: a put waiting for a row another transaction holds
/// fails once the timeout passes (it was sent, so its outcome is unknown until it settles).
#[tokio::test]
async fn the_query_timeout_fires() {
    let (config, schema, _) = setup("basic_timeout");
    let b = PostgresStateBackend::new(config.with_timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    b.put(b"held", b"v1").await.unwrap();
    let mut db = support::raw(&support::url()).await;
    let tx = db.transaction().await.unwrap();
    let sql = format!("SELECT 1 FROM \"{schema}\".state_entries WHERE key = 'held' FOR UPDATE");
    tx.execute(&sql, &[]).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), b.put(b"held", b"v2"))
        .await
        .expect("put returns")
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::OutcomeUnknown),
        "{e}"
    );
    tx.rollback().await.unwrap();
    // Reads and other keys were never blocked.
    assert_eq!(b.get(b"other").await.unwrap(), None);
}

/// `with_statement_logging(true)` logs each operation at `info` by its statement's name,
/// never its key or value; off, nothing is logged.
#[tokio::test]
async fn statement_logging_logs_every_operation_and_no_value() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let statements = |c: &Capture| -> Vec<String> {
        c.events()
            .iter()
            .filter(|e| e.field("message") == Some("statement"))
            .filter_map(|e| e.field("statement").map(str::to_string))
            .collect()
    };
    let (config, _, _) = setup("basic_log");
    let quiet = PostgresStateBackend::new(config).await.unwrap();
    quiet.put(b"log-key-7a", b"log-value-7a").await.unwrap();
    assert!(statements(&capture).is_empty());
    let (config, _, _) = setup("basic_log");
    let b = PostgresStateBackend::new(config.with_statement_logging(true))
        .await
        .unwrap();
    b.put(b"log-key-7a", b"log-value-7a").await.unwrap();
    assert!(b.get(b"log-key-7a").await.unwrap().is_some());
    b.delete(b"log-key-7a").await.unwrap();
    let logged = statements(&capture);
    assert!(logged.len() >= 3, "{logged:?}");
    capture.assert_never_shows(&["log-key-7a", "log-value-7a"]);
}

#[tokio::test]
async fn metadata_ttl_batches_and_cleanup() {
    let (config, _, _) = setup("basic_extra");
    let b = PostgresStateBackend::new(config).await.unwrap();
    let metadata = serde_json::json!({"source": "kafka", "partition": 5});
    b.put_with_metadata(b"window:123", b"data", metadata)
        .await
        .unwrap();
    assert_eq!(b.get(b"window:123").await.unwrap(), Some(b"data".to_vec()));
    b.put_with_ttl(b"ttl_key", b"ttl_value", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(b.contains(b"ttl_key").await.unwrap());
    let entries: Vec<(&[u8], &[u8])> = vec![(b"batch1", b"value1"), (b"batch2", b"value2")];
    b.batch_put(&entries).await.unwrap();
    assert_eq!(b.count().await.unwrap(), 4);
    tokio::time::sleep(Duration::from_millis(600)).await;
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
