//! Held session locks share a few lock sessions: bounded server connections, exclusion kept
//! within and across processes, lost together, nothing leaked by abandoned acquisitions.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use processor::state::{lock_key, EnhancedPostgresBackend, PostgresLockGuard, MAX_LOCK_SESSIONS};

use crate::coordination::terminate;
use crate::support;

/// Granted session advisory locks on `keys`: (how many, held by how many server sessions).
async fn granted(keys: &[i64]) -> (i64, i64) {
    let admin = support::raw(&support::url()).await;
    let row = admin
        .query_one(
            "SELECT count(*), count(DISTINCT pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted \
               AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
            &[&keys],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn five_hundred_held_locks_use_at_most_eight_sessions_and_are_lost_together() {
    let app = support::unique("many");
    let cfg = support::config("many").with_application_name(&app);
    let pool_max = support::small_pool().max_connections as usize;
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg.with_application_name("pgstate-other"))
        .await
        .unwrap();
    let names: Vec<String> = (0..500).map(|i| format!("{app}:{i}")).collect();
    let keys: Vec<i64> = names.iter().map(|n| lock_key(n)).collect();

    let mut guards = Vec::new();
    for chunk in names.chunks(50) {
        let got = join_all(
            chunk
                .iter()
                .map(|n| PostgresLockGuard::new(&a, n, Duration::ZERO)),
        )
        .await;
        for g in got {
            guards.push(g.unwrap().expect("a free lock"));
        }
    }
    let pids: HashSet<i32> = guards.iter().map(|g| g.backend_pid()).collect();
    let (count, sessions) = granted(&keys).await;
    let connections = support::sessions(&app).await.len();
    eprintln!(
        "500 locks held on {sessions} server sessions; the backend has {connections} connections \
         (pool at most {pool_max})"
    );
    assert_eq!(count, 500);
    assert!(sessions as usize <= MAX_LOCK_SESSIONS && MAX_LOCK_SESSIONS == 8);
    assert_eq!(pids.len(), sessions as usize);
    assert!(
        connections <= MAX_LOCK_SESSIONS + pool_max,
        "{connections} connections"
    );

    // Each one excludes another backend, and another holder in the same backend.
    for n in &names {
        assert!(PostgresLockGuard::new(&b, n, Duration::ZERO)
            .await
            .unwrap()
            .is_none());
    }
    for n in names.iter().step_by(50) {
        assert!(
            PostgresLockGuard::new(&a, n, Duration::ZERO)
                .await
                .unwrap()
                .is_none(),
            "a second holder in the same process"
        );
    }
    let (count, sessions_after) = granted(&keys).await;
    assert_eq!((count, sessions_after), (500, sessions));

    // Ending the sessions loses every lock on them, and each guard says so.
    for pid in &pids {
        terminate(*pid).await;
    }
    let lost = join_all(
        guards
            .iter()
            .map(|g| tokio::time::timeout(Duration::from_secs(15), g.lost())),
    )
    .await;
    assert!(
        lost.iter().all(Result::is_ok),
        "every guard reports its lock lost"
    );
    assert!(guards.iter().all(PostgresLockGuard::is_lost));
    assert_eq!(granted(&keys).await.0, 0);
    // The other backend can take them now.
    for n in names.iter().step_by(25) {
        assert!(PostgresLockGuard::new(&b, n, Duration::ZERO)
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn abandoned_acquisitions_and_dropped_guards_leave_nothing_held() {
    let cfg = support::config("abandon");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let names: Vec<String> = (0..60)
        .map(|i| support::unique(&format!("ab{i}")))
        .collect();
    let keys: Vec<i64> = names.iter().map(|n| lock_key(n)).collect();
    // A lock session open already, so that the cuts below land inside acquisitions.
    PostgresLockGuard::new(&a, &support::unique("warm"), Duration::ZERO)
        .await
        .unwrap()
        .expect("free")
        .release()
        .await
        .unwrap();
    let mut kept = Vec::new();
    for (i, n) in names.iter().enumerate() {
        // Cut short at every stage of an acquisition: before the lock, between the lock and
        // its record, after.
        let limit = Duration::from_micros(500 * i as u64);
        if let Ok(g) =
            tokio::time::timeout(limit, PostgresLockGuard::new(&a, n, Duration::ZERO)).await
        {
            kept.push(g.unwrap().expect("free"));
        }
    }
    eprintln!("{} of 60 acquisitions completed", kept.len());
    // Guards dropped without release let go too (in the background).
    drop(kept);
    let deadline = Instant::now() + Duration::from_secs(10);
    while granted(&keys).await.0 > 0 {
        assert!(
            Instant::now() < deadline,
            "locks left held: {:?}",
            granted(&keys).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in &names {
        let g = PostgresLockGuard::new(&b, n, Duration::ZERO)
            .await
            .unwrap()
            .expect("free for another backend");
        g.release().await.unwrap();
    }
    // And for the same backend again.
    for n in &names {
        assert!(PostgresLockGuard::new(&a, n, Duration::ZERO)
            .await
            .unwrap()
            .is_some());
    }
    // The longest wait there is does not overflow anything.
    let forever = PostgresLockGuard::new(&a, &support::unique("forever"), Duration::MAX)
        .await
        .unwrap();
    assert!(forever.is_some());
}
