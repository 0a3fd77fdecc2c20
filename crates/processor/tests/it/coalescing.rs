//! Write coalescing: puts that find the statement slots taken queue and are written together
//! in one statement, each with its own result.

use std::time::Duration;

use processor::state::{
    BackendStats, EnhancedPostgresBackend, PostgresPoolConfig, StateBackend, StateError,
};
use tokio::task::JoinHandle;

use crate::support;

/// Polls the backend's statistics until `ok` holds; fails the test after 10 s.
async fn wait_stats(b: &EnhancedPostgresBackend, what: &str, ok: impl Fn(&BackendStats) -> bool) {
    support::wait_for(what, || b.get_stats(), ok).await;
}

fn put(b: &EnhancedPostgresBackend, key: &str, value: &str) -> JoinHandle<Result<i64, StateError>> {
    let (b, key, value) = (b.clone_handle(), key.to_string(), value.to_string());
    tokio::spawn(async move {
        b.put(key.as_bytes(), value.as_bytes()).await?;
        Ok(b.get_entry(key.as_bytes()).await?.map_or(0, |e| e.version))
    })
}

/// Takes both statement slots: puts of two keys whose rows another session holds locked.
/// Returns the locking session (ROLLBACK frees them) and the two puts.
async fn block_the_slots(
    b: &EnhancedPostgresBackend,
) -> (
    tokio_postgres::Client,
    Vec<JoinHandle<Result<i64, StateError>>>,
) {
    let locker = support::raw(&support::url()).await;
    locker.batch_execute("BEGIN").await.unwrap();
    let n = locker
        .execute(
            &format!(
                "UPDATE {} SET value = value WHERE key IN ('\\x686f74'::bytea, '\\x686f7432'::bytea)",
                b.table()
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 2, "hot and hot2 exist");
    let blocked = vec![put(b, "hot", "1"), put(b, "hot2", "1")];
    support::wait_for(
        "the two puts started",
        || b.get_pool_stats(),
        |p| p.lane_users >= 2,
    )
    .await;
    (locker, blocked)
}

/// Queues puts one after the other (each seen waiting before the next), so their arrival
/// order is known.
async fn queue(
    b: &EnhancedPostgresBackend,
    puts: &[(&str, &str)],
) -> Vec<JoinHandle<Result<i64, StateError>>> {
    let mut handles = Vec::new();
    for (i, (k, v)) in puts.iter().enumerate() {
        handles.push(put(b, k, v));
        wait_stats(b, "the put queued", |s| s.puts_queued == i as u64 + 1).await;
    }
    handles
}

#[tokio::test]
async fn queued_puts_are_written_together_each_with_its_own_result() {
    let cfg = support::config("coalesce").with_pool_config(PostgresPoolConfig {
        min_connections: 0,
        max_connections: 4,
        ..support::small_pool()
    });
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    // The server refuses one value: a neighbour of a put that breaks it must still succeed.
    support::raw(&support::url())
        .await
        .batch_execute(&format!(
            "ALTER TABLE {} ADD CONSTRAINT no_bad CHECK (value <> '\\x626164'::bytea)",
            b.table()
        ))
        .await
        .unwrap();
    b.put(b"hot", b"0").await.unwrap();
    b.put(b"hot2", b"0").await.unwrap();
    b.put(b"k1", b"old").await.unwrap();

    // Round 1: a group with one put the server refuses.
    let (locker, blocked) = block_the_slots(&b).await;
    let queued = queue(&b, &[("k1", "a"), ("k2", "bad"), ("k3", "c")]).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    for p in blocked {
        p.await.unwrap().unwrap();
    }
    let results: Vec<_> = {
        let mut r = Vec::new();
        for q in queued {
            r.push(q.await.unwrap());
        }
        r
    };
    assert_eq!(results[0].as_ref().unwrap(), &2, "k1: its own new version");
    let bad = results[1].as_ref().unwrap_err();
    assert_eq!(bad.sqlstate(), Some("23514"), "k2: its own error: {bad}");
    assert_eq!(results[2].as_ref().unwrap(), &1, "k3: its own new version");
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"a".to_vec()));
    assert_eq!(b.get(b"k2").await.unwrap(), None);
    assert_eq!(b.get(b"k3").await.unwrap(), Some(b"c".to_vec()));
    assert_eq!(
        b.get_stats().coalesced_puts,
        0,
        "the refused group ran alone"
    );

    // Round 2: a group written in one statement; a key queued twice goes into two groups
    // (one statement never writes a row twice): both writes happen, in either order (the two
    // puts are concurrent calls).
    let (locker, blocked) = block_the_slots(&b).await;
    let queued = queue(&b, &[("k1", "x"), ("k4", "y"), ("k1", "z"), ("k5", "w")]).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    for p in blocked {
        p.await.unwrap().unwrap();
    }
    let mut versions = Vec::new();
    for q in queued {
        versions.push(q.await.unwrap().unwrap());
    }
    let k1 = b.get(b"k1").await.unwrap().unwrap();
    assert!(
        k1 == b"x" || k1 == b"z",
        "one of the two writes is last: {k1:?}"
    );
    assert_eq!(b.get(b"k4").await.unwrap(), Some(b"y".to_vec()));
    assert_eq!(b.get(b"k5").await.unwrap(), Some(b"w".to_vec()));
    assert_eq!(versions[1], 1);
    assert_eq!(versions[3], 1);
    assert_eq!(
        b.get_entry(b"k1").await.unwrap().unwrap().version,
        4,
        "two writes after 2"
    );
    assert_eq!(
        b.get_stats().coalesced_puts,
        4,
        "k1, k4, k5 in one statement, then k1 again"
    );
    assert_eq!(b.get_stats().puts_queued, 0);
}

