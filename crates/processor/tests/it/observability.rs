//! Observability: statistics per node, `tracing` spans and the slow-operation log, and the
//! `pgstate_` metrics seen by an installed recorder.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, StateBackend,
};

use crate::capture::{recorder, Capture, Captured};
use crate::support;

/// Each operation gets a span with OpenTelemetry's database attributes and the table, and a
/// failed one its `error.type`; no span or event shows a key, a value or the password.
#[tokio::test]
async fn every_operation_has_a_span_with_database_attributes_and_never_a_value() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let b = support::backend("spans").await;
    let table = b.table().replace('"', "");
    b.put(b"span-key-5c1e", b"span-value-5c1e").await.unwrap();
    assert!(b.get(b"span-key-5c1e").await.unwrap().is_some());
    let (_, version) = b.get_with_version(b"span-key-5c1e").await.unwrap().unwrap();
    let conflict = b
        .put_with_version(b"span-key-5c1e", b"span-value-5c1e", Some(version + 7))
        .await
        .unwrap_err();
    assert_eq!(conflict.kind(), processor::state::ErrorKind::Conflict);
    b.delete(b"span-key-5c1e").await.unwrap();
    let mut tx = b.begin().await.unwrap();
    tx.put(b"span-key-5c1f", b"span-value-5c1f").await.unwrap();
    // A statement failing inside a transaction marks its own span.
    let refused = tx
        .put_with_version(b"span-key-5c1f", b"span-value-5c1f", Some(999))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), processor::state::ErrorKind::Conflict);
    tx.rollback().await.unwrap();
    // A statement the server refuses: its SQLSTATE on the span (a concurrent update under
    // REPEATABLE READ, 40001).
    b.put(b"span-key-5c20", b"0").await.unwrap();
    let mut t1 = b
        .begin_transaction(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    let mut t2 = b
        .begin_transaction(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    t1.get(b"span-key-5c20").await.unwrap();
    t2.get(b"span-key-5c20").await.unwrap();
    t1.put(b"span-key-5c20", b"1").await.unwrap();
    t1.commit().await.unwrap();
    let refused = t2.put(b"span-key-5c20", b"2").await.unwrap_err();
    assert_eq!(refused.sqlstate(), Some("40001"), "{refused}");
    drop(t2);

    let ops: Vec<Captured> = capture
        .spans()
        .into_iter()
        .filter(|s| s.name == "pgstate.operation")
        .collect();
    let named = |op: &str| {
        ops.iter()
            .filter(|s| s.field("db.operation.name") == Some(op))
            .cloned()
            .collect::<Vec<_>>()
    };
    for op in ["upsert", "get", "get_entry", "put_with_version", "delete"] {
        let spans = named(op);
        assert!(!spans.is_empty(), "no span for {op}: {ops:#?}");
        for s in spans {
            assert_eq!(s.field("db.system.name"), Some("postgresql"), "{s:?}");
            assert_eq!(s.field("db.namespace"), table.split('.').next(), "{s:?}");
            assert_eq!(s.field("db.collection.name"), Some(table.as_str()), "{s:?}");
            assert_eq!(s.field("otel.kind"), Some("client"), "{s:?}");
        }
    }
    // The transaction's statement has its span too.
    assert!(named("upsert").len() >= 2, "{ops:#?}");
    let failed: Vec<&Captured> = ops
        .iter()
        .filter(|s| s.field("error.type") == Some("conflict"))
        .collect();
    assert_eq!(failed.len(), 2, "{ops:#?}");
    for f in failed {
        assert_eq!(f.field("db.operation.name"), Some("put_with_version"));
        assert_eq!(f.field("error.type"), Some("conflict"));
    }
    assert!(
        ops.iter()
            .any(|s| s.field("db.response.status_code") == Some("40001")
                && s.field("error.type") == Some("transaction")),
        "{ops:#?}"
    );
    capture.assert_never_shows(&["5c1e", "5c1f", "5c20", pgstate_testcluster::PASSWORD]);
}

/// An operation over the threshold is counted and logged at `warn` with its statement's name
/// and duration, never its key or value. The put is held by a row lock from another session
/// for at least 300 ms, over a 200 ms threshold.
#[tokio::test]
async fn a_slow_operation_is_counted_and_logged_by_statement_without_values() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let app = support::unique("slow");
    let url = format!("{}?application_name={app}", support::url());
    let b = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url)
            .with_schema(support::unique("slow"))
            .with_pool_config(support::small_pool())
            .with_slow_query_threshold(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    b.put(b"slow-key-9d2b", b"slow-value-9d2b").await.unwrap();
    let before = b.get_stats();
    let locker = support::raw(&support::url()).await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {} WHERE key = 'slow-key-9d2b'::bytea FOR UPDATE",
            b.table()
        ))
        .await
        .unwrap();
    let writer = b.clone_handle();
    let put = tokio::spawn(async move { writer.put(b"slow-key-9d2b", b"slow-value-9d2c").await });
    // Once the put waits on the row lock, hold it 300 ms more.
    let admin = support::raw(&support::url()).await;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while admin
        .query_one(waiting, &[&app])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the put never waited on the row lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    put.await.unwrap().unwrap();

    let after = b.get_stats();
    assert!(
        after.slow_query_count > before.slow_query_count,
        "{after:?}"
    );
    let slow: Vec<Captured> = capture
        .events()
        .into_iter()
        .filter(|e| e.field("message") == Some("slow operation"))
        .collect();
    let logged = slow
        .iter()
        .find(|e| e.field("statement") == Some("upsert"))
        .unwrap_or_else(|| panic!("no slow upsert logged: {slow:#?}"));
    let ms: f64 = logged.field("elapsed_ms").unwrap().parse().unwrap();
    assert!(ms >= 300.0, "{logged:?}");
    assert_eq!(logged.field("operation"), Some("put"));
    capture.assert_never_shows(&["9d2b", "9d2c", pgstate_testcluster::PASSWORD]);
}

