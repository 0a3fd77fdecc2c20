//! Data maintenance: TTL cleanup and retention (`cleanup`, in heap order for large sweeps:
//! `heap_walk`), archive (`archive`), VACUUM (`vacuum`), table statistics (`table_stats`),
//! state checkpoints (`checkpoints`) and the online conversion to a partitioned table
//! (`repartition`).
//!
//! A cleanup *pass* runs the sweeps one after the other under a named lock of the state table
//! (`pgstate cleanup of <schema>.<table>`), so that when several backends share a table their
//! passes never overlap: the background task skips a pass while another instance runs one,
//! an explicit call waits for it. Behind PgBouncer's transaction pooling without a session URL
//! there is no session lock to take: passes may then overlap, which stays correct (each batch
//! skips rows another holds) but does the work twice.

mod archive;
mod checkpoints;
mod cleanup;
mod full_copy;
mod generations;
mod heap_walk;
mod progress;
mod repartition;
mod table_stats;
mod vacuum;
mod window_partitions;

use std::time::Duration;

pub(crate) use archive::{archive, get_archived, restore};
pub(crate) use checkpoints::{
    create as create_checkpoint, delete as delete_checkpoint, entries_page as checkpoint_entries,
    find as find_checkpoint, list as list_checkpoints, prune as prune_checkpoints,
    restore as restore_checkpoint,
};
pub use checkpoints::{CheckpointInfo, MAX_CHECKPOINT_NAME_LEN};
pub(crate) use cleanup::{sweep, Sweep};
pub use progress::{MaintenanceOptions, Progress};
use repartition::repartition;
pub use repartition::RepartitionReport;
pub(crate) use table_stats::{table_activity, table_sizes, table_statistics};
pub use table_stats::{PartitionStatistics, TableActivity, TableStatistics, EXACT_COUNT_LIMIT};
pub(crate) use vacuum::vacuum_analyze;
pub use window_partitions::DroppedPartition;
pub(crate) use window_partitions::{roll as roll_windows, settings as window_settings};

use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::coordination::{lock_key, Coordinator, HeldLock, LockMode};
use crate::state::error::{ErrorKind, StateError, StateResult};
use crate::state::ops::store::Store;

/// What a cleanup pass does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CleanupPlan {
    /// Delete expired entries and delete tombstones.
    pub expired: bool,
    /// Delete entries not written for this long (the retention policy's `max_age`).
    pub max_age: Option<Duration>,
    /// Rows per batch.
    pub batch_size: usize,
}

/// What a cleanup pass removed, from
/// [`apply_retention_policy_with`](crate::state::EnhancedPostgresBackend::apply_retention_policy_with).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Entries removed that a user could have read once: expired ones, and under an enabled
    /// retention policy those not written for its `max_age`; those in dropped partitions
    /// included. Delete tombstones are not entries: see `tombstones_removed`.
    pub entries_deleted: u64,
    /// Delete tombstones removed (the internal rows `delete` and `clear` leave so that
    /// versions never repeat), those in dropped partitions included.
    pub tombstones_removed: u64,
    /// Partitions dropped whole (tables partitioned by write window only), oldest first.
    pub partitions_dropped: Vec<DroppedPartition>,
}

/// One cleanup pass: the sweeps `plan` asks for, under the table's cleanup lock, waiting for it
/// up to `wait` (zero: skip the pass when another instance is running one). On a table
/// partitioned by write window, whole partitions go first. Returns what was removed, or `None`
/// when the pass was skipped.
pub(crate) async fn cleanup_pass(
    store: &Store,
    coordinator: &Coordinator,
    plan: CleanupPlan,
    wait: Duration,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<Option<RetentionReport>> {
    let held = match maintenance_lock(store, coordinator, wait).await {
        Ok(Some(held)) => Some(held),
        Ok(None) => return Ok(None),
        // No session for locks (PgBouncer's transaction pooling without a session URL).
        Err(e) if e.kind() == ErrorKind::Configuration => None,
        Err(e) => return Err(e),
    };
    let result = async {
        let mut report = RetentionReport::default();
        if store.ctx.names.windowed {
            report.partitions_dropped =
                window_partitions::drop_windows(store, plan.max_age, plan.expired).await?;
            for p in &report.partitions_dropped {
                report.tombstones_removed += p.tombstones;
                report.entries_deleted += p.rows.saturating_sub(p.tombstones);
            }
        }
        let mut rows = report.entries_deleted + report.tombstones_removed;
        progress(rows);
        let sweeps = [
            plan.expired.then_some(Sweep::Expired),
            plan.max_age.map(Sweep::OlderThan),
        ];
        for sweep_of in sweeps.into_iter().flatten() {
            let progress = |n| progress(rows + n);
            let removed = match heap_walk::extent(store, &sweep_of, plan.batch_size).await? {
                Some(extent) => heap_walk::sweep(store, &sweep_of, extent, &progress).await?,
                None => sweep(store, sweep_of, plan.batch_size, &progress).await?,
            };
            rows += removed.rows();
            report.entries_deleted += removed.entries;
            report.tombstones_removed += removed.tombstones;
        }
        Ok::<_, StateError>(report)
    }
    .await;
    if let Some(held) = held {
        release(coordinator, held).await;
    }
    if let Ok(r) = &result {
        if r.entries_deleted + r.tombstones_removed > 0 {
            tracing::info!(
                table = %store.ctx.names.qualified,
                entries = r.entries_deleted,
                tombstones = r.tombstones_removed,
                partitions = r.partitions_dropped.len(),
                "cleanup pass"
            );
        }
    }
    result.map(Some)
}

/// The table's maintenance lock (`pgstate cleanup of <schema>.<table>`), held by cleanup
/// passes and partitioning runs, waiting for it up to `wait`; `None` when another holds it.
async fn maintenance_lock(
    store: &Store,
    coordinator: &Coordinator,
    wait: Duration,
) -> StateResult<Option<HeldLock>> {
    let name = format!("pgstate cleanup of {}", store.ctx.names.qualified);
    coordinator
        .acquire(lock_key(&name), Some(&name), LockMode::Exclusive, wait)
        .await
}

async fn release(coordinator: &Coordinator, held: HeldLock) {
    if let Err(e) = coordinator.release(held).await {
        tracing::debug!(error = %e, "releasing the table's maintenance lock");
    }
}

/// Converts the state table to `strategy` online (see `repartition`), under the table's
/// maintenance lock (so no cleanup pass and no other conversion runs meanwhile), waiting for
/// it up to `wait`.
pub(crate) async fn repartition_table(
    store: &Store,
    coordinator: &Coordinator,
    strategy: &PartitionStrategy,
    batch_size: usize,
    wait: Duration,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> StateResult<RepartitionReport> {
    let Some(held) = maintenance_lock(store, coordinator, wait).await? else {
        return Err(StateError::Timeout(format!(
            "partitioning {}: a cleanup pass or another conversion held the table's maintenance \
             lock for {wait:?}",
            store.ctx.names.qualified
        )));
    };
    let result = repartition(store, strategy, batch_size, progress).await;
    release(coordinator, held).await;
    result
}
