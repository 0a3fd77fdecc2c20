//! The performance harness: in one run on one throwaway server, the backend's operations at 1,
//! 8, 32 and 128 tasks against `pgbench` running the same SQL on the same connection count,
//! `psql`'s binary `\copy` for the bulk load, and tokio-postgres with deadpool-postgres (the
//! setup a user would write by hand) for get and put. Prints the tables, and writes them
//! with a plot into `BENCHMARKS.md` (between its `perf` markers) and `benchmarks/`.
//!
//! ```text
//! cargo run --release --example perf
//! BENCH_SECONDS=5 BENCH_TASKS=1,32 BENCH_BIG=1 cargo run --release --example perf
//! ```
//!
//! - `BENCH_SECONDS` (default 3): measured seconds per figure, after 0.5 s of warm-up.
//! - `BENCH_TASKS` (default `1,8,32,128`): the task counts. The pool has 8 connections;
//!   pgbench runs `-c 1` for one task and `-c 8` otherwise.
//! - `BENCH_BIG=1`: also compares get latency on a 10 000 000-row table with the 100 000-row one.
//! - `BENCH_ONLY=get,put,bulk`: only these workloads (`bulk`: the bulk load; `maintenance`:
//!   clear, retention and the load after a clear, 1 000 000 rows each; `callgrind`: client
//!   instructions per call, counted by valgrind's callgrind, ours and the hand-written
//!   loop's); implies
//!   `BENCH_NO_WRITE=1`.
//! - `BENCH_NO_WRITE=1`: print only.
//! - `BENCH_CITUS=1`: on a Citus coordinator with two workers (the `citus` extension must be
//!   installed), the state table distributed by key; implies `BENCH_NO_WRITE=1`.
//!
//! The server runs with `fsync = on` and `synchronous_commit = on` for both sides.

mod callgrind;
mod drive;
mod maintenance;
mod reference;
mod report;
mod round3;
mod workloads;

use std::collections::HashMap;
use std::time::Instant;

use pgstate_testcluster::{Cluster, ClusterOptions};
use processor::state::{
    CitusLayout, EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig, StateBackend,
};

use crate::drive::{drive, Sample};
use crate::report::{Bulk, Report, Row};

/// Keys loaded before the runs.
pub const KEYS: u32 = 100_000;
/// Keys with a `group` in their metadata (ten per group), for `query_by_metadata`.
pub const META_KEYS: u32 = 10_000;
/// Value size, bytes.
pub const VALUE_LEN: usize = 100;
/// The pool's connections (and pgbench's clients beyond one task).
pub const CONNECTIONS: u32 = 8;
/// Rows of the bulk load.
const COPY_ROWS: u32 = 100_000;
/// Rows of the large table (`BENCH_BIG=1`).
const BIG_ROWS: u64 = 10_000_000;

