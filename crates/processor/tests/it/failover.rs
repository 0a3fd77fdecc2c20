//! Failover with pg_auto_failover: the backend, given the formation's multi-host URL, keeps
//! writing through the loss of the primary and loses no acknowledged write; reads go to a
//! node that is a standby, and the old primary rejoins as one. The formation has a primary and
//! two secondaries with `number_sync_standbys` 1: the configuration in which pg_auto_failover
//! never acknowledges a write that no standby has (with one secondary it does, in
//! `wait_primary`). The load and the checks here serve the switchover test too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgstate_testcluster::Formation;
use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, NodeRole, PostgresPoolConfig,
    PostgresReplicaConfig, StateBackend,
};

use crate::support;

/// Writers running through the failover.
const WRITERS: usize = 8;
/// Readers running through the failover.
const READERS: usize = 2;
/// Acknowledged writes: key, when the write started and when its acknowledgement came.
type Acked = Vec<(Vec<u8>, Instant, Instant)>;
/// Bounds every operation (and so how long one may hang on the dead primary).
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// A standby further behind than this serves no reads.
const MAX_LAG_MS: u64 = 2_000;

/// Starts a formation (a monitor, a primary and two secondaries, `number_sync_standbys` 1).
pub async fn formation() -> Formation {
    tokio::task::spawn_blocking(Formation::start)
        .await
        .unwrap()
        .expect("a pg_auto_failover formation (scripts/setup.sh installs it)")
}

/// Runs `f` on the formation off the async threads (it blocks), and gives it back.
pub async fn blocking<T: Send + 'static>(
    mut formation: Formation,
    f: impl FnOnce(&mut Formation) -> T + Send + 'static,
) -> (Formation, T) {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut formation);
        (formation, out)
    })
    .await
    .unwrap()
}

/// A backend writing through the formation's URL and reading from a node that is a standby
/// (the same hosts with `target_session_attrs=read-only`: the first standby in host order when
/// its connections open), in schema `schema`.
pub async fn backend(formation: &Formation, schema: &str) -> EnhancedPostgresBackend {
    let cfg = EnhancedPostgresConfig::new(formation.uri())
        .with_schema(schema)
        .with_operation_timeout(OP_TIMEOUT)
        .with_pool_config(PostgresPoolConfig {
            min_connections: 1,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            ..PostgresPoolConfig::default()
        })
        .with_replicas(PostgresReplicaConfig {
            replica_urls: vec![formation.standby_uri()],
            enable_read_splitting: true,
            max_replication_lag_ms: MAX_LAG_MS,
            health_check_interval: Duration::from_millis(500),
            enable_auto_failover: true,
        });
    EnhancedPostgresBackend::new(cfg).await.unwrap()
}

