//! `pgstate demo`: a guided tour of every feature group, printing what it does.
//!
//! With `--url` (or `$DATABASE_URL`) it works in the schema `pgstate_demo` there, emptied when
//! it starts and left afterwards for a look (`DROP SCHEMA pgstate_demo CASCADE` removes it).
//! Without, it starts a throwaway cluster (a primary, two streaming replicas, TLS) from the
//! installed server binaries and stops and removes it at the end.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use processor::state::{
    redact, EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, PostgresListener,
    PostgresLockGuard, PostgresReplicaConfig, StateBackend, StateError,
};

use crate::admin::size;
use crate::dev::{start_cluster, tls_url};
use crate::exit::CliError;
use crate::target::Target;

/// The demo's schema on a server given by URL.
const SCHEMA: &str = "pgstate_demo";

fn section(n: u32, title: &str) {
    println!("\n== {n}. {title}");
}

/// Runs the tour against `target`'s URL, or a cluster of its own.
pub async fn run(target: &Target) -> Result<(), CliError> {
    let (url, replicas, cluster) = match target.given_url() {
        Some(url) => (url.to_string(), Vec::new(), None),
        None => {
            println!("No --url or DATABASE_URL: starting a throwaway cluster (a primary, two streaming replicas, TLS) ...");
            let started = Instant::now();
            let cluster = tokio::task::spawn_blocking(|| start_cluster(2))
                .await
                .map_err(|e| CliError::failed(format!("starting the cluster: {e}")))??;
            println!(
                "  started in {:.1} s from {}",
                started.elapsed().as_secs_f64(),
                cluster.bindir().display()
            );
            let replicas = (1..cluster.nodes().len())
                .map(|i| tls_url(&cluster, i))
                .collect();
            (tls_url(&cluster, 0), replicas, Some(cluster))
        }
    };
    let result = tour(&url, replicas).await;
    if let Some(cluster) = cluster {
        println!("\nStopping the throwaway cluster and removing its files ...");
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .map_err(|e| CliError::failed(format!("stopping the cluster: {e}")))?;
    }
    result?;
    println!("\nDemo finished: every feature group ran.");
    Ok(())
}

async fn tour(url: &str, replica_urls: Vec<String>) -> Result<(), CliError> {
    println!("Server: {}", redact(url));

    section(1, "Key-value state (the seed's quick start), metadata, TTL");
    let config = EnhancedPostgresConfig::new(url).with_schema(SCHEMA);
    let config = if replica_urls.is_empty() {
        config
    } else {
        config.with_replicas(PostgresReplicaConfig {
            replica_urls: replica_urls.clone(),
            enable_read_splitting: true,
            max_replication_lag_ms: 5_000,
            health_check_interval: Duration::from_millis(500),
            enable_auto_failover: true,
        })
    };
    let backend = EnhancedPostgresBackend::new(config).await?;
    backend.clear().await?;
    for c in backend.list_checkpoints().await? {
        backend.delete_checkpoint(c.id).await?;
    }
    println!("  table {} (schema created by new())", backend.table());
    key_value(&backend).await?;
    replication(&backend, &replica_urls).await?;
    transactions(&backend).await?;
    fast_queries(&backend).await?;
    coordination(&backend).await?;
    data_management(&backend).await?;
    high_availability(&backend).await?;
    observability(&backend).await?;
    security(&backend, url).await?;
    Ok(())
}

async fn key_value(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    backend.put(b"key", b"value").await?;
    let value = backend.get(b"key").await?;
    println!(
        "  put(\"key\", \"value\"); get(\"key\") = {:?}",
        value.as_deref().map(String::from_utf8_lossy)
    );
    for id in [123, 124] {
        backend
            .put_with_metadata(
                format!("user:{id}").as_bytes(),
                b"user_data",
                serde_json::json!({"type": "user", "id": id}),
            )
            .await?;
    }
    let users = backend
        .query_by_metadata("type", &serde_json::json!({"type": "user"}))
        .await?;
    println!("  query_by_metadata(type = user): {} entries", users.len());
    backend
        .put_with_ttl(b"session:1", b"s", Duration::from_millis(500))
        .await?;
    let before = backend.contains(b"session:1").await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    println!(
        "  put_with_ttl(500 ms): present {before}, after 700 ms {} (invisible before any cleanup)",
        backend.contains(b"session:1").await?
    );
    Ok(())
}

