//! [`EnhancedPostgresBackend`]: the public face of the PostgreSQL backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::state::backend::StateBackend;
use crate::state::config::EnhancedPostgresConfig;
use crate::state::connection::Connector;
use crate::state::error::StateResult;
use crate::state::limits::check_ttl;
use crate::state::ops::{StateEntry, Store};
use crate::state::pool::{ConnPool, PoolStats};
use crate::state::schema::{migrate, TableNames};
use crate::state::stats::{BackendStats, Stats};

/// The PostgreSQL state backend: a pooled, migrated state table with metadata, TTL and
/// versions.
///
/// Cheap to clone ([`clone_handle`](Self::clone_handle)): every handle shares one pool and one
/// set of statistics. What works today: the [`StateBackend`] methods, metadata, TTL, batches
/// (UNNEST and binary COPY), optimistic versions, metadata queries, pool and operation
/// statistics. Not yet implemented (configuration is accepted and validated, nothing more):
/// read replicas (every operation runs on the primary) and the retention policy.
#[derive(Clone)]
pub struct EnhancedPostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: EnhancedPostgresConfig,
}

impl EnhancedPostgresBackend {
    /// Validates `config`, connects, applies the embedded migrations (under an advisory lock, so
    /// concurrent starts are safe) and opens the pool.
    ///
    /// Fails with [`StateError::Configuration`](crate::state::StateError::Configuration) for a
    /// bad URL or setting, [`StateError::InvalidInput`](crate::state::StateError::InvalidInput)
    /// for a bad schema or table name, and a connection, TLS or timeout error when the server
    /// cannot be reached.
    pub async fn new(config: EnhancedPostgresConfig) -> StateResult<Self> {
        let valid = config.validate()?;
        let names = TableNames::new(valid.schema, valid.table);
        let connector = Connector::new(
            &valid.primary,
            config.connect_timeout,
            config.statement_timeout,
            &config.application_name,
        )?;
        migrate(&connector, &names).await?;
        let pool = ConnPool::new(connector, names.clone(), &config.pool).await?;
        let store = Store {
            pool,
            stats: Arc::new(Stats::new(config.slow_query_threshold)),
            names,
        };
        tracing::info!(url = %config.redacted_url(), table = %store.names.qualified, "state backend ready");
        Ok(Self {
            inner: Arc::new(Inner { store, config }),
        })
    }

    /// Another handle to the same backend (same pool, same statistics).
    pub fn clone_handle(&self) -> Self {
        self.clone()
    }

    /// The configuration this backend was created with.
    pub fn config(&self) -> &EnhancedPostgresConfig {
        &self.inner.config
    }

    /// The quoted, schema-qualified name of the state table.
    pub fn table(&self) -> &str {
        &self.inner.store.names.qualified
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Stores `value` with a metadata object, replacing the previous entry. `metadata` must be
    /// a JSON object.
    pub async fn put_with_metadata(
        &self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
    ) -> StateResult<()> {
        self.store()
            .upsert(key, value, &metadata, None)
            .await
            .map(|_| ())
    }

    /// Stores `value` for `ttl`, measured on the server's clock. The entry is invisible to every
    /// read once the TTL has passed. `ttl` must be positive and at most 100 years.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        let micros = check_ttl(ttl)?;
        let empty = serde_json::Value::Object(serde_json::Map::new());
        self.store()
            .upsert(key, value, &empty, Some(micros))
            .await
            .map(|_| ())
    }

    /// Stores `value` with metadata and an optional TTL; returns the entry's new version.
    pub async fn put_entry(
        &self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
        ttl: Option<Duration>,
    ) -> StateResult<i64> {
        let micros = ttl.map(check_ttl).transpose()?;
        self.store().upsert(key, value, &metadata, micros).await
    }

    /// Writes many entries in one round trip per chunk (UNNEST arrays), all or nothing. When a
    /// key occurs more than once, its last occurrence wins.
    pub async fn batch_put(&self, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        self.store().batch_put(entries).await
    }

    /// Bulk-loads entries with binary COPY into a staging table and one upsert from there, all
    /// or nothing. When a key occurs more than once, its last occurrence wins. Returns the
    /// number of distinct keys written.
    pub async fn batch_copy(&self, entries: &[(&[u8], &[u8])]) -> StateResult<u64> {
        self.store().batch_copy(entries).await
    }

    /// Optimistic write. `None`: create the entry, failing with
    /// [`StateError::ConcurrentModification`](crate::state::StateError::ConcurrentModification)
    /// if a live entry exists. `Some(v)`: replace the entry only if its version is still `v`
    /// (same error otherwise, also when it is missing). Returns the new version.
    pub async fn put_with_version(
        &self,
        key: &[u8],
        value: &[u8],
        expected: Option<i64>,
    ) -> StateResult<i64> {
        self.store().put_with_version(key, value, expected).await
    }

    /// The whole live entry under `key` (value, metadata, version, timestamps), if any.
    pub async fn get_entry(&self, key: &[u8]) -> StateResult<Option<StateEntry>> {
        self.store().get_entry(key).await
    }

    /// Live entries whose metadata matches, in key order.
    ///
    /// `value` a JSON object: entries whose metadata contains it (`metadata @> value`, served
    /// by the GIN index); `path` only names the query. Any other `value`: entries whose field at
    /// `path` (dots for nesting, as in `"user.id"`) equals `value`.
    pub async fn query_by_metadata(
        &self,
        path: &str,
        value: &serde_json::Value,
    ) -> StateResult<Vec<StateEntry>> {
        self.store().query_by_metadata(path, value).await
    }

    /// Whether a pooled connection completes a round trip to the server.
    pub async fn health_check(&self) -> StateResult<bool> {
        match self.store().ping().await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(error = %e, "health check failed");
                Ok(false)
            }
        }
    }

    /// Operation counters and timings.
    pub fn get_stats(&self) -> BackendStats {
        self.store().stats.snapshot()
    }

    /// Connection pool figures.
    pub fn get_pool_stats(&self) -> PoolStats {
        self.store().pool.stats()
    }
}

impl std::fmt::Debug for EnhancedPostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnhancedPostgresBackend")
            .field("url", &self.inner.config.redacted_url())
            .field("table", &self.inner.store.names.qualified)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl StateBackend for EnhancedPostgresBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        self.store().get(key).await
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        let empty = serde_json::Value::Object(serde_json::Map::new());
        self.store()
            .upsert(key, value, &empty, None)
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        self.store().delete(key).await
    }

    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        self.store().list_keys(prefix).await
    }

    async fn clear(&self) -> StateResult<()> {
        self.store().clear().await
    }

    async fn count(&self) -> StateResult<usize> {
        self.store().count().await
    }

    async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        self.store().contains(key).await
    }
}
