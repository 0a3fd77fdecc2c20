//! Transactions: isolation levels, read-only mode, savepoints, the key/value operations inside
//! a transaction, and the retry loop.
//!
//! A [`PostgresTransaction`] owns one pooled primary connection from `BEGIN` until `COMMIT` or
//! `ROLLBACK`. The connection stays marked busy the whole time, so if the transaction is
//! dropped unfinished the pool never hands it out inside the transaction: a background task
//! rolls it back and returns it clean, or (if that fails, or no runtime is left) it is discarded.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::state::config::IsolationLevel;
use crate::state::coordination::{
    check_durable_payload, check_payload, durable_notify_sql, fence_sql, Fence, LockMode,
    NOTIFY_SQL,
};
use crate::state::error::{sqlstate, ErrorKind, StateError, StateResult};
use crate::state::ident::check_channel;
use crate::state::ident::Ident;
use crate::state::limits::{check_entry, check_key, check_metadata, check_ttl};
use crate::state::ops::{check_batch, MetadataQuery, StateEntry};
use crate::state::pool::{Conn, ConnPool};
use crate::state::router::Router;
use crate::state::schema::TableNames;
use crate::state::stats::{LockEvent, Op, Stats, TxEvent};

/// The future a [`transaction`](crate::state::EnhancedPostgresBackend::transaction) closure
/// returns: boxed and `Send`, borrowing the transaction for its lifetime.
pub type TxFuture<'t, T> = Pin<Box<dyn Future<Output = StateResult<T>> + Send + 't>>;

/// An open transaction on the primary. Finish it with [`commit`](Self::commit) or
/// [`rollback`](Self::rollback); dropping it unfinished rolls it back.
///
/// After a statement fails on the server, PostgreSQL refuses further statements until the
/// transaction ends or rolls back to a savepoint; `commit` then rolls back and reports
/// [`StateError::TransactionFailed`] (it never reports success for work that was discarded).
pub struct PostgresTransaction {
    conn: Option<Conn>,
    stats: Arc<Stats>,
    router: Arc<Router>,
    /// The runtime the connection's I/O runs on: a drop on any thread rolls back there.
    runtime: tokio::runtime::Handle,
    /// Set while a statement runs; still set afterwards means its future was dropped mid-way
    /// and the statement's effect is unknown, so the transaction must not commit.
    in_flight: AtomicBool,
    savepoints: Vec<String>,
    aborted: bool,
    level: IsolationLevel,
    read_only: bool,
    names: TableNames,
}

impl PostgresTransaction {
    pub(crate) async fn begin(
        pool: &ConnPool,
        stats: Arc<Stats>,
        router: Arc<Router>,
        names: TableNames,
        level: IsolationLevel,
        read_only: bool,
    ) -> StateResult<Self> {
        let mut conn = pool.get().await?;
        // Busy until COMMIT/ROLLBACK completes: see the module docs.
        conn.dirty = true;
        let sql = format!(
            "BEGIN ISOLATION LEVEL {}{}",
            level.as_sql(),
            if read_only { " READ ONLY" } else { "" }
        );
        conn.client.batch_execute(&sql).await?;
        stats.tx(TxEvent::Begun);
        Ok(PostgresTransaction {
            conn: Some(conn),
            stats,
            router,
            runtime: tokio::runtime::Handle::current(),
            in_flight: AtomicBool::new(false),
            savepoints: Vec::new(),
            aborted: false,
            level,
            read_only,
            names,
        })
    }

    /// The isolation level.
    pub fn isolation_level(&self) -> IsolationLevel {
        self.level
    }

