//! Operation counters, query timing and the slow-query log.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The operations the backend counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    Put,
    Delete,
    Scan,
    Count,
    Clear,
    Batch,
    Copy,
    Query,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Scan => "scan",
            Op::Count => "count",
            Op::Clear => "clear",
            Op::Batch => "batch_put",
            Op::Copy => "batch_copy",
            Op::Query => "query",
        }
    }
}

/// Live counters, shared by every handle of a backend.
#[derive(Debug, Default)]
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
    tx_begun: AtomicU64,
    tx_committed: AtomicU64,
    tx_rolled_back: AtomicU64,
    tx_retries: AtomicU64,
    serialization_failures: AtomicU64,
    deadlocks: AtomicU64,
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
    pub fn new(slow_threshold: Duration) -> Self {
        Stats {
            slow_threshold_us: u64::try_from(slow_threshold.as_micros()).unwrap_or(u64::MAX),
            ..Default::default()
        }
    }

    /// Records one finished operation: `rows` entries written for batches, `elapsed` measured
    /// from after the connection was acquired.
    pub fn record(&self, op: Op, rows: u64, elapsed: Duration, ok: bool) {
        match op {
            Op::Get => self.gets.fetch_add(1, Relaxed),
            Op::Put => self.puts.fetch_add(1, Relaxed),
            Op::Delete => self.deletes.fetch_add(1, Relaxed),
            Op::Batch | Op::Copy => {
                self.batch_rows.fetch_add(rows, Relaxed);
                self.puts.fetch_add(rows, Relaxed)
            }
            Op::Scan | Op::Count | Op::Clear | Op::Query => 0,
        };
        self.queries.fetch_add(1, Relaxed);
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.total_query_us.fetch_add(us, Relaxed);
        self.max_query_us.fetch_max(us, Relaxed);
        if us >= self.slow_threshold_us {
            self.slow_queries.fetch_add(1, Relaxed);
            tracing::warn!(
                operation = op.name(),
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                threshold_ms = self.slow_threshold_us as f64 / 1000.0,
                rows,
                "slow query"
            );
        }
    }

    pub fn tx(&self, event: TxEvent) {
        let counter = match event {
            TxEvent::Begun => &self.tx_begun,
            TxEvent::Committed => &self.tx_committed,
            TxEvent::RolledBack => &self.tx_rolled_back,
            TxEvent::Retried => &self.tx_retries,
            TxEvent::SerializationFailure => &self.serialization_failures,
            TxEvent::Deadlock => &self.deadlocks,
        };
        counter.fetch_add(1, Relaxed);
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
            primary_reads: 0,
            replica_reads: 0,
            read_failovers: 0,
        }
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
    /// Reads served by the primary.
    pub primary_reads: u64,
    /// Reads served by replicas.
    pub replica_reads: u64,
    /// Reads that fell back to the primary because no replica qualified.
    pub read_failovers: u64,
}
