//! Primary / replica selection: read routing, the lag monitor, failover and read-your-writes.
//!
//! Lag is measured two ways per replica, by one monitor task at the replica
//! `health_check_interval`:
//! - bytes: the primary's current WAL insert position minus the replica's replay position;
//! - time: how long ago the primary first passed the replica's replay position, from a short
//!   history of the primary's positions. A caught-up replica (zero bytes behind) has zero lag
//!   however long the primary has been idle: the `now() - pg_last_xact_replay_timestamp()`
//!   estimate is never used.
//!
//! Precision: the primary's position is sampled once per health interval, so the time lag is
//! a lower bound, exact to within one interval. A replica that stalls can stay in rotation for
//! up to one interval longer than `max_replication_lag_ms` says; pick a `health_check_interval`
//! at or below the lag threshold where that matters. The byte lag is exact at each check, and
//! read-your-writes does not depend on either estimate.
//!
//! The monitor also notes which server writes reach (`inet_server_addr()`); a change there is
//! a failover or switchover, counted and logged. A replica check that finds a primary (a
//! promoted replica, or a multi-host replica URL that reached the primary) takes that replica
//! out of rotation and, for a multi-host URL, reopens its connections, so that with
//! `target_session_attrs=read-only` they find whichever node is a standby now: a demoted
//! primary that rejoins as a standby serves reads again.
//!
//! A replica serves reads while its last check succeeded, it is still in recovery and its time
//! lag is within `max_replication_lag_ms`. Read-your-writes (see the `causal` module) further
//! asks, per read, that its replay position be at or past the reading session's floor: known
//! from the monitor, or learned in the read's own round trip.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::state::config::enhanced::PostgresReplicaConfig;
use crate::state::error::{sqlstate, ErrorKind, StateError, StateResult};
use crate::state::pool::conn_pool::ConnPool;

/// History of the primary's WAL positions kept for time-lag estimates.
const LSN_HISTORY: usize = 512;

/// One replica with what the monitor last saw of it.
pub(crate) struct Replica {
    pub pool: Arc<ConnPool>,
    /// `host:port`, never the URL (which may hold a password).
    pub name: String,
    /// Whether its URL names one server. A multi-host URL may reach a different server on
    /// every connection, so its cached replay position says nothing about the next one: reads
    /// needing a floor always check it in their own round trip.
    single_server: bool,
    /// Whether its URL names several hosts and asks for a read-only one
    /// (`target_session_attrs=read-only`): new connections then find the current standby.
    follows_standby: bool,
    healthy: AtomicBool,
    replay_lsn: AtomicU64,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    paused: AtomicBool,
    reads: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// A [`NodeRole`] as a number.
    role: AtomicU8,
    /// The server its last check reached (`address:port`).
    server: Mutex<Option<String>>,
}

/// SQL for the server a connection reached, `address:port` (`local:port` over a Unix socket).
macro_rules! server_sql {
    () => {
        "coalesce(host(inet_server_addr()), 'local') || ':' || current_setting('port')"
    };
}

/// What a configured replica URL reaches now, from its last check.
///
/// With a multi-host replica URL and `target_session_attrs=read-only`, the node behind it
/// changes with the roles: after a failover the URL reaches whichever node is a standby then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeRole {
    /// Not checked yet.
    Unknown,
    /// In recovery: a standby, which may serve reads.
    Standby,
    /// Not in recovery: a primary (promoted, or listed among the replicas), serving no reads.
    Primary,
    /// The last check could not reach it (or, with `read-only`, no host is a standby now).
    Unreachable,
}

impl NodeRole {
    fn from_u8(n: u8) -> Self {
        match n {
            1 => NodeRole::Standby,
            2 => NodeRole::Primary,
            3 => NodeRole::Unreachable,
            _ => NodeRole::Unknown,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            NodeRole::Unknown => 0,
            NodeRole::Standby => 1,
            NodeRole::Primary => 2,
            NodeRole::Unreachable => 3,
        }
    }
}

