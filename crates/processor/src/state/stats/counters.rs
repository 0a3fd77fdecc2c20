//! Operation counters, query timing and the slow-query log.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::state::error::{ErrorKind, StateError};
use crate::state::stats::latency::{Histogram, OpLatency};
use crate::state::stats::operation::{Kind, Op};
use crate::state::stats::published::Published;

/// Every error kind, in the order of [`Stats`]'s error counters.
const KINDS: [ErrorKind; 13] = [
    ErrorKind::InvalidInput,
    ErrorKind::Configuration,
    ErrorKind::NotFound,
    ErrorKind::Conflict,
    ErrorKind::Transaction,
    ErrorKind::Timeout,
    ErrorKind::Connection,
    ErrorKind::Tls,
    ErrorKind::Permission,
    ErrorKind::Serialization,
    ErrorKind::Coordination,
    ErrorKind::Storage,
    ErrorKind::OutcomeUnknown,
];

/// `kind`'s place in [`KINDS`] (a match, so a new kind cannot be left out).
fn kind_index(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::InvalidInput => 0,
        ErrorKind::Configuration => 1,
        ErrorKind::NotFound => 2,
        ErrorKind::Conflict => 3,
        ErrorKind::Transaction => 4,
        ErrorKind::Timeout => 5,
        ErrorKind::Connection => 6,
        ErrorKind::Tls => 7,
        ErrorKind::Permission => 8,
        ErrorKind::Serialization => 9,
        ErrorKind::Coordination => 10,
        ErrorKind::Storage => 11,
        ErrorKind::OutcomeUnknown => 12,
    }
}

/// The error kind of an operation's result, if it failed.
pub(crate) fn failure<T>(result: &Result<T, StateError>) -> Option<ErrorKind> {
    let e = result.as_ref().err()?;
    if let Some(code) = e.sqlstate() {
        // OpenTelemetry's `db.response.status_code`: the SQLSTATE, on the operation's span.
        tracing::Span::current().record("db.response.status_code", code);
    }
    Some(e.kind())
}

/// Live counters, shared by every handle of a backend.
pub(crate) struct Stats {
    gets: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
    batch_rows: AtomicU64,
    queries: AtomicU64,
    errors: AtomicU64,
    total_query_us: AtomicU64,
    max_query_us: AtomicU64,
    slow_queries: AtomicU64,
    slow_threshold_us: u64,
    /// Log every operation at `info` (target `pgstate::statements`).
    log_statements: bool,
    tx_begun: AtomicU64,
    tx_committed: AtomicU64,
    tx_rolled_back: AtomicU64,
    tx_retries: AtomicU64,
    serialization_failures: AtomicU64,
    deadlocks: AtomicU64,
    lock_wait_us: AtomicU64,
    lock_acquisitions: AtomicU64,
    lock_failures: AtomicU64,
    locks_held: AtomicU64,
    leader_changes: AtomicU64,
    leadership_losses: AtomicU64,
    notifications_sent: AtomicU64,
    coalesced_puts: AtomicU64,
    coalesced_gets: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    /// Durations by operation kind (indexed by `Kind::index`).
    latency: [Histogram; 9],
    /// Failed operations by error kind (in the order of `KINDS`).
    errors_by_kind: [AtomicU64; 13],
    /// The same figures through the `metrics` facade.
    published: Published,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

/// One operation's record, however it ends: attempts record themselves, and
/// [`finish`](Self::finish) records the result when none did (a failure to get a connection,
/// or the operation timeout cutting the work short).
pub(crate) struct OpRecord<'a> {
    stats: &'a Stats,
    op: Op,
    rows: u64,
    start: std::time::Instant,
    done: std::sync::atomic::AtomicBool,
}

impl<'a> OpRecord<'a> {
    pub fn new(stats: &'a Stats, op: Op, rows: u64) -> Self {
        OpRecord {
            stats,
            op,
            rows,
            start: std::time::Instant::now(),
            done: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records one attempt, timed from `start`.
    pub fn attempt(&self, start: std::time::Instant, error: Option<ErrorKind>) {
        self.done.store(true, Relaxed);
        self.stats
            .record(self.op, self.rows, start.elapsed(), error);
    }

    /// Records `result` unless an attempt was recorded.
    pub fn finish<T>(&self, result: &Result<T, StateError>) {
        if !self.done.load(Relaxed) {
            self.stats
                .record(self.op, self.rows, self.start.elapsed(), failure(result));
        }
    }
}

/// Coordination events the backend counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockEvent {
    /// A lock was acquired after waiting this long.
    Acquired(Duration),
    /// An acquisition gave up (lock busy, timeout or error) after waiting this long.
    Failed(Duration),
    /// A held lock was released or lost.
    Released,
    /// This backend became leader.
    BecameLeader,
    /// This backend's leadership ended (resigned, lost, dropped).
    LeadershipEnded,
    /// A notification was sent.
    Notified,
}

/// Transaction events the backend counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxEvent {
    Begun,
    Committed,
    RolledBack,
    Retried,
    SerializationFailure,
    Deadlock,
}

