//! The partitions of a table partitioned by write window, over time: starting the window of
//! now (its partition and `premake` more created ahead), and dropping whole partitions whose
//! entries retention or expiry would delete anyway.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

use crate::state::config::enhanced::EnhancedPostgresConfig;
use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::ops::store::Store;
use crate::state::retry::{lock_busy, while_lock_busy};
use crate::state::schema::floor;
use crate::state::schema::history;
use crate::state::schema::partitions;
use crate::state::schema::windows::{self, Advance};

/// A partition dropped whole by a cleanup pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedPartition {
    /// The partition's table name.
    pub name: String,
    /// Its window: entries last written from `window_start` until the window ended.
    pub window_start: SystemTime,
    /// When the next window became current (for a window that never became current, its
    /// nominal end).
    pub ended: SystemTime,
    /// Rows it held (expired entries and tombstones included), counted just before the drop
    /// (an entry a write moved out meanwhile is counted but kept).
    pub rows: u64,
    /// Of `rows`, the delete tombstones (internal rows, never an entry of the user's).
    pub tombstones: u64,
}

/// How long a window change or a partition drop waits for the table's locks before it gives
/// up for this round (writers would queue behind it meanwhile).
const LOCK_WAIT_MS: u32 = 100;
const ATTEMPTS: u32 = 20;
/// Attempts at dropping one window's partition in a pass.
const DROP_ATTEMPTS: u32 = 10;

/// Windows created ahead of the current one when the table is partitioned by write window
/// but the configuration does not say how.
const DEFAULT_PREMAKE: u32 = 2;

/// The write windows' length and how many to create ahead, when the table is partitioned by
/// write window.
pub(crate) async fn settings(
    store: &Store,
    config: &EnhancedPostgresConfig,
) -> StateResult<Option<(Duration, u32)>> {
    if !store.ctx.names.windowed {
        return Ok(None);
    }
    if let Some(PartitionStrategy::TimeRange { interval, premake }) = &config.partitioning {
        return Ok(Some((*interval, *premake)));
    }
    Ok(interval(store).await?.map(|i| (i, DEFAULT_PREMAKE)))
}

/// The window length of a table partitioned by write window, from its windows.
pub(crate) async fn interval(store: &Store) -> StateResult<Option<Duration>> {
    let sql = format!(
        "SELECT extract(epoch FROM window_end - window_start)::float8 FROM {} \
         ORDER BY window_start DESC LIMIT 1",
        store.ctx.names.windows
    );
    let seconds: Option<f64> = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed_opt(&sql, &[])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?)
        })
        .await?;
    Ok(seconds.map(Duration::from_secs_f64))
}

/// Makes the window of now current and creates the partitions of the `premake` windows after
/// it, where missing; returns whether the current window changed. The change is retried while
/// the floor lock is busy; the partitions ahead get one attempt a round (more when the window
/// of now has none). The change needs only the floor lock and uses partitions made
/// at earlier rounds; creating a partition waits for every transaction using the table
/// (PostgreSQL locks the parent), so while one runs for long the partitions wait for a later
/// round. After a downtime longer than `premake` windows the window of now has no partition:
/// it is created, then the change is made.
pub(crate) async fn roll(store: &Store, interval: Duration, premake: u32) -> StateResult<bool> {
    let names = &store.ctx.names;
    // New partitions take the storage settings of the newest one.
    let newest = "SELECT format('%s.%I', $1::text, c.relname) FROM pg_catalog.pg_inherits i \
                  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
                  WHERE i.inhparent = $2::text::regclass ORDER BY c.relname DESC LIMIT 1";
    let schema = names.schema.to_string();
    // The change first, with partitions made at earlier rounds; when the window of now has
    // none (after a downtime), again once they are made.
    let mut outcome = advance_retrying(store, interval).await?;
    // Partitions ahead get one attempt a round (each waits for the table's users), unless the
    // window of now needs one.
    let attempts = if outcome == Advance::NoPartition {
        ATTEMPTS
    } else {
        1
    };
    match while_lock_busy(attempts, || {
        make_ahead(store, newest, &schema, interval, premake)
    })
    .await
    {
        Err(e) if lock_busy(&e) => {
            tracing::debug!(table = %names.qualified, "partitions ahead not created: the table is busy");
        }
        other => other?,
    }
    if outcome == Advance::NoPartition {
        outcome = advance_retrying(store, interval).await?;
    }
    match outcome {
        Advance::Changed => {
            tracing::info!(table = %names.qualified, "a new write window started");
            Ok(true)
        }
        Advance::Current => Ok(false),
        Advance::NoPartition => Err(StateError::StorageError {
            message: format!(
                "the write window of now has no partition of {} yet: the table was too busy \
                 to create it; writes go on into the previous window",
                names.qualified
            ),
            sqlstate: Some(sqlstate::LOCK_NOT_AVAILABLE.to_string()),
        }),
    }
}

