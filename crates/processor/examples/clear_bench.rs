//! `clear()` of 1 000 000 entries against the tombstone per row it wrote before (the same
//! `UPDATE` run by psql on an identical table) and psql's bare `TRUNCATE`, on a throwaway
//! server.
//!
//! ```text
//! cargo run --release --example clear_bench
//! ```

#[path = "common/bench.rs"]
#[allow(dead_code)] // (the writers are the other benchmarks')
mod bench;

use std::time::Instant;

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

const ROWS: u32 = 1_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cluster, url) = bench::throwaway()?;
    let backend = |schema: &str| {
        EnhancedPostgresBackend::new(
            EnhancedPostgresConfig::new(url.clone())
                .with_schema(schema)
                .with_expired_cleanup(false),
        )
    };
    let ours = backend("ours").await?;
    let tombstones = backend("tombstones").await?;
    let truncated = backend("truncated").await?;
    for b in [&ours, &tombstones, &truncated] {
        bench::fill(&cluster, b.table(), ROWS, "k:")?;
    }
    let start = Instant::now();
    ours.clear().await?;
    let clear = start.elapsed();
    anyhow::ensure!(ours.count().await? == 0);
    let start = Instant::now();
    cluster.psql(
        0,
        &format!(
            "UPDATE {} SET value = '\\x'::bytea, metadata = '{{}}'::jsonb, \
             expires_at = '-infinity', updated_at = statement_timestamp(), version = version + 1 \
             WHERE expires_at IS NULL OR expires_at > statement_timestamp()",
            tombstones.table()
        ),
    )?;
    let update = start.elapsed();
    let start = Instant::now();
    cluster.psql(0, &format!("TRUNCATE {}", truncated.table()))?;
    let truncate = start.elapsed();
    println!("| figure | measured |");
    println!("| --- | ---: |");
    println!(
        "| `clear()` of {ROWS} entries (lock, max(version), floor, TRUNCATE) | {:.3} s |",
        clear.as_secs_f64()
    );
    println!(
        "| the tombstone per row `clear()` wrote before (psql `UPDATE`) | {:.3} s ({:.0}x slower) |",
        update.as_secs_f64(),
        update.as_secs_f64() / clear.as_secs_f64()
    );
    println!(
        "| psql `TRUNCATE` alone | {:.3} s |",
        truncate.as_secs_f64()
    );
    Ok(())
}
