//! A pg_auto_failover formation on loopback: a monitor and three data nodes (a primary and two
//! secondaries, `number_sync_standbys` 1), run by the machine's `pg_autoctl` (Debian's
//! `postgresql-15-auto-failover`) with the server binaries the clusters use. Every server
//! listens on 127.0.0.1 only.
//!
//! Why three: with one secondary, pg_auto_failover keeps the primary writable when that
//! secondary looks unhealthy (health checks missed on a loaded machine) or while a new primary
//! waits for the old one to rejoin: the primary goes to `wait_primary`, which empties
//! `synchronous_standby_names`. Commits then are acknowledged from the primary alone (those
//! already waiting for the standby are released as if it had answered), and they are lost if
//! that node is lost, or demoted and rewound, before the standby has them. With two
//! secondaries and `number_sync_standbys` 1, the primary (`synchronous_standby_names =
//! 'ANY 1 (...)'`) stays `primary` even while both standbys look unhealthy (seen in the
//! switchover test's events), so it never acknowledges a commit that no standby has flushed,
//! and a failover promotes the most advanced standby, which has every acknowledged commit.
//! (After a promotion, the new primary is `wait_primary` until another node follows it, about
//! 1.4 s in the switchover test: what it acknowledges then exists on it alone until a standby
//! has it, as README's Durability section says.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::processes::{kill_group, kill_matching, kill_tree};
use crate::tools::{chown_to, psql, run_server_tool, runuser_prefix, server_user, spawn_cleanup};
use crate::{err, find_bindir, free_port, Error, Result, User};

/// Data nodes in a formation: a primary and two secondaries.
pub const DATA_NODES: usize = 3;
/// The formation's `number_sync_standbys`: a commit is acknowledged once one standby has it.
pub const NUMBER_SYNC_STANDBYS: u32 = 1;

/// A running formation. Dropping it stops every process and removes its files; if the process
/// that started it dies first, its watchdog does.
pub struct Formation {
    dir: PathBuf,
    bindir: PathBuf,
    pg_autoctl: PathBuf,
    run_as: Option<User>,
    monitor_port: u16,
    /// Data nodes: port, data directory, the `pg_autoctl ... --run` process (a session leader,
    /// so its whole process group can be killed).
    nodes: Vec<(u16, PathBuf, Option<Child>)>,
    monitor: Option<Child>,
    watchdog: Option<Child>,
}

/// The `pg_autoctl` binary: on the PATH, else Debian's `/usr/bin/pg_autoctl`.
pub fn find_pg_autoctl() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("pg_autoctl");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let debian = PathBuf::from("/usr/bin/pg_autoctl");
    if debian.is_file() {
        return Ok(debian);
    }
    err(
        "pg_autoctl not found on the PATH or at /usr/bin/pg_autoctl: install the Debian package \
         postgresql-15-auto-failover (scripts/setup.sh does)",
    )
}