    /// Whether the transaction was started read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a statement failed on the server, so that only a rollback (to a savepoint or of
    /// the whole transaction) can continue.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// The connection, for one statement: marks it in flight until [`Self::finish`].
    fn conn(&self) -> StateResult<&Conn> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| StateError::NotInitialized("transaction already finished".into()))?;
        self.in_flight.store(true, Ordering::Relaxed);
        Ok(conn)
    }

    fn conn_mut(&mut self) -> StateResult<&mut Conn> {
        self.in_flight.store(true, Ordering::Relaxed);
        self.conn
            .as_mut()
            .ok_or_else(|| StateError::NotInitialized("transaction already finished".into()))
    }

    /// Records an operation; an error that reached the server marks the transaction aborted.
    fn finish<T>(
        &mut self,
        op: Op,
        rows: u64,
        start: Instant,
        r: StateResult<T>,
    ) -> StateResult<T> {
        self.in_flight.store(false, Ordering::Relaxed);
        self.stats.record(op, rows, start.elapsed(), r.is_ok());
        if let Err(e) = &r {
            self.note_error(e);
        }
        r
    }

    fn note_error(&mut self, e: &StateError) {
        // Client-side outcomes (a failed version check, refused input) leave the server's
        // transaction usable; anything else may not have.
        if !matches!(
            e,
            StateError::ConcurrentModification { .. } | StateError::InvalidInput(_)
        ) {
            self.aborted = true;
        }
        match e.sqlstate() {
            Some(sqlstate::SERIALIZATION_FAILURE) => self.stats.tx(TxEvent::SerializationFailure),
            Some(sqlstate::DEADLOCK_DETECTED) => self.stats.tx(TxEvent::Deadlock),
            _ => {}
        }
    }

    /// Commits. A serialization failure at commit time is reported as
    /// [`StateError::TransactionFailed`] (nothing was committed); a connection lost after
    /// COMMIT was sent is [`StateError::CommitOutcomeUnknown`].
    pub async fn commit(mut self) -> StateResult<()> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| StateError::NotInitialized("transaction already finished".into()))?;
        let cancelled = self.in_flight.load(Ordering::Relaxed);
        if self.aborted || cancelled {
            let rolled_back = conn.client.batch_execute("ROLLBACK").await;
            if rolled_back.is_ok() {
                conn.dirty = false;
            }
            self.stats.tx(TxEvent::RolledBack);
            let message = if cancelled {
                "an operation was cancelled before it finished, so its effect is unknown: \
                 the transaction was rolled back instead of committed"
            } else {
                "an earlier statement failed, so the transaction was rolled back instead of committed"
            };
            return Err(StateError::TransactionFailed {
                message: message.into(),
                sqlstate: Some("25P02".into()),
            });
        }
        if conn.client.is_closed() {
            self.stats.tx(TxEvent::RolledBack);
            return Err(StateError::Connection {
                message: "connection lost before COMMIT was sent; nothing was committed".into(),
                sqlstate: None,
            });
        }
        match conn.client.batch_execute("COMMIT").await {
            Ok(()) => {
                self.stats.tx(TxEvent::Committed);
                if !self.read_only {
                    self.router.after_write(&conn).await;
                }
                conn.dirty = false;
                Ok(())
            }
            Err(e) if e.as_db_error().is_some() => {
                // The server answered: the transaction is over (rolled back).
                conn.dirty = false;
                let err = StateError::from(e);
                self.note_error(&err);
                self.stats.tx(TxEvent::RolledBack);
                Err(err)
            }
            Err(e) => Err(StateError::CommitOutcomeUnknown(format!(
                "the connection failed after COMMIT was sent: {}",
                StateError::from(e)
            ))),
        }
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> StateResult<()> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| StateError::NotInitialized("transaction already finished".into()))?;
        self.stats.tx(TxEvent::RolledBack);
        if conn.client.is_closed() {
            // The server ended the transaction with the connection.
            return Ok(());
        }
        conn.client.batch_execute("ROLLBACK").await?;
        conn.dirty = false;
        Ok(())
    }

    /// Sets a savepoint. `name` must be a plain identifier (ASCII letters, digits, `_`, at most
    /// 63 bytes); anything else is refused with [`StateError::InvalidInput`] and the
    /// transaction stays usable.
    pub async fn savepoint(&mut self, name: &str) -> StateResult<()> {
        let id = Ident::new("savepoint name", name)?;
        self.savepoint_command(format!("SAVEPOINT {id}")).await?;
        self.savepoints.push(name.to_string());
        Ok(())
    }

    /// Undoes everything after savepoint `name` (which stays set), and clears an aborted state.
    /// An unknown name is refused without touching the transaction.
    pub async fn rollback_to_savepoint(&mut self, name: &str) -> StateResult<()> {
        let (id, idx) = self.known_savepoint(name)?;
        self.savepoint_command(format!("ROLLBACK TO SAVEPOINT {id}"))
            .await?;
        self.savepoints.truncate(idx + 1);
        self.aborted = false;
        Ok(())
    }

    /// Forgets savepoint `name` (and later ones), keeping their work.
    pub async fn release_savepoint(&mut self, name: &str) -> StateResult<()> {
        let (id, idx) = self.known_savepoint(name)?;
        self.savepoint_command(format!("RELEASE SAVEPOINT {id}"))
            .await?;
        self.savepoints.truncate(idx);
        Ok(())
    }

    fn known_savepoint(&self, name: &str) -> StateResult<(Ident, usize)> {
        let id = Ident::new("savepoint name", name)?;
        let idx = self
            .savepoints
            .iter()
            .rposition(|s| s == name)
            .ok_or_else(|| {
                StateError::invalid(format!("no savepoint named {name:?} in this transaction"))
            })?;
        Ok((id, idx))
    }

    /// Runs a savepoint command built from a validated, quoted identifier.
    async fn savepoint_command(&mut self, sql: String) -> StateResult<()> {
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .batch_execute(&sql)
            .await
            .map_err(StateError::from);
        self.finish(Op::Query, 1, start, r)
    }

    /// The value under `key`, as this transaction sees it.
    pub async fn get(&mut self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        check_key(key)?;
        let start = Instant::now();
        let r = self.conn()?.get_value(key).await;
        self.finish(Op::Get, 1, start, r)
    }

    /// The whole entry under `key`.
    pub async fn get_entry(&mut self, key: &[u8]) -> StateResult<Option<StateEntry>> {
        check_key(key)?;
        let start = Instant::now();
        let r = self.conn()?.get_entry(key).await;
        self.finish(Op::Get, 1, start, r)
    }

    /// The value and version under `key`.
    pub async fn get_with_version(&mut self, key: &[u8]) -> StateResult<Option<(Vec<u8>, i64)>> {
        Ok(self.get_entry(key).await?.map(|e| (e.value, e.version)))
    }

    /// Whether a live entry exists under `key`.
    pub async fn contains(&mut self, key: &[u8]) -> StateResult<bool> {
        check_key(key)?;
        let start = Instant::now();
        let r = self.conn()?.contains(key).await;
        self.finish(Op::Get, 1, start, r)
    }

    /// The number of live entries.
    pub async fn count(&mut self) -> StateResult<usize> {
        let start = Instant::now();
        let r = self.conn()?.count().await;
        self.finish(Op::Count, 1, start, r)
    }

    /// The live keys starting with `prefix`, in byte order.
    pub async fn list_keys(&mut self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        let start = Instant::now();
        let r = self.conn()?.list_keys(prefix).await;
        self.finish(Op::Scan, 1, start, r)
    }

    /// Stores `value` under `key`, replacing the entry.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> StateResult<()> {
        self.put_entry(key, value, empty_object(), None)
            .await
            .map(|_| ())
    }

    /// Stores `value` with a metadata object.
    pub async fn put_with_metadata(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
    ) -> StateResult<()> {
        self.put_entry(key, value, metadata, None).await.map(|_| ())
    }

    /// Stores `value` for `ttl` (server clock).
    pub async fn put_with_ttl(
        &mut self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StateResult<()> {
        self.put_entry(key, value, empty_object(), Some(ttl))
            .await
            .map(|_| ())
    }

    /// Stores a whole entry; returns its new version.
    pub async fn put_entry(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
        ttl: Option<Duration>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        check_metadata(&metadata)?;
        let micros = ttl.map(check_ttl).transpose()?;
        let start = Instant::now();
        let r = self.conn()?.upsert(key, value, &metadata, micros).await;
        self.finish(Op::Put, 1, start, r)
    }

    /// Optimistic write, as [`EnhancedPostgresBackend::put_with_version`](crate::state::EnhancedPostgresBackend::put_with_version).
    pub async fn put_with_version(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Option<i64>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        let start = Instant::now();
        let r = self.conn()?.put_with_version(key, value, expected).await;
        self.finish(Op::Put, 1, start, r)
    }

    /// Deletes the entry only if its version is `expected`
    /// ([`StateError::ConcurrentModification`] otherwise).
    pub async fn delete_with_version(&mut self, key: &[u8], expected: i64) -> StateResult<()> {
        check_key(key)?;
        let start = Instant::now();
        let r = self.conn()?.delete_with_version(key, expected).await;
        self.finish(Op::Delete, 1, start, r)
    }

    /// Replaces the value only if it is currently `expected` (`None`: only if absent); returns
    /// whether it did.
    pub async fn compare_and_set(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> StateResult<bool> {
        check_entry(key, value)?;
        let start = Instant::now();
        let r = self.conn()?.compare_and_set(key, expected, value).await;
        self.finish(Op::Put, 1, start, r).map(|v| v.is_some())
    }

    /// Removes `key` (missing keys are fine).
    pub async fn delete(&mut self, key: &[u8]) -> StateResult<()> {
        check_key(key)?;
        let start = Instant::now();
        let r = self.conn()?.delete(key).await;
        self.finish(Op::Delete, 1, start, r)
    }

    /// Writes many entries (last occurrence of a key wins), inside this transaction.
    pub async fn batch_put(&mut self, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        check_batch(entries)?;
        if entries.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let r = self.conn_mut()?.batch_put(entries, false).await;
        self.finish(Op::Batch, entries.len() as u64, start, r)
    }

    /// Live entries whose metadata matches, as [`EnhancedPostgresBackend::query_by_metadata`](crate::state::EnhancedPostgresBackend::query_by_metadata).
    pub async fn query_by_metadata(
        &mut self,
        path: &str,
        value: &serde_json::Value,
    ) -> StateResult<Vec<StateEntry>> {
        let q = MetadataQuery::new(path, value)?;
        let start = Instant::now();
        let r = self.conn()?.query_by_metadata(&q).await;
        self.finish(Op::Query, 1, start, r)
    }
}

/// Coordination inside a transaction.
impl PostgresTransaction {
    /// Refuses a stale lock holder's write: succeeds only if `fence` is still the latest
    /// acquisition of its lock (for a shared lock: no exclusive acquisition since) and its
    /// holder's session still holds the lock under that token. The lock's token
    /// row stays share-locked until this transaction ends, so no newer acquisition can
    /// complete before this transaction commits (a newer holder sees this transaction's writes).
    /// Otherwise [`StateError::Fenced`]: roll back, the work must not be applied.
    ///
    /// Acquire the lock before beginning the transaction: under `REPEATABLE READ` or
    /// `SERIALIZABLE` the holder's bookkeeping row is read with the transaction's snapshot.
    ///
    /// ```no_run
    /// # async fn demo(backend: processor::state::EnhancedPostgresBackend) -> processor::state::StateResult<()> {
    /// use processor::state::{PostgresLockGuard, StateBackend};
    /// use std::time::Duration;
    /// if let Some(guard) = PostgresLockGuard::new(backend.clone_handle(), "job", Duration::from_secs(5)).await? {
    ///     let mut tx = backend.begin().await?;
    ///     tx.check_fence(&guard.fence()).await?;
    ///     tx.put(b"job:result", b"done").await?;
    ///     tx.commit().await?;
    ///     guard.release().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn check_fence(&mut self, fence: &Fence) -> StateResult<()> {
        let sql = fence_sql(&self.names);
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .query_opt(
                sql.as_str(),
                &[
                    &fence.key,
                    &fence.backend_pid,
                    &fence.token,
                    &fence.acquisition,
                ],
            )
            .await
            .map_err(StateError::from);
        let row = self.finish(Op::Query, 1, start, r)?;
        let (current, held) = match row {
            Some(row) => (row.try_get::<_, i64>(0)?, row.try_get::<_, bool>(1)?),
            None => (0, false),
        };
        if current != fence.token || !held {
            return Err(StateError::Fenced {
                lock: fence.name.clone(),
                token: fence.token,
                current,
                held,
            });
        }
        Ok(())
    }

    /// Takes a transaction-scoped advisory lock on `key`, waiting for it (bounded by the
    /// server's `lock_timeout` and `statement_timeout`); released at commit or rollback.
    pub async fn advisory_xact_lock(&mut self, key: i64, mode: LockMode) -> StateResult<()> {
        let sql = match mode {
            LockMode::Exclusive => "SELECT pg_advisory_xact_lock($1)",
            LockMode::Shared => "SELECT pg_advisory_xact_lock_shared($1)",
        };
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .execute(sql, &[&key])
            .await
            .map_err(StateError::from);
        self.finish(Op::Query, 1, start, r).map(|_| ())
    }

    /// Takes a transaction-scoped advisory lock on `key` if it is free now; whether it did.
    pub async fn try_advisory_xact_lock(&mut self, key: i64, mode: LockMode) -> StateResult<bool> {
        let sql = match mode {
            LockMode::Exclusive => "SELECT pg_try_advisory_xact_lock($1)",
            LockMode::Shared => "SELECT pg_try_advisory_xact_lock_shared($1)",
        };
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .query_one(sql, &[&key])
            .await
            .map_err(StateError::from);
        Ok(self.finish(Op::Query, 1, start, r)?.try_get(0)?)
    }

    /// Queues a plain notification, sent when the transaction commits (dropped on rollback).
    /// Same rules as [`EnhancedPostgresBackend::notify`](crate::state::EnhancedPostgresBackend::notify).
    pub async fn notify(&mut self, channel: &str, payload: &str) -> StateResult<()> {
        check_channel(channel)?;
        check_payload(payload)?;
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .execute(NOTIFY_SQL, &[&channel, &payload])
            .await
            .map_err(StateError::from);
        self.finish(Op::Query, 1, start, r)?;
        self.stats.lock(LockEvent::Notified);
        Ok(())
    }

    /// Appends a durable event to `channel`, committed (and announced) with this transaction;
    /// returns its sequence number. See
    /// [`EnhancedPostgresBackend::notify_durable`](crate::state::EnhancedPostgresBackend::notify_durable).
    pub async fn notify_durable(&mut self, channel: &str, payload: &str) -> StateResult<i64> {
        check_channel(channel)?;
        check_durable_payload(payload)?;
        let sql = durable_notify_sql(&self.names);
        let start = Instant::now();
        let r = self
            .conn()?
            .client
            .query_one(sql.as_str(), &[&channel, &payload])
            .await
            .map_err(StateError::from);
        let seq = self.finish(Op::Query, 1, start, r)?.try_get(0)?;
        self.stats.lock(LockEvent::Notified);
        Ok(seq)
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let stats = self.stats.clone();
        // Roll back on the connection's runtime, whichever thread drops us; the connection
        // returns to the pool only if that worked (otherwise it is still marked busy and is
        // discarded). If that runtime has shut down, the task (and with it the connection) is
        // dropped there: the server ends the transaction with the closed connection.
        // (`Handle::spawn` needs no `enter()`, which could panic during thread teardown.)
        self.runtime.spawn(async move {
            if !conn.client.is_closed() && conn.client.batch_execute("ROLLBACK").await.is_ok() {
                conn.dirty = false;
            }
            stats.tx(TxEvent::RolledBack);
            drop(conn);
        });
    }
}