impl Replica {
    pub fn new(
        pool: Arc<ConnPool>,
        name: String,
        single_server: bool,
        follows_standby: bool,
    ) -> Self {
        Replica {
            pool,
            name,
            single_server,
            follows_standby,
            // Out of rotation until the first check says otherwise.
            healthy: AtomicBool::new(false),
            replay_lsn: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            last_error: Mutex::new(None),
            role: AtomicU8::new(NodeRole::Unknown.as_u8()),
            server: Mutex::new(None),
        }
    }

    /// Records what the last check found: the role, and the server when it answered. Logs a
    /// change of role (or of the server behind the URL).
    fn observed(&self, role: NodeRole, server: Option<String>) {
        let before = NodeRole::from_u8(self.role.swap(role.as_u8(), Relaxed));
        let moved = match (&server, self.server.lock()) {
            (Some(now), Ok(mut g)) => {
                let moved = g.as_ref().is_some_and(|was| was != now);
                *g = Some(now.clone());
                moved
            }
            _ => false,
        };
        // A standby found by the first check is announced by "joined the read rotation".
        let first_standby = before == NodeRole::Unknown && role == NodeRole::Standby;
        if (before != role && !first_standby) || moved {
            let server = server.as_deref().unwrap_or("-");
            match role {
                NodeRole::Primary => {
                    tracing::warn!(replica = %self.name, %server, "replica URL reaches a primary (promoted?): no reads go to it")
                }
                _ => {
                    tracing::info!(replica = %self.name, %server, role = ?role, "replica role changed")
                }
            }
        }
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    /// Takes the replica out of rotation at once (a read on it just failed).
    pub fn mark_down(&self, e: &StateError) {
        if self.healthy.swap(false, Relaxed) {
            tracing::warn!(replica = %self.name, error = %e, "replica left the read rotation");
        }
        self.set_error(Some(e.to_string()));
    }
}

/// Where a read goes.
pub(crate) enum ReadTarget<'a> {
    Primary,
    /// Replica `index`. With `verify`, its replay position is not known to reach the
    /// session's floor: the read must check it in the same round trip and go elsewhere if not.
    Replica {
        index: usize,
        replica: &'a Replica,
        verify: bool,
    },
}

/// The replica side of a backend: pools, health, lag and read routing.
pub(crate) struct Router {
    pub replicas: Vec<Replica>,
    settings: PostgresReplicaConfig,
    read_your_writes: bool,
    next: AtomicUsize,
    history: Mutex<VecDeque<(Instant, u64)>>,
    primary_reads: AtomicU64,
    failovers: AtomicU64,
    /// The server writes reached at the last check (`address:port`).
    primary_server: Mutex<Option<String>>,
    /// Changes of that server seen (failovers and switchovers).
    primary_changes: AtomicU64,
}

impl Router {
    pub fn new(
        replicas: Vec<Replica>,
        settings: PostgresReplicaConfig,
        read_your_writes: bool,
    ) -> Self {
        Router {
            replicas,
            settings,
            read_your_writes,
            next: AtomicUsize::new(0),
            history: Mutex::new(VecDeque::new()),
            primary_reads: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            primary_server: Mutex::new(None),
            primary_changes: AtomicU64::new(0),
        }
    }

    /// Whether writes need to record their WAL position.
    pub fn tracks_writes(&self) -> bool {
        self.read_your_writes && self.splits_reads()
    }

    /// Whether reads may go to replicas at all.
    pub fn splits_reads(&self) -> bool {
        self.settings.enable_read_splitting && !self.replicas.is_empty()
    }

    fn qualifies(&self, r: &Replica) -> bool {
        r.healthy.load(Relaxed) && r.lag_ms.load(Relaxed) <= self.settings.max_replication_lag_ms
    }

    /// Learns a replica's replay position from a read's round trip; whether it reaches `floor`.
    pub fn learned(&self, index: usize, replay: u64, floor: u64) -> bool {
        self.replicas[index].replay_lsn.fetch_max(replay, Relaxed);
        replay >= floor
    }

