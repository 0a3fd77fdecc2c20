//! TTL cleanup and retention: deleting expired entries (delete tombstones included) and, with a
//! retention policy, entries not written for `max_age`, in short batches.
//!
//! Each batch is its own transaction of one statement (`DELETE ... WHERE key IN (SELECT ...
//! LIMIT n FOR UPDATE SKIP LOCKED)`): it holds row locks on at most `batch_size` rows for a
//! moment, skips rows a writer holds, and keeps no long snapshot that would hold VACUUM back.
//! A batch also raises the table's version floor to the highest version it removed (see
//! migration `005_version_floor.sql`), under the floor's advisory lock taken exclusively: it
//! asks for it without queueing (`pg_try_advisory_xact_lock`), so writers never wait behind a
//! cleanup that waits, only behind a running batch.

use std::time::Duration;

use tokio_postgres::types::Type;

use crate::state::error::StateResult;
use crate::state::names::TableNames;
use crate::state::store::Store;

/// What a sweep removes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sweep {
    /// Expired entries and delete tombstones (`expires_at <= now()`).
    Expired,
    /// Entries whose `updated_at` is older than this.
    OlderThan(Duration),
}

/// How long a batch keeps asking for the floor lock before giving up for this pass.
const FLOOR_LOCK_PATIENCE: Duration = Duration::from_secs(10);

/// The SQL of one batch of `sweep`: parameters `$1` batch size, `$2` the key to continue
/// after (age sweeps walk the primary key), `$3` the age in seconds. Returns rows removed, the
/// highest version removed and the last key.
fn batch_sql(names: &TableNames, sweep: Sweep) -> String {
    let t = &names.qualified;
    let victims = match sweep {
        Sweep::Expired => format!(
            "SELECT key FROM {t} WHERE expires_at <= now() AND key > $2 AND $3::float8 IS NOT NULL \
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ),
        Sweep::OlderThan(_) => format!(
            "SELECT key FROM {t} WHERE key > $2 \
             AND updated_at < now() - $3::float8 * interval '1 second' \
             ORDER BY key LIMIT $1 FOR UPDATE SKIP LOCKED"
        ),
    };
    format!(
        "WITH victims AS ({victims}), \
         gone AS (DELETE FROM {t} e USING victims v WHERE e.key = v.key RETURNING e.key, e.version) \
         SELECT count(*)::bigint, coalesce(max(version), 0)::bigint, \
         (SELECT key FROM gone ORDER BY key DESC LIMIT 1) FROM gone"
    )
}

/// Removes what `sweep` selects in batches of `batch_size` rows until none is left; returns
/// how many rows were removed. `progress` gets the running total after each batch.
pub(crate) async fn sweep(
    store: &Store,
    sweep: Sweep,
    batch_size: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<u64> {
    let (age, keyset) = match sweep {
        Sweep::Expired => (0.0, false),
        Sweep::OlderThan(d) => (d.as_secs_f64(), true),
    };
    let sql = batch_sql(&store.names, sweep);
    remove_in_batches(store, &sql, age, keyset, batch_size, progress).await
}

/// Runs a removal batch statement until it removes nothing; returns the rows removed.
///
/// `sql` takes `$1` the batch size, `$2` the key to continue after, `$3` an age in seconds,
/// and returns (rows removed, highest version removed, last key removed). With `keyset`,
/// each batch continues after the previous batch's last key (one walk over the primary key).
/// Each batch is a transaction that holds the version floor's lock (asked for without
/// queueing) and raises the floor to the highest version it removed.
pub(crate) async fn remove_in_batches(
    store: &Store,
    sql: &str,
    age: f64,
    keyset: bool,
    batch_size: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<u64> {
    let names = &store.names;
    let raise = format!(
        "SELECT setval($1::text::regclass, GREATEST(last_value, $2)) FROM {}",
        names.version_floor
    );
    let (class, object) = names.floor_lock;
    let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let mut after: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let batch = store
            .on_primary(async |c| {
                let tx = c.client.transaction().await?;
                // Never queue for the floor lock: a queued exclusive request would hold back
                // every writer behind it.
                let deadline = tokio::time::Instant::now() + FLOOR_LOCK_PATIENCE;
                loop {
                    let got: bool = tx
                        .query_typed_one(
                            "SELECT pg_try_advisory_xact_lock($1, $2)",
                            &[(&class, Type::INT4), (&object, Type::INT4)],
                        )
                        .await?
                        .try_get(0)?;
                    if got {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let row = tx
                    .query_typed_one(
                        sql,
                        &[
                            (&limit, Type::INT8),
                            (&after.as_slice(), Type::BYTEA),
                            (&age, Type::FLOAT8),
                        ],
                    )
                    .await?;
                let removed: i64 = row.try_get(0)?;
                let highest: i64 = row.try_get(1)?;
                let last: Option<Vec<u8>> = row.try_get(2)?;
                if removed > 0 {
                    tx.query_typed_one(
                        &raise,
                        &[
                            (&names.version_floor.as_str(), Type::TEXT),
                            (&highest, Type::INT8),
                        ],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(Some((u64::try_from(removed).unwrap_or(0), last)))
            })
            .await?;
        let Some((removed, last)) = batch else {
            tracing::warn!(table = %names.qualified, "cleanup could not take the version floor lock (long write transactions?); it goes on at the next pass");
            return Ok(total);
        };
        total += removed;
        progress(total);
        if removed == 0 {
            return Ok(total);
        }
        if let (true, Some(last)) = (keyset, last) {
            after = last;
        }
        tokio::task::yield_now().await;
    }
}
