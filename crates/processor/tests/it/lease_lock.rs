//! The seed project's lease lock, `PostgresDistributedLock`, as its users call it: mutual
//! exclusion across processes, a lease that runs out after its TTL and admits the next
//! holder, `extend`, a stale token refused, release on drop.

use std::sync::Arc;
use std::time::Duration;

use processor::state::{
    DistributedLock, EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, LockGuard,
    PostgresDistributedLock, StateBackend,
};

use crate::support;

/// What the child process is told: URL, schema, resource and rounds, tab-separated.
const CHILD_ENV: &str = "PGSTATE_LEASE_CHILD";

async fn lock() -> Arc<PostgresDistributedLock> {
    Arc::new(
        PostgresDistributedLock::with_pool_size(&support::url(), 4)
            .await
            .unwrap(),
    )
}

/// Says `who` is ready, then waits (at most a minute) until `other` is too, so that both
/// processes count at the same time.
async fn meet(state: &EnhancedPostgresBackend, who: &str, other: &str) {
    state
        .put(format!("ready:{who}").as_bytes(), b"1")
        .await
        .unwrap();
    let other = format!("ready:{other}");
    let met = async {
        while state.get(other.as_bytes()).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), met)
        .await
        .expect("the other process started");
}

/// `rounds` times: take the lease, read the counter, write it back plus one, give the lease
/// back, pause. Without mutual exclusion two such loops lose increments.
async fn count_under_lease(
    lock: &PostgresDistributedLock,
    state: &EnhancedPostgresBackend,
    resource: &str,
    rounds: u32,
) -> Vec<i64> {
    let mut fences = Vec::new();
    for _ in 0..rounds {
        let guard = lock
            .acquire(resource, Duration::from_secs(30))
            .await
            .unwrap();
        fences.push(guard.fencing_token().unwrap());
        let n: u64 = match state.get(b"counter").await.unwrap() {
            Some(v) => String::from_utf8(v).unwrap().parse().unwrap(),
            None => 0,
        };
        tokio::time::sleep(Duration::from_millis(3)).await;
        state
            .put(b"counter", (n + 1).to_string().as_bytes())
            .await
            .unwrap();
        lock.release(guard).await.unwrap();
        // Room for the other process between two rounds.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Each new holder's fence is above every earlier one's.
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    fences
}

async fn state(url: &str, schema: &str) -> EnhancedPostgresBackend {
    EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url)
            .with_schema(schema)
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap()
}

/// Two processes (this one and a child it starts), each counting under the same lease: no
/// increment is lost, and every holder's fencing token is new.
#[tokio::test]
async fn two_processes_exclude_each_other() {
    let (schema, resource) = (support::unique("lease_count"), support::unique("res"));
    let rounds = 15;
    let state = state(&support::url(), &schema).await;
    let exe = std::env::current_exe().unwrap();
    let task = format!("{}\t{schema}\t{resource}\t{rounds}", support::url());
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(["lease_lock::child_process", "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, task)
            .output()
    });
    let lock = lock().await;
    meet(&state, "parent", "child").await;
    let mine = count_under_lease(&lock, &state, &resource, rounds).await;
    let out = child.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<i64> = stdout
        .lines()
        // (The first line follows libtest's own "test ... " on the same line.)
        .filter_map(|l| l.split("FENCE ").nth(1))
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(theirs.len(), rounds as usize, "{stdout}");
    let counter = state.get(b"counter").await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8(counter).unwrap(),
        (2 * rounds).to_string()
    );
    let mut fences: Vec<i64> = mine.into_iter().chain(theirs).collect();
    fences.sort();
    fences.dedup();
    assert_eq!(
        fences.len(),
        2 * rounds as usize,
        "a fencing token repeated"
    );
}

