//! Stream-processing state in PostgreSQL.
//!
//! Start with [`EnhancedPostgresBackend::new`] and an [`EnhancedPostgresConfig`]; everything
//! implements [`StateBackend`]. Files follow concepts: `config` (settings, URL parsing), `tls`
//! (sslmode), `connection` (one connection), `pool` (bb8 pool), `router` (replicas), `causal`
//! (read-your-writes sessions, causal tokens), `schema` (migrations), `ops` (key/value
//! statements), `store` (the operations over the pools), `coordination` (advisory locks, lock
//! guards, leader election, LISTEN/NOTIFY), `stats` (counters), `limits` (input limits),
//! `ident` (SQL identifiers), `memory` and `basic` (the other backends), `enhanced` (the
//! facade).

mod backend;
mod basic;
mod batch;
mod causal;
mod checkout;
mod citus_layout;
mod coalesce;
mod config;
mod connection;
mod connspec;
mod connstr;
pub mod coordination;
mod distribution;
mod enhanced;
mod error;
mod groups;
mod ident;
mod latency;
pub mod limits;
mod maintenance;
mod memory;
mod names;
mod operation;
mod ops;
mod partition_strategy;
mod partitions;
mod pipeline;
mod pool;
mod published;
mod retry;
mod router;
mod schema;
mod settings;
mod settle;
mod statements;
mod stats;
mod store;
mod tls;
mod transaction;
mod windows;

pub use backend::StateBackend;
pub use basic::{PostgresConfig, PostgresStateBackend};
pub use causal::CausalToken;
pub use citus_layout::{CitusLayout, MAX_CITUS_SHARDS};
pub use config::{
    EnhancedPostgresConfig, IsolationLevel, PostgresPoolConfig, PostgresReplicaConfig,
    PostgresSslConfig, RetentionPolicy, DEFAULT_OPERATION_TIMEOUT,
};
pub use connspec::SslMode;
pub use connstr::redact;
pub use coordination::{
    lock_key, AdvisoryLockInfo, CoordinationHandle, Fence, LeaderInfo, Leadership, LockMode,
    Notification, PostgresListener, PostgresLockGuard, MAX_LOCK_SESSIONS, MAX_NOTIFY_PAYLOAD,
};
pub use enhanced::EnhancedPostgresBackend;
pub use error::{sqlstate, ErrorKind, StateError, StateResult};
pub use ident::{Ident, MAX_IDENT_LEN, MAX_TABLE_NAME_LEN};
pub use latency::OpLatency;
pub use maintenance::{
    CheckpointInfo, DroppedPartition, PartitionStatistics, RepartitionReport, RetentionReport,
    TableActivity, TableStatistics, EXACT_COUNT_LIMIT, MAX_CHECKPOINT_NAME_LEN,
};
pub use memory::MemoryStateBackend;
pub use ops::StateEntry;
pub use partition_strategy::{
    PartitionStrategy, MAX_HASH_PARTITIONS, MAX_LIST_PREFIXES, MAX_WINDOW,
};
pub use pool::PoolStats;
pub use router::{NodeRole, ReplicaStatus, ReplicationStatus};
pub use schema::{Migration, MIGRATIONS, TRACKING_TABLE};
pub use stats::{BackendStats, NodeReads};
pub use transaction::{PostgresTransaction, TxFuture};
