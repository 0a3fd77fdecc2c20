//! A pooled connection's life: bb8's [`Manager`], which opens it, and the one checkout type,
//! [`Checkout`], which decides its fate when it is dropped:
//! - every operation runs through [`Checkout::run`], which marks the connection busy until the
//!   operation's future completes (with success or an error the server or driver reported): a
//!   future dropped before that (cancelled by the caller, cut off by the operation timeout)
//!   leaves a statement that may still run, so the connection is **settled** before anything
//!   else happens to it (see the `settle` module: a probe behind the statement, cancel
//!   requests while it waits, and for a closed connection its server process gone); then it
//!   goes back clean if the probe came back, else it is discarded. A later operation on the
//!   same checkout that completes settles it too (replies come in order);
//! - a connection inside a transaction that was never ended is **rolled back** (bounded) on
//!   the runtime it was checked out on, and returned clean only if that worked;
//! - otherwise it goes back **clean**. A closed connection is always discarded.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bb8::{ManageConnection, PooledConnection};

use crate::state::error::StateError;
use crate::state::pool::settle::{drain, Drained, Settled, Watch};
use crate::state::schema::names::TableNames;
use crate::state::wire::connection::{Connector, PgConn};

/// Opens [`PgConn`]s for bb8.
pub(crate) struct Manager {
    pub(crate) connector: Connector,
    pub(crate) names: TableNames,
    pub(crate) failures: Arc<ConnectFailures>,
    /// Connections opened before the current generation are discarded instead of reused
    /// (see [`ConnPool::reopen`](crate::state::pool::conn_pool::ConnPool::reopen)).
    pub(crate) generation: Arc<AtomicU64>,
}

/// Tells waiting acquires that opening a connection just failed, so that a pool with no
/// connection at all can report the server unreachable at once instead of waiting out the
/// acquire timeout.
#[derive(Default)]
pub(crate) struct ConnectFailures {
    pub(crate) notify: tokio::sync::Notify,
    pub(crate) last: Mutex<Option<String>>,
}

/// A pooled connection with what its checkout left it as.
pub(crate) struct Pooled {
    pub(crate) conn: PgConn,
    /// An operation started and has not completed.
    pub(crate) busy: bool,
    /// A transaction was begun and has not ended.
    pub(crate) in_transaction: bool,
    /// When it last went back to the pool (or was opened).
    pub(crate) idle_since: Instant,
    /// The pool's generation when it was opened.
    pub(crate) generation: u64,
}

impl Pooled {
    fn reusable(&self) -> bool {
        !self.busy && !self.in_transaction && !self.conn.client.is_closed()
    }
}

impl ManageConnection for Manager {
    type Connection = Pooled;
    type Error = StateError;

    async fn connect(&self) -> Result<Pooled, StateError> {
        let generation = self.generation.load(Relaxed);
        let result = PgConn::open(&self.connector, &self.names)
            .await
            .map(|conn| Pooled {
                conn,
                busy: false,
                in_transaction: false,
                idle_since: Instant::now(),
                generation,
            });
        if let Err(e) = &result {
            if let Ok(mut last) = self.failures.last.lock() {
                *last = Some(e.to_string());
            }
            self.failures.notify.notify_waiters();
        }
        result
    }

    async fn is_valid(&self, pooled: &mut Pooled) -> Result<(), StateError> {
        if !pooled.reusable() {
            return Err(StateError::Connection {
                message: "connection is closed or in an unknown state".to_string(),
                sqlstate: None,
            });
        }
        // Busy while the probe runs: a probe cut short leaves the connection discarded.
        pooled.busy = true;
        pooled.conn.probe().await?;
        pooled.busy = false;
        Ok(())
    }

    fn has_broken(&self, pooled: &mut Pooled) -> bool {
        !pooled.reusable() || pooled.generation < self.generation.load(Relaxed)
    }
}

/// A checked-out connection: the one way code outside the pool uses a pooled connection.
/// Owned (it holds a reference to the pool), so a transaction can keep it. See the module
/// documentation for how it decides, when dropped, what happens to the connection.
pub(crate) struct Checkout {
    /// `None` only while `drop` hands it to the rollback task.
    pub(crate) pooled: Option<PooledConnection<'static, Manager>>,
    /// The runtime the connection's I/O task runs on: a rollback owed on drop runs there.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Bounds a rollback owed on drop.
    pub(crate) rollback_limit: Duration,
    /// This checkout's turn in the pool (see [`ConnPool::get`](crate::state::pool::conn_pool::ConnPool::get)); released after the
    /// connection is back.
    pub(crate) turn: Option<crate::state::pool::turns::Turn>,
    /// Abandoned statements on this connection, fired once it is settled.
    pub(crate) unsettled: Vec<Arc<Settled>>,
}

impl Checkout {
    fn pooled(&mut self) -> &mut Pooled {
        match self.pooled.as_mut() {
            Some(p) => p,
            // Only `drop` takes it.
            None => unreachable!("a live checkout holds its connection"),
        }
    }

    fn pooled_ref(&self) -> &Pooled {
        match self.pooled.as_ref() {
            Some(p) => p,
            None => unreachable!("a live checkout holds its connection"),
        }
    }

