//! The coordination half of the facade: advisory locks, leader election, LISTEN/NOTIFY.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::EnhancedPostgresBackend;
use crate::state::coordination::{
    check_durable_payload, check_lock_name, check_payload, durable_notify_sql, locked,
    AdvisoryLockInfo, CoordinationHandle, LeaderInfo, Leadership, LockMode, NOTIFY_SQL,
};
use crate::state::error::{StateError, StateResult};
use crate::state::ident::check_channel;
use crate::state::stats::counters::LockEvent;

/// Coordination: advisory locks, leader election, LISTEN/NOTIFY. See
/// [`PostgresLockGuard`](crate::state::PostgresLockGuard) for how locks are held.
impl EnhancedPostgresBackend {
    /// Takes the exclusive session advisory lock `key` if it is free now; whether it did.
    ///
    /// The lock is held on one of the backend's lock sessions until
    /// [`release_advisory_lock`](Self::release_advisory_lock) (or until this backend is
    /// dropped). A key this backend already holds is not granted again: ten calls without a
    /// release return `true` once.
    pub async fn acquire_advisory_lock(&self, key: i64) -> StateResult<bool> {
        self.coordinator()
            .acquire_key(key, LockMode::Exclusive, Duration::ZERO)
            .await
    }

    /// Takes the session advisory lock `key` in `mode`, waiting up to `timeout` (zero: do not
    /// wait); whether it did. Release with [`release_advisory_lock_with`](Self::release_advisory_lock_with).
    pub async fn acquire_advisory_lock_with(
        &self,
        key: i64,
        mode: LockMode,
        timeout: Duration,
    ) -> StateResult<bool> {
        self.coordinator().acquire_key(key, mode, timeout).await
    }

    /// Releases the exclusive lock `key` taken by
    /// [`acquire_advisory_lock`](Self::acquire_advisory_lock) through this backend (any of its
    /// handles).
    ///
    /// Errors, never silent: [`StateError::LockNotHeld`](crate::state::StateError::LockNotHeld)
    /// if this backend does not hold it (nothing is released, whoever else holds it);
    /// [`StateError::LockLost`](crate::state::StateError::LockLost) if it was held but its
    /// connection ended earlier, so the server had already released it.
    pub async fn release_advisory_lock(&self, key: i64) -> StateResult<()> {
        self.coordinator()
            .release_key(key, LockMode::Exclusive)
            .await
    }

    /// Releases one acquisition of `key` in `mode`; see
    /// [`release_advisory_lock`](Self::release_advisory_lock).
    pub async fn release_advisory_lock_with(&self, key: i64, mode: LockMode) -> StateResult<()> {
        self.coordinator().release_key(key, mode).await
    }

    /// Whether this backend holds `key` in `mode` (taken with the key methods) on a live
    /// connection.
    pub fn holds_advisory_lock(&self, key: i64, mode: LockMode) -> bool {
        self.coordinator().holds_key(key, mode)
    }

    /// Every session advisory lock granted in the database now (from `pg_locks`), with the
    /// holder recorded in `state_advisory_locks` where pgstate took it and the number of
    /// sessions waiting. Records of holders found dead are deleted first.
    pub async fn list_advisory_locks(&self) -> StateResult<Vec<AdvisoryLockInfo>> {
        self.coordinator().list().await
    }

