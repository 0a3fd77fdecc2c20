//! Coordination against the local cluster: advisory locks on dedicated connections, lock
//! guards with fencing tokens and lost signals, transaction-scoped locks, lock bookkeeping.
//! Leader election and LISTEN/NOTIFY are in `leader.rs` and `listener.rs`.

use std::time::{Duration, Instant};

use processor::state::{
    lock_key, EnhancedPostgresBackend, ErrorKind, IsolationLevel, LockMode, PostgresLockGuard,
    StateBackend, StateError,
};

use crate::support;

/// Terminates one server session and waits until its process is gone (only then has the
/// server released its locks; the client hears of the termination a little earlier).
pub async fn terminate(pid: i32) {
    terminate_on(&support::url(), pid).await;
}

/// Terminates session `pid` of the server at `url` and waits until it is gone.
pub async fn terminate_on(url: &str, pid: i32) {
    let admin = support::raw(url).await;
    let done: bool = admin
        .query_one("SELECT pg_terminate_backend($1::int4)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(done, "session {pid} not found");
    let start = Instant::now();
    loop {
        let alive: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if !alive {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "session {pid} lingers"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn parse(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_backends_eight_tasks_each_lose_no_increment() {
    let cfg = support::config("mutex");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("counter_lock");
    const TOTAL: usize = 2000;
    const TASKS: usize = 8;
    let per_task = TOTAL / (2 * TASKS);
    let mut tasks = Vec::new();
    for backend in [&a, &b] {
        for _ in 0..TASKS {
            let backend = backend.clone_handle();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                let mut tokens = Vec::new();
                for _ in 0..per_task {
                    let guard = PostgresLockGuard::new(
                        backend.clone_handle(),
                        &name,
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap()
                    .expect("lock within 60 s");
                    tokens.push(guard.fencing_token());
                    // Read-modify-write with no transaction: only the lock protects it.
                    let n = parse(backend.get(b"counter").await.unwrap());
                    backend
                        .put(b"counter", (n + 1).to_string().as_bytes())
                        .await
                        .unwrap();
                    guard.release().await.unwrap();
                }
                tokens
            }));
        }
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.extend(t.await.unwrap());
    }
    assert_eq!(parse(a.get(b"counter").await.unwrap()), TOTAL as i64);
    // Every acquisition got its own token.
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), TOTAL);
    let (sa, sb) = (a.get_stats(), b.get_stats());
    assert_eq!(sa.lock_acquisitions + sb.lock_acquisitions, TOTAL as u64);
    assert_eq!(sa.locks_held + sb.locks_held, 0);
    eprintln!(
        "lock wait: {:.0} ms + {:.0} ms over {TOTAL} acquisitions",
        sa.advisory_lock_wait_ms, sb.advisory_lock_wait_ms
    );
}

#[tokio::test]
async fn ten_acquires_without_release_succeed_once() {
    let a = support::backend("ten").await;
    let key = lock_key(&support::unique("ten"));
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let h = a.clone_handle();
            tokio::spawn(async move { h.acquire_advisory_lock(key).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for h in handles {
        granted += usize::from(h.await.unwrap());
    }
    assert_eq!(granted, 1);
    // Sequential calls on the held key: refused too.
    for _ in 0..3 {
        assert!(!a.acquire_advisory_lock(key).await.unwrap());
    }
    assert!(a.holds_advisory_lock(key, LockMode::Exclusive));
    // Another backend cannot take it either.
    let b = support::backend("ten_b").await;
    assert!(!b.acquire_advisory_lock(key).await.unwrap());
    // Releasing through a backend that does not hold it is an error, and releases nothing.
    let err = b.release_advisory_lock(key).await.unwrap_err();
    assert!(matches!(err, StateError::LockNotHeld { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Coordination);
    assert!(!b.acquire_advisory_lock(key).await.unwrap());
    // The holder releases (through another handle of the same backend); twice is an error.
    a.clone_handle().release_advisory_lock(key).await.unwrap();
    let again = a.release_advisory_lock(key).await.unwrap_err();
    assert!(matches!(again, StateError::LockNotHeld { .. }), "{again}");
    assert!(b.acquire_advisory_lock(key).await.unwrap());
    b.release_advisory_lock(key).await.unwrap();
    let stats = a.get_stats();
    assert_eq!(stats.lock_acquisitions, 1);
    assert!(stats.lock_acquisitions_failed >= 12, "{stats:?}");
    assert_eq!(stats.locks_held, 0);
}

#[tokio::test]
async fn a_killed_lock_connection_fires_lost_and_fences_the_old_holder() {
    let cfg = support::config("fence");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("fenced");
    let guard = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
        .await
        .unwrap()
        .expect("free lock");
    let fence = guard.fence();
    assert_eq!(fence.token(), guard.fencing_token());
    assert!(
        PostgresLockGuard::new(b.clone_handle(), &name, Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );

    // While held, a fenced write goes through.
    let mut tx = a.begin().await.unwrap();
    tx.check_fence(&fence).await.unwrap();
    tx.put(b"owner", b"a").await.unwrap();
    tx.commit().await.unwrap();

    let lost = guard.lost();
    terminate(guard.backend_pid()).await;
    tokio::time::timeout(Duration::from_secs(10), lost)
        .await
        .expect("lost() fires when the lock's connection is killed");
    assert!(guard.is_lost());

    // Refused even before anyone else takes the lock: the holder's session is gone.
    let mut tx = a.begin().await.unwrap();
    match tx.check_fence(&fence).await {
        Err(StateError::Fenced { held: false, .. }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    tx.rollback().await.unwrap();

    let newer = PostgresLockGuard::new(b.clone_handle(), &name, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("another backend acquires after the kill");
    assert!(newer.fencing_token() > fence.token());

    // The old holder's fenced write is refused, inside the retrying transaction API too.
    let f = fence.clone();
    let err = a
        .transaction(IsolationLevel::ReadCommitted, move |tx| {
            let f = f.clone();
            Box::pin(async move {
                tx.check_fence(&f).await?;
                tx.put(b"owner", b"stale a").await
            })
        })
        .await
        .unwrap_err();
    match err {
        StateError::Fenced { token, current, .. } => {
            assert_eq!(token, fence.token());
            assert_eq!(current, newer.fencing_token());
        }
        other => panic!("expected Fenced, got {other}"),
    }
    // The new holder's fenced write succeeds.
    let mut tx = b.begin().await.unwrap();
    tx.check_fence(&newer.fence()).await.unwrap();
    tx.put(b"owner", b"b").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(a.get(b"owner").await.unwrap(), Some(b"b".to_vec()));

    // Releasing the lost guard says so.
    let err = guard.release().await.unwrap_err();
    assert!(matches!(err, StateError::LockLost { .. }), "{err}");
    newer.release().await.unwrap();
}

/// Polls until `name` can be taken by `backend`; how long that took.
async fn free_within(backend: &EnhancedPostgresBackend, name: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(g) = PostgresLockGuard::new(backend.clone_handle(), name, Duration::ZERO)
            .await
            .unwrap()
        {
            g.release().await.unwrap();
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "lock {name} still held after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_dropped_guard_frees_the_lock_within_a_second() {
    let cfg = support::config("dropguard");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("dropped");
    let guard = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(
        PostgresLockGuard::new(b.clone_handle(), &name, Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    let key = guard.key();
    drop(guard);
    let took = free_within(&b, &name, Duration::from_secs(1)).await;
    eprintln!("dropped guard: lock free after {took:?}");
    // The bookkeeping row went with it.
    let locks = a.list_advisory_locks().await.unwrap();
    assert!(locks.iter().all(|l| l.key != key), "{locks:?}");
    assert_eq!(a.get_stats().locks_held, 0);
}

#[test]
fn dropping_a_guard_after_its_runtime_is_gone_does_not_panic() {
    let name = support::unique("orphan");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (backend, guard) = rt.block_on(async {
        let b = support::backend("orphan").await;
        let g = PostgresLockGuard::new(b.clone_handle(), &name, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        (b, g)
    });
    drop(rt);
    // On another thread too, and with the backend gone first.
    std::thread::spawn(move || {
        drop(backend);
        drop(guard);
    })
    .join()
    .expect("dropping must not panic");
    // The server notices the closed connection and frees the lock.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let other = support::backend("orphan2").await;
        free_within(&other, &name, Duration::from_secs(5)).await;
    });
}

#[tokio::test]
async fn shared_locks_blocking_waits_and_transaction_locks() {
    // One schema: the bookkeeping and fencing tables are the schema's.
    let cfg = support::config("shared");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("rw");
    let r1 = PostgresLockGuard::new_shared(a.clone_handle(), &name, Duration::ZERO)
        .await
        .unwrap()
        .expect("first reader");
    let r2 = PostgresLockGuard::new_shared(b.clone_handle(), &name, Duration::ZERO)
        .await
        .unwrap()
        .expect("second reader at the same time");
    assert_eq!(r2.mode(), LockMode::Shared);
    // Readers share the exclusive epoch as their token and do not fence each other off.
    assert_eq!(r1.fencing_token(), r2.fencing_token());
    for reader in [&r1, &r2] {
        let mut tx = a.begin().await.unwrap();
        tx.check_fence(&reader.fence()).await.unwrap();
        tx.commit().await.unwrap();
    }
    // A writer cannot get in, even waiting a little.
    assert!(
        PostgresLockGuard::new(b.clone_handle(), &name, Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    // The server waited its lock_timeout (200 ms) before saying no; the statistic counts it.
    let waited = b.get_stats().advisory_lock_wait_ms;
    assert!(waited >= 190.0, "wait not counted: {waited} ms");
    // A writer waiting with a longer timeout gets it once the readers leave.
    let writer = {
        let b = b.clone_handle();
        let name = name.clone();
        tokio::spawn(async move {
            PostgresLockGuard::new(b, &name, Duration::from_secs(30))
                .await
                .unwrap()
        })
    };
    // Listed with its waiter (once the writer's request has reached the server).
    let start = Instant::now();
    let listed = loop {
        let listed = a.list_advisory_locks().await.unwrap();
        if listed
            .iter()
            .any(|l| l.key == lock_key(&name) && l.waiters > 0)
            || start.elapsed() > Duration::from_secs(20)
        {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mine: Vec<_> = listed.iter().filter(|l| l.key == lock_key(&name)).collect();
    assert_eq!(mine.len(), 2, "{listed:?}");
    assert!(
        mine.iter().all(|l| l.mode == LockMode::Shared
            && l.waiters == 1
            && l.name.as_deref() == Some(name.as_str())
            && l.holder_id.is_some()
            && l.fencing_token.is_some()
            && l.holder_pid == Some(std::process::id() as i32)),
        "{mine:?}"
    );
    r1.release().await.unwrap();
    drop(r2);
    let w = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .unwrap()
        .unwrap()
        .expect("writer gets the lock after the readers");
    assert_eq!(w.mode(), LockMode::Exclusive);
    w.release().await.unwrap();

    // Key API in shared mode.
    let key = lock_key(&support::unique("rwkey"));
    assert!(a
        .acquire_advisory_lock_with(key, LockMode::Shared, Duration::ZERO)
        .await
        .unwrap());
    assert!(a
        .acquire_advisory_lock_with(key, LockMode::Shared, Duration::ZERO)
        .await
        .unwrap());
    assert!(!b.acquire_advisory_lock(key).await.unwrap());
    let err = a.release_advisory_lock(key).await.unwrap_err();
    assert!(matches!(err, StateError::LockNotHeld { .. }));
    a.release_advisory_lock_with(key, LockMode::Shared)
        .await
        .unwrap();
    a.release_advisory_lock_with(key, LockMode::Shared)
        .await
        .unwrap();
    assert!(b.acquire_advisory_lock(key).await.unwrap());
    b.release_advisory_lock(key).await.unwrap();

    // Transaction-scoped locks: held until the transaction ends.
    let key = lock_key(&support::unique("xact"));
    let mut t1 = a.begin().await.unwrap();
    let mut t2 = b.begin().await.unwrap();
    assert!(t1
        .try_advisory_xact_lock(key, LockMode::Exclusive)
        .await
        .unwrap());
    assert!(!t2
        .try_advisory_xact_lock(key, LockMode::Exclusive)
        .await
        .unwrap());
    assert!(!t2
        .try_advisory_xact_lock(key, LockMode::Shared)
        .await
        .unwrap());
    t1.commit().await.unwrap();
    t2.advisory_xact_lock(key, LockMode::Exclusive)
        .await
        .unwrap();
    assert!(!a.acquire_advisory_lock(key).await.unwrap());
    t2.rollback().await.unwrap();
    assert!(a.acquire_advisory_lock(key).await.unwrap());
    a.release_advisory_lock(key).await.unwrap();
}

/// Bookkeeping rows of `key` in `schema`, by holding session.
async fn bookkeeping(schema: &str, key: i64) -> Vec<i32> {
    let admin = support::raw(&support::url()).await;
    let sql = format!(
        "SELECT backend_pid FROM \"{schema}\".state_advisory_locks WHERE lock_key = $1 ORDER BY 1"
    );
    admin
        .query(&sql, &[&key])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn dead_holders_are_cleaned_from_the_bookkeeping() {
    let cfg = support::config("deadholder");
    let schema = cfg.schema().to_string();
    let a = EnhancedPostgresBackend::new(cfg).await.unwrap();
    for cleaner in ["list", "acquire"] {
        let name = support::unique("dead");
        let key = lock_key(&name);
        let guard = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        let pid = guard.backend_pid();
        assert_eq!(bookkeeping(&schema, key).await, vec![pid]);
        terminate(pid).await;
        tokio::time::timeout(Duration::from_secs(10), guard.lost())
            .await
            .unwrap();
        // The dead holder's row stays until someone looks...
        assert_eq!(bookkeeping(&schema, key).await, vec![pid]);
        match cleaner {
            // ...listing the locks removes it,
            "list" => {
                let listed = a.list_advisory_locks().await.unwrap();
                assert!(listed.iter().all(|l| l.key != key));
                assert!(bookkeeping(&schema, key).await.is_empty());
            }
            // ...and so does the next acquisition of the lock.
            _ => {
                let g2 = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(bookkeeping(&schema, key).await, vec![g2.backend_pid()]);
                g2.release().await.unwrap();
                assert!(bookkeeping(&schema, key).await.is_empty());
            }
        }
        drop(guard);
    }
}

#[tokio::test]
async fn hostile_lock_names_are_data() {
    let a = support::backend("hostilelock").await;
    a.put(b"sentinel", b"intact").await.unwrap();
    for name in [
        "x'; DROP TABLE state_entries; --",
        "\"; DROP TABLE state_entries; --",
        "$$; SELECT pg_sleep(10); $$",
        "🦀 é \u{202e}",
    ] {
        let g = PostgresLockGuard::new(a.clone_handle(), name, Duration::ZERO)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name:?} free"));
        assert_eq!(g.name(), name);
        assert_eq!(g.key(), lock_key(name));
        let listed = a.list_advisory_locks().await.unwrap();
        assert!(listed.iter().any(|l| l.name.as_deref() == Some(name)));
        g.release().await.unwrap();
        assert!(a
            .try_become_leader(name, Duration::from_secs(5))
            .await
            .unwrap());
        assert!(a.resign_leader(name).await.unwrap());
    }
    for bad in ["", "a\0b"] {
        let err = PostgresLockGuard::new(a.clone_handle(), bad, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
    }
    assert_eq!(a.get(b"sentinel").await.unwrap(), Some(b"intact".to_vec()));
}
