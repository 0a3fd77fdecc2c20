//! The figures of the backend's nodes (primary and replicas: pools, connections, reads, lag),
//! for [`get_stats`](super::EnhancedPostgresBackend::get_stats) and, once a second, for the
//! `metrics` facade (see the `published` module for the operation counters, which are
//! published as they happen).
//!
//! Counters are published as the increase since the last round and gauges as their change, so
//! that several backends of one process add up in a recorder; a backend that is dropped takes
//! its gauges back out.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use super::Inner;
use crate::state::pool::PoolStats;
use crate::state::stats::NodeReads;
use crate::state::store::Store;

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
        pool: store.primary.stats(),
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

/// What was last published, to publish changes.
struct Publisher {
    table: String,
    counters: HashMap<String, u64>,
    gauges: HashMap<String, (&'static str, Labels, f64)>,
}

impl Publisher {
    fn labels(&self, node: &str, extra: &[(&'static str, &str)]) -> Labels {
        let mut labels = vec![("table", self.table.clone()), ("node", node.to_string())];
        labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        labels
    }

    fn counter(&mut self, name: &'static str, labels: Labels, value: u64) {
        let last = self.counters.insert(format!("{name}{labels:?}"), value);
        // A pool that was reopened counts from zero again: its new counts are all new.
        let increase = match last {
            Some(last) if last <= value => value - last,
            _ => value,
        };
        if increase > 0 {
            metrics::counter!(name, &labels).increment(increase);
        }
    }

    fn gauge(&mut self, name: &'static str, labels: Labels, value: f64) {
        let key = format!("{name}{labels:?}");
        let last = self.gauges.get(&key).map_or(0.0, |g| g.2);
        if value != last {
            metrics::gauge!(name, &labels).increment(value - last);
        }
        self.gauges.insert(key, (name, labels, value));
    }

    fn publish(&mut self, inner: &Inner) {
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
    }

    /// Takes this backend's gauges back out of the recorder.
    fn retire(self) {
        for (_, (name, labels, value)) in self.gauges {
            if value != 0.0 {
                metrics::gauge!(name, &labels).decrement(value);
            }
        }
    }
}

/// Publishes the node figures of `inner` every [`PUBLISH_INTERVAL`] until it is dropped.
pub(super) fn spawn_publisher(inner: Weak<Inner>, table: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut publisher = Publisher {
            table,
            counters: HashMap::new(),
            gauges: HashMap::new(),
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
