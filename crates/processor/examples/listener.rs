//! LISTEN/NOTIFY between two handles: a listener on a channel, notifications sent by the
//! backend and from inside a transaction (delivered on commit only).
//! `cargo run --example listener`.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, PostgresListener,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let backend = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone()).with_schema("example_listener"),
    )
    .await?;
    let mut listener = PostgresListener::new(&url, "state_changes").await?;

    backend
        .notify("state_changes", "key user:1 changed")
        .await?;
    let mut tx = backend
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await?;
    tx.notify("state_changes", "sent on commit").await?;
    tx.commit().await?;

    for _ in 0..2 {
        let payload = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await??;
        println!("received: {payload}");
    }
    Ok(())
}
