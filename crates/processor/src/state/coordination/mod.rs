//! Coordination: session advisory locks, lock guards with fencing tokens, leader election and
//! LISTEN/NOTIFY.
//!
//! # How a lock is held
//! Every held session lock lives on a **dedicated** connection of its own, opened with tight TCP
//! keepalives and never shared with the pool. The lock is held exactly as long as that session:
//! released explicitly (`pg_advisory_unlock`, bookkeeping row deleted, connection kept for the
//! next lock), or by the server when the connection ends (dropped guard without a runtime,
//! terminated backend, network failure). So two backends, or two tasks of one backend, never hold
//! the same exclusive lock, and a lock never outlives the code that holds it on a connection that
//! went back to a pool. When the connection ends unexpectedly the lock's *lost* signal fires.
//!
//! # Lock names
//! [`lock_key`] maps a name to the `bigint` key PostgreSQL locks: the first 8 bytes, big-endian,
//! of SHA-256 of `"pgstate.lock:"` followed by the name's UTF-8 bytes. The prefix keeps our
//! keys apart from other users of advisory locks (and leader election uses its own,
//! `"pgstate.leader:"`); the function is fixed forever, so every machine and version agrees.
//!
//! # Fencing tokens
//! Each acquisition increments the lock's row in `state_lock_fences` (never reset) and the new
//! value is the holder's token. A write that must only happen under the lock checks the token
//! inside its transaction ([`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence)):
//! a holder whose lock was lost and re-acquired elsewhere is refused, even if it has not noticed
//! yet.

mod guard;
mod leader;
mod listener;
mod txn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};

use crate::state::connection::{Connector, PgConn, Session};
use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::names::TableNames;
use crate::state::pool::ConnPool;
use crate::state::stats::{LockEvent, Stats};

pub(crate) use guard::fence_sql;
pub use guard::{Fence, PostgresLockGuard};

pub use leader::{LeaderInfo, Leadership};
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
pub const MAX_LOCK_NAME_LEN: usize = 1024;

