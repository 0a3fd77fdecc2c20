//! Point operations on shared, pipelined connections (lanes): several in flight on one
//! connection, exclusive checkouts still served, cancellation safe, lingering lanes given
//! back.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, PoolStats, PostgresPoolConfig, StateBackend, StateError,
};

use crate::support;

/// A backend whose pool has `max` connections (and keeps none open beyond use).
async fn backend(tag: &str, max: u32, acquire: Duration) -> EnhancedPostgresBackend {
    let cfg = support::config(tag).with_pool_config(PostgresPoolConfig {
        min_connections: 0,
        max_connections: max,
        acquire_timeout: acquire,
        ..PostgresPoolConfig::default()
    });
    EnhancedPostgresBackend::new(cfg).await.unwrap()
}

/// Polls the pool's statistics until `ok` holds; fails the test after 10 s.
async fn wait_pool(b: &EnhancedPostgresBackend, what: &str, ok: impl Fn(&PoolStats) -> bool) {
    support::wait_for(what, || b.get_pool_stats(), ok).await;
}

/// Another session holding `key`'s row locked (a transaction that updated it) until it runs
/// `ROLLBACK`.
async fn lock_row(b: &EnhancedPostgresBackend, key: &[u8]) -> tokio_postgres::Client {
    let locker = support::raw(&support::url()).await;
    locker.batch_execute("BEGIN").await.unwrap();
    let n = locker
        .execute(
            &format!("UPDATE {} SET value = value WHERE key = $1", b.table()),
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    locker
}

#[tokio::test]
async fn several_point_operations_run_on_one_connection_at_once() {
    let b = backend("lanes_share", 1, Duration::from_secs(20)).await;
    b.put(b"hot", b"0").await.unwrap();
    b.put(b"cold", b"c").await.unwrap();
    let locker = lock_row(&b, b"hot").await;
    // Three writes of the locked key: all three are sent on the pool's only connection and
    // wait on the server (with a checkout each, two would wait in the pool instead).
    let writers: Vec<_> = (1..=3u8)
        .map(|i| {
            let b = b.clone_handle();
            tokio::spawn(async move { b.put_with_version(b"hot", &[i], None).await })
        })
        .collect();
    wait_pool(&b, "three users on one lane", |s| {
        s.lanes == 1 && s.lane_users == 3
    })
    .await;
    assert_eq!(b.get_pool_stats().size, 1, "one server connection");
    locker.batch_execute("ROLLBACK").await.unwrap();
    // put_with_version(None) creates only: the key exists, so all three are refused, each
    // with its own result, and none waited for a connection.
    for w in writers {
        let r = w.await.unwrap();
        assert!(
            matches!(r, Err(StateError::ConcurrentModification { .. })),
            "{r:?}"
        );
    }
    let mut readers = Vec::new();
    for i in 0..32u32 {
        let b = b.clone_handle();
        readers.push(tokio::spawn(async move {
            let key = format!("k{i}").into_bytes();
            b.put(&key, &key).await?;
            let cold = b.get(b"cold").await?;
            let own = b.get(&key).await?;
            Ok::<_, StateError>((key, cold, own))
        }));
    }
    for r in readers {
        let (key, cold, own) = r.await.unwrap().unwrap();
        assert_eq!(cold.as_deref(), Some(&b"c"[..]));
        assert_eq!(own, Some(key), "each call gets its own result");
    }
    assert_eq!(b.get_pool_stats().size, 1);
    assert_eq!(b.get(b"hot").await.unwrap(), Some(b"0".to_vec()));
}

#[tokio::test]
async fn transactions_get_connections_while_point_operations_keep_them_busy() {
    let b = backend("lanes_fair", 2, Duration::from_secs(5)).await;
    b.put(b"k", b"v").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (b, stop) = (b.clone_handle(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(b.get(b"k").await?, Some(b"v".to_vec()));
                n += 1;
            }
            Ok::<_, StateError>(n)
        }));
    }
    wait_pool(&b, "both connections shared", |s| s.lanes == 2).await;
    for i in 0..5u8 {
        // Each needs a connection to itself while 16 tasks keep both in use as lanes: a lane
        // is retired for it, well within the 5 s acquire timeout.
        let mut tx = b
            .begin()
            .await
            .expect("a transaction is not starved by lanes");
        tx.put(b"t", &[i]).await.unwrap();
        tx.commit().await.unwrap();
        assert!(!b.list_keys(b"").await.unwrap().is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap().unwrap() > 0);
    }
    assert_eq!(b.get(b"t").await.unwrap(), Some(vec![4]));
}

