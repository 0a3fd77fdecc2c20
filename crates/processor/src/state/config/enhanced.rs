//! Configuration: [`EnhancedPostgresConfig`] and the seed's option structs, and their
//! validation. Connection strings are parsed in `connspec`.

use std::fmt;
use std::time::Duration;

use crate::state::config::citus_layout::CitusLayout;
use crate::state::config::connspec::{ConnectionSpec, SslSettings};
use crate::state::config::connstr::redact;
use crate::state::config::libpq_env::LibpqEnv;
use crate::state::config::partition_strategy::PartitionStrategy;
pub use crate::state::config::settings::{
    IsolationLevel, PostgresPoolConfig, PostgresReplicaConfig, PostgresSslConfig, RetentionPolicy,
};
use crate::state::error::{StateError, StateResult};
use crate::state::ident::Ident;

/// Default of [`EnhancedPostgresConfig::with_operation_timeout`].
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Configuration of an [`EnhancedPostgresBackend`](crate::state::EnhancedPostgresBackend).
///
/// `new(url)` accepts a `postgresql://` URL or a libpq keyword string; it is checked when the
/// backend is created. Everything else has a builder method. `Debug` never prints passwords.
#[derive(Clone)]
pub struct EnhancedPostgresConfig {
    pub(crate) url: String,
    pub(crate) pool: PostgresPoolConfig,
    pub(crate) ssl: Option<PostgresSslConfig>,
    pub(crate) replicas: Option<PostgresReplicaConfig>,
    pub(crate) isolation_level: IsolationLevel,
    pub(crate) retention: Option<RetentionPolicy>,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) slow_query_threshold: Duration,
    pub(crate) log_statements: bool,
    pub(crate) schema_changes: bool,
    pub(crate) libpq_env: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) operation_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) max_retries: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) read_your_writes: bool,
    pub(crate) transaction_pooling: bool,
    pub(crate) session_url: Option<String>,
    pub(crate) expired_cleanup: bool,
    pub(crate) partitioning: Option<PartitionStrategy>,
    pub(crate) citus: Option<CitusLayout>,
}

