//! Leader election against the local cluster: failover on a killed connection or a dropped
//! handle, terms, and a 30 s run with random kills checking that no two leaders overlap.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use processor::state::{EnhancedPostgresBackend, ErrorKind, Leadership, StateBackend};

use crate::coordination::terminate;
use crate::support;

/// The server session holding the lease of `name`, from the lease row.
async fn leader_session(schema: &str, name: &str) -> Option<i32> {
    let admin = support::raw(&support::url()).await;
    let sql = format!(
        "SELECT backend_pid FROM \"{schema}\".state_leaders \
         WHERE name = $1 AND holder_id IS NOT NULL AND lease_expires_at > clock_timestamp()"
    );
    admin
        .query_opt(&sql, &[&name])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn three_candidates_fail_over_on_kill_and_on_drop() {
    let _timed = support::timed().await;
    let cfg = support::config("leader");
    let schema = cfg.schema().to_string();
    let name = support::unique("leader");
    let ttl = Duration::from_secs(3);
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(EnhancedPostgresBackend::new(cfg.clone()).await.unwrap());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Leadership)>();
    let mut candidates = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let (b, name, tx) = (b.clone_handle(), name.clone(), tx.clone());
        candidates.push(tokio::spawn(async move {
            let l = b.campaign(&name, ttl).await.unwrap();
            let _ = tx.send((i, l));
        }));
    }
    let (first, l1) = rx.recv().await.unwrap();
    assert!(l1.is_leader());
    // Nobody else leads meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "two leaders at once");
    let info = backends[0].current_leader(&name).await.unwrap().unwrap();
    assert_eq!(info.term, l1.term());

    // Kill the leader's connection: it learns it lost, and exactly one other takes over.
    let killed_at = Instant::now();
    terminate(leader_session(&schema, &name).await.unwrap()).await;
    tokio::time::timeout(ttl, l1.lost())
        .await
        .expect("lost() fires");
    assert!(!l1.is_leader());
    let (second, l2) = tokio::time::timeout(ttl + Duration::from_secs(2), rx.recv())
        .await
        .expect("a new leader within ttl")
        .unwrap();
    let took = killed_at.elapsed();
    eprintln!("killed leader replaced after {took:?} (ttl {ttl:?})");
    assert_ne!(second, first);
    assert!(l2.term() > l1.term());
    assert!(l2.is_leader());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "two leaders at once");

    // Drop the new leader's handle: the third candidate takes over, with a higher term.
    let dropped_at = Instant::now();
    drop(l2);
    let (third, l3) = tokio::time::timeout(ttl + Duration::from_secs(2), rx.recv())
        .await
        .expect("a new leader within ttl")
        .unwrap();
    eprintln!("dropped leader replaced after {:?}", dropped_at.elapsed());
    assert!(third != first && third != second);
    assert!(l3.term() > l1.term() + 1);
    let info = backends[third]
        .current_leader(&name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.term, l3.term());
    assert!(info.lease_remaining <= ttl);
    // The lease is renewed in the background: still leader after several ttls.
    tokio::time::sleep(ttl * 2).await;
    assert!(l3.is_leader());
    l3.resign().await.unwrap();
    assert!(backends[0].current_leader(&name).await.unwrap().is_none());
    for c in candidates {
        c.await.unwrap();
    }
    let changes: u64 = backends.iter().map(|b| b.get_stats().leader_changes).sum();
    assert_eq!(changes, 3);
}

