//! Stream-processing state in PostgreSQL.
//!
//! Start with [`EnhancedPostgresBackend::new`] and an [`EnhancedPostgresConfig`]; everything
//! implements [`StateBackend`]. The folders are the layers, bottom to top: `stats`, `config`,
//! `schema`, `wire` (one connection), `pool`, `routing` (replicas, read-your-writes), `ops`
//! (the key/value operations), `transaction`, `coordination` (advisory locks, lock guards,
//! leader election, LISTEN/NOTIFY, leases), `exactly_once` (claims, epoch commits, the
//! outbox) beside `maintenance`, `assembly` (a backend's core,
//! built from a configuration), `enhanced` (the facade); beside them `error`, `limits` (input
//! limits), `ident` (SQL identifiers), `retry`, `backend` (the trait), `distributed_lock` (the
//! seed project's lock trait) at the bottom, and `memory`, `basic` (the other backends) and
//! `postgres_lock` (the lease lock) at the top.

// The layers (their order is in the doc above and in `layering`, which checks that nothing
// imports upward), then the small modules beside them.
mod assembly;
mod config;
mod coordination;
mod enhanced;
mod exactly_once;
mod maintenance;
mod ops;
mod pool;
mod routing;
mod schema;
mod stats;
mod transaction;
mod wire;

pub mod backend;
mod basic;
pub mod distributed_lock;
mod error;
mod ident;
mod limits;
pub mod memory;
pub mod postgres_lock;
mod retry;

#[cfg(test)]
mod layering;

pub use backend::StateBackend;
pub use basic::{PostgresConfig, PostgresStateBackend, PostgresStats};
pub use config::citus_layout::{CitusLayout, MAX_CITUS_SHARDS};
pub use config::connspec::SslMode;
pub use config::connstr::redact;
pub use config::enhanced::{
    EnhancedPostgresConfig, IsolationLevel, PostgresPoolConfig, PostgresReplicaConfig,
    PostgresSslConfig, RetentionPolicy, DEFAULT_OPERATION_TIMEOUT,
};
pub use config::partition_strategy::{
    PartitionStrategy, MAX_HASH_PARTITIONS, MAX_LIST_PREFIXES, MAX_WINDOW,
};
pub use coordination::{
    lock_key, AdvisoryLockInfo, CoordinationHandle, Fence, LeaderInfo, Leadership, LockMode,
    Notification, PostgresListener, PostgresLockGuard, MAX_LOCK_NAME_LEN, MAX_LOCK_SESSIONS,
    MAX_NOTIFY_PAYLOAD,
};
pub use distributed_lock::{DistributedLock, LockGuard, LockToken};
pub use enhanced::EnhancedPostgresBackend;
pub use error::{sqlstate, ErrorKind, StateError, StateResult};
pub use exactly_once::{
    Claim, Committed, Operator, OutboxReader, OutboxRecord, Output, PreviousClaim, Recovery,
    SourceOffset, DEFAULT_CLAIM_CACHE_BYTES, MAX_NAME_LEN,
};
pub use ident::{Ident, MAX_IDENT_LEN, MAX_TABLE_NAME_LEN};
pub use limits::{
    check_entry, check_key, check_metadata, check_ttl, check_value, prefix_upper_bound,
    MAX_GET_MANY, MAX_KEY_LEN, MAX_METADATA_LEN, MAX_PAGE, MAX_TTL, MAX_VALUE_LEN,
};
pub use maintenance::{
    CheckpointInfo, DroppedPartition, MaintenanceOptions, PartitionStatistics, Progress,
    RepartitionReport, RetentionReport, TableActivity, TableStatistics, EXACT_COUNT_LIMIT,
    MAX_CHECKPOINT_NAME_LEN,
};
pub use memory::{MemoryBackendStats, MemoryStateBackend};
pub use ops::conn_ops::StateEntry;
pub use ops::entry_copy::BatchEntry;
pub use pool::conn_pool::PoolStats;
pub use postgres_lock::PostgresDistributedLock;
pub use routing::causal::CausalToken;
pub use routing::router::{NodeRole, ReplicaStatus, ReplicationStatus};
pub use schema::migrations::{
    AppliedMigration, Migration, MigrationStatus, MIGRATIONS, TRACKING_TABLE,
};
pub use stats::counters::{BackendStats, NodeReads};
pub use stats::latency::OpLatency;
pub use transaction::tx::{PostgresTransaction, TxFuture};

/// The seed project's path of the basic backend (`processor::state::postgres_backend`).
pub mod postgres_backend {
    pub use super::{CheckpointInfo, PostgresConfig, PostgresStateBackend, PostgresStats};
}

/// The seed project's path of the enhanced backend
/// (`processor::state::postgres_backend_enhanced`).
pub mod postgres_backend_enhanced {
    pub use super::{
        EnhancedPostgresBackend, EnhancedPostgresConfig, IsolationLevel, PartitionStrategy,
        PostgresListener, PostgresLockGuard, PostgresPoolConfig, PostgresReplicaConfig,
        PostgresSslConfig, PostgresTransaction, ReplicationStatus, RetentionPolicy,
        TableStatistics,
    };
}
