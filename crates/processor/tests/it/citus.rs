//! Scale-out on Citus: the state table distributed by key over a coordinator's workers. Runs
//! when the `citus` extension is installed (README: Scaling out); reported as skipped
//! otherwise.

use std::sync::Arc;

use futures_util::TryStreamExt;
use std::time::Duration;

use pgstate_testcluster::{citus_installed, Cluster, ClusterOptions};
use processor::state::{
    CitusLayout, EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, IsolationLevel,
    PartitionStrategy, StateBackend,
};

use crate::{conformance, seed, support};

const SHARDS: u32 = 8;

/// A coordinator with two workers. (Tests that call it are ignored where the extension is
/// not installed: see the crate's build script.)
async fn citus(test: &str) -> Cluster {
    assert!(
        citus_installed(),
        "{test}: the citus extension is not installed (README: Scaling out)"
    );
    tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions {
            replicas: 0,
            tls: false,
            citus_workers: 2,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("a Citus coordinator and two workers")
}

fn config(cluster: &Cluster, schema: &str, shards: u32) -> EnhancedPostgresConfig {
    EnhancedPostgresConfig::new(format!("{}?sslmode=disable", cluster.primary_url()))
        .with_schema(schema)
        .with_operation_timeout(Duration::from_secs(10))
        .with_citus(CitusLayout {
            shard_count: shards,
        })
}

#[tokio::test]
#[cfg_attr(
    not(pgstate_citus),
    ignore = "the citus extension is not installed (README: Scaling out)"
)]
async fn every_operation_works_on_a_table_distributed_over_two_workers() {
    let cluster =
        citus("citus::every_operation_works_on_a_table_distributed_over_two_workers").await;
    let cfg = config(&cluster, "citus_state", SHARDS);
    let b = Arc::new(EnhancedPostgresBackend::new(cfg.clone()).await.unwrap());
    let table = b.table().to_string();
    let admin = support::raw(&format!("{}?sslmode=disable", cluster.primary_url())).await;
    let shards: i64 = admin
        .query_one(
            "SELECT count(*) FROM citus_shards WHERE table_name = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shards, i64::from(SHARDS));

    conformance::run(b.clone(), b.as_ref()).await;
    b.clear().await.unwrap();
    conformance::run_enhanced(&b).await;
    b.clear().await.unwrap();
    seed::key_value_snippets(&b).await;
    let (acquired, got_guard, is_leader) = seed::distributed_coordination(&b).await.unwrap();
    assert!(acquired && got_guard && is_leader);
    seed::check_listen_notify(&b, &format!("{}?sslmode=disable", cluster.primary_url())).await;
    // The quick start, verbatim, on the coordinator (its own table, in `public`).
    seed::quick_start(format!("{}?sslmode=disable", cluster.primary_url()))
        .await
        .unwrap();

    // A version is never reused: not after a delete, nor after cleanup removed the tombstone.
    b.put(b"v", b"1").await.unwrap();
    let (_, first) = b.get_with_version(b"v").await.unwrap().unwrap();
    b.delete(b"v").await.unwrap();
    b.cleanup_expired().await.unwrap();
    b.put(b"v", b"2").await.unwrap();
    let (_, again) = b.get_with_version(b"v").await.unwrap().unwrap();
    assert!(again > first + 1, "{again} after {first}");

    // Transactions, with a savepoint, at every isolation level.
    for level in [
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
        IsolationLevel::Serializable,
    ] {
        let mut tx = b.begin_transaction(level).await.unwrap();
        tx.put(b"tx:a", b"1").await.unwrap();
        tx.savepoint("s").await.unwrap();
        tx.put(b"tx:b", b"1").await.unwrap();
        tx.rollback_to_savepoint("s").await.unwrap();
        assert_eq!(tx.get(b"tx:a").await.unwrap(), Some(b"1".to_vec()));
        tx.commit().await.unwrap();
        assert!(b.contains(b"tx:a").await.unwrap());
        assert!(!b.contains(b"tx:b").await.unwrap());
        b.delete(b"tx:a").await.unwrap();
    }

    // Batches and COPY: into keys none of which exist (direct COPY), then over them.
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..2_000)
        .map(|i| {
            (
                format!("row:{i:05}").into_bytes(),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    let refs: Vec<(&[u8], &[u8])> = rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    assert_eq!(b.batch_copy(&refs).await.unwrap(), 2_000);
    assert_eq!(b.batch_copy(&refs[..500]).await.unwrap(), 500);
    b.batch_put(&refs[1_000..]).await.unwrap();
    assert_eq!(b.list_keys(b"row:").await.unwrap().len(), 2_000);
    // A scan over every shard comes back whole and in key order.
    let scanned: Vec<Vec<u8>> = b
        .scan(b"row:")
        .map_ok(|e| e.key)
        .try_collect()
        .await
        .unwrap();
    let expected: Vec<Vec<u8>> = rows.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(scanned, expected);
    assert_eq!(b.get(b"row:01999").await.unwrap(), Some(b"1999".to_vec()));

    // Concurrent puts each go to their shard: none is coalesced into a multi-row upsert
    // (which Citus would run through the coordinator).
    let puts = (0..64).map(|i| {
        let b = b.clone();
        tokio::spawn(async move {
            let k = format!("burst:{i:03}");
            b.put(k.as_bytes(), k.as_bytes()).await.unwrap();
        })
    });
    for p in futures_util::future::join_all(puts).await {
        p.unwrap();
    }
    assert_eq!(b.get_stats().coalesced_puts, 0);
    assert_eq!(b.list_keys(b"burst:").await.unwrap().len(), 64);

    // Rows on both workers; a single-key read is one task on one shard.
    let per_worker = admin
        .query(
            &format!(
                "SELECT s.nodeport, sum(r.result::bigint)::bigint \
                 FROM run_command_on_shards('{table}', 'SELECT count(*) FROM %s') r \
                 JOIN citus_shards s ON s.shardid = r.shardid GROUP BY s.nodeport"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(per_worker.len(), 2, "shards on two workers");
    for row in &per_worker {
        let rows: i64 = row.get(1);
        assert!(rows > 100, "every worker holds rows: {rows}");
    }
    let plan = support::text_lines(
        &admin,
        &format!("EXPLAIN SELECT value FROM {table} WHERE key = 'row:00042'"),
    )
    .await;
    assert!(plan.contains("Task Count: 1"), "{plan}");

    // A row held by a writer that takes no floor lock (put_with_version in an open
    // transaction) does not stall the table: the archive's delete on the worker gives up
    // after its lock timeout and lets go of the floor lock, so a put of a new key (which
    // takes the floor lock shared) goes through while the transaction is still open.
    let (_, held) = b.get_with_version(b"row:00003").await.unwrap().unwrap();
    let mut tx = b.begin().await.unwrap();
    tx.put_with_version(b"row:00003", b"held", Some(held))
        .await
        .unwrap();
    let archiving = {
        let b = b.clone();
        tokio::spawn(async move { b.archive_old_data("held_rows", Duration::ZERO).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.put(b"fresh:key", b"1")
        .await
        .expect("a put goes through while cleanup meets a held row");
    tx.commit().await.unwrap();
    let moved = archiving.await.unwrap().unwrap();
    assert!(moved >= 2_000, "{moved}");
    assert!(b.restore_archived("held_rows", b"row:00003").await.unwrap());
    assert_eq!(b.get(b"row:00003").await.unwrap(), Some(b"held".to_vec()));
    for (k, v) in &rows[5..15] {
        assert!(b.restore_archived("held_rows", k).await.unwrap());
        assert_eq!(b.get(k).await.unwrap().as_deref(), Some(v.as_slice()));
    }

    // Checkpoints, retention and archive.
    let checkpoint = b.create_checkpoint("before").await.unwrap();
    b.put(b"row:00005", b"changed").await.unwrap();
    b.restore_checkpoint(checkpoint.id).await.unwrap();
    assert_eq!(b.get(b"row:00005").await.unwrap(), Some(b"5".to_vec()));
    seed::data_management(&b).await.unwrap();
    b.put_with_ttl(b"short", b"x", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(b.apply_retention_policy().await.unwrap() >= 1);
    let live = u64::try_from(b.count().await.unwrap()).unwrap();
    assert!(live >= 10);
    assert_eq!(
        b.archive_old_data("old_rows", Duration::ZERO)
            .await
            .unwrap(),
        live
    );
    assert_eq!(b.count().await.unwrap(), 0);
    assert!(b.restore_archived("old_rows", b"row:00007").await.unwrap());
    assert_eq!(b.get(b"row:00007").await.unwrap(), Some(b"7".to_vec()));

    // Partitioning does not apply to a distributed table: refused, nothing touched.
    let err = b
        .migrate_to_partitioned(PartitionStrategy::Hash { partitions: 4 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
    assert!(err.to_string().contains("distributed by Citus"), "{err}");

    // A second backend with the same layout starts on the table; another shard count is refused.
    EnhancedPostgresBackend::new(cfg).await.unwrap();
    let err = EnhancedPostgresBackend::new(config(&cluster, "citus_state", SHARDS * 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
    assert!(err.to_string().contains("8 shards"), "{err}");

    // A state table Citus keeps as a reference table (a copy on every node): a configuration
    // error that says so, and the table stays as it is.
    let url = format!("{}?sslmode=disable", cluster.primary_url());
    let local = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone()).with_schema("citus_ref"),
    )
    .await
    .unwrap();
    local.put(b"r", b"1").await.unwrap();
    drop(local);
    admin
        .batch_execute("SELECT create_reference_table('citus_ref.state_entries')")
        .await
        .unwrap();
    let err = EnhancedPostgresBackend::new(config(&cluster, "citus_ref", SHARDS))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
    assert!(err.to_string().contains("reference table"), "{err}");
    let still: bool = admin
        .query_one(
            "SELECT partmethod = 'n' FROM pg_dist_partition \
             WHERE logicalrelid = 'citus_ref.state_entries'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(still, "the reference table is left as it was");
}

/// Without the extension, `with_citus` is a clear configuration error and nothing is created;
/// with partitioning, it is refused before connecting.
#[tokio::test]
async fn with_citus_needs_the_extension_and_no_partitioning() {
    let cfg = support::config("nocitus").with_citus(CitusLayout::default());
    let schema = cfg.schema().to_string();
    let err = EnhancedPostgresBackend::new(cfg).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
    assert!(err.to_string().contains("no citus extension"), "{err}");
    let admin = support::raw(&support::url()).await;
    let exists: bool = admin
        .query_one(
            "SELECT count(*) > 0 FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the failed start left nothing behind");

    let err = EnhancedPostgresBackend::new(
        support::config("citus_parts")
            .with_citus(CitusLayout::default())
            .with_partitioning(PartitionStrategy::Hash { partitions: 4 }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
    let err = EnhancedPostgresBackend::new(
        support::config("citus_zero").with_citus(CitusLayout { shard_count: 0 }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration, "{err}");
}
