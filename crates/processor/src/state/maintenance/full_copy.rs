//! Checkpoints as full copies of the live entries, in `state_checkpoint_entries`: on a
//! Citus-distributed table (its shards run no trigger of ours), and those taken before
//! migration 013.
//!
//! - **Create**: one REPEATABLE READ transaction, so every chunk it copies reads the same
//!   snapshot: the checkpoint is the state at one instant, whatever writers do meanwhile. It
//!   copies in key order, `CHUNK` rows per statement, reporting progress after each.
//! - **Restore**: one transaction under an EXCLUSIVE lock on the state table (readers go on,
//!   writers wait): existing keys get the checkpoint's entry with a new version, keys absent
//!   from the checkpoint become tombstones, missing keys are inserted above the version floor
//!   (raised first above every version in the table). Readers see the old state until the
//!   commit and the restored one after it, never a mix; versions never repeat.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use super::checkpoints::{info_columns, step, CheckpointInfo};
use crate::state::error::{StateError, StateResult};
use crate::state::ops::store::Store;
use crate::state::pool::checkout::Checkout;
use crate::state::schema::floor;
use crate::state::wire::statements::{rewindow, LIVE, TOMBSTONE};

/// Rows copied per statement while creating a checkpoint.
const CHUNK: i64 = 10_000;

/// Takes a full-copy checkpoint named `name` (checked by the caller) of every live entry;
/// `progress` gets the entries copied so far after each chunk.
pub(crate) async fn create(
    store: &Store,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<CheckpointInfo> {
    let n = &store.ctx.names;
    let limit = store.ctx.limit;
    let insert = format!(
        "INSERT INTO {} (state_table, name, checkpoint_uuid) VALUES ($1, $2, $3::text::uuid) \
         RETURNING id",
        n.checkpoints
    );
    let copy = format!(
        "WITH copied AS (
             INSERT INTO {entries} (checkpoint_id, key, value, metadata, created_at, updated_at,
                                    expires_at, version)
             SELECT $1, key, value, metadata, created_at, updated_at, expires_at, version
             FROM {t} WHERE key > $2 AND {LIVE} ORDER BY key LIMIT $3
             RETURNING key, length(key) + length(value) AS bytes)
         SELECT count(*)::bigint, (SELECT key FROM copied ORDER BY key DESC LIMIT 1),
                coalesce(sum(bytes), 0)::bigint FROM copied",
        entries = n.checkpoint_entries,
        t = n.qualified
    );
    let finish = format!(
        "UPDATE {} SET entry_count = $2, data_size = $3 WHERE id = $1 RETURNING {}",
        n.checkpoints,
        info_columns()
    );
    let uuid = Uuid::new_v4().to_string();
    let table = n.qualified.clone();
    let mut conn = store.ctx.primary.get().await?;
    conn.set_in_transaction(true);
    step(&mut conn, limit, async |c| {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL plan_cache_mode = auto")
            .await
    })
    .await?;
    let row = step(&mut conn, limit, async |c| {
        c.query_typed_one(
            &insert,
            &[
                (&table.as_str(), Type::TEXT),
                (&name, Type::TEXT),
                (&uuid.as_str(), Type::TEXT),
            ],
        )
        .await
    })
    .await?;
    let id: i64 = row.try_get(0)?;
    let (total, bytes) = copy_entries(&mut conn, limit, &copy, id, progress).await?;
    let count = i64::try_from(total).unwrap_or(i64::MAX);
    let row = step(&mut conn, limit, async |c| {
        let row = c
            .query_typed_one(
                &finish,
                &[
                    (&id, Type::INT8),
                    (&count, Type::INT8),
                    (&bytes, Type::INT8),
                ],
            )
            .await?;
        c.batch_execute("COMMIT").await?;
        Ok(row)
    })
    .await?;
    conn.set_in_transaction(false);
    Ok(CheckpointInfo::from_row(&row)?.0)
}

/// Restores full-copy checkpoint `id` (see the module docs); the entries restored.
pub(crate) async fn restore(store: &Store, id: i64) -> StateResult<u64> {
    let n = &store.ctx.names;
    let t = &n.qualified;
    let e = &n.checkpoint_entries;
    let exists = format!(
        "SELECT entry_count FROM {} WHERE id = $1 AND state_table = $2",
        n.checkpoints
    );
    let highest = format!("SELECT coalesce(max(version), 0) FROM {t}");
    let update = format!(
        "UPDATE {t} s SET value = c.value, metadata = c.metadata, created_at = c.created_at, \
             expires_at = c.expires_at, updated_at = statement_timestamp(), version = s.version + 1{} \
         FROM {e} c WHERE c.checkpoint_id = $1 AND c.key = s.key",
        rewindow(n)
    );
    let bury = format!(
        "UPDATE {t} s SET {TOMBSTONE}{} \
         WHERE {LIVE} AND NOT EXISTS (SELECT 1 FROM {e} c WHERE c.checkpoint_id = $1 AND c.key = s.key)",
        rewindow(n)
    );
    let insert = format!(
        "INSERT INTO {t} (key, value, metadata, created_at, expires_at) \
         SELECT c.key, c.value, c.metadata, c.created_at, c.expires_at FROM {e} c \
         WHERE c.checkpoint_id = $1 AND NOT EXISTS (SELECT 1 FROM {t} s WHERE s.key = c.key)"
    );
    let table = t.clone();
    store
        .on_primary(async |c| {
            let tx = c
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await?;
            let Some(row) = tx
                .query_typed_opt(&exists, &[(&id, Type::INT8), (&table.as_str(), Type::TEXT)])
                .await?
            else {
                return Err(StateError::invalid(format!(
                    "no checkpoint {id} of {table}"
                )));
            };
            let count: i64 = row.try_get(0)?;
            // Writers wait (readers go on); then nobody holds the version floor.
            tx.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
                .await?;
            floor::lock(&tx, n).await?;
            let top: i64 = tx.query_typed_one(&highest, &[]).await?.try_get(0)?;
            floor::raise(&tx, n, top).await?;
            tx.execute_typed(&update, &[(&id, Type::INT8)]).await?;
            tx.execute_typed(&bury, &[(&id, Type::INT8)]).await?;
            tx.execute_typed(&insert, &[(&id, Type::INT8)]).await?;
            tx.commit().await?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
        .await
}

/// Runs `copy` (the checkpoint's chunked copy, see [`create`]) for checkpoint `id` chunk after
/// chunk until the live entries are copied; returns how many and the bytes of their keys and
/// values, calling `progress` with the running total.
async fn copy_entries(
    conn: &mut Checkout,
    limit: Duration,
    copy: &str,
    id: i64,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<(u64, i64)> {
    let mut after: Vec<u8> = Vec::new();
    let (mut total, mut bytes) = (0u64, 0i64);
    loop {
        let row = step(conn, limit, async |c| {
            c.query_typed_one(
                copy,
                &[
                    (&id, Type::INT8),
                    (&after.as_slice(), Type::BYTEA),
                    (&CHUNK, Type::INT8),
                ],
            )
            .await
        })
        .await?;
        let copied: i64 = row.try_get(0)?;
        total += u64::try_from(copied).unwrap_or(0);
        bytes = bytes.saturating_add(row.try_get(2)?);
        progress(total);
        match row.try_get::<_, Option<Vec<u8>>>(1)? {
            Some(last) if copied >= CHUNK => after = last,
            _ => return Ok((total, bytes)),
        }
    }
}
