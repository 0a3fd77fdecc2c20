//! The figures of the backend's nodes (primary and replicas: pools, connections, reads, lag),
//! for [`Core::stats`](super::Core::stats) and, once a second, for the
//! `metrics` facade (see the `published` module for the operation counters, which are
//! published as they happen).
//!
//! Each round sets every series to the total over the backends of the process (counters with
//! `absolute`, gauges with `set`), so several backends add up, a recorder installed late still
//! gets every value, and series are refreshed each second; a backend that is dropped takes its
//! gauges back out and leaves what its counters counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::Core;
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::PoolStats;
use crate::state::stats::counters::NodeReads;

/// How often the node figures are published.
pub(super) const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// One node's figures.
pub(super) struct NodeFigures {
    /// `primary`, or the replica's name (`host:port`).
    pub node: String,
    pub primary: bool,
    pub pool: PoolStats,
    pub reads: u64,
    /// Lag in bytes and milliseconds, health and rotation (replicas only).
    pub replica: Option<(u64, u64, bool, bool)>,
}

/// The primary's and every replica's figures, in that order.
pub(super) fn nodes(store: &Store) -> Vec<NodeFigures> {
    let mut all = vec![NodeFigures {
        node: "primary".to_string(),
        primary: true,
        pool: store.ctx.primary.stats(),
        reads: store.router.primary_reads(),
        replica: None,
    }];
    for (replica, status) in store.router.replicas.iter().zip(store.router.status()) {
        all.push(NodeFigures {
            node: status.name,
            primary: false,
            pool: replica.pool.stats(),
            reads: status.reads,
            replica: Some((
                status.lag_bytes,
                status.lag_ms,
                status.healthy,
                status.in_rotation,
            )),
        });
    }
    all
}

/// Connections created, closed (idle timeout, lifetime) and broken (closed or failed a probe)
/// over all `nodes`, and the reads each served.
pub(super) fn connections_and_reads(nodes: &[NodeFigures]) -> (u64, u64, u64, Vec<NodeReads>) {
    let mut created = 0;
    let mut closed = 0;
    let mut broken = 0;
    let mut reads = Vec::with_capacity(nodes.len());
    for n in nodes {
        created += n.pool.connections_created;
        closed += n.pool.connections_closed_idle_timeout + n.pool.connections_closed_max_lifetime;
        broken += n.pool.connections_closed_broken + n.pool.connections_closed_invalid;
        reads.push(NodeReads {
            node: n.node.clone(),
            primary: n.primary,
            reads: n.reads,
        });
    }
    (created, closed, broken, reads)
}

