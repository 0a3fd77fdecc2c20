//! Configuration: [`EnhancedPostgresConfig`] and the seed's option structs, connection-string
//! parsing (URLs and libpq keyword strings), validation and password redaction.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::state::error::{StateError, StateResult};
use crate::state::ident::Ident;

/// Connection pool settings. All fields are public so the struct can be written as a literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresPoolConfig {
    /// Connections the pool keeps open even when idle.
    pub min_connections: u32,
    /// Upper bound on open connections.
    pub max_connections: u32,
    /// How long an operation waits for a connection before failing with [`StateError::Timeout`].
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this long.
    pub idle_timeout: Option<Duration>,
    /// Connections are closed and replaced after this long.
    pub max_lifetime: Option<Duration>,
    /// How often the background task probes idle connections.
    pub health_check_interval: Duration,
    /// Probe each connection with a round trip before handing it out.
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
/// Automatic retention is not implemented yet: the policy is stored and validated only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Whether the policy applies.
    pub enabled: bool,
    /// Entries not updated for this long are removed.
    pub max_age: Duration,
    /// How often the cleanup runs.
    pub cleanup_interval: Duration,
    /// Rows deleted per statement.
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
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) operation_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) max_retries: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) read_your_writes: bool,
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
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            application_name: "pgstate".to_string(),
            max_retries: 10,
            retry_backoff: Duration::from_millis(10),
            read_your_writes: true,
        }
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
    /// takes longer fails with [`StateError::Timeout`](crate::state::StateError::Timeout) and
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
    pub(crate) fn validate(&self) -> StateResult<ValidatedConfig> {
        let schema = Ident::new("schema", &self.schema)?;
        let table = Ident::new_table(&self.table)?;
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
        if let Some(r) = &self.retention {
            if r.batch_size == 0 {
                return Err(StateError::config(
                    "retention batch_size must be at least 1",
                ));
            }
        }
        let primary = ConnectionSpec::parse(&self.url, self.ssl.as_ref())?;
        let mut replicas = Vec::new();
        if let Some(r) = &self.replicas {
            for url in &r.replica_urls {
                replicas.push(ConnectionSpec::parse(url, self.ssl.as_ref())?);
            }
        }
        Ok(ValidatedConfig {
            schema,
            table,
            primary,
            replicas,
        })
    }
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
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("application_name", &self.application_name)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("read_your_writes", &self.read_your_writes)
            .finish()
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

/// Everything `validate` established.
pub(crate) struct ValidatedConfig {
    pub schema: Ident,
    pub table: Ident,
    pub primary: ConnectionSpec,
    pub replicas: Vec<ConnectionSpec>,
}

/// libpq `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Plaintext first; TLS if the server refuses the plaintext connection.
    Allow,
    /// TLS first, without verification (the chain is verified when a root certificate is
    /// given); plaintext if TLS is unavailable or fails.
    Prefer,
    /// TLS without verification (the chain is verified when a root certificate is given).
    Require,
    /// TLS; the server certificate must chain to the root certificate. The host name is not checked.
    VerifyCa,
    /// TLS; chain and host name are verified.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = StateError;

    fn from_str(s: &str) -> StateResult<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(StateError::config(format!(
                    "unknown sslmode {:?}: expected disable, allow, prefer, require, verify-ca or verify-full",
                    truncate(other, 32)
                )))
            }
        })
    }
}

/// TLS settings resolved for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SslSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// One server's parsed connection string: the driver config plus our TLS settings, which the
/// driver does not understand (it knows only disable/prefer/require).
#[derive(Clone)]
pub(crate) struct ConnectionSpec {
    pub pg: tokio_postgres::Config,
    pub ssl: SslSettings,
}

