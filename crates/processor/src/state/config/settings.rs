//! The seed's option structs for pools, TLS, replicas, retention and isolation: plain data,
//! validated as part of [`EnhancedPostgresConfig`](crate::state::EnhancedPostgresConfig).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::state::config::connstr::redact;

/// Connection pool settings. All fields are public so the struct can be written as a literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresPoolConfig {
    /// Connections the pool keeps open even when idle.
    pub min_connections: u32,
    /// Upper bound on open connections.
    pub max_connections: u32,
    /// How long an operation waits for a connection before failing with [`StateError::Timeout`](crate::state::StateError::Timeout).
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this long.
    pub idle_timeout: Option<Duration>,
    /// Connections are closed and replaced after this long.
    pub max_lifetime: Option<Duration>,
    /// How often the background task probes idle connections.
    pub health_check_interval: Duration,
    /// Probe a connection that sat idle in the pool for more than a second with a round trip
    /// (an empty query) before handing it out, and replace it if the probe fails. A
    /// connection in steady use is handed out without one (its last operation just proved
    /// it; a connection the server or network closed is never handed out either way), so
    /// under load this costs nothing, and at most one round trip per second per connection
    /// when idle.
    pub test_on_acquire: bool,
}

impl Default for PostgresPoolConfig {
    fn default() -> Self {
        Self {
            min_connections: 2,
            max_connections: 20,
            acquire_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            health_check_interval: Duration::from_secs(30),
            test_on_acquire: true,
        }
    }
}

/// TLS settings with libpq's meanings.
///
/// `mode` is one of `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`. Settings
/// given here override the `sslmode`, `sslrootcert`, `sslcert` and `sslkey` parameters of the
/// connection URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresSslConfig {
    /// The libpq `sslmode`.
    pub mode: String,
    /// PEM file with the CA certificate(s) that sign the server certificate.
    pub root_cert_path: Option<PathBuf>,
    /// PEM file with the client certificate (chain), for `cert` authentication.
    pub client_cert_path: Option<PathBuf>,
    /// PEM file with the client's private key (PKCS#8, PKCS#1/RSA or SEC1/EC).
    pub client_key_path: Option<PathBuf>,
}

impl Default for PostgresSslConfig {
    /// `prefer` (libpq's default) with no certificate files.
    fn default() -> Self {
        PostgresSslConfig {
            mode: "prefer".to_string(),
            root_cert_path: None,
            client_cert_path: None,
            client_key_path: None,
        }
    }
}

/// Read replica settings: see [`EnhancedPostgresBackend`](crate::state::EnhancedPostgresBackend)
/// for how reads are routed. Writes, transactions and COPY always run on the primary. `Debug`
/// hides the URLs' passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresReplicaConfig {
    /// Connection URLs of the streaming replicas.
    pub replica_urls: Vec<String>,
    /// Route reads to replicas.
    pub enable_read_splitting: bool,
    /// Replicas lagging more than this are taken out of rotation.
    pub max_replication_lag_ms: u64,
    /// How often replica health and lag are checked.
    pub health_check_interval: Duration,
    /// Fall back to the primary when no replica qualifies.
    pub enable_auto_failover: bool,
}

impl Default for PostgresReplicaConfig {
    fn default() -> Self {
        Self {
            replica_urls: Vec::new(),
            enable_read_splitting: true,
            max_replication_lag_ms: 1000,
            health_check_interval: Duration::from_secs(10),
            enable_auto_failover: true,
        }
    }
}

/// Data retention settings.
///
/// Enabled, a background task deletes entries not written (`updated_at`) for `max_age`,
/// every `cleanup_interval`, in batches of `batch_size` rows, each its own short transaction
/// (see [`EnhancedPostgresBackend::apply_retention_policy`](crate::state::EnhancedPostgresBackend::apply_retention_policy)).
/// `cleanup_interval` and `batch_size` also govern the cleanup of expired entries, which runs
/// even when the policy is disabled (see
/// [`EnhancedPostgresConfig::with_expired_cleanup`](crate::state::EnhancedPostgresConfig::with_expired_cleanup)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Whether the policy applies.
    pub enabled: bool,
    /// Entries not updated for this long are removed.
    pub max_age: Duration,
    /// How often the cleanup runs.
    pub cleanup_interval: Duration,
    /// Rows deleted per statement (and per transaction).
    pub batch_size: usize,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            max_age: Duration::from_secs(86400 * 30),
            cleanup_interval: Duration::from_secs(3600),
            batch_size: 1000,
        }
    }
}

/// Transaction isolation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum IsolationLevel {
    /// Each statement sees data committed before it began (PostgreSQL's default).
    #[default]
    ReadCommitted,
    /// The transaction sees a snapshot taken at its first statement.
    RepeatableRead,
    /// Full serializability; conflicting transactions fail with SQLSTATE 40001.
    Serializable,
}

impl IsolationLevel {
    /// The SQL keywords for `SET TRANSACTION ISOLATION LEVEL`.
    pub fn as_sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

impl fmt::Debug for PostgresReplicaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.replica_urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("PostgresReplicaConfig")
            .field("replica_urls", &urls)
            .field("enable_read_splitting", &self.enable_read_splitting)
            .field("max_replication_lag_ms", &self.max_replication_lag_ms)
            .field("health_check_interval", &self.health_check_interval)
            .field("enable_auto_failover", &self.enable_auto_failover)
            .finish()
    }
}
