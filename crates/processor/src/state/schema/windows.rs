//! Write windows of a table partitioned by time range
//! ([`PartitionStrategy::TimeRange`](crate::state::PartitionStrategy::TimeRange)): the control
//! objects (`sql/write_windows.sql`), partitions created ahead of time, and the change of the
//! current window.
//!
//! Windows are aligned to the Unix epoch: the window of an instant starts at the last
//! multiple of the interval before it. The current window changes only under the table's floor
//! lock taken exclusively, which every write takes shared (in `<table>_write_window()`), so a
//! change waits for the writes in flight and is seen by every write after it.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::state::error::StateResult;
use crate::state::schema::locks::xact_lock;
use crate::state::schema::names::TableNames;

/// The control objects' template.
pub(crate) const WRITE_WINDOWS_SQL: &str = include_str!("../../../sql/write_windows.sql");

/// Creates the control objects (idempotent).
pub(crate) async fn create_controls<C: GenericClient>(
    c: &C,
    names: &TableNames,
) -> StateResult<()> {
    c.batch_execute(&names.render(WRITE_WINDOWS_SQL)).await?;
    Ok(())
}

/// Creates the partitions of `parent` (the state table, or the twin being built for it) for
/// the window of now and the `premake` windows after it, where missing, each with `options`
/// (a `WITH (...)` clause printed by the server, or empty), under the windows lock for the rest
/// of the transaction (instances never create the same partition twice). Returns how many it
/// created.
pub(crate) async fn premake<C: GenericClient>(
    c: &C,
    names: &TableNames,
    parent: &str,
    interval: Duration,
    premake: u32,
    options: &str,
) -> StateResult<u64> {
    let seconds = interval.as_secs() as f64;
    let prefix = format!("{}_w", names.table.as_str());
    xact_lock(c, names.windows_lock).await?;
    // Names and bounds are printed by the server: the partition name from validated parts
    // (%I quotes it), the bounds as literals (%L).
    let ddl = c
        .query_typed(
            &format!(
                "WITH cw AS (
                     SELECT to_timestamp(floor(extract(epoch FROM now()) / $1) * $1) AS start)
                 SELECT format('CREATE TABLE %s.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)%s',
                               $2::text, $3 || to_char(w AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS'),
                               $4::text, w, w + $1 * interval '1 second', $5::text),
                        w
                 FROM cw, generate_series(0, $6) k,
                      LATERAL (SELECT cw.start + k * $1 * interval '1 second' AS w) s
                 WHERE NOT EXISTS (SELECT 1 FROM {} WHERE window_start = w)
                 ORDER BY w",
                names.windows
            ),
            &[
                (&seconds, Type::FLOAT8),
                (&names.schema.to_string(), Type::TEXT),
                (&prefix, Type::TEXT),
                (&parent, Type::TEXT),
                (&options, Type::TEXT),
                (&i32::try_from(premake).unwrap_or(i32::MAX), Type::INT4),
            ],
        )
        .await?;
    let record = format!(
        "INSERT INTO {} (window_start, window_end) VALUES ($1, $1 + $2 * interval '1 second')",
        names.windows
    );
    for row in &ddl {
        let sql: String = row.try_get(0)?;
        let start: std::time::SystemTime = row.try_get(1)?;
        c.batch_execute(&sql).await?;
        c.execute_typed(
            &record,
            &[(&start, Type::TIMESTAMPTZ), (&seconds, Type::FLOAT8)],
        )
        .await?;
    }
    Ok(ddl.len() as u64)
}

/// Makes the window of now the current one, if it is not already, in the caller's
/// transaction: takes the floor lock exclusively (waiting as the transaction's `lock_timeout`
/// allows), ends the current window (at the clock time it got the lock: every write into it
/// started before), starts the new one and records this transaction as the last change. The
/// new window's partition must exist ([`premake`]).
pub(crate) async fn advance<C: GenericClient>(
    c: &C,
    names: &TableNames,
    interval: Duration,
) -> StateResult<Advance> {
    let seconds = interval.as_secs() as f64;
    let due_sql = format!(
        "SELECT coalesce(max(window_start) FILTER (WHERE became_current IS NOT NULL AND ended IS NULL)
                         < to_timestamp(floor(extract(epoch FROM clock_timestamp()) / $1) * $1), true)
         FROM {}",
        names.windows
    );
    let due = async || -> StateResult<bool> {
        Ok(c.query_typed_one(&due_sql, &[(&seconds, Type::FLOAT8)])
            .await?
            .try_get(0)?)
    };
    // Checked without the lock first: a round with nothing to change never holds writers up.
    if !due().await? {
        return Ok(Advance::Current);
    }
    // Then again under the lock: another instance may have changed the window meanwhile.
    xact_lock(c, names.floor_lock).await?;
    if !due().await? {
        return Ok(Advance::Current);
    }
    let w = &names.windows;
    let changed = c
        .execute_typed(
            &format!(
                "WITH target AS (SELECT to_timestamp(floor(extract(epoch FROM clock_timestamp()) / $1) * $1) AS start),
                      ended AS (UPDATE {w} SET ended = clock_timestamp()
                                WHERE became_current IS NOT NULL AND ended IS NULL
                                  AND window_start < (SELECT start FROM target))
                 UPDATE {w} SET became_current = clock_timestamp()
                 WHERE window_start = (SELECT start FROM target) AND became_current IS NULL"
            ),
            &[(&seconds, Type::FLOAT8)],
        )
        .await?;
    if changed == 0 {
        // The window of now has no partition yet: the caller must roll back (the current
        // window was marked ended above).
        return Ok(Advance::NoPartition);
    }
    c.execute_typed(
        &format!(
            "SELECT setval('{}', pg_current_xact_id()::text::bigint)",
            names.window_advance
        ),
        &[],
    )
    .await?;
    Ok(Advance::Changed)
}

/// What [`advance`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advance {
    /// The window of now became current.
    Changed,
    /// It already was.
    Current,
    /// It has no partition yet ([`premake`] first).
    NoPartition,
}
