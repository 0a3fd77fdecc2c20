//! Leader election: a lease in `state_leaders` with a growing term, held by the session that
//! holds the name's advisory lock and renewed in the background.
//!
//! # Protocol
//! 1. A candidate takes the name's advisory lock (its key derived from the schema and the name)
//!    on a dedicated connection. Only one candidate holds it at a time, and the previous leader's
//!    session has ended or resigned by then. The lock is waited for in slices; between them, a
//!    holder that cannot be a working leader (the recorded leader with an expired lease: frozen
//!    or cut off; or a holder that took the lock over `ttl` ago and never claimed) is
//!    terminated, so a stuck leader is replaced soon after its lease runs out rather than when
//!    the server finally notices its connection is dead.
//! 2. Holding it, the candidate claims the lease row: allowed only when the row is resigned or its
//!    lease has expired **on the database clock** (`clock_timestamp()`). The claim increments the
//!    term. If the old lease is still running (a leader that crashed or lost its connection may
//!    still believe it leads until then), the candidate waits for it to expire.
//! 3. The leader renews the lease every `ttl / 3` on the same session. It believes it leads until
//!    `sent + ttl - ttl / 5`, where `sent` is when it sent the last successful claim or renewal:
//!    the server set the expiry to `ttl` after it *received* that statement, so the belief ends
//!    before the lease can expire and anyone else can claim it.
//! 4. Leadership ends (and [`Leadership::lost`] fires) when the session ends, a renewal fails, or
//!    the belief deadline passes unrenewed. Resigning ends the belief first, then clears the lease
//!    so the next candidate takes over at once.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use super::leadership::{LeaderInfo, Leadership, State};
use crate::state::coordination::{
    check_lock_name, leader_key, locked, Coordinator, HeldLock, ADVISORY_LOCKS,
};
use crate::state::error::ErrorKind;
use crate::state::error::{StateError, StateResult};
use crate::state::pool::context::Context;
use crate::state::retry::backoff;
use crate::state::stats::counters::LockEvent;
use crate::state::wire::connection::wait_closed;
use tokio_postgres::types::{ToSql, Type};

/// The shortest accepted lease.
const MIN_TTL: Duration = Duration::from_millis(300);
/// The longest accepted lease.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

fn check_ttl(ttl: Duration) -> StateResult<()> {
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(StateError::invalid(format!(
            "leader ttl {ttl:?} is outside {MIN_TTL:?}..={MAX_TTL:?}"
        )));
    }
    Ok(())
}

/// Bounds on one wait for the queue lock between checks for a stuck holder.
const MIN_SLICE: Duration = Duration::from_millis(50);
const MAX_SLICE: Duration = Duration::from_secs(5);

/// How long before the lease's server-side expiry the leader stops believing it leads.
fn margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// The statements a candidate and leader run on their dedicated session.
struct LeaseSql {
    claim: String,
    remaining: String,
    renew: String,
    clear: String,
}

impl LeaseSql {
    fn new(leaders: &str) -> Self {
        LeaseSql {
            claim: format!(
                "INSERT INTO {leaders} AS l (name, holder_id, holder_host, holder_pid, backend_pid, term,
                                             acquired_at, renewed_at, lease_expires_at)
                 VALUES ($1, $2, $3, $4, pg_backend_pid(), 1, clock_timestamp(), clock_timestamp(),
                         clock_timestamp() + $5::float8 * interval '1 second')
                 ON CONFLICT (name) DO UPDATE
                     SET holder_id = EXCLUDED.holder_id, holder_host = EXCLUDED.holder_host,
                         holder_pid = EXCLUDED.holder_pid, backend_pid = EXCLUDED.backend_pid,
                         term = l.term + 1, acquired_at = EXCLUDED.acquired_at,
                         renewed_at = EXCLUDED.renewed_at, lease_expires_at = EXCLUDED.lease_expires_at
                     WHERE l.holder_id IS NULL OR l.lease_expires_at <= clock_timestamp()
                 RETURNING term"
            ),
            remaining: format!(
                "SELECT GREATEST(extract(epoch FROM lease_expires_at - clock_timestamp()), 0)::float8
                 FROM {leaders} WHERE name = $1"
            ),
            renew: format!(
                "UPDATE {leaders}
                 SET lease_expires_at = clock_timestamp() + $4::float8 * interval '1 second',
                     renewed_at = clock_timestamp()
                 WHERE name = $1 AND term = $2 AND holder_id = $3
                   AND lease_expires_at > clock_timestamp()"
            ),
            clear: format!(
                "UPDATE {leaders} SET holder_id = NULL, lease_expires_at = clock_timestamp()
                 WHERE name = $1 AND term = $2 AND holder_id = $3"
            ),
        }
    }
}

