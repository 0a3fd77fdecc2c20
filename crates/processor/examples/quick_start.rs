//! The seed's quick start, runnable: `cargo run --example quick_start` (against
//! `$DATABASE_URL`, or a throwaway local PostgreSQL).

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let config = EnhancedPostgresConfig::new(url).with_schema("example_quick_start");
    let backend = EnhancedPostgresBackend::new(config).await?;

    backend.put(b"user:1", b"alice").await?;
    backend
        .put_with_metadata(b"user:2", b"bob", json!({"team": "blue"}))
        .await?;
    backend
        .put_with_ttl(b"session:9", b"token", Duration::from_secs(60))
        .await?;
    let value = backend.get(b"user:1").await?;
    println!("user:1 = {:?}", value.map(String::from_utf8));
    let blue = backend.query_by_metadata("team", &json!("blue")).await?;
    println!(
        "team blue: {:?}",
        blue.iter()
            .map(|e| String::from_utf8_lossy(&e.key))
            .collect::<Vec<_>>()
    );
    let stats = backend.get_stats();
    println!(
        "{} entries; {} puts, {} gets so far",
        backend.count().await?,
        stats.put_count,
        stats.get_count
    );
    backend.clear().await?;
    Ok(())
}
