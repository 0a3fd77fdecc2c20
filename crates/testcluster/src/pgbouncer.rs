//! PgBouncer in front of a cluster's primary, from the machine's `pgbouncer` binary (Debian's
//! package), on a free loopback port.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{err, free_port, Cluster, Error, Result};

/// How PgBouncer hands server connections to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for the client's whole session.
    Session,
    /// A server connection per transaction: no session state survives a transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer. Dropping it stops it; if the process that started it dies first, the
/// cluster's watchdog stops it (it kills every `pgbouncer-*.pid` in the cluster's folder).
pub struct PgBouncer {
    child: Child,
    pidfile: PathBuf,
    port: u16,
    mode: PoolMode,
    password: String,
}

impl PgBouncer {
    /// URL of the primary's database `postgres` through this PgBouncer, as the superuser,
    /// without TLS (PgBouncer serves plaintext here) and without `pgbouncer=true`.
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/postgres?sslmode=disable",
            self.password, self.port
        )
    }

    /// Loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pool mode.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // The child may be `runuser`: stop PgBouncer itself by its pid file first.
        if let Ok(pid) = fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.trim())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `pgbouncer` binary: on the PATH, else Debian's `/usr/sbin/pgbouncer`.
pub fn find_pgbouncer() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("pgbouncer");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let debian = PathBuf::from("/usr/sbin/pgbouncer");
    if debian.is_file() {
        return Ok(debian);
    }
    err(
        "pgbouncer not found on the PATH or at /usr/sbin/pgbouncer: install the Debian package \
         pgbouncer (scripts/setup.sh does)",
    )
}

impl Cluster {
    /// Starts PgBouncer in `mode` in front of the primary and waits until it accepts
    /// connections. Clients log in as `postgres` with the cluster's password (SCRAM); PgBouncer logs in
    /// to the server with the same.
    pub fn start_pgbouncer(&self, mode: PoolMode) -> Result<PgBouncer> {
        let binary = find_pgbouncer()?;
        let port = free_port()?;
        let tag = format!("pgbouncer-{}-{port}", mode.as_str());
        let dir = self.dir();
        let users = dir.join(format!("{tag}.users"));
        let ini = dir.join(format!("{tag}.ini"));
        fs::write(&users, format!("\"postgres\" \"{}\"\n", self.password()))
            .map_err(|e| Error(format!("writing {}: {e}", users.display())))?;
        let config = format!(
            "[databases]\n* = host=127.0.0.1 port={primary}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {users}\npool_mode = {mode}\n\
             max_client_conn = 1000\ndefault_pool_size = 20\nreserve_pool_size = 5\n\
             server_tls_sslmode = disable\nignore_startup_parameters = extra_float_digits\n\
             pidfile = {pidfile}\nlogfile = {logfile}\nadmin_users = postgres\n",
            primary = self.nodes()[0].port,
            users = users.display(),
            mode = mode.as_str(),
            pidfile = dir.join(format!("{tag}.pid")).display(),
            logfile = dir.join(format!("{tag}.log")).display(),
        );
        fs::write(&ini, config).map_err(|e| Error(format!("writing {}: {e}", ini.display())))?;
        for f in [&users, &ini] {
            self.chown(f)?;
        }
        // PgBouncer refuses to run as root: as the server user then, like the servers.
        let mut cmd = match self.run_as_name() {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let child = cmd
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error(format!("starting {}: {e}", binary.display())))?;
        let bouncer = PgBouncer {
            child,
            pidfile: dir.join(format!("{tag}.pid")),
            port,
            mode,
            password: self.password().to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = fs::read_to_string(dir.join(format!("{tag}.log"))).unwrap_or_default();
                return err(format!(
                    "pgbouncer did not listen on {port} within 20 s:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }
}