/// The `i`th key: `key:` and eight digits.
pub fn key(i: u32) -> Vec<u8> {
    format!("key:{i:08}").into_bytes()
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(callgrind::WORKER) {
        return callgrind::worker(&spec).await;
    }
    let seconds: f64 = env("BENCH_SECONDS").unwrap_or(3.0);
    let task_counts: Vec<usize> = std::env::var("BENCH_TASKS")
        .unwrap_or_else(|_| "1,8,32,128".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let big = std::env::var("BENCH_BIG").is_ok_and(|v| v == "1");
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|w| w.trim().to_string()).collect());

    let citus = std::env::var("BENCH_CITUS").is_ok_and(|v| v == "1");
    eprintln!("starting a throwaway PostgreSQL ...");
    let cluster = Cluster::start(ClusterOptions {
        replicas: 0,
        tls: false,
        citus_workers: if citus { 2 } else { 0 },
        ..ClusterOptions::default()
    })?;
    for node in 0..cluster.nodes().len() {
        cluster.psql(node, "ALTER SYSTEM SET fsync = on")?;
        cluster.psql(node, "SELECT pg_reload_conf()")?;
    }
    let url = format!("{}?sslmode=disable", cluster.primary_url());
    let mut config = EnhancedPostgresConfig::new(url.clone())
        .with_schema("bench")
        .with_pool_config(PostgresPoolConfig {
            min_connections: CONNECTIONS,
            max_connections: CONNECTIONS,
            ..PostgresPoolConfig::default()
        });
    if citus {
        config = config.with_citus(CitusLayout::default());
    }
    let backend = EnhancedPostgresBackend::new(config).await?;
    let table = backend.table().to_string();
    {
        let k = key(0);
        let v = [0u8; VALUE_LEN];
        eprintln!(
            "future sizes, bytes: get {}, put {}, get_many {}, batch_put {}, begin {}",
            std::mem::size_of_val(&backend.get(&k)),
            std::mem::size_of_val(&backend.put(&k, &v)),
            std::mem::size_of_val(&backend.get_many(&[])),
            std::mem::size_of_val(&backend.batch_put(&[])),
            std::mem::size_of_val(&backend.begin()),
        );
    }
    load(&backend, &cluster, &table).await?;

    let mut report = Report::new(&cluster, seconds)?;
    if big {
        // First, so that the scan's memory figure is the scan's, not what earlier runs left.
        let (gets, scan) = big_table(&backend, &cluster, &url).await?;
        report.big = Some(gets);
        report.big_scan = Some(scan);
    }
    let mut pgbench_cache: HashMap<(&str, usize), Sample> = HashMap::new();
    let dead = reference::deadpool(&url, CONNECTIONS as usize)?;
    for w in workloads::WORKLOADS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == w.name))
        {
            continue;
        }
        for &tasks in &task_counts {
            eprintln!("{} at {tasks} tasks ...", w.name);
            let ours = drive(tasks, seconds, workloads::op(&backend, w.name, KEYS)).await?;
            let clients = tasks.min(CONNECTIONS as usize);
            let pgbench = match reference::pgbench_script(w.name, &table, KEYS, VALUE_LEN) {
                Some(script) => {
                    let cached = pgbench_cache.get(&(w.name, clients)).copied();
                    let sample = match cached {
                        Some(s) => s,
                        None => reference::pgbench(&cluster, &script, clients, seconds)?,
                    };
                    pgbench_cache.insert((w.name, clients), sample);
                    Some((clients, sample))
                }
                None => None,
            };
            let deadpool = match w.name {
                "get" | "put" => {
                    let op = reference::deadpool_op(
                        dead.clone(),
                        &table,
                        w.name == "put",
                        KEYS,
                        VALUE_LEN,
                    );
                    Some(drive(tasks, seconds, op).await?)
                }
                _ => None,
            };
            report.rows.push(Row {
                name: w.name,
                rows_per_call: w.rows_per_call,
                tasks,
                ours,
                pgbench,
                deadpool,
            });
        }
    }
    if only.as_ref().is_none_or(|o| o.iter().any(|n| n == "bulk")) {
        report.bulk = Some(bulk(&backend, &cluster, &url, &table).await?);
    }
    if !citus
        && only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == "maintenance"))
    {
        report.maintenance = Some(maintenance::measure(&cluster, &url).await?);
    }
    if !citus
        && only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == "callgrind"))
    {
        report.instructions = Some(callgrind::measure(&url)?);
    }
    report.print_and_write(only.is_none() && !citus)?;
    Ok(())
}

/// Loads the keys, the metadata groups, then vacuums and analyzes.
async fn load(
    backend: &EnhancedPostgresBackend,
    cluster: &Cluster,
    table: &str,
) -> anyhow::Result<()> {
    eprintln!("loading {KEYS} keys ...");
    let value = [0xAB_u8; VALUE_LEN];
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(10_000) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|&i| key(i)).collect();
        let entries: Vec<(&[u8], &[u8])> =
            keys.iter().map(|k| (k.as_slice(), &value[..])).collect();
        backend.batch_copy(&entries).await?;
    }
    let meta: Vec<Vec<u8>> = (0..META_KEYS)
        .map(|i| format!("meta:{i:08}").into_bytes())
        .collect();
    let entries: Vec<(&[u8], &[u8])> = meta.iter().map(|k| (k.as_slice(), &value[..])).collect();
    backend.batch_copy(&entries).await?;
    cluster.psql(
        0,
        &format!(
            // Immutable functions only (Citus refuses others with column references).
            "UPDATE {table} SET metadata = ('{{\"group\": ' || \
             (right(encode(key, 'escape'), 8)::int % {})::text || '}}')::jsonb \
             WHERE key >= 'meta:'::bytea AND key < 'meta;'::bytea",
            META_KEYS / 10
        ),
    )?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;
    Ok(())
}

