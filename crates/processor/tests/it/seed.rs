//! The seed's snippets, verbatim except for the connection URL (the seed's
//! `postgresql://user:pass@localhost/db` becomes the test server's URL), run against the
//! local cluster. See `../shared/seed/enhanced-postgres-state-backend.md`.

use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, StateBackend, StateError};

use crate::support;

/// "Quick Start", the body of the seed's `main`.
pub(crate) async fn quick_start(url: String) -> anyhow::Result<()> {
    use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

    // Basic configuration
    let config = EnhancedPostgresConfig::new(url);

    // Create backend
    let backend = EnhancedPostgresBackend::new(config).await?;

    // Use like any StateBackend
    backend.put(b"key", b"value").await?;
    let value = backend.get(b"key").await?;

    assert_eq!(value, Some(b"value".to_vec()));
    Ok(())
}

#[tokio::test]
async fn seed_quick_start() {
    quick_start(support::url()).await.unwrap();
}

/// "Basic Operations".
pub(crate) async fn basic_operations(backend: &EnhancedPostgresBackend) -> anyhow::Result<()> {
    // Put with metadata
    backend
        .put_with_metadata(
            b"user:123",
            b"user_data",
            serde_json::json!({
                "type": "user",
                "created_at": "2025-01-01",
                "source": "registration"
            }),
        )
        .await?;

    // Put with TTL
    backend
        .put_with_ttl(
            b"session:456",
            b"session_data",
            Duration::from_secs(3600), // 1 hour
        )
        .await?;

    // Batch operations
    let entries: Vec<(&[u8], &[u8])> = vec![
        (b"key1", b"value1"),
        (b"key2", b"value2"),
        (b"key3", b"value3"),
    ];
    backend.batch_put(&entries).await?;

    // High-performance bulk insert
    backend.batch_copy(&entries).await?;
    Ok(())
}

#[tokio::test]
async fn seed_basic_operations() {
    let backend = support::backend("seed_basic").await;
    basic_operations(&backend).await.unwrap();
    let user = backend.get_entry(b"user:123").await.unwrap().unwrap();
    assert_eq!(user.value, b"user_data");
    assert_eq!(user.metadata["source"], "registration");
    let session = backend.get_entry(b"session:456").await.unwrap().unwrap();
    let left = session
        .expires_at
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
        "{left:?}"
    );
    for i in 1..=3 {
        let k = format!("key{i}");
        let e = backend.get_entry(k.as_bytes()).await.unwrap().unwrap();
        assert_eq!(e.value, format!("value{i}").into_bytes());
        // Written by batch_put, then again by batch_copy: two writes, version 2.
        assert_eq!(e.version, 2);
    }
    assert_eq!(backend.count().await.unwrap(), 5);
}

