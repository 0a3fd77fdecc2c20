//! Throwaway PostgreSQL clusters for pgstate's tests, examples and benchmarks.
//!
//! [`Cluster::start`] runs `initdb` for a primary on a free loopback port, optionally with TLS
//! (a generated CA, server and client certificates) and streaming replicas made with
//! `pg_basebackup`, all from the server binaries installed on the machine (`pg_config --bindir`,
//! else Debian's `/usr/lib/postgresql/<version>/bin`). Run as root, the servers run as the
//! `postgres` user, since `initdb` refuses root.
//!
//! Clean-up never depends on the test process ending well: each cluster has a watchdog
//! process (in its own session) that stops the servers and removes the files once the process
//! that started them is gone, however it ended. Dropping a [`Cluster`] cleans up at once.
//!
//! [`shared`] gives the one cluster of a test process (primary and two replicas, TLS on), or
//! the server named by `PGSTATE_TEST_DATABASE_URL` when that is set.

mod backup;
mod certs;
mod citus;
mod formation;
mod kept;
mod pgbouncer;
mod processes;
mod tools;

pub use backup::RecoveryTarget;
pub use certs::Certs;
pub use citus::citus_installed;
pub use formation::{find_pg_autoctl, Formation, DATA_NODES, NUMBER_SYNC_STANDBYS};
pub use kept::stop_kept;
pub use pgbouncer::{find_pgbouncer, PgBouncer, PoolMode};
use tools::{chown_to, run_server_tool, runuser_prefix, server_user, spawn_cleanup};

use std::fmt;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment variable that points the test suite at an existing server instead of starting one.
pub const URL_ENV: &str = "PGSTATE_TEST_DATABASE_URL";

/// The superuser password of every cluster started here (scram-sha-256 over TCP).
pub const PASSWORD: &str = "pgstate-test-secret";

/// An error starting or driving a cluster, with the command output that explains it.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of streaming replicas.
    pub replicas: usize,
    /// Generate certificates and turn `ssl` on.
    pub tls: bool,
    /// `max_connections` of every server.
    pub max_connections: u32,
    /// Archive the primary's WAL (see [`Cluster::wal_archive`]), for point-in-time recovery.
    pub wal_archive: bool,
    /// With more than 0: the primary is a Citus coordinator with this many workers (see
    /// [`citus_installed`]); `replicas` must be 0.
    pub citus_workers: usize,
    /// For a cluster that outlives a test (`pgstate dev up`, the demo): a random superuser
    /// password instead of [`PASSWORD`], and no `trust` at all (Unix-socket connections need
    /// the password too), so other local users cannot log in. The password is in the URLs and
    /// in the cluster's `pgpass` file, readable by its owner only.
    pub private: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 0,
            tls: true,
            max_connections: 400,
            wal_archive: false,
            citus_workers: 0,
            private: false,
        }
    }
}

/// Role that logs in with a client certificate (`hostssl ... cert`) on TLS clusters.
pub const CERT_USER: &str = "pgstate_cert";

/// One server of a cluster.
#[derive(Clone, Debug)]
pub struct Node {
    /// Loopback TCP port.
    pub port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
}

/// A running throwaway cluster. Dropping it stops the servers and removes their files.
pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    run_as: Option<User>,
    nodes: Vec<Node>,
    certs: Option<Certs>,
    watchdog: Option<std::process::Child>,
    /// The superuser's password ([`PASSWORD`], or a random one for a private cluster).
    password: String,
}