/// Operations cut short by the operation timeout are counted by what the caller was told, in
/// the statistics and as their spans' `error.type`: a read blocked by a table lock is a
/// timeout; a write whose statement was sent and then waited on a row lock is an unknown
/// outcome (it may still be applied, before the session's next write).
#[tokio::test]
async fn operations_cut_short_by_the_timeout_are_counted_by_their_outcome() {
    use processor::state::ErrorKind;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let b = EnhancedPostgresBackend::new(
        support::config("op_timeout").with_operation_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    b.put(b"held", b"1").await.unwrap();
    let locker = support::raw(&support::url()).await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {} WHERE key = 'held'::bytea FOR UPDATE",
            b.table()
        ))
        .await
        .unwrap();
    let e = b.put(b"held", b"2").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
    assert!(!e.is_retryable(), "{e}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let locker = support::lock_table(b.table()).await;
    let e = b.count().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let stats = b.get_stats();
    for kind in [ErrorKind::Timeout, ErrorKind::OutcomeUnknown] {
        assert!(stats.errors_by_kind.contains(&(kind, 1)), "{stats:?}");
    }
    assert_eq!(stats.error_count, 2);
    let typed = |t: &str| {
        capture
            .spans()
            .into_iter()
            .filter(|s| s.field("error.type") == Some(t))
            .count()
    };
    assert_eq!((typed("timeout"), typed("outcome_unknown")), (1, 1));
}

/// With a recorder installed, the `pgstate_` metrics move with the operations: counters and
/// durations by kind, errors by kind, and (published each second) pool and read figures.
#[tokio::test]
async fn an_installed_recorder_sees_the_pgstate_metrics_move() {
    let rec = recorder();
    let b = support::backend("metrics").await;
    let table = b.table().replace('"', "");
    let t = table.as_str();
    for i in 0..5 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..3 {
        b.get(format!("k{i}").as_bytes()).await.unwrap();
    }
    let (_, version) = b.get_with_version(b"k0").await.unwrap().unwrap();
    b.put_with_version(b"k0", b"w", Some(version + 1))
        .await
        .unwrap_err();
    let ops = |op: &str| {
        rec.counter(
            "pgstate_operations_total",
            &[("table", t), ("operation", op)],
        )
    };
    assert_eq!(ops("put"), 6);
    assert_eq!(ops("get"), 4);
    assert_eq!(
        rec.samples(
            "pgstate_operation_duration_seconds",
            &[("table", t), ("operation", "put")]
        ),
        6
    );
    // The same under OpenTelemetry's stable name and attributes.
    assert_eq!(
        rec.samples(
            "db.client.operation.duration",
            &[
                ("db.collection.name", t),
                ("db.operation.name", "put"),
                ("db.system.name", "postgresql")
            ]
        ),
        6
    );
    assert_eq!(
        rec.counter(
            "pgstate_operation_errors_total",
            &[("table", t), ("kind", "conflict")]
        ),
        1
    );
    let mut tx = b.begin().await.unwrap();
    tx.put(b"k9", b"v").await.unwrap();
    tx.commit().await.unwrap();
    for event in ["begun", "committed"] {
        assert_eq!(
            rec.counter(
                "pgstate_transaction_events_total",
                &[("table", t), ("event", event)]
            ),
            1,
            "{event}"
        );
    }
    // Pool and read figures arrive with the next publication (each second).
    let primary = [("table", t), ("node", "primary")];
    support::wait_for(
        "the primary's pool figures",
        || {
            (
                rec.counter("pgstate_connections_created_total", &primary),
                rec.counter("pgstate_reads_total", &primary),
            )
        },
        |(created, reads)| *created >= 1 && *reads >= 4,
    )
    .await;
    let idle = rec.gauge(
        "pgstate_pool_connections",
        &[("table", t), ("node", "primary"), ("state", "idle")],
    );
    assert!(idle.is_some_and(|n| n >= 1.0), "{idle:?}");
    let ours: Vec<String> = rec
        .names()
        .into_iter()
        .filter(|n| n.contains(&format!("table={t}")))
        .collect();
    assert!(ours.iter().all(|n| n.starts_with("pgstate_")), "{ours:?}");
    // A dropped backend takes its gauges back out.
    drop(b);
    support::wait_for(
        "the dropped backend's gauges back at zero",
        || {
            rec.gauge(
                "pgstate_pool_connections",
                &[("table", t), ("node", "primary"), ("state", "idle")],
            )
        },
        |g| *g == Some(0.0),
    )
    .await;
}