impl ConnectionSpec {
    pub fn parse(url: &str, ssl_override: Option<&PostgresSslConfig>) -> StateResult<Self> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(StateError::config("connection URL is empty"));
        }
        // The driver only knows lower-case schemes.
        let lowered;
        let trimmed = if looks_like_url(trimmed) && !is_url(trimmed) {
            let end = trimmed.find("://").map_or(0, |i| i + 3);
            lowered = format!("{}{}", trimmed[..end].to_ascii_lowercase(), &trimmed[end..]);
            lowered.as_str()
        } else {
            trimmed
        };
        let (rest, params) = if is_url(trimmed) {
            split_url_params(trimmed)?
        } else {
            split_keyword_params(trimmed)?
        };
        let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            StateError::config(format!(
                "malformed connection URL {}: {}",
                redact(trimmed),
                sanitize_driver_error(&e.to_string())
            ))
        })?;
        if pg.get_hosts().is_empty() {
            return Err(StateError::config(format!(
                "connection URL {} names no host",
                redact(trimmed)
            )));
        }
        // A host name with `@` is the tail of a password with an unencoded `@`: refuse it
        // (never connect to it, never show it).
        if pg
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(name) if name.contains('@')))
        {
            return Err(StateError::config(format!(
                "connection URL {} has '@' in its host name: percent-encode '@' in a user name \
                 or password as %40",
                redact(trimmed)
            )));
        }
        if pg.get_user().is_none() {
            return Err(StateError::config(format!(
                "connection URL {} names no user",
                redact(trimmed)
            )));
        }
        let mut ssl = SslSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            client_key: None,
        };
        for (k, v) in params {
            match k.as_str() {
                "sslmode" => ssl.mode = v.parse()?,
                "sslrootcert" => ssl.root_cert = Some(PathBuf::from(v)),
                "sslcert" => ssl.client_cert = Some(PathBuf::from(v)),
                "sslkey" => ssl.client_key = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        if let Some(o) = ssl_override {
            ssl.mode = o.mode.parse()?;
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
        if ssl.client_cert.is_some() != ssl.client_key.is_some() {
            return Err(StateError::config(
                "a client certificate needs its key and a key needs its certificate (sslcert and sslkey)",
            ));
        }
        if matches!(ssl.mode, SslMode::VerifyCa | SslMode::VerifyFull) && ssl.root_cert.is_none() {
            return Err(StateError::config(format!(
                "sslmode {:?} needs a root certificate (sslrootcert / root_cert_path)",
                ssl.mode
            )));
        }
        Ok(ConnectionSpec { pg, ssl })
    }
}

const SSL_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

fn is_url(s: &str) -> bool {
    s.starts_with("postgresql://") || s.starts_with("postgres://")
}

/// Splits `sslmode`, `sslrootcert`, `sslcert`, `sslkey` off a URL's query string.
fn split_url_params(url: &str) -> StateResult<(String, Vec<(String, String)>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut ssl = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if SSL_KEYS.contains(&k) {
            ssl.push((k.to_string(), percent_decode(v)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl))
}

fn percent_decode(s: &str) -> StateResult<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    StateError::config("malformed percent-encoding in connection URL")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| StateError::config("connection URL parameter is not valid UTF-8"))
}

/// Splits the TLS keywords off a libpq keyword string (`host=... sslmode=...`).
fn split_keyword_params(s: &str) -> StateResult<(String, Vec<(String, String)>)> {
    let mut kept = Vec::new();
    let mut ssl = Vec::new();
    for (k, v) in parse_keywords(s)? {
        if SSL_KEYS.contains(&k.as_str()) {
            ssl.push((k, v));
        } else {
            let escaped = v.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{k}='{escaped}'"));
        }
    }
    Ok((kept.join(" "), ssl))
}

