//! Unit tests of read routing (`Router::pick`): replicas built on pools that never connect.

use super::*;
use crate::state::config::connspec::ConnectionSpec;
use crate::state::config::enhanced::PostgresPoolConfig;
use crate::state::ident::Ident;
use crate::state::schema::names::TableNames;
use crate::state::wire::connection::Connector;

/// A replica whose pool never connects (lazy, no idle minimum; its URL is a closed
/// loopback port): `pick` reads only the replica's recorded state.
async fn replica(name: &str) -> Replica {
    let spec = ConnectionSpec::parse("postgresql://u@127.0.0.1:1/db?sslmode=disable").unwrap();
    let connector = Connector::new(&spec, Duration::from_secs(1), None, "test").unwrap();
    let names = TableNames::new(
        Ident::new("schema", "s").unwrap(),
        Ident::new_table("t").unwrap(),
    );
    let cfg = PostgresPoolConfig {
        min_connections: 0,
        ..PostgresPoolConfig::default()
    };
    let pool = ConnPool::new(connector, names, &cfg, true, Duration::from_secs(1))
        .await
        .unwrap();
    Replica::new(pool, name.to_string(), true, false)
}

async fn router(replicas: usize, failover: bool, max_lag_ms: u64) -> Router {
    let mut all = Vec::new();
    for i in 0..replicas {
        all.push(replica(&format!("r{i}")).await);
    }
    let settings = PostgresReplicaConfig {
        replica_urls: Vec::new(),
        enable_read_splitting: true,
        max_replication_lag_ms: max_lag_ms,
        health_check_interval: Duration::from_secs(60),
        enable_auto_failover: failover,
    };
    Router::new(all, settings, true)
}

fn healthy(r: &Replica, lag_ms: u64) {
    r.healthy.store(true, Relaxed);
    r.lag_ms.store(lag_ms, Relaxed);
}

fn picked(t: StateResult<ReadTarget<'_>>) -> Option<(usize, bool)> {
    match t.unwrap() {
        ReadTarget::Primary => None,
        ReadTarget::Replica { index, verify, .. } => Some((index, verify)),
    }
}

#[tokio::test]
async fn reads_go_round_robin_over_qualifying_replicas_only() {
    let r = router(3, true, 100).await;
    // Nothing checked yet: every replica is out of rotation, failover reads the primary.
    assert_eq!(picked(r.pick(&[], false, 0)), None);
    assert_eq!(r.failovers(), 1);
    healthy(&r.replicas[0], 10);
    healthy(&r.replicas[1], 500); // too far behind
    healthy(&r.replicas[2], 0);
    let mut seen: Vec<usize> = (0..4)
        .map(|_| picked(r.pick(&[], false, 0)).unwrap().0)
        .collect();
    seen.sort();
    assert_eq!(seen, [0, 0, 2, 2], "round robin over the two that qualify");
    // A replica already tried for this read is skipped.
    for _ in 0..3 {
        assert_eq!(picked(r.pick(&[0], false, 0)), Some((2, false)));
    }
    // Forced to the primary (a handle reading from the primary only).
    assert_eq!(picked(r.pick(&[], true, 0)), None);
}

#[tokio::test]
async fn a_floor_prefers_replicas_known_to_have_replayed_it() {
    let r = router(2, true, 100).await;
    healthy(&r.replicas[0], 0);
    healthy(&r.replicas[1], 0);
    // Neither is known to have replayed position 100: any, to verify in the round trip.
    let (_, verify) = picked(r.pick(&[], false, 100)).unwrap();
    assert!(verify);
    // Replica 1 reported a replay position past it: it alone, without a check.
    assert!(r.learned(1, 150, 100));
    for _ in 0..3 {
        assert_eq!(picked(r.pick(&[], false, 100)), Some((1, false)));
    }
    // A position learned below the floor does not count.
    assert!(!r.learned(0, 50, 100));
    assert_eq!(picked(r.pick(&[1], false, 100)), Some((0, true)));
}

#[tokio::test]
async fn without_failover_no_qualifying_replica_is_a_clear_error() {
    let r = router(1, false, 100).await;
    let e = match r.pick(&[], false, 0) {
        Err(e) => e,
        Ok(_) => panic!("an unchecked replica served a read"),
    };
    assert_eq!(e.kind(), crate::state::error::ErrorKind::Connection);
    assert!(e.to_string().contains("auto-failover is off"), "{e}");
    healthy(&r.replicas[0], 0);
    assert_eq!(picked(r.pick(&[], false, 0)), Some((0, false)));
    // Tried already, and nothing else qualifies.
    assert!(r.pick(&[0], false, 0).is_err());
}