impl Formation {
    /// Starts the monitor and [`DATA_NODES`] data nodes, with health checks tuned for tests (a
    /// node is considered unhealthy after about 5 s instead of 20 s), sets the formation's
    /// `number_sync_standbys` to [`NUMBER_SYNC_STANDBYS`], and waits until node 0 is primary,
    /// the others secondaries, and the primary has applied the setting.
    pub fn start() -> Result<Formation> {
        let bindir = find_bindir()?;
        let pg_autoctl = find_pg_autoctl()?;
        let run_as = server_user()?;
        let dir = std::env::temp_dir().join(format!(
            "pgstate-formation-{}-{}",
            std::process::id(),
            free_port()?
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| Error(format!("creating {}: {e}", dir.display())))?;
        let mut f = Formation {
            dir,
            bindir,
            pg_autoctl,
            run_as,
            monitor_port: free_port()?,
            nodes: Vec::new(),
            monitor: None,
            watchdog: None,
        };
        chown_to(f.run_as.as_ref(), &f.dir)?;
        f.spawn_watchdog()?;
        let monitor_dir = f.dir.join("monitor");
        let port = f.monitor_port.to_string();
        f.monitor = Some(f.create(
            &[
                "create",
                "monitor",
                "--pgdata",
                &monitor_dir.to_string_lossy(),
            ],
            &port,
            "monitor.log",
        )?);
        f.wait_for(
            Duration::from_secs(60),
            "the monitor to accept connections",
            |f| f.monitor_sql("SELECT 1").is_ok(),
        )?;
        // As the server user over the local socket (initdb's trust), one statement at a time.
        let port = f.monitor_port.to_string();
        for sql in [
            "ALTER SYSTEM SET pgautofailover.health_check_period = 1000",
            "ALTER SYSTEM SET pgautofailover.health_check_retry_delay = 500",
            "ALTER SYSTEM SET pgautofailover.health_check_max_retries = 1",
            "ALTER SYSTEM SET pgautofailover.node_considered_unhealthy_timeout = 5000",
            // How long the monitor waits for a lost primary to demote itself before promoting
            // the secondary (default 30 s).
            "ALTER SYSTEM SET pgautofailover.primary_demote_timeout = 5000",
            "SELECT pg_reload_conf()",
        ] {
            psql(
                f.run_as.as_ref(),
                &f.bindir,
                &f.dir,
                &["-p", &port, "-d", "pg_auto_failover"],
                sql,
            )?;
        }
        let monitor_uri = format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            f.monitor_port
        );
        for i in 1..=DATA_NODES {
            let port = free_port()?;
            let data = f.dir.join(format!("node{i}"));
            let child = f.create(
                &[
                    "create",
                    "postgres",
                    "--pgdata",
                    &data.to_string_lossy(),
                    "--monitor",
                    &monitor_uri,
                ],
                &port.to_string(),
                &format!("node{i}.log"),
            )?;
            f.nodes.push((port, data, Some(child)));
            // One at a time (so node i is the monitor's node i + 1): the first is the only
            // node ("single"), each next one is cloned from the primary and settles as a
            // secondary.
            let want: Vec<&str> = if i == 1 {
                vec!["single"]
            } else {
                std::iter::once("primary")
                    .chain(std::iter::repeat_n("secondary", i - 1))
                    .collect()
            };
            f.wait_for(Duration::from_secs(120), &format!("states {want:?}"), |f| {
                f.states().is_ok_and(|s| s == want)
            })?;
        }
        // The monitor refuses N unless N + 1 standbys can be candidates, hence after the
        // last node joined. The primary applies it (apply_settings, then primary again).
        f.monitor_sql(&format!(
            "SELECT pgautofailover.set_formation_number_sync_standbys('default', \
             {NUMBER_SYNC_STANDBYS})"
        ))?;
        let want = format!("ANY {NUMBER_SYNC_STANDBYS} (");
        f.wait_for(
            Duration::from_secs(60),
            &format!("the primary to apply number_sync_standbys {NUMBER_SYNC_STANDBYS}"),
            |f| {
                f.settled()
                    && f.primary().is_ok_and(|p| {
                        f.synchronous_standby_names(p)
                            .is_ok_and(|s| s.starts_with(&want))
                    })
            },
        )?;
        Ok(f)
    }

    /// Whether every node reports the state the monitor assigned it, one is primary and the
    /// others secondaries.
    pub fn settled(&self) -> bool {
        self.monitor_sql(
            "SELECT count(*) FILTER (WHERE reportedstate = goalstate AND goalstate = 'primary') = 1 \
             AND count(*) FILTER (WHERE reportedstate = goalstate AND goalstate = 'secondary') \
             = count(*) - 1 FROM pgautofailover.node",
        )
        .is_ok_and(|out| out == "t")
    }

    /// The formation's `number_sync_standbys` on the monitor.
    pub fn number_sync_standbys(&self) -> Result<u32> {
        let out = self.monitor_sql(
            "SELECT number_sync_standbys FROM pgautofailover.formation \
             WHERE formationid = 'default'",
        )?;
        out.parse()
            .map_err(|e| Error(format!("number_sync_standbys {out:?}: {e}")))
    }