impl Stats {
    /// Counters for the backend of `table`, registering its metrics with the recorder
    /// installed now.
    pub fn new(slow_threshold: Duration, table: &str) -> Self {
        let zero = || AtomicU64::new(0);
        Stats {
            gets: zero(),
            puts: zero(),
            deletes: zero(),
            batch_rows: zero(),
            queries: zero(),
            errors: zero(),
            total_query_us: zero(),
            max_query_us: zero(),
            slow_queries: zero(),
            slow_threshold_us: u64::try_from(slow_threshold.as_micros()).unwrap_or(u64::MAX),
            log_statements: false,
            tx_begun: zero(),
            tx_committed: zero(),
            tx_rolled_back: zero(),
            tx_retries: zero(),
            serialization_failures: zero(),
            deadlocks: zero(),
            lock_wait_us: zero(),
            lock_acquisitions: zero(),
            lock_failures: zero(),
            locks_held: zero(),
            leader_changes: zero(),
            leadership_losses: zero(),
            notifications_sent: zero(),
            coalesced_puts: zero(),
            coalesced_gets: zero(),
            bytes_written: zero(),
            bytes_read: zero(),
            latency: Default::default(),
            errors_by_kind: Default::default(),
            published: Published::new(table, &KINDS),
        }
    }

    /// These statistics with every operation logged at `info` (target `pgstate::statements`:
    /// the statement's name, rows, duration, whether it failed; never a key or value).
    pub fn logging_statements(mut self, on: bool) -> Self {
        self.log_statements = on;
        self
    }