async fn replication(
    backend: &EnhancedPostgresBackend,
    replica_urls: &[String],
) -> Result<(), CliError> {
    section(
        2,
        "Replication: read/write splitting, lag, read-your-writes",
    );
    if replica_urls.is_empty() {
        println!(
            "  (no replica URLs given with --replica: this backend reads from the primary; the \
             server may still stream to replicas, see section 7)"
        );
    } else {
        let reader = backend.new_session();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !backend.replica_status().iter().all(|r| r.in_rotation) {
            if Instant::now() > deadline {
                return Err(CliError::failed("the replicas never joined the rotation"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..100 {
            reader.get(b"user:123").await?;
        }
        backend.put(b"key", b"written just now").await?;
        let mine = backend.get(b"key").await?;
        println!(
            "  read-your-writes: this session reads {:?} back at once",
            mine.as_deref().map(String::from_utf8_lossy)
        );
        for n in backend.get_stats().reads_by_node {
            println!("  {:>4} reads served by {}", n.reads, n.node);
        }
        let status = backend.check_replication_status().await?;
        for r in &status.replicas {
            println!(
                "  replica {}: {:?}, lag {} ms / {} bytes, serving reads: {}",
                r.name, r.role, r.lag_ms, r.lag_bytes, r.in_rotation
            );
        }
    }
    Ok(())
}

async fn transactions(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(
        3,
        "Transactions: isolation, savepoints, optimistic locking, retries",
    );
    let mut tx = backend
        .begin_transaction(IsolationLevel::Serializable)
        .await?;
    tx.put(b"account:a", b"100").await?;
    tx.savepoint("before_b").await?;
    tx.put(b"account:b", b"oops").await?;
    tx.rollback_to_savepoint("before_b").await?;
    tx.commit().await?;
    println!(
        "  SERIALIZABLE with a savepoint rolled back: account:a = {:?}, account:b present = {}",
        backend
            .get(b"account:a")
            .await?
            .as_deref()
            .map(String::from_utf8_lossy),
        backend.contains(b"account:b").await?
    );
    let v1 = backend.put_with_version(b"counter", b"1", None).await?;
    let v2 = backend.put_with_version(b"counter", b"2", Some(v1)).await?;
    let stale = backend.put_with_version(b"counter", b"3", Some(v1)).await;
    println!(
        "  optimistic locking: v{v1} -> v{v2}; a write expecting v{v1} is refused: {}",
        matches!(stale, Err(StateError::ConcurrentModification { .. }))
    );
    let total = backend
        .transaction(IsolationLevel::RepeatableRead, |tx| {
            Box::pin(async move {
                let n = tx.count().await?;
                tx.put(b"audit:last-count", n.to_string().as_bytes())
                    .await?;
                Ok(n)
            })
        })
        .await?;
    println!("  transaction() with retries on serialization failures: counted {total} entries");
    Ok(())
}

async fn fast_queries(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(4, "Fast queries: UNNEST batches, binary COPY, scans");
    let n = 20_000u32;
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| (format!("bulk:{i:06}").into_bytes(), vec![0xAB; 100]))
        .collect();
    let entries: Vec<(&[u8], &[u8])> = rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let t = Instant::now();
    backend.batch_put(&entries[..n as usize / 2]).await?;
    let put_rate = f64::from(n / 2) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    backend.batch_copy(&entries[n as usize / 2..]).await?;
    let copy_rate = f64::from(n / 2) / t.elapsed().as_secs_f64();
    println!(
        "  batch_put {put_rate:.0} rows/s (UNNEST), batch_copy {copy_rate:.0} rows/s (binary COPY)"
    );
    let scanned = backend.scan(b"bulk:").count().await;
    println!("  scan(\"bulk:\") streamed {scanned} entries in key order, a page at a time");
    Ok(())
}

async fn coordination(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(
        5,
        "Coordination: lock guards, fencing, leader election, LISTEN/NOTIFY",
    );
    let mut listener = PostgresListener::durable(backend, &["demo"]).await?;
    if let Some(guard) =
        PostgresLockGuard::new(backend.clone_handle(), "demo-job", Duration::from_secs(5)).await?
    {
        let mut tx = backend.begin().await?;
        tx.check_fence(&guard.fence()).await?;
        tx.put(b"job:owner", b"demo").await?;
        tx.notify_durable("demo", "job done").await?;
        tx.commit().await?;
        println!(
            "  lock guard \"demo-job\": fencing token {}, fenced write committed",
            guard.fencing_token()
        );
        guard.release().await?;
    }
    let leadership = backend
        .campaign("demo-leader", Duration::from_secs(10))
        .await?;
    println!(
        "  leader election \"demo-leader\": term {}, leading: {}",
        leadership.term(),
        leadership.is_leader()
    );
    leadership.resign().await?;
    let event = tokio::time::timeout(Duration::from_secs(30), listener.recv_notification())
        .await
        .map_err(|_| CliError::failed("the durable notification did not arrive within 30 s"))??;
    println!(
        "  durable notification #{} on {:?}: {:?}",
        event.seq.unwrap_or_default(),
        event.channel,
        event.payload
    );
    Ok(())
}

async fn data_management(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(6, "Data management: cleanup, archive, checkpoints, VACUUM");
    backend.delete(b"bulk:000000").await?;
    let cleaned = backend.cleanup_expired().await?;
    println!("  cleanup_expired(): {cleaned} expired entries removed (and the delete tombstones, not counted)");
    let checkpoint = backend.create_checkpoint("before-experiment").await?;
    backend.put(b"experiment", b"changes").await?;
    let restored = backend.restore_checkpoint(checkpoint.id).await?;
    println!(
        "  checkpoint {} holds {} entries; after a change, restore put back {restored}; experiment present: {}",
        checkpoint.id,
        checkpoint.entry_count,
        backend.contains(b"experiment").await?
    );
    // Entries written before this pause are "old"; one written after it is not.
    tokio::time::sleep(Duration::from_secs(3)).await;
    backend.put(b"recent", b"stays").await?;
    let moved = backend
        .archive_old_data("demo_archive", Duration::from_millis(2500))
        .await?;
    let back = backend
        .restore_archived("demo_archive", b"user:123")
        .await?;
    println!(
        "  archive_old_data(not written for 2.5 s): {moved} entries moved to demo_archive, \"recent\" stays: {}; restore_archived(user:123): {back}",
        backend.contains(b"recent").await?
    );
    backend.vacuum_analyze(false).await?;
    let table = backend.get_table_statistics().await?;
    println!(
        "  VACUUM ANALYZE; table: {} rows ({} live), {} + indexes {}, {} dead tuples",
        table.total_rows,
        table.active_rows,
        size(table.table_size),
        size(table.indexes_size),
        table.dead_tuples
    );
    Ok(())
}

async fn high_availability(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(7, "High availability: replication status, CHECKPOINT");
    let status = backend.check_replication_status().await?;
    println!(
        "  writes go to {} (a replica: {}); the server streams to {} replica(s), largest lag {} ms",
        status.primary.as_deref().unwrap_or("?"),
        status.is_replica,
        status.connected_replicas,
        status.lag_ms
    );
    match backend.checkpoint().await {
        Ok(()) => println!("  CHECKPOINT done"),
        Err(e) => println!("  CHECKPOINT refused: {e}"),
    }
    Ok(())
}

async fn observability(backend: &EnhancedPostgresBackend) -> Result<(), CliError> {
    section(8, "Observability: statistics, latencies, pool");
    let stats = backend.get_stats();
    println!(
        "  {} gets, {} entries written (puts and batch rows), {} statements, avg {:.3} ms, {} slow (over 100 ms), {} errors (the refused stale write)",
        stats.get_count,
        stats.put_count,
        stats.query_count,
        stats.avg_query_duration_ms,
        stats.slow_query_count,
        stats.error_count
    );
    for l in &stats.latencies {
        println!(
            "  {:10} {:>6} calls  p50 {:.2} ms   p99 {:.2} ms",
            l.operation,
            l.count,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0
        );
    }
    let pool = backend.get_pool_stats();
    println!(
        "  pool: {} open, {} idle, max {}; {} connections created",
        pool.size, pool.idle, pool.max_size, stats.connections_created
    );
    Ok(())
}

async fn security(backend: &EnhancedPostgresBackend, url: &str) -> Result<(), CliError> {
    section(9, "Security: TLS");
    let tls = url.contains("sslmode=verify-full");
    println!(
        "  {}",
        if tls {
            "connected with sslmode=verify-full: the server's certificate and name were checked"
        } else {
            "this URL sets no verify-full sslmode (the default is prefer: TLS when offered)"
        }
    );
    println!("  health check: {}", backend.health_check().await?);
    Ok(())
}
