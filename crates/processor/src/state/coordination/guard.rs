//! [`PostgresLockGuard`]: a named session lock released on drop, with a fencing token and a
//! lost signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::state::coordination::{
    check_lock_name, lock_key, CoordinationHandle, Coordinator, HeldLock, LockMode, ADVISORY_LOCKS,
};
use crate::state::error::StateResult;
use crate::state::wire::connection::wait_closed;

/// A held named advisory lock, released when dropped (or explicitly with
/// [`release`](Self::release)).
///
/// The lock lives on one of the backend's lock sessions (see "How a lock is held" below).
/// If that session ends while the
/// guard is held, the server has released the lock: [`lost`](Self::lost) resolves and
/// [`is_lost`](Self::is_lost) turns true, and another process may acquire it. Work that must
/// not be done twice should check the [`fence`](Self::fence) inside its transaction
/// ([`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence)), which
/// refuses a holder whose lock has moved on even before it has noticed.
///
/// Dropping the guard releases the lock in the background on the runtime it was acquired on;
/// if that runtime is gone, the connection closes and the server releases the lock. Dropping
/// never panics.
///
/// # How a lock is held
/// Held session locks live on a few **dedicated** connections, the lock sessions, opened with
/// tight TCP keepalives and never shared with the pool: at most
/// [`MAX_LOCK_SESSIONS`](crate::state::MAX_LOCK_SESSIONS) for locks granted at once, however many are held (see the `sessions`
/// module). A lock is held exactly as long as it is not released and its session lives:
/// released explicitly (`pg_advisory_unlock` and the bookkeeping row deleted), in the
/// background when its guard or holder is dropped, or by the server when the session ends
/// (terminated backend, network failure: every lock on that session is lost together, and each
/// one's *lost* signal fires). Two backends, or two tasks of one backend, never hold the same
/// exclusive lock: PostgreSQL's session locks are re-entrant, so two holders of one key in this
/// process are always kept on different sessions, and the server excludes them as it excludes
/// other processes. A lock that must be waited for is waited for
/// on a connection of its own. Leader election keeps one connection per campaign (a successor
/// may terminate a stuck leader's session, which must hold nothing else).
///
/// # Lock names
/// [`lock_key`](crate::state::lock_key) maps a name to the `bigint` key PostgreSQL locks: the first 8 bytes, big-endian,
/// of SHA-256 of `"pgstate.lock:"` followed by the name's UTF-8 bytes. The prefix keeps our
/// keys apart from other users of advisory locks (and leader election uses its own,
/// `"pgstate.leader:"`); the function is fixed forever, so every machine and version agrees.
///
/// # Fencing tokens
/// Each acquisition increments the lock's row in `state_lock_fences` (never reset) and the new
/// value is the holder's token. A write that must only happen under the lock checks the token
/// inside its transaction ([`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence)):
/// a holder whose lock was lost and re-acquired elsewhere is refused, even if it has not noticed
/// yet.
pub struct PostgresLockGuard {
    held: Option<HeldLock>,
    coordinator: Arc<Coordinator>,
    runtime: tokio::runtime::Handle,
}

impl PostgresLockGuard {
    /// Acquires the exclusive lock `name`, waiting up to `timeout` (zero: do not wait).
    /// `Ok(None)` if someone else still held it when the time was up.
    pub async fn new(
        backend: impl Into<CoordinationHandle>,
        name: &str,
        timeout: Duration,
    ) -> StateResult<Option<Self>> {
        Self::acquire(backend.into(), name, LockMode::Exclusive, timeout).await
    }

    /// Acquires the lock `name` in shared (reader) mode, waiting up to `timeout`: any number of
    /// shared holders at once, none while an exclusive holder has it.
    pub async fn new_shared(
        backend: impl Into<CoordinationHandle>,
        name: &str,
        timeout: Duration,
    ) -> StateResult<Option<Self>> {
        Self::acquire(backend.into(), name, LockMode::Shared, timeout).await
    }