/// 100 000 new rows into an emptied table: `batch_copy`, `batch_put` and psql's binary
/// `\copy`, best of three each.
async fn bulk(
    backend: &EnhancedPostgresBackend,
    cluster: &Cluster,
    url: &str,
    table: &str,
) -> anyhow::Result<Bulk> {
    eprintln!("bulk load: {COPY_ROWS} new rows ...");
    let value = vec![0xAB_u8; VALUE_LEN];
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..COPY_ROWS)
        .map(|i| (format!("copy:{i:08}").into_bytes(), value.clone()))
        .collect();
    let entries: Vec<(&[u8], &[u8])> = rows
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let file = cluster.dir().join("bench.copy");
    reference::write_binary_copy(&file, &rows)?;
    let empty = || -> anyhow::Result<()> {
        cluster.psql(0, &format!("TRUNCATE {table}"))?;
        cluster.psql(0, &format!("VACUUM {table}"))?;
        Ok(())
    };
    let (mut copy, mut put, mut psql) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..3 {
        empty()?;
        let t = Instant::now();
        backend.batch_copy(&entries).await?;
        copy = copy.max(f64::from(COPY_ROWS) / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            backend.count().await? == COPY_ROWS as usize,
            "batch_copy lost rows"
        );
        empty()?;
        let t = Instant::now();
        backend.batch_put(&entries).await?;
        put = put.max(f64::from(COPY_ROWS) / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            backend.count().await? == COPY_ROWS as usize,
            "batch_put lost rows"
        );
        empty()?;
        psql = psql.max(f64::from(COPY_ROWS) / reference::psql_copy(cluster, url, table, &file)?);
        anyhow::ensure!(
            backend.count().await? == COPY_ROWS as usize,
            "psql lost rows"
        );
    }
    Ok(Bulk {
        batch_copy: copy,
        batch_put: put,
        psql,
    })
}

/// Get latency at one task on a 10 000 000-row table and on the 100 000-row one; then a
/// `scan` of the whole large table: rows per second and the client's highest RSS meanwhile.
async fn big_table(
    small: &EnhancedPostgresBackend,
    cluster: &Cluster,
    url: &str,
) -> anyhow::Result<((Sample, Sample), (f64, f64))> {
    eprintln!("loading {BIG_ROWS} rows into a second table ...");
    let big = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.to_string()).with_schema("bench_big"),
    )
    .await?;
    let table = big.table().to_string();
    cluster.psql(
        0,
        &format!(
            "INSERT INTO {table} (key, value) SELECT convert_to('key:' || lpad(i::text, 8, '0'), 'UTF8'), \
             decode(repeat('ab', {VALUE_LEN}), 'hex') FROM generate_series(0, {}) i",
            BIG_ROWS - 1
        ),
    )?;
    cluster.psql(0, &format!("VACUUM ANALYZE {table}"))?;
    let keys = u32::try_from(BIG_ROWS)?;
    let on_big = drive(1, 3.0, workloads::op(&big, "get", keys)).await?;
    let on_small = drive(1, 3.0, workloads::op(small, "get", KEYS)).await?;
    eprintln!("scanning {BIG_ROWS} rows ...");
    let start = Instant::now();
    let mut rows = 0u64;
    let mut rss = drive::rss_mib();
    let mut scan = std::pin::pin!(big.scan(b""));
    while let Some(entry) = futures_util::StreamExt::next(&mut scan).await {
        entry?;
        rows += 1;
        if rows % 100_000 == 0 {
            rss = rss.max(drive::rss_mib());
        }
    }
    anyhow::ensure!(rows == BIG_ROWS, "the scan saw {rows} rows, not {BIG_ROWS}");
    Ok((
        (on_small, on_big),
        (rows as f64 / start.elapsed().as_secs_f64(), rss),
    ))
}