    /// The seed's leader election: whether this backend leads `name` now. Takes leadership
    /// if nobody holds a live lease (waiting for no one), keeps it renewed in the background
    /// (every `ttl / 3`) until [`resign_leader`](Self::resign_leader) or the backend is
    /// dropped, and returns `true` again while it lasts. After a leader crashes, its lease
    /// runs out within `ttl` and the next call anywhere can win.
    pub async fn try_become_leader(&self, name: &str, ttl: Duration) -> StateResult<bool> {
        check_lock_name(name)?;
        {
            let mut leaders = locked(&self.coordinator().leaders);
            match leaders.get(name) {
                Some(l) if l.is_leader() => return Ok(true),
                Some(_) => {
                    leaders.remove(name);
                }
                None => {}
            }
        }
        match self.try_campaign(name, ttl).await? {
            Some(leadership) => {
                locked(&self.coordinator().leaders).insert(name.to_string(), leadership);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether this backend leads `name` through [`try_become_leader`](Self::try_become_leader).
    pub fn is_leader(&self, name: &str) -> bool {
        locked(&self.coordinator().leaders)
            .get(name)
            .is_some_and(Leadership::is_leader)
    }

    /// Gives up leadership of `name` taken with [`try_become_leader`](Self::try_become_leader);
    /// whether this backend held it.
    pub async fn resign_leader(&self, name: &str) -> StateResult<bool> {
        let leadership = locked(&self.coordinator().leaders).remove(name);
        match leadership {
            Some(l) => l.resign().await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Campaigns for leadership of `name` and waits until this backend leads. The returned
    /// [`Leadership`] has a term greater than every earlier one, renews its lease in the
    /// background, and tells when it is lost. Cancel by dropping the future.
    pub async fn campaign(&self, name: &str, ttl: Duration) -> StateResult<Leadership> {
        match self.inner.coordinator.campaign(name, ttl, true).await? {
            Some(l) => Ok(l),
            None => Err(StateError::Timeout(format!(
                "campaign for leadership of {name:?} ended without a lease"
            ))),
        }
    }

    /// Takes leadership of `name` if nobody holds a live lease now; `None` otherwise.
    pub async fn try_campaign(&self, name: &str, ttl: Duration) -> StateResult<Option<Leadership>> {
        self.inner.coordinator.campaign(name, ttl, false).await
    }

    /// The current leader of `name` and its term, if a live lease exists (by the database
    /// clock).
    pub async fn current_leader(&self, name: &str) -> StateResult<Option<LeaderInfo>> {
        self.coordinator().current_leader(name).await
    }

    /// Sends a notification through `pg_notify` on the primary. `channel`: any string of 1 to
    /// 63 bytes without NUL (taken literally); `payload`: under 8000 bytes (PostgreSQL's
    /// limit), no NUL. Listeners connected now receive it; see
    /// [`notify_durable`](Self::notify_durable) for delivery that survives disconnects.
    pub async fn notify(&self, channel: &str, payload: &str) -> StateResult<()> {
        check_channel(channel)?;
        check_payload(payload)?;
        self.store()
            .on_primary(async |c| {
                let text = tokio_postgres::types::Type::TEXT;
                c.query_cached(NOTIFY_SQL, &[(&channel, text.clone()), (&payload, text)])
                    .await?;
                Ok(())
            })
            .await?;
        self.store().ctx.stats.lock(LockEvent::Notified);
        Ok(())
    }

    /// Appends an event to `channel` in `state_events` and wakes listeners, in one
    /// transaction; returns its sequence number on the channel (1, 2, 3, ... without gaps).
    /// A durable [`PostgresListener`](crate::state::PostgresListener) delivers every event
    /// exactly once and in order, across reconnects. Payload: up to 32 MiB, no NUL.
    pub async fn notify_durable(&self, channel: &str, payload: &str) -> StateResult<i64> {
        check_channel(channel)?;
        check_durable_payload(payload)?;
        let sql = durable_notify_sql(&self.store().ctx.names);
        let row = self
            .store()
            .on_primary(async |c| {
                Ok(
                    c.query_one_cached(&sql, &[(&channel, Type::TEXT), (&payload, Type::TEXT)])
                        .await?,
                )
            })
            .await?;
        self.store().ctx.stats.lock(LockEvent::Notified);
        Ok(row.try_get(0)?)
    }

    /// Deletes durable events created more than `older_than` ago (server clock); returns how
    /// many. Sequence numbers continue where they were; a durable listener that had not read a
    /// pruned event reports the gap.
    pub async fn prune_events(&self, older_than: Duration) -> StateResult<u64> {
        let sql = format!(
            "DELETE FROM {} WHERE created_at < now() - $1::float8 * interval '1 second'",
            self.store().ctx.names.events
        );
        let secs = older_than.as_secs_f64();
        self.store()
            .on_primary(async |c| {
                Ok(c.execute_cached(sql.as_str(), &[(&secs, Type::FLOAT8)])
                    .await?)
            })
            .await
    }
}

impl From<EnhancedPostgresBackend> for CoordinationHandle {
    fn from(backend: EnhancedPostgresBackend) -> Self {
        CoordinationHandle(backend.inner.coordinator.clone())
    }
}

impl From<&EnhancedPostgresBackend> for CoordinationHandle {
    fn from(backend: &EnhancedPostgresBackend) -> Self {
        CoordinationHandle(backend.inner.coordinator.clone())
    }
}
