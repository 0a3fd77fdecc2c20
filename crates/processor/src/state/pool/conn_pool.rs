//! The connection pool: bb8 with our connection manager and checkout type (the `checkout`
//! module), first-come-first-served turns, test on acquire, a background health check, and
//! statistics.
//!
//! Session state is never left behind: operations change no session settings, and
//! transactions always end before the connection returns. With `test_on_acquire` a
//! connection that sat idle in the pool for more than [`TEST_AFTER_IDLE`] is probed (one
//! round trip, an empty query) before it is handed out; one in steady use is not (its last
//! operation just proved it, and a closed connection is never handed out either way).
//!
//! Point operations share checked-out connections through the `pipeline` module's lanes
//! ([`ConnPool::point`]); everything else takes a checkout of its own ([`ConnPool::get`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bb8::{ErrorSink, Pool, PooledConnection, RunError};

use crate::state::config::enhanced::PostgresPoolConfig;
use crate::state::error::{StateError, StateResult};
use crate::state::pool::checkout::{Checkout, ConnectFailures, Manager, Pooled};
use crate::state::pool::pipeline::{Joined, Lanes, Point, LINGER};
use crate::state::pool::turns::{Turn, Turns};
use crate::state::schema::names::TableNames;
use crate::state::wire::connection::Connector;

/// With `test_on_acquire`, a connection idle in the pool for longer than this is probed
/// before it is handed out.
pub(crate) const TEST_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Keeps the last background connection error, so an acquire timeout can say why.
#[derive(Debug, Clone, Default)]
struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

impl ErrorSink<StateError> for LastError {
    fn sink(&self, error: StateError) {
        tracing::warn!(error = %error, "background connection attempt failed");
        if let Ok(mut g) = self.0.lock() {
            *g = Some(error.to_string());
        }
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<StateError>> {
        Box::new(self.clone())
    }
}

/// How an operation uses its connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// One autocommit statement (or a few, each on its own): on a lane shared with other
    /// point operations, pipelined (see the module notes).
    Point,
    /// Anything else (a transaction, COPY, a scan): a connection of its own.
    Own,
}

/// Pool usage figures, from [`EnhancedPostgresBackend::get_pool_stats`](crate::state::EnhancedPostgresBackend::get_pool_stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections (idle and in use).
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Connections in use.
    pub active: u32,
    /// The configured maximum.
    pub max_size: u32,
    /// The configured minimum kept open.
    pub min_idle: u32,
    /// Acquires that had to wait for a connection.
    pub waits: u64,
    /// Acquires that gave up after `acquire_timeout`.
    pub timeouts: u64,
    /// Total time acquires spent waiting, in milliseconds.
    pub wait_time_ms: u64,
    /// Connections opened since the pool started.
    pub connections_created: u64,
    /// Connections discarded because they were closed or left in an unknown state, or were
    /// reopened (a replica URL found to reach a primary).
    pub connections_closed_broken: u64,
    /// Connections discarded because a health probe failed.
    pub connections_closed_invalid: u64,
    /// Connections closed for reaching `max_lifetime`.
    pub connections_closed_max_lifetime: u64,
    /// Connections closed for idling past `idle_timeout`.
    pub connections_closed_idle_timeout: u64,
    /// Connections in use as lanes now: shared, pipelined, by point operations (counted in
    /// `active`).
    pub lanes: u32,
    /// Point operations running on lanes now.
    pub lane_users: u32,
    /// Checkouts waiting for a connection now.
    pub waiting: u32,
}

/// The pool with its settings and background health task.
pub(crate) struct ConnPool {
    pool: Pool<Manager>,
    acquire_timeout: Duration,
    rollback_limit: Duration,
    last_error: LastError,
    failures: Arc<ConnectFailures>,
    target: String,
    health_task: tokio::task::JoinHandle<()>,
    /// For connections outside the pool's rotation (VACUUM).
    connector: Connector,
    /// One turn per connection, handed out first come, first served (see [`ConnPool::get`]).
    turns: Turns,
    /// Probe connections idle for longer than [`TEST_AFTER_IDLE`] before handing them out.
    test_on_acquire: bool,
    /// Connections shared by point operations.
    lanes: Lanes,
    /// Gives back the connections of lanes that lingered without users.
    lane_task: tokio::task::JoinHandle<()>,
    /// See [`reopen`](Self::reopen).
    generation: Arc<AtomicU64>,
}