    /// Records one finished operation: `rows` entries written for batches, `elapsed` measured
    /// from after the connection was acquired, `error` its error's kind if it failed. A failure
    /// is also recorded as the current span's `error.type` (the operation's span, see
    /// [`Op::span`]); a slow operation is logged at `warn` with its statement's name, never a
    /// key or value.
    pub fn record(&self, op: Op, rows: u64, elapsed: Duration, error: Option<ErrorKind>) {
        let kind = op.kind();
        match kind {
            Kind::Get => self.gets.fetch_add(1, Relaxed),
            Kind::Put => self.puts.fetch_add(1, Relaxed),
            Kind::Delete => self.deletes.fetch_add(1, Relaxed),
            Kind::Batch | Kind::Copy => {
                self.batch_rows.fetch_add(rows, Relaxed);
                self.published.batch_rows.increment(rows);
                self.puts.fetch_add(rows, Relaxed)
            }
            Kind::Scan | Kind::Count | Kind::Clear | Kind::Query => 0,
        };
        let i = kind.index();
        self.queries.fetch_add(1, Relaxed);
        self.published.operations[i].increment(1);
        if let Some(error) = error {
            self.errors.fetch_add(1, Relaxed);
            self.errors_by_kind[kind_index(error)].fetch_add(1, Relaxed);
            self.published.errors[kind_index(error)].increment(1);
            tracing::Span::current().record("error.type", error.as_str());
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.total_query_us.fetch_add(us, Relaxed);
        self.max_query_us.fetch_max(us, Relaxed);
        self.latency[i].record(us);
        self.published.durations[i].record(elapsed.as_secs_f64());
        self.published.otel_durations[i].record(elapsed.as_secs_f64());
        if self.log_statements {
            tracing::info!(
                target: "pgstate::statements",
                statement = op.name(),
                operation = kind.name(),
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                rows,
                failed = error.is_some(),
                "statement"
            );
        }
        if us >= self.slow_threshold_us {
            self.slow_queries.fetch_add(1, Relaxed);
            self.published.slow[i].increment(1);
            tracing::warn!(
                target: "pgstate",
                statement = op.name(),
                operation = kind.name(),
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                threshold_ms = self.slow_threshold_us as f64 / 1000.0,
                rows,
                failed = error.is_some(),
                "slow operation"
            );
        }
    }

    /// Records the bytes an operation that succeeded moved: keys and values written, values
    /// read.
    pub fn moved(&self, written: usize, read: usize) {
        let n = |b: usize| u64::try_from(b).unwrap_or(u64::MAX);
        self.bytes_written.fetch_add(n(written), Relaxed);
        self.bytes_read.fetch_add(n(read), Relaxed);
    }

    /// Records a put written, or a get answered, by a combined statement.
    pub fn coalesced(&self, kind: Kind) {
        match kind {
            Kind::Get => {
                self.coalesced_gets.fetch_add(1, Relaxed);
                self.published.coalesced_gets.increment(1);
            }
            _ => {
                self.coalesced_puts.fetch_add(1, Relaxed);
                self.published.coalesced_puts.increment(1);
            }
        }
    }

    pub fn tx(&self, event: TxEvent) {
        let (counter, i) = match event {
            TxEvent::Begun => (&self.tx_begun, 0),
            TxEvent::Committed => (&self.tx_committed, 1),
            TxEvent::RolledBack => (&self.tx_rolled_back, 2),
            TxEvent::Retried => (&self.tx_retries, 3),
            TxEvent::SerializationFailure => (&self.serialization_failures, 4),
            TxEvent::Deadlock => (&self.deadlocks, 5),
        };
        counter.fetch_add(1, Relaxed);
        self.published.transactions[i].increment(1);
    }

    pub fn lock(&self, event: LockEvent) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match event {
            LockEvent::Acquired(waited) => {
                self.lock_wait_us.fetch_add(micros(waited), Relaxed);
                self.lock_acquisitions.fetch_add(1, Relaxed);
                self.locks_held.fetch_add(1, Relaxed);
                self.published.lock_wait.record(waited.as_secs_f64());
                self.published.locks_acquired.increment(1);
                self.published.locks_held.increment(1.0);
            }
            LockEvent::Failed(waited) => {
                self.lock_wait_us.fetch_add(micros(waited), Relaxed);
                self.lock_failures.fetch_add(1, Relaxed);
                self.published.lock_wait.record(waited.as_secs_f64());
                self.published.locks_failed.increment(1);
            }
            LockEvent::Released => {
                // Never below zero, whatever the order of events.
                if self
                    .locks_held
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    self.published.locks_held.decrement(1.0);
                }
            }
            LockEvent::BecameLeader => {
                self.leader_changes.fetch_add(1, Relaxed);
                self.published.became_leader.increment(1);
            }
            LockEvent::LeadershipEnded => {
                self.leadership_losses.fetch_add(1, Relaxed);
                self.published.leadership_ended.increment(1);
            }
            LockEvent::Notified => {
                self.notifications_sent.fetch_add(1, Relaxed);
                self.published.notifications.increment(1);
            }
        }
    }

    pub fn snapshot(&self) -> BackendStats {
        let queries = self.queries.load(Relaxed);
        let total = self.total_query_us.load(Relaxed);
        BackendStats {
            get_count: self.gets.load(Relaxed),
            put_count: self.puts.load(Relaxed),
            delete_count: self.deletes.load(Relaxed),
            batch_rows: self.batch_rows.load(Relaxed),
            query_count: queries,
            error_count: self.errors.load(Relaxed),
            avg_query_duration_ms: if queries == 0 {
                0.0
            } else {
                total as f64 / queries as f64 / 1000.0
            },
            max_query_duration_ms: self.max_query_us.load(Relaxed) as f64 / 1000.0,
            slow_query_count: self.slow_queries.load(Relaxed),
            transactions_begun: self.tx_begun.load(Relaxed),
            transactions_committed: self.tx_committed.load(Relaxed),
            transactions_rolled_back: self.tx_rolled_back.load(Relaxed),
            transaction_retries: self.tx_retries.load(Relaxed),
            serialization_failures: self.serialization_failures.load(Relaxed),
            deadlocks: self.deadlocks.load(Relaxed),
            advisory_lock_wait_ms: self.lock_wait_us.load(Relaxed) as f64 / 1000.0,
            lock_acquisitions: self.lock_acquisitions.load(Relaxed),
            lock_acquisitions_failed: self.lock_failures.load(Relaxed),
            locks_held: self.locks_held.load(Relaxed),
            leader_changes: self.leader_changes.load(Relaxed),
            leadership_losses: self.leadership_losses.load(Relaxed),
            notifications_sent: self.notifications_sent.load(Relaxed),
            coalesced_puts: self.coalesced_puts.load(Relaxed),
            puts_queued: 0,
            coalesced_gets: self.coalesced_gets.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            gets_queued: 0,
            primary_reads: 0,
            replica_reads: 0,
            read_failovers: 0,
            latencies: self.latencies(),
            errors_by_kind: KINDS
                .iter()
                .zip(&self.errors_by_kind)
                .map(|(k, n)| (*k, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            connections_created: 0,
            connections_closed: 0,
            connections_broken: 0,
            reads_by_node: Vec::new(),
        }
    }

    /// Percentiles of every kind of operation timed at least once.
    fn latencies(&self) -> Vec<OpLatency> {
        Kind::ALL
            .iter()
            .filter_map(|op| {
                let h = &self.latency[op.index()];
                let count = h.count();
                if count == 0 {
                    return None;
                }
                let q = h.quantiles(&[0.5, 0.95, 0.99]);
                Some(OpLatency {
                    operation: op.name().to_string(),
                    count,
                    p50_us: q[0],
                    p95_us: q[1],
                    p99_us: q[2],
                })
            })
            .collect()
    }
}

/// A snapshot of a backend's counters, from
/// [`EnhancedPostgresBackend::get_stats`](crate::state::EnhancedPostgresBackend::get_stats).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendStats {
    /// Single-key reads (`get`, `contains`, `get_entry`).
    pub get_count: u64,
    /// Entries written (single puts and batch rows).
    pub put_count: u64,
    /// Deletes.
    pub delete_count: u64,
    /// Entries written by `batch_put` and `batch_copy`.
    pub batch_rows: u64,
    /// Statements timed (every operation counts once).
    pub query_count: u64,
    /// Operations that returned an error from the server or connection.
    pub error_count: u64,
    /// Mean time per operation, in milliseconds, excluding the wait for a connection.
    pub avg_query_duration_ms: f64,
    /// Slowest operation so far, in milliseconds.
    pub max_query_duration_ms: f64,
    /// Operations at or over the slow-query threshold (each also logged at `warn`).
    pub slow_query_count: u64,
    /// Transactions started.
    pub transactions_begun: u64,
    /// Transactions committed.
    pub transactions_committed: u64,
    /// Transactions rolled back (explicitly, by drop, or by a failed COMMIT).
    pub transactions_rolled_back: u64,
    /// Times the retry API re-ran a transaction.
    pub transaction_retries: u64,
    /// Serialization failures (SQLSTATE 40001) seen inside transactions.
    pub serialization_failures: u64,
    /// Deadlocks (SQLSTATE 40P01) seen inside transactions.
    pub deadlocks: u64,
    /// Total time spent waiting for advisory locks (granted or not), in milliseconds.
    pub advisory_lock_wait_ms: f64,
    /// Session advisory locks acquired (guards, the key API and leader campaigns).
    pub lock_acquisitions: u64,
    /// Acquisitions that did not get the lock (busy, timed out or failed).
    pub lock_acquisitions_failed: u64,
    /// Session advisory locks acquired and not yet released (a lock whose connection was lost
    /// counts until its guard or key is released or dropped).
    pub locks_held: u64,
    /// Times a candidate of this backend became leader (each a new term).
    pub leader_changes: u64,
    /// Times a leadership of this backend ended (resigned, dropped or lost).
    pub leadership_losses: u64,
    /// Notifications sent (`notify` and `notify_durable`).
    pub notifications_sent: u64,
    /// Puts written together with concurrent ones in one combined statement (see
    /// `EnhancedPostgresBackend::put`); also counted in `put_count`.
    pub coalesced_puts: u64,
    /// Puts waiting now to be combined into the next statement.
    pub puts_queued: u64,
    /// Gets answered together with concurrent ones by one lookup (see
    /// `EnhancedPostgresBackend::get`); also counted in `get_count`.
    pub coalesced_gets: u64,
    /// Gets waiting now to be combined into the next lookup.
    pub gets_queued: u64,
    /// Bytes written by operations that succeeded: each entry's key and value (puts,
    /// versioned writes, batches; a transaction's writes once it commits).
    pub bytes_written: u64,
    /// Bytes of values read by operations that succeeded (gets, entries, `get_many`, pages of
    /// entries, metadata queries, reads inside transactions).
    pub bytes_read: u64,
    /// Reads served by the primary.
    pub primary_reads: u64,
    /// Reads served by replicas.
    pub replica_reads: u64,
    /// Reads that fell back to the primary because no replica qualified.
    pub read_failovers: u64,
    /// Latency percentiles per kind of operation (only kinds that ran), timed from after the
    /// connection was acquired, like `avg_query_duration_ms`.
    pub latencies: Vec<OpLatency>,
    /// Failed operations by kind of error (only kinds seen); they add up to `error_count`.
    pub errors_by_kind: Vec<(ErrorKind, u64)>,
    /// Connections opened, over the primary's and every replica's pool.
    pub connections_created: u64,
    /// Connections closed in the normal course (idle past `idle_timeout`, or past
    /// `max_lifetime`).
    pub connections_closed: u64,
    /// Connections discarded as broken: closed by the server or the network, left in an
    /// unknown state by a caller that gave up, or failing a health probe.
    pub connections_broken: u64,
    /// Reads each node served: the primary first, then every replica.
    pub reads_by_node: Vec<NodeReads>,
}

/// The reads one node served, in [`BackendStats::reads_by_node`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReads {
    /// `primary`, or the replica's name (`host:port` of its URL).
    pub node: String,
    /// Whether this is the primary.
    pub primary: bool,
    /// Reads served (get, contains, count, scans, queries).
    pub reads: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_own_counter() {
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(kind_index(*k), i, "{k:?}");
        }
    }
}
