//! Named state checkpoints: a consistent copy of every live entry, kept as rows in
//! `state_checkpoint_entries`, and restoring one.
//!
//! - **Create**: one REPEATABLE READ transaction, so every chunk it copies reads the same
//!   snapshot: the checkpoint is the state at one instant, whatever writers do meanwhile. It
//!   copies in key order, `CHUNK` rows per statement, reporting progress after each.
//! - **Restore**: one transaction under an EXCLUSIVE lock on the state table (readers go on,
//!   writers wait): existing keys get the checkpoint's entry with a new version, keys absent
//!   from the checkpoint become tombstones, missing keys are inserted above the version floor
//!   (raised first above every version in the table). Readers see the old state until the
//!   commit and the restored one after it, never a mix; versions never repeat.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;

use super::floor;
use crate::state::error::{StateError, StateResult};
use crate::state::ops::store::Store;
use crate::state::pool::checkout::Checkout;
use crate::state::pool::context::bounded;
use crate::state::wire::statements::{rewindow, LIVE, TOMBSTONE};

/// Rows copied per statement while creating a checkpoint.
const CHUNK: i64 = 10_000;
/// Longest checkpoint name, in bytes.
pub const MAX_CHECKPOINT_NAME_LEN: usize = 256;

/// One checkpoint, from
/// [`list_checkpoints`](crate::state::EnhancedPostgresBackend::list_checkpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Its id, for [`restore_checkpoint`](crate::state::EnhancedPostgresBackend::restore_checkpoint)
    /// and [`delete_checkpoint`](crate::state::EnhancedPostgresBackend::delete_checkpoint).
    pub id: i64,
    /// The name it was created with (not unique).
    pub name: String,
    /// When it was taken (the server's clock).
    pub created_at: SystemTime,
    /// Live entries it holds.
    pub entry_count: u64,
}

fn check_name(name: &str) -> StateResult<()> {
    if name.is_empty() || name.len() > MAX_CHECKPOINT_NAME_LEN || name.contains('\0') {
        return Err(StateError::invalid(format!(
            "a checkpoint name is 1 to {MAX_CHECKPOINT_NAME_LEN} bytes without NUL"
        )));
    }
    Ok(())
}

/// Runs `sql` on the checkout, bounded by `limit` (past it the checkout is discarded and the
/// transaction ends with its connection).
async fn step<T>(
    conn: &mut Checkout,
    limit: Duration,
    f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> StateResult<T> {
    bounded(limit, async {
        Ok(conn.run(async |c| f(&c.client).await).await?)
    })
    .await
}

/// Takes a checkpoint named `name` of every live entry; `progress` gets the entries copied so
/// far after each chunk.
pub(crate) async fn create(
    store: &Store,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<CheckpointInfo> {
    check_name(name)?;
    let n = &store.ctx.names;
    let limit = store.ctx.limit;
    let insert = format!(
        "INSERT INTO {} (state_table, name) VALUES ($1, $2) RETURNING id, created_at",
        n.checkpoints
    );
    let copy = format!(
        "WITH copied AS (
             INSERT INTO {entries} (checkpoint_id, key, value, metadata, created_at, updated_at,
                                    expires_at, version)
             SELECT $1, key, value, metadata, created_at, updated_at, expires_at, version
             FROM {t} WHERE key > $2 AND {LIVE} ORDER BY key LIMIT $3
             RETURNING key)
         SELECT count(*)::bigint, (SELECT key FROM copied ORDER BY key DESC LIMIT 1) FROM copied",
        entries = n.checkpoint_entries,
        t = n.qualified
    );
    let finish = format!(
        "UPDATE {} SET entry_count = $2 WHERE id = $1",
        n.checkpoints
    );
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
            &[(&table.as_str(), Type::TEXT), (&name, Type::TEXT)],
        )
        .await
    })
    .await?;
    let id: i64 = row.try_get(0)?;
    let created_at: SystemTime = row.try_get(1)?;
    let total = copy_entries(&mut conn, limit, &copy, id, progress).await?;
    let count = i64::try_from(total).unwrap_or(i64::MAX);
    step(&mut conn, limit, async |c| {
        c.execute_typed(&finish, &[(&id, Type::INT8), (&count, Type::INT8)])
            .await?;
        c.batch_execute("COMMIT").await
    })
    .await?;
    conn.set_in_transaction(false);
    Ok(CheckpointInfo {
        id,
        name: name.to_string(),
        created_at,
        entry_count: total,
    })
}

/// This table's checkpoints, newest first.
pub(crate) async fn list(store: &Store) -> StateResult<Vec<CheckpointInfo>> {
    let sql = format!(
        "SELECT id, name, created_at, entry_count FROM {} WHERE state_table = $1 ORDER BY id DESC",
        store.ctx.names.checkpoints
    );
    let table = store.ctx.names.qualified.clone();
    let rows = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed(&sql, &[(&table.as_str(), Type::TEXT)])
                .await?)
        })
        .await?;
    rows.iter()
        .map(|r| {
            Ok(CheckpointInfo {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                created_at: r.try_get(2)?,
                entry_count: u64::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
            })
        })
        .collect()
}

/// Deletes checkpoint `id` of this table (its entries with it); whether there was one.
pub(crate) async fn delete(store: &Store, id: i64) -> StateResult<bool> {
    let sql = format!(
        "DELETE FROM {} WHERE id = $1 AND state_table = $2",
        store.ctx.names.checkpoints
    );
    let table = store.ctx.names.qualified.clone();
    let n = store
        .on_primary(async |c| {
            Ok(c.client
                .execute_typed(&sql, &[(&id, Type::INT8), (&table.as_str(), Type::TEXT)])
                .await?)
        })
        .await?;
    Ok(n > 0)
}

/// Deletes all but the newest `keep` checkpoints of this table; returns how many went.
pub(crate) async fn prune(store: &Store, keep: usize) -> StateResult<u64> {
    let sql = format!(
        "DELETE FROM {c} WHERE state_table = $1 AND id NOT IN (
             SELECT id FROM {c} WHERE state_table = $1 ORDER BY id DESC LIMIT $2)",
        c = store.ctx.names.checkpoints
    );
    let table = store.ctx.names.qualified.clone();
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    store
        .on_primary(async |c| {
            Ok(c.client
                .execute_typed(&sql, &[(&table.as_str(), Type::TEXT), (&keep, Type::INT8)])
                .await?)
        })
        .await
}

/// Replaces the live state with checkpoint `id`'s, atomically; returns the entries restored.
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
/// chunk until the live entries are copied; returns how many, calling `progress` with the
/// running total.
async fn copy_entries(
    conn: &mut Checkout,
    limit: Duration,
    copy: &str,
    id: i64,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<u64> {
    let mut after: Vec<u8> = Vec::new();
    let mut total = 0u64;
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
        progress(total);
        match row.try_get::<_, Option<Vec<u8>>>(1)? {
            Some(last) if copied >= CHUNK => after = last,
            _ => return Ok(total),
        }
    }
}