    async fn acquire(
        backend: CoordinationHandle,
        name: &str,
        mode: LockMode,
        timeout: Duration,
    ) -> StateResult<Option<Self>> {
        check_lock_name(name)?;
        let coordinator = backend.0;
        let held = coordinator
            .acquire(lock_key(name), Some(name), mode, timeout)
            .await?;
        Ok(held.map(|held| PostgresLockGuard {
            held: Some(held),
            coordinator,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    fn held(&self) -> &HeldLock {
        // Only `release` and `drop` take it, and both consume the guard.
        self.held
            .as_ref()
            .unwrap_or_else(|| unreachable!("a live guard holds its lock"))
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        self.held().name.as_deref().unwrap_or_default()
    }

    /// The advisory-lock key ([`lock_key`](crate::state::lock_key) of the name).
    pub fn key(&self) -> i64 {
        self.held().key
    }

    /// Exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.held().mode
    }

    /// This acquisition's fencing token. Exclusive: greater than that of every earlier
    /// acquisition of the name (in this schema). Shared: the token of the latest exclusive
    /// acquisition (readers do not advance it, so they never fence each other off).
    pub fn fencing_token(&self) -> i64 {
        self.held().token
    }

    /// What a transaction needs to check that this holder still owns the lock; see
    /// [`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence).
    /// Cheap to clone into retry closures.
    pub fn fence(&self) -> Fence {
        self.held().fence()
    }

    /// The server process id of the session holding the lock (as in `pg_locks` and
    /// `pg_stat_activity`).
    pub fn backend_pid(&self) -> i32 {
        self.held().backend_pid()
    }

    /// Whether the lock's connection has ended (so the server no longer holds the lock for us).
    pub fn is_lost(&self) -> bool {
        self.held().is_lost()
    }

    /// Resolves when the lock's connection ends: from then on the lock is not held. Does not
    /// borrow the guard, so it can be awaited in a `select!` beside the guarded work.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.held().lost_signal();
        async move { wait_closed(&mut signal).await }
    }

    /// Releases the lock now. [`StateError::LockLost`](crate::state::StateError::LockLost) if
    /// its connection had already ended (then the server released it earlier and the
    /// guarded work was not protected all along).
    pub async fn release(mut self) -> StateResult<()> {
        match self.held.take() {
            Some(held) => self.coordinator.release(held).await,
            None => Ok(()),
        }
    }
}

impl Drop for PostgresLockGuard {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let coordinator = self.coordinator.clone();
        // Release on the runtime the connection's I/O runs on, whichever thread drops us. If
        // that runtime has shut down, the task is dropped with the connection, and the server
        // releases the lock when the connection closes. (`Handle::spawn` needs no `enter()`,
        // which could panic during thread teardown.)
        self.runtime.spawn(async move {
            if let Err(e) = coordinator.release(held).await {
                tracing::debug!(error = %e, "releasing a dropped lock guard");
            }
        });
    }
}

impl std::fmt::Debug for PostgresLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held {
            Some(h) => f
                .debug_struct("PostgresLockGuard")
                .field("name", &h.name)
                .field("key", &h.key)
                .field("mode", &h.mode)
                .field("fencing_token", &h.token)
                .field("lost", &h.is_lost())
                .finish(),
            None => f.write_str("PostgresLockGuard(released)"),
        }
    }
}

/// Checks a [`Fence`] inside a transaction: the lock's current token (row share-locked until
/// the transaction ends, so no new exclusive acquisition can commit in between), and whether
/// the holder's session still holds the lock *under this token* (its bookkeeping row: a later
/// acquisition on the same reused session has another id, or no row yet). $1 key, $2 holder's
/// backend pid, $3 token, $4 acquisition id.
pub(crate) fn fence_sql(names: &crate::state::schema::names::TableNames) -> String {
    format!(
        "SELECT f.token, EXISTS (
             SELECT 1 FROM ({ADVISORY_LOCKS}) l WHERE l.granted AND l.pid = $2 AND l.lock_key = $1)
           AND EXISTS (
             SELECT 1 FROM {locks} b
             WHERE b.lock_key = $1 AND b.backend_pid = $2 AND b.fencing_token = $3
               AND b.acquisition_id = $4)
         FROM {fences} f WHERE f.lock_key = $1
         FOR SHARE OF f",
        locks = names.locks,
        fences = names.fences
    )
}

/// A lock holder's claim, checked inside a transaction by
/// [`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub(crate) key: i64,
    pub(crate) name: String,
    pub(crate) token: i64,
    pub(crate) backend_pid: i32,
    pub(crate) acquisition: String,
}

impl Fence {
    /// The fencing token presented.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// The lock's key.
    pub fn key(&self) -> i64 {
        self.key
    }
}
