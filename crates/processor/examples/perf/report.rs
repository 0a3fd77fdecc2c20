//! The harness's report: Markdown tables (printed, and spliced into `BENCHMARKS.md` between
//! its `perf` markers), the goals of the performance issue with what was measured, and an
//! SVG plot of throughput against tasks.

use std::fmt::Write as _;
use std::path::PathBuf;

use pgstate_testcluster::Cluster;
use plotters::prelude::*;

use crate::callgrind::CallCost;
use crate::drive::Sample;
use crate::maintenance::Maintenance;

/// One workload at one task count.
pub struct Row {
    pub name: &'static str,
    pub rows_per_call: u32,
    pub tasks: usize,
    pub ours: Sample,
    /// pgbench's clients and figures, where it runs the same SQL.
    pub pgbench: Option<(usize, Sample)>,
    /// tokio-postgres with deadpool-postgres, for get and put.
    pub deadpool: Option<Sample>,
}

/// The bulk load of 100 000 new rows, rows per second (best of three each).
pub struct Bulk {
    pub batch_copy: f64,
    pub batch_put: f64,
    pub psql: f64,
}

/// Everything one run measured.
pub struct Report {
    header: String,
    pub rows: Vec<Row>,
    pub bulk: Option<Bulk>,
    /// Get at one task: on the 100 000-row table, on the 10 000 000-row one.
    pub big: Option<(Sample, Sample)>,
    /// The scan of the 10 000 000-row table: rows per second, highest client RSS (MiB).
    pub big_scan: Option<(f64, f64)>,
    /// clear, retention and the load after a clear.
    pub maintenance: Option<Maintenance>,
    /// Client instructions per call (callgrind).
    pub instructions: Option<Vec<CallCost>>,
    /// The previous run's section of `BENCHMARKS.md` (for the regression table).
    pub previous: Option<String>,
}

/// The repository's `BENCHMARKS.md`.
fn benchmarks_md() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md")
}

const BEGIN: &str = "<!-- perf:begin (written by `cargo run --release --example perf`) -->";
const END: &str = "<!-- perf:end -->";

