//! Through a real PgBouncer (Debian's package) in front of the shared cluster's primary:
//! transaction pooling with `pgbouncer=true` (unnamed statements, no session state), session
//! features through `with_session_url` or refused clearly, and session pooling as is.

use std::sync::Arc;
use std::time::Duration;

use pgstate_testcluster::PoolMode;
use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, PostgresListener,
    PostgresLockGuard, StateBackend, StateError,
};

use crate::{conformance, heap_walk, seed, support};

/// The transaction-pooling URL with `pgbouncer=true` (PgBouncer in front of the local
/// cluster).
fn transaction_url() -> String {
    format!(
        "{}&pgbouncer=true",
        support::local_bouncer(PoolMode::Transaction).url()
    )
}

fn config(url: &str, tag: &str) -> EnhancedPostgresConfig {
    EnhancedPostgresConfig::new(url)
        .with_schema(support::unique(tag))
        .with_pool_config(support::small_pool())
}

/// The configuration error that names the missing setting.
fn needs_session_url<T: std::fmt::Debug>(r: Result<T, StateError>) {
    let e = r.expect_err("a session feature behind transaction pooling");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(e.to_string().contains("with_session_url"), "{e}");
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn the_conformance_suite_passes_through_transaction_pooling() {
    let url = transaction_url();
    let b = Arc::new(
        EnhancedPostgresBackend::new(config(&url, "pgb_conf"))
            .await
            .unwrap(),
    );
    conformance::run(b.clone(), b.as_ref()).await;
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn the_seed_snippets_pass_through_transaction_pooling() {
    let url = transaction_url();
    seed::quick_start(url.clone()).await.unwrap();
    seed::migration_from_basic(&url).await.unwrap();
    let b = EnhancedPostgresBackend::new(config(&url, "pgb_seed"))
        .await
        .unwrap();
    seed::key_value_snippets(&b).await;
    // Coordination through the session URL, notifications through the pooler.
    let direct = support::url();
    let coordinated = EnhancedPostgresBackend::new(
        config(&url, "pgb_seed_coord").with_session_url(direct.clone()),
    )
    .await
    .unwrap();
    let (acquired, got_guard, is_leader) =
        seed::distributed_coordination(&coordinated).await.unwrap();
    assert!(acquired && got_guard && is_leader);
    assert!(coordinated.resign_leader("cluster_leader").await.unwrap());
    seed::check_listen_notify(&b, &direct).await;
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn transactions_versions_and_batches_pass_through_transaction_pooling() {
    let url = transaction_url();
    let b = EnhancedPostgresBackend::new(config(&url, "pgb_tx"))
        .await
        .unwrap();
    // Many tasks at once share PgBouncer's server connections: a named statement left on one
    // would surface as "prepared statement ... does not exist" or "already exists".
    conformance::run_enhanced(&b).await;
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn session_features_need_a_session_url_behind_transaction_pooling() {
    let url = transaction_url();
    let schema = support::unique("pgb_sess");
    let cfg = || {
        EnhancedPostgresConfig::new(&url)
            .with_schema(schema.clone())
            .with_pool_config(support::small_pool())
    };
    let pooled = EnhancedPostgresBackend::new(cfg()).await.unwrap();
    needs_session_url(pooled.acquire_advisory_lock(7).await);
    needs_session_url(PostgresLockGuard::new(&pooled, "job", Duration::ZERO).await);
    needs_session_url(
        pooled
            .try_become_leader("leader", Duration::from_secs(5))
            .await,
    );
    needs_session_url(PostgresListener::from_backend(&pooled, &["chan"]).await);
    let direct_listen = PostgresListener::new(&url, "chan").await;
    assert!(
        matches!(&direct_listen, Err(e) if e.to_string().contains("pgbouncer=true")),
        "{:?}",
        direct_listen.err()
    );
    // A session setting would not stick: refused when the backend is created.
    let e = EnhancedPostgresBackend::new(cfg().with_statement_timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration);
    // The same through the builder instead of the URL parameter.
    let plain = support::local_bouncer(PoolMode::Transaction).url();
    let built = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(&plain)
            .with_schema(schema.clone())
            .with_transaction_pooling(true),
    )
    .await
    .unwrap();
    needs_session_url(built.acquire_advisory_lock(7).await);
    assert_eq!(built.count().await.unwrap(), 0);

    // With a session URL, locks exclude, one leader leads, and listeners hear notifications
    // sent through the pooler.
    let a = EnhancedPostgresBackend::new(cfg().with_session_url(support::url()))
        .await
        .unwrap();
    let b = EnhancedPostgresBackend::new(cfg().with_session_url(support::url()))
        .await
        .unwrap();
    assert!(a.acquire_advisory_lock(7).await.unwrap());
    assert!(!b.acquire_advisory_lock(7).await.unwrap());
    let guard = PostgresLockGuard::new(&a, "job", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(PostgresLockGuard::new(&b, "job", Duration::ZERO)
        .await
        .unwrap()
        .is_none());
    guard.release().await.unwrap();
    assert!(a
        .try_become_leader("leader", Duration::from_secs(10))
        .await
        .unwrap());
    assert!(!b
        .try_become_leader("leader", Duration::from_secs(10))
        .await
        .unwrap());
    let mut listener = PostgresListener::from_backend(&a, &["chan"]).await.unwrap();
    b.notify("chan", "through the pooler").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, "through the pooler");
    a.release_advisory_lock(7).await.unwrap();
    assert!(a.resign_leader("leader").await.unwrap());
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn session_pooling_works_without_any_setting() {
    let bouncer = support::local_bouncer(PoolMode::Session);
    let url = bouncer.url();
    let b = Arc::new(
        EnhancedPostgresBackend::new(config(&url, "pgb_session"))
            .await
            .unwrap(),
    );
    conformance::run(b.clone(), b.as_ref()).await;
    let schema = b.config().schema().to_string();
    let other = EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(&url).with_schema(schema))
        .await
        .unwrap();
    let guard = PostgresLockGuard::new(b.as_ref(), "s", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(PostgresLockGuard::new(&other, "s", Duration::ZERO)
        .await
        .unwrap()
        .is_none());
    drop(guard);
}

/// What the pooler reports of its pool for database `postgres`: (pool mode, server
/// connections in it), from its admin console.
async fn pool_of(url: &str) -> (String, i64) {
    let admin_url = url.replace("/postgres?", "/pgbouncer?");
    let admin = support::raw(&admin_url).await;
    let rows = admin.simple_query("SHOW POOLS").await.unwrap();
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            if r.get("database") == Some("postgres") {
                let servers: i64 = ["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"]
                    .iter()
                    .filter_map(|c| r.get(*c)?.parse::<i64>().ok())
                    .sum();
                return (r.get("pool_mode").unwrap_or("").to_string(), servers);
            }
        }
    }
    panic!("no pool for database postgres");
}

/// Without `pgbouncer=true`, named statements break behind transaction pooling (what the
/// issue reproduced): the control that shows the tests above really ran through it.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn without_the_setting_transaction_pooling_breaks_named_statements() {
    let bouncer = support::local_bouncer(PoolMode::Transaction);
    let (mode, _) = pool_of(&bouncer.url()).await;
    assert_eq!(mode, "transaction");
    // Two clients: each prepares at connect; PgBouncer then runs their statements on server
    // connections where the other's (or no) statements were prepared.
    let cfg = config(&bouncer.url(), "pgb_naive");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let mut failures = 0;
    for i in 0..200u32 {
        let v = i.to_be_bytes();
        let (x, y) = tokio::join!(a.put(b"k", &v), b.get(b"k"));
        failures += usize::from(x.is_err()) + usize::from(y.is_err());
    }
    eprintln!("{failures} of 400 calls failed without pgbouncer=true");
    assert!(
        failures > 0,
        "transaction pooling did not bite: is PgBouncer in session mode?"
    );
}

/// A claim taken through transaction pooling fences: no session outlives a transaction
/// there, and the later claim still refuses the earlier one's commit.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn a_claim_fences_through_transaction_pooling() {
    let url = transaction_url();
    let cfg = config(&url, "pgb_claim");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let mut old = a.claim("op").await.unwrap();
    old.put(b"k", b"old").unwrap();
    old.commit(&[processor::state::SourceOffset::new("s", 0, 1)], &[])
        .await
        .unwrap();
    let mut new = b.claim("op").await.unwrap();
    assert_eq!(new.recovery().offset("s", 0), Some(1));
    old.put(b"k", b"zombie").unwrap();
    let e = old.commit(&[], &[]).await.unwrap_err();
    assert!(matches!(e, StateError::EpochFenced { epoch: 1, .. }), "{e}");
    new.put(b"k", b"new").unwrap();
    new.commit(&[], &[processor::state::Output::new("t", "k", "v")])
        .await
        .unwrap();
    assert_eq!(a.get(b"k").await.unwrap(), Some(b"new".to_vec()));
    let reader = a.outbox_reader("r").await.unwrap();
    assert_eq!(reader.read(10).await.unwrap().len(), 1);
}