/// `get_stats` reports the connections opened and broken, and the reads each node served.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn statistics_report_connections_and_reads_per_node() {
    let cluster = support::local_cluster();
    let app = support::unique("nodes");
    let url = format!("{}?application_name={app}", cluster.primary_url());
    let schema = support::unique("nodes");
    let writer = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone()).with_schema(schema.clone()),
    )
    .await
    .unwrap();
    writer.put(b"k", b"v").await.unwrap();
    let reader = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url)
            .with_schema(schema)
            .with_replicas(support::replicas(cluster.replica_urls(), 60_000, true)),
    )
    .await
    .unwrap();
    support::wait_status(
        &reader,
        Duration::from_secs(20),
        "replicas in rotation",
        |s| s.replicas.iter().all(|r| r.in_rotation),
    )
    .await;
    for _ in 0..20 {
        reader.count().await.unwrap();
    }
    let stats = reader.get_stats();
    assert_eq!(stats.reads_by_node.len(), 3, "{stats:?}");
    assert!(stats.reads_by_node[0].primary);
    assert_eq!(stats.reads_by_node[0].node, "primary");
    let names: Vec<String> = cluster.nodes()[1..]
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    for (r, name) in stats.reads_by_node[1..].iter().zip(&names) {
        assert_eq!(&r.node, name);
        assert!(!r.primary);
        assert!(r.reads >= 1, "reads spread over both replicas: {stats:?}");
    }
    let total: u64 = stats.reads_by_node.iter().map(|r| r.reads).sum();
    assert_eq!(total, stats.primary_reads + stats.replica_reads);
    assert!(stats.replica_reads >= 20, "{stats:?}");
    assert!(stats.connections_created >= 3, "{stats:?}");

    // Connections the server ends are counted as broken once the pool finds them closed.
    let before = writer.get_stats();
    assert_eq!(before.connections_broken, 0, "{before:?}");
    support::terminate_sessions(&app).await;
    for _ in 0..5 {
        let _ = writer.put(b"k", b"w").await;
    }
    writer.put(b"k", b"x").await.unwrap();
    let after = writer.get_stats();
    assert!(after.connections_broken >= 1, "{after:?}");
    assert!(
        after.connections_created > before.connections_created,
        "{after:?}"
    );
}

/// The seed's Monitoring snippet, unchanged (the health check's result returned).
async fn seed_monitoring(backend: &EnhancedPostgresBackend) -> anyhow::Result<bool> {
    // Get backend statistics
    let stats = backend.get_stats();
    println!(
        "Operations: {} gets, {} puts",
        stats.get_count, stats.put_count
    );
    println!("Average query time: {}ms", stats.avg_query_duration_ms);
    println!("Slow queries: {}", stats.slow_query_count);

    // Pool statistics
    let pool_stats = backend.get_pool_stats();
    println!(
        "Pool: {}/{} connections",
        pool_stats.active, pool_stats.max_size
    );

    // Replication status
    let repl_status = backend.check_replication_status().await?;
    println!("Is replica: {}", repl_status.is_replica);
    println!("Replication lag: {}ms", repl_status.lag_ms);

    // Health check
    let healthy = backend.health_check().await?;
    Ok(healthy)
}

/// The seed's Monitoring snippet runs on a backend that did 3 gets and 2 puts, and what it
/// reads is what happened.
#[tokio::test]
async fn seed_monitoring_snippet_reports_what_happened() {
    let backend = support::backend("seed_monitoring").await;
    backend.put(b"a", b"1").await.unwrap();
    backend.put(b"b", b"2").await.unwrap();
    for key in [b"a", b"b", b"c"] {
        backend.get(key).await.unwrap();
    }
    assert!(seed_monitoring(&backend).await.unwrap());
    let stats = backend.get_stats();
    assert_eq!((stats.get_count, stats.put_count), (3, 2));
    assert!(stats.avg_query_duration_ms > 0.0);
    let pool = backend.get_pool_stats();
    assert_eq!(pool.max_size, support::small_pool().max_connections);
    assert!(pool.active <= pool.max_size);
    let repl = backend.check_replication_status().await.unwrap();
    assert!(!repl.is_replica);
    assert_eq!(repl.lag_ms, 0, "no replicas configured");
}
