//! The goals of the performance issue's third round (no workload below its C reference,
//! `clear()` in O(1)), each with what this run measured, and the regression table: every
//! ratio of this run beside the previous run's, read from `BENCHMARKS.md` before the run
//! rewrites it.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::report::Report;

/// One goal: its name (also its key in the regression table), target, value and test.
struct Goal {
    name: String,
    target: &'static str,
    value: Option<f64>,
    met: Option<bool>,
}

/// The cells of a Markdown table row (`| a | b |` -> `["a", "b"]`), or `None` for another
/// line.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// A goal's figure: a ratio with two decimals, a count without.
fn figure(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    fn round3_goals(&self) -> Vec<Goal> {
        let vs = |name: &str, tasks: usize| {
            let r = self.find(name, tasks)?;
            Some(r.ours.calls_per_s / r.pgbench?.1.calls_per_s)
        };
        let mut goals = Vec::new();
        let mut at_least = |name: String, target: &'static str, value: Option<f64>, min: f64| {
            goals.push(Goal {
                name,
                target,
                value,
                met: value.map(|v| v >= min),
            })
        };
        // Named as the regression table names every workload's ratio to pgbench (pgbench
        // runs -c 1 for one task, -c 8 beyond).
        let ratio = |name: &str, tasks: usize| format!("{name}, {tasks} tasks, vs pgbench");
        for tasks in [1, 8, 32] {
            let name = ratio("transaction", tasks);
            at_least(name, ">= 1.0", vs("transaction", tasks), 1.0);
        }
        for tasks in [1, 8] {
            at_least(ratio("scan", tasks), ">= 1.0", vs("scan", tasks), 1.0);
        }
        for name in ["get", "query_by_metadata", "delete"] {
            at_least(ratio(name, 1), ">= 1.0", vs(name, 1), 1.0);
        }
        let m = self.maintenance;
        at_least(
            "retention of 1M expired rows vs psql deleting them".into(),
            ">= 0.5",
            m.map(|m| m.retention / m.retention_psql),
            0.5,
        );
        at_least(
            "batch_copy of 100 000 rows right after clear() vs psql binary \\copy into an empty table".into(),
            ">= 1.0",
            m.map(|m| m.after_clear / m.copy_psql),
            1.0,
        );
        for name in ["get", "put"] {
            at_least(ratio(name, 32), ">= 3.0", vs(name, 32), 3.0);
        }
        let get_instructions = self
            .instructions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.name == "get"))
            .map(|c| c.ours.task as f64);
        goals.push(Goal {
            name: "get, 1 task, client instructions per call in the calling task (callgrind)"
                .into(),
            target: "<= 12000",
            value: get_instructions,
            met: get_instructions.map(|v| v <= 12_000.0),
        });
        goals.push(Goal {
            name: "clear() of 1M entries, seconds (psql's TRUNCATE: see below)".into(),
            target: "no write per row",
            value: m.map(|m| m.clear_s),
            met: None,
        });
        goals
    }

    /// The round-3 goals table.
    pub fn round3(&self) -> String {
        let mut s = String::from(
            "| goal (performance, round 3) | target | measured | met |\n| --- | --- | ---: | --- |\n",
        );
        for g in self.round3_goals() {
            let value = g.value.map_or("not run".into(), figure);
            let met = match g.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            };
            let _ = writeln!(s, "| {} | {} | {value} | {met} |", g.name, g.target);
        }
        if let Some(m) = self.maintenance {
            let _ = writeln!(
                s,
                "\nclear() {:.3} s against psql's TRUNCATE {:.3} s; retention {:.0} rows/s against \
                 psql's DELETE {:.0}; after clear(), batch_copy {:.0} rows/s against psql's \\copy {:.0}.",
                m.clear_s, m.truncate_s, m.retention, m.retention_psql, m.after_clear, m.copy_psql
            );
        }
        if let Some(costs) = &self.instructions {
            s.push_str(
                "\nClient instructions per call (valgrind --tool=callgrind, one task; the \
                 difference between a run of 6 000 calls and one of 1 000, so that start-up \
                 cancels out). The calling task: the call's future alone; the process: every \
                 thread, the driver's connection task and the runtime included.\n\n\
                 | call | pgstate, calling task | by hand, calling task | pgstate, process | \
                 by hand, process |\n| --- | ---: | ---: | ---: | ---: |\n",
            );
            for c in costs {
                let (task, process) = c.deadpool.map_or(("—".into(), "—".into()), |d| {
                    (d.task.to_string(), d.process.to_string())
                });
                let _ = writeln!(
                    s,
                    "| {} | {} | {task} | {} | {process} |",
                    c.name, c.ours.task, c.ours.process
                );
            }
        }
        s
    }

    /// This run's ratios beside the previous run's: the round-3 goals (by name) and every
    /// workload's ratio to pgbench (by workload and tasks).
    pub fn regression(&self) -> String {
        let previous = self.previous.as_deref().unwrap_or("");
        let mut before: HashMap<String, String> = HashMap::new();
        for line in previous.lines() {
            let Some(c) = cells(line) else { continue };
            if c.len() == 4 {
                before.insert(c[0].to_string(), c[2].to_string());
            } else if c.len() == 12 && c[1].parse::<usize>().is_ok() && !c[8].is_empty() {
                before.insert(
                    format!("{}, {} tasks, vs pgbench", c[0], c[1]),
                    c[8].to_string(),
                );
            }
        }
        let was = |name: &str| before.get(name).cloned().unwrap_or_else(|| "—".into());
        let mut s = String::from("| figure | previous run | this run |\n| --- | ---: | ---: |\n");
        let goals = self.round3_goals();
        for g in &goals {
            let now = g.value.map_or("not run".into(), figure);
            let _ = writeln!(s, "| {} | {} | {now} |", g.name, was(&g.name));
        }
        for r in &self.rows {
            let Some((_, p)) = r.pgbench else { continue };
            let name = format!("{}, {} tasks, vs pgbench", r.name, r.tasks);
            if goals.iter().any(|g| g.name == name) {
                continue;
            }
            let now = format!("{:.2}", r.ours.calls_per_s / p.calls_per_s);
            let _ = writeln!(s, "| {name} | {} | {now} |", was(&name));
        }
        s
    }
}
