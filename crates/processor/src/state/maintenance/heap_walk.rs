//! Cleanup in heap order: for a sweep that removes a large share of a table, walking the
//! index row by row (the `cleanup` module's walk) costs an index probe and a row lock per
//! victim. This walk reads the table's pages in order instead, a range of pages per batch
//! (`ctid` between two page numbers: a TID range scan), deleting what qualifies there, as one
//! `DELETE` over the whole table would, in short transactions. Each is:
//!
//! 1. `BEGIN`, `lock_timeout` and the version floor's lock (exclusive), in one message;
//! 2. the delete of the range, which also raises the floor to the highest version removed;
//! 3. `COMMIT`.
//!
//! A batch costs one round trip: its delete and `COMMIT` go out with the next batch's step 1.
//!
//! The commits but the last do not wait for their WAL to reach disk or synchronous replicas
//! (`synchronous_commit = off`); the last one's does, which makes every batch durable before
//! the pass reports its count (each batch writes WAL, if only its floor update). A crash during the walk can undo its last few batches, consistently
//! (rows and floor together, WAL being in order): rows removed by age come back, expired rows
//! and tombstones come back unread, all for the next pass.
//!
//! Writers wait as they do for the index walk: at most for the floor lock's queueing
//! (`lock_timeout`, 100 ms) and one statement over about `batch_size` rows. A victim row a
//! writer holds makes the delete wait for at most the same `lock_timeout`; it then fails,
//! the batch rolls back, and the range is done again with its victims picked
//! `FOR UPDATE SKIP LOCKED` (rows a writer holds stay for the next pass).
//!
//! The walk covers the pages the table had when it started (every partition's, on a
//! partitioned table: a range of page numbers covers it in each partition). A row written
//! since is not expired (nor aged out), whichever page it went to.

use futures_util::future::join3;
use tokio_postgres::types::{ToSql, Type};

use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::maintenance::cleanup::{floor_lock_kept, Removed, Sweep, FLOOR_LOCK_WAIT};
use crate::state::ops::store::Store;
use crate::state::pool::checkout::Checkout;
use crate::state::schema::locks::xact_lock_statement;
use crate::state::schema::names::TableNames;

/// Pages the walk covers at least: smaller tables take the index walk (a batch or two
/// either way).
const MIN_PAGES: i64 = 8;
/// The share of the table a sweep must remove for the heap walk: below it, reading every
/// page (and taking the floor lock for each range, victims or not) would cost more than the
/// index walk, which takes the lock only for batches that remove rows.
const VICTIM_SHARE: f64 = 0.2;
/// Pages sampled (`TABLESAMPLE SYSTEM`) to find that share.
const SAMPLE_PAGES: f64 = 200.0;

/// The walk's extent, read when it starts.
pub(crate) struct Extent {
    /// Pages of the largest partition (of the table, when it is not partitioned).
    pages: i64,
    /// Pages per batch: about `batch_size` rows in all partitions together.
    step: i64,
}

