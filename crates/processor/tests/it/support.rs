//! Helpers shared by the integration tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, PostgresPoolConfig, PostgresReplicaConfig,
    ReplicationStatus,
};

/// The local cluster the tests start. A test that needs it carries
/// `#[cfg_attr(pgstate_external_server, ignore = ..)]`, so that against an external server
/// (`PGSTATE_TEST_DATABASE_URL` when the tests are built: the crate's build script sets the
/// cfg) the harness reports it as ignored rather than as passed.
pub fn local_cluster() -> &'static pgstate_testcluster::Cluster {
    pgstate_testcluster::shared().cluster().expect(
        "the local cluster (PGSTATE_TEST_DATABASE_URL changed after the tests were built: \
         build them again)",
    )
}

/// PgBouncer in `mode` in front of the local cluster's primary, started once per process
/// (for tests marked as [`local_cluster`] says).
pub fn local_bouncer(
    mode: pgstate_testcluster::PoolMode,
) -> &'static pgstate_testcluster::PgBouncer {
    use pgstate_testcluster::PoolMode;
    static TRANSACTION: OnceLock<pgstate_testcluster::PgBouncer> = OnceLock::new();
    static SESSION: OnceLock<pgstate_testcluster::PgBouncer> = OnceLock::new();
    let cluster = local_cluster();
    let cell = match mode {
        PoolMode::Transaction => &TRANSACTION,
        PoolMode::Session => &SESSION,
    };
    cell.get_or_init(|| {
        cluster
            .start_pgbouncer(mode)
            .unwrap_or_else(|e| panic!("cannot start PgBouncer: {e}"))
    })
}

/// Keeps bulk tests (hundreds of thousands of rows) and tests that measure time against the
/// database (leases of 2 s, freezes) apart: `bulk()` excludes every other holder, `timed()`
/// excludes only bulk ones. On a 2-core machine a bulk load can stall a lease renewal past
/// its lease, which is the behaviour under test, not a failure of it.
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Held by a bulk test for its whole run.
pub async fn bulk() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().await
}

/// Held by a time-sensitive test for its whole run.
pub async fn timed() -> tokio::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().await
}

/// Runs a command to its end and fails the test, with its stderr, unless it succeeded. (Its
/// arguments are not shown: they may hold a connection URL with a password.)
pub fn run(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// URL of the shared test server's primary.
pub fn url() -> String {
    pgstate_testcluster::shared().url()
}

/// A schema name no other test uses.
pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A configuration for a private schema with a small pool.
pub fn config(tag: &str) -> EnhancedPostgresConfig {
    EnhancedPostgresConfig::new(url())
        .with_schema(unique(tag))
        .with_pool_config(small_pool())
}

pub fn small_pool() -> PostgresPoolConfig {
    PostgresPoolConfig {
        min_connections: 1,
        max_connections: 4,
        acquire_timeout: Duration::from_secs(20),
        ..PostgresPoolConfig::default()
    }
}

/// A backend on a private schema.
pub async fn backend(tag: &str) -> EnhancedPostgresBackend {
    EnhancedPostgresBackend::new(config(tag))
        .await
        .expect("backend on the test server")
}

/// A plain driver connection to `url`, for checks made behind the backend's back.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection");
    tokio::spawn(conn);
    client
}

/// The first column of every row `sql` returns, one line each (EXPLAIN output).
pub async fn text_lines(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database(tag: &str) -> String {
    let name = unique(tag);
    let admin = raw(&url()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create database");
    let base = url();
    match base.rsplit_once('/') {
        Some((head, _)) => format!("{head}/{name}"),
        None => panic!("test URL without a database path: cannot derive one"),
    }
}

/// The server sessions with this `application_name`: (pid, whether TLS is on).
pub async fn sessions(app: &str) -> Vec<(i32, bool)> {
    let admin = raw(&url()).await;
    admin
        .query(
            "SELECT a.pid, coalesce(s.ssl, false) FROM pg_stat_activity a \
             LEFT JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Starts a throwaway cluster of its own (no TLS), for tests that stop, pause or promote
/// servers: doing that to the shared one would break every other test.
pub async fn own_cluster(replicas: usize) -> pgstate_testcluster::Cluster {
    tokio::task::spawn_blocking(move || {
        pgstate_testcluster::Cluster::start(pgstate_testcluster::ClusterOptions {
            replicas,
            tls: false,
            ..pgstate_testcluster::ClusterOptions::default()
        })
    })
    .await
    .expect("cluster start task")
    .expect("throwaway cluster")
}

/// Another session holding `table` in ACCESS EXCLUSIVE mode until it runs `ROLLBACK`.
pub async fn lock_table(table: &str) -> tokio_postgres::Client {
    let locker = raw(&url()).await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .expect("lock table");
    locker
}

/// Terminates every server session with this application name, then gives the driver a
/// moment to see its sockets close.
pub async fn terminate_sessions(app: &str) {
    let admin = raw(&url()).await;
    for (pid, _) in sessions(app).await {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("pg_terminate_backend");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Replica settings for tests: a fast monitor (200 ms), the given lag limit and failover.
pub fn replicas(urls: Vec<String>, max_lag_ms: u64, failover: bool) -> PostgresReplicaConfig {
    PostgresReplicaConfig {
        replica_urls: urls,
        enable_read_splitting: true,
        max_replication_lag_ms: max_lag_ms,
        health_check_interval: Duration::from_millis(200),
        enable_auto_failover: failover,
    }
}

/// Polls the status until `ok` holds (or fails the test after `limit`).
pub async fn wait_status(
    b: &EnhancedPostgresBackend,
    limit: Duration,
    what: &str,
    ok: impl Fn(&ReplicationStatus) -> bool,
) -> ReplicationStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = b.check_replication_status().await.unwrap();
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {limit:?}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads `get()` every 10 ms until `ok` holds of it; fails the test after 10 s, naming `what`
/// and showing the last value read.
pub async fn wait_for<T: std::fmt::Debug>(
    what: &str,
    get: impl Fn() -> T,
    ok: impl Fn(&T) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = get();
        if ok(&value) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {value:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