/// "Optimistic Locking". `first`: the version a new key gets, 1 on a table nothing was
/// removed from (above the version floor after `clear()`).
pub(crate) async fn optimistic_locking(
    backend: &EnhancedPostgresBackend,
    first: i64,
) -> anyhow::Result<()> {
    // Insert with version 1
    let version = backend.put_with_version(b"key", b"value1", None).await?;
    // version == 1
    assert_eq!(version, first);

    // Update with version check
    let new_version = backend
        .put_with_version(b"key", b"value2", Some(version))
        .await?;
    // new_version == 2
    assert_eq!(new_version, first + 1);

    // Concurrent update with stale version fails
    let result = backend
        .put_with_version(b"key", b"value3", Some(version))
        .await;
    // result is Err(StateError::ConcurrentModification)
    assert!(matches!(
        result,
        Err(StateError::ConcurrentModification { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn seed_optimistic_locking() {
    let backend = support::backend("seed_opt").await;
    optimistic_locking(&backend, 1).await.unwrap();
    assert_eq!(backend.get(b"key").await.unwrap(), Some(b"value2".to_vec()));
    // Creating a key that exists fails too.
    let again = backend.put_with_version(b"key", b"x", None).await;
    assert!(matches!(
        again,
        Err(StateError::ConcurrentModification { .. })
    ));
}

/// "Query by Metadata".
pub(crate) async fn query_by_metadata(
    backend: &EnhancedPostgresBackend,
) -> anyhow::Result<(usize, usize)> {
    // Find all users
    let users = backend
        .query_by_metadata("type", &serde_json::json!({"type": "user"}))
        .await?;

    // Find specific user
    let user = backend
        .query_by_metadata("id", &serde_json::json!({"id": 123}))
        .await?;
    Ok((users.len(), user.len()))
}

#[tokio::test]
async fn seed_query_by_metadata() {
    let backend = support::backend("seed_query").await;
    for (key, meta) in [
        ("user:123", serde_json::json!({"type": "user", "id": 123})),
        ("user:124", serde_json::json!({"type": "user", "id": 124})),
        ("order:1", serde_json::json!({"type": "order", "id": 123})),
        ("other", serde_json::json!({"kind": "user"})),
    ] {
        backend
            .put_with_metadata(key.as_bytes(), b"v", meta)
            .await
            .unwrap();
    }
    let (users, id123) = query_by_metadata(&backend).await.unwrap();
    assert_eq!(users, 2);
    assert_eq!(id123, 2, "user:123 and order:1 both have id 123");
}

/// "Migration from Basic Backend" (the snippet's lines unchanged, checks in between).
pub(crate) async fn migration_from_basic(url: &str) -> anyhow::Result<()> {
    // Old
    use processor::state::{PostgresConfig, PostgresStateBackend};
    let backend = PostgresStateBackend::new(PostgresConfig::new(url)).await?;
    backend
        .put(b"seed-migration-key", b"written by basic")
        .await?;

    // New
    use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig};
    let backend = EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url)).await?;
    // Both implement the StateBackend trait, on the same table.
    assert_eq!(
        backend.get(b"seed-migration-key").await?,
        Some(b"written by basic".to_vec())
    );
    backend.delete(b"seed-migration-key").await?;
    Ok(())
}

#[tokio::test]
async fn seed_migration_from_basic() {
    migration_from_basic(&support::url()).await.unwrap();
}

/// "Advanced Configuration": compiles unchanged; creating the backend is the replication
/// issue's test (it needs replicas whose URLs the seed hard-codes).
#[allow(dead_code, unused_variables)]
async fn advanced_configuration() -> anyhow::Result<()> {
    use processor::state::{
        EnhancedPostgresConfig, IsolationLevel, PostgresPoolConfig, PostgresReplicaConfig,
        PostgresSslConfig, RetentionPolicy,
    };
    use std::time::Duration;

    let config = EnhancedPostgresConfig::new("postgresql://user:pass@primary:5432/db")
        // Connection pool
        .with_pool_config(PostgresPoolConfig {
            min_connections: 5,
            max_connections: 50,
            acquire_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            health_check_interval: Duration::from_secs(30),
            test_on_acquire: true,
        })
        // SSL/TLS
        .with_ssl_config(PostgresSslConfig {
            mode: "verify-full".to_string(),
            root_cert_path: Some("/path/to/ca-cert.pem".into()),
            client_cert_path: Some("/path/to/client-cert.pem".into()),
            client_key_path: Some("/path/to/client-key.pem".into()),
        })
        // Read replicas
        .with_replicas(PostgresReplicaConfig {
            replica_urls: vec![
                "postgresql://user:pass@replica1:5432/db".to_string(),
                "postgresql://user:pass@replica2:5432/db".to_string(),
            ],
            enable_read_splitting: true,
            max_replication_lag_ms: 1000,
            health_check_interval: Duration::from_secs(10),
            enable_auto_failover: true,
        })
        // Transaction isolation
        .with_isolation_level(IsolationLevel::RepeatableRead)
        // Data retention
        .with_retention_policy(RetentionPolicy {
            enabled: true,
            max_age: Duration::from_secs(86400 * 30), // 30 days
            cleanup_interval: Duration::from_secs(3600),
            batch_size: 1000,
        });

    let backend = EnhancedPostgresBackend::new(config).await?;
    Ok(())
}

#[tokio::test]
async fn seed_advanced_configuration_fails_clearly_on_missing_certificate() {
    // The snippet names certificate files that do not exist here: new() must say which.
    let err = advanced_configuration().await.unwrap_err();
    let err = err.downcast::<StateError>().unwrap();
    assert!(matches!(err, StateError::Tls(_)), "{err}");
    assert!(err.to_string().contains("/path/to/ca-cert.pem"), "{err}");
    assert!(!err.to_string().contains("pass@"), "{err}");
}

/// The key/value snippets (basic operations, optimistic locking, metadata queries) on `b`,
/// with no live entries, checking what each leaves behind.
pub(crate) async fn key_value_snippets(b: &EnhancedPostgresBackend) {
    // New keys start above the version floor (0 on a table nothing was removed from; raised
    // by `clear()`, which callers may have run): key2 is written twice.
    let floor_seq = format!("{}_version_floor\"", b.table().trim_end_matches('"'));
    let floor: i64 = support::raw(&support::url())
        .await
        .query_one(&format!("SELECT last_value FROM {floor_seq}"), &[])
        .await
        .unwrap()
        .get(0);
    basic_operations(b).await.unwrap();
    assert_eq!(
        b.get_entry(b"key2").await.unwrap().unwrap().version,
        floor + 2
    );
    assert_eq!(b.count().await.unwrap(), 5);
    optimistic_locking(b, floor + 1).await.unwrap();
    assert_eq!(b.get(b"key").await.unwrap(), Some(b"value2".to_vec()));
    b.put_with_metadata(
        b"user:1",
        b"v",
        serde_json::json!({"type": "user", "id": 123}),
    )
    .await
    .unwrap();
    assert_eq!(query_by_metadata(b).await.unwrap(), (2, 1));
}

/// The snippet's advisory lock (12345) and lock name are database-wide: tests that run it
/// at the same time (seed, partitioning, PgBouncer) would take them from each other, and
/// `acquire_advisory_lock` does not wait. One at a time.
static COORDINATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// "Distributed Coordination", verbatim (after taking its turn); returns what it observed so
/// the test can check it.
#[allow(unused_variables)]
#[rustfmt::skip]
pub(crate) async fn distributed_coordination(
    backend: &EnhancedPostgresBackend,
) -> anyhow::Result<(bool, bool, bool)> {
    use processor::state::PostgresLockGuard;
    let _one_at_a_time = COORDINATION.lock().await;

    // Advisory lock
    let acquired = backend.acquire_advisory_lock(12345).await?;
    if acquired {
        // Critical section
        backend.release_advisory_lock(12345).await?;
    }

    // Lock guard (RAII)
    let guard = PostgresLockGuard::new(
        backend.clone_handle(),
        "my_lock",
        Duration::from_secs(30)
    ).await?;

    let got_guard = guard.is_some();
    if let Some(guard) = guard {
        // Lock acquired, do work
        // Lock automatically released when guard drops
    }

    // Leader election
    let is_leader = backend.try_become_leader(
        "cluster_leader",
        Duration::from_secs(60)
    ).await?;

    if is_leader {
        // This instance is the leader
    }
    Ok((acquired, got_guard, is_leader))
}

#[tokio::test]
async fn seed_distributed_coordination() {
    let cfg = support::config("seed_coord");
    let backend = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let (acquired, got_guard, is_leader) = distributed_coordination(&backend).await.unwrap();
    assert!(acquired && got_guard && is_leader);
    // The lock was released, the guard's lock too (within a second), and leadership holds.
    let other = EnhancedPostgresBackend::new(cfg).await.unwrap();
    assert!(other.acquire_advisory_lock(12345).await.unwrap());
    other.release_advisory_lock(12345).await.unwrap();
    let start = std::time::Instant::now();
    while processor::state::PostgresLockGuard::new(other.clone_handle(), "my_lock", Duration::ZERO)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "guard not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(backend.is_leader("cluster_leader"));
    assert!(!other
        .try_become_leader("cluster_leader", Duration::from_secs(60))
        .await
        .unwrap());
    let leader = other
        .current_leader("cluster_leader")
        .await
        .unwrap()
        .unwrap();
    assert!(leader.lease_remaining > Duration::from_secs(30));
    // Running the snippet again: this instance still leads.
    let (_, _, still) = distributed_coordination(&backend).await.unwrap();
    assert!(still);
    assert!(backend.resign_leader("cluster_leader").await.unwrap());
}

/// "Data Management", verbatim.
#[allow(unused_variables)]
#[rustfmt::skip]
pub(crate) async fn data_management(backend: &EnhancedPostgresBackend) -> anyhow::Result<()> {
    // Vacuum and analyze
    backend.vacuum_analyze(false).await?; // Regular vacuum
    backend.vacuum_analyze(true).await?;  // Full vacuum

    // Apply retention policy
    let deleted = backend.apply_retention_policy().await?;
    println!("Deleted {} expired entries", deleted);

    // Archive old data
    let archived = backend.archive_old_data(
        "state_entries_archive",
        Duration::from_secs(86400 * 90) // 90 days
    ).await?;

    // Get table statistics
    let stats = backend.get_table_statistics().await?;
    println!("Total rows: {}", stats.total_rows);
    println!("Table size: {} bytes", stats.table_size);
    println!("Index size: {} bytes", stats.indexes_size);
    Ok(())
}

#[tokio::test]
async fn seed_data_management() {
    let backend = support::backend("seed_data").await;
    backend.put(b"live", b"v").await.unwrap();
    backend
        .put_with_ttl(b"gone", b"v", Duration::from_millis(1))
        .await
        .unwrap();
    backend.put(b"old", b"v").await.unwrap();
    let admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "UPDATE {} SET updated_at = now() - interval '100 days' WHERE key = 'old'",
            backend.table()
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    data_management(&backend).await.unwrap();
    let stats = backend.get_table_statistics().await.unwrap();
    assert_eq!(
        stats.total_rows, 1,
        "the expired entry deleted, the old one archived"
    );
    assert!(stats.table_size > 0 && stats.indexes_size > 0);
    let old = backend
        .get_archived("state_entries_archive", b"old")
        .await
        .unwrap()
        .expect("archived");
    assert_eq!(old.value, b"v");
    assert_eq!(backend.get(b"live").await.unwrap(), Some(b"v".to_vec()));
}

/// "LISTEN/NOTIFY", verbatim except for the URL literal.
#[rustfmt::skip]
async fn listen_notify(backend: &EnhancedPostgresBackend, url: &str) -> anyhow::Result<()> {
    use processor::state::PostgresListener;

    // Notify
    backend.notify("state_changes", "new_data_available").await?;

    // Listen (in a separate task/connection)
    let mut listener = PostgresListener::new(
        url,
        "state_changes"
    ).await?;

    while let Ok(message) = listener.recv().await {
        println!("Received: {}", message);
    }
    Ok(())
}

#[tokio::test]
async fn seed_listen_notify() {
    let backend = support::backend("seed_listen").await;
    check_listen_notify(&backend, &support::url()).await;
}

/// Runs the LISTEN/NOTIFY snippet with `backend` notifying and the snippet's listener on
/// `listen_url` (a direct URL of the shared server's primary), and checks what arrives.
pub(crate) async fn check_listen_notify(backend: &EnhancedPostgresBackend, listen_url: &str) {
    use processor::state::PostgresListener;
    let app = support::unique("seed_listener");
    let url = crate::listener::with_param(listen_url, &format!("application_name={app}"));
    // A listener of our own sees the snippet's notification.
    let mut witness = PostgresListener::new(listen_url, "state_changes")
        .await
        .unwrap();
    let snippet = {
        let backend = backend.clone_handle();
        tokio::spawn(async move { listen_notify(&backend, &url).await })
    };
    assert_eq!(witness.recv().await.unwrap(), "new_data_available");
    // Wait until the snippet's listener is set up (its LISTEN answered), then notify it.
    let admin = support::raw(listen_url).await;
    let start = std::time::Instant::now();
    let pid: i32 = loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'idle' AND query LIKE 'LISTEN %'",
                &[&app],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let seen: Vec<(String, String)> = admin
                .query(
                    "SELECT coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            panic!("listener never ready: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    backend.notify("state_changes", "second").await.unwrap();
    assert_eq!(witness.recv().await.unwrap(), "second");
    // Its loop runs until recv() reports an error: a dropped connection is one (reported
    // once after reconnecting), so terminating the session ends the snippet cleanly.
    crate::coordination::terminate_on(listen_url, pid).await;
    tokio::time::timeout(Duration::from_secs(30), snippet)
        .await
        .expect("the loop ends on the reported gap")
        .unwrap()
        .unwrap();
}
