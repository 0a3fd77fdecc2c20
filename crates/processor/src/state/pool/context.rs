//! The operation context: what the store, the coordinator and transactions share (the
//! primary's pool, the table's names, the statistics) and the one home of the operation
//! timeout, which bounds every call from checkout to result.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::state::error::{StateError, StateResult};
use crate::state::pool::conn_pool::ConnPool;
use crate::state::schema::names::TableNames;
use crate::state::stats::counters::Stats;
use crate::state::wire::connection::PgConn;

/// Shared by every part of one backend (one per backend, behind an `Arc`).
pub(crate) struct Context {
    /// The primary's pool.
    pub primary: Arc<ConnPool>,
    /// The state table's names and everything derived from them.
    pub names: TableNames,
    /// The backend's statistics.
    pub stats: Arc<Stats>,
    /// The operation timeout ([`EnhancedPostgresConfig::operation_timeout`](crate::state::EnhancedPostgresConfig::operation_timeout)).
    pub limit: Duration,
}

impl Context {
    /// Runs `fut` for at most the operation timeout (see [`bounded`]).
    pub fn bounded<T, F>(&self, fut: F) -> impl Future<Output = StateResult<T>>
    where
        F: Future<Output = StateResult<T>>,
    {
        bounded(self.limit, fut)
    }

    /// What is left of the operation timeout of a call that began at `start`.
    pub fn left(&self, start: Instant) -> Duration {
        self.limit.saturating_sub(start.elapsed())
    }

    /// Runs `f` on a checked-out primary connection, bounded by the operation timeout.
    pub async fn on_primary<T, F>(&self, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&mut PgConn) -> StateResult<T>,
    {
        self.on_primary_within(self.limit, f).await
    }

    /// Runs `f` on a checked-out primary connection, the whole (checkout included) bounded by
    /// `limit` instead of the operation timeout.
    pub async fn on_primary_within<T, F>(&self, limit: Duration, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&mut PgConn) -> StateResult<T>,
    {
        bounded(limit, async {
            let mut conn = self.primary.get().await?;
            conn.run(|c| f(c)).await
        })
        .await
    }
}

/// Runs `fut` for at most `limit`. Past it, the future is dropped (a statement it had sent is
/// settled before its connection is reused, see
/// [`Checkout`](crate::state::pool::checkout::Checkout)) and the call fails with
/// [`StateError::Timeout`] (which a write turns into an unknown outcome if its statement was
/// sent). The one place an operation's time limit becomes an error.
///
/// A plain function returning the timeout's future, not an `async fn`: an `async fn` would
/// keep room for `fut` as its argument beside the timeout holding it, doubling the size of
/// every future built on it (and each move of one copies all of it).
pub(crate) fn bounded<T, F>(limit: Duration, fut: F) -> impl Future<Output = StateResult<T>>
where
    F: Future<Output = StateResult<T>>,
{
    tokio::time::timeout(limit, fut)
        .map(move |r| r.unwrap_or_else(|_| Err(StateError::op_timeout(limit))))
}
