//! Exactly-once processing from the user's side: claims and epochs, fencing of a replaced
//! claim, epoch commits of state with source offsets and outputs, recovery, commits dropped
//! at any point, the owned-key cache and the outbox.

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, ErrorKind, Operator, Output, SourceOffset, StateBackend, StateError,
};

use crate::support;

async fn pair(tag: &str) -> (EnhancedPostgresBackend, EnhancedPostgresBackend) {
    let config = support::config(tag);
    let a = EnhancedPostgresBackend::new(config.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(config).await.unwrap();
    (a, b)
}

fn fenced<T: std::fmt::Debug>(r: Result<T, StateError>, epoch: i64) {
    match r {
        Err(StateError::EpochFenced { epoch: e, .. }) => assert_eq!(e, epoch),
        other => panic!("expected EpochFenced for epoch {epoch}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_commit_lands_whole_and_a_new_claim_recovers_from_it() {
    let (a, b) = pair("eo_recover").await;
    let mut claim = a.claim("counter").await.unwrap();
    assert_eq!(claim.epoch(), 1);
    assert!(claim.recovery().offsets.is_empty());
    claim.put(b"k1", b"one").unwrap();
    claim
        .put_with_metadata(b"k2", b"two", serde_json::json!({"tag": "x"}))
        .unwrap();
    claim.delete(b"k3").unwrap();
    // Buffered: visible under the claim, not outside it.
    assert_eq!(claim.get(b"k1").await.unwrap(), Some(b"one".to_vec()));
    assert_eq!(claim.get(b"k3").await.unwrap(), None);
    assert_eq!(a.get(b"k1").await.unwrap(), None);
    let offsets = [
        SourceOffset::new("words", 0, 41),
        SourceOffset::new("words", 0, 42),
    ];
    let outputs = [
        Output::new("counts", "k1", "1"),
        Output::new("counts", "k2", "2"),
    ];
    let done = claim.commit(&offsets, &outputs).await.unwrap();
    assert_eq!(done.number, 1);
    assert_eq!(done.outbox, Some(1..=2));
    assert_eq!(claim.pending(), 0);
    assert_eq!(claim.offset("words", 0), Some(42));
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"one".to_vec()));
    let entry = b.get_entry(b"k2").await.unwrap().unwrap();
    assert_eq!(entry.metadata, serde_json::json!({"tag": "x"}));

    // An empty commit is a fence check and still counts.
    assert_eq!(claim.commit(&[], &[]).await.unwrap().number, 2);

    let again = b.claim("counter").await.unwrap();
    assert_eq!(again.epoch(), 2);
    let r = again.recovery();
    assert_eq!(r.offset("words", 0), Some(42), "the last offset given wins");
    assert_eq!(r.previous.len(), 1);
    assert_eq!((r.previous[0].epoch, r.previous[0].commits), (1, 2));
    assert_eq!(r.previous[0].key_groups, 0..=u32::MAX);
    assert!(r.previous[0].last_commit_at.is_some());
    // The first claim is fenced now: its commit applies nothing.
    claim.put(b"k1", b"zombie").unwrap();
    fenced(
        claim
            .commit(
                &[SourceOffset::new("words", 0, 99)],
                &[Output::new("counts", "z", "z")],
            )
            .await,
        1,
    );
    assert_eq!(b.get(b"k1").await.unwrap(), Some(b"one".to_vec()));
    // Dead from then on, for reads and writes too.
    fenced(claim.put(b"k", b"v"), 1);
    fenced(claim.get(b"k1").await, 1);
    let third = a.claim("counter").await.unwrap();
    assert_eq!(third.recovery().offset("words", 0), Some(42));
    let mut reader = a.outbox_reader("sink").await.unwrap();
    let out = reader.read(100).await.unwrap();
    assert_eq!(
        out.len(),
        2,
        "the fenced commit's output is not there: {out:?}"
    );
    reader.acknowledge(2).await.unwrap();
}

#[tokio::test]
async fn key_group_claims_fence_only_what_they_overlap() {
    let (a, b) = pair("eo_groups").await;
    let mut low = a
        .claim(Operator::new("wc").key_groups(0..=63))
        .await
        .unwrap();
    let mut high = b
        .claim(Operator::new("wc").key_groups(64..=127))
        .await
        .unwrap();
    assert!(high.epoch() > low.epoch());
    low.put(b"low", b"1").unwrap();
    high.put(b"high", b"1").unwrap();
    low.commit(&[SourceOffset::new("in", 0, 10)], &[])
        .await
        .unwrap();
    high.commit(&[SourceOffset::new("in", 1, 20)], &[])
        .await
        .unwrap();
    // Rescaling to one instance owning both ranges fences both.
    let all = a
        .claim(Operator::new("wc").key_groups(0..=127))
        .await
        .unwrap();
    let r = all.recovery();
    assert_eq!((r.offset("in", 0), r.offset("in", 1)), (Some(10), Some(20)));
    let epochs: Vec<i64> = r.previous.iter().map(|p| p.epoch).collect();
    assert_eq!(epochs, vec![low.epoch(), high.epoch()]);
    fenced(low.commit(&[], &[]).await, low.epoch());
    fenced(high.commit(&[], &[]).await, high.epoch());
    // Another operator is untouched.
    let mut other = b.claim("other").await.unwrap();
    assert_eq!(other.epoch(), 1);
    other.commit(&[], &[]).await.unwrap();
}

/// A commit future dropped at any point: the claim is unsure from then on, and the next
/// claim's recovery says whether it landed; state, offsets and outbox agree with that.
#[tokio::test]
async fn a_commit_dropped_anywhere_is_settled_by_the_next_claim() {
    let (a, b) = pair("eo_drop").await;
    let mut landed = 0;
    let mut lost = 0;
    for step in 0..=40u64 {
        let mut claim = a.claim("op").await.unwrap();
        let base = claim.recovery().offset("s", 0).unwrap_or(0);
        for i in 0..50 {
            claim
                .put(format!("k{i}").as_bytes(), &step.to_be_bytes())
                .unwrap();
        }
        let offsets = [SourceOffset::new("s", 0, base + 1)];
        let outputs = [Output::new("t", step.to_string(), "x")];
        // From at once to a few milliseconds: before BEGIN, between statements, around
        // COMMIT, or not at all.
        // The last one is not dropped.
        let delay = Duration::from_micros(if step == 40 {
            60_000_000
        } else {
            step * step * 10
        });
        let r = tokio::time::timeout(delay, claim.commit(&offsets, &outputs)).await;
        let done = match r {
            Ok(result) => result.map(|_| true).unwrap(),
            Err(_) => {
                let e = claim.put(b"k", b"v").unwrap_err();
                assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
                false
            }
        };
        let next = b.claim("op").await.unwrap();
        let prev = &next.recovery().previous[0];
        assert_eq!(prev.epoch, claim.epoch());
        let committed = prev.commits == 1;
        if done {
            assert!(committed);
        }
        let offset = next.recovery().offset("s", 0).unwrap_or(0);
        assert_eq!(offset, base + u64::from(committed) as i64);
        let value = b.get(b"k0").await.unwrap();
        if committed {
            assert_eq!(value, Some(step.to_be_bytes().to_vec()));
            landed += 1;
        } else {
            assert_ne!(value, Some(step.to_be_bytes().to_vec()));
            lost += 1;
        }
        drop(next);
    }
    // Every landed commit put one output; none of the others did.
    let reader = a.outbox_reader("check").await.unwrap();
    let out = reader.read(1000).await.unwrap();
    assert_eq!(out.len(), landed, "{landed} landed, {lost} did not");
    let positions: Vec<i64> = out.iter().map(|o| o.position).collect();
    assert_eq!(positions, (1..=landed as i64).collect::<Vec<_>>());
    // The first was dropped before anything could be sent; the last ran to its end.
    assert!(landed > 0 && lost > 0, "{landed} landed, {lost} did not");
}

#[tokio::test]
async fn repeated_gets_under_a_claim_cost_no_round_trip() {
    let (a, b) = pair("eo_cache").await;
    b.put(b"known", b"v").await.unwrap();
    b.put_with_ttl(b"short", b"v", Duration::from_secs(60))
        .await
        .unwrap();
    let mut claim = a
        .claim(Operator::new("c").cache_capacity(1 << 20))
        .await
        .unwrap();
    let gets = || a.get_stats().get_count;
    let before = gets();
    let keys: [&[u8]; 3] = [b"known", b"missing", b"short"];
    let first = claim.get_many(&keys).await.unwrap();
    assert_eq!(first, vec![Some(b"v".to_vec()), None, Some(b"v".to_vec())]);
    let after_first = gets();
    assert!(after_first > before);
    for _ in 0..100 {
        assert_eq!(claim.get(b"known").await.unwrap(), Some(b"v".to_vec()));
        assert_eq!(claim.get(b"missing").await.unwrap(), None);
    }
    assert_eq!(gets(), after_first, "cached values and absences");
    // An entry with a TTL is read from the server each time (its expiry is the server's).
    claim.get(b"short").await.unwrap();
    assert_eq!(gets(), after_first + 1);
    // Committed writes go into the cache.
    claim.put(b"new", b"n").unwrap();
    claim.delete(b"known").unwrap();
    claim.commit(&[], &[]).await.unwrap();
    assert_eq!(claim.get(b"new").await.unwrap(), Some(b"n".to_vec()));
    assert_eq!(claim.get(b"known").await.unwrap(), None);
    assert_eq!(gets(), after_first + 1);
    assert_eq!(b.get(b"known").await.unwrap(), None);
    // A cache of nothing reads every time.
    let mut off = b.claim(Operator::new("c").cache_capacity(0)).await.unwrap();
    let n = b.get_stats().get_count;
    off.get(b"new").await.unwrap();
    off.get(b"new").await.unwrap();
    assert_eq!(b.get_stats().get_count, n + 2);
}

#[tokio::test]
async fn buffered_ttls_count_from_the_commit_on_the_server_clock() {
    let (a, b) = pair("eo_ttl").await;
    let mut claim = a.claim("t").await.unwrap();
    claim
        .put_with_ttl(b"brief", b"v", Duration::from_millis(800))
        .unwrap();
    claim
        .put_entry(
            b"long",
            b"v",
            Some(serde_json::json!({"a": 1})),
            Some(Duration::from_secs(3600)),
        )
        .unwrap();
    // Past the TTL counted from the put, but the server counts from the commit.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        claim.get(b"brief").await.unwrap(),
        None,
        "expired under the claim"
    );
    claim.commit(&[], &[]).await.unwrap();
    assert_eq!(b.get(b"brief").await.unwrap(), Some(b"v".to_vec()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.get(b"brief").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(claim.get(b"brief").await.unwrap(), None);
    assert_eq!(claim.get(b"long").await.unwrap(), Some(b"v".to_vec()));
}

#[tokio::test]
async fn bad_input_is_refused_with_nothing_written() {
    let (a, b) = pair("eo_bad").await;
    for op in [Operator::new(""), Operator::new("a\0b")] {
        let e = a.claim(op).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    #[allow(clippy::reversed_empty_ranges)]
    let e = a
        .claim(Operator::new("x").key_groups(9..=3))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let mut claim = a.claim("ok").await.unwrap();
    assert_eq!(
        claim.put(b"", b"v").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        claim
            .put_with_metadata(b"k", b"v", serde_json::json!([1]))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(claim.pending(), 0);
    claim.put(b"k", b"v").unwrap();
    let e = claim
        .commit(&[SourceOffset::new("bad\0name", 0, 1)], &[])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = claim
        .commit(&[], &[Output::new("t", vec![0u8; 3000], "p")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("output 0"), "{e}");
    // Nothing was sent: the claim is usable and nothing landed.
    assert_eq!(b.get(b"k").await.unwrap(), None);
    assert_eq!(claim.commit(&[], &[]).await.unwrap().number, 1);
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    let mut reader = a.outbox_reader("r").await.unwrap();
    let e = reader.acknowledge(5).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(
        reader.read(0).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert!(a.outbox_reader("").await.is_err());
}

/// Epoch commits on hash-, list- and time-partitioned tables: puts, deletes and versions as
/// on a plain table (the time-partitioned one moves a row written in an ended window into
/// the current one).
#[tokio::test]
async fn epoch_commits_work_on_partitioned_tables() {
    use processor::state::PartitionStrategy;
    let layouts = [
        PartitionStrategy::Hash { partitions: 4 },
        PartitionStrategy::List {
            prefixes: vec!["a".into(), "b".into()],
        },
        PartitionStrategy::TimeRange {
            interval: Duration::from_secs(1),
            premake: 2,
        },
    ];
    for (i, layout) in layouts.into_iter().enumerate() {
        let config = support::config(&format!("eo_part{i}")).with_partitioning(layout.clone());
        let state = EnhancedPostgresBackend::new(config).await.unwrap();
        state.put(b"a-old", b"0").await.unwrap();
        let before = state.get_entry(b"a-old").await.unwrap().unwrap().version;
        // On the time-partitioned table the entry's window has ended by the commit.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut claim = state.claim("p").await.unwrap();
        for round in 0..3u8 {
            claim.put(b"a-old", &[round]).unwrap();
            claim.put(format!("b-{round}").as_bytes(), b"x").unwrap();
            if round == 2 {
                claim.delete(b"b-0").unwrap();
            }
            claim
                .commit(&[SourceOffset::new("s", 0, round.into())], &[])
                .await
                .unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        }
        let entry = state.get_entry(b"a-old").await.unwrap().unwrap();
        assert_eq!(entry.value, vec![2], "{layout:?}");
        assert_eq!(entry.version, before + 3, "{layout:?}");
        assert_eq!(state.get(b"b-0").await.unwrap(), None, "{layout:?}");
        assert_eq!(state.count().await.unwrap(), 3, "{layout:?}");
        let again = state.claim("p").await.unwrap();
        assert_eq!(again.recovery().offset("s", 0), Some(2));
    }
}

/// A COMMIT whose answer does not come within the operation timeout (here a deferred
/// trigger makes it take 3 s): `CommitOutcomeUnknown`, the claim refuses to go on, and the
/// next claim's recovery says whether it landed, in agreement with state, offsets and outbox.
#[tokio::test]
async fn a_lost_commit_is_settled_by_the_next_claim() {
    let schema = support::unique("eo_lost");
    let config = |timeout| {
        processor::state::EnhancedPostgresConfig::new(support::url())
            .with_schema(&schema)
            .with_pool_config(support::small_pool())
            .with_operation_timeout(Duration::from_secs(timeout))
    };
    let a = EnhancedPostgresBackend::new(config(1)).await.unwrap();
    let b = EnhancedPostgresBackend::new(config(30)).await.unwrap();
    support::raw(&support::url())
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {schema}.state_outbox \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.slow()"
        ))
        .await
        .unwrap();
    let mut claim = a.claim("op").await.unwrap();
    claim.put(b"k", b"v").unwrap();
    let e = claim
        .commit(
            &[SourceOffset::new("s", 0, 7)],
            &[Output::new("t", "k", "v")],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::CommitOutcomeUnknown(_)), "{e}");
    let e = claim.put(b"k", b"w").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
    assert!(e.to_string().contains("commit 1"), "{e}");

    let next = b.claim("op").await.unwrap();
    let prev = &next.recovery().previous[0];
    assert_eq!(prev.epoch, claim.epoch());
    let landed = match prev.commits {
        0 => false,
        1 => true,
        n => panic!("{n} commits"),
    };
    assert_eq!(next.recovery().offset("s", 0), landed.then_some(7));
    assert_eq!(b.get(b"k").await.unwrap(), landed.then(|| b"v".to_vec()));
    let out = b.outbox_reader("r").await.unwrap().read(10).await.unwrap();
    assert_eq!(out.len(), usize::from(landed));
}

/// A commit acknowledged to the claim and then lost (as after a failover to a standby that
/// had not received it; simulated by taking the commit back in the database): the next
/// commit is refused and the claim is unsure, instead of building on the lost one.
#[tokio::test]
async fn a_commit_lost_after_it_was_acknowledged_stops_the_claim() {
    let (a, b) = pair("eo_regress").await;
    let mut claim = a.claim("op").await.unwrap();
    claim.put(b"k", b"1").unwrap();
    claim
        .commit(&[SourceOffset::new("s", 0, 1)], &[])
        .await
        .unwrap();
    let schema = a.table().split('.').next().unwrap().to_string();
    support::raw(&support::url())
        .await
        .batch_execute(&format!(
            "UPDATE {schema}.state_claims SET commits = commits - 1; \
             UPDATE {schema}.state_source_offsets SET \"offset\" = 0"
        ))
        .await
        .unwrap();
    claim.put(b"k", b"2").unwrap();
    let e = claim
        .commit(&[SourceOffset::new("s", 0, 2)], &[])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
    assert!(e.to_string().contains("was lost"), "{e}");
    assert_eq!(
        b.get(b"k").await.unwrap(),
        Some(b"1".to_vec()),
        "nothing applied"
    );
    assert_eq!(
        claim.put(b"k", b"3").unwrap_err().kind(),
        ErrorKind::OutcomeUnknown
    );
    let next = b.claim("op").await.unwrap();
    assert_eq!(next.recovery().offset("s", 0), Some(0));
}

/// An instance that holds its claim row and never lets go (paused in the middle of sending
/// a commit, where the server's idle timeout does not apply; here a session with that
/// timeout off): a new claim ends its session after half the operation timeout and goes on.
#[tokio::test]
async fn a_claim_ends_a_commit_that_holds_its_row_past_the_grace_period() {
    let schema = support::unique("eo_stuck");
    let config = processor::state::EnhancedPostgresConfig::new(support::url())
        .with_schema(&schema)
        .with_pool_config(support::small_pool())
        .with_operation_timeout(Duration::from_secs(4));
    let a = EnhancedPostgresBackend::new(config.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(config).await.unwrap();
    let mut old = a.claim("op").await.unwrap();
    old.commit(&[SourceOffset::new("s", 0, 5)], &[])
        .await
        .unwrap();
    let stuck = support::raw(&support::url()).await;
    stuck
        .batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = 0; BEGIN; \
             UPDATE {schema}.state_claims SET commits = commits WHERE operator = 'op'"
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let new = b.claim("op").await.unwrap();
    assert_eq!(new.recovery().offset("s", 0), Some(5));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited the grace period first"
    );
    let e = stuck.batch_execute("SELECT 1").await.unwrap_err();
    assert!(stuck.is_closed() || e.as_db_error().is_some(), "{e}");
    fenced(old.commit(&[], &[]).await, old.epoch());
}

/// Many outputs and deletes in one commit go in several statements, and every position is
/// used once.
#[tokio::test]
async fn a_large_commit_is_chunked() {
    let (a, b) = pair("eo_large").await;
    let mut claim = a.claim("op").await.unwrap();
    let n = 12_000;
    for i in 0..n {
        claim.put(format!("k{i:05}").as_bytes(), b"v").unwrap();
    }
    claim.commit(&[], &[]).await.unwrap();
    for i in 0..n {
        claim.delete(format!("k{i:05}").as_bytes()).unwrap();
    }
    let outputs: Vec<Output> = (0..n)
        .map(|i| Output::new("t", format!("{i}"), "p"))
        .collect();
    let done = claim.commit(&[], &outputs).await.unwrap();
    assert_eq!(done.outbox, Some(1..=n as i64));
    assert_eq!(b.count().await.unwrap(), 0);
    let reader = b.outbox_reader("r").await.unwrap();
    let out = reader.read(100_000).await.unwrap();
    let keys: Vec<String> = out
        .iter()
        .map(|o| String::from_utf8(o.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    let positions: Vec<i64> = out.iter().map(|o| o.position).collect();
    assert_eq!(positions, (1..=n as i64).collect::<Vec<_>>());
}
