//! The outbox of exactly-once processing from a sink's side: outputs of concurrent commits
//! read in commit order, acknowledgements that survive a restart, acknowledging inside the
//! sink's own transaction (once, even with two instances of one sink), pruning.

use std::sync::Arc;

use processor::state::{EnhancedPostgresBackend, ErrorKind, IsolationLevel, Output, StateBackend};

use crate::support;

/// Outputs of concurrent commits are read in commit order: a reader never sees a position
/// before every lower one is visible, and acknowledgements survive a restart.
#[tokio::test]
async fn the_outbox_is_read_in_commit_order_and_acknowledged() {
    let config = support::config("eo_outbox");
    let state = Arc::new(EnhancedPostgresBackend::new(config.clone()).await.unwrap());
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let state = state.clone();
            tokio::spawn(async move {
                let mut claim = state.claim(format!("op{w}")).await.unwrap();
                for i in 0..25 {
                    claim.put(format!("w{w}").as_bytes(), &[i]).unwrap();
                    let outs: Vec<Output> = (0..3)
                        .map(|j| Output::new("t", format!("{w}/{i}/{j}"), "p"))
                        .collect();
                    claim.commit(&[], &outs).await.unwrap();
                }
            })
        })
        .collect();
    let mut reader = state.outbox_reader("sink").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let page = reader.read(7).await.unwrap();
        for (i, r) in page.iter().enumerate() {
            assert_eq!(r.position, reader.acknowledged() + 1 + i as i64, "a gap");
        }
        if let Some(last) = page.last() {
            reader.acknowledge(last.position).await.unwrap();
        }
        seen.extend(page.into_iter().map(|r| String::from_utf8(r.key).unwrap()));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Each writer's outputs in its own commit order, all exactly once.
    for w in 0..4 {
        let mine: Vec<&String> = seen
            .iter()
            .filter(|k| k.starts_with(&format!("{w}/")))
            .collect();
        let expected: Vec<String> = (0..25)
            .flat_map(|i| (0..3).map(move |j| format!("{w}/{i}/{j}")))
            .collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
    // A restarted reader goes on from its acknowledgement; a lower one changes nothing.
    let mut again = state.outbox_reader("sink").await.unwrap();
    assert_eq!(again.acknowledged(), 300);
    again.acknowledge(10).await.unwrap();
    assert_eq!(again.acknowledged(), 300);
    assert!(again.read(10).await.unwrap().is_empty());

    // Acknowledging inside a transaction of the sink's own: rolled back, it did not happen.
    let mut late = state.outbox_reader("late").await.unwrap();
    let begin = || state.begin_transaction(IsolationLevel::ReadCommitted);
    let mut tx = begin().await.unwrap();
    late.acknowledge_in(&mut tx, 0, 100).await.unwrap();
    tx.put(b"sink-effect", b"1").await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(late.refresh().await.unwrap(), 0);
    // Two instances of one sink read the same batch: the second to acknowledge is refused,
    // so the batch takes effect once.
    let twin = state.outbox_reader("late").await.unwrap();
    let mut first = begin().await.unwrap();
    let mut second = begin().await.unwrap();
    first.put(b"sink-effect", b"first").await.unwrap();
    late.acknowledge_in(&mut first, 0, 100).await.unwrap();
    second.put(b"sink-effect-2", b"second").await.unwrap();
    let racing = tokio::spawn(async move {
        let r = twin.acknowledge_in(&mut second, 0, 100).await;
        (r, second)
    });
    first.commit().await.unwrap();
    let (r, second) = racing.await.unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    second.rollback().await.unwrap();
    assert_eq!(state.get(b"sink-effect-2").await.unwrap(), None);
    assert_eq!(late.refresh().await.unwrap(), 100);
    let mut tx = begin().await.unwrap();
    let e = late.acknowledge_in(&mut tx, 0, 150).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Conflict,
        "a batch read after 0 is stale: {e}"
    );
    late.acknowledge_in(&mut tx, 100, 150).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(late.refresh().await.unwrap(), 150);
    // Pruning drops what every reader acknowledged.
    assert_eq!(state.prune_outbox().await.unwrap(), 150);
    assert_eq!(late.read(1000).await.unwrap().len(), 150);
}
