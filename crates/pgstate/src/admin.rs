//! `migrate`, `stats`, `retention apply`, `archive`, `vacuum`, `checkpoint`, `locks` and
//! `leader status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use processor::state::{
    EnhancedPostgresBackend, LockMode, MaintenanceOptions, NodeRole, RetentionPolicy, StateBackend,
    TableStatistics, MIGRATIONS,
};
use serde_json::{json, Value};

use crate::exit::{CliError, NOT_FOUND};
use crate::progress;
use crate::target::Target;

/// `pgstate retention ...`.
#[derive(Subcommand, Debug)]
pub enum RetentionAction {
    /// Delete expired entries and delete tombstones now (and, with --max-age, entries not
    /// written for that many seconds).
    Apply {
        /// Also delete live entries not written for this many seconds.
        #[arg(long)]
        max_age: Option<f64>,
    },
}

/// `pgstate checkpoint ...`.
#[derive(Subcommand, Debug)]
pub enum CheckpointAction {
    /// Take a named checkpoint of the live state (incremental: a cut, not a copy); prints
    /// its id.
    Create {
        /// The checkpoint's name.
        name: String,
    },
    /// The checkpoints, newest first: id, name, entries, time.
    List,
    /// Replace the live state with checkpoint ID (one transaction).
    Restore {
        /// The checkpoint's id (from `checkpoint list`).
        id: i64,
    },
    /// Write checkpoint ID's entries to FILE as JSON lines (`-`: standard output), to move
    /// it to another database.
    ///
    /// Example: pgstate checkpoint export 7 nightly.jsonl
    Export {
        /// The checkpoint's id (from `checkpoint list`).
        id: i64,
        /// Where to write (`-`: standard output).
        file: std::path::PathBuf,
    },
    /// Replace the live state with the entries of FILE (from `checkpoint export`), all or
    /// nothing, and take a checkpoint of it; prints its id.
    ///
    /// Example: pgstate checkpoint import nightly.jsonl --name nightly
    Import {
        /// The file (`-`: standard input).
        file: std::path::PathBuf,
        /// The new checkpoint's name.
        #[arg(long, default_value = "imported")]
        name: String,
    },
}

/// `pgstate leader ...`.
#[derive(Subcommand, Debug)]
pub enum LeaderAction {
    /// Who leads NAME now, the term and the lease left (exit code 1 when nobody does).
    Status {
        /// The leadership's name.
        name: String,
    },
}

fn seconds(s: f64, what: &str) -> Result<Duration, CliError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| CliError::usage(format!("{what} is a positive number of seconds")))
}

/// Seconds since the Unix epoch, for JSON.
pub fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `pgstate migrate` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MigrateAction {
    /// The migrations applied (version, name, when, checksum, whether the embedded file still
    /// matches) and those pending; changes nothing.
    Info,
}

/// `pgstate migrate [--dry-run] [info]`.
pub async fn migrate(
    target: &Target,
    dry_run: bool,
    action: Option<MigrateAction>,
) -> Result<(), CliError> {
    let (url, replicas) = target.resolve()?;
    let config = target.config(&url, &replicas);
    let before = EnhancedPostgresBackend::migration_status(&config).await?;
    let table = format!("\"{}\".\"{}\"", target.schema, target.table);
    if let Some(MigrateAction::Info) = action {
        println!(
            "{table}: {}",
            if before.table_exists {
                "exists"
            } else {
                "does not exist"
            }
        );
        for m in &before.applied {
            println!(
                "applied  {:03} {} at {} checksum {}{}",
                m.version,
                m.name,
                epoch(m.applied_at) as u64,
                m.checksum,
                if m.matches {
                    ""
                } else {
                    " (the embedded file differs)"
                }
            );
        }
        for m in &before.pending {
            println!("pending  {:03} {}", m.version, m.name);
        }
        return Ok(());
    }
    if dry_run {
        if before.pending.is_empty() {
            println!("{table}: schema up to date; nothing to apply");
        }
        for m in &before.pending {
            println!("would apply {:03} {}", m.version, m.name);
        }
        return Ok(());
    }
    let backend = target.open(config.clone()).await?;
    // Pending before, recorded now: applied by this run (or, at the same moment, by another
    // instance; migrations run under one lock, so each is applied once).
    let after = EnhancedPostgresBackend::migration_status(&config).await?;
    let applied = before
        .pending
        .iter()
        .filter(|m| after.applied.iter().any(|a| a.version == m.version));
    for m in applied {
        println!("applied {:03} {}", m.version, m.name);
    }
    let last = MIGRATIONS.last().map_or("none", |m| m.name);
    println!(
        "{}: schema up to date ({} migrations, the last {last})",
        backend.table(),
        MIGRATIONS.len()
    );
    Ok(())
}

