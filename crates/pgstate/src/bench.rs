//! `pgstate bench`: puts, then gets, from concurrent tasks for a while, on a table of its own
//! (`<table>_bench`, emptied afterwards); throughput and latency percentiles from the backend's
//! statistics. The comparison with `pgbench` on the same server (the ratios in BENCHMARKS.md)
//! is `cargo run --release -p processor --example perf`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::state::{EnhancedPostgresBackend, PostgresPoolConfig, StateBackend};
use serde_json::json;

use crate::exit::CliError;
use crate::progress;
use crate::target::Target;

/// What `pgstate bench` runs.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds of puts, then as many of gets.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent tasks (and pool connections).
    #[arg(long, default_value_t = 16)]
    tasks: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `op` from `tasks` tasks for `length`; returns the operations done.
async fn phase(
    backend: &EnhancedPostgresBackend,
    args: &BenchArgs,
    length: Duration,
    what: &str,
    put: bool,
) -> Result<u64, CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let value = vec![b'x'; args.value_size];
    let mut tasks = Vec::new();
    for t in 0..args.tasks {
        let (b, stop, done, value) = (
            backend.clone_handle(),
            stop.clone(),
            done.clone(),
            value.clone(),
        );
        let keys = args.keys.max(1);
        tasks.push(tokio::spawn(async move {
            let mut i = t as u64;
            while !stop.load(Relaxed) {
                let key = format!("bench:{:08}", i % keys);
                if put {
                    b.put(key.as_bytes(), &value).await?;
                } else {
                    b.get(key.as_bytes()).await?;
                }
                done.fetch_add(1, Relaxed);
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
            Ok::<(), processor::state::StateError>(())
        }));
    }
    let bar = progress::bar(length.as_secs(), what);
    let start = Instant::now();
    while start.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(format!("{what}: {}", done.load(Relaxed)));
    }
    stop.store(true, Relaxed);
    bar.finish_and_clear();
    for t in tasks {
        t.await
            .map_err(|e| CliError::failed(format!("a benchmark task failed: {e}")))??;
    }
    Ok(done.load(Relaxed))
}

/// Runs `pgstate bench`.
pub async fn run(target: &Target, args: BenchArgs) -> Result<(), CliError> {
    let length = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| CliError::usage("--seconds must be a positive number"))?;
    if args.tasks == 0 {
        return Err(CliError::usage("--tasks must be positive"));
    }
    let (url, replicas) = target.resolve()?;
    let tasks = u32::try_from(args.tasks).unwrap_or(u32::MAX);
    let config = target
        .config(&url, &replicas)
        .with_table_name(format!("{}_bench", target.table))
        .with_pool_config(PostgresPoolConfig {
            min_connections: tasks.min(64),
            max_connections: tasks.min(64),
            acquire_timeout: Duration::from_secs(30),
            ..PostgresPoolConfig::default()
        });
    let backend = target.open(config).await?;
    eprintln!(
        "benchmarking on {} (watch it with `pgstate watch --table {}_bench`)",
        backend.table(),
        target.table
    );
    backend.clear().await?;
    let puts = phase(&backend, &args, length, "puts", true).await?;
    let gets = phase(&backend, &args, length, "gets", false).await?;
    let stats = backend.get_stats();
    backend.clear().await?;
    let secs = length.as_secs_f64();
    let pct = |op: &str| {
        stats
            .latencies
            .iter()
            .find(|l| l.operation == op)
            .map(|l| (l.p50_us, l.p95_us, l.p99_us))
            .unwrap_or_default()
    };
    let labelled = |op: &str| {
        let (p50, p95, p99) = pct(op);
        json!({ "p50": p50, "p95": p95, "p99": p99 })
    };
    let report = json!({
        "table": backend.table(),
        "tasks": args.tasks,
        "seconds": secs,
        "keys": args.keys,
        "value_size": args.value_size,
        "put_per_second": puts as f64 / secs,
        "get_per_second": gets as f64 / secs,
        "put_latency_us": labelled("put"),
        "get_latency_us": labelled("get"),
        "reads": { "primary": stats.primary_reads, "replicas": stats.replica_reads },
        "coalesced_puts": stats.coalesced_puts,
        "coalesced_gets": stats.coalesced_gets,
        "errors": stats.error_count,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{} tasks, {} keys, {}-byte values, {secs:.1} s each",
        args.tasks, args.keys, args.value_size
    );
    for (op, n) in [("put", puts), ("get", gets)] {
        let (p50, p95, p99) = pct(op);
        println!(
            "{op}: {:>10.0}/s   p50 {:.2} ms   p95 {:.2} ms   p99 {:.2} ms",
            n as f64 / secs,
            p50 as f64 / 1000.0,
            p95 as f64 / 1000.0,
            p99 as f64 / 1000.0
        );
    }
    Ok(())
}
