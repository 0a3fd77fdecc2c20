//! [`TableStatistics`]: sizes, row counts, dead tuples and maintenance times of the state
//! table.

use std::time::SystemTime;

use crate::state::error::StateResult;
use crate::state::store::Store;

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
}

pub(crate) async fn table_statistics(store: &Store) -> StateResult<TableStatistics> {
    let t = &store.names.qualified;
    let sql = format!(
        "SELECT c.reltuples::bigint,
                pg_table_size(c.oid), pg_indexes_size(c.oid),
                CASE WHEN c.reltoastrelid = 0 THEN 0 ELSE pg_total_relation_size(c.reltoastrelid) END,
                coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0),
                s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
                (SELECT count(*) FROM {t} WHERE expires_at <= now())
         FROM pg_catalog.pg_class c
         LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.oid = $1::text::regclass"
    );
    let exact = format!("SELECT count(*) FROM {t}");
    let qualified = t.clone();
    let (row, counted) = store
        .on_primary(async |c| {
            use tokio_postgres::types::Type;
            let row = c
                .client
                .query_typed_one(&sql, &[(&qualified.as_str(), Type::TEXT)])
                .await?;
            let estimate: i64 = row.try_get(0)?;
            let counted: Option<i64> = if estimate < EXACT_COUNT_LIMIT {
                Some(c.client.query_typed_one(&exact, &[]).await?.try_get(0)?)
            } else {
                None
            };
            Ok((row, counted))
        })
        .await?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let estimate: i64 = row.try_get(0)?;
    let table_size = n(row.try_get(1)?);
    let live_tup = n(row.try_get(4)?);
    let dead = n(row.try_get(5)?);
    let expired = n(row.try_get(10)?);
    let total = counted.map_or(n(estimate), n);
    let bloat = if live_tup + dead == 0 {
        0
    } else {
        (table_size as f64 * dead as f64 / (live_tup + dead) as f64) as u64
    };
    Ok(TableStatistics {
        total_rows: total,
        active_rows: total.saturating_sub(expired),
        expired_rows: expired,
        counts_exact: counted.is_some(),
        table_size,
        indexes_size: n(row.try_get(2)?),
        toast_size: n(row.try_get(3)?),
        dead_tuples: dead,
        estimated_bloat_bytes: bloat,
        last_vacuum: row.try_get(6)?,
        last_autovacuum: row.try_get(7)?,
        last_analyze: row.try_get(8)?,
        last_autoanalyze: row.try_get(9)?,
    })
}
