//! Shared, pipelined connections for single-statement operations ("lanes").
//!
//! tokio-postgres pipelines the requests of every task using one `Client`: their statements
//! go out back to back and the replies come back in order, so many calls share one round
//! trip's wait and one server process's wake-up. A point operation (a get, a put, a delete,
//! a versioned write: one autocommit statement) therefore does not need a connection of its
//! own. It joins a *lane*: a connection checked out of the pool and shared by every point
//! operation that joins it.
//!
//! - A point operation takes a connection of its own (as a new lane) while the pool has one
//!   free at once, and joins the least-loaded lane when it has none: so the server's
//!   processes all work before any statement queues behind another, and past that the
//!   queueing happens on the client, pipelined, instead of in the pool's wait.
//! - A lane whose last user left lingers for [`LINGER`], so that a task calling again at once
//!   (the common case: one task in a loop) finds it; then its connection goes back to the
//!   pool. A lane older than the pool's `max_lifetime` takes no new users.
//! - Transactions, COPY, scans and everything else that needs a connection to itself keep
//!   taking exclusive checkouts (so a scan never stalls point reads behind it). When one of
//!   them must wait for a connection, a lingering lane gives its connection back at once, or
//!   else a busy lane is retired: it takes no new users and its connection goes back (to the
//!   first waiter, the pool being first come, first served) once its users are done.
//! - Cancellation is safe: the driver finishes every exchange it started whether or not its
//!   caller still waits, so a dropped call never leaves a shared connection mid-protocol.
//!   But the server still runs a statement whose call was dropped (or cut off by the
//!   operation timeout), so its lane is retired (no new users) and *settled* (see the
//!   `settle` module): a probe sent behind the statement, cancel requests while it waits, and
//!   the abandoned writes held in their sessions until the probe is back. A lane whose probe
//!   came back returns its connection to the pool clean; otherwise it is discarded.
//! - A closed connection's lane takes no new users; its connection is discarded.
//! - The cost: a statement that waits on the server (for a row lock another transaction
//!   holds) delays the statements pipelined behind it on its lane until it proceeds, bounded
//!   by the operation timeout (and `with_statement_timeout`). The least-loaded choice steers
//!   new operations away from a lane with calls in flight, which limits this to the calls
//!   that joined it while it waited.
//!
//! Behind PgBouncer's transaction pooling there are no lanes: every operation takes an
//! exclusive checkout (the pooler assigns a server connection per transaction, and
//! pipelining across its transactions is not something every version handles).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::state::pool::checkout::Checkout;
use crate::state::pool::settle::{drain, Drained, Settled, Watch};
use crate::state::wire::connection::PgConn;

/// How long a lane with no users keeps its connection.
pub(crate) const LINGER: Duration = Duration::from_millis(100);

/// One shared connection and its users.
struct Lane {
    checkout: Checkout,
    /// When the lane began; it is retired past the pool's `max_lifetime`.
    born: Instant,
    /// Changed only under the lanes' lock.
    users: AtomicUsize,
    /// When its last user left (under the lanes' lock).
    idle_since: Mutex<Instant>,
    /// Takes no new users.
    retired: AtomicBool,
    /// Settling found the connection unfit (closed, or its probe failed): discard it when
    /// the lane ends.
    poisoned: AtomicBool,
    /// Abandoned statements and the settling under way (see [`Lane::abandon`]).
    settling: Mutex<Settling>,
}

/// The settling of a lane's abandoned statements.
#[derive(Default)]
struct Settling {
    /// Statements abandoned so far.
    abandoned: u64,
    /// Fires when the statements abandoned so far are settled; `None` or fired when no
    /// settling is under way.
    current: Option<Arc<Settled>>,
}

impl Lane {
    /// Records a statement abandoned on this lane (dropped, or failed with its connection)
    /// and returns what fires once it is settled: the lane takes no new users, and a task
    /// (started if none is running) probes its connection until everything sent so far is
    /// done.
    fn abandon(self: &Arc<Self>) -> Arc<Settled> {
        self.retired.store(true, Relaxed);
        let mut s = self.settling.lock().unwrap_or_else(|e| e.into_inner());
        s.abandoned += 1;
        if let Some(current) = &s.current {
            if !current.is_done() {
                return current.clone();
            }
        }
        let settled = Settled::new();
        s.current = Some(settled.clone());
        drop(s);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.clone().settle(settled.clone()));
            }
            // No runtime: the connection's I/O task is gone with it; nothing more is sent.
            Err(_) => {
                self.poisoned.store(true, Relaxed);
                settled.fire();
            }
        }
        settled
    }

    /// Probes the connection until no statement was abandoned since the last probe was sent,
    /// then fires `settled`.
    async fn settle(self: Arc<Self>, settled: Arc<Settled>) {
        loop {
            let seen = self.abandoned();
            match drain(self.checkout.conn(), false).await {
                Drained::Clean if self.abandoned() == seen => break,
                Drained::Clean => {}
                Drained::Unfit => {
                    self.poisoned.store(true, Relaxed);
                    break;
                }
                Drained::Lost(gone) => {
                    // The lane lets its connection go (discarded) before the wait, which
                    // may be long, once its last user leaves.
                    self.poisoned.store(true, Relaxed);
                    drop(self);
                    gone.wait().await;
                    break;
                }
            }
        }
        settled.fire();
    }

    fn abandoned(&self) -> u64 {
        self.settling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abandoned
    }
}

