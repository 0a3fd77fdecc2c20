//! `pgstate`: look at and operate a `processor::state` backend in PostgreSQL, and try it on a
//! throwaway local cluster.
//!
//! Each module is one group of commands: `dev` (a local cluster kept running), `demo` (the
//! guided tour), `data` (put, get, delete, list, import, export), `admin` (migrate, stats,
//! retention, archive, vacuum, checkpoints, locks, leaders), `events` (listen, notify),
//! `bench`, `serve` (metrics over HTTP), `watch` (the live view). `target` finds the server,
//! `exit` maps errors to exit codes, `prometheus` renders metrics as Prometheus text.

mod admin;
mod bench;
mod data;
mod demo;
mod dev;
mod devstate;
mod events;
mod exit;
mod jsonl;
mod keys;
mod progress;
mod prometheus;
mod savepoint;
mod serve;
mod target;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::exit::CliError;
use crate::target::Target;

/// Exit codes, for scripts.
const AFTER_HELP: &str = "\
Exit codes:
  0  success (also when a reader of the output, e.g. `head`, closed the pipe early)
  1  not found: `get` of an absent key (nothing on stdout), a checkpoint id that does not
     exist, nobody leading (`leader status`), no dev cluster (`dev status`), a state table
     that does not exist for a command that only reads
  2  bad usage or invalid input (nothing was written; `import` names the bad line)
  3  cannot reach or use the server: connection, TLS, configuration, permission, timeout;
     a dev cluster server that does not answer (`dev status`)
  4  any other failure (the message on stderr says what)

The server: --url, else $DATABASE_URL, else libpq's environment (PGHOST or PGSERVICE; the
other PG* variables, service files and ~/.pgpass fill what any URL leaves unset), else the
cluster `pgstate dev up` keeps running.
Passwords are never printed: URLs are shown with the password replaced by ***.";