#[tokio::test]
async fn a_dropped_point_operation_leaves_its_lane_neighbours_correct() {
    let b = backend("lanes_cancel", 1, Duration::from_secs(20)).await;
    b.put(b"hot", b"0").await.unwrap();
    b.put(b"other", b"o").await.unwrap();
    let locker = lock_row(&b, b"hot").await;
    // The first call waits on the row lock, and is given up by its caller.
    let abandoned = tokio::time::timeout(Duration::from_millis(300), b.put(b"hot", b"1"));
    let neighbour = {
        let b = b.clone_handle();
        tokio::spawn(async move {
            // Joins the lane once the abandoned call is in flight: pipelined behind it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.get(b"other").await
        })
    };
    assert!(abandoned.await.is_err(), "the caller gave up");
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        neighbour.await.unwrap().unwrap(),
        Some(b"o".to_vec()),
        "the neighbour gets its own reply, not the abandoned call's"
    );
    // The lane takes no new users; it is settled (a probe behind the abandoned call, a cancel
    // request while the call waits on the lock) and its connection goes back to the pool
    // clean, not reopened.
    wait_pool(&b, "the settled lane's connection back in the pool", |s| {
        s.lanes == 0 && s.idle == 1
    })
    .await;
    let stats = b.get_pool_stats();
    assert_eq!(
        (stats.connections_created, stats.connections_closed_broken),
        (1, 0),
        "{stats:?}"
    );
    assert_eq!(b.get(b"other").await.unwrap(), Some(b"o".to_vec()));
    let hot = b.get(b"hot").await.unwrap();
    assert!(
        hot == Some(b"0".to_vec()) || hot == Some(b"1".to_vec()),
        "the abandoned write happened or did not: {hot:?}"
    );
}

#[tokio::test]
async fn a_lingering_lane_gives_its_connection_back() {
    let b = backend("lanes_linger", 1, Duration::from_secs(20)).await;
    b.put(b"k", b"v").await.unwrap();
    // Right after a point operation its lane lingers; a transaction takes the connection
    // back from it without waiting.
    let waits = b.get_pool_stats().waits;
    let mut tx = b.begin().await.unwrap();
    assert_eq!(tx.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    tx.commit().await.unwrap();
    assert_eq!(
        b.get_pool_stats().waits,
        waits,
        "the lingering lane yielded at once"
    );
    // Left alone, a lane gives its connection back to the pool.
    b.get(b"k").await.unwrap();
    wait_pool(&b, "no lane left", |s| s.lanes == 0 && s.idle == s.size).await;
}

#[tokio::test]
async fn a_checkout_given_up_while_waiting_is_no_longer_counted_as_waiting() {
    let b = backend("lanes_waiting", 1, Duration::from_secs(20)).await;
    let tx = b.begin().await.unwrap();
    // The only connection is taken: this one waits, and its caller gives up.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), b.begin()).await;
    assert!(gave_up.is_err());
    assert_eq!(
        b.get_pool_stats().waiting,
        0,
        "the abandoned wait is not counted"
    );
    tx.rollback().await.unwrap();
    // Lanes linger again (a wait counted forever would make every point call end them).
    b.put(b"k", b"v").await.unwrap();
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}