impl Lane {
    fn open(&self) -> bool {
        !self.retired.load(Relaxed) && !self.checkout.is_closed()
    }

    fn idle(&self) -> bool {
        self.users.load(Relaxed) == 0
    }

    fn idle_for(&self) -> Duration {
        self.idle_since
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if self.poisoned.load(Relaxed) {
            self.checkout.discard();
        }
    }
}

/// The lanes of one pool.
pub(crate) struct Lanes {
    slots: Arc<Mutex<Vec<Arc<Lane>>>>,
    /// The pool's `max_lifetime`.
    lifetime: Option<Duration>,
}

/// What [`Lanes::join`] found.
pub(crate) enum Joined {
    /// Joined the least-loaded lane.
    Lane(LaneUse),
    /// Take a connection: none is shared yet, or the pool has one free now.
    TakeOwn,
}

impl Lanes {
    pub fn new(lifetime: Option<Duration>) -> Self {
        Lanes {
            slots: Arc::default(),
            lifetime,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Lane>>> {
        lock(&self.slots)
    }

    /// Ends the lanes without users that are closed, retired, or idle for at least `linger`
    /// (all idle ones with `Duration::ZERO`); returns how many. Their connections go back to
    /// the pool (or are discarded) once the lock is released.
    pub fn release_idle(&self, linger: Duration) -> usize {
        let ended: Vec<Arc<Lane>> = {
            let mut slots = self.lock();
            let (ended, kept) = std::mem::take(&mut *slots)
                .into_iter()
                .partition(|l| l.idle() && (!l.open() || l.idle_for() >= linger));
            *slots = kept;
            ended
        };
        ended.len()
    }

    /// Retires every lane (they take no new users; each ends when its users are done) and
    /// ends the idle ones now: for [`ConnPool::reopen`](crate::state::pool::conn_pool::ConnPool::reopen).
    pub fn retire_all(&self) {
        let ended: Vec<Arc<Lane>> = {
            let mut slots = self.lock();
            for lane in slots.iter() {
                lane.retired.store(true, Relaxed);
            }
            let (ended, kept) = std::mem::take(&mut *slots)
                .into_iter()
                .partition(|l| l.idle());
            *slots = kept;
            ended
        };
        drop(ended);
    }

    /// Makes room for an exclusive checkout that would have to wait: ends one lane without
    /// users if there is one (true), else retires the least-loaded lane (unless one is
    /// retiring already), whose connection goes back once its users are done.
    pub fn yield_one(&self) -> bool {
        let ended = make_room(&mut self.lock());
        ended.is_some()
    }

    /// Joins the least-loaded open lane, unless `free_now` (the pool has a connection to
    /// spare at once) or there is none. With `waiters` (exclusive checkouts waiting for a
    /// connection) and no lane retiring yet, first retires the least-loaded lane so its
    /// connection goes to them.
    pub fn join(&self, free_now: bool, waiters: bool) -> Joined {
        let mut slots = self.lock();
        if let Some(limit) = self.lifetime {
            for lane in slots.iter().filter(|l| l.born.elapsed() >= limit) {
                lane.retired.store(true, Relaxed);
            }
        }
        // Ended after the lock is released (its connection goes back to the pool).
        let _ended = if waiters { make_room(&mut slots) } else { None };
        match least_loaded(&slots) {
            // A lingering lane serves at once, whatever the pool has free.
            Some(lane) if !free_now || lane.idle() => {
                lane.users.fetch_add(1, Relaxed);
                let lane = lane.clone();
                drop(slots);
                Joined::Lane(self.user(lane))
            }
            _ => Joined::TakeOwn,
        }
    }

    /// Makes `checkout` a lane, with its first user.
    pub fn add(&self, checkout: Checkout) -> LaneUse {
        let lane = Arc::new(Lane {
            checkout,
            born: Instant::now(),
            users: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            retired: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            settling: Mutex::default(),
        });
        self.lock().push(lane.clone());
        self.user(lane)
    }

    fn user(&self, lane: Arc<Lane>) -> LaneUse {
        LaneUse {
            lane: Some(lane),
            slots: self.slots.clone(),
        }
    }

    /// Lanes and their users (for tests and statistics).
    pub fn load(&self) -> (usize, usize) {
        let slots = self.lock();
        (
            slots.len(),
            slots.iter().map(|l| l.users.load(Relaxed)).sum(),
        )
    }
}

fn lock(slots: &Mutex<Vec<Arc<Lane>>>) -> MutexGuard<'_, Vec<Arc<Lane>>> {
    // A panic while the lock was held cannot leave the list inconsistent (each change is one
    // push, removal or replacement).
    slots.lock().unwrap_or_else(|e| e.into_inner())
}

fn least_loaded(slots: &[Arc<Lane>]) -> Option<&Arc<Lane>> {
    slots
        .iter()
        .filter(|l| l.open())
        .min_by_key(|l| l.users.load(Relaxed))
}

/// Makes a connection go back to the pool: removes a lane without users (returned, for the
/// caller to drop after releasing the lock), or else retires the least-loaded open lane
/// (unless one is retiring already), which ends when its users are done.
fn make_room(slots: &mut Vec<Arc<Lane>>) -> Option<Arc<Lane>> {
    if let Some(i) = slots.iter().position(|l| l.idle()) {
        return Some(slots.swap_remove(i));
    }
    if !slots.iter().any(|l| l.retired.load(Relaxed)) {
        if let Some(lane) = least_loaded(slots) {
            lane.retired.store(true, Relaxed);
        }
    }
    None
}

/// One operation's use of a lane. When the last user leaves, the lane lingers (see
/// [`LINGER`]), or ends at once if it is retired or closed.
pub(crate) struct LaneUse {
    /// `None` only during drop.
    lane: Option<Arc<Lane>>,
    slots: Arc<Mutex<Vec<Arc<Lane>>>>,
}

impl LaneUse {
    fn lane(&self) -> &Arc<Lane> {
        match &self.lane {
            Some(l) => l,
            None => unreachable!("a live lane use holds its lane"),
        }
    }

