//! [`TableStatistics`]: sizes, row counts, dead tuples and maintenance times of the state
//! table, and of each of its partitions when it is partitioned.

use std::time::SystemTime;

use tokio_postgres::types::Type;

use crate::state::error::StateResult;
use crate::state::ops::store::Store;

/// Rows above which row counts are estimates (from the planner's statistics) instead of an
/// exact `count(*)`.
pub const EXACT_COUNT_LIMIT: i64 = 1_000_000;

/// The state table as the server sees it, from
/// [`get_table_statistics`](crate::state::EnhancedPostgresBackend::get_table_statistics).
#[derive(Clone, Debug, PartialEq)]
pub struct TableStatistics {
    /// Rows in the table: live entries plus expired ones and delete tombstones not yet
    /// cleaned up. Exact up to [`EXACT_COUNT_LIMIT`] rows, an estimate above (see
    /// [`counts_exact`](Self::counts_exact)).
    pub total_rows: u64,
    /// Live entries (not expired, not deleted). Exact or estimated like `total_rows`.
    pub active_rows: u64,
    /// Expired entries and delete tombstones waiting for cleanup (always exact: counted on the
    /// expiry index).
    pub expired_rows: u64,
    /// Whether `total_rows` and `active_rows` are exact counts.
    pub counts_exact: bool,
    /// Bytes of the table: heap, TOAST, free-space and visibility maps (`pg_table_size`).
    pub table_size: u64,
    /// Bytes of its indexes (`pg_indexes_size`).
    pub indexes_size: u64,
    /// Bytes of its TOAST table and index (large values), part of `table_size`.
    pub toast_size: u64,
    /// Bytes of everything: the table (TOAST included) and its indexes
    /// (`pg_total_relation_size`, the sum of `table_size` and `indexes_size`).
    pub total_size: u64,
    /// Dead row versions not yet vacuumed (`pg_stat_user_tables.n_dead_tup`, an estimate).
    pub dead_tuples: u64,
    /// Estimated bytes taken by dead row versions: `table_size` times the share of dead
    /// tuples. An estimate, not a measurement (`pgstattuple` would measure).
    pub estimated_bloat_bytes: u64,
    /// When the table was last vacuumed by hand, if ever.
    pub last_vacuum: Option<SystemTime>,
    /// When autovacuum last processed it, if ever.
    pub last_autovacuum: Option<SystemTime>,
    /// When it was last analyzed by hand, if ever.
    pub last_analyze: Option<SystemTime>,
    /// When autovacuum last analyzed it, if ever.
    pub last_autoanalyze: Option<SystemTime>,
    /// Each partition's figures, in name order; empty when the table is not partitioned. For
    /// a partitioned table the figures above are the partitions' sums, and each time above is
    /// the least recent among the partitions (`None` when one of them never had it).
    pub partitions: Vec<PartitionStatistics>,
}

/// One partition of the state table, in [`TableStatistics::partitions`].
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionStatistics {
    /// The partition's table name (in the state table's schema).
    pub name: String,
    /// Its bound, as PostgreSQL prints it (`FOR VALUES WITH (modulus 16, remainder 3)`).
    pub bound: String,
    /// Its figures (with no partitions of its own).
    pub statistics: TableStatistics,
}

/// The table itself when it is not partitioned, else its leaf partitions (`$1` the table).
const LEAVES: &str = "WITH leaves AS (
             SELECT relid FROM pg_catalog.pg_partition_tree($1::text::regclass) WHERE isleaf
             UNION ALL
             SELECT $1::text::regclass WHERE NOT EXISTS
                 (SELECT 1 FROM pg_catalog.pg_partitioned_table WHERE partrelid = $1::text::regclass))";

