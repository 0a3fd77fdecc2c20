//! The `metrics` facade: every counter of [`Stats`](crate::state::stats::counters) is also published as a
//! `pgstate_` metric, so that an application installs the exporter of its choice (Prometheus,
//! StatsD, ...) and scrapes them.
//!
//! Handles are registered once, when the backend is created, with the recorder installed then
//! (install it first: a backend created before any recorder publishes nothing); recording
//! through one is a call on the recorder's own handle, no lookup. Every metric carries the
//! label `table` (the schema-qualified state table), so that several backends of one process
//! stay apart. Labels never hold keys, values or connection secrets.

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::state::error::ErrorKind;
use crate::state::stats::operation::Kind;

/// Metric names, also listed in the README.
pub(crate) mod names {
    /// Operations run, by kind (`operation`).
    pub const OPERATIONS: &str = "pgstate_operations_total";
    /// Operation durations in seconds, by kind, from after the connection was acquired.
    pub const DURATION: &str = "pgstate_operation_duration_seconds";
    /// OpenTelemetry's stable name for operation durations, in seconds (`db.system.name`,
    /// `db.collection.name`, `db.operation.name`: the operation's kind).
    pub const OTEL_DURATION: &str = "db.client.operation.duration";
    /// Operations at or over the slow-operation threshold, by kind.
    pub const SLOW: &str = "pgstate_slow_operations_total";
    /// Failed operations, by error kind (`kind`).
    pub const ERRORS: &str = "pgstate_operation_errors_total";
    /// Entries written by `batch_put` and `batch_copy`.
    pub const BATCH_ROWS: &str = "pgstate_batch_rows_total";
    /// Puts and gets served by a combined statement (`operation`).
    pub const COALESCED: &str = "pgstate_coalesced_total";
    /// Transaction events (`event`: begun, committed, rolled_back, retried,
    /// serialization_failure, deadlock).
    pub const TRANSACTIONS: &str = "pgstate_transaction_events_total";
    /// Advisory lock acquisitions (`outcome`: acquired or failed).
    pub const LOCK_ACQUISITIONS: &str = "pgstate_advisory_lock_acquisitions_total";
    /// Time spent waiting for advisory locks, in seconds.
    pub const LOCK_WAIT: &str = "pgstate_advisory_lock_wait_seconds";
    /// Session advisory locks held now.
    pub const LOCKS_HELD: &str = "pgstate_advisory_locks_held";
    /// Leadership events (`event`: became_leader or ended).
    pub const LEADERSHIP: &str = "pgstate_leadership_events_total";
    /// Notifications sent.
    pub const NOTIFICATIONS: &str = "pgstate_notifications_sent_total";
}

/// Transaction events as label values, in the order of `TxEvent`.
pub(crate) const TX_EVENTS: [&str; 6] = [
    "begun",
    "committed",
    "rolled_back",
    "retried",
    "serialization_failure",
    "deadlock",
];

/// The handles of one backend's metrics.
pub(crate) struct Published {
    pub operations: [Counter; 9],
    pub durations: [Histogram; 9],
    /// The same durations under OpenTelemetry's stable name and attributes.
    pub otel_durations: [Histogram; 9],
    pub slow: [Counter; 9],
    pub errors: Vec<Counter>,
    pub batch_rows: Counter,
    pub coalesced_puts: Counter,
    pub coalesced_gets: Counter,
    pub transactions: [Counter; 6],
    pub locks_acquired: Counter,
    pub locks_failed: Counter,
    pub lock_wait: Histogram,
    pub locks_held: Gauge,
    pub became_leader: Counter,
    pub leadership_ended: Counter,
    pub notifications: Counter,
}

impl Published {
    /// Registers the metrics of the backend of `table` with the recorder installed now, and
    /// describes them to it.
    pub fn new(table: &str, kinds: &[ErrorKind]) -> Self {
        describe();
        let table = table.to_string();
        let by_kind = |name: &'static str| {
            Kind::ALL
                .map(|k| metrics::counter!(name, "table" => table.clone(), "operation" => k.name()))
        };
        Published {
            operations: by_kind(names::OPERATIONS),
            durations: Kind::ALL.map(|k| {
                metrics::histogram!(names::DURATION, "table" => table.clone(), "operation" => k.name())
            }),
            otel_durations: Kind::ALL.map(|k| {
                metrics::histogram!(
                    names::OTEL_DURATION,
                    "db.system.name" => "postgresql",
                    "db.collection.name" => table.clone(),
                    "db.operation.name" => k.name()
                )
            }),
            slow: by_kind(names::SLOW),
            errors: kinds
                .iter()
                .map(|k| metrics::counter!(names::ERRORS, "table" => table.clone(), "kind" => k.as_str()))
                .collect(),
            batch_rows: metrics::counter!(names::BATCH_ROWS, "table" => table.clone()),
            coalesced_puts: metrics::counter!(names::COALESCED, "table" => table.clone(), "operation" => "put"),
            coalesced_gets: metrics::counter!(names::COALESCED, "table" => table.clone(), "operation" => "get"),
            transactions: TX_EVENTS
                .map(|e| metrics::counter!(names::TRANSACTIONS, "table" => table.clone(), "event" => e)),
            locks_acquired: metrics::counter!(names::LOCK_ACQUISITIONS, "table" => table.clone(), "outcome" => "acquired"),
            locks_failed: metrics::counter!(names::LOCK_ACQUISITIONS, "table" => table.clone(), "outcome" => "failed"),
            lock_wait: metrics::histogram!(names::LOCK_WAIT, "table" => table.clone()),
            locks_held: metrics::gauge!(names::LOCKS_HELD, "table" => table.clone()),
            became_leader: metrics::counter!(names::LEADERSHIP, "table" => table.clone(), "event" => "became_leader"),
            leadership_ended: metrics::counter!(names::LEADERSHIP, "table" => table.clone(), "event" => "ended"),
            notifications: metrics::counter!(names::NOTIFICATIONS, "table" => table),
        }
    }
}

/// Tells the recorder what each metric means and its unit.
fn describe() {
    use names::*;
    metrics::describe_counter!(OPERATIONS, "Operations run, by kind");
    metrics::describe_histogram!(
        DURATION,
        Unit::Seconds,
        "Operation durations, from after the connection was acquired"
    );
    metrics::describe_histogram!(
        OTEL_DURATION,
        Unit::Seconds,
        "Duration of database client operations (OpenTelemetry semantic conventions)"
    );
    metrics::describe_counter!(SLOW, "Operations at or over the slow-operation threshold");
    metrics::describe_counter!(ERRORS, "Failed operations, by error kind");
    metrics::describe_counter!(BATCH_ROWS, "Entries written by batch_put and batch_copy");
    metrics::describe_counter!(COALESCED, "Puts and gets served by a combined statement");
    metrics::describe_counter!(TRANSACTIONS, "Transaction events");
    metrics::describe_counter!(LOCK_ACQUISITIONS, "Advisory lock acquisitions, by outcome");
    metrics::describe_histogram!(
        LOCK_WAIT,
        Unit::Seconds,
        "Time spent waiting for advisory locks"
    );
    metrics::describe_gauge!(LOCKS_HELD, "Session advisory locks held now");
    metrics::describe_counter!(LEADERSHIP, "Leadership events");
    metrics::describe_counter!(NOTIFICATIONS, "Notifications sent");
}