impl Report {
    pub fn new(cluster: &Cluster, seconds: f64) -> anyhow::Result<Self> {
        let version = cluster.psql(0, "SHOW server_version")?;
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                let kib: f64 = s.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.0} GiB", kib / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "unknown memory".into());
        let when = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(Report {
            header: format!(
                "Run {when}: PostgreSQL {version}, {cpus} CPUs, {mem}, client and server on the \
                 same machine; fsync on, synchronous_commit on; 100 000 keys, 100-byte values; \
                 pool of 8 connections (default settings, test_on_acquire on); {seconds} s \
                 measured per figure after 0.5 s of warm-up; sslmode=disable."
            ),
            rows: Vec::new(),
            bulk: None,
            big: None,
            big_scan: None,
            maintenance: None,
            instructions: None,
            previous: std::fs::read_to_string(benchmarks_md())
                .ok()
                .and_then(|old| {
                    let (a, b) = (old.find(BEGIN)?, old.find(END)?);
                    (a < b).then(|| old[a..b].to_string())
                }),
        })
    }

    pub fn find(&self, name: &str, tasks: usize) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.name == name && r.tasks == tasks)
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}\n", self.header);
        let command = if self.big.is_some() {
            "BENCH_BIG=1 cargo run --release --example perf"
        } else {
            "cargo run --release --example perf"
        };
        let _ = writeln!(
            s,
            "Command: `{command}` (see its header for the settings).\n"
        );
        s.push_str(&self.goals());
        s.push('\n');
        s.push_str(&self.round3());
        s.push_str("\nRegression: this run's ratios beside the previous run's (from the section this run replaced).\n\n");
        s.push_str(&self.regression());
        s.push_str("\n![throughput against tasks](benchmarks/throughput.svg)\n\n");
        s.push_str("| workload | tasks | pgstate calls/s | rows/s | p50 µs | p99 µs | client RSS MiB | pgbench calls/s | ratio | pgbench p50 µs | deadpool calls/s | ratio |\n");
        s.push_str(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in &self.rows {
            let (pb, pb_ratio, pb_p50) = match r.pgbench {
                Some((c, p)) => (
                    format!("{:.0} (-c {c})", p.calls_per_s),
                    format!("{:.2}", r.ours.calls_per_s / p.calls_per_s),
                    format!("{:.0}", p.p50_us),
                ),
                None => ("".into(), "".into(), "".into()),
            };
            let (dp, dp_ratio) = match r.deadpool {
                Some(d) => (
                    format!("{:.0}", d.calls_per_s),
                    format!("{:.2}", r.ours.calls_per_s / d.calls_per_s),
                ),
                None => ("".into(), "".into()),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {pb} | {pb_ratio} | {pb_p50} | {dp} | {dp_ratio} |",
                r.name,
                r.tasks,
                r.ours.calls_per_s,
                r.ours.calls_per_s * f64::from(r.rows_per_call),
                r.ours.p50_us,
                r.ours.p99_us,
                r.ours.rss_mib,
            );
        }
        s
    }

    /// The performance issue's goals, each with its measured figure.
    fn goals(&self) -> String {
        let mut s =
            String::from("| goal | target | measured | met |\n| --- | --- | ---: | --- |\n");
        let mut goal = |what: &str, target: &str, value: Option<f64>, ok: fn(f64) -> bool| {
            let (v, met) = match value {
                Some(v) => (format!("{v:.2}"), if ok(v) { "yes" } else { "no" }),
                None => ("not run".into(), "—"),
            };
            let _ = writeln!(s, "| {what} | {target} | {v} | {met} |");
        };
        let vs_pgbench = |name: &str, tasks: usize| {
            let r = self.find(name, tasks)?;
            Some(r.ours.calls_per_s / r.pgbench?.1.calls_per_s)
        };
        goal(
            "get, 32 tasks, vs pgbench -c 8",
            ">= 1.5x",
            vs_pgbench("get", 32),
            |v| v >= 1.5,
        );
        goal(
            "put, 32 tasks, vs pgbench -c 8",
            ">= 1.5x",
            vs_pgbench("put", 32),
            |v| v >= 1.5,
        );
        let bulk = self.bulk.as_ref();
        goal(
            "batch_copy, 100 000 new rows, vs psql binary \\copy",
            ">= 1.0x",
            bulk.map(|b| b.batch_copy / b.psql),
            |v| v >= 1.0,
        );
        goal(
            "batch_copy vs batch_put, same rows",
            ">= 1.0x",
            bulk.map(|b| b.batch_copy / b.batch_put),
            |v| v >= 1.0,
        );
        let single = self.find("put", 1).map(|r| r.ours.calls_per_s);
        goal(
            "batch_copy vs a loop of single puts (put, 1 task)",
            ">= 10x",
            bulk.zip(single).map(|(b, p)| b.batch_copy / p),
            |v| v >= 10.0,
        );
        let p50 = self
            .find("get", 1)
            .and_then(|r| Some(r.ours.p50_us / r.pgbench?.1.p50_us));
        goal(
            "get p50 latency, 1 task, vs pgbench -c 1",
            "<= 1.2x",
            p50,
            |v| v <= 1.2,
        );
        let rss = ["get", "put"]
            .iter()
            .filter_map(|n| self.find(n, 32).map(|r| r.ours.rss_mib))
            .reduce(f64::max);
        goal(
            "client RSS under the 32-task get and put load, MiB",
            "<= 64",
            rss,
            |v| v <= 64.0,
        );
        goal(
            "get p50 latency, 10M rows vs 100k rows (1 task)",
            "<= 1.3x",
            self.big.map(|(small, big)| big.p50_us / small.p50_us),
            |v| v <= 1.3,
        );
        goal(
            "client RSS while `scan` reads a 10M-row table, MiB",
            "< 64",
            self.big_scan.map(|(_, rss)| rss),
            |v| v < 64.0,
        );
        if let Some((rate, _)) = self.big_scan {
            let _ = writeln!(s, "\nScan of the 10M-row table: {rate:.0} rows/s.");
        }
        if let Some(b) = bulk {
            let _ = writeln!(
                s,
                "\nBulk load, rows/s (best of 3): batch_copy {:.0}, batch_put {:.0}, psql binary \\copy {:.0}.",
                b.batch_copy, b.batch_put, b.psql
            );
        }
        s
    }

    /// Throughput of get and put against tasks: ours, pgbench, deadpool.
    fn plot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let tasks: Vec<usize> = {
            let mut t: Vec<usize> = self.rows.iter().map(|r| r.tasks).collect();
            t.sort_unstable();
            t.dedup();
            t
        };
        if tasks.is_empty() {
            return Ok(());
        }
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for name in ["get", "put"] {
            let line = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
                tasks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &t)| Some((i as f64, f(self.find(name, t)?)?)))
                    .collect()
            };
            series.push((
                format!("pgstate {name}"),
                line(&|r| Some(r.ours.calls_per_s)),
            ));
            series.push((
                format!("pgbench {name}"),
                line(&|r| Some(r.pgbench?.1.calls_per_s)),
            ));
            series.push((
                format!("deadpool {name}"),
                line(&|r| Some(r.deadpool?.calls_per_s)),
            ));
        }
        let top = series
            .iter()
            .flat_map(|(_, l)| l.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 1.1;
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("calls/s against tasks (pool of 8)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..(tasks.len() as f64 - 0.8), 0f64..top)?;
        let labels = tasks.clone();
        chart
            .configure_mesh()
            .x_labels(tasks.len())
            .x_label_formatter(&|x| {
                labels
                    .get(x.round().max(0.0) as usize)
                    .map(|t| format!("{t} tasks"))
                    .unwrap_or_default()
            })
            .y_desc("calls/s")
            .draw()?;
        for (i, (label, points)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    }

    /// Prints the report; if `write` and not `BENCH_NO_WRITE=1`, writes the plot and splices
    /// the report into `BENCHMARKS.md`.
    pub fn print_and_write(&self, write: bool) -> anyhow::Result<()> {
        let text = self.markdown();
        println!("{text}");
        if !write || std::env::var("BENCH_NO_WRITE").is_ok_and(|v| v == "1") {
            return Ok(());
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::create_dir_all(root.join("benchmarks"))?;
        self.plot(&root.join("benchmarks/throughput.svg"))?;
        let path = benchmarks_md();
        let old = std::fs::read_to_string(&path)?;
        let section = format!("{BEGIN}\n{text}{END}");
        let new = match (old.find(BEGIN), old.find(END)) {
            (Some(a), Some(b)) if a < b => {
                format!("{}{section}{}", &old[..a], &old[b + END.len()..])
            }
            _ => format!("{old}\n{section}\n"),
        };
        std::fs::write(&path, new)?;
        eprintln!("wrote BENCHMARKS.md and benchmarks/throughput.svg");
        Ok(())
    }
}
