//! Throughput of the enhanced backend against `pgbench` and `psql` on the same server, in the
//! same run. Prints a Markdown table for BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --example bench            # throwaway local server
//! BENCH_SECONDS=20 cargo run --release --example bench
//! ```
//!
//! - get / put: 32 tasks sharing a pool of 8 connections, random keys among 10 000, 100-byte
//!   values; pgbench runs the same SQL text (prepared, 8 connections, 2 threads).
//! - bulk load: `batch_copy` of 100 000 new rows into an empty table, against `psql`'s
//!   `\copy ... (FORMAT binary)` of the same rows from a file into the same empty table.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgstate_testcluster::{Cluster, ClusterOptions};
use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig, StateBackend,
};

const KEYS: u32 = 10_000;
const TASKS: usize = 32;
const CONNECTIONS: u32 = 8;
const VALUE_LEN: usize = 100;
const COPY_ROWS: u32 = 100_000;

fn key(i: u32) -> Vec<u8> {
    format!("key:{i:08}").into_bytes()
}

/// The key expression pgbench evaluates: the same bytes as `key(i)`.
const PGBENCH_KEY: &str = "convert_to('key:' || lpad(:k::text, 8, '0'), 'UTF8')";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("starting a throwaway PostgreSQL ...");
    let cluster = Cluster::start(ClusterOptions {
        replicas: 0,
        tls: false,
        ..ClusterOptions::default()
    })?;
    let url = format!("{}?sslmode=disable", cluster.primary_url());
    let version = cluster.psql(0, "SHOW server_version")?;
    let cfg = EnhancedPostgresConfig::new(url.clone())
        .with_schema("bench")
        .with_pool_config(PostgresPoolConfig {
            min_connections: CONNECTIONS,
            max_connections: CONNECTIONS,
            test_on_acquire: false,
            ..PostgresPoolConfig::default()
        });
    let backend = EnhancedPostgresBackend::new(cfg).await?;
    let table = backend.table().to_string();
    let value = vec![0xAB_u8; VALUE_LEN];
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let entries: Vec<(&[u8], &[u8])> = keys
        .iter()
        .map(|k| (k.as_slice(), value.as_slice()))
        .collect();
    backend.batch_put(&entries).await?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;

    let mut rows = Vec::new();
    for op in ["get", "put"] {
        eprintln!("{op}: pgstate, {TASKS} tasks, {CONNECTIONS} connections, {seconds}s ...");
        let ours = run_ours(&backend, op, seconds).await?;
        eprintln!("{op}: pgbench, {CONNECTIONS} connections, {seconds}s ...");
        let script = pgbench_script(op, &table);
        let theirs = run_pgbench(&cluster, &script, seconds)?;
        rows.push((
            format!("{op} (ops/s)"),
            ours,
            theirs,
            "pgbench -M prepared -c 8 -j 2",
        ));
    }

    eprintln!("bulk load: {COPY_ROWS} rows, batch_copy vs psql \\copy binary ...");
    let copy_keys: Vec<Vec<u8>> = (0..COPY_ROWS)
        .map(|i| format!("copy:{i:08}").into_bytes())
        .collect();
    let copy_entries: Vec<(&[u8], &[u8])> = copy_keys
        .iter()
        .map(|k| (k.as_slice(), value.as_slice()))
        .collect();
    let file = cluster.dir().join("bench.copy");
    write_binary_copy(&file, &copy_entries)?;
    let mut ours_best = 0.0f64;
    let mut psql_best = 0.0f64;
    for _ in 0..3 {
        backend.clear().await?;
        cluster.psql(0, &format!("VACUUM {table}"))?;
        let t = Instant::now();
        backend.batch_copy(&copy_entries).await?;
        ours_best = ours_best.max(f64::from(COPY_ROWS) / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            backend.count().await? == COPY_ROWS as usize,
            "batch_copy lost rows"
        );

        backend.clear().await?;
        cluster.psql(0, &format!("VACUUM {table}"))?;
        let t = Instant::now();
        let out = Command::new(cluster.bindir().join("psql"))
            .arg(&url)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!(
                "\\copy {table} (key, value) FROM '{}' WITH (FORMAT binary)",
                file.display()
            ))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        psql_best = psql_best.max(f64::from(COPY_ROWS) / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            backend.count().await? == COPY_ROWS as usize,
            "psql copy lost rows"
        );
    }
    rows.push((
        "bulk load, 100k new rows (rows/s)".into(),
        ours_best,
        psql_best,
        "psql \\copy (FORMAT binary), best of 3",
    ));

    println!("PostgreSQL {version}, {} CPUs, {seconds}s per throughput run, 100-byte values, sslmode=disable\n", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!("| workload | pgstate | reference | ratio | reference command |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (name, ours, theirs, how) in rows {
        println!(
            "| {name} | {ours:.0} | {theirs:.0} | {:.2} | {how} |",
            ours / theirs
        );
    }
    Ok(())
}

async fn run_ours(
    backend: &EnhancedPostgresBackend,
    op: &str,
    seconds: u64,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (b, stop, done, put) = (
            backend.clone_handle(),
            stop.clone(),
            done.clone(),
            op == "put",
        );
        tasks.push(tokio::spawn(async move {
            let value = vec![0xCD_u8; VALUE_LEN];
            let mut x = 0x9E37_79B9_u32.wrapping_mul(t as u32 + 1);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let k = key(x % KEYS);
                if put {
                    b.put(&k, &value).await?;
                } else {
                    b.get(&k).await?;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / elapsed)
}

fn pgbench_script(op: &str, table: &str) -> String {
    let live = "(expires_at IS NULL OR expires_at > now())";
    let body = match op {
        "get" => format!("SELECT value FROM {table} WHERE key = {PGBENCH_KEY} AND {live};"),
        _ => format!(
            "INSERT INTO {table} AS e (key, value, metadata, expires_at) \
             VALUES ({PGBENCH_KEY}, decode(repeat('cd', {VALUE_LEN}), 'hex'), '{{}}'::jsonb, now() + NULL::bigint * interval '1 microsecond') \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, metadata = EXCLUDED.metadata, \
             expires_at = EXCLUDED.expires_at, updated_at = now(), version = e.version + 1, \
             created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END RETURNING version;"
        ),
    };
    format!("\\set k random(0, {})\n{body}\n", KEYS - 1)
}

fn run_pgbench(cluster: &Cluster, script: &str, seconds: u64) -> anyhow::Result<f64> {
    let path = cluster.dir().join("bench.sql");
    std::fs::write(&path, script)?;
    let port = cluster.nodes()[0].port.to_string();
    let out = Command::new(cluster.bindir().join("pgbench"))
        .env("PGPASSWORD", pgstate_testcluster::PASSWORD)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-n",
            "-M",
            "prepared",
        ])
        .args([
            "-c",
            &CONNECTIONS.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&path)
        .arg("postgres")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no tps line in pgbench output: {text}"))
}

/// Writes PostgreSQL's binary COPY format: header, (key, value) tuples, trailer.
fn write_binary_copy(path: &Path, entries: &[(&[u8], &[u8])]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(b"PGCOPY\n\xff\r\n\0")?;
    out.write_all(&0i32.to_be_bytes())?;
    out.write_all(&0i32.to_be_bytes())?;
    for (k, v) in entries {
        out.write_all(&2i16.to_be_bytes())?;
        for field in [k, v] {
            out.write_all(&i32::try_from(field.len())?.to_be_bytes())?;
            out.write_all(field)?;
        }
    }
    out.write_all(&(-1i16).to_be_bytes())?;
    out.flush()?;
    Ok(())
}