/// The server's activity counters of the state table (over all its partitions), from
/// [`get_table_activity`](crate::state::EnhancedPostgresBackend::get_table_activity): every
/// client's work, not only this backend's. Cumulative since the server's statistics were last
/// reset; PostgreSQL updates them when transactions end (a busy session reports about once a
/// second), so a rate is the difference of two readings over their interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableActivity {
    /// Rows inserted (`n_tup_ins`): puts of new keys, batch and COPY rows.
    pub rows_inserted: u64,
    /// Rows updated (`n_tup_upd`): puts of existing keys, deletes (which leave tombstones).
    pub rows_updated: u64,
    /// Rows deleted (`n_tup_del`): cleanup, archive, retention.
    pub rows_deleted: u64,
    /// Index scans (`idx_scan`): point reads, range scans, conflict checks.
    pub index_scans: u64,
    /// Sequential scans (`seq_scan`).
    pub sequential_scans: u64,
    /// Live rows as the server estimates them (`n_live_tup`).
    pub live_rows_estimate: u64,
    /// Dead row versions not yet vacuumed (`n_dead_tup`).
    pub dead_tuples: u64,
}

/// The state table's bytes in all (table, TOAST and indexes) and of the table alone (TOAST
/// included), over its partitions when it has any: two catalog lookups, no row count.
pub(crate) async fn table_sizes(store: &Store) -> StateResult<(i64, i64)> {
    // A table that is not partitioned has no leaves of its own: it is its one leaf.
    let sql = "WITH leaves AS (SELECT relid FROM pg_partition_tree($1::text::regclass) \
                               WHERE isleaf) \
               SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint, \
                      coalesce(sum(pg_table_size(relid)), 0)::bigint \
               FROM (SELECT relid FROM leaves UNION ALL SELECT $1::text::regclass \
                     WHERE NOT EXISTS (SELECT 1 FROM leaves)) t";
    let table = store.ctx.names.qualified.clone();
    let row = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed_one(sql, &[(&table.as_str(), Type::TEXT)])
                .await?)
        })
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// One statement over `pg_stat_user_tables`: cheap enough to call every second.
pub(crate) async fn table_activity(store: &Store) -> StateResult<TableActivity> {
    let sql = format!(
        "{LEAVES}
         SELECT coalesce(sum(s.n_tup_ins), 0)::bigint, coalesce(sum(s.n_tup_upd), 0)::bigint,
                coalesce(sum(s.n_tup_del), 0)::bigint, coalesce(sum(s.idx_scan), 0)::bigint,
                coalesce(sum(s.seq_scan), 0)::bigint, coalesce(sum(s.n_live_tup), 0)::bigint,
                coalesce(sum(s.n_dead_tup), 0)::bigint
         FROM leaves l LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = l.relid"
    );
    let qualified = store.ctx.names.qualified.clone();
    let row = store
        .on_primary(async |c| {
            use tokio_postgres::types::Type;
            Ok(c.client
                .query_typed(&sql, &[(&qualified.as_str(), Type::TEXT)])
                .await?)
        })
        .await?;
    let Some(row) = row.first() else {
        return Ok(TableActivity::default());
    };
    Ok(TableActivity {
        rows_inserted: n(row.try_get(0)?),
        rows_updated: n(row.try_get(1)?),
        rows_deleted: n(row.try_get(2)?),
        index_scans: n(row.try_get(3)?),
        sequential_scans: n(row.try_get(4)?),
        live_rows_estimate: n(row.try_get(5)?),
        dead_tuples: n(row.try_get(6)?),
    })
}

pub(crate) async fn table_statistics(store: &Store) -> StateResult<TableStatistics> {
    let t = &store.ctx.names.qualified;
    let leaves_sql = &format!(
        "{LEAVES}
         SELECT c.oid, c.relname::text, coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
                greatest(c.reltuples, 0)::bigint,
                pg_table_size(c.oid), pg_indexes_size(c.oid),
                CASE WHEN c.reltoastrelid = 0 THEN 0 ELSE pg_total_relation_size(c.reltoastrelid) END,
                coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0),
                s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
                c.relispartition
         FROM leaves l
         JOIN pg_catalog.pg_class c ON c.oid = l.relid
         LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
         ORDER BY c.relname"
    );
    let expired_sql =
        format!("SELECT tableoid, count(*) FROM {t} WHERE expires_at <= statement_timestamp() GROUP BY tableoid");
    let exact_sql = format!("SELECT tableoid, count(*) FROM {t} GROUP BY tableoid");
    let qualified = t.clone();
    let (leaves, expired, counted) = store
        .on_primary(async |c| {
            use tokio_postgres::types::Type;
            let leaves = c
                .client
                .query_typed(leaves_sql, &[(&qualified.as_str(), Type::TEXT)])
                .await?;
            let mut estimate = 0i64;
            for row in &leaves {
                estimate = estimate.saturating_add(row.try_get(3)?);
            }
            let expired = c.client.query_typed(&expired_sql, &[]).await?;
            let counted = if estimate < EXACT_COUNT_LIMIT {
                Some(c.client.query_typed(&exact_sql, &[]).await?)
            } else {
                None
            };
            Ok((leaves, expired, counted))
        })
        .await?;
    let per_oid =
        |rows: &[tokio_postgres::Row]| -> StateResult<std::collections::HashMap<u32, u64>> {
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, n(r.try_get(1)?))))
                .collect()
        };
    let expired = per_oid(&expired)?;
    let counted = counted.as_deref().map(per_oid).transpose()?;
    let mut parts = Vec::with_capacity(leaves.len());
    let mut partitioned = false;
    for row in &leaves {
        partitioned |= row.try_get::<_, bool>(13)?;
        parts.push(leaf_statistics(row, &expired, counted.as_ref())?);
    }
    if !partitioned {
        if let Some(only) = parts.pop() {
            return Ok(only.statistics);
        }
    }
    Ok(sum(parts, counted.is_some()))
}