/// Waits (up to `limit`) until the backend's replica URL reaches, as a standby in the read
/// rotation, a node other than `primary`; returns that node.
pub async fn a_standby_serves_reads(
    b: &EnhancedPostgresBackend,
    formation: &Formation,
    primary: usize,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let r = &b.replica_status()[0];
        let node = (0..formation.node_count())
            .find(|&i| r.server.as_deref() == Some(formation.address(i).as_str()));
        if let Some(node) = node {
            if node != primary && r.role == NodeRole::Standby && r.in_rotation {
                return node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no standby (primary: node {primary}) served reads within {limit:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node `node` is a standby streaming from the primary (`pg_stat_wal_receiver`), waiting up to
/// `limit` for it.
pub async fn streams_as_a_standby(formation: &Formation, node: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let state =
            match tokio_postgres::connect(&formation.node_url(node), tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    client
                        .query_one(
                            "SELECT pg_is_in_recovery(), \
                         (SELECT status FROM pg_stat_wal_receiver)",
                            &[],
                        )
                        .await
                        .map(|row| (row.get::<_, bool>(0), row.get::<_, Option<String>>(1)))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
        if matches!(&state, Ok((true, Some(s))) if s == "streaming") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} does not stream as a standby after {limit:?}: (in recovery, \
             wal receiver) {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What makes an acknowledged write survive the loss of any one node, checked on node
/// `primary`: the formation's `number_sync_standbys` is 1, the primary waits for any one of
/// its standbys (`synchronous_standby_names = 'ANY 1 (...)'`, `synchronous_commit = on`), and
/// every other node streams to it as a quorum standby (waiting up to 60 s for them).
pub async fn commits_wait_for_a_standby(formation: &Formation, primary: usize) {
    assert_eq!(formation.number_sync_standbys().unwrap(), 1);
    let client = support::raw(&formation.node_url(primary)).await;
    let want = formation.node_count() as i64 - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_one(
                "SELECT current_setting('synchronous_standby_names'), \
                 current_setting('synchronous_commit'), \
                 (SELECT count(*) FROM pg_stat_replication \
                  WHERE state = 'streaming' AND sync_state = 'quorum')",
                &[],
            )
            .await
            .unwrap();
        let (names, commit, quorum): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        if names.starts_with("ANY 1 (") && commit == "on" && quorum == want {
            eprintln!(
                "node {primary}: synchronous_standby_names = '{names}', {quorum} quorum standbys"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {primary} does not wait for one of {want} standbys: \
             synchronous_standby_names = '{names}', synchronous_commit = {commit}, \
             {quorum} streaming quorum standbys"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts that reads reach the standby: the replica's read count grows.
pub async fn reads_reach_the_standby(b: &EnhancedPostgresBackend) {
    let before = b.replica_status()[0].reads;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.replica_status()[0].reads <= before {
        assert!(Instant::now() < deadline, "no read reached the standby");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The seed's Monitoring snippet, and what it must say of the formation: the backend writes to
/// node `primary`, which is no replica, every other node streams from it (waiting up to 30 s
/// for a standby that is reconnecting), and the standby's lag is within the threshold.
pub async fn monitoring_says(b: &EnhancedPostgresBackend, formation: &Formation, primary: usize) {
    let standbys = u32::try_from(formation.node_count() - 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut repl_status = b.check_replication_status().await.unwrap();
    while repl_status.connected_replicas != standbys && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        repl_status = b.check_replication_status().await.unwrap();
    }
    println!("Is replica: {}", repl_status.is_replica);
    println!("Replication lag: {}ms", repl_status.lag_ms);
    assert!(!repl_status.is_replica, "the backend writes to a primary");
    assert!(
        repl_status.lag_ms <= MAX_LAG_MS,
        "lag {} ms",
        repl_status.lag_ms
    );
    assert_eq!(
        repl_status.primary.as_deref(),
        Some(formation.address(primary).as_str())
    );
    assert_eq!(repl_status.connected_replicas, standbys, "{repl_status:?}");
}

/// Writers and readers running against a backend until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    longest: Arc<Mutex<Duration>>,
    reads: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

/// What a load saw.
pub struct Outcome {
    pub acked: Acked,
    pub failures: u64,
    pub reads: u64,
    pub longest: Duration,
}

impl Load {
    /// [`WRITERS`] writers, each putting keys of its own one after the other, and [`READERS`]
    /// readers getting the newest acknowledged key. Every failure must be retryable.
    pub fn start(b: &EnhancedPostgresBackend) -> Load {
        let load = Load {
            stop: Arc::default(),
            acked: Arc::default(),
            longest: Arc::default(),
            reads: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..WRITERS + READERS {
            let (b, stop, acked, longest, reads) = (
                b.clone_handle(),
                load.stop.clone(),
                load.acked.clone(),
                load.longest.clone(),
                load.reads.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut failures = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let result = if w < WRITERS {
                        let key = format!("w{w}:{i:08}").into_bytes();
                        let r = b.put(&key, &key).await;
                        if r.is_ok() {
                            acked.lock().unwrap().push((key, start, Instant::now()));
                        }
                        r
                    } else {
                        let key = acked.lock().unwrap().last().map(|(k, ..)| k.clone());
                        match key {
                            Some(key) => b.get(&key).await.map(|v| {
                                // A standby may not have replayed it yet; if it has, it is right.
                                if let Some(v) = v {
                                    assert_eq!(v, key);
                                }
                                reads.fetch_add(1, Ordering::Relaxed);
                            }),
                            None => {
                                // Nothing written yet (and a loop that never waits would
                                // starve this single-threaded runtime).
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                Ok(())
                            }
                        }
                    };
                    {
                        let mut l = longest.lock().unwrap();
                        *l = (*l).max(start.elapsed());
                    }
                    if let Err(e) = result {
                        // A write cut off by the failover after it was sent has an unknown
                        // outcome; anything else is retryable.
                        assert!(
                            e.is_retryable() || e.kind() == ErrorKind::OutcomeUnknown,
                            "a failover error is retryable or an unknown outcome: {e}"
                        );
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    i += 1;
                }
                failures
            }));
        }
        Load { tasks, ..load }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// How long after `since` the first write started after it was acknowledged (waiting up
    /// to 120 s for one). (A write started earlier may be acknowledged later from a reply
    /// that was on its way.)
    pub async fn resumed_after(&self, since: Instant) -> Duration {
        let deadline = since + Duration::from_secs(120);
        loop {
            let first_after = self
                .acked
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, started, _)| *started > since)
                .map(|(.., at)| *at)
                .min();
            if let Some(at) = first_after {
                return at - since;
            }
            assert!(
                Instant::now() < deadline,
                "writes did not resume within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The longest time between two acknowledged writes after `since`.
    pub fn longest_pause_after(&self, since: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .acked
            .lock()
            .unwrap()
            .iter()
            .map(|(.., at)| *at)
            .filter(|at| *at >= since)
            .collect();
        times.sort();
        let mut last = since;
        let mut longest = Duration::ZERO;
        for t in times {
            longest = longest.max(t - last);
            last = t;
        }
        longest
    }

    /// Stops the tasks and returns what they saw.
    pub async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = 0;
        for t in self.tasks {
            failures += t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let longest = *self.longest.lock().unwrap();
        Outcome {
            acked,
            failures,
            reads: self.reads.load(Ordering::Relaxed),
            longest,
        }
    }
}

/// Every acknowledged write is on the primary now (read there, by a backend without
/// replicas), and no operation waited past the operation timeout (plus the acquire timeout
/// of its retry).
pub async fn nothing_lost(formation: &Formation, schema: &str, outcome: &Outcome) {
    assert!(
        outcome.longest <= OP_TIMEOUT + Duration::from_secs(6),
        "an operation took {:?}, past the operation timeout ({OP_TIMEOUT:?}) and the acquire \
         timeout of its retry",
        outcome.longest
    );
    let cfg = EnhancedPostgresConfig::new(formation.uri()).with_schema(schema);
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let first = outcome.acked.iter().map(|(_, s, _)| *s).min();
    let mut lost = Vec::new();
    for chunk in outcome.acked.chunks(5_000) {
        let keys: Vec<&[u8]> = chunk.iter().map(|(k, ..)| k.as_slice()).collect();
        let values = b.get_many(&keys).await.unwrap();
        for ((key, start, acked), value) in chunk.iter().zip(values) {
            if value.as_deref() != Some(key.as_slice()) {
                let at = |t: &Instant| first.map_or(0.0, |f| t.duration_since(f).as_secs_f64());
                lost.push(format!(
                    "{} (started {:.3} s, acknowledged {:.3} s into the load)",
                    String::from_utf8_lossy(key),
                    at(start),
                    at(acked)
                ));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost of {}: {:?}; the formation's events: {}",
        lost.len(),
        outcome.acked.len(),
        &lost[..lost.len().min(10)],
        formation.events().unwrap_or_else(|e| e.to_string())
    );
}

/// A formation with a backend on it, a standby serving its reads, commits waiting for a
/// standby, and the seed's Monitoring snippet saying so.
pub struct Setup {
    pub formation: Formation,
    pub schema: String,
    pub b: EnhancedPostgresBackend,
    pub primary: usize,
}

pub async fn setup(tag: &str) -> Setup {
    let formation = formation().await;
    let schema = support::unique(tag);
    let b = backend(&formation, &schema).await;
    let primary = formation.primary().unwrap();
    a_standby_serves_reads(&b, &formation, primary, Duration::from_secs(30)).await;
    commits_wait_for_a_standby(&formation, primary).await;
    monitoring_says(&b, &formation, primary).await;
    Setup {
        formation,
        schema,
        b,
        primary,
    }
}

/// Starts a [`Load`] and waits until writes are acknowledged and reads reach the standby.
pub async fn running_load(b: &EnhancedPostgresBackend) -> Load {
    let load = Load::start(b);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(load.acked() > 0, "writes under way");
    reads_reach_the_standby(b).await;
    load
}

#[tokio::test]
async fn writes_go_on_through_the_loss_of_the_primary_and_none_acknowledged_is_lost() {
    let _bulk = support::bulk().await;
    let Setup {
        formation,
        schema,
        b,
        primary,
    } = setup("failover").await;
    let load = running_load(&b).await;

    let (formation, killed) = blocking(formation, move |f| {
        f.kill_node(primary).unwrap();
        // The old primary no longer accepts connections: a write acknowledged from now on
        // was made on the new one.
        Instant::now()
    })
    .await;
    let resumed = load.resumed_after(killed).await;
    let (formation, promoted) = blocking(formation, move |f| {
        f.wait_for(Duration::from_secs(60), "a standby's promotion", |f| {
            f.primary().is_ok_and(|p| p != primary)
        })
        .unwrap();
        f.primary().unwrap()
    })
    .await;
    // The other standby follows the new primary; the old primary, restarted, rejoins as a
    // standby (rewound with pg_rewind).
    let rejoin = Instant::now();
    let (formation, ()) = blocking(formation, move |f| {
        f.restart_node(primary).unwrap();
        f.wait_for(Duration::from_secs(120), "the old primary to rejoin", |f| {
            f.settled() && f.primary().is_ok_and(|p| p == promoted)
        })
        .unwrap();
    })
    .await;
    streams_as_a_standby(&formation, primary, Duration::from_secs(60)).await;
    let rejoined = rejoin.elapsed();
    eprintln!("states after the rejoin: {:?}", formation.states());
    let reader = a_standby_serves_reads(&b, &formation, promoted, Duration::from_secs(60)).await;
    reads_reach_the_standby(&b).await;
    let outcome = load.finish().await;
    commits_wait_for_a_standby(&formation, promoted).await;
    monitoring_says(&b, &formation, promoted).await;
    let status = b.check_replication_status().await.unwrap();
    assert_eq!(status.primary_changes, 1, "one failover seen: {status:?}");

    eprintln!(
        "failover: node {primary} killed, node {promoted} promoted; writes resumed {:.1} s after \
         the kill; the old primary streamed as a standby {:.1} s after its restart; reads from \
         node {reader}; {} writes acknowledged, {} reads, {} operations failed meanwhile; \
         longest operation {:?}",
        resumed.as_secs_f64(),
        rejoined.as_secs_f64(),
        outcome.acked.len(),
        outcome.reads,
        outcome.failures,
        outcome.longest
    );
    // The monitor's events, shown with the test's output when it fails (or with --nocapture).
    eprintln!("{}", formation.events().unwrap_or_else(|e| e.to_string()));
    nothing_lost(&formation, &schema, &outcome).await;
}
