//! Coordination inside a transaction: fenced writes, transaction-scoped advisory locks and
//! notifications that are sent when the transaction commits.

use tokio_postgres::types::{ToSql, Type};

use crate::state::coordination::{
    check_durable_payload, check_payload, durable_notify_sql, fence_sql, Fence, LockMode,
    NOTIFY_SQL,
};
use crate::state::error::{StateError, StateResult};
use crate::state::ident::check_channel;
use crate::state::stats::counters::LockEvent;
use crate::state::stats::operation::Op;
use crate::state::transaction::tx::PostgresTransaction;

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
        let sql = fence_sql(&self.ctx.names);
        let row = self
            .stmt(Op::CheckFence, 1, async |c| {
                let params: [(&(dyn ToSql + Sync), Type); 4] = [
                    (&fence.key, Type::INT8),
                    (&fence.backend_pid, Type::INT4),
                    (&fence.token, Type::INT8),
                    (&fence.acquisition, Type::TEXT),
                ];
                Ok(c.query_opt_cached(sql.as_str(), &params).await?)
            })
            .await?;
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
        self.stmt(Op::TransactionLock, 1, async |c| {
            Ok(c.execute_cached(sql, &[(&key, Type::INT8)]).await?)
        })
        .await
        .map(|_| ())
    }

    /// Takes a transaction-scoped advisory lock on `key` if it is free now; whether it did.
    pub async fn try_advisory_xact_lock(&mut self, key: i64, mode: LockMode) -> StateResult<bool> {
        let sql = match mode {
            LockMode::Exclusive => "SELECT pg_try_advisory_xact_lock($1)",
            LockMode::Shared => "SELECT pg_try_advisory_xact_lock_shared($1)",
        };
        let row = self
            .stmt(Op::TransactionLock, 1, async |c| {
                Ok(c.query_one_cached(sql, &[(&key, Type::INT8)]).await?)
            })
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Queues a plain notification, sent when the transaction commits (dropped on rollback).
    /// Same rules as [`EnhancedPostgresBackend::notify`](crate::state::EnhancedPostgresBackend::notify).
    pub async fn notify(&mut self, channel: &str, payload: &str) -> StateResult<()> {
        check_channel(channel)?;
        check_payload(payload)?;
        self.stmt(Op::Notify, 1, async |c| {
            Ok(c.execute_cached(
                NOTIFY_SQL,
                &[(&channel, Type::TEXT), (&payload, Type::TEXT)],
            )
            .await?)
        })
        .await?;
        self.ctx.stats.lock(LockEvent::Notified);
        Ok(())
    }

    /// Appends a durable event to `channel`, committed (and announced) with this transaction;
    /// returns its sequence number. See
    /// [`EnhancedPostgresBackend::notify_durable`](crate::state::EnhancedPostgresBackend::notify_durable).
    pub async fn notify_durable(&mut self, channel: &str, payload: &str) -> StateResult<i64> {
        check_channel(channel)?;
        check_durable_payload(payload)?;
        let sql = durable_notify_sql(&self.ctx.names);
        let row = self
            .stmt(Op::Notify, 1, async |c| {
                Ok(
                    c.query_one_cached(&sql, &[(&channel, Type::TEXT), (&payload, Type::TEXT)])
                        .await?,
                )
            })
            .await?;
        let seq = row.try_get(0)?;
        self.ctx.stats.lock(LockEvent::Notified);
        Ok(seq)
    }
}