#[tokio::test]
async fn queued_gets_are_answered_by_one_lookup_each_with_its_own_value() {
    // Two connections open before the table is locked (opening one prepares statements on
    // the table, which would wait for the lock).
    let cfg = support::config("coalesce_get").with_pool_config(PostgresPoolConfig {
        min_connections: 2,
        max_connections: 4,
        ..support::small_pool()
    });
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"a", b"1").await.unwrap();
    b.put(b"b", b"2").await.unwrap();
    b.put_with_ttl(b"gone", b"x", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Two gets take the lookup slots and wait behind a table lock.
    let locker = support::lock_table(b.table()).await;
    let get = |key: &'static [u8]| {
        let b = b.clone_handle();
        tokio::spawn(async move { b.get(key).await })
    };
    let blocked = vec![get(b"a"), get(b"b")];
    support::wait_for(
        "the two gets started",
        || b.get_pool_stats(),
        |p| p.lane_users >= 2,
    )
    .await;
    // Then gets queue, a key twice, an absent key and an expired one among them.
    let mut queued = Vec::new();
    for (i, key) in [&b"a"[..], b"missing", b"b", b"a", b"gone"]
        .into_iter()
        .enumerate()
    {
        queued.push(get(key));
        wait_stats(&b, "the get queued", |s| s.gets_queued == i as u64 + 1).await;
    }
    locker.batch_execute("ROLLBACK").await.unwrap();
    for g in blocked {
        g.await.unwrap().unwrap();
    }
    let mut values = Vec::new();
    for g in queued {
        values.push(g.await.unwrap().unwrap());
    }
    assert_eq!(
        values,
        vec![
            Some(b"1".to_vec()),
            None,
            Some(b"2".to_vec()),
            Some(b"1".to_vec()),
            None
        ]
    );
    let stats = b.get_stats();
    assert_eq!(stats.coalesced_gets, 5, "{stats:?}");
    assert_eq!(stats.gets_queued, 0);
    // A write is visible to the next get of the same task, coalesced or not.
    b.put(b"a", b"3").await.unwrap();
    assert_eq!(b.get(b"a").await.unwrap(), Some(b"3".to_vec()));
}

/// A transaction holds a row lock; puts of that row (from other tasks) take both statement
/// slots and wait for it. The transaction's own task then puts another key: that put must not
/// wait behind the stuck slots until the operation timeout (it would be waiting for its own
/// transaction's commit): its group goes without a slot after a short wait.
#[tokio::test]
async fn queued_puts_do_not_wait_behind_statements_stuck_on_row_locks() {
    let b = support::backend("coalesce_stuck").await;
    b.put(b"hot", b"0").await.unwrap();
    let mut tx = b.begin().await.unwrap();
    tx.put(b"hot", b"tx").await.unwrap();
    let stuck = vec![put(&b, "hot", "1"), put(&b, "hot", "2")];
    support::wait_for(
        "two puts waiting on the row lock",
        || b.get_pool_stats(),
        |p| p.lane_users >= 2,
    )
    .await;
    // Well inside the operation timeout (60 s): this put does not wait for `tx`.
    tokio::time::timeout(Duration::from_secs(15), b.put(b"other", b"v"))
        .await
        .expect("a queued put does not wait behind statements stuck on locks")
        .unwrap();
    tx.commit().await.unwrap();
    for p in stuck {
        p.await.unwrap().unwrap();
    }
    assert_eq!(b.get(b"other").await.unwrap(), Some(b"v".to_vec()));
}
