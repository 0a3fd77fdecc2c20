//! The data-maintenance part of the facade: cleanup and retention, archive, VACUUM, table
//! statistics, checkpoints, the online conversion to a partitioned table, and the background
//! cleanup task.

use std::time::Duration;

use super::EnhancedPostgresBackend;
use crate::state::assembly::plan;
use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::error::StateResult;
use crate::state::maintenance::{
    self, CheckpointInfo, CleanupPlan, MaintenanceOptions, RepartitionReport, RetentionReport,
    TableActivity, TableStatistics,
};
use crate::state::ops::conn_ops::StateEntry;
use crate::state::ops::entry_copy::BatchEntry;

/// Data management: TTL cleanup and retention, archive, VACUUM, table statistics.
impl EnhancedPostgresBackend {
    /// Runs one retention pass now: deletes expired entries and delete tombstones and, when
    /// the [`RetentionPolicy`](crate::state::RetentionPolicy) is enabled, entries not written
    /// for its `max_age`, in batches of its `batch_size`. Waits (up to the operation timeout)
    /// while another instance runs a pass on the same table. Returns how many entries were
    /// deleted: those that had expired and those the policy aged out. Delete tombstones (the
    /// internal rows `delete` and `clear` leave) are removed too but not counted; the
    /// [`_with`](Self::apply_retention_policy_with) form counts them apart.
    ///
    /// Versions stay monotonic: a key re-created after its row was deleted starts above every
    /// version cleanup removed from the table.
    pub async fn apply_retention_policy(&self) -> StateResult<u64> {
        let report = self
            .apply_retention_policy_with(MaintenanceOptions::new())
            .await?;
        Ok(report.entries_deleted)
    }

    /// [`apply_retention_policy`](Self::apply_retention_policy) with `options` (progress:
    /// the rows removed so far, tombstones included, after each batch), reporting also the
    /// delete tombstones it removed and the partitions it dropped whole (on a table
    /// partitioned by time range: a window that ended more than `max_age` ago, or whose
    /// entries have all expired).
    pub async fn apply_retention_policy_with(
        &self,
        options: MaintenanceOptions<'_>,
    ) -> StateResult<RetentionReport> {
        let (plan, _) = plan(&self.inner.config);
        self.pass(
            CleanupPlan {
                expired: true,
                ..plan
            },
            &|n| options.done(n),
        )
        .await
    }

    /// Deletes expired entries and delete tombstones now (not the retention policy's old
    /// entries); returns how many entries had expired (tombstones, internal rows, are not
    /// counted).
    pub async fn cleanup_expired(&self) -> StateResult<u64> {
        self.inner.cleanup_expired(&self.session).await
    }

    async fn pass(
        &self,
        plan: CleanupPlan,
        progress: &(dyn Fn(u64) + Sync),
    ) -> StateResult<RetentionReport> {
        self.inner.pass(&self.session, plan, progress).await
    }

    /// Moves the entries not written for `older_than` into `archive_table` (in this backend's
    /// schema, created when missing like the default archive table: the state table's columns
    /// plus `archived_at`), in batches; returns how many moved. Each batch moves its rows in
    /// one statement, so an interruption neither loses nor duplicates any. `archive_table`
    /// must be a plain name (letters, digits, `_`): anything else is refused with nothing
    /// touched.
    pub async fn archive_old_data(
        &self,
        archive_table: &str,
        older_than: Duration,
    ) -> StateResult<u64> {
        self.archive_old_data_with(archive_table, older_than, MaintenanceOptions::new())
            .await
    }

    /// [`archive_old_data`](Self::archive_old_data) with `options` (progress: the entries
    /// moved so far, after each batch).
    pub async fn archive_old_data_with(
        &self,
        archive_table: &str,
        older_than: Duration,
        options: MaintenanceOptions<'_>,
    ) -> StateResult<u64> {
        let (plan, _) = plan(&self.inner.config);
        let store = self.store();
        let progress = |n| options.done(n);
        store
            .tracked(
                &self.session,
                maintenance::archive(store, archive_table, older_than, plan.batch_size, &progress),
            )
            .await
    }

    /// The newest entry archived under `key` in `archive_table`, if any.
    pub async fn get_archived(
        &self,
        archive_table: &str,
        key: &[u8],
    ) -> StateResult<Option<StateEntry>> {
        crate::state::limits::check_key(key)?;
        maintenance::get_archived(self.store(), archive_table, key).await
    }

    /// Moves the newest entry archived under `key` back into the state table, unless the key
    /// has a live entry; whether it did. The restored entry gets a new version.
    pub async fn restore_archived(&self, archive_table: &str, key: &[u8]) -> StateResult<bool> {
        crate::state::limits::check_key(key)?;
        let store = self.store();
        store
            .tracked(
                &self.session,
                maintenance::restore(store, archive_table, key),
            )
            .await
    }

    /// `VACUUM (ANALYZE)` of the state table; with `full`, `VACUUM (FULL, ANALYZE)`, which
    /// rewrites it under an exclusive lock (readers and writers wait). Runs on a connection of
    /// its own; waiting for the table's lock is bounded by the operation timeout.
    pub async fn vacuum_analyze(&self, full: bool) -> StateResult<()> {
        maintenance::vacuum_analyze(self.store(), full, self.store().ctx.limit).await
    }

    /// Sizes, row counts, dead tuples and maintenance times of the state table.
    pub async fn get_table_statistics(&self) -> StateResult<TableStatistics> {
        maintenance::table_statistics(self.store()).await
    }

    /// The server's activity counters of the state table: rows inserted, updated and deleted,
    /// index and sequential scans, by every client (see [`TableActivity`]). One cheap query on
    /// the statistics views, with no count of the rows: for a live view that polls.
    pub async fn get_table_activity(&self) -> StateResult<TableActivity> {
        maintenance::table_activity(self.store()).await
    }