fn table_json(t: &TableStatistics) -> Value {
    json!({
        "total_rows": t.total_rows,
        "active_rows": t.active_rows,
        "expired_rows": t.expired_rows,
        "counts_exact": t.counts_exact,
        "table_size_bytes": t.table_size,
        "indexes_size_bytes": t.indexes_size,
        "toast_size_bytes": t.toast_size,
        "dead_tuples": t.dead_tuples,
        "estimated_bloat_bytes": t.estimated_bloat_bytes,
        "last_vacuum": t.last_vacuum.map(epoch),
        "last_autovacuum": t.last_autovacuum.map(epoch),
        "last_analyze": t.last_analyze.map(epoch),
        "last_autoanalyze": t.last_autoanalyze.map(epoch),
        "partitions": t.partitions.iter().map(|p| json!({
            "name": p.name,
            "bound": p.bound,
            "statistics": table_json(&p.statistics),
        })).collect::<Vec<_>>(),
    })
}

fn role(r: NodeRole) -> &'static str {
    match r {
        NodeRole::Unknown => "unknown",
        NodeRole::Standby => "standby",
        NodeRole::Primary => "primary",
        NodeRole::Unreachable => "unreachable",
        _ => "other",
    }
}

/// Everything `stats` reports, as one JSON object. `operations` are this process's own: a
/// probe of 20 reads and one count, which times the round trips.
pub async fn stats_json(backend: &EnhancedPostgresBackend) -> Result<Value, CliError> {
    for _ in 0..20 {
        backend.get(b"pgstate-cli:probe").await?;
    }
    let table = backend.get_table_statistics().await?;
    let activity = backend.get_table_activity().await?;
    let count = backend.count().await?;
    let repl = backend.check_replication_status().await?;
    let pool = backend.get_pool_stats();
    let ops = backend.get_stats();
    Ok(json!({
        "table_name": backend.table(),
        "entries": count,
        "table": table_json(&table),
        "activity": {
            "rows_inserted": activity.rows_inserted,
            "rows_updated": activity.rows_updated,
            "rows_deleted": activity.rows_deleted,
            "index_scans": activity.index_scans,
            "sequential_scans": activity.sequential_scans,
        },
        "pool": {
            "size": pool.size, "idle": pool.idle, "active": pool.active,
            "max_size": pool.max_size, "min_idle": pool.min_idle, "waits": pool.waits,
            "timeouts": pool.timeouts, "connections_created": pool.connections_created,
        },
        "replication": {
            "is_replica": repl.is_replica,
            "primary": repl.primary,
            "lag_ms": repl.lag_ms,
            "lag_bytes": repl.lag_bytes,
            "connected_replicas": repl.connected_replicas,
            "primary_changes": repl.primary_changes,
            "replicas": repl.replicas.iter().map(|r| json!({
                "name": r.name, "role": role(r.role), "healthy": r.healthy,
                "in_rotation": r.in_rotation, "lag_ms": r.lag_ms, "lag_bytes": r.lag_bytes,
                "reads": r.reads,
            })).collect::<Vec<_>>(),
        },
        "operations": {
            "get_count": ops.get_count,
            "put_count": ops.put_count,
            "query_count": ops.query_count,
            "error_count": ops.error_count,
            "avg_query_duration_ms": ops.avg_query_duration_ms,
            "slow_query_count": ops.slow_query_count,
            "latencies": ops.latencies.iter().map(|l| json!({
                "operation": l.operation, "count": l.count,
                "p50_us": l.p50_us, "p95_us": l.p95_us, "p99_us": l.p99_us,
            })).collect::<Vec<_>>(),
            "reads_by_node": ops.reads_by_node.iter().map(|n| json!({
                "node": n.node, "primary": n.primary, "reads": n.reads,
            })).collect::<Vec<_>>(),
        },
    }))
}

