//! Transactions under concurrency: retries, deadlocks, isolation, savepoints, drops and
//! killed connections.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, ErrorKind, IsolationLevel, PostgresPoolConfig, StateBackend,
    StateError,
};
use tokio::sync::Barrier;

use crate::support;

pub(crate) fn parse(v: Option<Vec<u8>>) -> i64 {
    std::str::from_utf8(&v.expect("value present"))
        .expect("utf8")
        .parse()
        .expect("number")
}

/// A backend whose pool has exactly one connection, so the next operation reuses it.
pub(crate) async fn one_connection_backend(tag: &str) -> EnhancedPostgresBackend {
    let cfg = support::config(tag).with_pool_config(PostgresPoolConfig {
        min_connections: 1,
        max_connections: 1,
        ..support::small_pool()
    });
    EnhancedPostgresBackend::new(cfg).await.unwrap()
}

/// The keys another session sees committed in `b`'s table.
pub(crate) async fn keys_seen_outside(b: &EnhancedPostgresBackend) -> Vec<Vec<u8>> {
    let outside = support::raw(&support::url()).await;
    outside
        .query(&format!("SELECT key FROM {} ORDER BY key", b.table()), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The seed's "Transactions" snippet, unchanged.
async fn seed_transactions(backend: &EnhancedPostgresBackend) -> anyhow::Result<()> {
    use processor::state::IsolationLevel;

    // Begin transaction
    let mut tx = backend
        .begin_transaction(IsolationLevel::Serializable)
        .await?;

    // Use savepoints
    tx.savepoint("sp1").await?;

    // ... perform operations ...
    tx.put(b"after-sp1", b"undone").await?;

    // Rollback to savepoint if needed
    tx.rollback_to_savepoint("sp1").await?;

    // Commit transaction
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn seed_transactions_snippet() {
    let b = support::backend("tx_seed").await;
    seed_transactions(&b).await.unwrap();
    assert_eq!(b.get(b"after-sp1").await.unwrap(), None);
    let s = b.get_stats();
    assert_eq!((s.transactions_begun, s.transactions_committed), (1, 1));
}

#[tokio::test]
async fn bank_transfers_under_serializable_keep_the_total() {
    const ACCOUNTS: usize = 20;
    let cfg = support::config("bank")
        .with_max_retries(200)
        .with_retry_backoff(Duration::from_millis(2))
        .with_pool_config(PostgresPoolConfig {
            min_connections: 2,
            max_connections: 8,
            ..support::small_pool()
        });
    let b = Arc::new(EnhancedPostgresBackend::new(cfg).await.unwrap());
    let accounts: Vec<Vec<u8>> = (0..ACCOUNTS)
        .map(|i| format!("acct:{i:02}").into_bytes())
        .collect();
    let initial: Vec<(&[u8], &[u8])> = accounts
        .iter()
        .map(|a| (a.as_slice(), &b"1000"[..]))
        .collect();
    b.batch_put(&initial).await.unwrap();

    let mut workers = Vec::new();
    for w in 0..8u64 {
        let b = b.clone();
        let accounts = accounts.clone();
        workers.push(tokio::spawn(async move {
            let mut x = 0x2545_F491_4F6C_DD1D_u64.wrapping_mul(w + 1);
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let from = (x % ACCOUNTS as u64) as usize;
                let to = (from + 1 + (x >> 8) as usize % (ACCOUNTS - 1)) % ACCOUNTS;
                let amount = (x >> 20) % 50 + 1;
                let (from, to) = (accounts[from].clone(), accounts[to].clone());
                b.transaction(IsolationLevel::Serializable, |tx| {
                    let (from, to) = (from.clone(), to.clone());
                    Box::pin(async move {
                        let a = parse(tx.get(&from).await?);
                        let c = parse(tx.get(&to).await?);
                        tx.put(&from, (a - amount as i64).to_string().as_bytes())
                            .await?;
                        tx.put(&to, (c + amount as i64).to_string().as_bytes())
                            .await?;
                        Ok(())
                    })
                })
                .await
                .expect("no serialization error reaches the caller");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut total = 0;
    for a in &accounts {
        total += parse(b.get(a).await.unwrap());
    }
    assert_eq!(total, 1000 * ACCOUNTS as i64, "money created or destroyed");
    let s = b.get_stats();
    assert_eq!(s.transactions_committed, 2400);
    assert!(s.transaction_retries > 0, "expected contention: {s:?}");
    assert!(s.serialization_failures > 0, "{s:?}");
    eprintln!(
        "2400 transfers: {} retries, {} serialization failures, {} deadlocks",
        s.transaction_retries, s.serialization_failures, s.deadlocks
    );
}

#[tokio::test]
async fn deadlocks_are_retried_until_both_complete() {
    let b = Arc::new(
        EnhancedPostgresBackend::new(
            support::config("deadlock").with_retry_backoff(Duration::from_millis(5)),
        )
        .await
        .unwrap(),
    );
    b.put(b"A", b"0").await.unwrap();
    b.put(b"B", b"0").await.unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for (first, second) in [(b"A", b"B"), (b"B", b"A")] {
        let (b, barrier) = (b.clone(), barrier.clone());
        let first_attempt = Arc::new(AtomicBool::new(true));
        tasks.push(tokio::spawn(async move {
            b.transaction(IsolationLevel::ReadCommitted, |tx| {
                let (barrier, first_attempt) = (barrier.clone(), first_attempt.clone());
                Box::pin(async move {
                    let n = parse(tx.get(first).await?);
                    tx.put(first, (n + 1).to_string().as_bytes()).await?;
                    if first_attempt.swap(false, Ordering::SeqCst) {
                        // Both hold their first row lock before either asks for the second.
                        barrier.wait().await;
                    }
                    let n = parse(tx.get(second).await?);
                    tx.put(second, (n + 1).to_string().as_bytes()).await?;
                    Ok(())
                })
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("both transactions complete");
    }
    assert_eq!(parse(b.get(b"A").await.unwrap()), 2);
    assert_eq!(parse(b.get(b"B").await.unwrap()), 2);
    let s = b.get_stats();
    assert!(
        s.deadlocks >= 1,
        "PostgreSQL should have detected the deadlock: {s:?}"
    );
    assert!(s.transaction_retries >= 1);
}

#[tokio::test]
async fn isolation_levels_behave_as_postgresql_defines() {
    let b = support::backend("isolation").await;
    b.put(b"k", b"1").await.unwrap();

    // Repeatable Read: the snapshot is taken at the first statement.
    let mut rr = b
        .begin_transaction(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    assert_eq!(rr.get(b"k").await.unwrap(), Some(b"1".to_vec()));
    b.put(b"k", b"2").await.unwrap();
    assert_eq!(
        rr.get(b"k").await.unwrap(),
        Some(b"1".to_vec()),
        "RR saw a later commit"
    );
    rr.commit().await.unwrap();

    // Read Committed: each statement sees what is committed when it starts.
    let mut rc = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    assert_eq!(rc.get(b"k").await.unwrap(), Some(b"2".to_vec()));
    b.put(b"k", b"3").await.unwrap();
    assert_eq!(
        rc.get(b"k").await.unwrap(),
        Some(b"3".to_vec()),
        "RC missed a commit"
    );
    rc.commit().await.unwrap();

    // The default level comes from the configuration.
    let tx = b.begin().await.unwrap();
    assert_eq!(tx.isolation_level(), IsolationLevel::ReadCommitted);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn serializable_prevents_write_skew() {
    let b = support::backend("doctors").await;
    b.put(b"doctor:alice", b"on").await.unwrap();
    b.put(b"doctor:bob", b"on").await.unwrap();
    async fn on_call(tx: &mut processor::state::PostgresTransaction) -> usize {
        let mut n = 0;
        for k in tx.list_keys(b"doctor:").await.unwrap() {
            if tx.get(&k).await.unwrap().as_deref() == Some(b"on") {
                n += 1;
            }
        }
        n
    }
    let mut t1 = b
        .begin_transaction(IsolationLevel::Serializable)
        .await
        .unwrap();
    let mut t2 = b
        .begin_transaction(IsolationLevel::Serializable)
        .await
        .unwrap();
    assert_eq!(on_call(&mut t1).await, 2);
    assert_eq!(on_call(&mut t2).await, 2);
    let w1 = t1.put(b"doctor:alice", b"off").await;
    let w2 = t2.put(b"doctor:bob", b"off").await;
    let c1 = match w1 {
        Ok(()) => t1.commit().await,
        Err(e) => Err(e),
    };
    let c2 = match w2 {
        Ok(()) => t2.commit().await,
        Err(e) => Err(e),
    };
    let failures: Vec<&StateError> = [&c1, &c2]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert_eq!(
        failures.len(),
        1,
        "exactly one doctor may go off call: {c1:?} {c2:?}"
    );
    assert_eq!(failures[0].sqlstate(), Some("40001"), "{}", failures[0]);
    assert!(failures[0].is_retryable());
    let still_on: [&[u8]; 2] = [b"doctor:alice", b"doctor:bob"];
    let mut n = 0;
    for k in still_on {
        if b.get(k).await.unwrap().as_deref() == Some(b"on") {
            n += 1;
        }
    }
    assert_eq!(n, 1, "someone is still on call");
}

#[tokio::test]
async fn savepoints_undo_exactly_the_later_writes_and_refuse_hostile_names() {
    let b = support::backend("savepoints").await;
    b.put(b"pre", b"1").await.unwrap();
    let mut tx = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    tx.put(b"a", b"1").await.unwrap();
    tx.savepoint("sp1").await.unwrap();
    tx.put(b"b", b"1").await.unwrap();
    tx.delete(b"pre").await.unwrap();
    tx.savepoint("sp2").await.unwrap();
    tx.put(b"c", b"1").await.unwrap();
    tx.rollback_to_savepoint("sp1").await.unwrap();
    // sp2 went with the rollback; sp1 is still there.
    assert!(matches!(
        tx.rollback_to_savepoint("sp2").await,
        Err(StateError::InvalidInput(_))
    ));
    for hostile in [
        "x; DROP TABLE state_entries; --",
        "a\"b",
        "a'b",
        "",
        "with space",
        &"s".repeat(64),
    ] {
        let err = tx.savepoint(hostile).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{hostile:?}: {err}");
        assert!(tx.rollback_to_savepoint(hostile).await.is_err());
        assert!(tx.release_savepoint(hostile).await.is_err());
    }
    let unknown = tx.rollback_to_savepoint("never_set").await.unwrap_err();
    assert!(
        unknown.to_string().contains("no savepoint named"),
        "{unknown}"
    );
    assert!(!tx.is_aborted(), "refusals leave the transaction usable");
    tx.put(b"d", b"1").await.unwrap();
    tx.savepoint(&"s".repeat(63)).await.unwrap();
    tx.release_savepoint("sp1").await.unwrap();
    tx.commit().await.unwrap();
    let keys = b.list_keys(b"").await.unwrap();
    assert_eq!(keys, vec![b"a".to_vec(), b"d".to_vec(), b"pre".to_vec()]);
}

#[tokio::test]
async fn a_savepoint_recovers_an_aborted_transaction_and_commit_refuses_an_aborted_one() {
    let b = support::backend("aborted").await;
    b.put(b"kept", b"1").await.unwrap();

    // Read-only transactions refuse writes on the server; commit must then report failure.
    let mut ro = b
        .begin_read_only(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    assert!(ro.is_read_only());
    let err = ro.put(b"nope", b"1").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("25006"), "{err}");
    assert!(ro.is_aborted());
    let err = ro.commit().await.unwrap_err();
    assert!(matches!(err, StateError::TransactionFailed { .. }), "{err}");
    assert_eq!(b.get(b"nope").await.unwrap(), None);

    // A savepoint taken before the error recovers the transaction.
    let mut tx = b
        .begin_read_only(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    tx.savepoint("sp").await.unwrap();
    assert!(tx.put(b"nope", b"1").await.is_err());
    assert!(
        tx.get(b"x").await.is_err(),
        "PostgreSQL refuses statements in an aborted transaction"
    );
    tx.rollback_to_savepoint("sp").await.unwrap();
    assert!(!tx.is_aborted());
    assert_eq!(tx.get(b"kept").await.unwrap(), Some(b"1".to_vec()));
    tx.commit().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 1);
}

#[tokio::test]
async fn a_dropped_transaction_rolls_back_and_the_connection_comes_back_clean() {
    let b = one_connection_backend("txdrop").await;
    {
        let mut tx = b
            .begin_transaction(IsolationLevel::ReadCommitted)
            .await
            .unwrap();
        tx.put(b"uncommitted", b"1").await.unwrap();
        // Dropped here without commit or rollback.
    }
    // The only connection is reused: if it were still inside the dropped transaction, this
    // write would be invisible to other sessions.
    b.put(b"after", b"1").await.unwrap();
    assert_eq!(keys_seen_outside(&b).await, vec![b"after".to_vec()]);
    assert!(b.get_stats().transactions_rolled_back >= 1);
}

#[tokio::test]
async fn a_killed_connection_mid_transaction_is_a_clear_error_and_retries_complete_once() {
    let app = support::unique("txkill");
    let cfg = support::config("txkill")
        .with_application_name(app.clone())
        .with_pool_config(PostgresPoolConfig {
            min_connections: 1,
            max_connections: 1,
            ..support::small_pool()
        });
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"counter", b"0").await.unwrap();

    // Explicit transaction: a clear error, nothing visible, the pool keeps working.
    let mut tx = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    tx.put(b"lost", b"1").await.unwrap();
    support::terminate_sessions(&app).await;
    let err = tx.put(b"lost2", b"1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let err = tx.commit().await.unwrap_err();
    assert!(
        err.kind() == ErrorKind::Transaction || err.kind() == ErrorKind::Connection,
        "{err}"
    );
    assert_eq!(b.get(b"lost").await.unwrap(), None);
    assert_eq!(b.count().await.unwrap(), 1);

    // Retry API: the first attempt's connection dies before COMMIT; the work happens once.
    let attempts = Arc::new(AtomicUsize::new(0));
    b.transaction(IsolationLevel::ReadCommitted, |tx| {
        let (attempts, app) = (attempts.clone(), app.clone());
        Box::pin(async move {
            let n = parse(tx.get(b"counter").await?);
            tx.put(b"counter", (n + 1).to_string().as_bytes()).await?;
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                support::terminate_sessions(&app).await;
                tx.get(b"counter").await?; // fails: the connection is gone
            }
            Ok(())
        })
    })
    .await
    .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        parse(b.get(b"counter").await.unwrap()),
        1,
        "applied exactly once"
    );
}

#[tokio::test]
async fn other_errors_are_returned_at_once_without_retry() {
    let b = support::backend("noretry").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let err = b
        .transaction(IsolationLevel::Serializable, |tx| {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.put(b"k", b"1").await?;
                tx.put_with_version(b"k", b"2", Some(99)).await
            })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::ConcurrentModification { .. }),
        "{err}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(b.get(b"k").await.unwrap(), None, "rolled back");
    assert_eq!(b.get_stats().transaction_retries, 0);
}

#[tokio::test]
async fn optimistic_operations_inside_and_outside_transactions() {
    let b = support::backend("txversions").await;
    let mut tx = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    assert_eq!(tx.put_with_version(b"k", b"0", None).await.unwrap(), 1);
    tx.put(b"k", b"1").await.unwrap();
    assert_eq!(
        tx.get_with_version(b"k").await.unwrap(),
        Some((b"1".to_vec(), 2))
    );
    tx.put_with_metadata(b"k", b"2", serde_json::json!({"m": 1}))
        .await
        .unwrap();
    tx.put_with_ttl(b"k", b"3", Duration::from_secs(60))
        .await
        .unwrap();
    tx.batch_put(&[(b"k", b"4"), (b"k", b"5")]).await.unwrap();
    assert_eq!(
        tx.get_with_version(b"k").await.unwrap(),
        Some((b"5".to_vec(), 5))
    );
    assert!(tx.compare_and_set(b"k", Some(b"5"), b"6").await.unwrap());
    assert!(!tx.compare_and_set(b"k", Some(b"5"), b"7").await.unwrap());
    assert!(matches!(
        tx.delete_with_version(b"k", 5).await,
        Err(StateError::ConcurrentModification { .. })
    ));
    assert!(
        !tx.is_aborted(),
        "a failed version check is not a server error"
    );
    assert_eq!(
        tx.query_by_metadata("m", &serde_json::json!(1))
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(tx.count().await.unwrap(), 1);
    assert!(tx.contains(b"k").await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(
        b.get_with_version(b"k").await.unwrap(),
        Some((b"6".to_vec(), 6))
    );

    // Outside a transaction.
    assert!(b.compare_and_set(b"new", None, b"a").await.unwrap());
    assert!(!b.compare_and_set(b"new", None, b"b").await.unwrap());
    assert!(b.compare_and_set(b"new", Some(b"a"), b"c").await.unwrap());
    assert!(matches!(
        b.delete_with_version(b"new", 1).await,
        Err(StateError::ConcurrentModification { .. })
    ));
    b.delete_with_version(b"new", 2).await.unwrap();
    assert_eq!(b.get(b"new").await.unwrap(), None);
}