async fn advance_retrying(store: &Store, interval: Duration) -> StateResult<Advance> {
    while_lock_busy(ATTEMPTS, || advance(store, interval)).await
}

/// One attempt at creating the partitions ahead.
async fn make_ahead(
    store: &Store,
    newest: &str,
    schema: &str,
    interval: Duration,
    premake: u32,
) -> StateResult<()> {
    let names = &store.ctx.names;
    store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            tx.batch_execute(&format!("SET LOCAL lock_timeout = {LOCK_WAIT_MS}"))
                .await?;
            let model: Option<String> = tx
                .query_typed_opt(
                    newest,
                    &[
                        (&schema, Type::TEXT),
                        (&names.qualified.as_str(), Type::TEXT),
                    ],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            let options = match model {
                Some(m) => partitions::storage_options(&tx, &m).await?,
                None => String::new(),
            };
            windows::premake(&tx, names, &names.qualified, interval, premake, &options).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
}

/// One attempt at changing to the window of now.
async fn advance(store: &Store, interval: Duration) -> StateResult<Advance> {
    store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            tx.batch_execute(&format!("SET LOCAL lock_timeout = {LOCK_WAIT_MS}"))
                .await?;
            let outcome = windows::advance(&tx, &store.ctx.names, interval).await?;
            // Without a partition for the window of now, the current window stays as it was.
            if outcome == Advance::Changed {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok(outcome)
        })
        .await
}

