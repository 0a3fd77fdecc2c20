//! Running the servers' tools as the server user (the `postgres` user when root), and the
//! clean-up watchdogs of clusters and formations.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use crate::{err, is_root, lookup_user, Error, Result, User};

/// The user to run servers and their tools as: the `postgres` user when running as root
/// (initdb and pg_autoctl refuse root), else `None` (the current user).
pub(crate) fn server_user() -> Result<Option<User>> {
    if !is_root() {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or_else(|| {
        Error(
            "running as root, but there is no 'postgres' user to run the servers as \
             (initdb refuses root): install the Debian package postgresql, which creates it"
                .into(),
        )
    })
}

/// Runs `tool` from `bindir` in `dir` (as `run_as` when given), without the caller's
/// PGHOST/PGPORT/PGDATABASE; its output, or an error with its output when it failed.
pub(crate) fn run_server_tool(
    run_as: Option<&User>,
    bindir: &Path,
    dir: &Path,
    tool: &str,
    args: &[&str],
) -> Result<Output> {
    let path = bindir.join(tool);
    let mut cmd = match run_as {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(&u.name).arg("--").arg(&path);
            c
        }
        None => Command::new(&path),
    };
    cmd.args(args).stdin(Stdio::null()).current_dir(dir);
    cmd.env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATABASE");
    // The cluster's password, for the tools that connect (never on their command line).
    let passfile = dir.join(PASSFILE);
    if passfile.is_file() {
        cmd.env("PGPASSFILE", passfile);
    }
    let out = cmd
        .output()
        .map_err(|e| Error(format!("running {}: {e}", path.display())))?;
    if !out.status.success() {
        return err(format!(
            "{tool} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// Runs one SQL statement with `psql` (from `bindir`, as `run_as`) on the server `target`
/// names (`-h`, `-p`, `-U`, `-d` arguments), stopping at the first error; its unaligned,
/// trimmed output.
pub(crate) fn psql(
    run_as: Option<&User>,
    bindir: &Path,
    dir: &Path,
    target: &[&str],
    sql: &str,
) -> Result<String> {
    let mut args = vec!["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"];
    args.extend_from_slice(target);
    args.extend(["-c", sql]);
    let out = run_server_tool(run_as, bindir, dir, "psql", &args)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The file in a cluster's directory that holds its password for libpq (`PGPASSFILE`).
pub(crate) const PASSFILE: &str = "pgpass";

/// 32 random hexadecimal digits from the operating system.
pub(crate) fn random_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error(format!("reading /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Gives `path` to `run_as`, when given.
pub(crate) fn chown_to(run_as: Option<&User>, path: &Path) -> Result<()> {
    if let Some(u) = run_as {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| Error(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

/// `runuser -u <user> -- ` for a shell command run as `run_as`, or nothing.
pub(crate) fn runuser_prefix(run_as: Option<&User>) -> String {
    run_as.map_or_else(String::new, |u| format!("runuser -u {} -- ", u.name))
}

/// Starts a process in its own session that waits until this process is gone, then runs the
/// shell command `cleanup`.
pub(crate) fn spawn_cleanup(cleanup: String) -> Result<Child> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    Command::new("setsid")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error(format!("starting the clean-up watchdog (setsid sh): {e}")))
}
