//! Leader election with fencing: two instances campaign for one role; the leader's writes go
//! through `tx.check_fence(&fence)`, so once it has lost the role (here it resigns, as a
//! paused or partitioned leader would lose its lease) its late write is refused, whatever it
//! still believes. `cargo run --example leader_fencing`.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, StateBackend, StateError,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let config = EnhancedPostgresConfig::new(url).with_schema("example_leader");
    let first = EnhancedPostgresBackend::new(config.clone()).await?;
    let second = EnhancedPostgresBackend::new(config).await?;
    let ttl = Duration::from_secs(5);

    let leadership = first.campaign("compactor", ttl).await?;
    let fence = leadership.fence();
    println!("first leads, term {}", leadership.term());
    // A write as the leader: checked against the fence in the same transaction.
    let mut tx = first
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await?;
    tx.check_fence(&fence).await?;
    tx.put(b"compaction:offset", b"100").await?;
    tx.commit().await?;

    // The first instance loses the role; the second takes it with a higher term.
    leadership.resign().await?;
    let next = second.campaign("compactor", ttl).await?;
    println!("second leads, term {}", next.term());

    // The old leader's late write is refused by its stale fence.
    let mut tx = first
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await?;
    match tx.check_fence(&fence).await {
        Err(StateError::Fenced { .. }) => println!("the old leader's write was refused (fenced)"),
        other => anyhow::bail!("a stale fence passed: {other:?}"),
    }
    drop(tx);
    println!(
        "offset = {:?}",
        second
            .get(b"compaction:offset")
            .await?
            .map(String::from_utf8)
    );
    next.resign().await?;
    second.clear().await?;
    Ok(())
}