/// Drops the partitions of windows that ended, whose entries are all to be deleted: every
/// one, when the window ended more than `max_age` ago (its entries were last written before
/// that), or, with `expired`, when none of its entries is live. Each partition goes in a
/// transaction of its own that takes the floor lock (so versions of the dropped entries are
/// never reused) and waits for the table's locks at most 100 ms (a busy partition is left for
/// the next pass). Returns the partitions dropped, oldest first.
pub(crate) async fn drop_windows(
    store: &Store,
    max_age: Option<Duration>,
    expired: bool,
) -> StateResult<Vec<DroppedPartition>> {
    let names = &store.ctx.names;
    let w = &names.windows;
    let max_age_s = max_age.map(|a| a.as_secs_f64());
    // The partition of each window that ended (or never started and is past), oldest first.
    let candidates_sql = format!(
        "SELECT c.relname::text, w.window_start, coalesce(w.ended, w.window_end),
                $2::float8 IS NOT NULL AND coalesce(w.ended, w.window_end) <= now() - $2 * interval '1 second'
         FROM {w} w
         JOIN pg_catalog.pg_inherits i ON i.inhparent = $1::text::regclass
         JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
         WHERE c.relname = $3 || to_char(w.window_start AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS')
           AND (w.ended IS NOT NULL OR (w.became_current IS NULL AND w.window_end <= now()))
         ORDER BY w.window_start"
    );
    let prefix = format!("{}_w", names.table.as_str());
    let candidates = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed(
                    &candidates_sql,
                    &[
                        (&names.qualified.as_str(), Type::TEXT),
                        (&max_age_s, Type::FLOAT8),
                        (&prefix.as_str(), Type::TEXT),
                    ],
                )
                .await?)
        })
        .await?;
    let mut dropped = Vec::new();
    for row in &candidates {
        let name: String = row.try_get(0)?;
        let start: SystemTime = row.try_get(1)?;
        let ended: SystemTime = row.try_get(2)?;
        let past_max_age: bool = row.try_get(3)?;
        if !past_max_age && !expired {
            continue;
        }
        // A busy table is tried a few times: the row sweeps of this pass would otherwise
        // delete the window's entries one by one.
        let outcome = while_lock_busy(DROP_ATTEMPTS, || {
            drop_one(store, &name, start, past_max_age)
        })
        .await;
        match outcome {
            Ok(Some((rows, tombstones))) => {
                tracing::info!(table = %names.qualified, partition = %name, rows, "dropped a write window's partition");
                dropped.push(DroppedPartition {
                    name,
                    window_start: start,
                    ended,
                    rows,
                    tombstones,
                });
            }
            Ok(None) => {}
            Err(e) if lock_busy(&e) => {
                tracing::debug!(partition = %name, "partition busy: left for the next pass");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(dropped)
}

/// Drops one window's partition (unless, `!unconditional`, it holds a live entry): returns
/// the rows it held and how many of them were tombstones, or `None` when it was kept.
///
/// A window that ended only loses rows (every write moves its entry to the current window), so
/// what is read before taking any lock stays true: a live entry stays live until a write moves
/// it out, and no version grows. The drop itself then holds the table exclusively for a moment
/// only (after waiting at most 100 ms for statements in flight), and takes the locks in the
/// order writers do (the table first, then the floor lock).
async fn drop_one(
    store: &Store,
    name: &str,
    start: SystemTime,
    unconditional: bool,
) -> StateResult<Option<(u64, u64)>> {
    let names = &store.ctx.names;
    let s = &names.schema;
    let part = crate::state::ident::Ident::new("partition", name)?;
    let t = &names.qualified;
    let any_live = format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.{part} WHERE expires_at IS NULL OR expires_at > statement_timestamp())"
    );
    let contents = format!(
        "SELECT count(*)::bigint, count(*) FILTER (WHERE expires_at = '-infinity')::bigint, \
         coalesce(max(version), 0)::bigint FROM {s}.{part}"
    );
    let forget = format!("DELETE FROM {} WHERE window_start = $1", names.windows);
    let recheck = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE window_start = $1 \
         AND (ended IS NOT NULL OR (became_current IS NULL AND window_end <= clock_timestamp())))",
        names.windows
    );
    store
        .on_primary(async |c| {
            if !unconditional && c.client.query_typed_one(&any_live, &[]).await?.try_get(0)? {
                return Ok(None);
            }
            let row = c.client.query_typed_one(&contents, &[]).await?;
            let (rows, tombstones, highest): (i64, i64, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let tx = c.client.transaction().await?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = {LOCK_WAIT_MS}; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"
            ))
            .await?;
            // No insert runs meanwhile: a dropped entry's key created again starts above.
            floor::lock(&tx, names).await?;
            // A window that became current meanwhile (a change of window waiting for the floor
            // lock when the candidates were read) stays.
            let still_droppable: bool = tx
                .query_typed_one(&recheck, &[(&start, Type::TIMESTAMPTZ)])
                .await?
                .try_get(0)?;
            if !still_droppable {
                tx.rollback().await?;
                return Ok(None);
            }
            floor::raise(&tx, names, highest).await?;
            // Dropping writes no pre-image by trigger: what a checkpoint holds is saved first.
            tx.batch_execute(&history::save_before_drop(names, &format!("{s}.{part}")))
                .await?;
            tx.batch_execute(&format!("DROP TABLE {s}.{part}")).await?;
            tx.execute_typed(&forget, &[(&start, Type::TIMESTAMPTZ)])
                .await?;
            tx.commit().await?;
            let n = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(Some((n(rows), n(tombstones))))
        })
        .await
}
