//! Randomized cancellation stress (issue 23): owners (one writer per key, each on a session of
//! its own), readers and optimistic counters, with about 30% of calls cut off at a random
//! point (after a random number of polls, or after 50 µs to 5 ms), over puts, deletes,
//! versioned writes, transactions, gets and `get_many`. It checks the outcome contract:
//!
//! - an owner never reads a value of a write it issued before its last acknowledged write
//!   (other than that write's): a cut or failed write lands before the next acknowledged one
//!   or never;
//! - no read returns a value written under another key;
//! - each counter ends within [acknowledged increments, acknowledged + unknown].
//!
//! Each pool size runs `PGSTATE_STRESS_SECS` seconds (5 by default, so that CI stays short;
//! the long form is `PGSTATE_STRESS_SECS=60`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, ErrorKind, IsolationLevel, PostgresPoolConfig, StateBackend,
    StateError,
};

use crate::support;

const OWNERS: usize = 16;
const KEYS_PER_OWNER: usize = 4;
const READERS: usize = 6;
/// Counter tasks; two share each counter, so that versioned writes conflict.
const COUNTER_TASKS: usize = 6;
const COUNTERS: usize = COUNTER_TASKS / 2;
/// Percent of calls cut off.
const CUT_PERCENT: u64 = 30;

/// A small deterministic generator (xorshift64*), seeded per task.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where a call is cut off.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Runs to its end.
    Never,
    /// Dropped when it is still pending after this many polls (an await point of its own).
    Polls(u32),
    /// Dropped when it is still pending after this long.
    After(Duration),
}

impl Cut {
    fn pick(rng: &mut Rng) -> Cut {
        if rng.below(100) >= CUT_PERCENT {
            return Cut::Never;
        }
        if rng.below(2) == 0 {
            Cut::Polls(1 + rng.below(6) as u32)
        } else {
            Cut::After(Duration::from_micros(50 + rng.below(4_950)))
        }
    }
}

/// Runs `f` until `cut` drops it: `None` when it was dropped before it completed (counted in
/// `tally`).
async fn run<F: Future>(tally: &Tally, cut: Cut, f: F) -> Option<F::Output> {
    tally.calls.fetch_add(1, Relaxed);
    if !matches!(cut, Cut::Never) {
        tally.armed.fetch_add(1, Relaxed);
    }
    let done = run_cut(cut, f).await;
    if done.is_none() {
        tally.cut.fetch_add(1, Relaxed);
    }
    done
}

async fn run_cut<F: Future>(cut: Cut, f: F) -> Option<F::Output> {
    match cut {
        Cut::Never => Some(f.await),
        Cut::After(d) => tokio::time::timeout(d, f).await.ok(),
        Cut::Polls(n) => {
            let mut f = pin!(f);
            let mut polls = 0;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(v) = f.as_mut().poll(cx) {
                    return Poll::Ready(Some(v));
                }
                polls += 1;
                if polls >= n {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await
        }
    }
}

/// What the stress saw, summed over its tasks.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    /// Calls given a point to be cut off at (some complete before it).
    armed: AtomicU64,
    /// Calls dropped before they completed.
    cut: AtomicU64,
    /// Writes dropped before they completed.
    cut_writes: AtomicU64,
    acked_writes: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
    /// Cut or failed writes read after the owner's later acknowledged write.
    stale: AtomicU64,
    /// Values read under another key than their own.
    wrong_key: AtomicU64,
    problems: std::sync::Mutex<Vec<String>>,
    /// A few of the errors writes returned, to show with the figures.
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    /// Whether `seen`, read under `key`, is a value written under it (values are
    /// `key|seq`); counts a wrong-key value otherwise.
    fn of_key(&self, key: &[u8], seen: &Option<Vec<u8>>) -> bool {
        match seen {
            Some(v) if !v.starts_with(key) || v.get(key.len()) != Some(&b'|') => {
                self.problem(
                    &self.wrong_key,
                    format!(
                        "{} read {}",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v)
                    ),
                );
                false
            }
            _ => true,
        }
    }

    fn problem(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Relaxed);
        let mut p = self.problems.lock().unwrap();
        if p.len() < 20 {
            p.push(what);
        }
    }
}

/// What an owner knows of one of its keys.
struct Key {
    name: Vec<u8>,
    /// The value of its last acknowledged write (`None`: deleted or never written).
    acked: Option<Vec<u8>>,
    /// Values of the writes it issued since, whose outcome it does not know (or which failed);
    /// `None` stands for a delete.
    since: HashSet<Option<Vec<u8>>>,
}

