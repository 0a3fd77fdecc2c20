//! [`PostgresStateBackend`]: the basic backend, as the seed project's `processor::state` has it
//! (the [`StateBackend`] methods, metadata, TTL, batches, checkpoints by UUID, statistics,
//! VACUUM, sizes, a health check, close), over the same assembled core as the enhanced
//! backend: one pool, the same schema and table, every guarantee of the enhanced backend's
//! operations. Operations that fail on a transient error run again, up to `max_retries`
//! times.

mod config;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use config::PostgresConfig;

use crate::state::assembly::{assemble, Core};
use crate::state::backend::StateBackend;
use crate::state::error::{StateError, StateResult};
use crate::state::limits::check_ttl;
use crate::state::maintenance::{self, CheckpointInfo};
use crate::state::ops::conn_ops::empty_object;
use crate::state::retry::backoff;
use crate::state::routing::causal::{Scope, Session};

/// Operation counts of a [`PostgresStateBackend`], from
/// [`stats`](PostgresStateBackend::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresStats {
    /// Single-key reads run (`get`, `contains`), failed ones and retries included.
    pub get_count: u64,
    /// Writes run (single puts, and each row of a batch), failed ones and retries included.
    pub put_count: u64,
    /// Deletes run, failed ones and retries included.
    pub delete_count: u64,
    /// Operations run (each statement of the core counts once).
    pub query_count: u64,
    /// Transactions begun (batches of several chunks, checkpoints and explicit transactions
    /// of the enhanced backend on the same core).
    pub transaction_count: u64,
    /// Operations this backend ran again after a transient failure.
    pub retry_count: u64,
    /// Bytes of the keys and values written by operations that succeeded.
    pub bytes_written: u64,
    /// Bytes of the values read by operations that succeeded.
    pub bytes_read: u64,
}

