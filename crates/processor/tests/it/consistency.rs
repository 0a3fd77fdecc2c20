//! The consistency model with replicas: read-your-writes scoped to a session, causal tokens
//! across backends, versions read after a conflict, writes of unknown outcome. Tests that
//! pause replay start their own cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::state::{
    CausalToken, EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel,
    PostgresReplicaConfig, StateBackend, StateError,
};

use crate::support::{self, replicas, wait_status};

/// Index scans of the state table, as counted by the server behind `admin` (a connection to
/// the test's own database): one per point read that ran there.
async fn index_scans(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT coalesce(sum(idx_scan), 0)::bigint FROM pg_stat_user_tables \
             WHERE relname = 'state_entries'",
            &[],
        )
        .await
        .expect("pg_stat_user_tables")
        .get(0)
}

/// The acceptance load: one write every 20 ms whose writer reads each write back at once,
/// four reader tasks (each its own session) reading older keys, default settings with one
/// replica. Reads served by the replica are counted on the replica itself (index scans of the
/// state table, in a database no other test uses; `xact_commit` would also count the pool's
/// checkout probes).
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn under_a_mixed_load_the_replica_serves_the_reads_and_the_writer_reads_its_writes() {
    let cluster = support::local_cluster();
    let db = support::unique("mixed");
    let primary_admin = support::raw(&cluster.primary_url()).await;
    primary_admin
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .unwrap();
    let b = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(cluster.url_for_db(0, &db)).with_replicas(
            PostgresReplicaConfig {
                replica_urls: vec![cluster.url_for_db(1, &db)],
                ..PostgresReplicaConfig::default()
            },
        ),
    )
    .await
    .unwrap();
    let old: Vec<(Vec<u8>, Vec<u8>)> = (0..200u32)
        .map(|i| (format!("old:{i}").into_bytes(), i.to_be_bytes().to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = old.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_put(&refs).await.unwrap();
    let token = b.causal_token().await.unwrap();
    wait_status(&b, Duration::from_secs(20), "replica in rotation", |s| {
        s.replicas.iter().all(|r| r.in_rotation)
    })
    .await;

    let replica_admin = support::raw(&cluster.url_for_db(1, &db)).await;
    let before = index_scans(&replica_admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4usize)
        .map(|t| {
            // Its own session, which has seen the old keys' batch.
            let reader = b.new_session();
            reader.observe(token);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut reads = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("old:{}", i % 200);
                    let v = reader.get(k.as_bytes()).await.unwrap();
                    assert_eq!(v, Some(((i % 200) as u32).to_be_bytes().to_vec()), "{k}");
                    reads += 1;
                    i += 7;
                }
                reads
            })
        })
        .collect();
    let (mut writer_reads, mut stale) = (0u64, 0u64);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(5) {
        ticker.tick().await;
        let k = format!("new:{}", i % 50);
        b.put(k.as_bytes(), &i.to_be_bytes()).await.unwrap();
        if b.get(k.as_bytes()).await.unwrap() != Some(i.to_be_bytes().to_vec()) {
            stale += 1;
        }
        writer_reads += 1;
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut reader_reads = 0u64;
    for r in readers {
        reader_reads += r.await.unwrap();
    }
    let client_side = b.get_stats();
    // Closing the connections makes their server processes report their statistics.
    drop(b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ran = index_scans(&replica_admin).await - before;
    let total = reader_reads + writer_reads;
    // A writer's read that found the replica behind ran there but was not served from it.
    let served = u64::try_from(ran).unwrap_or(0).saturating_sub(writer_reads);
    let share = served as f64 / total as f64;
    eprintln!(
        "{i} writes; {total} reads ({writer_reads} by the writer); {ran} point reads ran on the \
         replica, at least {served} served from it ({:.1}% of the reads); client side: {} \
         replica, {} primary reads",
        share * 100.0,
        client_side.replica_reads,
        client_side.primary_reads
    );
    assert_eq!(
        stale, 0,
        "the writer read an older state than its own write"
    );
    assert!(i >= 100, "the writer wrote {i} times in 5 s");
    assert!(share >= 0.8, "the replica served {served} of {total} reads");
    primary_admin
        .batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// Two backends on one primary and one replica whose replay is paused, so that what each
/// read sees shows where it went.
struct Paused {
    cluster: pgstate_testcluster::Cluster,
    writer: EnhancedPostgresBackend,
    other: EnhancedPostgresBackend,
}

impl Paused {
    async fn start() -> Self {
        let cluster = support::own_cluster(1).await;
        // A lag limit far above the test's length keeps the paused replica in rotation, and
        // a slow monitor (its probes may take up to 5 s) keeps it there on a loaded machine:
        // where each read goes is what these tests look at.
        let config = || {
            EnhancedPostgresConfig::new(cluster.primary_url())
                .with_schema("causal")
                .with_replicas(PostgresReplicaConfig {
                    health_check_interval: Duration::from_secs(5),
                    ..replicas(cluster.replica_urls(), 600_000, true)
                })
        };
        let writer = EnhancedPostgresBackend::new(config()).await.unwrap();
        let other = EnhancedPostgresBackend::new(config()).await.unwrap();
        Paused {
            cluster,
            writer,
            other,
        }
    }

    /// Waits until the writer's router has the replica in rotation (a loaded machine may have
    /// taken it out for a slow probe): reads expected to show the replica's older state need
    /// it there.
    async fn in_rotation(&self, b: &EnhancedPostgresBackend) {
        wait_status(b, Duration::from_secs(30), "replica in rotation", |s| {
            s.replicas.iter().all(|r| r.in_rotation)
        })
        .await;
    }

    async fn caught_up(&self) {
        wait_status(
            &self.other,
            Duration::from_secs(20),
            "replica caught up",
            |s| s.replicas.iter().all(|r| r.in_rotation && r.lag_bytes == 0),
        )
        .await;
    }

    /// Pauses replay and waits until the replica says it has paused (a pause is only a
    /// request until the startup process honours it: records arriving meanwhile are replayed).
    fn pause(&self) {
        self.cluster
            .psql(1, "SELECT pg_wal_replay_pause()")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .cluster
            .psql(1, "SELECT pg_get_wal_replay_pause_state()")
            .unwrap()
            != "paused"
        {
            assert!(Instant::now() < deadline, "replay never paused");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn resume(&self) {
        self.cluster
            .psql(1, "SELECT pg_wal_replay_resume()")
            .unwrap();
    }
}

#[tokio::test]
async fn read_your_writes_is_per_session_and_a_causal_token_carries_it_to_another_backend() {
    let p = Paused::start().await;
    p.writer.put(b"k", b"v1").await.unwrap();
    p.caught_up().await;
    p.pause();
    p.writer.put(b"k", b"v2").await.unwrap();

    assert_eq!(p.writer.get(b"k").await.unwrap(), Some(b"v2".to_vec()));
    assert_eq!(
        p.writer.clone_handle().get(b"k").await.unwrap(),
        Some(b"v2".to_vec()),
        "clones share the session"
    );
    // Another session, another backend: served by the paused replica, so the older state.
    let fresh = p.writer.new_session();
    p.in_rotation(&fresh).await;
    let replica_reads = fresh.get_stats().replica_reads;
    assert_eq!(fresh.get(b"k").await.unwrap(), Some(b"v1".to_vec()));
    assert_eq!(fresh.get_stats().replica_reads, replica_reads + 1);
    p.in_rotation(&p.other).await;
    assert_eq!(p.other.get(b"k").await.unwrap(), Some(b"v1".to_vec()));

    // The token, through its text form, as another process would get it.
    let token = p.writer.causal_token().await.unwrap();
    let carried: CausalToken = token.to_string().parse().unwrap();
    assert_eq!(carried, token);
    p.other.observe(carried);
    assert_eq!(p.other.get(b"k").await.unwrap(), Some(b"v2".to_vec()));
    assert!(matches!(
        "not a token".parse::<CausalToken>(),
        Err(StateError::InvalidInput(_))
    ));

    // Commits record their position like single writes.
    p.writer
        .transaction(IsolationLevel::ReadCommitted, |tx| {
            Box::pin(async move { tx.put(b"t", b"in a transaction").await })
        })
        .await
        .unwrap();
    assert_eq!(
        p.writer.get(b"t").await.unwrap(),
        Some(b"in a transaction".to_vec())
    );
    assert_eq!(
        fresh.get(b"t").await.unwrap(),
        None,
        "fresh session: replica"
    );

    // A backend without replicas gives tokens too (the primary's position).
    let plain = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(p.cluster.primary_url()).with_schema("causal"),
    )
    .await
    .unwrap();
    plain.put(b"p", b"written without replicas").await.unwrap();
    let token = plain.causal_token().await.unwrap();
    p.in_rotation(&fresh).await;
    assert_eq!(fresh.get(b"p").await.unwrap(), None, "replica paused");
    fresh.observe(token);
    assert_eq!(
        fresh.get(b"p").await.unwrap(),
        Some(b"written without replicas".to_vec())
    );

    p.resume();
    p.caught_up().await;
    let replica_reads = p.other.get_stats().replica_reads;
    assert_eq!(
        p.other.get(b"t").await.unwrap(),
        Some(b"in a transaction".to_vec())
    );
    assert_eq!(
        p.other.get_stats().replica_reads,
        replica_reads + 1,
        "once the replica has replayed the token, it serves the read"
    );
}

#[tokio::test]
async fn a_version_conflict_or_an_abandoned_write_moves_the_sessions_reads_past_it() {
    let p = Paused::start().await;
    p.writer.put_with_version(b"c", b"a", None).await.unwrap();
    p.writer.put(b"w", b"before").await.unwrap();
    p.caught_up().await;
    p.pause();
    let current = p
        .writer
        .put_with_version(b"c", b"b", Some(1))
        .await
        .unwrap();
    assert_eq!(current, 2);

    // The other backend's session reads the paused replica: version 1, already gone.
    p.in_rotation(&p.other).await;
    let (_, stale) = p.other.get_with_version(b"c").await.unwrap().unwrap();
    assert_eq!(stale, 1);
    let err = p
        .other
        .put_with_version(b"c", b"x", Some(stale))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::ConcurrentModification { .. }),
        "{err}"
    );
    // What the refused write saw is now this session's floor: no loop on the stale replica.
    let (value, version) = p.other.get_with_version(b"c").await.unwrap().unwrap();
    assert_eq!((value.as_slice(), version), (&b"b"[..], 2));
    assert_eq!(
        p.other
            .put_with_version(b"c", b"x", Some(version))
            .await
            .unwrap(),
        3
    );
    assert_eq!(p.other.get_entry(b"c").await.unwrap().unwrap().value, b"x");

    // A write abandoned mid-flight: its position is unknown, so the session's next read takes
    // the primary's position first.
    // A session that has written nothing yet reads from the replica.
    let session = p.writer.new_session();
    // Hold the row so that the next write blocks on the server, then abandon that write.
    let locker = support::raw(&p.cluster.primary_url()).await;
    locker
        .batch_execute("BEGIN; SELECT * FROM causal.state_entries WHERE key = 'w' FOR UPDATE")
        .await
        .unwrap();
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), session.put(b"w", b"abandoned")).await;
    assert!(abandoned.is_err(), "the write was blocked");
    locker.batch_execute("COMMIT").await.unwrap();
    // The server runs the abandoned write once the lock is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let direct = support::raw(&p.cluster.primary_url()).await;
    loop {
        let row = direct
            .query_one(
                "SELECT value FROM causal.state_entries WHERE key = 'w'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, Vec<u8>>(0) == b"abandoned" {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned write never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        session.get(b"w").await.unwrap(),
        Some(b"abandoned".to_vec()),
        "a session that abandoned a write does not read from behind it"
    );
    let other_session = p.writer.new_session();
    p.in_rotation(&other_session).await;
    assert_eq!(
        other_session.get(b"w").await.unwrap(),
        Some(b"before".to_vec()),
        "other sessions still read the paused replica"
    );
    p.resume();
}