/// Incremental checkpoints through transaction pooling: taken, restored (only what changed)
/// and deleted with the history they held, all without session state.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn incremental_checkpoints_work_through_transaction_pooling() {
    let url = transaction_url();
    let b = EnhancedPostgresBackend::new(config(&url, "pgb_ckpt"))
        .await
        .unwrap();
    for i in 0..100 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    let c = b.create_checkpoint("c").await.unwrap();
    assert_eq!(c.entry_count, 100);
    b.put(b"k1", b"changed").await.unwrap();
    b.delete(b"k2").await.unwrap();
    b.put(b"new", b"n").await.unwrap();
    let held = b.list_checkpoints().await.unwrap()[0].history_entries;
    assert_eq!(held, 2);
    assert_eq!(b.restore_checkpoint(c.id).await.unwrap(), 100);
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.get(b"k2").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.get(b"new").await.unwrap(), None);
    assert!(b.delete_checkpoint(c.id).await.unwrap());
    assert!(b.list_checkpoints().await.unwrap().is_empty());
}

/// `clear()` through transaction pooling while other calls keep the server connections
/// busy: every statement it sends is unnamed (a named one, prepared on one server connection
/// and run on another, failed with "prepared statement does not exist").
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn clear_works_through_transaction_pooling_while_others_run() {
    let url = transaction_url();
    let b = Arc::new(
        EnhancedPostgresBackend::new(config(&url, "pgb_clear"))
            .await
            .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others: Vec<_> = (0..4)
        .map(|t| {
            let (b, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("busy{t}:{}", i % 10);
                    b.put(key.as_bytes(), b"v").await.unwrap();
                    b.get(key.as_bytes()).await.unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..30 {
        b.put(b"k", b"v").await.unwrap();
        b.clear().await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for o in others {
        o.await.unwrap();
    }
    b.clear().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 0);
}

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn cleanup_in_heap_order_works_through_transaction_pooling_while_writers_run() {
    let url = transaction_url();
    // 15 000 of 20 000 rows expired: the heap walk's share.
    let (b, _, _) = heap_walk::filled(config(&url, "pgb_heap")).await;
    let b = Arc::new(b);
    // Writers creating keys meanwhile (each insert takes the floor lock shared).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (b, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                    b.put(format!("w{w}:{i}").as_bytes(), &i.to_be_bytes())
                        .await
                        .unwrap();
                    i += 1;
                }
                i
            })
        })
        .collect();
    assert_eq!(b.cleanup_expired().await.unwrap(), 15_000);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for (w, h) in writers.into_iter().enumerate() {
        let n = h.await.unwrap();
        written += n;
        let last = format!("w{w}:{}", n - 1);
        assert_eq!(
            b.get(last.as_bytes()).await.unwrap(),
            Some((n - 1).to_be_bytes().to_vec())
        );
    }
    assert_eq!(b.count().await.unwrap(), 5_000 + written as usize);
    // Versions never repeat: `x:7` (version 40) was removed and comes back above it.
    assert!(b.get(b"x:7").await.unwrap().is_none());
    assert!(b.put_with_version(b"x:7", b"again", None).await.unwrap() > 40);
}