/// Look at and operate a pgstate state backend in PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "pgstate", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// The server's URL (or libpq keyword string). Default: $DATABASE_URL, else libpq's
    /// environment (PGHOST or PGSERVICE), else the cluster `pgstate dev up` keeps running.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    url: Option<String>,
    /// The state table's schema.
    #[arg(long, global = true, default_value = "public")]
    schema: String,
    /// The state table.
    #[arg(long, global = true, default_value = "state_entries")]
    table: String,
    /// A replica's URL, for replication figures and, with --read-replicas, reads (repeat, or
    /// separate with commas). Default: the dev cluster's replicas when it is the server.
    #[arg(
        long = "replica",
        global = true,
        env = "PGSTATE_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    replicas: Vec<String>,
    /// Send reads to the replicas (they may not have replayed the previous command's writes
    /// yet: each command is a session of its own).
    #[arg(long, global = true)]
    read_replicas: bool,
    /// Where `pgstate dev` keeps its cluster's state.
    #[arg(long, global = true, env = "PGSTATE_DEV_DIR", hide_env_values = true)]
    dev_dir: Option<PathBuf>,
    /// Keys and prefixes are given in hex (`0x` optional), for keys that are not text.
    #[arg(long, global = true)]
    hex: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A local primary, two streaming replicas and TLS, kept running until `dev down`.
    Dev {
        #[command(subcommand)]
        action: dev::DevAction,
    },
    /// A guided tour of every feature group, against --url, or else a throwaway cluster it
    /// starts and stops itself.
    Demo,
    /// Store VALUE under KEY.
    #[command(after_help = "Examples:
  pgstate put user:1 alice
  pgstate put session:9 token --ttl 3600 --metadata '{\"user\": 1}'
  pgstate --hex put 0x00ff6b - < value.bin")]
    Put {
        /// The key (UTF-8, or hex with --hex).
        key: String,
        /// The value (UTF-8); `-` reads it from stdin, bytes as they are.
        value: String,
        /// Expire the entry after this many seconds.
        #[arg(long, allow_negative_numbers = true)]
        ttl: Option<f64>,
        /// A JSON object stored as the entry's metadata.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// Print KEY's value and a newline; exit code 1 and nothing on stdout when it is absent.
    #[command(after_help = "Examples:
  pgstate get user:1
  pgstate get blob:7 --raw > blob.bin
  pgstate --hex get 0x00ff6b")]
    Get {
        /// The key.
        key: String,
        /// Write the value's bytes exactly, without a newline.
        #[arg(long)]
        raw: bool,
    },
    /// KEY's entry as JSON: value size, version, metadata, times and the TTL left; exit code
    /// 1 when it is absent.
    Inspect {
        /// The key.
        key: String,
    },
    /// Delete KEY; prints 1 if it had a live entry, else 0.
    Delete {
        /// The key.
        key: String,
    },
    #[command(after_help = "Examples:
  pgstate list user: --limit 20
  pgstate list --raw | xxd")]
    /// Print the live keys starting with PREFIX, in key order, one per line (bytes a
    /// terminal would not show escaped as \xNN, a backslash as \\, unless --raw).
    List {
        /// The key prefix (all keys when absent).
        prefix: Option<String>,
        /// Print the keys' bytes as they are.
        #[arg(long)]
        raw: bool,
        /// At most this many keys.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Load entries from a JSON lines file through the bulk paths (checked whole first).
    #[command(after_help = "Example:
  pgstate export - --prefix user: | pgstate --schema copy import -
Each line: {\"key\": \"...\", \"value\": \"...\", \"metadata\": {...}, \"ttl_ms\": N}
(key_hex / value_hex for bytes that are not UTF-8).")]
    Import {
        /// The file (`-` for stdin): one object per line, as `export` writes them.
        file: PathBuf,
    },
    /// Write the live entries (starting with --prefix) to a JSON lines file (`-` for stdout).
    Export {
        /// The file.
        file: PathBuf,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Create or upgrade the schema (the embedded migrations) and say what it applied.
    #[command(after_help = "Examples:
  pgstate migrate info
  pgstate migrate --dry-run
  pgstate --schema app migrate")]
    Migrate {
        /// Say what would be applied, and apply nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(subcommand)]
        action: Option<admin::MigrateAction>,
    },
    /// Table, pool, replication and operation figures (a table for people, --json for
    /// scripts).
    Stats {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Retention policy.
    Retention {
        #[command(subcommand)]
        action: admin::RetentionAction,
    },
    /// Move live entries not written for --older-than seconds into an archive table.
    Archive {
        /// The archive table.
        #[arg(long, default_value = "state_entries_archive")]
        name: String,
        /// Age in seconds.
        #[arg(long)]
        older_than: f64,
    },
    /// VACUUM ANALYZE the state table.
    Vacuum {
        /// VACUUM FULL (rewrites the table under an exclusive lock).
        #[arg(long)]
        full: bool,
    },
    /// Named state checkpoints.
    Checkpoint {
        #[command(subcommand)]
        action: admin::CheckpointAction,
    },
    /// The advisory locks held now, with holders and waiters.
    Locks,
    /// Leader election.
    Leader {
        #[command(subcommand)]
        action: admin::LeaderAction,
    },
    /// Print each notification's payload on CHANNEL, one per line.
    Listen {
        /// The channel.
        channel: String,
        /// Exit after this many notifications.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Send PAYLOAD on CHANNEL.
    Notify {
        /// The channel.
        channel: String,
        /// The payload (at most 7999 bytes).
        payload: String,
    },
    /// Puts and gets from concurrent tasks for a while, with throughput and latencies.
    Bench(bench::BenchArgs),
    /// Serve the pgstate_ metrics in Prometheus' text format over HTTP.
    Metrics {
        /// The address to listen on (port 0 picks a free one; the address is printed).
        #[arg(long)]
        listen: String,
    },
    /// A live view refreshed each second: ops/s, latencies, connections, replicas, locks and
    /// leaders (q to quit).
    Watch {
        /// Leaderships to show (repeat for several).
        #[arg(long = "leader")]
        leaders: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgstate: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("pgstate: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let target = Target::new(&cli);
    match cli.command {
        Command::Dev { action } => dev::run(action, &target).await,
        Command::Demo => demo::run(&target).await,
        Command::Put {
            key,
            value,
            ttl,
            metadata,
        } => {
            let key = keys::key_bytes(&key, cli.hex)?;
            data::put(&target, &key, &value, ttl, metadata.as_deref()).await
        }
        Command::Get { key, raw } => {
            data::get(&target, &keys::key_bytes(&key, cli.hex)?, raw).await
        }
        Command::Inspect { key } => data::inspect(&target, &keys::key_bytes(&key, cli.hex)?).await,
        Command::Delete { key } => data::delete(&target, &keys::key_bytes(&key, cli.hex)?).await,
        Command::List { prefix, raw, limit } => {
            let prefix = keys::key_bytes(prefix.as_deref().unwrap_or(""), cli.hex)?;
            data::list(&target, &prefix, raw, limit).await
        }
        Command::Import { file } => data::import(&target, &file).await,
        Command::Export { file, prefix } => {
            data::export(&target, &file, &keys::key_bytes(&prefix, cli.hex)?).await
        }
        Command::Migrate { dry_run, action } => admin::migrate(&target, dry_run, action).await,
        Command::Stats { json } => admin::stats(&target, json).await,
        Command::Retention { action } => admin::retention(&target, action).await,
        Command::Archive { name, older_than } => admin::archive(&target, &name, older_than).await,
        Command::Vacuum { full } => admin::vacuum(&target, full).await,
        Command::Checkpoint { action } => admin::checkpoint(&target, action).await,
        Command::Locks => admin::locks(&target).await,
        Command::Leader { action } => admin::leader(&target, action).await,
        Command::Listen { channel, count } => events::listen(&target, &channel, count).await,
        Command::Notify { channel, payload } => events::notify(&target, &channel, &payload).await,
        Command::Bench(args) => bench::run(&target, args).await,
        Command::Metrics { listen } => serve::run(&target, &listen).await,
        Command::Watch { leaders } => watch::run(&target, leaders).await,
    }
}