/// Bytes for people.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `pgstate stats [--json]`.
pub async fn stats(target: &Target, as_json: bool) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let s = stats_json(&backend).await?;
    if as_json {
        println!("{s}");
        return Ok(());
    }
    let t = &s["table"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!("table        {}", backend.table());
    println!(
        "entries      {} live, {} expired or deleted, {} rows{}",
        n(&t["active_rows"]),
        n(&t["expired_rows"]),
        n(&t["total_rows"]),
        if t["counts_exact"].as_bool() == Some(true) {
            ""
        } else {
            " (estimated)"
        }
    );
    println!(
        "size         table {}, indexes {}, TOAST {}; {} dead tuples, ~{} bloat",
        size(n(&t["table_size_bytes"])),
        size(n(&t["indexes_size_bytes"])),
        size(n(&t["toast_size_bytes"])),
        n(&t["dead_tuples"]),
        size(n(&t["estimated_bloat_bytes"])),
    );
    let a = &s["activity"];
    println!(
        "activity     {} rows inserted, {} updated, {} deleted; {} index scans (every client, since the server's statistics were reset)",
        n(&a["rows_inserted"]),
        n(&a["rows_updated"]),
        n(&a["rows_deleted"]),
        n(&a["index_scans"])
    );
    let p = &s["pool"];
    println!(
        "pool         {} open ({} idle, {} in use) of {}",
        n(&p["size"]),
        n(&p["idle"]),
        n(&p["active"]),
        n(&p["max_size"])
    );
    print_replication_and_latency(&s);
    Ok(())
}

/// The replication and latency lines of `pgstate stats` from its JSON figures `s`.
fn print_replication_and_latency(s: &Value) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let r = &s["replication"];
    println!(
        "replication  primary {}, {} streaming replica(s), lag {} ms",
        r["primary"].as_str().unwrap_or("?"),
        n(&r["connected_replicas"]),
        n(&r["lag_ms"])
    );
    for rep in r["replicas"].as_array().into_iter().flatten() {
        println!(
            "  {:22} {:11} lag {} ms{}",
            rep["name"].as_str().unwrap_or("?"),
            rep["role"].as_str().unwrap_or("?"),
            n(&rep["lag_ms"]),
            if rep["in_rotation"].as_bool() == Some(true) {
                ", serving reads"
            } else {
                ""
            }
        );
    }
    println!("latency      (this command's own probe)  count    p50      p95      p99");
    for l in s["operations"]["latencies"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let ms = |v: &Value| format!("{:.2}ms", v.as_u64().unwrap_or(0) as f64 / 1000.0);
        println!(
            "  {:36} {:>6} {:>8} {:>8} {:>8}",
            l["operation"].as_str().unwrap_or("?"),
            n(&l["count"]),
            ms(&l["p50_us"]),
            ms(&l["p95_us"]),
            ms(&l["p99_us"])
        );
    }
}

/// `pgstate retention apply [--max-age S]`.
pub async fn retention(target: &Target, action: RetentionAction) -> Result<(), CliError> {
    let RetentionAction::Apply { max_age } = action;
    let max_age = max_age.map(|s| seconds(s, "--max-age")).transpose()?;
    let (url, replicas) = target.resolve()?;
    let mut config = target.config(&url, &replicas);
    if let Some(max_age) = max_age {
        config = config.with_retention_policy(RetentionPolicy {
            enabled: true,
            max_age,
            ..RetentionPolicy::default()
        });
    }
    let backend = EnhancedPostgresBackend::new(config).await?;
    let bar = progress::counter("deleting");
    let deleted = backend
        .apply_retention_policy_with(
            MaintenanceOptions::new().with_progress(|p| bar.set_position(p.done)),
        )
        .await?
        .entries_deleted;
    bar.finish_and_clear();
    println!("deleted {deleted} entries from {}", backend.table());
    Ok(())
}