    /// Node `i`'s `synchronous_standby_names` (as pg_auto_failover set it), read on the node.
    pub fn synchronous_standby_names(&self, i: usize) -> Result<String> {
        let port = self.nodes[i].0.to_string();
        psql(
            self.run_as.as_ref(),
            &self.bindir,
            &self.dir,
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ],
            "SHOW synchronous_standby_names",
        )
    }

    /// How many data nodes the formation has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The formation's multi-host URL, as `pg_autoctl show uri` gives it
    /// (`target_session_attrs=read-write`: whichever node is primary), for the superuser
    /// (trust authentication on loopback), without TLS.
    pub fn uri(&self) -> String {
        self.uri_to("read-write")
    }

    /// The same hosts with `target_session_attrs=read-only`: whichever node is a standby now.
    pub fn standby_uri(&self) -> String {
        self.uri_to("read-only")
    }

    fn uri_to(&self, attrs: &str) -> String {
        let hosts: Vec<String> = (0..self.nodes.len()).map(|i| self.address(i)).collect();
        format!(
            "postgresql://postgres@{}/postgres?target_session_attrs={attrs}&sslmode=disable",
            hosts.join(",")
        )
    }

    /// Node `i`'s `address:port`, as the server names itself (`inet_server_addr()`).
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].0)
    }

    /// The URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.nodes[i].0
        )
    }

    /// The monitor's events (`pgautofailover.event`), one per line: time, node, reported and
    /// goal state, reported LSN, description. For diagnosing a failed test.
    pub fn events(&self) -> Result<String> {
        self.monitor_sql(
            "SELECT string_agg(format('%s node %s %s->%s lsn %s: %s', eventtime::time, nodeid, \
             reportedstate, goalstate, reportedlsn, description), E'\\n' ORDER BY eventid) \
             FROM pgautofailover.event",
        )
    }

    /// Each node's reported state on the monitor (`primary`, `secondary`, `wait_primary`,
    /// `demoted`, ...), in node order.
    pub fn states(&self) -> Result<Vec<String>> {
        let out = self.monitor_sql(
            "SELECT string_agg(reportedstate::text, ',' ORDER BY nodeid) FROM pgautofailover.node",
        )?;
        Ok(out.split(',').map(str::to_string).collect())
    }

    /// The node that is primary now (or `wait_primary` or `single`: primary without a
    /// standby): the node reported one of those states and the monitor's goal for it is one
    /// of them too (so also while it moves between them, `wait_primary` to `primary` after a
    /// promotion; not an old primary the monitor is demoting, whose last report stays).
    pub fn primary(&self) -> Result<usize> {
        let out = self.monitor_sql(
            "SELECT string_agg(reportedstate::text || '/' || goalstate::text, ',' ORDER BY nodeid) \
             FROM pgautofailover.node",
        )?;
        primary_of(&out).ok_or_else(|| Error(format!("no node is primary: {out}")))
    }

    /// Stops node `i`'s Postgres with `pg_ctl stop -m immediate` (as a crash of the server
    /// would: no shutdown checkpoint, every session cut). Its `pg_autoctl` keeps running and
    /// restarts it, unless the monitor fails over first.
    /// Returns once that postmaster is gone (pg_ctl's own wait would see the restarted one).
    pub fn stop_postgres_immediately(&self, i: usize) -> Result<()> {
        let data = &self.nodes[i].1;
        let pid_file = data.join("postmaster.pid");
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
            .ok_or_else(|| Error(format!("no {}: is node {i} running?", pid_file.display())))?;
        let d = data.to_string_lossy().to_string();
        self.run_tool("pg_ctl", &["-D", &d, "-m", "immediate", "-W", "stop"])?;
        let proc_dir = Path::new("/proc").join(pid.trim());
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_dir.exists() {
            if Instant::now() > deadline {
                return err(format!(
                    "postmaster {pid} of node {i} still runs 10 s after the stop"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops node `i` the hard way, as a crashed host would: its `pg_autoctl` and Postgres
    /// (every process descending from the node's `pg_autoctl`) are killed with SIGKILL. The
    /// server's backends exit when they see their postmaster gone.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].2.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
        let port = self.nodes[i].0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if Instant::now() > deadline {
                return err(format!("node {i} still accepts connections on {port}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts node `i` again after [`kill_node`](Self::kill_node) (`pg_autoctl run`): it
    /// asks the monitor what to be and, when another node was promoted meanwhile, rejoins
    /// as a secondary (rewinding its data with `pg_rewind`).
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].2.is_some() {
            return err(format!("node {i} is running"));
        }
        let data = self.nodes[i].1.to_string_lossy().to_string();
        let child = self.spawn(&["run", "--pgdata", &data], &format!("node{}.log", i + 1))?;
        self.nodes[i].2 = Some(child);
        Ok(())
    }

    /// A planned switchover: `pg_autoctl perform switchover`, which has the monitor demote
    /// the primary and promote the secondary, and waits until it is done.
    pub fn switchover(&self) -> Result<()> {
        let monitor = self.dir.join("monitor").to_string_lossy().to_string();
        let mut cmd = Command::new("timeout");
        cmd.arg("150");
        self.autoctl_command(&mut cmd);
        let out = cmd
            .args([
                "perform",
                "switchover",
                "--pgdata",
                &monitor,
                "--wait",
                "120",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error(format!("running pg_autoctl perform switchover: {e}")))?;
        if !out.status.success() {
            return err(format!(
                "pg_autoctl perform switchover failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Polls `ok` every 200 ms until it holds, or fails after `limit` naming `what`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        ok: impl Fn(&Formation) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !ok(self) {
            if Instant::now() > deadline {
                let logs: String = std::iter::once("monitor.log".to_string())
                    .chain((1..=self.nodes.len()).map(|i| format!("node{i}.log")))
                    .map(|l| {
                        let text = fs::read_to_string(self.dir.join(&l)).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(15).collect();
                        format!(
                            "--- {l}\n{}\n",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                return err(format!(
                    "waited {limit:?} for {what}; states {:?}\n{logs}",
                    self.states()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Runs `sql` on the monitor's database with psql; its unaligned output.
    fn monitor_sql(&self, sql: &str) -> Result<String> {
        let port = self.monitor_port.to_string();
        psql(
            self.run_as.as_ref(),
            &self.bindir,
            &self.dir,
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "autoctl_node",
                "-d",
                "pg_auto_failover",
            ],
            sql,
        )
    }

    /// Starts `pg_autoctl <args> --pgport <port> ... --run`: creates a monitor or node and
    /// runs it.
    fn create(&self, args: &[&str], port: &str, log: &str) -> Result<Child> {
        let mut all = args.to_vec();
        all.extend([
            "--pgport",
            port,
            "--hostname",
            "127.0.0.1",
            // pg_autoctl's default is '*' (every interface).
            "--listen",
            "127.0.0.1",
            "--auth",
            "trust",
            "--no-ssl",
            "--run",
        ]);
        self.spawn(&all, log)
    }

    /// Starts `pg_autoctl <args>` in a session of its own (as the server user when root),
    /// appending to `log` in the formation's folder.
    fn spawn(&self, args: &[&str], log: &str) -> Result<Child> {
        let log_path = self.dir.join(log);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error(format!("opening {}: {e}", log_path.display())))?;
        let file2 = file
            .try_clone()
            .map_err(|e| Error(format!("cloning {}: {e}", log_path.display())))?;
        let mut cmd = Command::new("setsid");
        self.autoctl_command(&mut cmd);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        cmd.spawn()
            .map_err(|e| Error(format!("starting {}: {e}", self.pg_autoctl.display())))
    }

    /// Adds to `cmd` what runs `pg_autoctl` as the server user with the formation's own
    /// configuration folders.
    fn autoctl_command(&self, cmd: &mut Command) {
        if let Some(u) = &self.run_as {
            cmd.arg("runuser").arg("-u").arg(&u.name).arg("--");
        }
        cmd.arg("env")
            .arg(format!("PATH={}:/usr/bin:/bin", self.bindir.display()))
            .arg(format!(
                "XDG_CONFIG_HOME={}",
                self.dir.join("config").display()
            ))
            .arg(format!("XDG_DATA_HOME={}", self.dir.join("data").display()))
            .arg(format!("HOME={}", self.dir.display()))
            .arg(&self.pg_autoctl)
            .current_dir(&self.dir);
    }

    fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output> {
        run_server_tool(self.run_as.as_ref(), &self.bindir, &self.dir, tool, args)
    }

    /// A process in its own session that, once this process is gone, kills every
    /// `pg_autoctl` of the formation, stops its servers and removes its folder.
    fn spawn_watchdog(&mut self) -> Result<()> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = runuser_prefix(self.run_as.as_ref());
        let dir = self.dir.to_string_lossy().to_string();
        self.watchdog = Some(spawn_cleanup(format!(
            "pkill -KILL -f 'pg_autoctl.*{dir}' 2>/dev/null; \
             for d in '{dir}'/monitor '{dir}'/node*; do [ -f \"$d/postmaster.pid\" ] && {prefix}'{pg_ctl}' -D \"$d\" -m immediate -w stop >/dev/null 2>&1; done; \
             rm -rf '{dir}'",
            pg_ctl = pg_ctl.display(),
        ))?);
        Ok(())
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        kill_matching(&format!("pg_autoctl.*{}", self.dir.display()));
        let mut children: Vec<Child> = self.nodes.iter_mut().filter_map(|n| n.2.take()).collect();
        children.extend(self.monitor.take());
        for child in &children {
            kill_tree(child.id());
            kill_group(child);
        }
        for mut child in children {
            let _ = child.wait();
        }
        let dirs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.1.to_string_lossy().to_string())
            .chain(std::iter::once(
                self.dir.join("monitor").to_string_lossy().to_string(),
            ))
            .collect();
        for d in dirs {
            if Path::new(&d).join("postmaster.pid").exists() {
                let _ = self.run_tool("pg_ctl", &["-D", &d, "-m", "immediate", "-w", "stop"]);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The node whose `reported/goal` states (comma-separated, in node order) both say primary.
fn primary_of(states: &str) -> Option<usize> {
    let primary = |s: &str| matches!(s, "primary" | "wait_primary" | "single");
    states.split(',').position(|node| {
        node.split_once('/')
            .is_some_and(|(reported, goal)| primary(reported) && primary(goal))
    })
}

#[cfg(test)]
mod primary_tests {
    use super::primary_of;

    #[test]
    fn a_promoted_node_is_primary_between_wait_primary_and_primary() {
        // Seen in a failover run: the new primary on its way from wait_primary to primary.
        let states = "primary/demoted,wait_primary/primary,secondary/secondary";
        assert_eq!(primary_of(states), Some(1));
        assert_eq!(primary_of("primary/primary,secondary/secondary"), Some(0));
        assert_eq!(primary_of("secondary/secondary,single/single"), Some(1));
        // An old primary being demoted, and no other: none.
        assert_eq!(
            primary_of("primary/demoted,secondary/prepare_promotion"),
            None
        );
    }
}
