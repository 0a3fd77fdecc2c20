//! Client instructions per call, counted by valgrind's callgrind: the harness runs itself
//! under `valgrind --tool=callgrind` twice per operation (a short and a long run of one task
//! calling in a loop, against the server the harness started) and divides the difference of
//! the two totals by the difference of the call counts. Setup (the runtime, the pool, opening
//! connections) is the same in both runs and cancels out. Instructions, unlike seconds, do not
//! depend on what else the machine is doing. `BENCH_CALLGRIND_KEEP=1` keeps callgrind's
//! output files (for `callgrind_annotate`).

use std::process::Command;

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig};

use crate::{reference, workloads, CONNECTIONS, KEYS, VALUE_LEN};

/// The environment variable that makes the harness a callgrind worker:
/// `ours|deadpool:<workload>:<calls>`, with the server's URL in `BENCH_URL`.
pub const WORKER: &str = "BENCH_CALLGRIND_WORKER";

/// Calls of the short and of the long run.
const SHORT: u64 = 1_000;
const LONG: u64 = 6_000;

/// The workloads counted, and whether the hand-written reference runs them too.
const COUNTED: &[(&str, bool)] = &[
    ("get", true),
    ("put", true),
    ("delete", false),
    ("transaction", false),
    ("scan", false),
];

/// Instructions per call of one workload: the backend's, the hand-written loop's.
#[derive(Clone, Debug)]
pub struct CallCost {
    pub name: &'static str,
    pub ours: Count,
    pub deadpool: Option<Count>,
}

/// Instructions per call: in every thread of the process, and in the calling task alone (the
/// call's future: not the driver's connection task nor the runtime's threads).
#[derive(Clone, Copy, Debug)]
pub struct Count {
    pub process: u64,
    pub task: u64,
}

/// Counts every workload of `COUNTED` on the server at `url` (the harness has loaded it).
pub fn measure(url: &str) -> anyhow::Result<Vec<CallCost>> {
    let mut costs = Vec::new();
    for &(name, hand_written) in COUNTED {
        eprintln!("callgrind: {name} ...");
        let ours = per_call(url, "ours", name)?;
        let deadpool = if hand_written {
            Some(per_call(url, "deadpool", name)?)
        } else {
            None
        };
        costs.push(CallCost {
            name,
            ours,
            deadpool,
        });
    }
    Ok(costs)
}

/// Instructions per call of `name` run by `side`: (long total - short total) / (LONG - SHORT).
fn per_call(url: &str, side: &str, name: &str) -> anyhow::Result<Count> {
    let short = total(url, side, name, SHORT)?;
    let long = total(url, side, name, LONG)?;
    let per = |long: u64, short: u64| -> anyhow::Result<u64> {
        anyhow::ensure!(
            long > short,
            "callgrind: {LONG} calls counted {long} instructions, {SHORT} calls {short}"
        );
        Ok((long - short) / (LONG - SHORT))
    };
    Ok(Count {
        process: per(long.process, short.process)?,
        task: per(long.task, short.task)?,
    })
}

/// The function whose inclusive cost is the calling task's: the call's future as the
/// harness builds it.
fn task_function(side: &str) -> &'static str {
    match side {
        "ours" => "perf::workloads::op::{{closure}}::{{closure}}",
        _ => "perf::reference::deadpool_op::{{closure}}::{{closure}}",
    }
}

/// The inclusive cost of `function` in callgrind's output `file` (by `callgrind_annotate`).
fn inclusive(file: &std::path::Path, function: &str) -> anyhow::Result<u64> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(file)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run callgrind_annotate: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains(&format!(":{function} ")))
        .and_then(|l| l.split_whitespace().next()?.replace(',', "").parse().ok())
        .ok_or_else(|| anyhow::anyhow!("callgrind_annotate lists no {function}"))
}

/// The instructions callgrind counted in one worker run: every thread of the process, and
/// the calling task's.
fn total(url: &str, side: &str, name: &str, calls: u64) -> anyhow::Result<Count> {
    let out_file = std::env::temp_dir().join(format!(
        "pgstate-callgrind-{}-{side}-{name}-{calls}.out",
        std::process::id()
    ));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg("--quiet")
        .arg(std::env::current_exe()?)
        .env(WORKER, format!("{side}:{name}:{calls}"))
        .env("BENCH_URL", url)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run valgrind (is it installed?): {e}"))?;
    anyhow::ensure!(status.success(), "callgrind worker failed: {status}");
    let text = std::fs::read_to_string(&out_file)?;
    let task = inclusive(&out_file, task_function(side));
    if std::env::var("BENCH_CALLGRIND_KEEP").is_ok_and(|v| v == "1") {
        eprintln!("callgrind: kept {}", out_file.display());
    } else {
        let _ = std::fs::remove_file(&out_file);
    }
    let process = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no totals line in callgrind's output"))?;
    Ok(Count {
        process,
        task: task?,
    })
}

/// The worker: `spec` is `side:workload:calls`. Opens the backend (or the hand-written pool)
/// as the harness does, warms up, then makes `calls` calls one after another from one task.
pub async fn worker(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split(':');
    let (Some(side), Some(name), Some(calls)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("{WORKER} must be side:workload:calls, not {spec:?}");
    };
    let calls: u64 = calls.parse()?;
    let name: &'static str = COUNTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, _)| *n)
        .ok_or_else(|| anyhow::anyhow!("unknown workload {name}"))?;
    let url = std::env::var("BENCH_URL")?;
    let backend = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone())
            .with_schema("bench")
            .with_pool_config(PostgresPoolConfig {
                min_connections: CONNECTIONS,
                max_connections: CONNECTIONS,
                ..PostgresPoolConfig::default()
            }),
    )
    .await?;
    // Every connection opened before counting starts (opening one costs about 57 million
    // instructions), and none opened while counting: the check at the end fails otherwise.
    let dead = reference::deadpool(&url, CONNECTIONS as usize)?;
    let opened = || -> u64 {
        match side {
            "deadpool" => dead.status().size as u64,
            _ => backend.get_pool_stats().connections_created,
        }
    };
    if side == "deadpool" {
        let mut held = Vec::new();
        for _ in 0..CONNECTIONS {
            held.push(dead.get().await?);
        }
    }
    let waited = std::time::Instant::now();
    while opened() < u64::from(CONNECTIONS) {
        anyhow::ensure!(
            waited.elapsed() < std::time::Duration::from_secs(120),
            "the pool did not open its {CONNECTIONS} connections"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = opened();
    let op = match side {
        "ours" => workloads::op(&backend, name, KEYS),
        "deadpool" => reference::deadpool_op(
            dead.clone(),
            backend.table(),
            name == "put",
            KEYS,
            VALUE_LEN,
        ),
        other => anyhow::bail!("unknown side {other}"),
    };
    // `BENCH_CALLGRIND_TASKS` (default 1): the calls spread over this many tasks (for
    // profiling concurrent calls by hand; the harness's table counts one task).
    let tasks: u64 = std::env::var("BENCH_CALLGRIND_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(t + 1) | 1;
                for _ in 0..(200 + calls) / tasks {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    op(t as usize, rng).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    anyhow::ensure!(
        opened() == before,
        "connections were opened while counting ({before} before, {} after)",
        opened()
    );
    Ok(())
}
