//! [`PostgresConfig`]: the basic backend's settings, as the seed project's `processor::state`
//! has them (public fields, `Default`, builders), and how each becomes a setting of the core
//! every backend shares.

use std::time::Duration;

use crate::state::config::connspec::SslMode;
use crate::state::config::enhanced::EnhancedPostgresConfig;
use crate::state::config::settings::{PostgresPoolConfig, PostgresSslConfig};
use crate::state::error::{StateError, StateResult};

/// Settings of the basic backend ([`PostgresStateBackend`](crate::state::PostgresStateBackend)).
///
/// ```
/// use std::time::Duration;
/// use processor::state::PostgresConfig;
///
/// let config = PostgresConfig::new("postgresql://postgres:postgres@localhost/optimizer")
///     .with_pool_size(5, 20)
///     .with_ssl_mode("prefer")
///     .with_timeout(Duration::from_secs(30))
///     .with_retries(3, Duration::from_millis(100))
///     .with_statement_logging(true);
/// assert_eq!(config.query_timeout, Duration::from_secs(30));
/// ```
///
/// `Debug` hides the URL's password.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgresql://` URL or libpq keyword string. Default
    /// `postgresql://postgres:postgres@localhost/optimizer`.
    pub database_url: String,
    /// Connections kept open. Default 2.
    pub min_connections: u32,
    /// At most this many connections. Default 10.
    pub max_connections: u32,
    /// The state table. Default `state_entries`.
    pub table_name: String,
    /// The schema holding it (created when missing). Default `public`.
    pub schema_name: String,
    /// Bound on opening one connection, and on waiting for a pooled one. Default 30 s.
    pub connect_timeout: Duration,
    /// Bound on each attempt of an operation, from checkout to result (the operation
    /// timeout, see [`EnhancedPostgresConfig::with_operation_timeout`]); an operation retried
    /// after a timeout (see [`max_retries`](Self::max_retries)) may take that many attempts
    /// and the backoffs between them. Default 60 s.
    pub query_timeout: Duration,
    /// libpq's `sslmode`: `disable`, `allow`, `prefer`, `require`, `verify-ca` or
    /// `verify-full` (any case). Any value but `prefer` overrides the URL's `sslmode`; at
    /// `prefer` (the default, libpq's too) the URL's `sslmode` applies when it names one.
    /// Anything else is a [`StateError::Configuration`] before anything connects.
    pub ssl_mode: String,
    /// Times an operation that failed on a transient error (a timeout before anything was
    /// sent, a lost connection, a serialization failure or deadlock, a server out of
    /// resources) runs again. Never after an unknown outcome, nor after any other error.
    /// Default 3.
    pub max_retries: u32,
    /// Base delay before a retry; it doubles per retry (up to 5 s), with random jitter.
    /// Default 100 ms.
    pub retry_backoff: Duration,
    /// Log every operation at `info` (target `pgstate::statements`): its statement's name,
    /// rows, duration and whether it failed; never a key or a value. Default off.
    pub log_statements: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            database_url: "postgresql://postgres:postgres@localhost/optimizer".to_string(),
            min_connections: 2,
            max_connections: 10,
            table_name: "state_entries".to_string(),
            schema_name: "public".to_string(),
            connect_timeout: Duration::from_secs(30),
            query_timeout: Duration::from_secs(60),
            ssl_mode: "prefer".to_string(),
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
            log_statements: false,
        }
    }
}

impl PostgresConfig {
    /// Default settings for the server at `database_url`.
    pub fn new<S: Into<String>>(database_url: S) -> Self {
        PostgresConfig {
            database_url: database_url.into(),
            ..PostgresConfig::default()
        }
    }

    /// Keeps `min` connections open and opens at most `max`.
    pub fn with_pool_size(mut self, min: u32, max: u32) -> Self {
        self.min_connections = min;
        self.max_connections = max;
        self
    }

    /// Sets the state table's name.
    pub fn with_table_name<S: Into<String>>(mut self, name: S) -> Self {
        self.table_name = name.into();
        self
    }

    /// Sets the schema holding the state table.
    pub fn with_schema_name<S: Into<String>>(mut self, name: S) -> Self {
        self.schema_name = name.into();
        self
    }

    /// Sets both timeouts: `connect_timeout` and `query_timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.query_timeout = timeout;
        self
    }

    /// Sets libpq's `sslmode` (see [`ssl_mode`](Self::ssl_mode)).
    pub fn with_ssl_mode<S: Into<String>>(mut self, mode: S) -> Self {
        self.ssl_mode = mode.into();
        self
    }

    /// Sets how many times a transient failure is retried, and the base backoff.
    pub fn with_retries(mut self, max_retries: u32, backoff: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_backoff = backoff;
        self
    }

    /// Logs every operation (see [`log_statements`](Self::log_statements)).
    pub fn with_statement_logging(mut self, enabled: bool) -> Self {
        self.log_statements = enabled;
        self
    }

    /// The core's configuration for these settings; a bad `ssl_mode` is refused here, before
    /// anything connects (names, URL and timeouts are checked when the core validates it).
    pub(crate) fn enhanced(&self) -> StateResult<EnhancedPostgresConfig> {
        let mode = self.ssl_mode.to_ascii_lowercase();
        mode.parse::<SslMode>()?;
        if self.query_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(StateError::config(
                "connect_timeout and query_timeout must be positive",
            ));
        }
        let mut config = EnhancedPostgresConfig::new(self.database_url.clone())
            .with_schema(self.schema_name.clone())
            .with_table_name(self.table_name.clone())
            .with_pool_config(PostgresPoolConfig {
                min_connections: self.min_connections,
                max_connections: self.max_connections,
                acquire_timeout: self.connect_timeout,
                ..PostgresPoolConfig::default()
            })
            .with_connect_timeout(self.connect_timeout)
            .with_operation_timeout(self.query_timeout)
            .with_statement_logging(self.log_statements);
        if mode != "prefer" {
            config = config.with_ssl_config(PostgresSslConfig {
                mode,
                ..PostgresSslConfig::default()
            });
        }
        Ok(config)
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field(
                "database_url",
                &crate::state::config::connstr::redact(&self.database_url),
            )
            .field("min_connections", &self.min_connections)
            .field("max_connections", &self.max_connections)
            .field("table_name", &self.table_name)
            .field("schema_name", &self.schema_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("query_timeout", &self.query_timeout)
            .field("ssl_mode", &self.ssl_mode)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("log_statements", &self.log_statements)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_what_they_name_and_bad_ssl_modes_are_refused() {
        let c = PostgresConfig::new("postgresql://u:secret@h/db")
            .with_timeout(Duration::from_secs(30))
            .with_retries(3, Duration::from_millis(100));
        assert_eq!(c.connect_timeout, Duration::from_secs(30));
        assert_eq!(c.query_timeout, Duration::from_secs(30));
        assert_eq!(c.max_retries, 3);
        assert!(!format!("{c:?}").contains("secret"));
        for mode in [
            "disable",
            "ALLOW",
            "Prefer",
            "require",
            "verify-ca",
            "VERIFY-FULL",
        ] {
            assert!(c.clone().with_ssl_mode(mode).enhanced().is_ok(), "{mode}");
        }
        let e = c.with_ssl_mode("sometimes").enhanced().unwrap_err();
        assert!(matches!(e, StateError::Configuration(_)), "{e}");
    }
}
