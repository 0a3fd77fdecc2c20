//! `processor`: stream-processing building blocks. [`state`] stores operator state in
//! PostgreSQL (or memory) behind the [`state::StateBackend`] trait.
//!
//! # Quick start
//!
//! ```no_run
//! use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend};
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     // Basic configuration
//!     let config = EnhancedPostgresConfig::new("postgresql://user:pass@localhost/db");
//!
//!     // Create backend
//!     let backend = EnhancedPostgresBackend::new(config).await?;
//!
//!     // Use like any StateBackend
//!     backend.put(b"key", b"value").await?;
//!     let value = backend.get(b"key").await?;
//!
//!     Ok(())
//! }
//! ```
//!
//! # The API, as the specification's snippets use it
//!
//! [`EnhancedPostgresBackend`](state::EnhancedPostgresBackend), built from an
//! [`EnhancedPostgresConfig`](state::EnhancedPostgresConfig) (`with_pool_config`,
//! `with_ssl_config`, `with_replicas`, `with_isolation_level`, `with_retention_policy`, ...):
//!
//! - **Key/value** ([`StateBackend`](state::StateBackend)): `get`, `put`, `delete`,
//!   `list_keys`, `clear`, `count`, `contains`; with metadata and TTL:
//!   [`put_with_metadata`](state::EnhancedPostgresBackend::put_with_metadata),
//!   [`put_with_ttl`](state::EnhancedPostgresBackend::put_with_ttl).
//! - **Optimistic locking**:
//!   [`put_with_version`](state::EnhancedPostgresBackend::put_with_version).
//! - **Fast queries**: [`batch_put`](state::EnhancedPostgresBackend::batch_put),
//!   [`batch_copy`](state::EnhancedPostgresBackend::batch_copy),
//!   [`query_by_metadata`](state::EnhancedPostgresBackend::query_by_metadata).
//! - **Transactions**:
//!   [`begin_transaction`](state::EnhancedPostgresBackend::begin_transaction), then
//!   [`savepoint`](state::PostgresTransaction::savepoint),
//!   [`rollback_to_savepoint`](state::PostgresTransaction::rollback_to_savepoint),
//!   [`commit`](state::PostgresTransaction::commit).
//! - **Coordination**:
//!   [`acquire_advisory_lock`](state::EnhancedPostgresBackend::acquire_advisory_lock),
//!   [`release_advisory_lock`](state::EnhancedPostgresBackend::release_advisory_lock),
//!   [`PostgresLockGuard::new`](state::PostgresLockGuard::new),
//!   [`try_become_leader`](state::EnhancedPostgresBackend::try_become_leader),
//!   [`notify`](state::EnhancedPostgresBackend::notify),
//!   [`PostgresListener::new`](state::PostgresListener::new) and `recv`.
//! - **Data management**:
//!   [`vacuum_analyze`](state::EnhancedPostgresBackend::vacuum_analyze),
//!   [`apply_retention_policy`](state::EnhancedPostgresBackend::apply_retention_policy),
//!   [`archive_old_data`](state::EnhancedPostgresBackend::archive_old_data).
//! - **High availability and observability**:
//!   [`check_replication_status`](state::EnhancedPostgresBackend::check_replication_status),
//!   [`health_check`](state::EnhancedPostgresBackend::health_check),
//!   [`get_stats`](state::EnhancedPostgresBackend::get_stats),
//!   [`get_pool_stats`](state::EnhancedPostgresBackend::get_pool_stats),
//!   [`get_table_statistics`](state::EnhancedPostgresBackend::get_table_statistics),
//!   [`clone_handle`](state::EnhancedPostgresBackend::clone_handle).
//!
//! Everything else (sessions and causal tokens, leader campaigns, durable events,
//! checkpoints, partitioning, scans and streams) is documented on
//! [`EnhancedPostgresBackend`](state::EnhancedPostgresBackend) by group. Errors are
//! [`StateError`](state::StateError), classified by [`ErrorKind`](state::ErrorKind); a write
//! whose outcome the caller could not learn is `ErrorKind::OutcomeUnknown` and never lands
//! after the same session's next acknowledged write (see the README, "Outcomes of failed and
//! cancelled writes").
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod state;
