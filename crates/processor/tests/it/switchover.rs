//! A planned switchover with pg_auto_failover (`pg_autoctl perform switchover`) under load:
//! no acknowledged write is lost, and reads go to the new standby (the old primary). Then a
//! crash of the new primary's Postgres (`pg_ctl stop -m immediate`): writes resume, nothing
//! acknowledged is lost.

use std::time::{Duration, Instant};

use crate::failover::{
    blocking, monitoring_says, nothing_lost, reads_reach_the_standby, running_load, setup,
    standby_serves_reads, Setup,
};
use crate::support;

#[tokio::test]
async fn a_switchover_under_load_loses_no_acknowledged_write_and_reads_follow_the_standby() {
    let _bulk = support::bulk().await;
    let Setup {
        formation,
        schema,
        b,
        primary,
        standby,
    } = setup("switchover").await;
    let load = running_load(&b).await;

    let started = Instant::now();
    let (formation, ()) = blocking(formation, move |f| {
        f.switchover().unwrap();
        f.wait_for(Duration::from_secs(60), "the roles to swap", |f| {
            f.primary().is_ok_and(|p| p == standby)
                && f.states()
                    .is_ok_and(|s| s.iter().filter(|s| *s == "secondary").count() == 1)
        })
        .unwrap();
    })
    .await;
    let switched = started.elapsed();
    standby_serves_reads(&b, &formation, primary, Duration::from_secs(60)).await;
    reads_reach_the_standby(&b).await;
    // Some writes on the new primary.
    let since = Instant::now();
    load.resumed_after(since).await;
    let pause = load.longest_pause_after(started);

    // Then the new primary's Postgres crashes (`pg_ctl stop -m immediate`): its pg_autoctl
    // restarts it (or the monitor fails over); writes resume either way.
    let (formation, crashed) = blocking(formation, move |f| {
        f.stop_postgres_immediately(standby).unwrap();
        Instant::now()
    })
    .await;
    let after_crash = load.resumed_after(crashed).await;
    let (formation, now_primary) = blocking(formation, move |f| {
        f.wait_for(Duration::from_secs(60), "a primary and a secondary", |f| {
            f.primary().is_ok()
                && f.states()
                    .is_ok_and(|s| s.iter().filter(|s| *s == "secondary").count() == 1)
        })
        .unwrap();
        f.primary().unwrap()
    })
    .await;
    let outcome = load.finish().await;
    monitoring_says(&b, &formation, now_primary).await;
    let status = b.check_replication_status().await.unwrap();
    assert!(
        status.primary_changes >= 1,
        "the switchover seen: {status:?}"
    );

    eprintln!(
        "switchover: done in {:.1} s; longest pause between acknowledged writes {:.1} s; after \
         an immediate stop of the new primary's Postgres writes resumed in {:.1} s (primary now \
         node {now_primary}); {} writes acknowledged, {} reads, {} operations failed meanwhile; \
         longest operation {:?}",
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
