//! What partitioning costs, on one throwaway server in one run. Prints Markdown for
//! BENCHMARKS.md.
//!
//! - single-key `put` and `get` from 32 tasks over an 8-connection pool on 100 000 keys, on a
//!   plain table and on hash (16), list (4 prefixes) and time-range (1 h windows) tables;
//! - `migrate_to_partitioned` of a 1 000 000-row table to 16 hash partitions while 4 writers
//!   run, against psql building the same partitioned copy offline (`INSERT ... SELECT`).
//!
//! ```text
//! cargo run --release --example partition_bench
//! ```

#[path = "common/bench.rs"]
mod bench;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PartitionStrategy, PostgresPoolConfig,
    StateBackend,
};

const KEYS: u64 = 100_000;
const TASKS: u64 = 32;
const RUN: Duration = Duration::from_secs(5);
const ROWS: u32 = 1_000_000;

fn key(i: u64) -> String {
    // Spread over the list strategy's four prefixes.
    format!("{}:{i:06}", ["a", "b", "c", "d"][(i % 4) as usize])
}

/// Operations per second of `op` from [`TASKS`] tasks for [`RUN`].
async fn rate(b: &EnhancedPostgresBackend, put: bool) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (b, done) = (b.clone_handle(), done.clone());
            tokio::spawn(async move {
                let mut i = t * 7919;
                while Instant::now() < deadline {
                    let k = key(i % KEYS);
                    if put {
                        b.put(k.as_bytes(), &[b'v'; 100]).await?;
                    } else {
                        anyhow::ensure!(b.get(k.as_bytes()).await?.is_some(), "{k} missing");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 104_729;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cluster, url) = bench::throwaway()?;
    let version = cluster.psql(0, "SHOW server_version")?;
    let config = |schema: &str| {
        EnhancedPostgresConfig::new(url.clone())
            .with_schema(schema)
            .with_pool_config(PostgresPoolConfig {
                max_connections: 8,
                min_connections: 8,
                ..PostgresPoolConfig::default()
            })
    };
    let layouts: Vec<(&str, Option<PartitionStrategy>)> = vec![
        ("plain", None),
        (
            "hash (16)",
            Some(PartitionStrategy::Hash { partitions: 16 }),
        ),
        (
            "list (4 prefixes)",
            Some(PartitionStrategy::List {
                prefixes: ["a:", "b:", "c:", "d:"]
                    .iter()
                    .map(|p| p.as_bytes().to_vec())
                    .collect(),
            }),
        ),
        (
            "time range (1 h windows)",
            Some(PartitionStrategy::TimeRange {
                interval: Duration::from_secs(3600),
                premake: 2,
            }),
        ),
    ];
    let mut rows = Vec::new();
    for (i, (name, strategy)) in layouts.into_iter().enumerate() {
        let mut cfg = config(&format!("layout{i}"));
        if let Some(s) = strategy {
            cfg = cfg.with_partitioning(s);
        }
        let b = EnhancedPostgresBackend::new(cfg).await?;
        let all: Vec<(Vec<u8>, Vec<u8>)> = (0..KEYS)
            .map(|i| (key(i).into_bytes(), vec![b'v'; 100]))
            .collect();
        let refs: Vec<(&[u8], &[u8])> = all.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        b.batch_put(&refs).await?;
        cluster.psql(0, &format!("VACUUM ANALYZE {}", b.table()))?;
        eprintln!("{name}: put ...");
        let puts = rate(&b, true).await?;
        eprintln!("{name}: get ...");
        let gets = rate(&b, false).await?;
        rows.push((name, puts, gets));
    }

    // Online conversion of 1 000 000 rows, with writers running.
    let b = EnhancedPostgresBackend::new(config("online")).await?;
    let reference = EnhancedPostgresBackend::new(config("offline")).await?;
    for t in [b.table(), reference.table()] {
        bench::fill(&cluster, t, ROWS, "k")?;
    }
    let writers = bench::Writers::start(&b, 4, |w, n| {
        (
            format!("k{}", (w + n * 4 * 7919) % u64::from(ROWS) + 1),
            b"new".to_vec(),
        )
    });
    let start = Instant::now();
    let report = b
        .migrate_to_partitioned(PartitionStrategy::Hash { partitions: 16 })
        .await?;
    let ours = start.elapsed();
    let (puts, longest) = writers.stop().await?;
    anyhow::ensure!(report.converted && b.count().await? == ROWS as usize);
    let t = reference.table();
    let start = Instant::now();
    let parts: String = (0..16)
        .map(|i| {
            format!(
                "CREATE TABLE offline.p{i} PARTITION OF offline.copy FOR VALUES WITH (MODULUS 16, REMAINDER {i});"
            )
        })
        .collect();
    cluster.psql(
        0,
        &format!(
            "BEGIN; CREATE TABLE offline.copy (LIKE {t} INCLUDING ALL) PARTITION BY HASH (key); {parts} \
             INSERT INTO offline.copy SELECT * FROM {t}; COMMIT"
        ),
    )?;
    let theirs = start.elapsed();

    println!(
        "PostgreSQL {version}, {} CPUs, {TASKS} tasks over 8 connections, {KEYS} keys, 100-byte values, {} s per figure, sslmode=disable\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        RUN.as_secs()
    );
    println!("| table | put/s | vs plain | get/s | vs plain |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let (_, plain_puts, plain_gets) = rows[0];
    for (name, puts, gets) in &rows {
        println!(
            "| {name} | {puts:.0} | {:.2} | {gets:.0} | {:.2} |",
            puts / plain_puts,
            gets / plain_gets
        );
    }
    let rate = |d: Duration| f64::from(ROWS) / d.as_secs_f64();
    println!(
        "\n| conversion of {ROWS} rows to 16 hash partitions | rows/s | ratio | reference command |\n| --- | ---: | ---: | --- |\n| `migrate_to_partitioned`, 4 writers running | {:.0} | {:.2} | psql, offline: CREATE TABLE ... PARTITION BY HASH; INSERT ... SELECT * |\n| psql | {:.0} | 1.00 | |",
        rate(ours),
        rate(ours) / rate(theirs),
        rate(theirs)
    );
    println!(
        "\nDuring the conversion ({:.1} s), 4 writers completed {} puts; the longest single put took {:.1} ms.",
        ours.as_secs_f64(),
        puts,
        longest.as_secs_f64() * 1000.0
    );
    Ok(())
}
