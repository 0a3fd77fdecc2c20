//! Layer `coordination`: session advisory locks, lock guards with fencing tokens, leader
//! election, LISTEN/NOTIFY, and lease locks (`lease`). How a lock is held, how names become keys and what fencing
//! tokens promise is told on [`PostgresLockGuard`] (the public documentation).
//!
//! May use: `transaction`, `ops`, `pool`, `wire`, `schema`, `stats`, `config`, `error`.

mod guard;
mod held;
mod leader;
mod leadership;
mod lease;
mod list;
mod listener;
mod lockconn;
mod sessions;
mod txn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;

use crate::state::error::{StateError, StateResult};
use crate::state::limits::{check_name, MAX_NAME_LEN};
use crate::state::pool::context::Context;
use crate::state::stats::counters::LockEvent;
use crate::state::wire::connection::{Connector, PgConn};

pub(crate) use held::HeldLock;
use held::HeldOn;
pub(crate) use lease::Granted;
use lockconn::{record_params, record_sql, record_types, recorded, Acquisition, LockConn};
use sessions::LockSessions;

pub(crate) use guard::fence_sql;
pub use guard::{Fence, PostgresLockGuard};
pub use sessions::MAX_LOCK_SESSIONS;

pub use leadership::{LeaderInfo, Leadership};
pub use list::AdvisoryLockInfo;
pub(crate) use listener::{check_durable_payload, check_payload, durable_notify_sql, NOTIFY_SQL};
pub use listener::{Notification, PostgresListener, MAX_NOTIFY_PAYLOAD};

/// The advisory-lock key of a named lock: the first 8 bytes (big-endian) of
/// SHA-256(`"pgstate.lock:"` + `name`). Stable across machines and versions; see the module
/// documentation.
pub fn lock_key(name: &str) -> i64 {
    namespaced_key("pgstate.lock:", name)
}

/// The advisory-lock key candidates for leadership of `name` contend on: per schema, like the
/// leases (a schema is a plain identifier, so `:` separates unambiguously).
pub(crate) fn leader_key(schema: &str, name: &str) -> i64 {
    namespaced_key("pgstate.leader:", &format!("{schema}:{name}"))
}

fn namespaced_key(namespace: &str, name: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update(name.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// This database's session advisory locks with `bigint` keys, from `pg_locks`, as rows of
/// `(lock_key, pid, mode, granted)`: a `bigint` key's high half is in `classid`, its low half
/// in `objid` (`objsubid` 1). Every query that matches a lock to its holder uses this.
pub(crate) const ADVISORY_LOCKS: &str =
    "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS lock_key, l.pid, l.mode, l.granted
     FROM pg_catalog.pg_locks l
     WHERE l.locktype = 'advisory' AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())";

/// Longest accepted lock or leader name, in bytes.
pub const MAX_LOCK_NAME_LEN: usize = MAX_NAME_LEN;

pub(crate) fn check_lock_name(name: &str) -> StateResult<()> {
    check_name("lock name", name)
}

/// Exclusive (writer) or shared (reader) advisory lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// One holder at a time; excludes shared holders too.
    Exclusive,
    /// Any number of shared holders at once; excludes an exclusive holder.
    Shared,
}

impl LockMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
}

/// Who holds locks and leases for this backend: unique per backend instance.
#[derive(Clone, Debug)]
pub(crate) struct Holder {
    pub id: String,
    pub host: String,
    pub pid: i32,
}

impl Holder {
    fn new() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        // Distinct for every backend of the process, whatever the random source does.
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let random = crate::state::retry::random();
        Holder {
            id: format!("{host}:{pid}:{serial}:{random:012x}"),
            host,
            pid,
        }
    }
}

/// The least time recording an acquisition may wait for its fencing row.
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// Spare lock connections kept for reuse, and how long one may sit unused.
const MAX_SPARE: usize = 4;
const SPARE_IDLE: Duration = Duration::from_secs(30);

/// What the backend needs for coordination; shared by every handle.
pub(crate) struct Coordinator {
    /// The primary's pool, names, statistics and operation timeout.
    pub ctx: Arc<Context>,
    pub holder: Holder,
    /// Locks taken with the key API, per key and mode (shared locks may be taken repeatedly).
    held: Mutex<HashMap<(i64, LockMode), Vec<HeldLock>>>,
    /// The shared sessions locks and guards are held on, and how session features connect:
    /// `None` behind PgBouncer's transaction pooling without a session URL (see
    /// [`Coordinator::connector`]).
    sessions: Option<Arc<LockSessions>>,
    /// Clean dedicated connections kept for waits and leader election.
    spare: Mutex<Vec<(Instant, LockConn)>>,
    /// Leaderships taken with `try_become_leader`.
    pub leaders: Mutex<HashMap<String, Leadership>>,
    /// Numbers this backend's acquisitions.
    acquisitions: AtomicU64,
}

