//! Data-management throughput against `psql` on the same server, in the same run. Prints a
//! Markdown table for BENCHMARKS.md.
//!
//! - retention: `cleanup_expired()` over 1 000 000 expired rows, against one `DELETE` of the
//!   same rows on an identical table (both alone on the server); then the same pass on a third
//!   identical table while writers run, and the longest time a writer waited for one `put`;
//! - checkpoints: `create_checkpoint` and `restore_checkpoint` of 1 000 000 live keys, against
//!   `INSERT INTO copy SELECT * FROM table` and a `TRUNCATE` plus `INSERT ... SELECT` back.
//!
//! ```text
//! cargo run --release --example maintenance_bench    # throwaway local server
//! ```

#[path = "common/bench.rs"]
mod bench;

use std::time::{Duration, Instant};

use pgstate_testcluster::Cluster;
use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};

const ROWS: u32 = 1_000_000;
const WRITERS: u64 = 4;

/// 1 000 000 expired rows and 10 000 live ones in `table`.
fn fill(cluster: &Cluster, table: &str) -> anyhow::Result<()> {
    cluster.psql(
        0,
        &format!(
            "INSERT INTO {table} (key, value, expires_at)
             SELECT convert_to('x:' || i, 'UTF8'), convert_to(repeat('v', 100), 'UTF8'),
                    now() - interval '1 second'
             FROM generate_series(1, {ROWS}) i;
             INSERT INTO {table} (key, value)
             SELECT convert_to('live:' || i, 'UTF8'), '\\x00' FROM generate_series(1, 10000) i"
        ),
    )?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cluster, url) = bench::throwaway()?;
    let version = cluster.psql(0, "SHOW server_version")?;
    let backend = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone())
            .with_schema("ours")
            .with_expired_cleanup(false),
    )
    .await?;
    let busy = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone())
            .with_schema("busy")
            .with_expired_cleanup(false),
    )
    .await?;
    let reference =
        EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url).with_schema("theirs"))
            .await?;
    eprintln!("loading {ROWS} expired rows three times ...");
    fill(&cluster, backend.table())?;
    fill(&cluster, busy.table())?;
    fill(&cluster, reference.table())?;

    // Ours, alone on the server as psql is below.
    let start = Instant::now();
    let removed = backend.cleanup_expired().await?;
    let ours = start.elapsed();
    anyhow::ensure!(removed == u64::from(ROWS), "removed {removed}");

    // Ours again, with writers putting live keys meanwhile.
    let writers = bench::Writers::start(&busy, WRITERS, |t, i| {
        (
            format!("live:{}", t * 2500 + i % 2500 + 1),
            i.to_be_bytes().to_vec(),
        )
    });
    let start = Instant::now();
    let removed = busy.cleanup_expired().await?;
    let ours_busy = start.elapsed();
    let (puts, longest) = writers.stop().await?;
    anyhow::ensure!(removed == u64::from(ROWS), "removed {removed}");

    // psql: one DELETE of the same rows.
    let start = Instant::now();
    cluster.psql(
        0,
        &format!(
            "DELETE FROM {} WHERE expires_at <= now()",
            reference.table()
        ),
    )?;
    let theirs = start.elapsed();
    anyhow::ensure!(
        reference.count().await? == 10_000,
        "reference delete incomplete"
    );

    // Checkpoints of 1 000 000 live keys: ours (the cleaned table refilled) against psql.
    cluster.psql(
        0,
        &format!(
            "INSERT INTO {t} (key, value) SELECT convert_to('c:' || i, 'UTF8'), \
             convert_to(repeat('v', 100), 'UTF8') FROM generate_series(1, {ROWS}) i",
            t = backend.table()
        ),
    )?;
    cluster.psql(
        0,
        &format!(
            "TRUNCATE {t}; INSERT INTO {t} (key, value) SELECT convert_to('c:' || i, 'UTF8'), \
             convert_to(repeat('v', 100), 'UTF8') FROM generate_series(1, {ROWS}) i",
            t = reference.table()
        ),
    )?;
    let live = u64::from(ROWS) + 10_000;
    let start = Instant::now();
    let checkpoint = backend.create_checkpoint("bench").await?;
    let ours_create = start.elapsed();
    anyhow::ensure!(checkpoint.entry_count == live, "{checkpoint:?}");
    let start = Instant::now();
    anyhow::ensure!(backend.restore_checkpoint(checkpoint.id).await? == live);
    let ours_restore = start.elapsed();
    let copy = format!("{}_copy", reference.table().trim_end_matches('"')) + "\"";
    let start = Instant::now();
    cluster.psql(
        0,
        &format!(
            "CREATE TABLE {copy} AS SELECT * FROM {t} WHERE expires_at IS NULL OR expires_at > now()",
            t = reference.table()
        ),
    )?;
    let theirs_create = start.elapsed();
    let start = Instant::now();
    cluster.psql(
        0,
        &format!(
            "BEGIN; TRUNCATE {t}; INSERT INTO {t} SELECT * FROM {copy}; COMMIT",
            t = reference.table()
        ),
    )?;
    let theirs_restore = start.elapsed();

    let rate = |d: Duration| f64::from(ROWS) / d.as_secs_f64();
    let live_rate = |d: Duration| live as f64 / d.as_secs_f64();
    println!(
        "PostgreSQL {version}, {} CPUs, {ROWS} expired rows of 100 bytes plus 10 000 live, sslmode=disable\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| workload | pgstate | reference | ratio | reference command |");
    println!("| --- | ---: | ---: | ---: | --- |");
    println!(
        "| retention, 1M expired rows (rows/s) | {:.0} | {:.0} | {:.2} | psql: one DELETE ... WHERE expires_at <= now() |",
        rate(ours),
        rate(theirs),
        rate(ours) / rate(theirs)
    );
    println!(
        "| checkpoint, 1M live keys (rows/s) | {:.0} | {:.0} | {:.2} | psql: CREATE TABLE copy AS SELECT live rows |",
        live_rate(ours_create),
        live_rate(theirs_create),
        live_rate(ours_create) / live_rate(theirs_create)
    );
    println!(
        "| restore, 1M live keys (rows/s) | {:.0} | {:.0} | {:.2} | psql: BEGIN; TRUNCATE; INSERT ... SELECT FROM copy; COMMIT |",
        live_rate(ours_restore),
        live_rate(theirs_restore),
        live_rate(ours_restore) / live_rate(theirs_restore)
    );
    println!(
        "| retention with {WRITERS} writers putting meanwhile (rows/s) | {:.0} | | {:.2} | |",
        rate(ours_busy),
        rate(ours_busy) / rate(theirs)
    );
    println!(
        "\nDuring pgstate's pass with writers ({:.1} s), {WRITERS} writers completed {} puts; the longest single put took {:.1} ms.",
        ours_busy.as_secs_f64(),
        puts,
        longest.as_secs_f64() * 1000.0
    );
    Ok(())
}
