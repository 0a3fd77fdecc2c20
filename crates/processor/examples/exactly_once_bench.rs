//! Figures of exactly-once processing: an epoch commit of 1 000 changed keys (p50, p99) and
//! a get under a claim after the first, against a plain get.
//! `cargo run --release --example exactly_once_bench` (`COMMITS` sets the number of timed
//! commits, default 500). The pipeline's rate is `--example word_count`'s.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, Output, SourceOffset, StateBackend,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (url, _cluster) = common::server()?;
    let config = EnhancedPostgresConfig::new(&url).with_schema("example_exactly_once_bench");
    let state = EnhancedPostgresBackend::new(config).await?;
    let commits: usize = std::env::var("COMMITS").map_or(Ok(500), |c| c.parse())?;
    let keys: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("key-{i:04}").into_bytes())
        .collect();

    let mut claim = state.claim("bench").await?;
    let mut times = Vec::with_capacity(commits);
    for round in 0..commits + 20 {
        for key in &keys {
            claim.put(key, format!("value-{round:08}").as_bytes())?;
        }
        let outputs = [Output::new("rounds", "bench", round.to_string())];
        let offsets = [SourceOffset::new("bench", 0, round as i64)];
        let start = Instant::now();
        claim.commit(&offsets, &outputs).await?;
        if round >= 20 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    println!(
        "epoch commit of 1000 changed keys: p50 {:?}, p99 {:?}, max {:?} ({} commits)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1],
        times.len()
    );

    // Every key is cached now (written under the claim).
    let rounds = 1_000_000;
    let start = Instant::now();
    let mut bytes = 0;
    for i in 0..rounds {
        bytes += claim
            .get(&keys[i % keys.len()])
            .await?
            .map_or(0, |v| v.len());
    }
    let cached = start.elapsed() / rounds as u32;
    let plain_rounds = 5_000;
    let start = Instant::now();
    for i in 0..plain_rounds {
        bytes += state
            .get(&keys[i % keys.len()])
            .await?
            .map_or(0, |v| v.len());
    }
    let plain = start.elapsed() / plain_rounds as u32;
    println!(
        "get under a claim after the first: {cached:?} per get; a plain get: {plain:?} \
         ({bytes} bytes read)"
    );
    let reader = state.outbox_reader("bench").await?;
    let delivered = reader.read(100).await?.len();
    println!("outbox rows readable: {delivered}");
    Ok(())
}
