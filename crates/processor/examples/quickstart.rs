//! The seed's Quick Start, then a tour of the operations.
//!
//! Runs against `DATABASE_URL` when it is set; otherwise starts a throwaway local PostgreSQL
//! (from the installed server binaries) and removes it afterwards.
//!
//! ```text
//! cargo run --example quickstart
//! DATABASE_URL=postgresql://user:pass@host/db cargo run --example quickstart
//! ```

use std::time::{Duration, Instant};

use pgstate_testcluster::{Cluster, ClusterOptions};
use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend, StateError};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => (url, None),
        _ => {
            println!("DATABASE_URL is not set: starting a throwaway PostgreSQL ...");
            let cluster = Cluster::start(ClusterOptions {
                replicas: 0,
                ..ClusterOptions::default()
            })?;
            println!(
                "  server at 127.0.0.1:{} ({})",
                cluster.nodes()[0].port,
                cluster.bindir().display()
            );
            (cluster.primary_url(), Some(cluster))
        }
    };
    println!("connecting to {}", processor::state::redact(&url));

    // The seed's Quick Start.
    let config = EnhancedPostgresConfig::new(url.clone());
    let backend = EnhancedPostgresBackend::new(config).await?;
    backend.put(b"key", b"value").await?;
    let value = backend.get(b"key").await?;
    println!(
        "quick start: get(\"key\") = {:?}",
        value.as_deref().map(String::from_utf8_lossy)
    );

    // A tour in a schema of its own, removed at the end.
    let schema = format!("pgstate_quickstart_{}", std::process::id());
    let backend =
        EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url.clone()).with_schema(&schema))
            .await?;
    println!("tour table: {}", backend.table());

    backend
        .put_with_metadata(
            b"user:123",
            b"user_data",
            serde_json::json!({"type": "user", "id": 123}),
        )
        .await?;
    backend
        .put_with_metadata(
            b"user:124",
            b"user_data",
            serde_json::json!({"type": "user", "id": 124}),
        )
        .await?;
    let users = backend
        .query_by_metadata("type", &serde_json::json!({"type": "user"}))
        .await?;
    println!(
        "metadata: {} users; id 123 -> {} entry",
        users.len(),
        backend
            .query_by_metadata("id", &serde_json::json!(123))
            .await?
            .len()
    );

    backend
        .put_with_ttl(b"session:1", b"s", Duration::from_millis(500))
        .await?;
    println!(
        "ttl: session:1 present = {}",
        backend.contains(b"session:1").await?
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    println!(
        "ttl: after 700 ms present = {} (expired rows are invisible before any cleanup)",
        backend.contains(b"session:1").await?
    );

    let v1 = backend.put_with_version(b"counter", b"1", None).await?;
    let v2 = backend.put_with_version(b"counter", b"2", Some(v1)).await?;
    let stale = backend.put_with_version(b"counter", b"3", Some(v1)).await;
    println!(
        "optimistic locking: v{v1} -> v{v2}; stale write refused = {}",
        matches!(stale, Err(StateError::ConcurrentModification { .. }))
    );

    let n = 50_000u32;
    let value = vec![0xAB_u8; 100];
    let put_keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("bulk:put:{i:08}").into_bytes())
        .collect();
    let copy_keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("bulk:copy:{i:08}").into_bytes())
        .collect();
    let as_entries = |keys: &[Vec<u8>]| -> Vec<(Vec<u8>, Vec<u8>)> {
        keys.iter().map(|k| (k.clone(), value.clone())).collect()
    };
    let (put_rows, copy_rows) = (as_entries(&put_keys), as_entries(&copy_keys));
    let put_entries: Vec<(&[u8], &[u8])> = put_rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let copy_entries: Vec<(&[u8], &[u8])> = copy_rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    println!("loading {n} new rows with batch_put, then {n} other new rows with batch_copy ...");
    let t = Instant::now();
    backend.batch_put(&put_entries).await?;
    let put_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    backend.batch_copy(&copy_entries).await?;
    let copy_s = t.elapsed().as_secs_f64();
    println!(
        "batches of {n} rows: batch_put {:.0} rows/s, batch_copy {:.0} rows/s",
        f64::from(n) / put_s,
        f64::from(n) / copy_s
    );
    println!(
        "list_keys(\"user:\") = {} keys, count() = {}",
        backend.list_keys(b"user:").await?.len(),
        backend.count().await?
    );

    // Coordination: a lock guard with its fencing token, leadership, a durable event.
    let mut listener =
        processor::state::PostgresListener::durable(&backend, &["quickstart"]).await?;
    if let Some(guard) = processor::state::PostgresLockGuard::new(
        backend.clone_handle(),
        "quickstart-job",
        Duration::from_secs(5),
    )
    .await?
    {
        let mut tx = backend.begin().await?;
        tx.check_fence(&guard.fence()).await?;
        tx.put(b"job:owner", b"quickstart").await?;
        tx.notify_durable("quickstart", "job done").await?;
        tx.commit().await?;
        println!(
            "lock guard: fencing token {}, fenced write committed",
            guard.fencing_token()
        );
        guard.release().await?;
    }
    let leadership = backend
        .campaign("quickstart-leader", Duration::from_secs(10))
        .await?;
    println!(
        "leader election: term {}, leading: {}",
        leadership.term(),
        leadership.is_leader()
    );
    leadership.resign().await?;
    let event = listener.recv_notification().await?;
    println!(
        "durable event #{} on {:?}: {}",
        event.seq.unwrap_or_default(),
        event.channel,
        event.payload
    );

    let stats = backend.get_stats();
    println!(
        "stats: {} gets, {} puts, avg {:.3} ms, {} slow queries, {} locks taken ({:.1} ms waiting), {} leader changes",
        stats.get_count,
        stats.put_count,
        stats.avg_query_duration_ms,
        stats.slow_query_count,
        stats.lock_acquisitions,
        stats.advisory_lock_wait_ms,
        stats.leader_changes
    );
    let pool = backend.get_pool_stats();
    println!(
        "pool: {}/{} connections ({} idle)",
        pool.active, pool.max_size, pool.idle
    );
    // Data management: expired rows removed in batches (a background task does it too),
    // then the table as the server sees it.
    let cleaned = backend.cleanup_expired().await?;
    let table = backend.get_table_statistics().await?;
    println!(
        "cleanup: {cleaned} expired entries removed; table: {} rows, {} KiB, indexes {} KiB",
        table.total_rows,
        table.table_size / 1024,
        table.indexes_size / 1024
    );
    println!("health check: {}", backend.health_check().await?);

    drop(backend);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;
    println!("done");
    Ok(())
}