/// The coordination side of a backend: what [`PostgresLockGuard`] and [`PostgresListener`] take.
/// An [`EnhancedPostgresBackend`](crate::state::EnhancedPostgresBackend) converts into it, by
/// value or by reference (`PostgresLockGuard::new(backend.clone_handle(), ..)`,
/// `PostgresListener::from_backend(&backend, ..)`); it keeps the backend's pool alive.
#[derive(Clone)]
pub struct CoordinationHandle(pub(crate) Arc<Coordinator>);

impl std::fmt::Debug for CoordinationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinationHandle")
            .field("schema", &self.0.ctx.names.schema.as_str())
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex, carrying on after a panic elsewhere (the data are plain maps).
pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    pub fn new(connector: Option<&Connector>, ctx: Arc<Context>) -> Self {
        Coordinator {
            sessions: connector.map(|c| LockSessions::new(c.dedicated(), ctx.names.clone())),
            ctx,
            holder: Holder::new(),
            held: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
            leaders: Mutex::new(HashMap::new()),
            acquisitions: AtomicU64::new(0),
        }
    }

    /// How session features (session locks, guards, leader election, LISTEN) connect; a
    /// configuration error behind PgBouncer's transaction pooling without a session URL.
    pub fn connector(&self) -> StateResult<&Connector> {
        Ok(self.lock_sessions()?.connector())
    }

    fn lock_sessions(&self) -> StateResult<&Arc<LockSessions>> {
        self.sessions.as_ref().ok_or_else(|| {
            StateError::config(
                "session advisory locks, lock guards, leader election and LISTEN need a session \
                 that lasts, which PgBouncer's transaction pooling (pgbouncer=true) does not keep: \
                 set EnhancedPostgresConfig::with_session_url to a direct URL of the primary (or \
                 one through PgBouncer's session pooling)",
            )
        })
    }

    /// Runs `f` on a pooled primary connection, bounded by the operation timeout.
    pub async fn on_primary<T, F>(&self, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&mut PgConn) -> StateResult<T>,
    {
        self.ctx.on_primary(f).await
    }

    /// A clean dedicated connection: a spare one if any is still open, else a new one.
    async fn take_conn(&self) -> StateResult<(LockConn, bool)> {
        loop {
            let spare = locked(&self.spare).pop();
            match spare {
                Some((since, conn)) if since.elapsed() < SPARE_IDLE && !conn.is_closed() => {
                    return Ok((conn, true))
                }
                Some(_) => continue,
                None => break,
            }
        }
        Ok((
            LockConn::open(self.connector()?, &self.ctx.names).await?,
            false,
        ))
    }

    /// Keeps a connection that holds no lock for the next acquisition.
    fn put_spare(&self, conn: LockConn) {
        if conn.is_closed() {
            return;
        }
        let mut spare = locked(&self.spare);
        spare.retain(|(since, c)| since.elapsed() < SPARE_IDLE && !c.is_closed());
        if spare.len() < MAX_SPARE {
            spare.push((Instant::now(), conn));
        }
    }

    /// Acquires `key` on one of the shared lock sessions (see the `sessions` module): without
    /// waiting when `wait` is zero, else waiting up to `wait` on a connection of its own.
    /// `Ok(None)`: someone else (also in this process) holds it.
    pub async fn acquire(
        &self,
        key: i64,
        name: Option<&str>,
        mode: LockMode,
        wait: Duration,
    ) -> StateResult<Option<HeldLock>> {
        let start = Instant::now();
        let result = self.acquire_shared_session(key, name, mode, wait).await;
        self.count_acquisition(&result, start.elapsed());
        result
    }

    /// Acquires `key` on a dedicated connection of its own (leader election: a successor may
    /// terminate a stuck leader's session, which must hold nothing else).
    pub async fn acquire_dedicated(
        &self,
        key: i64,
        name: Option<&str>,
        wait: Duration,
    ) -> StateResult<Option<HeldLock>> {
        let mut waited = Duration::ZERO;
        let result = self.acquire_inner(key, name, wait, &mut waited).await;
        self.count_acquisition(&result, waited);
        result
    }

    fn count_acquisition(&self, result: &StateResult<Option<HeldLock>>, waited: Duration) {
        match result {
            Ok(Some(_)) => self.ctx.stats.lock(LockEvent::Acquired(waited)),
            _ => self.ctx.stats.lock(LockEvent::Failed(waited)),
        }
    }

    async fn acquire_shared_session(
        &self,
        key: i64,
        name: Option<&str>,
        mode: LockMode,
        wait: Duration,
    ) -> StateResult<Option<HeldLock>> {
        let start = Instant::now();
        // What is left of `wait` (which may be as long as `Duration::MAX`).
        let left = || wait.saturating_sub(start.elapsed());
        let connector = self.connector()?;
        let sessions = self.lock_sessions()?;
        let mut reservation = sessions.reserve(key, mode).await?;
        let got = match reservation.try_lock().await {
            // The session died since its last use (server restart, terminated): once more on
            // another one (the dead one has left the rotation).
            Err(e) if e.kind() == crate::state::error::ErrorKind::Connection => {
                drop(reservation);
                reservation = sessions.reserve(key, mode).await?;
                reservation.try_lock().await?
            }
            other => other?,
        };
        if !got {
            let remaining = left();
            if remaining.is_zero() {
                return Ok(None);
            }
            // Held elsewhere: wait on a connection of its own, never on a shared session.
            let (waiter, _) = self.take_conn().await?;
            if !waiter.lock(connector, key, mode, remaining).await? {
                self.put_spare(waiter);
                return Ok(None);
            }
            waiter.reset_lock_timeout().await?;
            reservation.granted_on(waiter);
        }
        // From here on, an error or a dropped future unlocks in the background (see
        // `Reservation`): nothing is left held. Recording may wait for the fencing row, so it
        // runs on a pooled connection rather than the shared session.
        let acquisition = self.next_acquisition();
        let what = Acquisition {
            key,
            name,
            mode,
            holder: &self.holder,
            id: &acquisition,
        };
        let pid = reservation.session().conn.pid;
        let token = self
            .record_on_pool(&what, pid, left().max(RECORD_WAIT))
            .await?;
        Ok(Some(HeldLock {
            lock: HeldOn::Shared(reservation),
            key,
            name: name.map(str::to_string),
            mode,
            token,
            acquisition,
        }))
    }

    /// Records an acquisition granted on the shared session of server process `pid`: its
    /// bookkeeping row and its new fencing token (returned), on a pooled connection (it may
    /// wait for the fencing row up to `budget`, which must not hold a shared session).
    async fn record_on_pool(
        &self,
        what: &Acquisition<'_>,
        pid: i32,
        budget: Duration,
    ) -> StateResult<i64> {
        let sql = record_sql(&self.ctx.names);
        let budget_ms = format!("{}ms", budget.as_millis().clamp(1, i32::MAX as u128));
        let exclusive = what.mode == LockMode::Exclusive;
        let mode_text = what.mode.as_str();
        let params = record_params(what, &exclusive, &mode_text, &pid);
        self.ctx
            .on_primary_within(budget.saturating_add(self.ctx.limit), async |c| {
                let tx = c.client.transaction().await?;
                tx.query_typed_one(
                    "SELECT set_config('lock_timeout', $1, true)",
                    &[(&budget_ms, Type::TEXT)],
                )
                .await?;
                let row = tx
                    .query_typed_one(sql.as_str(), &record_types(&params))
                    .await;
                let token = recorded(row, what.key, budget)?;
                tx.commit().await?;
                Ok(token)
            })
            .await
    }

    async fn acquire_inner(
        &self,
        key: i64,
        name: Option<&str>,
        wait: Duration,
        waited: &mut Duration,
    ) -> StateResult<Option<HeldLock>> {
        let mode = LockMode::Exclusive;
        let connector = self.connector()?;
        let (mut conn, reused) = self.take_conn().await?;
        let start = Instant::now();
        let first = conn.lock(connector, key, mode, wait).await;
        *waited = start.elapsed();
        let got = match first {
            // A spare connection may have died since it was parked (server restart): one
            // more try on a fresh one.
            Err(e) if reused && e.kind() == crate::state::error::ErrorKind::Connection => {
                conn = LockConn::open(connector, &self.ctx.names).await?;
                let start = Instant::now();
                let second = conn.lock(connector, key, mode, wait).await;
                *waited += start.elapsed();
                second?
            }
            other => other?,
        };
        if !got {
            self.put_spare(conn);
            return Ok(None);
        }
        // On any error from here on the connection is dropped, which ends the session and
        // with it the lock: nothing is left held.
        let budget = wait.saturating_sub(*waited).max(RECORD_WAIT);
        let acquisition = self.next_acquisition();
        let what = Acquisition {
            key,
            name,
            mode,
            holder: &self.holder,
            id: &acquisition,
        };
        let token = conn.record(connector, &what, budget).await?;
        Ok(Some(HeldLock {
            lock: HeldOn::Dedicated(Box::new(conn)),
            key,
            name: name.map(str::to_string),
            mode,
            token,
            acquisition,
        }))
    }

    /// A new acquisition id (`holder id/serial`): what a fence names.
    fn next_acquisition(&self) -> String {
        let serial = self.acquisitions.fetch_add(1, AtomicOrdering::Relaxed);
        format!("{}/{serial}", self.holder.id)
    }

    /// Releases a held lock. `LockLost` if its session had already ended (the server released
    /// the lock then).
    pub async fn release(&self, held: HeldLock) -> StateResult<()> {
        self.ctx.stats.lock(LockEvent::Released);
        let label = held.label();
        if held.is_lost() {
            return Err(StateError::LockLost { lock: label });
        }
        let lost = |e: StateError| {
            if e.kind() == crate::state::error::ErrorKind::Connection {
                StateError::LockLost {
                    lock: label.clone(),
                }
            } else {
                e
            }
        };
        match held.lock {
            HeldOn::Shared(mut reservation) => match reservation.unlock().await {
                Ok(true) => Ok(()),
                Ok(false) => Err(StateError::LockLost { lock: label }),
                Err(e) => Err(lost(e)),
            },
            HeldOn::Dedicated(conn) => match conn.unlock(held.key, held.mode).await {
                Ok(true) => {
                    self.put_spare(*conn);
                    Ok(())
                }
                // The session did not hold it: it cannot have been released by us, so the
                // connection is in a state we do not understand; drop it.
                Ok(false) => Err(StateError::LockLost { lock: label }),
                Err(e) => Err(lost(e)),
            },
        }
    }

    /// The key API: acquire and remember under (key, mode).
    pub async fn acquire_key(&self, key: i64, mode: LockMode, wait: Duration) -> StateResult<bool> {
        match self.acquire(key, None, mode, wait).await? {
            Some(held) => {
                locked(&self.held)
                    .entry((key, mode))
                    .or_default()
                    .push(held);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The key API: release one acquisition of (key, mode) made through this backend.
    pub async fn release_key(&self, key: i64, mode: LockMode) -> StateResult<()> {
        let held = {
            let mut map = locked(&self.held);
            let held = map.get_mut(&(key, mode)).and_then(Vec::pop);
            if map.get(&(key, mode)).is_some_and(Vec::is_empty) {
                map.remove(&(key, mode));
            }
            held
        };
        match held {
            Some(h) => self.release(h).await,
            None => Err(StateError::LockNotHeld {
                lock: format!("{} advisory lock {key}", mode.as_str()),
            }),
        }
    }

    /// Whether this backend holds (key, mode) through the key API on a live connection.
    pub fn holds_key(&self, key: i64, mode: LockMode) -> bool {
        locked(&self.held)
            .get(&(key, mode))
            .is_some_and(|v| v.iter().any(|h| !h.is_lost()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_pinned() {
        // Documented, stable values: changing them would make two versions disagree.
        assert_eq!(lock_key("my_lock"), 0x4902_c45d_8505_a605);
        // A key whose top bit is set: negative as an i64, as pg_locks must reconstruct it.
        assert_eq!(
            leader_key("public", "cluster_leader"),
            0xcb74_3932_b13c_3034_u64 as i64
        );
        assert_ne!(lock_key("x"), leader_key("public", "x"));
        assert_ne!(leader_key("a", "x"), leader_key("b", "x"));
    }

    #[test]
    fn lock_names_are_checked() {
        assert!(check_lock_name("x'; DROP TABLE state_entries; --").is_ok());
        assert!(check_lock_name("").is_err());
        assert!(check_lock_name("a\0b").is_err());
        assert!(check_lock_name(&"n".repeat(MAX_LOCK_NAME_LEN + 1)).is_err());
    }
}
