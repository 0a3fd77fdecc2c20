//! WAL archiving and point-in-time recovery, as the README's backup procedure runs them: a
//! base backup, more writes, a restore point between two known writes, and a restore of the
//! backup to that point, read by a new backend.

use std::time::Duration;

use futures_util::TryStreamExt;
use pgstate_testcluster::{Cluster, ClusterOptions, RecoveryTarget};
use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend, StateEntry};

/// Every live entry, in key order.
async fn everything(b: &EnhancedPostgresBackend) -> Vec<StateEntry> {
    b.scan(b"").try_collect().await.unwrap()
}

async fn backend(url: String, schema: &str) -> EnhancedPostgresBackend {
    EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(format!("{url}?sslmode=disable")).with_schema(schema),
    )
    .await
    .unwrap()
}

// Multi-threaded: the cluster's blocking steps run in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_recovery_target_reads_exactly_the_state_at_that_target() {
    let mut cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions {
            replicas: 0,
            tls: false,
            wal_archive: true,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("a cluster that archives its WAL");
    let schema = "pitr";
    let b = backend(cluster.primary_url(), schema).await;

    // Before the base backup.
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..500)
        .map(|i| (format!("k:{i:04}").into_bytes(), b"base".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    b.batch_put(&refs).await.unwrap();
    let cluster_ref = &cluster;
    let backups = tokio::task::block_in_place(|| {
        Ok::<_, pgstate_testcluster::Error>((
            cluster_ref.base_backup("backup1")?,
            cluster_ref.base_backup("backup2")?,
        ))
    })
    .unwrap();

    // After the backup, up to the target: updates, deletes, metadata, a TTL, new keys.
    b.put(b"k:0001", b"second").await.unwrap();
    b.delete(b"k:0002").await.unwrap();
    b.put_with_metadata(b"k:0003", b"tagged", serde_json::json!({"tier": "gold"}))
        .await
        .unwrap();
    b.put_with_ttl(b"k:0004", b"expiring", Duration::from_secs(3600))
        .await
        .unwrap();
    b.put(b"new:a", b"first write").await.unwrap();
    let at_target = everything(&b).await;
    let target = "pgstate-pitr-test";
    let lsn = tokio::task::block_in_place(|| {
        let lsn = cluster_ref.psql(0, "SELECT pg_current_wal_lsn()")?;
        cluster_ref.psql(0, &format!("SELECT pg_create_restore_point('{target}')"))?;
        Ok::<_, pgstate_testcluster::Error>(lsn)
    })
    .unwrap();

    // After the target: none of this may be in the restored state.
    b.put(b"new:b", b"second write").await.unwrap();
    b.put(b"k:0001", b"third").await.unwrap();
    b.delete(b"k:0005").await.unwrap();
    b.put_with_metadata(b"k:0003", b"retagged", serde_json::json!({"tier": "lead"}))
        .await
        .unwrap();
    let at_end = everything(&b).await;
    assert_ne!(
        at_end, at_target,
        "writes after the target changed the state"
    );
    tokio::task::block_in_place(|| cluster_ref.archive_now()).unwrap();

    // The same moment, named by a restore point and by a WAL position.
    for (backup, target) in [
        (backups.0, RecoveryTarget::Name(target.to_string())),
        (backups.1, RecoveryTarget::Lsn(lsn.clone())),
    ] {
        let node = tokio::task::block_in_place(|| cluster.restore(&backup, &target)).unwrap();
        let restored = backend(cluster.url(node), schema).await;
        let state = everything(&restored).await;
        assert_eq!(
            state.len(),
            500,
            "500 written, 1 deleted, 1 added ({target:?})"
        );
        assert_eq!(
            state, at_target,
            "exactly the state at the recovery target {target:?}"
        );
        assert_eq!(
            restored.get(b"new:a").await.unwrap(),
            Some(b"first write".to_vec())
        );
        assert_eq!(restored.get(b"new:b").await.unwrap(), None);
        // The restored server is a primary of its own: it takes writes.
        restored.put(b"after restore", b"ok").await.unwrap();
    }
}