/// `pgstate archive --name N --older-than S`.
pub async fn archive(target: &Target, name: &str, older_than: f64) -> Result<(), CliError> {
    let older_than = seconds(older_than, "--older-than")?;
    let backend = target.backend().await?;
    let bar = progress::counter("archiving");
    let moved = backend
        .archive_old_data_with(
            name,
            older_than,
            MaintenanceOptions::new().with_progress(|p| bar.set_position(p.done)),
        )
        .await?;
    bar.finish_and_clear();
    println!("moved {moved} entries into {name}");
    Ok(())
}

/// `pgstate vacuum [--full]`.
pub async fn vacuum(target: &Target, full: bool) -> Result<(), CliError> {
    let backend = target.backend().await?;
    let bar = progress::counter(if full {
        "VACUUM FULL"
    } else {
        "VACUUM ANALYZE"
    });
    bar.enable_steady_tick(Duration::from_millis(200));
    backend.vacuum_analyze(full).await?;
    bar.finish_and_clear();
    let t = backend.get_table_statistics().await?;
    println!(
        "vacuumed {}: table {}, {} dead tuples",
        backend.table(),
        size(t.table_size),
        t.dead_tuples
    );
    Ok(())
}

/// `pgstate checkpoint create | list | restore | export | import`.
pub async fn checkpoint(target: &Target, action: CheckpointAction) -> Result<(), CliError> {
    match &action {
        CheckpointAction::Export { id, file } => {
            return crate::savepoint::export(target, *id, file).await
        }
        CheckpointAction::Import { file, name } => {
            return crate::savepoint::import(target, file, name).await
        }
        _ => {}
    }
    let backend = match action {
        CheckpointAction::List => target.existing().await?,
        _ => target.backend().await?,
    };
    match action {
        CheckpointAction::Create { name } => {
            let bar = progress::counter("counting entries");
            let info = backend
                .create_checkpoint_with(
                    &name,
                    MaintenanceOptions::new().with_progress(|p| bar.set_position(p.done)),
                )
                .await?;
            bar.finish_and_clear();
            println!("{}", info.id);
            eprintln!(
                "checkpoint {} ({name}): {} entries",
                info.id, info.entry_count
            );
        }
        CheckpointAction::List => {
            for c in backend.list_checkpoints().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    c.id,
                    c.name,
                    c.entry_count,
                    c.created_at.timestamp()
                );
            }
        }
        CheckpointAction::Restore { id } => {
            if !backend.list_checkpoints().await?.iter().any(|c| c.id == id) {
                return Err(CliError::new(NOT_FOUND, format!("no checkpoint {id}")));
            }
            let restored = backend.restore_checkpoint(id).await?;
            println!("restored {restored} entries from checkpoint {id}");
        }
        CheckpointAction::Export { .. } | CheckpointAction::Import { .. } => {}
    }
    Ok(())
}

/// `pgstate locks`.
pub async fn locks(target: &Target) -> Result<(), CliError> {
    let backend = target.existing().await?;
    let locks = backend.list_advisory_locks().await?;
    if locks.is_empty() {
        eprintln!("no advisory locks held");
    }
    for l in locks {
        println!(
            "{}\t{}\t{}\tpid {}\t{} waiting\t{}",
            l.key,
            l.name.as_deref().unwrap_or("-"),
            match l.mode {
                LockMode::Exclusive => "exclusive",
                LockMode::Shared => "shared",
            },
            l.backend_pid,
            l.waiters,
            l.holder_id.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

/// `pgstate leader status NAME`.
pub async fn leader(target: &Target, action: LeaderAction) -> Result<(), CliError> {
    let LeaderAction::Status { name } = action;
    let backend = target.existing().await?;
    match backend.current_leader(&name).await? {
        Some(l) => {
            println!(
                "{}\tterm {}\t{}\tlease {:.1}s left",
                l.name,
                l.term,
                l.holder_id,
                l.lease_remaining.as_secs_f64()
            );
            Ok(())
        }
        None => Err(CliError::new(NOT_FOUND, format!("nobody leads {name:?}"))),
    }
}
