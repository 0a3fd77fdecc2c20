//! Honest outcomes under cancellation and timeouts (issue 23): a write whose call returned an
//! error, or whose future was dropped, either never takes effect or takes effect before the
//! session's next acknowledged write; a caller that gave up before its statement was sent
//! writes nothing; a coalesced put gets only its own outcome.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, ErrorKind, PostgresPoolConfig, StateBackend, StateError,
};
use tokio::task::JoinHandle;

use crate::support;

/// A backend with a pool of `max` connections and the given operation timeout.
async fn backend(tag: &str, max: u32, op_timeout: Duration) -> EnhancedPostgresBackend {
    let cfg = support::config(tag)
        .with_pool_config(PostgresPoolConfig {
            min_connections: 0,
            max_connections: max,
            ..support::small_pool()
        })
        .with_operation_timeout(op_timeout)
        // Cleanup would take row locks of its own.
        .with_expired_cleanup(false);
    EnhancedPostgresBackend::new(cfg).await.unwrap()
}

/// Another session holding the rows of `keys` locked (they must exist) until it ends.
async fn lock_rows(b: &EnhancedPostgresBackend, keys: &[&str]) -> tokio_postgres::Client {
    let locker = support::raw(&support::url()).await;
    locker.batch_execute("BEGIN").await.unwrap();
    let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    let n = locker
        .execute(
            &format!("SELECT 1 FROM {} WHERE key = ANY($1) FOR UPDATE", b.table()),
            &[&keys],
        )
        .await
        .unwrap();
    assert_eq!(n as usize, keys.len(), "every locked key exists");
    locker
}

fn spawn_put(b: &EnhancedPostgresBackend, key: &str) -> JoinHandle<Result<(), StateError>> {
    let (b, key) = (b.clone_handle(), key.to_string());
    tokio::spawn(async move { b.put(key.as_bytes(), b"blocked").await })
}

fn spawn_delete(b: &EnhancedPostgresBackend, key: &str) -> JoinHandle<Result<(), StateError>> {
    let (b, key) = (b.clone_handle(), key.to_string());
    tokio::spawn(async move { b.delete(key.as_bytes()).await })
}

/// A write that may have been applied must not be reported as a plain timeout (which says
/// nothing was done and invites a blind retry).
fn assert_honest(what: &str, r: &Result<(), StateError>) {
    if let Err(e) = r {
        assert!(
            e.kind() != ErrorKind::Timeout,
            "{what}: a write that may have been applied was reported as a plain timeout: {e}"
        );
    }
}

