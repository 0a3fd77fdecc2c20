//! The seed project's lease locks: [`DistributedLock`], the [`LockGuard`] it hands out and
//! the [`LockToken`] naming a holder. A lease runs out after its TTL whether or not its holder
//! is alive; [`PostgresDistributedLock`](crate::state::PostgresDistributedLock) implements it
//! on the database's clock, with fencing tokens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::state::error::StateResult;

/// Names one holder of a lease: a random UUID (hyphenated, lowercase) unless made from a
/// string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LockToken(String);

impl LockToken {
    /// A new random token.
    pub fn new() -> Self {
        LockToken(Uuid::new_v4().to_string())
    }

    /// The token's text.
    pub fn value(&self) -> &str {
        &self.0
    }

    /// A token with the text `s`.
    pub fn from_string(s: String) -> Self {
        LockToken(s)
    }
}

impl Default for LockToken {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for LockToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lease held: released when dropped (in the background, on the Tokio runtime it was
/// dropped on; outside one the lease simply runs out), or by
/// [`release`](Self::release) / [`DistributedLock::release`], which report the outcome.
#[derive(Debug)]
pub struct LockGuard {
    resource: String,
    token: LockToken,
    acquired_at: DateTime<Utc>,
    ttl: Duration,
    backend: Arc<dyn DistributedLock>,
    /// When the lease began by this machine's monotonic clock, no later than it began on the
    /// lock's clock (for the lock's guards: right before the statement that granted or
    /// extended it was sent), so the guard never counts more time left than the lock does.
    began: Instant,
    /// The lease's fencing token, when the lock has them.
    fence: Option<i64>,
    /// Whether dropping it still releases the lease.
    armed: bool,
}

impl LockGuard {
    /// A guard for `token`'s lease on `resource`, granted at `acquired_at` for `ttl`, which
    /// `backend` releases.
    pub fn new(
        resource: String,
        token: LockToken,
        acquired_at: DateTime<Utc>,
        ttl: Duration,
        backend: Arc<dyn DistributedLock>,
    ) -> Self {
        // `acquired_at` is on the wall clock: how long ago that was, by this machine's.
        let ago = (Utc::now() - acquired_at).to_std().unwrap_or_default();
        LockGuard {
            resource,
            token,
            acquired_at,
            ttl,
            backend,
            began: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
            fence: None,
            armed: true,
        }
    }

    /// This guard with the lease's fencing token, its lease begun no later than `sent`.
    pub(crate) fn granted(mut self, fence: i64, sent: Instant) -> Self {
        self.fence = Some(fence);
        self.began = sent;
        self
    }

    /// The lease now runs for `ttl` from `at` on the lock's clock, and from no later than
    /// `sent` on this machine's (after an extension).
    pub(crate) fn extended(&mut self, at: DateTime<Utc>, sent: Instant, ttl: Duration) {
        self.acquired_at = at;
        self.began = sent;
        self.ttl = ttl;
    }

    /// The resource the lease is on.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The holder's token.
    pub fn token(&self) -> &LockToken {
        &self.token
    }

    /// When the lease was granted, or last extended (the server's clock for
    /// [`PostgresDistributedLock`](crate::state::PostgresDistributedLock)).
    pub fn acquired_at(&self) -> DateTime<Utc> {
        self.acquired_at
    }

    /// How long the lease runs from [`acquired_at`](Self::acquired_at).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease's fencing token: it grows with every new holder of the resource, so a
    /// store that remembers the highest one it saw can refuse a write from an older holder.
    /// `None` for a lock without fencing tokens.
    pub fn fencing_token(&self) -> Option<i64> {
        self.fence
    }

    /// Whether the lease may have run out. Counted on this machine's monotonic clock from
    /// before the lock granted (or last extended) it, so it never says a lease is still held
    /// that the lock's clock has ended, whatever the two wall clocks say (it may say so a
    /// little early).
    pub fn is_expired(&self) -> bool {
        self.time_remaining().is_zero()
    }

    /// How long the lease has left at most (zero once it may have run out; see
    /// [`is_expired`](Self::is_expired)).
    pub fn time_remaining(&self) -> Duration {
        self.ttl.saturating_sub(self.began.elapsed())
    }

    /// Releases the lease now, reporting the outcome (a lease that ran out and was taken over
    /// is not released: the error says so). If this future is dropped before it finishes,
    /// the guard's drop releases the lease in the background instead.
    pub async fn release(mut self) -> StateResult<()> {
        let result = self
            .backend
            .release_internal(&self.resource, &self.token)
            .await;
        self.armed = false;
        result
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // No runtime (a guard dropped during shutdown): the lease runs out by itself.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (backend, resource, token) = (
            self.backend.clone(),
            std::mem::take(&mut self.resource),
            self.token.clone(),
        );
        runtime.spawn(async move {
            if let Err(e) = backend.release_internal(&resource, &token).await {
                tracing::debug!(resource, error = %e, "releasing a dropped lease failed; it runs out by itself");
            }
        });
    }
}

/// Lease locks: at most one holder per resource at a time, each lease running out after its
/// TTL. Object-safe: use it as `Arc<dyn DistributedLock>`.
#[async_trait]
pub trait DistributedLock: Send + Sync + std::fmt::Debug {
    /// Waits until the lease on `resource` is granted, for `ttl`.
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard>;

    /// The lease on `resource` for `ttl` if no one holds it now; `Ok(None)` if someone does.
    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>>;

    /// Releases `guard`'s lease, reporting the outcome.
    async fn release(&self, mut guard: LockGuard) -> StateResult<()> {
        let result = self.release_internal(guard.resource(), guard.token()).await;
        // Dropped before here, the guard releases the lease in the background instead.
        guard.armed = false;
        result
    }

    /// Releases `token`'s lease on `resource` (what guards call when dropped).
    async fn release_internal(&self, resource: &str, token: &LockToken) -> StateResult<()>;

    /// Whether someone holds a lease on `resource` that has not run out.
    async fn is_locked(&self, resource: &str) -> StateResult<bool>;

    /// Makes `guard`'s lease run for `ttl` from now; refused once it has run out.
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()>;

    /// The token holding a lease on `resource` that has not run out, if any.
    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>>;
}