    /// Runs one operation on the connection. The connection counts as busy until `op`'s future
    /// completes, whatever its result; if that future is dropped first, the connection is
    /// settled when the checkout ends (and [`abandoned`](Self::abandoned) says so meanwhile).
    pub async fn run<'s, T, E, F, Fut>(&'s mut self, op: F) -> Result<T, E>
    where
        F: FnOnce(&'s mut PgConn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_watched(None, op).await
    }

    /// [`run`](Self::run) for a write: `watch` learns that its statement was sent, and, if
    /// the future is dropped first or the connection fails while it runs, holds the write
    /// until the connection is settled.
    pub async fn run_watched<'s, T, E, F, Fut>(
        &'s mut self,
        watch: Option<&Watch<'_>>,
        op: F,
    ) -> Result<T, E>
    where
        F: FnOnce(&'s mut PgConn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Checkout {
            pooled, unsettled, ..
        } = self;
        let Some(pooled) = pooled.as_mut() else {
            unreachable!("a live checkout holds its connection")
        };
        let Pooled { conn, busy, .. } = &mut **pooled;
        // Statements abandoned earlier on this connection: settled once this one completes.
        let earlier = std::mem::take(unsettled);
        *busy = true;
        let mut guard = InFlight {
            unsettled,
            earlier,
            watch,
            done: false,
        };
        if let Some(w) = watch {
            w.sent();
        }
        let result = op(conn).await;
        guard.done = true;
        for s in guard.earlier.drain(..) {
            s.fire();
        }
        *busy = false;
        result
    }

    /// The connection failed while a statement watched by `watch` ran: the write is held until
    /// the connection's server process is gone, and the connection is discarded.
    pub fn lost(&mut self, watch: &Watch<'_>) {
        let settled = Settled::new();
        self.unsettled.push(settled.clone());
        watch.unsettled(settled);
        self.pooled().busy = true;
    }

    /// Whether an operation started on this connection never completed (its future was
    /// dropped): its effect is unknown.
    pub fn abandoned(&self) -> bool {
        self.pooled_ref().busy
    }

    /// Records that a transaction was begun (`true`) or ended (`false`) on this connection. A
    /// checkout dropped inside a transaction rolls it back before the connection is reused.
    pub fn set_in_transaction(&mut self, on: bool) {
        self.pooled().in_transaction = on;
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.pooled_ref().conn.client.is_closed()
    }

    /// The connection, shared: for the users of a lane (see the `pipeline` module), which
    /// track their own calls.
    pub fn conn(&self) -> &PgConn {
        &self.pooled_ref().conn
    }

    /// Makes the connection be discarded, not reused, when the checkout ends.
    pub fn discard(&mut self) {
        self.pooled().busy = true;
    }
}

/// An operation under way on a checkout; dropped before it completes, it records the
/// abandonment (see [`Checkout::run_watched`]).
struct InFlight<'a, 'w> {
    unsettled: &'a mut Vec<Arc<Settled>>,
    earlier: Vec<Arc<Settled>>,
    watch: Option<&'a Watch<'w>>,
    done: bool,
}

impl Drop for InFlight<'_, '_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let settled = Settled::new();
        self.unsettled.append(&mut self.earlier);
        self.unsettled.push(settled.clone());
        if let Some(w) = self.watch {
            w.unsettled(settled);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(mut pooled) = self.pooled.take() else {
            return;
        };
        pooled.idle_since = Instant::now();
        let unsettled = std::mem::take(&mut self.unsettled);
        if pooled.busy && !unsettled.is_empty() {
            // A statement was abandoned: settle the connection on its runtime (see the
            // `settle` module); it goes back clean only if its probe came back.
            let turn = self.turn.take();
            self.runtime.spawn(async move {
                // Held while the connection is (the pool's fair turn; see `turn`).
                let turn = turn;
                match drain(&pooled.conn, pooled.in_transaction).await {
                    Drained::Clean => {
                        pooled.busy = false;
                        pooled.in_transaction = false;
                        pooled.idle_since = Instant::now();
                        drop(pooled);
                    }
                    Drained::Unfit => drop(pooled),
                    Drained::Lost(gone) => {
                        // Discarded (still busy) before the wait, which may be long.
                        drop(pooled);
                        drop(turn);
                        gone.wait().await;
                    }
                }
                for s in unsettled {
                    s.fire();
                }
            });
            return;
        }
        if !pooled.in_transaction || pooled.conn.client.is_closed() {
            // Clean, or discarded by bb8 (busy or closed).
            return;
        }
        // Roll back on the connection's runtime, whichever thread drops us; the connection
        // returns to the pool only if that worked in time (a statement abandoned before it
        // finishes first). If that runtime has shut down, the task (and with it the
        // connection) is dropped there: the server ends the transaction with the connection.
        // (`Handle::spawn` needs no `enter()`, which could panic during thread teardown.)
        let limit = self.rollback_limit;
        let turn = self.turn.take();
        self.runtime.spawn(async move {
            let _turn = turn;
            let rollback = pooled.conn.client.batch_execute("ROLLBACK");
            if let Ok(Ok(())) = tokio::time::timeout(limit, rollback).await {
                pooled.busy = false;
                pooled.in_transaction = false;
                pooled.idle_since = Instant::now();
            }
            drop(pooled);
        });
    }
}