pub(crate) fn check_lock_name(name: &str) -> StateResult<()> {
    if name.is_empty() {
        return Err(StateError::invalid("lock name is empty"));
    }
    if name.len() > MAX_LOCK_NAME_LEN {
        return Err(StateError::invalid(format!(
            "lock name is {} bytes; at most {MAX_LOCK_NAME_LEN} allowed",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(StateError::invalid("lock name contains a NUL byte"));
    }
    Ok(())
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
    fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
}

/// A session advisory lock as the server sees it, from
/// [`EnhancedPostgresBackend::list_advisory_locks`](crate::state::EnhancedPostgresBackend::list_advisory_locks).
#[derive(Clone, Debug, PartialEq)]
pub struct AdvisoryLockInfo {
    /// The lock's key.
    pub key: i64,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// Process id of the server session holding it.
    pub backend_pid: i32,
    /// The lock's name, when a pgstate holder recorded it (named locks).
    pub name: Option<String>,
    /// The holder's id (`host:pid:serial:random`), when a pgstate holder recorded it.
    pub holder_id: Option<String>,
    /// The holder's host name, when recorded.
    pub holder_host: Option<String>,
    /// The holder's operating-system process id, when recorded.
    pub holder_pid: Option<i32>,
    /// When it was acquired, when recorded.
    pub acquired_at: Option<SystemTime>,
    /// The fencing token of this acquisition, when recorded.
    pub fencing_token: Option<i64>,
    /// Sessions waiting for this key now.
    pub waiters: i64,
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

/// Ends a server-side lock wait whose future was dropped: without it the driver keeps the
/// connection (and the server the queued waiter) until the wait's `lock_timeout`.
struct CancelOnDrop<'a> {
    connector: &'a Connector,
    token: Option<tokio_postgres::CancelToken>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let connector = self.connector.clone();
            runtime.spawn(async move { connector.cancel(&token).await });
        }
    }
}

/// Spare lock connections kept for reuse, and how long one may sit unused.
const MAX_SPARE: usize = 4;
const SPARE_IDLE: Duration = Duration::from_secs(30);

/// What the backend needs for coordination; shared by every handle.
pub(crate) struct Coordinator {
    connector: Connector,
    pub names: TableNames,
    pub stats: Arc<Stats>,
    pub primary: Arc<ConnPool>,
    /// Bounds each statement run on a pooled primary connection.
    pub op_timeout: Duration,
    pub holder: Holder,
    /// Locks taken with the key API, per key and mode (shared locks may be taken repeatedly).
    held: Mutex<HashMap<(i64, LockMode), Vec<HeldLock>>>,
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
            .field("schema", &self.0.names.schema.as_str())
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex, carrying on after a panic elsewhere (the data are plain maps).
pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    pub fn new(
        connector: &Connector,
        names: TableNames,
        stats: Arc<Stats>,
        primary: Arc<ConnPool>,
        op_timeout: Duration,
    ) -> Self {
        Coordinator {
            connector: connector.dedicated(),
            names,
            stats,
            primary,
            op_timeout,
            holder: Holder::new(),
            held: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
            leaders: Mutex::new(HashMap::new()),
            acquisitions: AtomicU64::new(0),
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Runs `f` on a pooled primary connection, bounded by the operation timeout.
    pub async fn on_primary<T, F>(&self, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&mut PgConn) -> StateResult<T>,
    {
        self.primary.with(self.op_timeout, f).await
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
        Ok((LockConn::open(&self.connector, &self.names).await?, false))
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

    /// Acquires `key` on a dedicated connection: without waiting when `wait` is zero, else
    /// waiting up to `wait` (server-side `lock_timeout`). `Ok(None)`: someone else holds it.
    pub async fn acquire(
        &self,
        key: i64,
        name: Option<&str>,
        mode: LockMode,
        wait: Duration,
    ) -> StateResult<Option<HeldLock>> {
        let mut waited = Duration::ZERO;
        let result = self.acquire_inner(key, name, mode, wait, &mut waited).await;
        match &result {
            Ok(Some(_)) => self.stats.lock(LockEvent::Acquired(waited)),
            _ => self.stats.lock(LockEvent::Failed(waited)),
        }
        result
    }

    async fn acquire_inner(
        &self,
        key: i64,
        name: Option<&str>,
        mode: LockMode,
        wait: Duration,
        waited: &mut Duration,
    ) -> StateResult<Option<HeldLock>> {
        let (mut conn, reused) = self.take_conn().await?;
        let start = Instant::now();
        let first = conn.lock(&self.connector, key, mode, wait).await;
        *waited = start.elapsed();
        let got = match first {
            // A spare connection may have died since it was parked (server restart): one
            // more try on a fresh one.
            Err(e) if reused && e.kind() == crate::state::ErrorKind::Connection => {
                conn = LockConn::open(&self.connector, &self.names).await?;
                let start = Instant::now();
                let second = conn.lock(&self.connector, key, mode, wait).await;
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
        let serial = self.acquisitions.fetch_add(1, AtomicOrdering::Relaxed);
        let acquisition = format!("{}/{serial}", self.holder.id);
        let what = Acquisition {
            key,
            name,
            mode,
            holder: &self.holder,
            id: &acquisition,
        };
        let token = conn.record(&self.connector, &what, budget).await?;
        Ok(Some(HeldLock {
            conn,
            key,
            name: name.map(str::to_string),
            mode,
            token,
            acquisition,
        }))
    }

    /// Releases a held lock and keeps its connection for reuse. `LockLost` if the connection
    /// had already ended (the server released the lock then).
    pub async fn release(&self, held: HeldLock) -> StateResult<()> {
        self.stats.lock(LockEvent::Released);
        let label = held.label();
        if held.conn.is_closed() {
            return Err(StateError::LockLost { lock: label });
        }
        match held.conn.unlock(held.key, held.mode).await {
            Ok(true) => {
                self.put_spare(held.conn);
                Ok(())
            }
            // The session did not hold it: it cannot have been released by us, so the
            // connection is in a state we do not understand; drop it.
            Ok(false) => Err(StateError::LockLost { lock: label }),
            Err(e) if e.kind() == crate::state::ErrorKind::Connection => {
                Err(StateError::LockLost { lock: label })
            }
            Err(e) => Err(e),
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
            .is_some_and(|v| v.iter().any(|h| !h.conn.is_closed()))
    }

    /// Every session advisory lock granted in this database, with pgstate's bookkeeping where
    /// there is any and the number of waiters. Bookkeeping rows whose session no longer holds
    /// the lock (a dead holder) are deleted first.
    pub async fn list(&self) -> StateResult<Vec<AdvisoryLockInfo>> {
        let n = &self.names;
        let advisory = format!("adv AS ({ADVISORY_LOCKS})");
        let cleanup = format!(
            "WITH {advisory}
             DELETE FROM {locks} b WHERE NOT EXISTS (
                 SELECT 1 FROM adv a WHERE a.granted AND a.lock_key = b.lock_key AND a.pid = b.backend_pid)",
            locks = n.locks
        );
        let list = format!(
            "WITH {advisory}
             SELECT a.lock_key, a.pid, a.mode = 'ShareLock', b.lock_name, b.holder_id, b.holder_host,
                    b.holder_pid, b.acquired_at, b.fencing_token,
                    (SELECT count(*) FROM adv w WHERE w.lock_key = a.lock_key AND NOT w.granted)
             FROM adv a LEFT JOIN {locks} b ON b.lock_key = a.lock_key AND b.backend_pid = a.pid
             WHERE a.granted
             ORDER BY a.lock_key, a.pid",
            locks = n.locks
        );
        let rows = self
            .on_primary(async |c| {
                c.client.execute(cleanup.as_str(), &[]).await?;
                Ok(c.client.query(list.as_str(), &[]).await?)
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AdvisoryLockInfo {
                    key: r.try_get(0)?,
                    backend_pid: r.try_get(1)?,
                    mode: if r.try_get(2)? {
                        LockMode::Shared
                    } else {
                        LockMode::Exclusive
                    },
                    name: r.try_get(3)?,
                    holder_id: r.try_get(4)?,
                    holder_host: r.try_get(5)?,
                    holder_pid: r.try_get(6)?,
                    acquired_at: r.try_get(7)?,
                    fencing_token: r.try_get(8)?,
                    waiters: r.try_get(9)?,
                })
            })
            .collect()
    }
}

type Param<'a> = dyn tokio_postgres::types::ToSql + Sync + 'a;

/// A dedicated connection for session locks (and leader leases).
pub(crate) struct LockConn {
    client: Client,
    /// The server process id of this session.
    pid: i32,
    closed: watch::Receiver<bool>,
    stmts: LockStatements,
}

struct LockStatements {
    try_lock: Statement,
    try_lock_shared: Statement,
    lock: Statement,
    lock_shared: Statement,
    set_lock_timeout: Statement,
    record: Statement,
    unlock: Statement,
    unlock_shared: Statement,
    forget: Statement,
}

impl LockConn {
    async fn open(connector: &Connector, names: &TableNames) -> StateResult<Self> {
        let Session { client, closed, .. } = connector.connect_dedicated().await?;
        let record = format!(
            "WITH fence AS (
                 -- Exclusive: the next token. Shared: the current one (0 before any writer),
                 -- without bumping it. Both take the row lock, so both wait for an open
                 -- transaction that checked a fence on this lock (it holds the row FOR SHARE):
                 -- a new holder never starts before a stale holder's fenced write is settled.
                 INSERT INTO {fences} AS f (lock_key, lock_name, token)
                 VALUES ($1, $2, CASE WHEN $7 THEN 1 ELSE 0 END)
                 ON CONFLICT (lock_key) DO UPDATE
                     SET token = f.token + CASE WHEN $7 THEN 1 ELSE 0 END,
                         lock_name = COALESCE(EXCLUDED.lock_name, f.lock_name),
                         updated_at = now()
                 RETURNING token
             ), dead AS (
                 DELETE FROM {locks} b
                 WHERE b.lock_key = $1 AND b.backend_pid <> pg_backend_pid() AND NOT EXISTS (
                     SELECT 1 FROM ({ADVISORY_LOCKS}) l
                     WHERE l.granted AND l.pid = b.backend_pid AND l.lock_key = b.lock_key)
             )
             INSERT INTO {locks} AS b (lock_key, lock_name, holder_id, holder_host, holder_pid,
                                       backend_pid, lock_mode, acquired_at, fencing_token,
                                       acquisition_id)
             SELECT $1, $2, $3, $4, $5, pg_backend_pid(), $6, now(), token, $8 FROM fence
             ON CONFLICT (lock_key, backend_pid) DO UPDATE
                 SET lock_name = EXCLUDED.lock_name, holder_id = EXCLUDED.holder_id,
                     holder_host = EXCLUDED.holder_host, holder_pid = EXCLUDED.holder_pid,
                     lock_mode = EXCLUDED.lock_mode, acquired_at = EXCLUDED.acquired_at,
                     fencing_token = EXCLUDED.fencing_token,
                     acquisition_id = EXCLUDED.acquisition_id
             RETURNING fencing_token",
            fences = names.fences,
            locks = names.locks
        );
        let forget = format!(
            "DELETE FROM {} WHERE lock_key = $1 AND backend_pid = pg_backend_pid()",
            names.locks
        );
        let (pid, a, b, c, d, e, f, g, h, i) = tokio::try_join!(
            client.query_one("SELECT pg_backend_pid()", &[]),
            client.prepare("SELECT pg_try_advisory_lock($1)"),
            client.prepare("SELECT pg_try_advisory_lock_shared($1)"),
            client.prepare("SELECT pg_advisory_lock($1)"),
            client.prepare("SELECT pg_advisory_lock_shared($1)"),
            client.prepare("SELECT set_config('lock_timeout', $1, false)"),
            client.prepare(&record),
            client.prepare("SELECT pg_advisory_unlock($1)"),
            client.prepare("SELECT pg_advisory_unlock_shared($1)"),
            client.prepare(&forget),
        )?;
        Ok(LockConn {
            pid: pid.try_get(0)?,
            client,
            closed,
            stmts: LockStatements {
                try_lock: a,
                try_lock_shared: b,
                lock: c,
                lock_shared: d,
                set_lock_timeout: e,
                record: f,
                unlock: g,
                unlock_shared: h,
                forget: i,
            },
        })
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed() || *self.closed.borrow()
    }

    /// Takes the lock; `false` if it is held elsewhere (and, with a wait, stayed so). If this
    /// future is dropped during a wait, a cancel request ends the server-side wait.
    async fn lock(
        &self,
        connector: &Connector,
        key: i64,
        mode: LockMode,
        wait: Duration,
    ) -> StateResult<bool> {
        let s = &self.stmts;
        if wait.is_zero() {
            let stmt = match mode {
                LockMode::Exclusive => &s.try_lock,
                LockMode::Shared => &s.try_lock_shared,
            };
            return Ok(self.client.query_one(stmt, &[&key]).await?.try_get(0)?);
        }
        // lock_timeout counts whole milliseconds up to i32::MAX (about 24 days); 0 would
        // mean "no limit".
        let ms = wait.as_millis().clamp(1, i32::MAX as u128);
        let setting = format!("{ms}ms");
        let stmt = match mode {
            LockMode::Exclusive => &s.lock,
            LockMode::Shared => &s.lock_shared,
        };
        let set_params: [&Param; 1] = [&setting];
        let lock_params: [&Param; 1] = [&key];
        let mut canceller = CancelOnDrop {
            connector,
            token: Some(self.client.cancel_token()),
        };
        let (set, locked) = tokio::join!(
            self.client.query_one(&s.set_lock_timeout, &set_params),
            self.client.execute(stmt, &lock_params),
        );
        canceller.token = None;
        set?;
        match locked {
            Ok(_) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some(sqlstate::LOCK_NOT_AVAILABLE) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the acquisition (bookkeeping row; for an exclusive lock the next fencing token),
    /// then resets `lock_timeout`. Waiting for the token row (an open transaction's
    /// [`check_fence`](crate::state::PostgresTransaction::check_fence) holds it) is bounded
    /// by `budget`.
    async fn record(
        &self,
        connector: &Connector,
        what: &Acquisition<'_>,
        budget: Duration,
    ) -> StateResult<i64> {
        let Acquisition {
            key,
            name,
            mode,
            holder,
            id: acquisition,
        } = *what;
        let budget_ms = format!("{}ms", budget.as_millis().clamp(1, i32::MAX as u128));
        let zero = "0";
        let exclusive = mode == LockMode::Exclusive;
        let mode = mode.as_str();
        let budget_params: [&Param; 1] = [&budget_ms];
        let reset_params: [&Param; 1] = [&zero];
        let record_params: [&Param<'_>; 8] = [
            &key,
            &name,
            &holder.id,
            &holder.host,
            &holder.pid,
            &mode,
            &exclusive,
            &acquisition,
        ];
        // The lock is already held here: a dropped future must not leave it held until the
        // reply arrives.
        let mut canceller = CancelOnDrop {
            connector,
            token: Some(self.client.cancel_token()),
        };
        let (set, row, reset) = tokio::join!(
            self.client
                .query_one(&self.stmts.set_lock_timeout, &budget_params),
            self.client.query_one(&self.stmts.record, &record_params),
            self.client
                .query_one(&self.stmts.set_lock_timeout, &reset_params),
        );
        canceller.token = None;
        set?;
        reset?;
        match row {
            Ok(row) => Ok(row.try_get(0)?),
            Err(e) if e.code().map(|c| c.code()) == Some(sqlstate::LOCK_NOT_AVAILABLE) => {
                Err(StateError::Timeout(format!(
                    "recording advisory lock {key} waited over {budget:?} for its fencing row, \
                     held by an open transaction that checked the lock's fence"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the bookkeeping row and releases the lock; whether the session held it.
    async fn unlock(&self, key: i64, mode: LockMode) -> StateResult<bool> {
        let stmt = match mode {
            LockMode::Exclusive => &self.stmts.unlock,
            LockMode::Shared => &self.stmts.unlock_shared,
        };
        let params: [&Param; 1] = [&key];
        let (forget, unlocked) = tokio::join!(
            self.client.execute(&self.stmts.forget, &params),
            self.client.query_one(stmt, &params),
        );
        forget?;
        Ok(unlocked?.try_get(0)?)
    }
}

/// What [`LockConn::record`] writes down about one acquisition.
#[derive(Clone, Copy)]
struct Acquisition<'a> {
    key: i64,
    name: Option<&'a str>,
    mode: LockMode,
    holder: &'a Holder,
    id: &'a str,
}

/// A lock held on its dedicated connection.
pub(crate) struct HeldLock {
    conn: LockConn,
    pub key: i64,
    pub name: Option<String>,
    pub mode: LockMode,
    pub token: i64,
    /// Unique per acquisition (`holder id/serial`), recorded in the bookkeeping row: a fence
    /// names exactly one acquisition, even on a reused session.
    pub acquisition: String,
}

impl HeldLock {
    /// The lock's name, or its key, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n:?}"),
            None => format!("advisory lock {}", self.key),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.conn.is_closed()
    }

    /// Becomes `true` when the lock's connection ends.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.conn.closed.clone()
    }

    /// The server process id of the lock's session.
    pub fn backend_pid(&self) -> i32 {
        self.conn.pid
    }

    /// What a transaction checks to refuse this holder's writes once it no longer holds the
    /// lock under this acquisition.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key,
            name: self.label(),
            token: self.token,
            backend_pid: self.backend_pid(),
            acquisition: self.acquisition.clone(),
        }
    }

    /// The lock's session, for statements that must run on it (leader leases).
    pub(crate) fn client(&self) -> &Client {
        &self.conn.client
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