impl EnhancedPostgresConfig {
    /// A configuration for the server at `url` with default settings: table `state_entries` in
    /// schema `public`, the default pool, no TLS beyond what the URL asks for, no replicas.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool: PostgresPoolConfig::default(),
            ssl: None,
            replicas: None,
            isolation_level: IsolationLevel::default(),
            retention: None,
            schema: "public".to_string(),
            table: "state_entries".to_string(),
            slow_query_threshold: Duration::from_millis(100),
            log_statements: false,
            schema_changes: true,
            libpq_env: true,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            application_name: "pgstate".to_string(),
            max_retries: 10,
            retry_backoff: Duration::from_millis(10),
            read_your_writes: true,
            transaction_pooling: false,
            session_url: None,
            expired_cleanup: true,
            partitioning: None,
            citus: None,
        }
    }

    /// Creates the state table partitioned with `strategy` (see [`PartitionStrategy`]). On an
    /// existing table, `new()` checks that it is partitioned that way and refuses to start
    /// otherwise; an existing unpartitioned table is converted online with
    /// [`migrate_to_partitioned`](crate::state::EnhancedPostgresBackend::migrate_to_partitioned).
    /// Without this setting the backend uses the table as it finds it.
    pub fn with_partitioning(mut self, strategy: PartitionStrategy) -> Self {
        self.partitioning = Some(strategy);
        self
    }

    /// Distributes the state table over a Citus cluster's workers by key (see [`CitusLayout`]):
    /// give the coordinator's URL. `new()` checks for the `citus` extension, distributes a
    /// table it creates (or finds undistributed), and refuses one distributed otherwise. Not
    /// with [`with_partitioning`](Self::with_partitioning). Without this setting a table
    /// found distributed is used as it is.
    pub fn with_citus(mut self, layout: CitusLayout) -> Self {
        self.citus = Some(layout);
        self
    }

    /// Sets the connection pool settings.
    pub fn with_pool_config(mut self, pool: PostgresPoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Sets TLS settings; they override the `ssl*` parameters of the URLs.
    pub fn with_ssl_config(mut self, ssl: PostgresSslConfig) -> Self {
        self.ssl = Some(ssl);
        self
    }

    /// Sets the read replicas.
    pub fn with_replicas(mut self, replicas: PostgresReplicaConfig) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Sets the default isolation level for transactions.
    pub fn with_isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation_level = level;
        self
    }

    /// Sets the data retention policy.
    pub fn with_retention_policy(mut self, policy: RetentionPolicy) -> Self {
        self.retention = Some(policy);
        self
    }

    /// Sets the schema holding the state tables (created if missing). Default `public`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the name of the state table. Default `state_entries`; the archive table is named
    /// after it (`<table>_archive`).
    pub fn with_table_name(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Queries slower than this are counted as slow and logged at `warn`. Default 100 ms.
    pub fn with_slow_query_threshold(mut self, threshold: Duration) -> Self {
        self.slow_query_threshold = threshold;
        self
    }

    /// Whether libpq's environment fills what a connection string leaves unset (the
    /// default), as `psql` and sqlx do: with the string winning, then a service file's
    /// section (`service=` or `PGSERVICE`), then `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
    /// `PGDATABASE`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGSSLMODE`, `PGSSLROOTCERT`,
    /// `PGSSLCERT`, `PGSSLKEY`, then the password file (`PGPASSFILE` or `~/.pgpass`, used
    /// only when not readable by group or others). Off, only the string counts.
    pub fn with_libpq_environment(mut self, on: bool) -> Self {
        self.libpq_env = on;
        self
    }

    /// Whether `new()` may create and upgrade the schema (the default). Off, it only opens a
    /// state table that exists with every embedded migration applied, changing nothing, and
    /// fails with [`StateError::NotInitialized`](crate::state::StateError::NotInitialized)
    /// otherwise (see
    /// [`migration_status`](crate::state::EnhancedPostgresBackend::migration_status)): for
    /// read-only tools, and roles without rights to change the schema.
    pub fn with_schema_changes(mut self, allowed: bool) -> Self {
        self.schema_changes = allowed;
        self
    }

    /// Logs every operation at `info` (target `pgstate::statements`): its statement's name,
    /// rows, duration and whether it failed; never a key or a value. Default off.
    pub fn with_statement_logging(mut self, on: bool) -> Self {
        self.log_statements = on;
        self
    }

    /// Bound on establishing one connection (TCP, TLS and authentication). Default 10 s.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Server-side `statement_timeout` for the backend's connections. Default: none.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Client-side bound on every call of the backend, from taking a pooled connection to the
    /// result (each statement, COMMIT and ROLLBACK of a transaction separately). A call that
    /// takes longer fails with [`StateError::Timeout`] and
    /// its connection is discarded (its statement may still be running on the server: set
    /// [`with_statement_timeout`](Self::with_statement_timeout) below this to have the server
    /// cancel it). It also covers what server-side timeouts cannot: a frozen server or a
    /// silently dead network. Default 60 s; raise it for very large batches.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The operation timeout ([`with_operation_timeout`](Self::with_operation_timeout)).
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// The `application_name` shown in `pg_stat_activity`. Default `pgstate`.
    pub fn with_application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// How many times [`transaction`](crate::state::EnhancedPostgresBackend::transaction)
    /// re-runs its closure after a serialization failure, deadlock or lost connection.
    /// Default 10.
    pub fn with_max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Base delay between transaction retries; it doubles per attempt (up to 5 s) with random
    /// jitter. Default 10 ms.
    pub fn with_retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Read-your-writes (default on): after a handle writes, the reads of its session (the
    /// handle and its clones, see
    /// [`new_session`](crate::state::EnhancedPostgresBackend::new_session)) use a replica only
    /// once the replica has replayed that write. Off: writes are not recorded, and replicas
    /// within the lag threshold serve every read, which may then miss the handle's latest
    /// writes (causal tokens a handle observes still count).
    pub fn with_read_your_writes(mut self, on: bool) -> Self {
        self.read_your_writes = on;
        self
    }

    /// Whether a background task deletes expired entries and delete tombstones (default on),
    /// every `cleanup_interval` of the retention policy (one hour by default), in batches of
    /// its `batch_size`, whether or not the policy itself is enabled. Reads never see expired
    /// entries either way; without cleanup they stay in the table.
    pub fn with_expired_cleanup(mut self, on: bool) -> Self {
        self.expired_cleanup = on;
        self
    }

    /// Behind PgBouncer's transaction pooling (the same as `pgbouncer=true` in the URL): every
    /// statement is sent unnamed in one round trip (no prepared statement, which would live on
    /// whichever server connection served it), and nothing relies on session state. Session
    /// features (session advisory locks, lock guards, leader election, LISTEN) then need
    /// [`with_session_url`](Self::with_session_url); without one they fail with a
    /// [`StateError::Configuration`] naming it. Transactions, transaction-scoped locks,
    /// `notify` and every key/value operation work through the pooler.
    /// [`with_statement_timeout`](Self::with_statement_timeout) is refused with it (a session
    /// setting): set `statement_timeout` on the role or database instead, and rely on
    /// [`with_operation_timeout`](Self::with_operation_timeout).
    pub fn with_transaction_pooling(mut self, on: bool) -> Self {
        self.transaction_pooling = on;
        self
    }

    /// A direct URL of the primary (or one through PgBouncer's session pooling) for the
    /// session features: session advisory locks, lock guards, leader election and LISTEN.
    /// Needed with [`with_transaction_pooling`](Self::with_transaction_pooling); without
    /// transaction pooling they use it too when it is set. TLS settings apply as for the main
    /// URL.
    pub fn with_session_url(mut self, url: impl Into<String>) -> Self {
        self.session_url = Some(url.into());
        self
    }

    /// The primary's connection string, with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// The pool settings.
    pub fn pool_config(&self) -> &PostgresPoolConfig {
        &self.pool
    }

    /// The default transaction isolation level.
    pub fn isolation_level(&self) -> IsolationLevel {
        self.isolation_level
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The state table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Checks everything that can be checked without a server.
    /// Parses `url` with this configuration's TLS settings, which override the URL's.
    pub(crate) fn spec(&self, url: &str) -> StateResult<ConnectionSpec> {
        let env = if self.libpq_env {
            LibpqEnv::current()
        } else {
            LibpqEnv::default()
        };
        ConnectionSpec::parse_with(url, &env, |ssl: &mut SslSettings| {
            if let Some(o) = &self.ssl {
                ssl.mode = o.mode.parse()?;
                ssl.mode_given = true;
                if o.root_cert_path.is_some() {
                    ssl.root_cert.clone_from(&o.root_cert_path);
                }
                if o.client_cert_path.is_some() {
                    ssl.client_cert.clone_from(&o.client_cert_path);
                }
                if o.client_key_path.is_some() {
                    ssl.client_key.clone_from(&o.client_key_path);
                }
            }
            Ok(())
        })
    }

    pub(crate) fn validate(&self) -> StateResult<ValidatedConfig> {
        let schema = Ident::new("schema", &self.schema)?;
        let table = Ident::new_table(&self.table)?;
        self.validate_settings()?;
        let mut primary = self.spec(&self.url)?;
        primary.pgbouncer |= self.transaction_pooling;
        let mut replicas = Vec::new();
        if let Some(r) = &self.replicas {
            for url in &r.replica_urls {
                let mut spec = self.spec(url)?;
                spec.pgbouncer |= self.transaction_pooling;
                replicas.push(spec);
            }
        }
        if primary.pgbouncer && self.statement_timeout.is_some() {
            return Err(StateError::config(
                "with_statement_timeout sets a session setting, which PgBouncer's transaction \
                 pooling does not keep: set statement_timeout on the role or database (ALTER ROLE \
                 ... SET statement_timeout) and use with_operation_timeout",
            ));
        }
        let session = match &self.session_url {
            Some(url) => {
                let spec = self.spec(url)?;
                if spec.pgbouncer {
                    return Err(StateError::config(
                        "the session URL must keep its session (a direct URL, or PgBouncer's \
                         session pooling): it cannot say pgbouncer=true",
                    ));
                }
                Some(spec)
            }
            None => None,
        };
        Ok(ValidatedConfig {
            schema,
            table,
            primary,
            replicas,
            session,
        })
    }

    /// The checks of the settings other than connection strings and names: pool sizes and
    /// timeouts, partitioning, Citus, retention.
    fn validate_settings(&self) -> StateResult<()> {
        let p = &self.pool;
        if p.max_connections == 0 {
            return Err(StateError::config(
                "pool max_connections must be at least 1",
            ));
        }
        if p.min_connections > p.max_connections {
            return Err(StateError::config(format!(
                "pool min_connections ({}) exceeds max_connections ({})",
                p.min_connections, p.max_connections
            )));
        }
        if p.acquire_timeout.is_zero() {
            return Err(StateError::config("pool acquire_timeout must be positive"));
        }
        if p.health_check_interval.is_zero() {
            return Err(StateError::config(
                "pool health_check_interval must be positive",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(StateError::config("connect timeout must be positive"));
        }
        if self.operation_timeout.is_zero() {
            return Err(StateError::config("operation timeout must be positive"));
        }
        if let Some(p) = &self.partitioning {
            p.validate()?;
        }
        if let Some(c) = &self.citus {
            c.validate()?;
            if self.partitioning.is_some() {
                return Err(StateError::config(
                    "with_citus and with_partitioning do not go together: Citus shards the table itself",
                ));
            }
        }
        if let Some(r) = &self.retention {
            if r.batch_size == 0 {
                return Err(StateError::config(
                    "retention batch_size must be at least 1",
                ));
            }
            if r.cleanup_interval.is_zero() {
                return Err(StateError::config(
                    "retention cleanup_interval must be positive",
                ));
            }
        }
        Ok(())
    }
}

/// Everything `validate` established.
pub(crate) struct ValidatedConfig {
    pub schema: Ident,
    pub table: Ident,
    pub primary: ConnectionSpec,
    pub replicas: Vec<ConnectionSpec>,
    /// For session features ([`EnhancedPostgresConfig::with_session_url`]).
    pub session: Option<ConnectionSpec>,
}

impl fmt::Debug for EnhancedPostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnhancedPostgresConfig")
            .field("url", &redact(&self.url))
            .field("pool", &self.pool)
            .field("ssl", &self.ssl)
            .field("replicas", &self.replicas)
            .field("isolation_level", &self.isolation_level)
            .field("retention", &self.retention)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("slow_query_threshold", &self.slow_query_threshold)
            .field("log_statements", &self.log_statements)
            .field("schema_changes", &self.schema_changes)
            .field("libpq_env", &self.libpq_env)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("application_name", &self.application_name)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("read_your_writes", &self.read_your_writes)
            .field("transaction_pooling", &self.transaction_pooling)
            .field("expired_cleanup", &self.expired_cleanup)
            .field("partitioning", &self.partitioning)
            .field("citus", &self.citus)
            .field("session_url", &self.session_url.as_deref().map(redact))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::config::connspec::SslMode;

    #[test]
    fn the_default_ssl_config_is_prefer_and_parses() {
        let ssl = PostgresSslConfig::default();
        assert_eq!(ssl.mode, "prefer");
        assert_eq!(ssl.mode.parse::<SslMode>().ok(), Some(SslMode::Prefer));
        let cfg = EnhancedPostgresConfig::new("postgresql://u@localhost/db").with_ssl_config(ssl);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn ssl_config_overrides_url() {
        let o = PostgresSslConfig {
            mode: "disable".into(),
            ..Default::default()
        };
        let cfg = EnhancedPostgresConfig::new("postgresql://u@h/db").with_ssl_config(o);
        let spec = cfg.spec("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(spec.ssl.mode, SslMode::Disable);
    }

    #[test]
    fn validates_pool_and_names() {
        let base = || EnhancedPostgresConfig::new("postgresql://u@h/db");
        assert!(base().validate().is_ok());
        let bad_pool = base().with_pool_config(PostgresPoolConfig {
            min_connections: 5,
            max_connections: 2,
            ..Default::default()
        });
        assert!(bad_pool
            .validate()
            .err()
            .unwrap()
            .to_string()
            .contains("min_connections"));
        for name in [
            "",
            "a;b",
            "x\"y",
            "Robert'); DROP TABLE students;--",
            &"a".repeat(64),
        ] {
            assert!(base().with_table_name(name).validate().is_err(), "{name}");
            assert!(base().with_schema(name).validate().is_err(), "{name}");
        }
    }

    #[test]
    fn debug_never_shows_passwords() {
        for (url, secret) in [
            ("postgresql://u:p@ss@db/app", "p@ss"),
            ("postgresql://u@h/db?sslpassword=keypass1", "keypass1"),
            ("host=h user=u sslpassword=keypass2", "keypass2"),
        ] {
            let cfg = EnhancedPostgresConfig::new(url).with_session_url(url);
            assert!(!format!("{cfg:?}").contains(secret), "{url}");
        }
        let cfg = EnhancedPostgresConfig::new("postgresql://u:hunter2@h/db").with_replicas(
            PostgresReplicaConfig {
                replica_urls: vec!["postgresql://u:hunter3@r/db".into()],
                ..Default::default()
            },
        );
        let dbg = format!("{cfg:?}");
        let replicas = cfg.replicas.clone().unwrap();
        assert!(!format!("{replicas:?}").contains("hunter3"));
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("hunter3"),
            "{dbg}"
        );
    }
}