impl Coordinator {
    /// Campaigns for `name`: waits (if `wait`) until this backend leads, or returns `None`
    /// at once when another leader is in place (`wait == false`).
    ///
    /// Waiting, a lost session of its own or a failed check between waits does not end the
    /// campaign: it starts over (with backoff), as long as the caller waits.
    pub async fn campaign(
        self: &Arc<Self>,
        name: &str,
        ttl: Duration,
        wait: bool,
    ) -> StateResult<Option<Leadership>> {
        check_lock_name(name)?;
        check_ttl(ttl)?;
        let mut attempt = 0;
        loop {
            match self.campaign_once(name, ttl, wait).await {
                Err(e)
                    if wait && matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) =>
                {
                    let pause = backoff(Duration::from_millis(50), attempt);
                    attempt += 1;
                    tracing::warn!(name, error = %e, ?pause, "campaign interrupted; starting over");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// The election's queue lock on a connection of its own, waited for (with `wait`) in
    /// slices, so that a holder that can no longer lead (frozen, cut off, lease long expired)
    /// is found and evicted between them; `None` without `wait` when it is taken.
    async fn take_queue(
        self: &Arc<Self>,
        name: &str,
        key: i64,
        ttl: Duration,
        wait: bool,
    ) -> StateResult<Option<HeldLock>> {
        let mut slice = ttl.min(MAX_SLICE);
        loop {
            let lock_wait = if wait { slice } else { Duration::ZERO };
            if let Some(held) = self.acquire_dedicated(key, Some(name), lock_wait).await? {
                return Ok(Some(held));
            }
            let remaining = match self.evict_stuck_holder(name, key, ttl).await {
                Ok(r) => r,
                Err(e) if wait => {
                    tracing::warn!(name, error = %e, "checking the leader-election queue failed");
                    None
                }
                Err(e) => return Err(e),
            };
            if !wait {
                return Ok(None);
            }
            slice = match remaining {
                // A live lease: look again right after it would run out.
                Some(r) => (r + Duration::from_millis(50)).clamp(MIN_SLICE, ttl.min(MAX_SLICE)),
                None => MIN_SLICE.max(ttl / 10).min(MAX_SLICE),
            };
        }
    }

    /// One campaign attempt on a connection of its own: takes the election's queue lock (see
    /// [`take_queue`](Self::take_queue)), then claims the lease, waiting (with `wait`) while
    /// a previous leader's lease still runs; `None` without `wait` when either is taken.
    async fn campaign_once(
        self: &Arc<Self>,
        name: &str,
        ttl: Duration,
        wait: bool,
    ) -> StateResult<Option<Leadership>> {
        let key = leader_key(self.ctx.names.schema.as_str(), name);
        let Some(held) = self.take_queue(name, key, ttl, wait).await? else {
            return Ok(None);
        };
        let sql = LeaseSql::new(&self.ctx.names.leaders);
        let secs = ttl.as_secs_f64();
        let h = &self.holder;
        loop {
            let (sent, sent_wall) = (Instant::now(), SystemTime::now());
            let row = held
                .client()
                .query_opt(
                    sql.claim.as_str(),
                    &[&name, &h.id.as_str(), &h.host.as_str(), &h.pid, &secs],
                )
                .await;
            let row = match row {
                Ok(r) => r,
                Err(e) => {
                    self.release_quietly(held).await;
                    return Err(e.into());
                }
            };
            if let Some(row) = row {
                let term: i64 = row.try_get(0)?;
                self.ctx.stats.lock(LockEvent::BecameLeader);
                tracing::info!(name, term, "became leader");
                return Ok(Some(self.lead(held, name, term, ttl, sent, sent_wall)));
            }
            // A previous leader's lease is still running: it may still believe it leads.
            if !wait {
                self.release_quietly(held).await;
                return Ok(None);
            }
            let remaining: f64 = match held
                .client()
                .query_opt(sql.remaining.as_str(), &[&name])
                .await
            {
                Ok(Some(r)) => r.try_get(0)?,
                Ok(None) => 0.0,
                Err(e) => {
                    self.release_quietly(held).await;
                    return Err(e.into());
                }
            };
            let mut closed = held.lost_signal();
            let pause = Duration::from_secs_f64(remaining.clamp(0.0, ttl.as_secs_f64()))
                + Duration::from_millis(1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = wait_closed(&mut closed) => {
                    self.release_quietly(held).await;
                    return Err(StateError::Connection {
                        message: format!("the session campaigning for leadership of {name:?} ended"),
                        sqlstate: None,
                    });
                }
            }
        }
    }

    /// Finds the session holding the queue lock of `name` when it cannot be a working leader or
    /// candidate, and terminates it: the recorded leader whose lease has expired (a frozen or
    /// cut-off process: its own belief ended before the lease did), or, when no lease is live,
    /// a recorded holder that has neither claimed within `ttl` of taking the lock nor of the
    /// last lease running out. Returns the time left
    /// on the live lease, if any. Without the privilege to terminate, it logs and waits.
    async fn evict_stuck_holder(
        &self,
        name: &str,
        key: i64,
        ttl: Duration,
    ) -> StateResult<Option<Duration>> {
        // Decided and done in one statement, so the sessions terminated are the ones that
        // matched at that moment.
        let evict = format!(
            "WITH adv AS (
                 SELECT l.pid FROM ({ADVISORY_LOCKS}) l WHERE l.granted AND l.lock_key = $1
             ), lease AS (
                 SELECT backend_pid, holder_id, lease_expires_at FROM {leaders} WHERE name = $2
             )
             SELECT a.pid, pg_terminate_backend(a.pid) FROM adv a
             WHERE EXISTS (SELECT 1 FROM lease r WHERE r.backend_pid = a.pid
                           AND r.holder_id IS NOT NULL AND r.lease_expires_at <= clock_timestamp())
                OR (NOT EXISTS (SELECT 1 FROM lease r
                                WHERE r.holder_id IS NOT NULL AND r.lease_expires_at > clock_timestamp())
                    AND EXISTS (SELECT 1 FROM {locks} b WHERE b.lock_key = $1 AND b.backend_pid = a.pid
                                AND GREATEST(b.acquired_at, COALESCE((SELECT lease_expires_at FROM lease), b.acquired_at))
                                    < clock_timestamp() - $3::float8 * interval '1 second'))",
            leaders = self.ctx.names.leaders,
            locks = self.ctx.names.locks
        );
        let remaining_sql = format!(
            "SELECT extract(epoch FROM lease_expires_at - clock_timestamp())::float8 FROM {}
             WHERE name = $1 AND holder_id IS NOT NULL AND lease_expires_at > clock_timestamp()",
            self.ctx.names.leaders
        );
        let secs = ttl.as_secs_f64();
        let remaining: Option<f64> = self
            .on_primary(async |c| {
                let params: [(&(dyn ToSql + Sync), Type); 3] =
                    [(&key, Type::INT8), (&name, Type::TEXT), (&secs, Type::FLOAT8)];
                match c.client.query_typed(evict.as_str(), &params).await {
                    Ok(rows) => {
                        for row in rows {
                            let pid: i32 = row.try_get(0)?;
                            tracing::warn!(name, pid, "terminated a stuck leader-election session");
                        }
                    }
                    Err(e) if !c.client.is_closed() => {
                        tracing::warn!(name, error = %e, "cannot terminate a stuck leader-election session; waiting for the server to drop it");
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(c.client
                    .query_typed_opt(remaining_sql.as_str(), &[(&name, Type::TEXT)])
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?)
            })
            .await?;
        Ok(remaining.map(|r| Duration::try_from_secs_f64(r.max(0.0)).unwrap_or_default()))
    }

    async fn release_quietly(&self, held: HeldLock) {
        if let Err(e) = self.release(held).await {
            tracing::debug!(error = %e, "releasing a leader lock");
        }
    }

    /// Starts the renewal task for a won lease.
    fn lead(
        self: &Arc<Self>,
        held: HeldLock,
        name: &str,
        term: i64,
        ttl: Duration,
        sent: Instant,
        sent_wall: SystemTime,
    ) -> Leadership {
        let (ended, _) = watch::channel(false);
        let state = Arc::new(State {
            ended,
            deadline: Mutex::new(sent),
            wall_deadline: Mutex::new(sent_wall),
        });
        state.extend(sent, sent_wall, ttl - margin(ttl));
        let (resign_tx, resign_rx) = oneshot::channel();
        let lease = Lease {
            // Weak: the backend keeps `try_become_leader` leaderships in the coordinator, and
            // dropping the last backend handle must drop (and so resign) them.
            coordinator: Arc::downgrade(self),
            ctx: self.ctx.clone(),
            sql: LeaseSql::new(&self.ctx.names.leaders),
            holder: self.holder.id.clone(),
            name: name.to_string(),
            term,
            ttl,
        };
        let fence = held.fence();
        tokio::spawn(lease.renew_loop(held, state.clone(), resign_rx));
        Leadership {
            name: name.to_string(),
            term,
            ttl,
            fence,
            state,
            resign: Some(resign_tx),
        }
    }

    /// The live lease of `name`, if any (by the database clock).
    pub async fn current_leader(&self, name: &str) -> StateResult<Option<LeaderInfo>> {
        check_lock_name(name)?;
        let sql = format!(
            "SELECT holder_id, holder_host, holder_pid, term,
                    extract(epoch FROM lease_expires_at - clock_timestamp())::float8
             FROM {} WHERE name = $1 AND holder_id IS NOT NULL AND lease_expires_at > clock_timestamp()",
            self.ctx.names.leaders
        );
        let row = self
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed_opt(sql.as_str(), &[(&name, Type::TEXT)])
                    .await?)
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let remaining: f64 = row.try_get(4)?;
        Ok(Some(LeaderInfo {
            name: name.to_string(),
            holder_id: row.try_get(0)?,
            holder_host: row.try_get(1)?,
            holder_pid: row.try_get(2)?,
            term: row.try_get(3)?,
            lease_remaining: Duration::try_from_secs_f64(remaining.max(0.0)).unwrap_or_default(),
        }))
    }
}

/// What the renewal task needs.
struct Lease {
    coordinator: Weak<Coordinator>,
    /// The backend's operation context (its pool outlives the backend while this renews).
    ctx: Arc<Context>,
    sql: LeaseSql,
    holder: String,
    name: String,
    term: i64,
    ttl: Duration,
}

impl Lease {
    /// Releases the lock and keeps the connection, or (backend gone) closes it.
    async fn release(&self, held: HeldLock) -> StateResult<()> {
        match self.coordinator.upgrade() {
            Some(c) => c.release(held).await,
            None => {
                self.ctx.stats.lock(LockEvent::Released);
                Ok(())
            }
        }
    }

    /// Renews the lease on the leader's session until it resigns, is dropped, or loses it.
    async fn renew_loop(
        self,
        held: HeldLock,
        state: Arc<State>,
        mut resign: oneshot::Receiver<oneshot::Sender<StateResult<()>>>,
    ) {
        let (name, term, holder) = (self.name.as_str(), self.term, self.holder.as_str());
        let secs = self.ttl.as_secs_f64();
        let mut closed = held.lost_signal();
        let why = loop {
            let deadline = *locked(&state.deadline);
            tokio::select! {
                biased;
                request = &mut resign => {
                    // Resigned, or the handle was dropped: stop believing first, then give the
                    // lease back and release the lock.
                    state.end();
                    let cleared = held
                        .client()
                        .execute(self.sql.clear.as_str(), &[&name, &term, &holder])
                        .await
                        .map(|_| ())
                        .map_err(StateError::from);
                    let released = self.release(held).await;
                    self.ctx.stats.lock(LockEvent::LeadershipEnded);
                    tracing::info!(name, term, "resigned leadership");
                    if let Ok(done) = request {
                        let _ = done.send(cleared.and(released));
                    }
                    return;
                }
                _ = wait_closed(&mut closed) => break "its session ended",
                _ = tokio::time::sleep_until(deadline.into()) => break "the lease was not renewed in time",
                _ = tokio::time::sleep(self.ttl / 3) => {
                    let (sent, sent_wall) = (Instant::now(), SystemTime::now());
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                        [&name, &term, &holder, &secs];
                    let renewal = held.client().execute(self.sql.renew.as_str(), &params);
                    match tokio::time::timeout_at(deadline.into(), renewal).await {
                        Ok(Ok(1)) => state.extend(sent, sent_wall, self.ttl - margin(self.ttl)),
                        Ok(Ok(_)) => break "the lease was gone",
                        Ok(Err(_)) => break "a renewal failed",
                        Err(_) => break "the lease was not renewed in time",
                    }
                }
            }
        };
        // Lost: stop believing before anything else.
        state.end();
        self.ctx.stats.lock(LockEvent::LeadershipEnded);
        tracing::warn!(name, term, reason = why, "leadership lost");
        self.clear_lost_lease(held).await;
    }

    /// After the lease was lost, once this holder no longer believes it leads: clears the
    /// lease (before releasing the lock, so the next candidate finds it cleared and need not
    /// wait for it to expire), on the session if it is alive, else through the pool.
    async fn clear_lost_lease(&self, held: HeldLock) {
        let (name, term, holder) = (self.name.as_str(), self.term, self.holder.as_str());
        let cleared = !held.is_lost()
            && held
                .client()
                .execute(self.sql.clear.as_str(), &[&name, &term, &holder])
                .await
                .is_ok();
        drop(self.release(held).await);
        if cleared {
            return;
        }
        let clear = self.sql.clear.as_str();
        let cleared = self
            .ctx
            .on_primary(async |c| {
                c.client
                    .execute_typed(
                        clear,
                        &[
                            (&name, Type::TEXT),
                            (&term, Type::INT8),
                            (&holder, Type::TEXT),
                        ],
                    )
                    .await?;
                Ok(())
            })
            .await;
        if let Err(e) = cleared {
            tracing::debug!(name, error = %e, "clearing a lost lease failed; it runs out by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds_and_margin() {
        assert!(check_ttl(Duration::from_millis(299)).is_err());
        assert!(check_ttl(Duration::from_secs(60)).is_ok());
        assert!(check_ttl(Duration::from_secs(25 * 3600)).is_err());
        let ttl = Duration::from_secs(10);
        // Renewal (every ttl/3) comes well before the belief ends (ttl - margin).
        assert!(ttl / 3 < ttl - margin(ttl));
        assert_eq!(margin(ttl), Duration::from_secs(2));
    }
}