impl Key {
    /// Checks a value read under this key (an owner's read runs after every write it issued
    /// before it has returned or been dropped).
    fn check(&self, seen: &Option<Vec<u8>>, tally: &Tally) {
        if !tally.of_key(&self.name, seen) {
            return;
        }
        if *seen != self.acked && !self.since.contains(seen) {
            tally.problem(
                &tally.stale,
                format!(
                    "{}: read {:?}, last acknowledged {:?}, unknown since {}",
                    String::from_utf8_lossy(&self.name),
                    seen.as_deref().map(String::from_utf8_lossy),
                    self.acked.as_deref().map(String::from_utf8_lossy),
                    self.since.len()
                ),
            );
        }
    }

    /// Records the outcome of a write of `value` (`None`: a delete).
    fn wrote<T>(
        &mut self,
        value: Option<Vec<u8>>,
        outcome: Option<Result<T, StateError>>,
        tally: &Tally,
    ) {
        match outcome {
            Some(Ok(_)) => {
                tally.acked_writes.fetch_add(1, Relaxed);
                self.acked = value;
                self.since.clear();
            }
            Some(Err(e)) => {
                if e.kind() == ErrorKind::OutcomeUnknown {
                    tally.unknown.fetch_add(1, Relaxed);
                } else {
                    tally.failed.fetch_add(1, Relaxed);
                }
                let mut errors = tally.errors.lock().unwrap();
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
                self.since.insert(value);
            }
            None => {
                tally.cut_writes.fetch_add(1, Relaxed);
                self.since.insert(value);
            }
        }
    }
}

/// One owner: writes and reads only its own keys, on a session of its own.
async fn owner(
    b: EnhancedPostgresBackend,
    id: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut rng = Rng::new(seed);
    let mut keys: Vec<Key> = (0..KEYS_PER_OWNER)
        .map(|k| Key {
            name: format!("o{id:02}k{k}").into_bytes(),
            acked: None,
            since: HashSet::new(),
        })
        .collect();
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        let k = rng.below(KEYS_PER_OWNER as u64) as usize;
        let cut = Cut::pick(&mut rng);
        seq += 1;
        let key = keys[k].name.clone();
        let value = [key.as_slice(), format!("|{seq}").as_bytes()].concat();
        match rng.below(100) {
            0..30 => {
                let r = run(&tally, cut, b.put(&key, &value)).await;
                keys[k].wrote(Some(value), r, &tally);
            }
            30..40 => {
                let r = run(&tally, cut, b.delete(&key)).await;
                keys[k].wrote(None, r, &tally);
            }
            40..55 => {
                // A versioned write on what a read (not cut) found.
                let Ok(entry) = b.get_entry(&key).await else {
                    continue;
                };
                let seen = entry.as_ref().map(|e| e.value.clone());
                keys[k].check(&seen, &tally);
                let expected = entry.map(|e| e.version);
                let r = run(&tally, cut, b.put_with_version(&key, &value, expected)).await;
                keys[k].wrote(Some(value), r, &tally);
            }
            55..65 => {
                let r = run(&tally, cut, async {
                    let mut tx = b.begin_transaction(IsolationLevel::ReadCommitted).await?;
                    tx.put(&key, &value).await?;
                    tx.commit().await
                })
                .await;
                keys[k].wrote(Some(value), r, &tally);
            }
            65..85 => {
                if let Some(Ok(seen)) = run(&tally, cut, b.get(&key)).await {
                    keys[k].check(&seen, &tally);
                }
            }
            _ => {
                let names: Vec<&[u8]> = keys.iter().map(|k| k.name.as_slice()).collect();
                if let Some(Ok(seen)) = run(&tally, cut, b.get_many(&names)).await {
                    for (key, seen) in keys.iter().zip(&seen) {
                        key.check(seen, &tally);
                    }
                }
            }
        }
    }
    // Last, uncut reads of every key.
    for key in &keys {
        match b.get(&key.name).await {
            Ok(seen) => key.check(&seen, &tally),
            Err(e) => tally.problem(&tally.stale, format!("final read failed: {e}")),
        }
    }
}

/// One reader: reads keys of every owner, checking only that each value is its key's.
async fn reader(b: EnhancedPostgresBackend, seed: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = Rng::new(seed);
    let name = |rng: &mut Rng| {
        format!(
            "o{:02}k{}",
            rng.below(OWNERS as u64),
            rng.below(KEYS_PER_OWNER as u64)
        )
        .into_bytes()
    };
    while !stop.load(Relaxed) {
        let cut = Cut::pick(&mut rng);
        if rng.below(2) == 0 {
            let key = name(&mut rng);
            if let Some(Ok(seen)) = run(&tally, cut, b.get(&key)).await {
                tally.of_key(&key, &seen);
            }
        } else {
            let keys: Vec<Vec<u8>> = (0..3).map(|_| name(&mut rng)).collect();
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            if let Some(Ok(seen)) = run(&tally, cut, b.get_many(&refs)).await {
                for (key, seen) in keys.iter().zip(&seen) {
                    tally.of_key(key, seen);
                }
            }
        }
    }
}