/// bb8's settings for `cfg`, errors reported into `last_error`.
fn pool_builder(cfg: &PostgresPoolConfig, last_error: &LastError) -> bb8::Builder<Manager> {
    // The reaper enforces idle_timeout and max_lifetime; run it often enough for both.
    let mut reaper = Duration::from_secs(30);
    for limit in [cfg.idle_timeout, cfg.max_lifetime].into_iter().flatten() {
        reaper = reaper.min((limit / 2).max(Duration::from_millis(100)));
    }
    Pool::builder()
        .max_size(cfg.max_connections)
        .min_idle(Some(cfg.min_connections))
        .connection_timeout(cfg.acquire_timeout)
        .idle_timeout(cfg.idle_timeout)
        .max_lifetime(cfg.max_lifetime)
        // Our own, cheaper test on acquire: see `get_pooled`.
        .test_on_check_out(false)
        .reaper_rate(reaper)
        .error_sink(Box::new(last_error.clone()))
}

impl ConnPool {
    pub async fn new(
        connector: Connector,
        names: TableNames,
        cfg: &PostgresPoolConfig,
        lazy: bool,
        rollback_limit: Duration,
    ) -> StateResult<Arc<Self>> {
        let last_error = LastError::default();
        let target = connector.target.clone();
        let builder = pool_builder(cfg, &last_error);
        let failures = Arc::new(ConnectFailures::default());
        let generation = Arc::new(AtomicU64::new(0));
        let unpooled = connector.clone();
        let manager = Manager {
            connector,
            names,
            failures: failures.clone(),
            generation: generation.clone(),
        };
        // A lazy pool (replicas) opens its connections in the background, so an unreachable
        // server does not fail `new()`; the primary's pool fails fast instead.
        let pool = if lazy {
            builder.build_unchecked(manager)
        } else {
            builder.build(manager).await?
        };
        let interval = cfg.health_check_interval;
        let this = Arc::new_cyclic(|weak: &Weak<ConnPool>| {
            let lanes = weak.clone();
            let lane_task = tokio::spawn(async move {
                let mut ticker = tokio::time::interval(LINGER);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let Some(pool) = lanes.upgrade() else { return };
                    pool.lanes.release_idle(LINGER);
                }
            });
            let weak = weak.clone();
            let health_task = tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.check_idle().await;
                }
            });
            ConnPool {
                pool,
                acquire_timeout: cfg.acquire_timeout,
                rollback_limit,
                last_error,
                failures,
                target,
                health_task,
                connector: unpooled,
                turns: Turns::new(cfg.max_connections as usize),
                test_on_acquire: cfg.test_on_acquire,
                lanes: Lanes::new(cfg.max_lifetime),
                lane_task,
                generation,
            }
        });
        Ok(this)
    }

    /// Makes every connection open now be closed instead of reused: ones in use when they
    /// come back (lanes take no new users), idle ones when next taken or probed by the
    /// health check. New connections choose their server again, which matters for a
    /// multi-host URL whose hosts changed roles (a replica URL with
    /// `target_session_attrs=read-only` that reached a node since promoted).
    pub fn reopen(&self) {
        self.generation.fetch_add(1, Relaxed);
        self.lanes.retire_all();
    }

    /// Whether its connections go through PgBouncer's transaction pooling.
    pub fn transaction_pooling(&self) -> bool {
        self.connector.transaction_pooling
    }

    /// A connection of its own, outside the pool's rotation (for statements such as VACUUM
    /// that must not tie up a pooled connection); closed when dropped.
    pub async fn connect_unpooled(&self) -> StateResult<tokio_postgres::Client> {
        self.connector.connect().await
    }

    /// Checks out a connection, or fails with [`StateError::Timeout`] after `acquire_timeout`
    /// (naming the last connection error, if connecting is what failed).
    ///
    /// Callers are served in the order they asked (see the `turns` module).
    pub async fn get(&self) -> StateResult<Checkout> {
        let mut turn = self.turns.try_take();
        if turn.is_none() && self.lanes.yield_one() {
            // A lingering lane gave its connection back (to us, unless others wait first).
            turn = self.turns.try_take();
        }
        let turn = match turn {
            Some(turn) => turn,
            None => match self.turns.take(self.acquire_timeout).await {
                Some(turn) => turn,
                None => return Err(self.acquire_timed_out()),
            },
        };
        self.with_turn(turn).await
    }

    async fn with_turn(&self, turn: Turn) -> StateResult<Checkout> {
        // Boxed: bb8's checkout and the connection it yields are about 6 KiB of future, which
        // would otherwise be room in every operation's future (a point read's included, which
        // checks out only to open a lane) and be copied with it.
        let mut checkout = self.checkout(Box::pin(self.get_pooled()).await?);
        checkout.turn = Some(turn);
        Ok(checkout)
    }

    /// A connection for an operation of kind `how`.
    pub async fn connection(&self, how: Use) -> StateResult<Point> {
        match how {
            Use::Point => self.point().await,
            Use::Own => Ok(Point::Own(Box::new(self.get().await?))),
        }
    }

    /// A connection for a point operation (one autocommit statement): a lane shared with
    /// other point operations, pipelined (see the `pipeline` module), or, behind PgBouncer's
    /// transaction pooling, a checkout of its own.
    pub async fn point(&self) -> StateResult<Point> {
        if self.transaction_pooling() {
            return Ok(Point::Own(Box::new(self.get().await?)));
        }
        let waiters = self.turns.waiting() > 0;
        let free_now = self.turns.free_now();
        if let Joined::Lane(lane) = self.lanes.join(free_now, waiters) {
            return Ok(Point::Lane(lane));
        }
        let checkout = match self.turns.try_take() {
            Some(turn) => self.with_turn(turn).await?,
            // Taken meanwhile: join a lane after all, if there is one.
            None => match self.lanes.join(false, false) {
                Joined::Lane(lane) => return Ok(Point::Lane(lane)),
                Joined::TakeOwn => self.get().await?,
            },
        };
        Ok(Point::Lane(self.lanes.add(checkout)))
    }

    fn acquire_timed_out(&self) -> StateError {
        let why = match self.last_error.take() {
            Some(e) => format!("; last connection error: {e}"),
            None => String::new(),
        };
        StateError::Timeout(format!(
            "no connection to {} available within {:?} (pool of {}){why}",
            self.target,
            self.acquire_timeout,
            self.pool.state().connections
        ))
    }

    fn checkout(&self, pooled: PooledConnection<'static, Manager>) -> Checkout {
        Checkout {
            pooled: Some(pooled),
            runtime: tokio::runtime::Handle::current(),
            rollback_limit: self.rollback_limit,
            turn: None,
            unsettled: Vec::new(),
        }
    }

    async fn get_pooled(&self) -> StateResult<PooledConnection<'static, Manager>> {
        // The server may have closed a connection while it sat idle (terminated backend,
        // restart): bb8 discards it when it comes back, and we take another. Every attempt is
        // bounded by the acquire timeout, and there are at most max_size + 1 of them.
        // With `test_on_acquire`, one idle for a while is probed first, and discarded (with
        // another taken) if the probe fails.
        let mut attempts = self.pool.state().connections + 1;
        let result = loop {
            attempts = attempts.saturating_sub(1);
            match self.get_or_fail_fast().await? {
                // bb8 discards a stale one when it goes back (`Manager::has_broken`).
                Ok(pooled)
                    if (pooled.conn.client.is_closed() || self.pool_stale(&pooled))
                        && attempts > 0 =>
                {
                    continue
                }
                Ok(mut pooled)
                    if self.test_on_acquire
                        && pooled.idle_since.elapsed() > TEST_AFTER_IDLE
                        && attempts > 0 =>
                {
                    // Busy while the probe runs: a probe cut short or failed leaves the
                    // connection discarded.
                    pooled.busy = true;
                    let probe = tokio::time::timeout(self.acquire_timeout, pooled.conn.probe());
                    match probe.await.unwrap_or_else(|_| {
                        Err(StateError::Timeout(
                            "the test-on-acquire probe got no answer".into(),
                        ))
                    }) {
                        Ok(()) => {
                            pooled.busy = false;
                            break Ok(pooled);
                        }
                        Err(e) => {
                            tracing::info!(target = %self.target, error = %e, "test on acquire discarded a connection");
                            continue;
                        }
                    }
                }
                other => break other,
            }
        };
        match result {
            Ok(conn) => Ok(conn),
            Err(RunError::User(e)) => Err(e),
            Err(RunError::TimedOut) => Err(self.acquire_timed_out()),
        }
    }

    fn pool_stale(&self, pooled: &Pooled) -> bool {
        pooled.generation < self.generation.load(Relaxed)
    }

    /// bb8's acquire, cut short with a connection error when opening a connection fails while
    /// the pool has none: then nothing can come back to it before the server does.
    async fn get_or_fail_fast(
        &self,
    ) -> StateResult<Result<PooledConnection<'static, Manager>, RunError<StateError>>> {
        let get = self.pool.get_owned();
        tokio::pin!(get);
        loop {
            let failed = self.failures.notify.notified();
            tokio::select! {
                r = &mut get => return Ok(r),
                () = failed => {
                    if self.pool.state().connections == 0 {
                        let why = self
                            .failures
                            .last
                            .lock()
                            .ok()
                            .and_then(|g| g.clone())
                            .unwrap_or_else(|| "connection failed".into());
                        return Err(StateError::Connection {
                            message: format!("no connection to {} can be opened: {why}", self.target),
                            sqlstate: None,
                        });
                    }
                }
            }
        }
    }

    /// Probes the idle connections; the ones that fail are discarded (and replaced up to
    /// `min_connections` by bb8).
    ///
    /// The sweep runs only while no connection is checked out: connections in use prove
    /// themselves, and sweeping a busy pool would compete with (and show up in the wait
    /// statistics of) real operations.
    async fn check_idle(&self) {
        let state = self.pool.state();
        if state.connections != state.idle_connections {
            return;
        }
        // One connection at a time, each probe bounded, each returned at once: the sweep never
        // holds more than one connection or waits on a dead socket.
        let probe_limit = Duration::from_secs(2);
        for _ in 0..state.idle_connections {
            // bb8's own checkout: it hands out a connection that closed while idle (`get`
            // skips those), so the probe finds and discards it.
            let mut conn = match tokio::time::timeout(probe_limit, self.pool.get_owned()).await {
                Ok(Ok(pooled)) => self.checkout(pooled),
                _ => break,
            };
            match tokio::time::timeout(probe_limit, conn.run(|c| c.probe())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(target = %self.target, error = %e, "health check discarded a connection");
                }
                Err(_) => {
                    // Still busy with the probe, so it is discarded.
                    tracing::info!(target = %self.target, "health check timed out; connection discarded");
                }
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.pool.state();
        let s = &state.statistics;
        let config = self.pool.config();
        let (lanes, lane_users) = self.lanes.load();
        let (turn_waits, turn_timeouts, turn_wait_ms) = self.turns.waits();
        PoolStats {
            lanes: u32::try_from(lanes).unwrap_or(u32::MAX),
            lane_users: u32::try_from(lane_users).unwrap_or(u32::MAX),
            waiting: u32::try_from(self.turns.waiting()).unwrap_or(u32::MAX),
            size: state.connections,
            idle: state.idle_connections,
            active: state.connections.saturating_sub(state.idle_connections),
            max_size: config.max_size,
            min_idle: config.min_idle.unwrap_or(0),
            waits: s.get_waited + turn_waits,
            timeouts: s.get_timed_out + turn_timeouts,
            wait_time_ms: u64::try_from(s.get_wait_time.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(turn_wait_ms),
            connections_created: s.connections_created,
            connections_closed_broken: s.connections_closed_broken,
            connections_closed_invalid: s.connections_closed_invalid,
            connections_closed_max_lifetime: s.connections_closed_max_lifetime,
            connections_closed_idle_timeout: s.connections_closed_idle_timeout,
        }
    }
}

impl Drop for ConnPool {
    fn drop(&mut self) {
        // abort() only flags the task; it is safe outside a runtime.
        self.health_task.abort();
        self.lane_task.abort();
    }
}
