//! One dedicated lock connection ([`LockConn`]): its prepared statements, taking a lock (at
//! once or waiting with a server-side `lock_timeout`), recording an acquisition (bookkeeping
//! row and fencing token) and releasing it.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::{Holder, LockMode, ADVISORY_LOCKS};
use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::schema::names::TableNames;
use crate::state::wire::connection::{Connected, Connector};
use crate::state::wire::statements::Param;

/// Ends a server-side lock wait whose future was dropped: without it the driver keeps the
/// connection (and the server the queued waiter) until the wait's `lock_timeout`.
pub(crate) struct CancelOnDrop<'a> {
    pub connector: &'a Connector,
    pub token: Option<tokio_postgres::CancelToken>,
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

/// A dedicated connection for session locks (and leader leases).
pub(crate) struct LockConn {
    pub client: Client,
    /// The server process id of this session.
    pub pid: i32,
    /// Becomes `true` when the connection ends (and with it every lock it held).
    pub closed: watch::Receiver<bool>,
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
    pub async fn open(connector: &Connector, names: &TableNames) -> StateResult<Self> {
        let Connected { client, closed, .. } = connector.connect_dedicated().await?;
        let record = record_sql(names);
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
            client.prepare_typed(&record, &RECORD_TYPES),
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

    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || *self.closed.borrow()
    }

    /// Takes the lock; `false` if it is held elsewhere (and, with a wait, stayed so). If this
    /// future is dropped during a wait, a cancel request ends the server-side wait.
    pub async fn lock(
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
        let set_params: [Param; 1] = [&setting];
        let lock_params: [Param; 1] = [&key];
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

    /// Sets `lock_timeout` back to none after a wait (a connection that waited for a lock and
    /// then joins the shared lock sessions must not keep it).
    pub async fn reset_lock_timeout(&self) -> StateResult<()> {
        let zero = "0";
        let params: [Param; 1] = [&zero];
        self.client
            .query_one(&self.stmts.set_lock_timeout, &params)
            .await?;
        Ok(())
    }

    /// Records the acquisition (bookkeeping row; for an exclusive lock the next fencing token),
    /// then resets `lock_timeout`. Waiting for the token row (an open transaction's
    /// [`check_fence`](crate::state::PostgresTransaction::check_fence) holds it) is bounded
    /// by `budget`.
    pub async fn record(
        &self,
        connector: &Connector,
        what: &Acquisition<'_>,
        budget: Duration,
    ) -> StateResult<i64> {
        let key = what.key;
        let budget_ms = format!("{}ms", budget.as_millis().clamp(1, i32::MAX as u128));
        let zero = "0";
        let exclusive = what.mode == LockMode::Exclusive;
        let mode = what.mode.as_str();
        let budget_params: [Param; 1] = [&budget_ms];
        let reset_params: [Param; 1] = [&zero];
        let record_params = record_params(what, &exclusive, &mode, &self.pid);
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
        recorded(row, key, budget)
    }

    /// Deletes the bookkeeping row and releases the lock; whether the session held it.
    pub async fn unlock(&self, key: i64, mode: LockMode) -> StateResult<bool> {
        let stmt = match mode {
            LockMode::Exclusive => &self.stmts.unlock,
            LockMode::Shared => &self.stmts.unlock_shared,
        };
        let params: [Param; 1] = [&key];
        let (forget, unlocked) = tokio::join!(
            self.client.execute(&self.stmts.forget, &params),
            self.client.query_one(stmt, &params),
        );
        forget?;
        Ok(unlocked?.try_get(0)?)
    }
}

/// Records an acquisition of lock `$1` by the session whose process id is `$9` (see
/// [`record_params`]): the next fencing token for an exclusive lock (the current one for a
/// shared lock) and the bookkeeping row, after deleting rows of sessions that no longer hold
/// the lock. It may run on any connection: it waits for the token row while an open
/// transaction that checked a fence on this lock holds it.
pub(crate) fn record_sql(names: &TableNames) -> String {
    format!(
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
             WHERE b.lock_key = $1 AND b.backend_pid <> $9 AND NOT EXISTS (
                 SELECT 1 FROM ({ADVISORY_LOCKS}) l
                 WHERE l.granted AND l.pid = b.backend_pid AND l.lock_key = b.lock_key)
         )
         INSERT INTO {locks} AS b (lock_key, lock_name, holder_id, holder_host, holder_pid,
                                   backend_pid, lock_mode, acquired_at, fencing_token,
                                   acquisition_id)
         SELECT $1, $2, $3, $4, $5, $9, $6, now(), token, $8 FROM fence
         ON CONFLICT (lock_key, backend_pid) DO UPDATE
             SET lock_name = EXCLUDED.lock_name, holder_id = EXCLUDED.holder_id,
                 holder_host = EXCLUDED.holder_host, holder_pid = EXCLUDED.holder_pid,
                 lock_mode = EXCLUDED.lock_mode, acquired_at = EXCLUDED.acquired_at,
                 fencing_token = EXCLUDED.fencing_token,
                 acquisition_id = EXCLUDED.acquisition_id
         RETURNING fencing_token",
        fences = names.fences,
        locks = names.locks
    )
}

/// The parameters of [`record_sql`] for `what`, held by the session with process id `pid`.
pub(crate) fn record_params<'a>(
    what: &'a Acquisition<'a>,
    exclusive: &'a bool,
    mode: &'a &'static str,
    pid: &'a i32,
) -> [Param<'a>; 9] {
    [
        &what.key,
        &what.name,
        &what.holder.id,
        &what.holder.host,
        &what.holder.pid,
        mode,
        exclusive,
        &what.id,
        pid,
    ]
}

/// The types of [`record_sql`]'s parameters.
const RECORD_TYPES: [Type; 9] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::INT4,
];

/// [`record_params`] with their types, for an unnamed statement.
pub(crate) fn record_types<'a>(params: &[Param<'a>; 9]) -> Vec<(Param<'a>, Type)> {
    params.iter().copied().zip(RECORD_TYPES).collect()
}

/// The fencing token from [`record_sql`]'s reply.
pub(crate) fn recorded(
    row: Result<tokio_postgres::Row, tokio_postgres::Error>,
    key: i64,
    budget: Duration,
) -> StateResult<i64> {
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

/// What [`record_sql`] writes down about one acquisition.
#[derive(Clone, Copy)]
pub(crate) struct Acquisition<'a> {
    pub key: i64,
    pub name: Option<&'a str>,
    pub mode: LockMode,
    pub holder: &'a Holder,
    /// Unique per acquisition: what a fence names.
    pub id: &'a str,
}
