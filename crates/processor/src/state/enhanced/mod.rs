//! [`EnhancedPostgresBackend`]: the public face of the PostgreSQL backend. The key/value
//! operations and transactions are here; `coordination` and `replication` hold the rest.

mod coordination;
mod exactly_once;
mod maintenance;
mod replication;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::state::assembly::{assemble, migration_status, Core};
use crate::state::backend::StateBackend;
use crate::state::config::enhanced::EnhancedPostgresConfig;
use crate::state::config::enhanced::IsolationLevel;
use crate::state::coordination::Coordinator;
use crate::state::error::StateResult;
use crate::state::limits::check_ttl;
use crate::state::ops::conn_ops::StateEntry;
use crate::state::ops::entry_copy::BatchEntry;
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::PoolStats;
use crate::state::routing::causal::{Scope, Session};
use crate::state::schema::migrations::MigrationStatus;
use crate::state::stats::counters::BackendStats;
use crate::state::transaction::retry;
use crate::state::transaction::tx::{PostgresTransaction, TxFuture};

/// The PostgreSQL state backend: a pooled, migrated state table with metadata, TTL and
/// versions.
///
/// Cheap to clone ([`clone_handle`](Self::clone_handle)): every handle shares one pool and one
/// set of statistics. It offers the [`StateBackend`] methods, metadata, TTL, batches (UNNEST
/// and binary COPY), optimistic versions, metadata queries, pool and operation statistics,
/// transactions, read replicas, coordination (advisory locks, lock guards, leader election,
/// LISTEN/NOTIFY), retention, archive, checkpoints and partitioning.
///
/// # Many tasks at once
/// - Point operations (get, contains, get_many, the puts, deletes and versioned writes) share
///   pooled connections, pipelined: when every connection is in use, a call joins the
///   least-loaded one instead of waiting for the pool. Transactions, batches, COPY and scans
///   take a connection of their own.
/// - Puts (`put`, `put_with_metadata`, `put_with_ttl`, `put_entry`) that find two put
///   statements already running queue, and the queued ones are written by one statement,
///   with one commit: each caller still gets its own result (a put whose neighbour the server
///   refuses is run again alone), and one statement holds each key once. A put
///   that finds room runs alone at once. `get_stats()` counts `coalesced_puts`.
/// - Gets likewise, where every read goes to the primary: queued gets are answered by one
///   `key = ANY($1)` lookup (`coalesced_gets`). With read replicas, gets are pipelined but not
///   combined (each carries its own read-your-writes floor).
#[derive(Clone)]
pub struct EnhancedPostgresBackend {
    inner: Arc<Core>,
    /// Reads of this handle skip the replicas.
    primary_only: bool,
    /// This handle's read-your-writes scope, shared with its clones.
    session: Arc<Session>,
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
        Ok(Self {
            inner: assemble(config).await?,
            primary_only: false,
            session: Arc::new(Session::default()),
        })
    }

    /// Where the state table of `config` stands with the embedded migrations (whether it
    /// exists, the migrations applied with their checksums, those pending), read on one
    /// connection without creating or changing anything.
    pub async fn migration_status(config: &EnhancedPostgresConfig) -> StateResult<MigrationStatus> {
        migration_status(config).await
    }

    /// Another handle to the same backend (same pool, same statistics).
    pub fn clone_handle(&self) -> Self {
        self.clone()
    }

    /// Runs `CHECKPOINT` on the primary. Needs superuser or the `pg_checkpoint` role;
    /// otherwise [`StateError::PermissionDenied`](crate::state::StateError::PermissionDenied).
    pub async fn checkpoint(&self) -> StateResult<()> {
        self.store()
            .on_primary(async |c| Ok(c.client.batch_execute("CHECKPOINT").await?))
            .await
    }

    /// The configuration this backend was created with.
    pub fn config(&self) -> &EnhancedPostgresConfig {
        &self.inner.config
    }

    /// The quoted, schema-qualified name of the state table.
    pub fn table(&self) -> &str {
        &self.inner.store.ctx.names.qualified
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Where this handle's reads may go.
    fn scope(&self) -> Scope<'_> {
        Scope {
            session: &self.session,
            primary_only: self.primary_only,
        }
    }

    pub(crate) fn coordinator(&self) -> &Coordinator {
        &self.inner.coordinator
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
            .upsert(&self.session, key, value, &metadata, None)
            .await
            .map(|_| ())
    }

    /// Stores `value` for `ttl`, measured on the server's clock. The entry is invisible to every
    /// read once the TTL has passed. `ttl` must be positive and at most 100 years.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        let micros = check_ttl(ttl)?;
        let empty = serde_json::Value::Object(serde_json::Map::new());
        self.store()
            .upsert(&self.session, key, value, &empty, Some(micros))
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
        self.store()
            .upsert(&self.session, key, value, &metadata, micros)
            .await
    }

    /// Writes many entries in one round trip per chunk (UNNEST arrays), all or nothing. When a
    /// key occurs more than once, its last occurrence wins.
    pub async fn batch_put(&self, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        self.store().batch_put(&self.session, entries).await
    }

    /// Bulk-loads entries with binary COPY into a staging table and one upsert from there, all
    /// or nothing. When a key occurs more than once, its last occurrence wins. Returns the
    /// number of distinct keys written.
    pub async fn batch_copy(&self, entries: &[(&[u8], &[u8])]) -> StateResult<u64> {
        self.store().batch_copy(&self.session, entries).await
    }

    /// Bulk-loads whole entries (key, value, metadata, TTL) with binary COPY into a staging
    /// table and one upsert from there, all or nothing: the bulk path for a mix of plain
    /// entries and ones with metadata or an expiry. When a key occurs more than once, its last
    /// occurrence wins. Every entry is checked before anything is sent. Returns the number of
    /// distinct keys written.
    pub async fn batch_copy_entries(&self, entries: &[BatchEntry<'_>]) -> StateResult<u64> {
        self.store()
            .batch_copy_entries(&self.session, entries)
            .await
    }

    /// One page of [`list_keys`](StateBackend::list_keys): at most `limit` (1 to
    /// [`MAX_PAGE`](crate::state::limits::MAX_PAGE)) live keys starting with `prefix`, after
    /// `start_after` (`None`: from the first), in byte order. Pass the last key of a page as the
    /// next page's `start_after`; a page shorter than `limit` is the last. Each page is one
    /// statement, so memory stays bounded by the page whatever the number of keys; pages are
    /// not one snapshot (a key written between pages shows up if it sorts after the cursor).
    pub async fn list_keys_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> StateResult<Vec<Vec<u8>>> {
        self.store()
            .list_keys_page(prefix, start_after, limit, self.scope())
            .await
    }

    /// The values of `keys`, in their order (`None` for a key with no live entry; a key given
    /// twice gets its value twice), read by one statement in one round trip, on a replica when
    /// one may serve the read (as [`get`](StateBackend::get)). At most
    /// [`MAX_GET_MANY`](crate::state::limits::MAX_GET_MANY) keys; more, or an invalid key, is
    /// [`StateError::InvalidInput`](crate::state::StateError::InvalidInput).
    pub async fn get_many(&self, keys: &[&[u8]]) -> StateResult<Vec<Option<Vec<u8>>>> {
        self.store().get_many(keys, self.scope()).await
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
        self.store()
            .put_with_version(&self.session, key, value, expected)
            .await
    }

    /// The value and version under `key`, for a later
    /// [`put_with_version`](Self::put_with_version) or [`delete_with_version`](Self::delete_with_version).
    pub async fn get_with_version(&self, key: &[u8]) -> StateResult<Option<(Vec<u8>, i64)>> {
        Ok(self
            .store()
            .get_entry(key, self.scope())
            .await?
            .map(|e| (e.value, e.version)))
    }

    /// Deletes the live entry under `key` only if its version is still `expected`;
    /// [`StateError::ConcurrentModification`](crate::state::StateError::ConcurrentModification) otherwise (also when it is missing).
    pub async fn delete_with_version(&self, key: &[u8], expected: i64) -> StateResult<()> {
        self.store()
            .delete_with_version(&self.session, key, expected)
            .await
    }

    /// Compare-and-set on the value: replaces the entry with `value` only if its current value
    /// is `expected` (`None`: only if there is no live entry). Returns whether it did.
    pub async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> StateResult<bool> {
        Ok(self
            .store()
            .compare_and_set(&self.session, key, expected, value)
            .await?
            .is_some())
    }

    /// Starts a transaction at `level` on a pooled primary connection.
    pub async fn begin_transaction(
        &self,
        level: IsolationLevel,
    ) -> StateResult<PostgresTransaction> {
        self.begin_with(level, false).await
    }

    /// Starts a transaction at the configured default isolation level
    /// ([`EnhancedPostgresConfig::with_isolation_level`]).
    pub async fn begin(&self) -> StateResult<PostgresTransaction> {
        self.begin_transaction(self.inner.config.isolation_level)
            .await
    }

    /// Starts a read-only transaction at `level`: writes inside it fail on the server.
    pub async fn begin_read_only(&self, level: IsolationLevel) -> StateResult<PostgresTransaction> {
        self.begin_with(level, true).await
    }

    async fn begin_with(
        &self,
        level: IsolationLevel,
        read_only: bool,
    ) -> StateResult<PostgresTransaction> {
        let s = self.store();
        PostgresTransaction::begin(
            s.ctx.clone(),
            (
                self.session.clone(),
                // A read-only transaction writes nothing whose position a read must wait for.
                s.router.tracks_writes() && !read_only,
            ),
            level,
            read_only,
        )
        .await
    }

    /// Runs `f` in a transaction at `level` and commits, re-running the whole transaction
    /// after a serialization failure (40001), a deadlock (40P01) or a connection lost before
    /// COMMIT was sent, up to [`with_max_retries`](EnhancedPostgresConfig::with_max_retries)
    /// times with jittered exponential backoff. Any other error is returned at once (the
    /// transaction rolled back). An unknown COMMIT outcome is returned as
    /// [`StateError::CommitOutcomeUnknown`](crate::state::StateError::CommitOutcomeUnknown), never retried.
    ///
    /// `f` may run several times, so it must not have effects outside the transaction that
    /// cannot be repeated. It returns a boxed future (`Box::pin(async move { ... })`) so that
    /// the whole call stays `Send` and can run inside `tokio::spawn`; data the closure needs on
    /// every attempt is cloned into each future.
    ///
    /// ```no_run
    /// # async fn demo(backend: processor::state::EnhancedPostgresBackend) -> processor::state::StateResult<()> {
    /// use processor::state::IsolationLevel;
    /// let (from, to, amount) = (b"acct:1".to_vec(), b"acct:2".to_vec(), 10i64);
    /// let parse = |v: Option<Vec<u8>>| -> i64 {
    ///     v.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
    /// };
    /// backend
    ///     .transaction(IsolationLevel::Serializable, |tx| {
    ///         let (from, to) = (from.clone(), to.clone());
    ///         Box::pin(async move {
    ///             let a = parse(tx.get(&from).await?);
    ///             let b = parse(tx.get(&to).await?);
    ///             tx.put(&from, (a - amount).to_string().as_bytes()).await?;
    ///             tx.put(&to, (b + amount).to_string().as_bytes()).await
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<T, F>(&self, level: IsolationLevel, f: F) -> StateResult<T>
    where
        F: for<'t> FnMut(&'t mut PostgresTransaction) -> TxFuture<'t, T> + Send,
        T: Send,
    {
        let config = &self.inner.config;
        retry::run(
            || self.begin_transaction(level),
            f,
            config.max_retries,
            config.retry_backoff,
            &self.store().ctx.stats,
        )
        .await
    }

    /// The whole live entry under `key` (value, metadata, version, timestamps), if any.
    pub async fn get_entry(&self, key: &[u8]) -> StateResult<Option<StateEntry>> {
        self.store().get_entry(key, self.scope()).await
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
        self.store()
            .query_by_metadata(path, value, self.scope())
            .await
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
        self.inner.stats()
    }

    /// Connection pool figures.
    pub fn get_pool_stats(&self) -> PoolStats {
        self.store().ctx.primary.stats()
    }
}

impl std::fmt::Debug for EnhancedPostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnhancedPostgresBackend")
            .field("url", &self.inner.config.redacted_url())
            .field("table", &self.inner.store.ctx.names.qualified)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl StateBackend for EnhancedPostgresBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        self.store().get(key, self.scope()).await
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        let empty = serde_json::Value::Object(serde_json::Map::new());
        self.store()
            .upsert(&self.session, key, value, &empty, None)
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        self.store().delete(&self.session, key).await
    }

    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        self.store().list_keys(prefix, self.scope()).await
    }

    async fn clear(&self) -> StateResult<()> {
        self.store().clear(&self.session).await
    }

    async fn count(&self) -> StateResult<usize> {
        self.store().count(self.scope()).await
    }

    async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        self.store().contains(key, self.scope()).await
    }
}
