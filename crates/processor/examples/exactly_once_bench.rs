//! Figures of exactly-once processing: an epoch commit of 1 000 changed keys (p50, p99),
//! beside pgbench running one transaction that upserts the same 1 000 rows (generated on the
//! server, so it sends nothing per row) on a throwaway server; and a get under a claim after
//! the first, against a plain get.
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
    if let Some(cluster) = &_cluster {
        let (p50, p99) = pgbench_upsert(cluster, state.table())?;
        println!(
            "pgbench, BEGIN + one upsert of the same 1000 rows + COMMIT: p50 {p50:?}, p99 {p99:?}; \
             epoch commit p50 / pgbench p50 = {:.2}",
            percentile(&times, 0.5).as_secs_f64() / p50.as_secs_f64()
        );
    }
    Ok(())
}

/// pgbench (one client, 10 s) running BEGIN, one upsert of the 1000 keys, COMMIT on
/// `table`: its p50 and p99 from its per-transaction log.
fn pgbench_upsert(
    cluster: &pgstate_testcluster::Cluster,
    table: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let dir = cluster.dir().join("pgbench_epoch");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let script = format!(
        "\\set round random(1, 1000000000)\n\
         BEGIN;\n\
         INSERT INTO {table} AS e (key, value) \
         SELECT convert_to('key-' || lpad(g::text, 4, '0'), 'UTF8'), \
                convert_to('value-' || :round, 'UTF8') FROM generate_series(0, 999) g \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, metadata = EXCLUDED.metadata, \
         expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, version = e.version + 1;\n\
         COMMIT;\n"
    );
    std::fs::write(dir.join("script.sql"), script)?;
    let out = std::process::Command::new(cluster.bindir().join("pgbench"))
        .env("PGPASSWORD", pgstate_testcluster::PASSWORD)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.nodes()[0].port.to_string(),
        ])
        .args(["-U", "postgres", "-n", "-c", "1", "-T", "10", "--log"])
        .arg(format!("--log-prefix={}", dir.join("log").display()))
        .args(["-f", "script.sql", "postgres"])
        .current_dir(&dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lat = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("log.") {
            for line in std::fs::read_to_string(entry.path())?.lines() {
                if let Some(us) = line.split_whitespace().nth(2).and_then(|f| f.parse().ok()) {
                    lat.push(Duration::from_micros(us));
                }
            }
        }
    }
    anyhow::ensure!(!lat.is_empty(), "pgbench logged no transaction");
    lat.sort();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99)))
}