#[tokio::test]
async fn try_become_leader_is_sticky_and_resignable() {
    let cfg = support::config("trylead");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("trylead");
    let ttl = Duration::from_secs(1);
    assert!(a.try_become_leader(&name, ttl).await.unwrap());
    assert!(!b.try_become_leader(&name, ttl).await.unwrap());
    // Renewed well past the ttl; asking again keeps the same term.
    let term = a.current_leader(&name).await.unwrap().unwrap().term;
    tokio::time::sleep(ttl * 3).await;
    assert!(a.is_leader(&name));
    assert!(a.try_become_leader(&name, ttl).await.unwrap());
    assert!(!b.try_become_leader(&name, ttl).await.unwrap());
    assert_eq!(a.current_leader(&name).await.unwrap().unwrap().term, term);
    assert!(a.resign_leader(&name).await.unwrap());
    assert!(!a.resign_leader(&name).await.unwrap());
    assert!(b.try_become_leader(&name, ttl).await.unwrap());
    assert!(b.current_leader(&name).await.unwrap().unwrap().term > term);
    // Dropping the last handle of a backend gives leadership up.
    drop(b);
    let start = Instant::now();
    while !a.try_become_leader(&name, ttl).await.unwrap() {
        assert!(start.elapsed() < ttl * 3, "leadership not released on drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bad input.
    let err = a
        .try_become_leader("x", Duration::from_millis(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = a.try_become_leader("", ttl).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

/// An interval during which a candidate observed itself leading.
#[derive(Debug, Clone, Copy)]
struct Tenure {
    candidate: usize,
    term: i64,
    /// Taken after the first `is_leader() == true`.
    first: Instant,
    /// Taken before the last `is_leader() == true`.
    last: Instant,
}

#[tokio::test]
async fn no_two_leaders_overlap_under_random_kills() {
    let _timed = support::timed().await;
    let cfg = support::config("overlap");
    let schema = cfg.schema().to_string();
    let name = support::unique("overlap");
    // Renewals every second with over a second of slack: a loaded CI machine keeps up.
    let ttl = Duration::from_secs(3);
    let run = Duration::from_secs(30);
    let started = Instant::now();
    let tenures = Arc::new(Mutex::new(Vec::<Tenure>::new()));
    let mut tasks = Vec::new();
    for candidate in 0..3 {
        let b = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
        let (name, tenures) = (name.clone(), tenures.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_u64 + candidate as u64;
            let mut rand = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            while started.elapsed() < run {
                let l = match tokio::time::timeout(run, b.campaign(&name, ttl)).await {
                    Ok(Ok(l)) => l,
                    // The candidate's own session was killed while waiting: campaign again.
                    Ok(Err(e)) if e.kind() == ErrorKind::Connection => continue,
                    Ok(Err(e)) => panic!("campaign: {e}"),
                    Err(_) => break,
                };
                let hold = Duration::from_millis(200 + rand() % 2500);
                let since = Instant::now();
                let mut tenure: Option<Tenure> = None;
                // Sample the belief every few milliseconds until it ends or the hold is over.
                loop {
                    let before = Instant::now();
                    if !l.is_leader() {
                        break;
                    }
                    let after = Instant::now();
                    match &mut tenure {
                        None => {
                            tenure = Some(Tenure {
                                candidate,
                                term: l.term(),
                                first: after,
                                last: before,
                            })
                        }
                        Some(t) => t.last = before,
                    }
                    if since.elapsed() >= hold {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                if let Some(t) = tenure {
                    tenures.lock().unwrap().push(t);
                }
                match rand() % 3 {
                    0 => drop(l),
                    _ => {
                        let _ = l.resign().await;
                    }
                }
            }
        }));
    }
    // The killer: terminates the current leader's session at random moments.
    let mut kills = 0;
    let mut seed = 0xDEAD_BEEF_u64;
    while started.elapsed() < run {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 900)).await;
        if let Some(pid) = leader_session(&schema, &name).await {
            let admin = support::raw(&support::url()).await;
            let _ = admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await;
            kills += 1;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut tenures = tenures.lock().unwrap().clone();
    tenures.sort_by_key(|t| t.first);
    for pair in tenures.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(a.last < b.first, "overlapping leaders: {a:?} and {b:?}");
        assert!(a.term < b.term, "terms not increasing: {a:?} then {b:?}");
    }
    let leaders: std::collections::HashSet<usize> = tenures.iter().map(|t| t.candidate).collect();
    eprintln!(
        "{} tenures, {} kills, {} distinct leaders, no overlap",
        tenures.len(),
        kills,
        leaders.len()
    );
    assert!(
        tenures.len() >= 10,
        "too few leader changes to mean anything"
    );
    assert!(kills >= 5);
    assert_eq!(leaders.len(), 3);
}

#[test]
fn a_crashed_leader_is_replaced_when_its_lease_runs_out() {
    let cfg = support::config("crash");
    let name = support::unique("crash");
    let ttl = Duration::from_secs(2);
    // The leader runs on a runtime of its own; dropping that runtime is the crash: its tasks
    // stop (no resignation, no lease cleared) and its connections close.
    let crashed = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (b, l) = rt.block_on(async {
            let b = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
            let l = b.campaign(&name, ttl).await.unwrap();
            (b, l)
        });
        let term = l.term();
        std::mem::forget(l);
        std::mem::forget(b);
        drop(rt);
        (Instant::now(), term)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
        let info = b
            .current_leader(&name)
            .await
            .unwrap()
            .expect("the crashed leader's lease");
        assert_eq!(info.term, crashed.1);
        let l = tokio::time::timeout(ttl * 3, b.campaign(&name, ttl))
            .await
            .expect("replaced")
            .unwrap();
        let took = crashed.0.elapsed();
        eprintln!("crashed leader replaced after {took:?} (ttl {ttl:?})");
        assert!(l.term() > crashed.1);
        assert!(took <= ttl + Duration::from_secs(1), "took {took:?}");
        l.resign().await.unwrap();
    });
}

/// Runs `f`'s future on a thread of its own with a current-thread runtime: when the future
/// sleeps that thread (`std::thread::sleep`), its tasks (renewals, connection I/O) stop while
/// its sockets stay open, so the server keeps its session and advisory lock: a frozen process.
fn on_own_runtime<T, F, Fut>(f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    })
}