impl std::fmt::Debug for PostgresTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTransaction")
            .field("isolation_level", &self.level)
            .field("read_only", &self.read_only)
            .field("savepoints", &self.savepoints)
            .field("aborted", &self.aborted)
            .field("finished", &self.conn.is_none())
            .finish()
    }
}

/// Whether the retry loop may run a failed transaction again: serialization failure,
/// deadlock, or a connection lost before COMMIT was sent.
pub(crate) fn worth_retrying(e: &StateError) -> bool {
    match e {
        StateError::CommitOutcomeUnknown(_) => false,
        _ if matches!(
            e.sqlstate(),
            Some(sqlstate::SERIALIZATION_FAILURE | sqlstate::DEADLOCK_DETECTED)
        ) =>
        {
            true
        }
        _ => e.kind() == ErrorKind::Connection,
    }
}

/// Exponential backoff with jitter: uniform in [d/2, d] for d = base * 2^attempt, at most 5 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    const CAP: Duration = Duration::from_secs(5);
    let d = base.saturating_mul(1u32 << attempt.min(16)).min(CAP);
    let half = d / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(if nanos == 0 { 0 } else { random() % nanos })
}

/// A small xorshift generator; jitter needs spread, not cryptographic quality.
pub(crate) fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(10);
        for attempt in 0..30 {
            let d = backoff(base, attempt);
            let full = base
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(5));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn retry_classification() {
        let ser = StateError::TransactionFailed {
            message: "x".into(),
            sqlstate: Some("40001".into()),
        };
        assert!(worth_retrying(&ser));
        let conn = StateError::Connection {
            message: "x".into(),
            sqlstate: None,
        };
        assert!(worth_retrying(&conn));
        assert!(!worth_retrying(&StateError::CommitOutcomeUnknown(
            "x".into()
        )));
        assert!(!worth_retrying(&StateError::ConcurrentModification {
            key: vec![1]
        }));
        assert!(!worth_retrying(&StateError::InvalidInput("x".into())));
    }
}