    /// Takes a named checkpoint: the state at one instant (a write transaction is wholly
    /// before or after it; writers wait for that instant only). Incremental: it records where
    /// the current generation ends, and from then on the first change of an entry saves the
    /// entry as it was, so taking one costs the same whatever the state's size; counting what
    /// it holds (its `entry_count` and `data_size`) reads the table once, blocking nobody. On
    /// a Citus-distributed table it copies every live entry instead.
    pub async fn create_checkpoint(&self, name: &str) -> StateResult<CheckpointInfo> {
        self.create_checkpoint_with(name, MaintenanceOptions::new())
            .await
    }

    /// [`create_checkpoint`](Self::create_checkpoint) with `options` (progress: the entries it
    /// holds, once counted; on Citus, the entries copied so far after each chunk of 10 000).
    pub async fn create_checkpoint_with(
        &self,
        name: &str,
        options: MaintenanceOptions<'_>,
    ) -> StateResult<CheckpointInfo> {
        maintenance::create_checkpoint(self.store(), name, &|n| options.done(n)).await
    }

    /// This table's checkpoints, newest first.
    pub async fn list_checkpoints(&self) -> StateResult<Vec<CheckpointInfo>> {
        maintenance::list_checkpoints(self.store()).await
    }

    /// Replaces the live state with checkpoint `id`'s in one transaction: readers see the old
    /// state until it commits and the checkpoint's after, never a mix; writers wait for it.
    /// Only the entries changed since the checkpoint are rewritten: they get new versions (a
    /// version never repeats), and keys the checkpoint does not have are deleted
    /// (tombstones). Returns the entries the checkpoint holds.
    pub async fn restore_checkpoint(&self, id: i64) -> StateResult<u64> {
        let store = self.store();
        store
            .tracked(&self.session, maintenance::restore_checkpoint(store, id))
            .await
    }

    /// Up to `limit` (1 to [`MAX_PAGE`](crate::state::MAX_PAGE)) entries checkpoint `id`
    /// holds, in key order, after `after` (`None`: from the first): the entries that were live
    /// at its instant, as they were then. Pass the last key of a page as the next `after`.
    pub async fn checkpoint_entries(
        &self,
        id: i64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StateResult<Vec<StateEntry>> {
        maintenance::checkpoint_entries(self.store(), id, after, limit).await
    }

    /// Replaces the whole live state with `entries`, all or nothing: one transaction under an
    /// EXCLUSIVE lock (readers see the old state or the new one, never a mix), the entries
    /// loaded by binary COPY, the live keys not among them deleted (tombstones). Every entry
    /// is checked before anything is sent; the last occurrence of a key wins. For moving a
    /// checkpoint between databases (`pgstate checkpoint import`). Returns the number of
    /// distinct keys written.
    pub async fn replace_state(&self, entries: &[BatchEntry<'_>]) -> StateResult<u64> {
        self.store()
            .replace_with_entries(&self.session, entries)
            .await
    }

    /// Deletes checkpoint `id`; whether it existed.
    pub async fn delete_checkpoint(&self, id: i64) -> StateResult<bool> {
        maintenance::delete_checkpoint(self.store(), id).await
    }

    /// Deletes all but the newest `keep` checkpoints of this table; returns how many went.
    pub async fn prune_checkpoints(&self, keep: usize) -> StateResult<u64> {
        maintenance::prune_checkpoints(self.store(), keep).await
    }

    /// Converts this backend's state table, unpartitioned, to `strategy` while every backend
    /// on it keeps reading and writing: a partitioned copy is filled in batches of 10 000 rows
    /// (later writes reach it through a trigger), checked to hold exactly the table's rows, and
    /// swapped in under a lock held for a moment. Views on the table, its table privileges and
    /// owner, index names and the version floor carry over; backends started afterwards may
    /// say [`with_partitioning(strategy)`](crate::state::EnhancedPostgresConfig::with_partitioning).
    ///
    /// Does nothing (`converted: false`) when the table already has `strategy`. Refuses, before
    /// building anything: a table partitioned another way; time-range partitioning (running
    /// backends would need a restart); a table with what would not carry over (triggers, rules,
    /// row level security, column privileges, identity or generated columns, inheritance,
    /// publications, views with options, materialized views, foreign keys to or from it); a
    /// table Citus distributes; a connection through PgBouncer's
    /// transaction pooling. A failure before the swap leaves the table as it was; a cancelled
    /// run leaves its copy and trigger to the next run, which starts over. Waits up to the
    /// operation timeout for a cleanup pass on the table to finish.
    pub async fn migrate_to_partitioned(
        &self,
        strategy: PartitionStrategy,
    ) -> StateResult<RepartitionReport> {
        self.migrate_to_partitioned_with(strategy, MaintenanceOptions::new())
            .await
    }

    /// [`migrate_to_partitioned`](Self::migrate_to_partitioned) with `options` (progress: the
    /// rows copied so far and the estimated total, after each batch).
    pub async fn migrate_to_partitioned_with(
        &self,
        strategy: PartitionStrategy,
        options: MaintenanceOptions<'_>,
    ) -> StateResult<RepartitionReport> {
        let store = self.store();
        let progress = |copied, total| options.report(copied, Some(total));
        let work = maintenance::repartition_table(
            store,
            self.coordinator(),
            &strategy,
            MIGRATION_BATCH,
            store.ctx.limit,
            &progress,
        );
        store.tracked(&self.session, work).await
    }
}

/// Rows per batch of [`EnhancedPostgresBackend::migrate_to_partitioned`].
const MIGRATION_BATCH: usize = 10_000;