/// A new backend that must win leadership of `name` within `within` (while the old leader is
/// frozen).
async fn successor(
    cfg: processor::state::EnhancedPostgresConfig,
    name: &str,
    ttl: Duration,
    within: Duration,
) -> (EnhancedPostgresBackend, processor::state::Leadership) {
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let l = tokio::time::timeout(within, b.campaign(name, ttl))
        .await
        .expect("a new leader while the old one is frozen")
        .unwrap();
    (b, l)
}

#[tokio::test]
async fn a_frozen_leader_is_evicted_and_stops_believing() {
    let _timed = support::timed().await;
    let cfg = support::config("frozen");
    let name = support::unique("frozen");
    let ttl = Duration::from_secs(2);
    let freeze = ttl * 5;
    // The leader's runtime runs on a thread that then sleeps: its tasks (renewal, connection
    // I/O) stop, but its sockets stay open, so the server keeps its session and advisory lock.
    let (won_tx, won_rx) = std::sync::mpsc::channel();
    let frozen = {
        let (cfg, name) = (cfg.clone(), name.clone());
        on_own_runtime(move || async move {
            let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
            let l = b.campaign(&name, ttl).await.unwrap();
            won_tx.send(l.term()).unwrap();
            std::thread::sleep(freeze);
            // Awake again: it must not believe it still leads.
            let believes = l.is_leader();
            drop(l);
            believes
        })
    };
    let old_term = tokio::task::spawn_blocking(move || won_rx.recv().unwrap())
        .await
        .unwrap();
    let frozen_at = Instant::now();
    let (_b, l) = successor(cfg, &name, ttl, freeze).await;
    let took = frozen_at.elapsed();
    eprintln!("frozen leader replaced after {took:?} (ttl {ttl:?})");
    assert!(l.term() > old_term);
    let believed = tokio::task::spawn_blocking(move || frozen.join().unwrap())
        .await
        .unwrap();
    assert!(
        !believed,
        "the frozen leader still believed it led after waking"
    );
    assert!(l.is_leader());
    l.resign().await.unwrap();
}

/// Review defect: a leader paused beyond its lease must not be able to write once another has
/// been elected; the leadership's fence refuses its write.
#[tokio::test]
async fn a_deposed_leaders_fenced_write_is_refused() {
    let _timed = support::timed().await;
    let cfg = support::config("leaderfence");
    let name = support::unique("leaderfence");
    let ttl = Duration::from_secs(2);
    let freeze = ttl * 4;
    let (won_tx, won_rx) = std::sync::mpsc::channel();
    let old = {
        let (cfg, name) = (cfg.clone(), name.clone());
        on_own_runtime(move || async move {
            let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
            let l = b.campaign(&name, ttl).await.unwrap();
            let fence = l.fence();
            // Fenced writes pass while it leads.
            let mut tx = b.begin().await.unwrap();
            tx.check_fence(&fence).await.unwrap();
            tx.put(b"owner", b"old").await.unwrap();
            tx.commit().await.unwrap();
            won_tx.send(l.term()).unwrap();
            // Paused past its lease (the whole runtime stops).
            std::thread::sleep(freeze);
            let mut tx = b.begin().await.unwrap();
            let checked = tx.check_fence(&fence).await;
            if checked.is_ok() {
                tx.put(b"owner", b"stale").await.unwrap();
                tx.commit().await.unwrap();
            }
            drop(l);
            checked
        })
    };
    let old_term = tokio::task::spawn_blocking(move || won_rx.recv().unwrap())
        .await
        .unwrap();
    let (b, l) = successor(cfg, &name, ttl, freeze).await;
    assert!(l.term() > old_term);
    let mut tx = b.begin().await.unwrap();
    tx.check_fence(&l.fence()).await.unwrap();
    tx.put(b"owner", b"new").await.unwrap();
    tx.commit().await.unwrap();
    let checked = tokio::task::spawn_blocking(move || old.join().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(checked, Err(processor::state::StateError::Fenced { .. })),
        "the deposed leader's fence check gave {checked:?}"
    );
    assert_eq!(b.get(b"owner").await.unwrap(), Some(b"new".to_vec()));
    l.resign().await.unwrap();
}
