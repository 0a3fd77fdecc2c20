//! The Citus setting: the state table distributed by key over a Citus cluster's workers (see
//! [`with_citus`](crate::state::EnhancedPostgresConfig::with_citus)).

use crate::state::error::{StateError, StateResult};

/// Most shards a distributed state table may have.
pub const MAX_CITUS_SHARDS: u32 = 4096;

/// How the state table is distributed over a Citus cluster: hash-distributed by `key` into
/// `shard_count` shards, which Citus places on its workers. The backend connects to the
/// coordinator; nothing in the API changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CitusLayout {
    /// Shards of the state table (1..=[`MAX_CITUS_SHARDS`]). More shards than workers lets
    /// Citus move shards to new workers later; each multi-shard query (scans, counts,
    /// metadata queries) sends one task per shard, so more shards cost more on those.
    pub shard_count: u32,
}

impl Default for CitusLayout {
    /// 32 shards, Citus's default `citus.shard_count`.
    fn default() -> Self {
        CitusLayout { shard_count: 32 }
    }
}

impl CitusLayout {
    pub(crate) fn validate(&self) -> StateResult<()> {
        if self.shard_count == 0 || self.shard_count > MAX_CITUS_SHARDS {
            return Err(StateError::config(format!(
                "Citus shard_count must be between 1 and {MAX_CITUS_SHARDS}, not {}",
                self.shard_count
            )));
        }
        Ok(())
    }
}
