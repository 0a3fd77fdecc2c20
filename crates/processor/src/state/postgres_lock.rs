//! [`PostgresDistributedLock`]: the seed project's lease lock, on the coordination layer's
//! leases (`coordination/lease.rs`): the database's clock decides when a lease runs out, and
//! every new holder gets the next fencing token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::state::assembly::{assemble, Core};
use crate::state::config::enhanced::EnhancedPostgresConfig;
use crate::state::config::settings::PostgresPoolConfig;
use crate::state::coordination::Granted;
use crate::state::distributed_lock::{DistributedLock, LockGuard, LockToken};
use crate::state::error::{ErrorKind, StateResult};
use crate::state::retry::backoff;

/// The longest pause between two attempts of a waiting [`acquire`](DistributedLock::acquire).
const MAX_POLL: Duration = Duration::from_millis(200);

/// Lease locks in PostgreSQL, shared by every process on the database: a lease is a row of
/// the schema's `state_leases` table, granted to one token until it runs out on the server's
/// clock (or is released), after which any other holder may take it. A token whose lease ran
/// out and was taken over can neither release nor extend the new holder's lease
/// ([`StateError::LockNotHeld`](crate::state::StateError::LockNotHeld)). Each guard carries a
/// [`fencing_token`](LockGuard::fencing_token) that grows with every new holder.
///
/// A waiting [`acquire`](DistributedLock::acquire) tries again when the current lease runs
/// out, and at least every 200 ms (a release is seen within that). Dropping its future while
/// a request is under way gives back the lease that request may still be granted: in the
/// background, as soon as it shows up, within the operation timeout (else it runs out).
///
/// ```no_run
/// # async fn demo() -> processor::state::StateResult<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use processor::state::{DistributedLock, PostgresDistributedLock};
///
/// let lock = Arc::new(PostgresDistributedLock::new("postgresql://localhost/db").await?);
/// let mut guard = lock.acquire("global:checkpoint", Duration::from_secs(60)).await?;
/// lock.extend(&mut guard, Duration::from_secs(60)).await?;
/// lock.release(guard).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresDistributedLock {
    core: Arc<Core>,
}

impl std::fmt::Debug for PostgresDistributedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDistributedLock")
            .field("leases", &self.core.store.ctx.names.leases)
            .finish()
    }
}

impl PostgresDistributedLock {
    /// Connects to `database_url` with a pool of up to 10 connections. The leases live in
    /// the schema `public` (its migrations are applied: the state table and the coordination
    /// tables; use [`with_config`](Self::with_config) for another schema).
    pub async fn new(database_url: &str) -> StateResult<Self> {
        Self::with_pool_size(database_url, 10).await
    }

    /// Connects with a pool of at most `max_connections`.
    pub async fn with_pool_size(database_url: &str, max_connections: u32) -> StateResult<Self> {
        let config = EnhancedPostgresConfig::new(database_url)
            .with_expired_cleanup(false)
            .with_pool_config(PostgresPoolConfig {
                min_connections: 1,
                max_connections,
                ..PostgresPoolConfig::default()
            });
        Self::with_config(config).await
    }

    /// Leases in the schema of `config` (and its pool, TLS and timeout settings).
    pub async fn with_config(config: EnhancedPostgresConfig) -> StateResult<Self> {
        Ok(PostgresDistributedLock {
            core: assemble(config).await?,
        })
    }

    fn guard(
        &self,
        resource: &str,
        token: LockToken,
        ttl: Duration,
        granted: Granted,
        sent: Instant,
    ) -> LockGuard {
        let backend: Arc<dyn DistributedLock> = Arc::new(self.clone());
        let at = DateTime::<Utc>::from(granted.at);
        LockGuard::new(resource.to_string(), token, at, ttl, backend).granted(granted.fence, sent)
    }
}

/// A lease asked for and not yet handed to its caller: if the call is dropped in between, the
/// lease (if the server granted it) is given back in the background.
struct Pending<'a> {
    lock: &'a PostgresDistributedLock,
    resource: &'a str,
    token: LockToken,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (core, resource, token) = (
            self.lock.core.clone(),
            self.resource.to_string(),
            self.token.clone(),
        );
        // The abandoned statement may still run after this: give the lease back as soon as
        // it shows up, trying until the operation timeout has passed (by then the statement
        // has run or been cancelled; past it the lease simply runs out).
        runtime.spawn(async move {
            let until = Instant::now() + core.store.ctx.limit;
            let mut attempt = 0;
            loop {
                match core
                    .coordinator
                    .release_lease(&resource, token.value())
                    .await
                {
                    Err(e) if e.kind() == ErrorKind::Coordination && Instant::now() < until => {
                        tokio::time::sleep(backoff(Duration::from_millis(20), attempt)).await;
                        attempt += 1;
                    }
                    _ => return,
                }
            }
        });
    }
}

impl PostgresDistributedLock {
    /// One attempt at the lease: the guard, or how long the current lease has left.
    async fn attempt(
        &self,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Result<LockGuard, Duration>> {
        let mut pending = Pending {
            lock: self,
            resource,
            token: LockToken::new(),
            armed: true,
        };
        let sent = Instant::now();
        let taken = self
            .core
            .coordinator
            .take_lease(resource, pending.token.value(), ttl)
            .await;
        // Past this point the outcome is known: granted (handed to the guard) or not.
        pending.armed = taken.is_err();
        Ok(match taken? {
            Ok(granted) => {
                let token = pending.token.clone();
                Ok(self.guard(resource, token, ttl, granted, sent))
            }
            Err(left) => Err(left),
        })
    }
}

#[async_trait]
impl DistributedLock for PostgresDistributedLock {
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        loop {
            match self.attempt(resource, ttl).await? {
                Ok(guard) => return Ok(guard),
                Err(left) => {
                    tokio::time::sleep(left.clamp(Duration::from_millis(10), MAX_POLL)).await;
                }
            }
        }
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        Ok(self.attempt(resource, ttl).await?.ok())
    }

    async fn release_internal(&self, resource: &str, token: &LockToken) -> StateResult<()> {
        self.core
            .coordinator
            .release_lease(resource, token.value())
            .await
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        Ok(self
            .core
            .coordinator
            .lease_holder(resource)
            .await?
            .is_some())
    }

    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        let sent = Instant::now();
        let at = self
            .core
            .coordinator
            .extend_lease(guard.resource(), guard.token().value(), ttl)
            .await?;
        guard.extended(DateTime::<Utc>::from(at), sent, ttl);
        Ok(())
    }

    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        Ok(self
            .core
            .coordinator
            .lease_holder(resource)
            .await?
            .map(LockToken::from_string))
    }
}