/// The child process of [`two_processes_exclude_each_other`].
#[tokio::test]
#[ignore = "the child process of lease_lock::two_processes_exclude_each_other, which starts it"]
async fn child_process() {
    let task = std::env::var(CHILD_ENV)
        .expect("started by lease_lock::two_processes_exclude_each_other, not on its own");
    let [url, schema, resource, rounds]: [&str; 4] =
        task.split('\t').collect::<Vec<_>>().try_into().unwrap();
    let lock = PostgresDistributedLock::with_pool_size(url, 2)
        .await
        .unwrap();
    let state = state(url, schema).await;
    meet(&state, "child", "parent").await;
    for fence in count_under_lease(&lock, &state, resource, rounds.parse().unwrap()).await {
        println!("FENCE {fence}");
    }
}

/// A holder that goes silent keeps the lease until its TTL, then the next one gets it; the
/// stale token can neither extend nor release the new holder's lease.
#[tokio::test]
async fn an_expired_lease_admits_the_next_holder_and_its_token_goes_stale() {
    let (a, b) = (lock().await, lock().await);
    let resource = support::unique("res");
    let mut first = a
        .try_acquire(&resource, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("free");
    assert!(b
        .try_acquire(&resource, Duration::from_secs(1))
        .await
        .unwrap()
        .is_none());
    assert!(b.is_locked(&resource).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(first.is_expired());
    assert!(!b.is_locked(&resource).await.unwrap());
    let second = b
        .try_acquire(&resource, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lease ran out");
    assert!(second.fencing_token() > first.fencing_token());

    let stale = a
        .extend(&mut first, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Coordination, "{stale}");
    let stale = a.release(first).await.unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Coordination, "{stale}");
    assert_eq!(
        a.get_lock_info(&resource).await.unwrap().as_ref(),
        Some(second.token())
    );
    b.release(second).await.unwrap();
    assert!(!a.is_locked(&resource).await.unwrap());
}

/// `extend` keeps a lease past its first TTL.
#[tokio::test]
async fn extend_keeps_a_lease_alive_past_its_first_ttl() {
    let (a, b) = (lock().await, lock().await);
    let resource = support::unique("res");
    let mut guard = a.acquire(&resource, Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.extend(&mut guard, Duration::from_secs(5)).await.unwrap();
    assert_eq!(guard.ttl(), Duration::from_secs(5));
    // Past the first TTL (2 s from the start), inside the second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(b.is_locked(&resource).await.unwrap());
    assert!(b
        .try_acquire(&resource, Duration::from_secs(1))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        b.get_lock_info(&resource).await.unwrap().as_ref(),
        Some(guard.token())
    );
    guard.release().await.unwrap();
}

/// A dropped guard gives its lease back; a waiting `acquire` gets it; a waiting `acquire`
/// whose future is dropped leaves no lease behind.
#[tokio::test]
async fn a_dropped_guard_releases_and_a_waiter_takes_over() {
    let (a, b) = (lock().await, lock().await);
    let resource = support::unique("res");
    let guard: LockGuard = a.acquire(&resource, Duration::from_secs(30)).await.unwrap();
    let waiter = {
        let (b, resource) = (b.clone(), resource.clone());
        tokio::spawn(async move { b.acquire(&resource, Duration::from_secs(30)).await })
    };
    // A second waiter gives up (its future dropped) while the lease is held: it holds
    // nothing and blocks nobody afterwards.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        b.acquire(&resource, Duration::from_secs(30)),
    )
    .await;
    assert!(gave_up.is_err(), "the lease was held");
    drop(guard);
    let taken = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter got the lease")
        .unwrap()
        .unwrap();
    assert_eq!(
        a.get_lock_info(&resource).await.unwrap().as_ref(),
        Some(taken.token())
    );
    drop(taken);
    let freed = async {
        while a.is_locked(&resource).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), freed)
        .await
        .expect("released on drop");
    let bad = a.try_acquire("", Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
    let bad = a.try_acquire(&resource, Duration::ZERO).await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
}
