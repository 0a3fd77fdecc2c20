//! [`PostgresStateBackend`]: the basic backend, the plain [`StateBackend`] on the same core as
//! the enhanced one (one pool, the same schema), without the extras.

use std::time::Duration;

use async_trait::async_trait;

use crate::state::backend::StateBackend;
use crate::state::config::enhanced::{EnhancedPostgresConfig, PostgresPoolConfig};
use crate::state::enhanced::EnhancedPostgresBackend;
use crate::state::error::StateResult;

/// Settings of the basic backend.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgresql://` URL or libpq keyword string.
    pub url: String,
    /// Schema holding the state table. Default `public`.
    pub schema: String,
    /// State table name. Default `state_entries`.
    pub table_name: String,
    /// Pool size. Default 10.
    pub max_connections: u32,
    /// Wait for a pooled connection at most this long. Default 30 s.
    pub acquire_timeout: Duration,
}

impl PostgresConfig {
    /// Default settings for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "public".to_string(),
            table_name: "state_entries".to_string(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &crate::state::config::connstr::redact(&self.url))
            .field("schema", &self.schema)
            .field("table_name", &self.table_name)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

/// The basic PostgreSQL backend: only the [`StateBackend`] methods. Migrating to
/// [`EnhancedPostgresBackend`] keeps the same table and data.
#[derive(Clone, Debug)]
pub struct PostgresStateBackend {
    core: EnhancedPostgresBackend,
}

impl PostgresStateBackend {
    /// Connects, applies migrations and opens the pool.
    pub async fn new(config: PostgresConfig) -> StateResult<Self> {
        let enhanced = EnhancedPostgresConfig::new(config.url)
            .with_schema(config.schema)
            .with_table_name(config.table_name)
            .with_pool_config(PostgresPoolConfig {
                min_connections: 1,
                max_connections: config.max_connections,
                acquire_timeout: config.acquire_timeout,
                ..PostgresPoolConfig::default()
            });
        Ok(Self {
            core: EnhancedPostgresBackend::new(enhanced).await?,
        })
    }
}

#[async_trait]
impl StateBackend for PostgresStateBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        self.core.get(key).await
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        self.core.put(key, value).await
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        self.core.delete(key).await
    }

    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        self.core.list_keys(prefix).await
    }

    async fn clear(&self) -> StateResult<()> {
        self.core.clear().await
    }

    async fn count(&self) -> StateResult<usize> {
        self.core.count().await
    }

    async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        self.core.contains(key).await
    }
}
