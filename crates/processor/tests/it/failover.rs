//! Failover with pg_auto_failover: the backend, given the formation's multi-host URL, keeps
//! writing through the loss of the primary, and loses no acknowledged write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig, StateBackend,
};

use crate::support;

/// Writers running through the failover.
const WRITERS: usize = 8;
/// Acknowledged writes: key and when the acknowledgement came.
type Acked = Vec<(Vec<u8>, Instant)>;
/// Bounds every operation (and so how long one may hang on the dead primary).
const OP_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn writes_go_on_through_the_loss_of_the_primary_and_none_acknowledged_is_lost() {
    let _bulk = support::bulk().await;
    let mut formation = tokio::task::spawn_blocking(pgstate_testcluster::Formation::start)
        .await
        .unwrap()
        .expect("a pg_auto_failover formation (scripts/setup.sh installs it)");
    let cfg = EnhancedPostgresConfig::new(formation.uri())
        .with_schema(support::unique("failover"))
        .with_operation_timeout(OP_TIMEOUT)
        .with_pool_config(PostgresPoolConfig {
            min_connections: 1,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            ..PostgresPoolConfig::default()
        });
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();

    // Each writer writes keys of its own, one after the other; an acknowledged write is
    // recorded with its time.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (b, stop, acked, longest) = (
            b.clone_handle(),
            stop.clone(),
            acked.clone(),
            longest.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut failures = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}:{i:08}").into_bytes();
                let start = Instant::now();
                let result = b.put(&key, &key).await;
                let took = start.elapsed();
                {
                    let mut l = longest.lock().unwrap();
                    *l = (*l).max(took);
                }
                match result {
                    Ok(()) => acked.lock().unwrap().push((key, Instant::now())),
                    Err(e) => {
                        assert!(e.is_retryable(), "a failover error is retryable: {e}");
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                i += 1;
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "writes before the failover");

    let primary = formation.primary().unwrap();
    formation = tokio::task::spawn_blocking(move || {
        formation.kill_node(primary).unwrap();
        formation
    })
    .await
    .unwrap();
    // The old primary no longer accepts connections: a write acknowledged from now on was
    // made on the new one.
    let killed = Instant::now();
    // Writes resume once the secondary is promoted.
    let deadline = killed + Duration::from_secs(120);
    let resumed = loop {
        let first_after = acked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, at)| *at)
            .find(|at| *at > killed + Duration::from_millis(1));
        if let Some(at) = first_after {
            break at - killed;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let every writer succeed again for a while on the new primary.
    tokio::time::sleep(Duration::from_secs(2)).await;
    formation = tokio::task::spawn_blocking(move || {
        formation
            .wait_for(
                Duration::from_secs(60),
                "the other node to be primary",
                |f| f.primary().is_ok_and(|p| p != primary),
            )
            .unwrap();
        formation
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut failures = 0;
    for w in writers {
        failures += w.await.unwrap();
    }
    let states = formation.states().unwrap();
    eprintln!(
        "failover: writes resumed {:.1} s after the primary was stopped; {} writes acknowledged, \
         {failures} failed meanwhile; longest operation {:?}; states now {states:?}",
        resumed.as_secs_f64(),
        acked.lock().unwrap().len(),
        *longest.lock().unwrap()
    );
    assert_ne!(
        primary,
        formation.primary().unwrap(),
        "the other node is primary now"
    );
    // No operation waited past the operation timeout (plus the acquire timeout of its retry).
    assert!(*longest.lock().unwrap() <= OP_TIMEOUT + Duration::from_secs(6));
    // Every acknowledged write is on the new primary.
    let acked = acked.lock().unwrap().clone();
    for chunk in acked.chunks(5_000) {
        let keys: Vec<&[u8]> = chunk.iter().map(|(k, _)| k.as_slice()).collect();
        let values = b.get_many(&keys).await.unwrap();
        for ((key, _), value) in chunk.iter().zip(values) {
            assert_eq!(
                value.as_deref(),
                Some(key.as_slice()),
                "acknowledged write lost"
            );
        }
    }
}