/// The basic PostgreSQL backend. Cheap to clone: clones share the pool, the statistics and
/// [`close`](Self::close). Migrating to
/// [`EnhancedPostgresBackend`](crate::state::EnhancedPostgresBackend) keeps the same table and
/// data.
#[derive(Clone)]
pub struct PostgresStateBackend {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` once closed.
    core: RwLock<Option<Arc<Core>>>,
    /// The backend's read-your-writes and settling session.
    session: Session,
    max_retries: u32,
    retry_backoff: Duration,
    retries: AtomicU64,
}

impl std::fmt::Debug for PostgresStateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PostgresStateBackend");
        match self.core() {
            Ok(core) => d.field("table", &core.store.ctx.names.qualified),
            Err(_) => d.field("closed", &true),
        };
        d.finish_non_exhaustive()
    }
}

impl PostgresStateBackend {
    /// Validates `config` (a bad `ssl_mode`, name or URL fails before anything connects),
    /// connects, applies the migrations and opens the pool.
    pub async fn new(config: PostgresConfig) -> StateResult<Self> {
        let core = assemble(config.enhanced()?).await?;
        Ok(PostgresStateBackend {
            shared: Arc::new(Shared {
                core: RwLock::new(Some(core)),
                session: Session::default(),
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
                retries: AtomicU64::new(0),
            }),
        })
    }

    fn core(&self) -> StateResult<Arc<Core>> {
        let core = self.shared.core.read().unwrap_or_else(|p| p.into_inner());
        core.clone()
            .ok_or_else(|| StateError::NotInitialized("the backend was closed".into()))
    }

    fn scope(&self) -> Scope<'_> {
        Scope {
            session: &self.shared.session,
            primary_only: false,
        }
    }

    /// Runs `op` on the core, again after a transient failure (see
    /// [`PostgresConfig::max_retries`]), waiting a jittered, doubling backoff between runs.
    async fn run<T, F, Fut>(&self, op: F) -> StateResult<T>
    where
        F: Fn(Arc<Core>) -> Fut,
        Fut: Future<Output = StateResult<T>>,
    {
        let mut attempt = 0;
        loop {
            // Looked up each time: a retry after `close` fails as the backend is closed.
            match op(self.core()?).await {
                Err(e) if e.is_retryable() && attempt < self.shared.max_retries => {
                    tracing::debug!(error = %e, attempt, "retrying after a transient failure");
                    self.shared.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff(self.shared.retry_backoff, attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Stores `value` with a metadata object (a JSON object), replacing the entry.
    pub async fn put_with_metadata(
        &self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
    ) -> StateResult<()> {
        let (session, metadata) = (&self.shared.session, &metadata);
        self.run(|c| async move { c.store.upsert(session, key, value, metadata, None).await })
            .await
            .map(|_| ())
    }

    /// Stores `value` for `ttl` (positive, at most 100 years), measured on the server's clock;
    /// the entry is invisible to every read once it has passed.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        let micros = check_ttl(ttl)?;
        let (session, empty) = (&self.shared.session, &empty_object());
        self.run(|c| async move {
            c.store
                .upsert(session, key, value, empty, Some(micros))
                .await
        })
        .await
        .map(|_| ())
    }

    /// Deletes the expired entries (and delete tombstones) now; returns how many had expired.
    pub async fn cleanup_expired(&self) -> StateResult<usize> {
        let session = &self.shared.session;
        let n = self
            .run(|c| async move { c.cleanup_expired(session).await })
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Writes many entries, all or nothing; a key given twice gets its last value.
    pub async fn batch_put(&self, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        let session = &self.shared.session;
        self.run(|c| async move { c.store.batch_put(session, entries).await })
            .await
    }

    /// Takes a checkpoint of every live entry (one consistent snapshot, whatever writers do
    /// meanwhile); returns its UUID.
    pub async fn create_checkpoint(&self) -> StateResult<Uuid> {
        // Not retried: a failed attempt may have committed a checkpoint already.
        let core = self.core()?;
        let info = maintenance::create_checkpoint(&core.store, "checkpoint", &|_| {}).await?;
        Ok(info.checkpoint_id)
    }

    /// Replaces the live state with checkpoint `checkpoint_id`'s in one transaction (readers
    /// see the old state or the restored one, never a mix); keys it does not have are
    /// deleted. [`StateError::RestoreFailed`] when this table has no such checkpoint.
    pub async fn restore_checkpoint(&self, checkpoint_id: Uuid) -> StateResult<()> {
        let core = self.core()?;
        let store = &core.store;
        let Some(id) = maintenance::find_checkpoint(store, checkpoint_id).await? else {
            return Err(StateError::RestoreFailed(format!(
                "no checkpoint {checkpoint_id} of {}",
                store.ctx.names.qualified
            )));
        };
        let restore = maintenance::restore_checkpoint(store, id);
        store
            .tracked(&self.shared.session, restore)
            .await
            .map(|_| ())
    }

    /// This table's checkpoints, newest first.
    pub async fn list_checkpoints(&self) -> StateResult<Vec<CheckpointInfo>> {
        self.run(|c| async move { maintenance::list_checkpoints(&c.store).await })
            .await
    }

    /// Operation counts (zero after [`close`](Self::close)).
    pub async fn stats(&self) -> PostgresStats {
        let Ok(core) = self.core() else {
            return PostgresStats::default();
        };
        let s = core.stats();
        PostgresStats {
            get_count: s.get_count,
            put_count: s.put_count,
            delete_count: s.delete_count,
            query_count: s.query_count,
            transaction_count: s.transactions_begun,
            retry_count: self.shared.retries.load(Relaxed) + s.transaction_retries,
            bytes_written: s.bytes_written,
            bytes_read: s.bytes_read,
        }
    }

    /// `VACUUM (ANALYZE)` of the state table, on a connection of its own.
    pub async fn vacuum(&self) -> StateResult<()> {
        let core = self.core()?;
        maintenance::vacuum_analyze(&core.store, false, core.store.ctx.limit).await
    }

    /// The state table's bytes: `(total, table)`, where the total adds its indexes (TOAST is
    /// in both); over its partitions when it has any.
    pub async fn table_stats(&self) -> StateResult<(i64, i64)> {
        self.run(|c| async move { maintenance::table_sizes(&c.store).await })
            .await
    }

    /// Whether a pooled connection completes a round trip to the server (`Ok(false)` when it
    /// does not, or after [`close`](Self::close)).
    pub async fn health_check(&self) -> StateResult<bool> {
        let Ok(core) = self.core() else {
            return Ok(false);
        };
        match core.store.ping().await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(error = %e, "health check failed");
                Ok(false)
            }
        }
    }

    /// Closes the backend: this handle and its clones fail every later call with
    /// [`StateError::NotInitialized`] (except [`stats`](Self::stats), then all zeros, and
    /// [`health_check`](Self::health_check), then `Ok(false)`); the pool and background
    /// tasks end once the calls under way have finished.
    pub async fn close(&self) {
        let core = self
            .shared
            .core
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(core);
    }
}

#[async_trait]
impl StateBackend for PostgresStateBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        self.run(|c| async move { c.store.get(key, self.scope()).await })
            .await
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        self.put_with_metadata(key, value, empty_object()).await
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        let session = &self.shared.session;
        self.run(|c| async move { c.store.delete(session, key).await })
            .await
    }

    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        self.run(|c| async move { c.store.list_keys(prefix, self.scope()).await })
            .await
    }

    async fn clear(&self) -> StateResult<()> {
        let session = &self.shared.session;
        self.run(|c| async move { c.store.clear(session).await })
            .await
    }

    async fn count(&self) -> StateResult<usize> {
        self.run(|c| async move { c.store.count(self.scope()).await })
            .await
    }

    async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        self.run(|c| async move { c.store.contains(key, self.scope()).await })
            .await
    }
}