#[derive(Clone, Debug)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// Starts a primary and `opts.replicas` streaming replicas, and waits until every replica
    /// streams.
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        if opts.citus_workers > 0 && opts.replicas > 0 {
            return err("a Citus cluster (citus_workers) takes no streaming replicas");
        }
        if opts.citus_workers > 0 && opts.private {
            return err("a Citus cluster's nodes trust each other: it cannot be private");
        }
        let bindir = find_bindir()?;
        let run_as = server_user()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgstate-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| Error(format!("creating {}: {e}", dir.display())))?;
        let mut cluster = Cluster {
            dir: dir.clone(),
            bindir,
            run_as,
            nodes: Vec::new(),
            certs: None,
            watchdog: None,
            password: if opts.private {
                tools::random_password()?
            } else {
                PASSWORD.to_string()
            },
        };
        // Only its owner (the server user) enters it: data, certificates, the socket.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| Error(format!("chmod {}: {e}", dir.display())))?;
        cluster.chown(&dir)?;
        cluster.write_passfile()?;
        cluster.spawn_watchdog()?;
        if opts.tls {
            cluster.certs = Some(cluster.make_certs()?);
        }
        cluster.init_primary(&opts)?;
        for i in 0..opts.replicas {
            cluster.add_replica(i + 1)?;
        }
        if opts.citus_workers > 0 {
            cluster.add_citus_workers(&opts)?;
        }
        cluster.wait_streaming(opts.replicas)?;
        Ok(cluster)
    }

    /// The cluster's working directory (data directories, certificates, logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generated certificates, for a TLS cluster.
    pub fn certs(&self) -> Option<&Certs> {
        self.certs.as_ref()
    }

    /// The servers: index 0 is the primary, then the replicas.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// URL of node `i` as the superuser, database `postgres`, without an sslmode.
    pub fn url(&self, i: usize) -> String {
        self.url_for_db(i, "postgres")
    }

    /// URL of node `i` as the superuser, for database `db`.
    pub fn url_for_db(&self, i: usize, db: &str) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.nodes[i].port
        )
    }

    /// The superuser's password: [`PASSWORD`], or a private cluster's own.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Writes `<dir>/pgpass` (mode 0600, the server user's): the password for the tools the
    /// cluster runs (`pg_basebackup`, `psql`, replicas' walreceivers), never on a command line.
    fn write_passfile(&self) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(tools::PASSFILE);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error(format!("creating {}: {e}", path.display())))?;
        f.write_all(format!("*:*:*:postgres:{}\n", self.password).as_bytes())
            .map_err(|e| Error(format!("writing {}: {e}", path.display())))?;
        self.chown(&path)
    }

    /// URL of the primary.
    pub fn primary_url(&self) -> String {
        self.url(0)
    }

    /// URLs of the nodes after the primary: its replicas (a Citus cluster's workers).
    pub fn replica_urls(&self) -> Vec<String> {
        (1..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Directory holding the server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Runs SQL with `psql` on node `i` over its Unix socket and returns the unaligned output.
    pub fn psql(&self, i: usize, sql: &str) -> Result<String> {
        let socket = self.dir.to_string_lossy();
        let port = self.nodes[i].port.to_string();
        tools::psql(
            self.run_as.as_ref(),
            &self.bindir,
            &self.dir,
            &[
                "-h", &socket, "-p", &port, "-U", "postgres", "-d", "postgres",
            ],
            sql,
        )
    }

    /// Stops node `i` (fast shutdown: connections are terminated).
    pub fn stop_node(&self, i: usize) -> Result<()> {
        self.pg_ctl(i, &["-m", "fast", "-w", "-t", "60", "stop"])
    }

    /// Starts node `i` again after [`Cluster::stop_node`].
    pub fn start_node(&self, i: usize) -> Result<()> {
        let log = self.dir.join(format!("node{i}.log"));
        self.pg_ctl(
            i,
            &["-w", "-t", "60", "-l", &log.to_string_lossy(), "start"],
        )
    }

    /// Promotes replica `i` to primary.
    pub fn promote(&self, i: usize) -> Result<()> {
        self.pg_ctl(i, &["-w", "-t", "60", "promote"])
    }

    fn pg_ctl(&self, i: usize, args: &[&str]) -> Result<()> {
        let data = self.nodes[i].data_dir.to_string_lossy().to_string();
        let mut all = vec!["-D", &data];
        all.extend_from_slice(args);
        self.run_tool("pg_ctl", &all).map(|_| ())
    }

    /// Runs a server tool from the bindir (as the server user when root).
    fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output> {
        run_server_tool(self.run_as.as_ref(), &self.bindir, &self.dir, tool, args)
    }

    /// The user the servers run as, when not the current one.
    fn run_as_name(&self) -> Option<&str> {
        self.run_as.as_ref().map(|u| u.name.as_str())
    }

    fn chown(&self, path: &Path) -> Result<()> {
        chown_to(self.run_as.as_ref(), path)
    }

    /// A process in its own session that cleans up once this process is gone.
    fn spawn_watchdog(&mut self) -> Result<()> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = runuser_prefix(self.run_as.as_ref());
        let dir = self.dir.to_string_lossy().to_string();
        self.watchdog = Some(spawn_cleanup(format!(
            "for p in '{dir}'/pgbouncer-*.pid; do [ -f \"$p\" ] && kill \"$(cat \"$p\")\" 2>/dev/null; done; \
             for d in '{dir}'/node*/; do [ -f \"$d/postmaster.pid\" ] && {prefix}'{pg_ctl}' -D \"$d\" -m immediate -w stop >/dev/null 2>&1; done; \
             rm -rf '{dir}'",
            pg_ctl = pg_ctl.display(),
        ))?);
        Ok(())
    }

    fn init_primary(&mut self, opts: &ClusterOptions) -> Result<()> {
        self.init_server(0, opts)?;
        if self.certs.is_some() {
            self.psql(
                0,
                &format!("CREATE ROLE {CERT_USER} LOGIN; GRANT CREATE ON DATABASE postgres TO {CERT_USER}"),
            )?;
        }
        Ok(())
    }

    /// Creates (initdb), configures and starts server `i` of its own (a primary, or a Citus
    /// worker).
    fn init_server(&mut self, i: usize, opts: &ClusterOptions) -> Result<()> {
        let data = self.dir.join(format!("node{i}"));
        let pwfile = self.dir.join("pwfile");
        fs::write(&pwfile, &self.password).map_err(|e| Error(e.to_string()))?;
        // Its owner's only, like every file that holds the password.
        fs::set_permissions(&pwfile, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| Error(e.to_string()))?;
        self.chown(&pwfile)?;
        let local_auth = if opts.private {
            "--auth-local=scram-sha-256"
        } else {
            "--auth-local=trust"
        };
        self.run_tool(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                local_auth,
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ],
        )?;
        let port = free_port()?;
        let mut conf = format!(
            "\n# pgstate test cluster\nlisten_addresses = '127.0.0.1,127.0.0.2'\nport = {port}\n\
             unix_socket_directories = '{}'\nmax_connections = {}\nfsync = off\n\
             full_page_writes = off\nwal_level = replica\nmax_wal_senders = 10\n\
             hot_standby = on\nwal_keep_size = '256MB'\nlog_min_messages = warning\n\
             log_line_prefix = '%m [%p] '\n",
            self.dir.display(),
            opts.max_connections
        );
        if opts.wal_archive && i == 0 {
            conf.push_str(&self.archive_settings()?);
        }
        if opts.citus_workers > 0 {
            conf.push_str("shared_preload_libraries = 'citus'\n");
        }
        if let Some(c) = &self.certs {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
                c.server_cert.display(),
                c.server_key.display(),
                c.ca_cert.display()
            ));
        }
        append(&data.join("postgresql.conf"), &conf)?;
        // 127.0.0.2 reaches the same server under a name its certificate does not carry.
        let mut hba = String::from(if opts.private {
            "local all all scram-sha-256\n"
        } else {
            "local all all trust\n"
        });
        if opts.citus_workers > 0 {
            // Citus nodes connect to each other as the user of the session.
            hba.push_str("host all postgres 127.0.0.1/32 trust\n");
        }
        if self.certs.is_some() {
            hba.push_str(&format!("hostssl all {CERT_USER} 127.0.0.0/8 cert\n"));
        }
        hba.push_str(
            "host all all 127.0.0.0/8 scram-sha-256\n\
             host replication all 127.0.0.0/8 scram-sha-256\n",
        );
        fs::write(data.join("pg_hba.conf"), hba).map_err(|e| Error(e.to_string()))?;
        self.nodes.push(Node {
            port,
            data_dir: data,
        });
        self.start_node(i)
    }

    fn add_replica(&mut self, i: usize) -> Result<()> {
        let data = self.basebackup(&format!("node{i}"), true)?;
        let port = free_port()?;
        append(&data.join("postgresql.conf"), &format!("\nport = {port}\n"))?;
        self.nodes.push(Node {
            port,
            data_dir: data,
        });
        self.start_node(i)
    }

    fn wait_streaming(&self, replicas: usize) -> Result<()> {
        if replicas == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = self.psql(
                0,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )?;
            if n.parse::<usize>().unwrap_or(0) >= replicas {
                return Ok(());
            }
            if Instant::now() > deadline {
                return err(format!(
                    "only {n} of {replicas} replicas streaming after 60 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].data_dir.join("postmaster.pid").exists() {
                let _ = self.pg_ctl(i, &["-m", "immediate", "-w", "stop"]);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error(format!("opening {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error(format!("writing {}: {e}", path.display())))
}

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| Error(format!("finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error(format!("finding a free port: {e}")))
}

/// The folder of the server binaries: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else wherever `initdb` is on the PATH.
pub fn find_bindir() -> Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_server(&d) {
                return Ok(d);
            }
        }
    }
    err("PostgreSQL server binaries (initdb, postgres) not found via pg_config --bindir, \
         /usr/lib/postgresql/*/bin or PATH: install the Debian package postgresql (apt-get install postgresql), \
         or set PGSTATE_TEST_DATABASE_URL to an existing server")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn lookup_user(name: &str) -> Option<User> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.first() != Some(&name) || f.len() < 4 {
            return None;
        }
        Some(User {
            name: name.to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

/// The server a test process shares.
pub enum Shared {
    /// A cluster this process started (primary and two streaming replicas, TLS on).
    Local(Box<Cluster>),
    /// The server named by [`URL_ENV`].
    External(String),
}

impl Shared {
    /// URL of the primary.
    pub fn url(&self) -> String {
        match self {
            Shared::Local(c) => c.primary_url(),
            Shared::External(u) => u.clone(),
        }
    }

    /// The local cluster, when this process started one.
    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            Shared::Local(c) => Some(c),
            Shared::External(_) => None,
        }
    }
}

/// The server shared by every test of this process, started on first use.
///
/// # Panics
/// When no server can be started (the message names the missing package); a test cannot go
/// on without one.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        if let Ok(url) = std::env::var(URL_ENV) {
            if !url.trim().is_empty() {
                return Shared::External(url);
            }
        }
        match Cluster::start(ClusterOptions {
            replicas: 2,
            ..ClusterOptions::default()
        }) {
            Ok(c) => Shared::Local(Box::new(c)),
            Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
        }
    })
}