    /// Picks a node for a read that must see WAL position `floor`, skipping replicas in
    /// `tried`. Round-robin over qualifying replicas known to have replayed `floor`; failing
    /// that, over qualifying replicas to verify; the primary when none qualifies and failover
    /// is on.
    pub fn pick(
        &self,
        tried: &[usize],
        force_primary: bool,
        floor: u64,
    ) -> StateResult<ReadTarget<'_>> {
        if force_primary || !self.splits_reads() {
            self.primary_reads.fetch_add(1, Relaxed);
            return Ok(ReadTarget::Primary);
        }
        let candidates: Vec<usize> = (0..self.replicas.len())
            .filter(|i| !tried.contains(i) && self.qualifies(&self.replicas[*i]))
            .collect();
        let caught_up: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| {
                let r = &self.replicas[*i];
                floor == 0 || (r.single_server && r.replay_lsn.load(Relaxed) >= floor)
            })
            .collect();
        let (pool, verify) = if caught_up.is_empty() {
            (candidates, true)
        } else {
            (caught_up, false)
        };
        if !pool.is_empty() {
            let index = pool[self.next.fetch_add(1, Relaxed) % pool.len()];
            let replica = &self.replicas[index];
            replica.reads.fetch_add(1, Relaxed);
            return Ok(ReadTarget::Replica {
                index,
                replica,
                verify,
            });
        }
        if self.settings.enable_auto_failover {
            self.failovers.fetch_add(1, Relaxed);
            self.primary_reads.fetch_add(1, Relaxed);
            return Ok(ReadTarget::Primary);
        }
        Err(StateError::Connection {
            message: format!(
                "no replica can serve this read (healthy, within {} ms of lag{}) and auto-failover is off",
                self.settings.max_replication_lag_ms,
                if floor > 0 { ", replayed past this session's writes" } else { "" }
            ),
            sqlstate: None,
        })
    }

    /// Reads that went to a replica but found it failing count back: the read goes elsewhere.
    pub fn undo_read(&self, i: usize) {
        self.replicas[i].reads.fetch_sub(1, Relaxed);
    }

    /// One monitoring round: the primary's position, then every replica concurrently.
    pub async fn check(&self, primary: &ConnPool) {
        let now = Instant::now();
        let primary_lsn = match primary_position(primary).await {
            Ok((lsn, server)) => {
                self.observe_primary(server);
                if let Ok(mut h) = self.history.lock() {
                    if h.back().is_none_or(|(_, l)| *l != lsn) {
                        h.push_back((now, lsn));
                        if h.len() > LSN_HISTORY {
                            h.pop_front();
                        }
                    }
                }
                Some(lsn)
            }
            Err(e) => {
                tracing::warn!(error = %e, "lag monitor cannot read the primary's WAL position");
                None
            }
        };
        let timeout = self
            .settings
            .health_check_interval
            .max(Duration::from_secs(1));
        join_all(
            self.replicas
                .iter()
                .map(|r| self.check_replica(r, primary_lsn, timeout)),
        )
        .await;
    }

    async fn check_replica(&self, r: &Replica, primary_lsn: Option<u64>, timeout: Duration) {
        let probe = async {
            let mut conn = r.pool.get().await?;
            // If the timeout below cancels the query, the checkout discards the connection.
            let row = conn
                .run(|c| {
                    c.client.query_typed_one(
                        concat!(
                            "SELECT pg_is_in_recovery(), \
                             pg_wal_lsn_diff(coalesce(pg_last_wal_replay_lsn(), '0/0'), '0/0')::bigint, \
                             CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, ",
                            server_sql!()
                        ),
                        &[],
                    )
                })
                .await?;
            Ok::<_, StateError>((
                row.try_get::<_, bool>(0)?,
                row.try_get::<_, i64>(1)?,
                row.try_get::<_, bool>(2)?,
                row.try_get::<_, String>(3)?,
            ))
        };
        let result = match tokio::time::timeout(timeout, probe).await {
            Ok(r) => r,
            Err(_) => Err(StateError::Timeout(format!(
                "replica check took longer than {timeout:?}"
            ))),
        };
        match result {
            Ok((true, replay, paused, server)) => {
                r.observed(NodeRole::Standby, Some(server));
                let replay = u64::try_from(replay).unwrap_or(0);
                r.replay_lsn.fetch_max(replay, Relaxed);
                r.paused.store(paused, Relaxed);
                let (bytes, ms) = match primary_lsn {
                    Some(p) => (p.saturating_sub(replay), self.time_lag(replay)),
                    // Without the primary we cannot tell; keep the last figures.
                    None => (r.lag_bytes.load(Relaxed), r.lag_ms.load(Relaxed)),
                };
                r.lag_bytes.store(bytes, Relaxed);
                r.lag_ms.store(ms, Relaxed);
                r.set_error(None);
                if !r.healthy.swap(true, Relaxed) {
                    tracing::info!(replica = %r.name, lag_ms = ms, "replica joined the read rotation");
                }
            }
            Ok((false, _, _, server)) => {
                r.mark_down(&StateError::Connection {
                    message: format!(
                        "{} reached {server}, which is not in recovery (a primary): not used for reads",
                        r.name
                    ),
                    sqlstate: None,
                });
                r.observed(NodeRole::Primary, Some(server));
                if r.follows_standby {
                    // Let its next connections pick a host again: another may be a standby
                    // now, or soon (a demoted primary that rejoins).
                    r.pool.reopen();
                }
            }
            Err(e) => {
                r.mark_down(&e);
                r.observed(NodeRole::Unreachable, None);
            }
        }
    }

    /// How long ago the primary first wrote past `replay` (0 when nothing is outstanding).
    fn time_lag(&self, replay: u64) -> u64 {
        let Ok(h) = self.history.lock() else { return 0 };
        let Some(&(_, newest)) = h.back() else {
            return 0;
        };
        if replay >= newest {
            return 0;
        }
        // The oldest recorded position beyond `replay` was reached at or before that moment;
        // if even the oldest record is beyond it, the lag is at least that old.
        let since = h
            .iter()
            .find(|(_, lsn)| *lsn > replay)
            .map_or(Instant::now(), |(t, _)| *t);
        u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records the server that writes reach now; a change is a failover or switchover seen.
    fn observe_primary(&self, server: String) {
        let Ok(mut g) = self.primary_server.lock() else {
            return;
        };
        if let Some(was) = g.as_ref().filter(|was| **was != server) {
            let n = self.primary_changes.fetch_add(1, Relaxed) + 1;
            tracing::warn!(from = %was, to = %server, primary_changes = n, "the primary changed (failover or switchover): writes go to the new one");
        }
        *g = Some(server);
    }

    /// The server writes reached at the last check.
    pub fn primary_server(&self) -> Option<String> {
        self.primary_server.lock().ok().and_then(|g| g.clone())
    }

    /// Changes of primary seen.
    pub fn primary_changes(&self) -> u64 {
        self.primary_changes.load(Relaxed)
    }

    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .map(|r| ReplicaStatus {
                name: r.name.clone(),
                healthy: r.healthy.load(Relaxed),
                in_rotation: self.settings.enable_read_splitting && self.qualifies(r),
                lag_ms: r.lag_ms.load(Relaxed),
                lag_bytes: r.lag_bytes.load(Relaxed),
                replay_paused: r.paused.load(Relaxed),
                reads: r.reads.load(Relaxed),
                last_error: r.last_error.lock().ok().and_then(|g| g.clone()),
                role: NodeRole::from_u8(r.role.load(Relaxed)),
                server: r.server.lock().ok().and_then(|g| g.clone()),
            })
            .collect()
    }

    /// Counts `n` reads the primary served outside [`pick`](Self::pick) (coalesced gets).
    pub fn primary_read(&self, n: u64) {
        self.primary_reads.fetch_add(n, Relaxed);
    }

    pub fn primary_reads(&self) -> u64 {
        self.primary_reads.load(Relaxed)
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Relaxed)
    }
}

