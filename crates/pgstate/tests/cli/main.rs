//! The `pgstate` binary driven end to end against real servers: the test cluster of this
//! process (a primary and two streaming replicas with TLS), or clusters the commands start.

mod data;
mod dev;
mod libpq;
mod live;
mod round2;
mod savepoints;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The password of the test clusters: no command may print it.
pub const PASSWORD: &str = pgstate_testcluster::PASSWORD;

/// The URL of the shared test cluster's primary.
pub fn url() -> String {
    pgstate_testcluster::shared().url()
}

/// A schema no other test uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "cli_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An empty directory of its own (for dev state and files).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(tag));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// `pgstate` with no server in its environment (no `DATABASE_URL`, an empty dev directory),
/// so each test says where it goes.
pub fn bare() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgstate"));
    cmd.env_remove("DATABASE_URL")
        .env("PGSTATE_DEV_DIR", scratch("nodev"))
        .stdin(Stdio::null());
    cmd
}

/// `pgstate --url <test cluster> --schema <schema> ARGS`.
pub fn pgstate(schema: &str, args: &[&str]) -> Command {
    let mut cmd = bare();
    cmd.args(["--url", &url(), "--schema", schema]).args(args);
    cmd
}

/// Runs `cmd` and returns its output, checking that no password shows in it.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running pgstate");
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !String::from_utf8_lossy(stream).contains(PASSWORD),
            "a password was printed: {cmd:?}"
        );
    }
    out
}

/// Runs `cmd`, expecting exit code `code`; returns stdout.
pub fn expect(cmd: &mut Command, code: i32) -> String {
    let out = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

/// Runs `cmd`, expecting success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    expect(cmd, 0)
}

#[test]
fn help_documents_the_commands_and_exit_codes() {
    let help = ok(bare().arg("--help"));
    for word in [
        "dev",
        "demo",
        "put",
        "get",
        "delete",
        "list",
        "import",
        "export",
        "migrate",
        "stats",
        "retention",
        "archive",
        "vacuum",
        "checkpoint",
        "locks",
        "leader",
        "listen",
        "notify",
        "bench",
        "metrics",
        "watch",
        "Exit codes",
        "DATABASE_URL",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
    // Bad usage: clap's exit code 2.
    expect(bare().arg("frobnicate"), 2);
}

#[test]
fn without_any_server_a_command_fails_clearly_with_exit_code_3() {
    let out = run(bare().args(["get", "k"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pgstate dev up"), "{err}");
}