/// Read-your-writes covers the maintenance writes too: after `restore_checkpoint`,
/// `archive_old_data` and `restore_archived`, the session reads what they did, not the older
/// state of a replica whose replay is paused.
#[tokio::test]
async fn read_your_writes_covers_checkpoint_restore_and_archive() {
    let p = Paused::start().await;
    let w = &p.writer;
    w.put(b"kept", b"1").await.unwrap();
    let checkpoint = w.create_checkpoint("before").await.unwrap();
    w.put(b"experiment", b"x").await.unwrap();
    p.caught_up().await;
    p.in_rotation(w).await;
    p.pause();
    w.restore_checkpoint(checkpoint.id).await.unwrap();
    assert!(
        !w.contains(b"experiment").await.unwrap(),
        "the session reads the restored state"
    );
    p.resume();
    p.caught_up().await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    p.in_rotation(w).await;
    p.pause();
    assert_eq!(
        w.archive_old_data("archived", Duration::from_millis(200))
            .await
            .unwrap(),
        1
    );
    assert_eq!(w.get(b"kept").await.unwrap(), None, "archived away");
    p.resume();
    p.caught_up().await;

    p.in_rotation(w).await;
    p.pause();
    assert!(w.restore_archived("archived", b"kept").await.unwrap());
    assert_eq!(
        w.get(b"kept").await.unwrap(),
        Some(b"1".to_vec()),
        "restored"
    );
    p.resume();
}