fn n(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A partitioned table's figures: its partitions' sums, and the least recent of their times.
fn sum(parts: Vec<PartitionStatistics>, counts_exact: bool) -> TableStatistics {
    let each = |f: fn(&TableStatistics) -> u64| parts.iter().map(|p| f(&p.statistics)).sum();
    let least_recent = |f: fn(&TableStatistics) -> Option<SystemTime>| {
        parts
            .iter()
            .map(|p| f(&p.statistics))
            .collect::<Option<Vec<_>>>()
            .and_then(|times| times.into_iter().min())
    };
    TableStatistics {
        total_rows: each(|s| s.total_rows),
        active_rows: each(|s| s.active_rows),
        expired_rows: each(|s| s.expired_rows),
        counts_exact,
        table_size: each(|s| s.table_size),
        indexes_size: each(|s| s.indexes_size),
        toast_size: each(|s| s.toast_size),
        total_size: each(|s| s.total_size),
        dead_tuples: each(|s| s.dead_tuples),
        estimated_bloat_bytes: each(|s| s.estimated_bloat_bytes),
        last_vacuum: least_recent(|s| s.last_vacuum),
        last_autovacuum: least_recent(|s| s.last_autovacuum),
        last_analyze: least_recent(|s| s.last_analyze),
        last_autoanalyze: least_recent(|s| s.last_autoanalyze),
        partitions: parts,
    }
}

/// One leaf table's figures, from its row of the catalog query in [`table_statistics`], its
/// expired rows and (when counted) its exact row count, by table oid.
fn leaf_statistics(
    row: &tokio_postgres::Row,
    expired: &std::collections::HashMap<u32, u64>,
    counted: Option<&std::collections::HashMap<u32, u64>>,
) -> StateResult<PartitionStatistics> {
    let oid: u32 = row.try_get(0)?;
    let table_size = n(row.try_get(4)?);
    let indexes_size = n(row.try_get(5)?);
    let live_tup = n(row.try_get(7)?);
    let dead = n(row.try_get(8)?);
    let expired = expired.get(&oid).copied().unwrap_or(0);
    let total = match counted {
        Some(counts) => counts.get(&oid).copied().unwrap_or(0),
        None => n(row.try_get(3)?),
    };
    let bloat = if live_tup + dead == 0 {
        0
    } else {
        (table_size as f64 * dead as f64 / (live_tup + dead) as f64) as u64
    };
    Ok(PartitionStatistics {
        name: row.try_get(1)?,
        bound: row.try_get(2)?,
        statistics: TableStatistics {
            total_rows: total,
            active_rows: total.saturating_sub(expired),
            expired_rows: expired,
            counts_exact: counted.is_some(),
            table_size,
            indexes_size,
            toast_size: n(row.try_get(6)?),
            total_size: table_size + indexes_size,
            dead_tuples: dead,
            estimated_bloat_bytes: bloat,
            last_vacuum: row.try_get(9)?,
            last_autovacuum: row.try_get(10)?,
            last_analyze: row.try_get(11)?,
            last_autoanalyze: row.try_get(12)?,
            partitions: Vec::new(),
        },
    })
}