/// Case 1: a put coalesced with a put of a row another client holds locked gets its own
/// outcome, and never lands after the caller's next acknowledged put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_put_never_lands_after_the_next_acknowledged_one() {
    let _timed = support::timed().await;
    let b = backend("cancel_group", 4, Duration::from_millis(2500)).await;
    for k in ["hot", "hot2", "a0", "k"] {
        b.put(k.as_bytes(), b"v0").await.unwrap();
    }
    let locker = lock_rows(&b, &["hot", "hot2", "a0"]).await;
    // Both statement slots are taken by puts waiting for row locks...
    let blocked = [spawn_put(&b, "hot"), spawn_put(&b, "hot2")];
    support::wait_for(
        "the two puts started",
        || b.get_pool_stats(),
        |p| p.lane_users >= 2,
    )
    .await;
    // ...so a put of a0 (locked) and one of k (free) queue together.
    let a0 = spawn_put(&b, "a0");
    support::wait_for("a0 queued", || b.get_stats(), |s| s.puts_queued >= 1).await;
    let first = b.put(b"k", b"v1").await;
    assert_honest("the put of k", &first);
    b.put(b"k", b"v2").await.expect("the next put of k");
    assert_eq!(b.get(b"k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    locker.batch_execute("COMMIT").await.unwrap();
    for h in blocked {
        let _ = h.await.unwrap();
    }
    let _ = a0.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entry = b.get_entry(b"k").await.unwrap().expect("k exists");
    assert_eq!(
        entry.value, b"v2",
        "the put reported as {first:?} landed after the acknowledged put of v2 (version {})",
        entry.version
    );
}

/// Case 2: a delete pipelined behind statements that wait for row locks, cut off by the
/// operation timeout, never lands after the caller's next acknowledged put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_delete_cut_off_by_the_timeout_never_lands_later() {
    let _timed = support::timed().await;
    let b = backend("cancel_lane", 2, Duration::from_millis(1500)).await;
    let hot = ["h1", "h2", "h3", "h4"];
    for k in hot.iter().chain(["k"].iter()) {
        b.put(k.as_bytes(), b"v0").await.unwrap();
    }
    let locker = lock_rows(&b, &hot).await;
    // Two lanes, each with two deletes waiting for row locks.
    let mut blocked = Vec::new();
    for (i, k) in hot.iter().enumerate() {
        blocked.push(spawn_delete(&b, k));
        support::wait_for(
            "the delete started",
            || b.get_pool_stats(),
            |p| p.lane_users as usize > i,
        )
        .await;
    }
    // Pipelined behind two of them.
    let first = b.delete(b"k").await;
    assert!(first.is_err(), "the delete waited behind two row locks");
    assert_honest("the delete of k", &first);
    b.put(b"k", b"v2").await.expect("the next put of k");
    assert_eq!(b.get(b"k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    locker.batch_execute("COMMIT").await.unwrap();
    for h in blocked {
        let _ = h.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.get(b"k").await.unwrap().as_deref(),
        Some(&b"v2"[..]),
        "the delete reported as {first:?} erased the acknowledged put"
    );
}

/// Case 3: a put whose caller gave up while its group waited for a connection writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_abandoned_before_it_was_sent_writes_nothing() {
    let _timed = support::timed().await;
    let b = backend("cancel_unsent", 1, Duration::from_secs(20)).await;
    b.put(b"k", b"v1").await.unwrap();
    // The pool's one connection is held by a transaction.
    let tx = b.begin().await.unwrap();
    // Two puts take the statement slots and wait for a connection; a third queues in a group.
    let waiting = [spawn_put(&b, "x"), spawn_put(&b, "y")];
    support::wait_for("x and y waiting", || b.get_pool_stats(), |p| p.waiting >= 2).await;
    let dropped =
        tokio::time::timeout(Duration::from_millis(2500), b.put(b"k", b"abandoned")).await;
    assert!(dropped.is_err(), "the put could not have finished");
    tx.rollback().await.unwrap();
    for h in waiting {
        h.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry = b.get_entry(b"k").await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.version),
        (&b"v1"[..], 1),
        "a put dropped before it was sent was written"
    );
    assert_eq!(b.put_with_version(b"k", b"v2", Some(1)).await.unwrap(), 2);
}

/// Case 5: one member's row lock does not fail or delay the others past their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_is_not_held_by_another_members_row_lock() {
    let _timed = support::timed().await;
    let b = backend("cancel_member", 4, Duration::from_secs(4)).await;
    for k in ["hot", "hot2", "a0", "k"] {
        b.put(k.as_bytes(), b"v0").await.unwrap();
    }
    let locker = lock_rows(&b, &["hot", "hot2", "a0"]).await;
    let blocked = [spawn_put(&b, "hot"), spawn_put(&b, "hot2")];
    support::wait_for(
        "the two puts started",
        || b.get_pool_stats(),
        |p| p.lane_users >= 2,
    )
    .await;
    let a0 = spawn_put(&b, "a0");
    support::wait_for("a0 queued", || b.get_stats(), |s| s.puts_queued >= 1).await;
    // Grouped with a0, whose row stays locked past k's deadline.
    b.put(b"k", b"v1")
        .await
        .expect("a put of a free row, grouped with a locked one");
    assert_eq!(b.get(b"k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    locker.batch_execute("ROLLBACK").await.unwrap();
    for h in blocked {
        h.await.unwrap().unwrap();
    }
    a0.await.unwrap().unwrap();
}

/// The guarantee holds for transactions too: a transaction begun after one of the session's
/// writes was abandoned starts once that write is settled, so the abandoned write cannot land
/// over what the transaction committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_begins_after_the_sessions_abandoned_write_settles() {
    let _timed = support::timed().await;
    let b = backend("cancel_tx", 4, Duration::from_secs(5)).await;
    for k in ["a", "k"] {
        b.put(k.as_bytes(), b"v0").await.unwrap();
    }
    let locker = lock_rows(&b, &["a"]).await;
    // One statement writes a (locked: it waits there) and then k; its caller gives up.
    let given_up = tokio::time::timeout(
        Duration::from_millis(300),
        b.batch_put(&[(b"a", b"v1"), (b"k", b"abandoned")]),
    )
    .await;
    assert!(given_up.is_err(), "the batch waits on the row lock");
    let mut tx = b.begin().await.unwrap();
    tx.put(b"k", b"committed").await.unwrap();
    tx.commit().await.unwrap();
    // The lock is released right after the commit: an abandoned statement still running
    // would now write k over the committed value.
    locker.batch_execute("ROLLBACK").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.get(b"k").await.unwrap(),
        Some(b"committed".to_vec()),
        "the abandoned write landed after the transaction's acknowledged commit"
    );
}