/// The table's size, when the heap walk suits `sweep`; `None` when the index walk does: a
/// small table, a distributed one, a server older than PostgreSQL 14, an archive sweep, or
/// victims under [`VICTIM_SHARE`] of a sample of the table's pages.
pub(crate) async fn extent(
    store: &Store,
    sweep: &Sweep,
    batch_size: usize,
) -> StateResult<Option<Extent>> {
    let names = &store.ctx.names;
    if names.distributed || matches!(sweep, Sweep::Archive(..)) {
        return Ok(None);
    }
    // The table's leaves: itself, or its partitions (`pg_partition_tree` lists nothing for
    // a table that is not partitioned).
    let sql = "WITH t AS (SELECT $1::text::regclass AS oid), \
                    leaves AS (SELECT c.oid FROM pg_catalog.pg_class c, t \
                               WHERE c.oid = t.oid AND c.relkind <> 'p' \
                               UNION ALL \
                               SELECT p.relid FROM t, pg_catalog.pg_partition_tree(t.oid) p \
                               WHERE p.isleaf) \
               SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8, \
                      coalesce(sum(c.relpages), 0)::int8, \
                      coalesce(max(pg_catalog.pg_relation_size(c.oid)), 0)::int8, \
                      coalesce(sum(pg_catalog.pg_relation_size(c.oid)), 0)::int8, \
                      current_setting('block_size')::int8, \
                      current_setting('server_version_num')::int8 \
               FROM leaves l JOIN pg_catalog.pg_class c ON c.oid = l.oid";
    // The share of victims in a sample of about SAMPLE_PAGES pages (`$2` the age).
    let sample = format!(
        "SELECT count(*) FILTER (WHERE {})::int8, count(*)::int8 \
         FROM {} TABLESAMPLE SYSTEM ($1::float8)",
        qualifies(sweep, 2),
        names.qualified
    );
    let age = sweep_age(sweep);
    store
        .on_primary(async |c| {
            let row = c
                .client
                .query_typed_one(sql, &[(&names.qualified.as_str(), Type::TEXT)])
                .await?;
            let (tuples, relpages): (f64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let (largest, total, block): (i64, i64, i64) =
                (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
            // TID range scans came with PostgreSQL 14: before it, each batch would read the
            // whole table.
            let version: i64 = row.try_get(5)?;
            if version < 140_000 {
                return Ok(None);
            }
            let block = block.max(1);
            let (pages, total_pages) = ((largest + block - 1) / block, total / block);
            if total_pages < MIN_PAGES {
                return Ok(None);
            }
            // Rows per page as the statistics last saw them (a guess for a table never
            // analyzed).
            let per_page = if relpages > 0 && tuples > 0.0 {
                tuples / relpages as f64
            } else {
                50.0
            };
            let percent = (100.0 * SAMPLE_PAGES / total_pages as f64).min(100.0);
            let row = c
                .client
                .query_typed_one(&sample, &[(&percent, Type::FLOAT8), (&age, Type::FLOAT8)])
                .await?;
            let (found, seen): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if seen == 0 || (found as f64) < seen as f64 * VICTIM_SHARE {
                return Ok(None);
            }
            // About `batch_size` rows per range: the rows of all partitions spread over the
            // largest one's page numbers (partitions of unequal size give some ranges more
            // rows, some fewer).
            let rows = (per_page * total_pages as f64).max(1.0);
            let step =
                ((batch_size as f64 * pages as f64 / rows).floor() as i64).clamp(1, pages.max(1));
            Ok(Some(Extent { pages, step }))
        })
        .await
}

/// What `sweep` removes, as a condition on a row, with the age in seconds in parameter
/// `$age` (unused for expired rows, but typed).
fn qualifies(sweep: &Sweep, age: usize) -> String {
    match sweep {
        Sweep::Expired => {
            format!("expires_at <= statement_timestamp() AND ${age}::float8 IS NOT NULL")
        }
        _ => format!("updated_at < statement_timestamp() - ${age}::float8 * interval '1 second'"),
    }
}

/// The age of a sweep by age, in seconds (0 for expired rows).
fn sweep_age(sweep: &Sweep) -> f64 {
    match sweep {
        Sweep::OlderThan(age) | Sweep::Archive(age, _) => age.as_secs_f64(),
        Sweep::Expired => 0.0,
    }
}

/// The delete of one range: `$1` and `$2` the range's first and end page as `tid` text,
/// `$3` the floor sequence's name, `$4` the age in seconds (unused for expired rows).
/// Returns entries, tombstones, the highest version removed; raises the floor to it (and
/// writes the floor even when nothing was removed, so that every batch writes WAL).
/// `locked`: victims picked `FOR UPDATE SKIP LOCKED` (never waits for a writer's row).
fn remove_sql(names: &TableNames, sweep: &Sweep, locked: bool) -> String {
    let t = &names.qualified;
    let qualifies = qualifies(sweep, 4);
    let range = "ctid >= $1::text::tid AND ctid < $2::text::tid";
    let target = if locked {
        format!(
            "key = ANY(ARRAY(SELECT key FROM {t} WHERE {range} AND {qualifies} \
             FOR UPDATE SKIP LOCKED)) AND {qualifies}"
        )
    } else {
        format!("{range} AND {qualifies}")
    };
    format!(
        "WITH gone AS (DELETE FROM {t} WHERE {target} \
                       RETURNING version, coalesce(expires_at = '-infinity', false) AS tombstone), \
              summed AS (SELECT count(*) FILTER (WHERE NOT tombstone)::int8 AS entries, \
                                count(*) FILTER (WHERE tombstone)::int8 AS tombstones, \
                                max(version) AS highest FROM gone) \
         SELECT entries, tombstones, coalesce(highest, 0)::int8, \
                (SELECT setval($3::text::regclass, GREATEST(f.last_value, s.highest)) \
                 FROM {floor} f) \
         FROM summed s",
        floor = names.version_floor
    )
}

/// Removes what `sweep` selects over `extent`, a range of pages per batch; `progress` gets
/// the running total of rows after each batch.
///
/// Each batch's `COMMIT` goes out with the next batch's `BEGIN` and floor lock right behind
/// it, so that a batch costs one round trip: the floor lock is then free only between one
/// batch's commit and the next one's request, which writers queued for it meanwhile get
/// first (they asked before it).
///
/// One checkout for the whole walk, marked as in a transaction: a walk dropped half-way
/// leaves its transaction rolled back before the connection is reused.
pub(crate) async fn sweep(
    store: &Store,
    sweep: &Sweep,
    extent: Extent,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<Removed> {
    let names = &store.ctx.names;
    let age = sweep_age(sweep);
    let (fast, careful) = (
        remove_sql(names, sweep, false),
        remove_sql(names, sweep, true),
    );
    // One message: after a failed statement the server skips the rest of it, so the lock is
    // only ever taken inside the transaction. Every batch but the last commits without
    // waiting for its WAL; the last one's commit waits, and with it for every earlier
    // batch's (each batch writes WAL: its floor update, whatever it removed).
    let begin = |flush: bool| {
        format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {};{} {}",
            FLOOR_LOCK_WAIT.as_millis(),
            if flush {
                ""
            } else {
                " SET LOCAL synchronous_commit = off;"
            },
            xact_lock_statement(names.floor_lock)
        )
    };
    let (begin_async, begin_last) = (begin(false), begin(true));
    // The BEGIN of the range that starts at page `first`.
    let begin_at = |first: i64| {
        if first.saturating_add(extent.step) >= extent.pages {
            &begin_last
        } else {
            &begin_async
        }
    };
    let mut conn = store.ctx.bounded(store.ctx.primary.get()).await?;
    conn.set_in_transaction(true);
    let mut total = Removed::default();
    let (mut first, mut contended, mut careful_now) = (0i64, 0u32, false);
    // Whether a transaction holding the floor lock is open.
    let mut open = false;
    while first < extent.pages {
        if !open {
            let begun = store
                .ctx
                .bounded(conn.run(|c| async {
                    Ok::<_, StateError>(c.client.batch_execute(begin_at(first)).await)
                }))
                .await?;
            match begun {
                Ok(()) => {}
                Err(e) => {
                    rollback(store, &mut conn).await?;
                    contended = floor_held(e, contended, names, total)?;
                    continue;
                }
            }
        }
        let end = first.saturating_add(extent.step).min(extent.pages);
        let more = end < extent.pages;
        let (first_tid, end_tid) = (format!("({first},0)"), format!("({end},0)"));
        let remove = if careful_now { &careful } else { &fast };
        let (removed, committed, next) = store
            .ctx
            .bounded(conn.run(|c| async {
                let sequence = names.version_floor.as_str();
                let (first_tid, end_tid) = (first_tid.as_str(), end_tid.as_str());
                let params: [(&(dyn ToSql + Sync), Type); 4] = [
                    (&first_tid, Type::TEXT),
                    (&end_tid, Type::TEXT),
                    (&sequence, Type::TEXT),
                    (&age, Type::FLOAT8),
                ];
                // Prepared (once per connection) before anything else goes out: the delete
                // must reach the server ahead of its COMMIT.
                let types = params.clone().map(|(_, t)| t);
                let prepared = c
                    .cache
                    .get(&c.client, c.stmts.unnamed(), remove, &types)
                    .await?;
                let values = params.clone().map(|(v, _)| v);
                let delete = async {
                    match &prepared {
                        Some(stmt) => c.client.query_one(stmt, &values).await,
                        None => c.client.query_typed_one(remove, &params).await,
                    }
                };
                // If the delete fails, the server ends its transaction with a rollback.
                let commit = c.client.batch_execute("COMMIT");
                let next = async {
                    if !more {
                        return None;
                    }
                    Some(c.client.batch_execute(begin_at(end)).await)
                };
                Ok::<_, StateError>(join3(delete, commit, next).await)
            }))
            .await?;
        open = false;
        let outcome = match removed {
            Ok(row) => {
                let count = |i: usize| -> StateResult<u64> {
                    Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
                };
                committed.map_err(StateError::from).and_then(|()| {
                    Ok(Removed {
                        entries: count(0)?,
                        tombstones: count(1)?,
                    })
                })
            }
            Err(e) => Err(e.into()),
        };
        // The batch first: one that committed counts even if the next one's lock fails.
        match outcome {
            Ok(removed) => {
                total.entries += removed.entries;
                total.tombstones += removed.tombstones;
                progress(total.rows());
                first = end;
                careful_now = false;
            }
            // A writer held a victim row past `lock_timeout`: the range again, skipping
            // the rows writers hold.
            Err(e) if !careful_now && e.sqlstate() == Some(sqlstate::LOCK_NOT_AVAILABLE) => {
                careful_now = true;
            }
            // (A transaction the next BEGIN opened is rolled back with the checkout.)
            Err(e) => return Err(e),
        }
        match next {
            None => {}
            Some(Ok(())) => {
                open = true;
                contended = 0;
            }
            Some(Err(e)) => {
                rollback(store, &mut conn).await?;
                contended = floor_held(e, contended, names, total)?;
            }
        }
    }
    if open {
        rollback(store, &mut conn).await?;
    }
    conn.set_in_transaction(false);
    Ok(total)
}

/// Ends the open transaction on `conn`, bounded by the operation timeout.
async fn rollback(store: &Store, conn: &mut Checkout) -> StateResult<()> {
    store
        .ctx
        .bounded(conn.run(|c| async {
            c.client.batch_execute("ROLLBACK").await?;
            Ok(())
        }))
        .await
}

/// After the floor lock could not be taken (`e`): the contended count to go on with, or the
/// error that ends the walk (another error, or the lock kept too long).
fn floor_held(
    e: tokio_postgres::Error,
    contended: u32,
    names: &TableNames,
    total: Removed,
) -> StateResult<u32> {
    if e.code().map(|c| c.code()) != Some(sqlstate::LOCK_NOT_AVAILABLE) {
        return Err(e.into());
    }
    floor_lock_kept(names, contended, total)
}
