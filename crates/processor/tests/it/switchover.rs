//! A planned switchover with pg_auto_failover (`pg_autoctl perform switchover`) under load:
//! no acknowledged write is lost, a standby serves the reads and the old primary rejoins as a
//! standby. Then a crash of the new primary's Postgres (`pg_ctl stop -m immediate`): writes
//! resume, nothing acknowledged is lost. The formation is the one of `failover`: a primary and
//! two secondaries, `number_sync_standbys` 1.

use std::time::{Duration, Instant};

use crate::failover::{
    a_standby_serves_reads, blocking, commits_wait_for_a_standby, monitoring_says, nothing_lost,
    reads_reach_the_standby, running_load, setup, streams_as_a_standby, Setup,
};
use crate::support;
use pgstate_testcluster::Formation;

#[tokio::test]
async fn a_switchover_under_load_loses_no_acknowledged_write_and_reads_follow_the_standby() {
    let _bulk = support::bulk().await;
    let Setup {
        formation,
        schema,
        b,
        primary,
    } = setup("switchover").await;
    let load = running_load(&b).await;

    let started = Instant::now();
    let (formation, promoted) = blocking(formation, move |f| {
        f.switchover().unwrap();
        f.wait_for(Duration::from_secs(60), "the switchover to settle", |f| {
            f.settled() && f.primary().is_ok_and(|p| p != primary)
        })
        .unwrap();
        f.primary().unwrap()
    })
    .await;
    let switched = started.elapsed();
    streams_as_a_standby(&formation, primary, Duration::from_secs(60)).await;
    let reader = a_standby_serves_reads(&b, &formation, promoted, Duration::from_secs(60)).await;
    reads_reach_the_standby(&b).await;
    // Some writes on the new primary.
    let since = Instant::now();
    load.resumed_after(since).await;
    let pause = load.longest_pause_after(started);

    // Then the new primary's Postgres crashes (`pg_ctl stop -m immediate`): its pg_autoctl
    // restarts it (or the monitor fails over); writes resume either way.
    let (formation, crashed) = blocking(formation, move |f| {
        f.stop_postgres_immediately(promoted).unwrap();
        Instant::now()
    })
    .await;
    let after_crash = load.resumed_after(crashed).await;
    let (formation, now_primary) = blocking(formation, move |f| {
        f.wait_for(
            Duration::from_secs(60),
            "a primary and two secondaries",
            Formation::settled,
        )
        .unwrap();
        f.primary().unwrap()
    })
    .await;
    let outcome = load.finish().await;
    commits_wait_for_a_standby(&formation, now_primary).await;
    monitoring_says(&b, &formation, now_primary).await;
    let status = b.check_replication_status().await.unwrap();
    assert!(
        status.primary_changes >= 1,
        "the switchover seen: {status:?}"
    );

    eprintln!(
        "switchover: node {primary} to node {promoted}, done in {:.1} s; longest pause between \
         acknowledged writes {:.1} s; reads from node {reader}; after an immediate stop of the \
         new primary's Postgres writes resumed in {:.1} s (primary now node {now_primary}); {} \
         writes acknowledged, {} reads, {} operations failed meanwhile; longest operation {:?}",
        switched.as_secs_f64(),
        pause.as_secs_f64(),
        after_crash.as_secs_f64(),
        outcome.acked.len(),
        outcome.reads,
        outcome.failures,
        outcome.longest
    );
    // The monitor's events, shown with the test's output when it fails (or with --nocapture).
    eprintln!("{}", formation.events().unwrap_or_else(|e| e.to_string()));
    nothing_lost(&formation, &schema, &outcome).await;
}