fn parse_keywords(s: &str) -> StateResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The word itself is not shown: it may be part of a password.
            return Err(StateError::config(
                "malformed connection string: a word without '=' (quote values that contain spaces)",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(StateError::config(
                                "malformed connection string: unterminated quoted value",
                            ))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(StateError::config(
                            "malformed connection string: unterminated quoted value",
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Replaces every password in a connection string with `***`: the user-info password of a
/// URL (found as the driver finds it: everything before the first `@`), and the value of any
/// parameter or keyword whose name contains `password` (`password`, `sslpassword`, also
/// percent-encoded or in capitals). A keyword string that cannot be parsed is not shown at all.
pub fn redact(url: &str) -> String {
    let trimmed = url.trim();
    if looks_like_url(trimmed) {
        let scheme_end = trimmed.find("://").map_or(0, |i| i + 3);
        let (head, tail) = trimmed.split_at(scheme_end);
        // The user information is taken to end at the last `@`: a password with an unencoded
        // `@`, `/`, `?` or `#` (the driver splits at the first `@`, taking the rest for a host
        // name) is hidden whole. Hiding a little too much of an odd URL is the safe side.
        let tail = match tail.rfind('@') {
            Some(at) => {
                let (userinfo, rest) = tail.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***{rest}"),
                    None => tail.to_string(),
                }
            }
            None => tail.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let parts: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                format!("{path}?{}", parts.join("&"))
            }
            None => tail,
        };
        format!("{head}{tail}")
    } else {
        match parse_keywords(trimmed) {
            Ok(pairs) => pairs
                .into_iter()
                .map(|(k, v)| {
                    if is_secret_key(&k) {
                        format!("{k}=***")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => "<unparseable connection string>".to_string(),
        }
    }
}

fn looks_like_url(s: &str) -> bool {
    let lower = s.get(..13).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("postgresql://") || lower.starts_with("postgres://")
}

fn is_secret_key(key: &str) -> bool {
    let decoded = percent_decode(key).unwrap_or_else(|_| key.to_string());
    decoded.to_ascii_lowercase().contains("password")
}

/// The driver's parse error, without any text taken from the input (an unknown "option" may
/// be a fragment of a password): only known keyword names are kept.
fn sanitize_driver_error(message: &str) -> String {
    const KNOWN: &[&str] = &[
        "user",
        "password",
        "dbname",
        "options",
        "application_name",
        "sslmode",
        "host",
        "hostaddr",
        "port",
        "connect_timeout",
        "tcp_user_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_retries",
        "target_session_attrs",
        "channel_binding",
        "load_balance_hosts",
        "sslnegotiation",
        "replication",
    ];
    let mut out = String::new();
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut quoted = true;
    for part in parts {
        if quoted {
            if KNOWN.contains(&part) {
                out.push('`');
                out.push_str(part);
                out.push('`');
            } else {
                out.push_str("(a parameter)");
            }
        } else {
            out.push_str(part);
        }
        quoted = !quoted;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ssl_config_is_prefer_and_parses() {
        let ssl = PostgresSslConfig::default();
        assert_eq!(ssl.mode, "prefer");
        assert_eq!(ssl.mode.parse::<SslMode>().ok(), Some(SslMode::Prefer));
        let cfg = EnhancedPostgresConfig::new("postgresql://u@localhost/db").with_ssl_config(ssl);
        assert!(cfg.validate().is_ok());
    }

    /// Redaction hides every part of a password, whatever characters it has, for every URL
    /// form; parsing such a URL fails or succeeds without the password in its error text.
    #[test]
    fn passwords_with_any_characters_never_show() {
        const CHARS: &[u8] = b"abcXYZ019@:/?#&=%!$'*+,;[] ";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..10_000 {
            let len = 6 + (next() % 20) as usize;
            // Marker letters on both ends, so any leaked fragment of 4 bytes is found.
            let middle: String = (0..len)
                .map(|_| CHARS[(next() % CHARS.len() as u64) as usize] as char)
                .collect();
            let password = format!("Q{middle}Q");
            let url = match case % 3 {
                0 => format!("postgresql://user:{password}@db.example:5432/state"),
                1 => format!("postgres://user:{password}@db.example/state?sslmode=require"),
                _ => format!("postgresql://user:{password}@h1:5432,h2:5433/state"),
            };
            let shown = redact(&url);
            let error = ConnectionSpec::parse(&url, None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let bytes = password.as_bytes();
            for w in bytes.windows(4) {
                let frag = String::from_utf8_lossy(w);
                // Fragments that are also ordinary URL text say nothing about the password.
                if "postgresql://user:***@db.example:5432/state?sslmode=require,h1h2:5433"
                    .contains(frag.as_ref())
                {
                    continue;
                }
                assert!(
                    !shown.contains(frag.as_ref()),
                    "{url:?} redacted as {shown:?}"
                );
                assert!(
                    !error.contains(frag.as_ref()),
                    "{url:?} gave {error:?} ({frag:?})"
                );
            }
        }
    }

    #[test]
    fn redacts_passwords_the_way_the_driver_reads_them() {
        for (url, secret) in [
            ("postgresql://u:pa/ss@db/app", "pa/ss"),
            ("postgresql://u:pa?ss@db/app", "pa?ss"),
            ("postgresql://u:pa#ss@db/app", "pa#ss"),
            (
                "POSTGRES://u:UPPERsecret@h/db?sslmode=require",
                "UPPERsecret",
            ),
            ("postgresql://u@h/db?sslpassword=keypass1", "keypass1"),
            ("postgresql://u@h/db?pass%77ord=encoded1", "encoded1"),
            ("host=h user=u sslpassword=keypass2", "keypass2"),
            ("host=h user=u PASSWORD=caps3", "caps3"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            let cfg = EnhancedPostgresConfig::new(url);
            assert!(!format!("{cfg:?}").contains(secret));
            if let Err(e) = ConnectionSpec::parse(url, None) {
                assert!(!e.to_string().contains(secret), "{url}: {e}");
            }
        }
        // A password split into "options" by a stray space never reaches an error message.
        let err = ConnectionSpec::parse("host=h user=u password=my secretword", None)
            .err()
            .unwrap();
        assert!(!err.to_string().contains("secretword"), "{err}");
        let err = ConnectionSpec::parse("jdbc:postgresql://u:jdbcpw@h/db", None)
            .err()
            .unwrap();
        assert!(!err.to_string().contains("jdbcpw"), "{err}");
        assert!(ConnectionSpec::parse("host=h user=u password='abc\\", None).is_err());
        // Upper-case schemes work like lower-case ones.
        let spec = ConnectionSpec::parse("POSTGRESQL://u:pw@h:5433/db", None).unwrap();
        assert_eq!(spec.pg.get_ports(), &[5433]);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://user:s3cr%40t@host:5432/db?sslmode=require"),
            "postgresql://user:***@host:5432/db?sslmode=require"
        );
        assert_eq!(redact("postgres://user@host/db"), "postgres://user@host/db");
        assert_eq!(
            redact("postgres://u@h/db?password=hunter2&x=1"),
            "postgres://u@h/db?password=***&x=1"
        );
        assert_eq!(
            redact("host=h user=u password='a b c' dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
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

    #[test]
    fn parses_ssl_params_from_urls_and_keywords() {
        let spec = ConnectionSpec::parse(
            "postgresql://u:p@localhost:5433/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(spec.ssl.mode, SslMode::VerifyFull);
        assert_eq!(spec.ssl.root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(spec.pg.get_application_name(), Some("x"));
        assert_eq!(spec.pg.get_ports(), &[5433]);

        let spec = ConnectionSpec::parse(
            "host=localhost user=u password='it''s' sslmode=disable dbname='my db'",
            None,
        );
        // A doubled quote is not an escape in libpq keyword strings: this is malformed.
        assert!(spec.is_err());
        let spec = ConnectionSpec::parse(
            r"host=localhost user=u password='it\'s' sslmode=disable dbname='my db'",
            None,
        )
        .unwrap();
        assert_eq!(spec.ssl.mode, SslMode::Disable);
        assert_eq!(spec.pg.get_dbname(), Some("my db"));
        assert_eq!(spec.pg.get_password(), Some(&b"it's"[..]));
    }

    #[test]
    fn rejects_bad_urls_with_clear_errors() {
        for (url, needle) in [
            ("", "empty"),
            (
                "postgresql://u:pw@h/db?sslmode=sometimes",
                "unknown sslmode",
            ),
            (
                "postgresql://u:pw@h/db?sslmode=verify-full",
                "root certificate",
            ),
            ("postgresql://h/db", "no user"),
            ("postgresql://u:pw@h:notaport/db", "malformed"),
            ("host=h user", "malformed"),
        ] {
            let err = ConnectionSpec::parse(url, None).err().unwrap();
            let text = err.to_string();
            assert!(text.contains(needle), "{url}: {text}");
            assert!(!text.contains("pw@"), "{text}");
            assert_eq!(err.kind(), crate::state::ErrorKind::Configuration);
        }
    }

    #[test]
    fn ssl_config_overrides_url() {
        let o = PostgresSslConfig {
            mode: "disable".into(),
            ..Default::default()
        };
        let spec = ConnectionSpec::parse("postgresql://u@h/db?sslmode=require", Some(&o)).unwrap();
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
}