/// The primary's current WAL insert position, as a byte offset.
pub(crate) async fn current_lsn(primary: &ConnPool) -> StateResult<u64> {
    let mut conn = primary.get().await?;
    conn.run(|c| c.insert_lsn()).await
}

/// The primary's current WAL insert position and the server that gave it.
async fn primary_position(primary: &ConnPool) -> StateResult<(u64, String)> {
    let mut conn = primary.get().await?;
    conn.run(|c| async move {
        let lsn = c.insert_lsn().await?;
        let server: String = c
            .client
            .query_typed_one(concat!("SELECT ", server_sql!()), &[])
            .await?
            .try_get(0)?;
        Ok((lsn, server))
    })
    .await
}

/// Runs the monitor until the router is dropped.
pub(crate) fn spawn_monitor(
    router: Weak<Router>,
    primary: Weak<ConnPool>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (Some(router), Some(primary)) = (router.upgrade(), primary.upgrade()) else {
                return;
            };
            router.check(&primary).await;
        }
    })
}

/// What the router knows of one replica, from
/// [`check_replication_status`](crate::state::EnhancedPostgresBackend::check_replication_status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// `host:port` of the replica.
    pub name: String,
    /// Whether its last check succeeded (reachable and still a replica).
    pub healthy: bool,
    /// Whether it serves reads now (healthy and within the lag threshold; a read of a session
    /// that wrote also waits for the replica to replay that write).
    pub in_rotation: bool,
    /// Replication lag in milliseconds (0 when fully caught up); a lower bound exact to within
    /// one health interval.
    pub lag_ms: u64,
    /// Replication lag in bytes of WAL.
    pub lag_bytes: u64,
    /// Whether WAL replay is paused on it (`pg_wal_replay_pause()`).
    pub replay_paused: bool,
    /// Reads it has served for this backend.
    pub reads: u64,
    /// The last error its checks or reads met, if it is unhealthy.
    pub last_error: Option<String>,
    /// What its URL reached at the last check.
    pub role: NodeRole,
    /// The server its URL reached at the last check that got an answer (`address:port`):
    /// with a multi-host URL, which node that was.
    pub server: Option<String>,
}