    /// Runs one operation on the lane's connection. If its future is dropped before it
    /// completes, the lane is retired and settled (see the module notes), and `watch` (a
    /// write's) holds the write until then.
    pub async fn run<'s, T, E, F, Fut>(
        &'s mut self,
        watch: Option<&Watch<'_>>,
        op: F,
    ) -> Result<T, E>
    where
        F: FnOnce(&'s PgConn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let lane: &'s Arc<Lane> = self.lane();
        let mut guard = LaneFlight {
            lane,
            watch,
            done: false,
        };
        if let Some(w) = watch {
            w.sent();
        }
        let result = op(lane.checkout.conn()).await;
        guard.done = true;
        result
    }

    /// The connection failed while a statement watched by `watch` ran: the write is held
    /// until the connection's server process is gone.
    pub fn lost(&self, watch: &Watch<'_>) {
        if let Some(lane) = &self.lane {
            watch.unsettled(lane.abandon());
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.lane().checkout.is_closed()
    }
}

/// A statement under way on a lane; dropped before it completes, it abandons it.
struct LaneFlight<'a, 'w> {
    lane: &'a Arc<Lane>,
    watch: Option<&'a Watch<'w>>,
    done: bool,
}

impl Drop for LaneFlight<'_, '_> {
    fn drop(&mut self) {
        if !self.done {
            let settled = self.lane.abandon();
            if let Some(w) = self.watch {
                w.unsettled(settled);
            }
        }
    }
}

impl Drop for LaneUse {
    fn drop(&mut self) {
        let Some(lane) = self.lane.take() else { return };
        let mut slots = lock(&self.slots);
        if lane.users.fetch_sub(1, Relaxed) == 1 {
            if lane.open() {
                if let Ok(mut t) = lane.idle_since.lock() {
                    *t = Instant::now();
                }
            } else {
                slots.retain(|l| !Arc::ptr_eq(l, &lane));
            }
        }
        drop(slots);
        // The last reference, if the lane ended: its connection goes back (or is discarded).
        drop(lane);
    }
}

/// The connection of a point operation: a lane, or (behind PgBouncer's transaction pooling)
/// an exclusive checkout.
pub(crate) enum Point {
    Lane(LaneUse),
    Own(Box<Checkout>),
}

impl Point {
    /// Runs one operation on the connection (see [`LaneUse::run`] and [`Checkout::run`] for
    /// what a dropped future does to it).
    pub async fn run<'s, T, E, F, Fut>(&'s mut self, op: F) -> Result<T, E>
    where
        F: FnOnce(&'s PgConn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_watched(None, op).await
    }

    /// [`run`](Self::run) for a write, which `watch` follows (see
    /// [`Checkout::run_watched`]).
    pub async fn run_watched<'s, T, E, F, Fut>(
        &'s mut self,
        watch: Option<&Watch<'_>>,
        op: F,
    ) -> Result<T, E>
    where
        F: FnOnce(&'s PgConn) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self {
            Point::Lane(lane) => lane.run(watch, op).await,
            Point::Own(own) => own.run_watched(watch, |c| op(c)).await,
        }
    }

    /// The connection failed while a statement watched by `watch` ran (see
    /// [`Checkout::lost`]).
    pub fn lost(&mut self, watch: &Watch<'_>) {
        match self {
            Point::Lane(lane) => lane.lost(watch),
            Point::Own(own) => own.lost(watch),
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        match self {
            Point::Lane(lane) => lane.is_closed(),
            Point::Own(own) => own.is_closed(),
        }
    }
}