/// Increments of one counter task: (acknowledged, unknown).
async fn counter(
    b: EnhancedPostgresBackend,
    c: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let key = format!("counter{c}").into_bytes();
    let (mut acked, mut unknown) = (0, 0);
    while !stop.load(Relaxed) {
        let Ok(entry) = b.get_entry(&key).await else {
            continue;
        };
        let (n, version) = match entry {
            Some(e) => (parse(&e.value), Some(e.version)),
            None => (0, None),
        };
        let next = (n + 1).to_string().into_bytes();
        match run(
            &tally,
            Cut::pick(&mut rng),
            b.put_with_version(&key, &next, version),
        )
        .await
        {
            Some(Ok(_)) => acked += 1,
            Some(Err(StateError::ConcurrentModification { .. })) => {}
            Some(Err(_)) | None => unknown += 1,
        }
    }
    (acked, unknown)
}

fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a counter holds {v:?}"))
}

fn seconds() -> u64 {
    std::env::var("PGSTATE_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

async fn stress(pool: u32) {
    let secs = seconds();
    let cfg = support::config(&format!("cancel_stress{pool}"))
        .with_pool_config(PostgresPoolConfig {
            min_connections: 0,
            max_connections: pool,
            ..PostgresPoolConfig::default()
        })
        // The settings the docs advise: the server gives up on a statement before the caller.
        .with_statement_timeout(Duration::from_secs(2))
        .with_operation_timeout(Duration::from_millis(2500))
        .with_expired_cleanup(false);
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let created_before = b.get_pool_stats().connections_created;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("cancellation stress, pool of {pool}: {secs} s, seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..OWNERS {
        tasks.push(tokio::spawn(owner(
            b.new_session(),
            id,
            seed ^ (id as u64 + 1),
            stop.clone(),
            tally.clone(),
        )));
    }
    for r in 0..READERS {
        tasks.push(tokio::spawn(reader(
            b.new_session(),
            seed ^ (100 + r as u64),
            stop.clone(),
            tally.clone(),
        )));
    }
    let counters: Vec<_> = (0..COUNTER_TASKS)
        .map(|t| {
            tokio::spawn(counter(
                b.new_session(),
                t % COUNTERS,
                seed ^ (200 + t as u64),
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut sums = [(0u64, 0u64); COUNTERS];
    for (t, task) in counters.into_iter().enumerate() {
        let (a, u) = task.await.unwrap();
        sums[t % COUNTERS].0 += a;
        sums[t % COUNTERS].1 += u;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let reconnects = b.get_pool_stats().connections_created - created_before;
    let t = &tally;
    eprintln!(
        "pool of {pool}: {} calls in {elapsed:.1} s, {} given a point to be cut off at, {} cut \
         off ({} writes); {} writes acknowledged, {} outcome unknown, {} failed {:?}; {} \
         connections opened ({:.1} per second); stale reads {}, wrong-key values {}",
        t.calls.load(Relaxed),
        t.armed.load(Relaxed),
        t.cut.load(Relaxed),
        t.cut_writes.load(Relaxed),
        t.acked_writes.load(Relaxed),
        t.unknown.load(Relaxed),
        t.failed.load(Relaxed),
        t.errors.lock().unwrap(),
        reconnects,
        reconnects as f64 / elapsed,
        t.stale.load(Relaxed),
        t.wrong_key.load(Relaxed),
    );
    let problems = t.problems.lock().unwrap().clone();
    assert_eq!(t.stale.load(Relaxed), 0, "{problems:#?}");
    assert_eq!(t.wrong_key.load(Relaxed), 0, "{problems:#?}");
    for (c, (acked, unknown)) in sums.iter().enumerate() {
        let value = match b.get(format!("counter{c}").as_bytes()).await.unwrap() {
            Some(v) => parse(&v),
            None => 0,
        };
        eprintln!("counter{c}: {value} (acknowledged {acked}, unknown {unknown})");
        assert!(
            (*acked..=acked + unknown).contains(&value),
            "counter{c} is {value}: acknowledged {acked}, unknown {unknown}"
        );
    }
    // The stress did what it says: writes acknowledged, and calls cut off at each kind of point.
    assert!(
        t.acked_writes.load(Relaxed) > 100,
        "too few writes acknowledged"
    );
    assert!(t.cut_writes.load(Relaxed) > 50, "too few writes cut off");
    assert!(sums.iter().all(|(a, _)| *a > 0), "a counter never moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writes_never_land_after_the_next_acknowledged_one_pool_of_4() {
    stress(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writes_never_land_after_the_next_acknowledged_one_pool_of_10() {
    stress(10).await;
}