/// Replication state, from
/// [`check_replication_status`](crate::state::EnhancedPostgresBackend::check_replication_status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// Whether the node the backend writes to is itself in recovery (a replica).
    pub is_replica: bool,
    /// The largest lag of any configured replica, in milliseconds (0 with no replicas).
    pub lag_ms: u64,
    /// The largest lag of any configured replica, in bytes.
    pub lag_bytes: u64,
    /// Streaming replicas connected to the primary (`pg_stat_replication`).
    pub connected_replicas: u32,
    /// Reads served by the primary.
    pub primary_reads: u64,
    /// Reads that fell back to the primary because no replica qualified.
    pub failovers_to_primary: u64,
    /// Each configured replica as the router sees it.
    pub replicas: Vec<ReplicaStatus>,
    /// The server writes go to (`address:port`), as last checked.
    pub primary: Option<String>,
    /// Changes of primary this backend has seen (failovers and switchovers), counted by the
    /// replica monitor (which runs with replicas or a multi-host URL) and by this call.
    pub primary_changes: u64,
}

/// Whether a failed replica read says the replica cannot serve (it leaves the rotation and
/// the read runs elsewhere), may run elsewhere (a recovery conflict: the replica is fine),
/// or is the caller's result (a statement timeout, a bad query, an acquire timeout: returned
/// once, the replica stays).
pub(crate) enum ReplicaFailure {
    Down,
    Conflict,
    Caller,
}

pub(crate) fn replica_failure(e: &StateError) -> ReplicaFailure {
    if e.sqlstate() == Some(sqlstate::SERIALIZATION_FAILURE) {
        ReplicaFailure::Conflict
    } else if e.kind() == ErrorKind::Connection {
        ReplicaFailure::Down
    } else {
        ReplicaFailure::Caller
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