type Labels = Vec<(&'static str, String)>;

/// One published series: each live backend's share, and what dropped backends counted.
struct Series {
    name: &'static str,
    labels: Labels,
    counter: bool,
    shares: HashMap<u64, f64>,
    retired: f64,
}

impl Series {
    fn total(&self) -> f64 {
        self.retired + self.shares.values().sum::<f64>()
    }

    /// Sets the series to the total of every backend of the process (so a recorder installed
    /// late, or one that drops series not updated for a while, still has every value).
    fn emit(&self) {
        let total = self.total();
        if self.counter {
            metrics::counter!(self.name, &self.labels).absolute(total as u64);
        } else {
            metrics::gauge!(self.name, &self.labels).set(total);
        }
    }
}

/// Every series of the process, by name and labels.
static SERIES: Mutex<BTreeMap<String, Series>> = Mutex::new(BTreeMap::new());

/// Tells each backend's publisher apart.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One backend's publisher.
struct Publisher {
    id: u64,
    table: String,
    /// Each counter's last raw reading and what this backend has counted in all (a pool
    /// that was reopened counts from zero again: its new counts add to the total).
    counters: HashMap<String, (u64, u64)>,
    /// This round's figures: (name, labels, counter, value).
    round: Vec<(&'static str, Labels, bool, f64)>,
}

impl Publisher {
    fn labels(&self, node: &str, extra: &[(&'static str, &str)]) -> Labels {
        let mut labels = vec![("table", self.table.clone()), ("node", node.to_string())];
        labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        labels
    }

    fn counter(&mut self, name: &'static str, labels: Labels, value: u64) {
        let (last, total) = self
            .counters
            .entry(format!("{name}{labels:?}"))
            .or_insert((0, 0));
        *total += if value >= *last { value - *last } else { value };
        *last = value;
        let total = *total as f64;
        self.round.push((name, labels, true, total));
    }

    fn gauge(&mut self, name: &'static str, labels: Labels, value: f64) {
        self.round.push((name, labels, false, value));
    }

    /// Records this round's figures as this backend's shares and sets every series it touched.
    fn flush(&mut self) {
        let mut all = SERIES.lock().unwrap_or_else(|p| p.into_inner());
        for (name, labels, counter, value) in self.round.drain(..) {
            let series = all
                .entry(format!("{name}{labels:?}"))
                .or_insert_with(|| Series {
                    name,
                    labels,
                    counter,
                    shares: HashMap::new(),
                    retired: 0.0,
                });
            series.shares.insert(self.id, value);
            series.emit();
        }
    }

    /// Takes this backend's shares out: gauges lose them, counters keep what it counted.
    fn retire(&self) {
        let mut all = SERIES.lock().unwrap_or_else(|p| p.into_inner());
        for series in all.values_mut() {
            if let Some(value) = series.shares.remove(&self.id) {
                if series.counter {
                    series.retired += value;
                }
                series.emit();
            }
        }
    }

    fn publish(&mut self, inner: &Core) {
        let store = &inner.store;
        for n in nodes(store) {
            let l = |p: &Self, extra: &[(&'static str, &str)]| p.labels(&n.node, extra);
            let p = &n.pool;
            self.gauge(
                "pgstate_pool_connections",
                l(self, &[("state", "idle")]),
                f64::from(p.idle),
            );
            self.gauge(
                "pgstate_pool_connections",
                l(self, &[("state", "active")]),
                f64::from(p.active),
            );
            self.gauge("pgstate_pool_max_size", l(self, &[]), f64::from(p.max_size));
            self.gauge("pgstate_pool_waiting", l(self, &[]), f64::from(p.waiting));
            self.counter("pgstate_pool_acquire_waits_total", l(self, &[]), p.waits);
            self.counter(
                "pgstate_pool_acquire_timeouts_total",
                l(self, &[]),
                p.timeouts,
            );
            self.counter(
                "pgstate_connections_created_total",
                l(self, &[]),
                p.connections_created,
            );
            for (reason, count) in [
                ("idle_timeout", p.connections_closed_idle_timeout),
                ("max_lifetime", p.connections_closed_max_lifetime),
                ("broken", p.connections_closed_broken),
                ("invalid", p.connections_closed_invalid),
            ] {
                self.counter(
                    "pgstate_connections_closed_total",
                    l(self, &[("reason", reason)]),
                    count,
                );
            }
            self.counter("pgstate_reads_total", l(self, &[]), n.reads);
            if let Some((bytes, ms, healthy, in_rotation)) = n.replica {
                self.gauge("pgstate_replica_lag_bytes", l(self, &[]), bytes as f64);
                self.gauge(
                    "pgstate_replica_lag_seconds",
                    l(self, &[]),
                    ms as f64 / 1000.0,
                );
                self.gauge(
                    "pgstate_replica_healthy",
                    l(self, &[]),
                    f64::from(u8::from(healthy)),
                );
                self.gauge(
                    "pgstate_replica_in_rotation",
                    l(self, &[]),
                    f64::from(u8::from(in_rotation)),
                );
            }
        }
        let table = vec![("table", self.table.clone())];
        self.counter(
            "pgstate_read_failovers_total",
            table.clone(),
            store.router.failovers(),
        );
        self.counter(
            "pgstate_primary_changes_total",
            table.clone(),
            store.router.primary_changes(),
        );
        let mut queued = |op: &'static str, n: usize| {
            let mut labels = table.clone();
            labels.push(("operation", op.to_string()));
            self.gauge("pgstate_operations_queued", labels, n as f64);
        };
        queued("put", store.coalescer.waiting());
        queued("get", store.lookups.waiting());
        self.flush();
    }
}

/// Publishes the node figures of `inner` every [`PUBLISH_INTERVAL`] until it is dropped.
pub(super) fn spawn_publisher(inner: Weak<Core>, table: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut publisher = Publisher {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            table,
            counters: HashMap::new(),
            round: Vec::new(),
        };
        let mut ticker = tokio::time::interval(PUBLISH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(inner) = inner.upgrade() else {
                publisher.retire();
                return;
            };
            publisher.publish(&inner);
        }
    })
}
