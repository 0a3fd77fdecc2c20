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

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

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
/// [`list_checkpoints`](crate::state::EnhancedPostgresBackend::list_checkpoints) (and the basic
/// backend's [`list_checkpoints`](crate::state::PostgresStateBackend::list_checkpoints), which
/// reads the seed project's fields: `checkpoint_id`, `created_at`, `row_count`, `data_size`,
/// `metadata`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its id, for [`restore_checkpoint`](crate::state::EnhancedPostgresBackend::restore_checkpoint)
    /// and [`delete_checkpoint`](crate::state::EnhancedPostgresBackend::delete_checkpoint).
    pub id: i64,
    /// The name it was created with (not unique).
    pub name: String,
    /// When it was taken (the server's clock).
    pub created_at: DateTime<Utc>,
    /// Live entries it holds.
    pub entry_count: u64,
    /// Its UUID, for the basic backend's
    /// [`restore_checkpoint`](crate::state::PostgresStateBackend::restore_checkpoint).
    pub checkpoint_id: Uuid,
    /// Live entries it holds (`entry_count`, as the seed project's type has it).
    pub row_count: i64,
    /// Bytes of the keys and values it holds.
    pub data_size: i64,
    /// Its metadata object (`{}` unless set in SQL).
    pub metadata: Option<serde_json::Value>,
}

/// A checkpoint's UUID: its own, or (one written by an older pgstate after migration 010 ran)
/// the one that migration derives from its id.
const UUID_OF: &str = "coalesce(checkpoint_uuid, md5(state_table || ':' || id)::uuid)";

/// The columns [`CheckpointInfo::from_row`] reads, in its order.
fn info_columns() -> String {
    format!("id, name, created_at, entry_count, {UUID_OF}::text, data_size, metadata")
}

impl CheckpointInfo {
    /// The checkpoint of `r`, and whether its data size is still to be counted (one taken
    /// before migration 010).
    fn from_row(r: &tokio_postgres::Row) -> StateResult<(Self, bool)> {
        let created: SystemTime = r.try_get(2)?;
        let entries: i64 = r.try_get(3)?;
        let uuid: String = r.try_get(4)?;
        let size: Option<i64> = r.try_get(5)?;
        let info = CheckpointInfo {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            created_at: DateTime::<Utc>::from(created),
            entry_count: u64::try_from(entries).unwrap_or(0),
            checkpoint_id: Uuid::parse_str(&uuid)
                .map_err(|e| StateError::DeserializationFailed(format!("checkpoint UUID: {e}")))?,
            row_count: entries,
            data_size: size.unwrap_or(0),
            metadata: r.try_get(6)?,
        };
        Ok((info, size.is_none()))
    }
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

/// The id of this table's checkpoint named `uuid`, if there is one.
pub(crate) async fn find(store: &Store, uuid: Uuid) -> StateResult<Option<i64>> {
    let sql = format!(
        "SELECT id FROM {} WHERE {UUID_OF} = $1::text::uuid AND state_table = $2",
        store.ctx.names.checkpoints
    );
    let (uuid, table) = (uuid.to_string(), store.ctx.names.qualified.clone());
    let row = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed_opt(
                    &sql,
                    &[(&uuid.as_str(), Type::TEXT), (&table.as_str(), Type::TEXT)],
                )
                .await?)
        })
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// This table's checkpoints, newest first.
pub(crate) async fn list(store: &Store) -> StateResult<Vec<CheckpointInfo>> {
    let sql = format!(
        "SELECT {} FROM {} WHERE state_table = $1 ORDER BY id DESC",
        info_columns(),
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
    let mut infos = Vec::with_capacity(rows.len());
    let mut uncounted = Vec::new();
    for row in &rows {
        let (info, needs_size) = CheckpointInfo::from_row(row)?;
        if needs_size {
            uncounted.push(info.id);
        }
        infos.push(info);
    }
    if !uncounted.is_empty() {
        let sizes = count_sizes(store, &uncounted).await?;
        for info in &mut infos {
            if let Some(size) = sizes.iter().find(|(id, _)| *id == info.id) {
                info.data_size = size.1;
            }
        }
    }
    Ok(infos)
}

/// Counts the data size of checkpoints `ids` (taken before migration 010 gave checkpoints
/// one) and records it, once: `(id, bytes)` each.
async fn count_sizes(store: &Store, ids: &[i64]) -> StateResult<Vec<(i64, i64)>> {
    let n = &store.ctx.names;
    let count = format!(
        "SELECT checkpoint_id, coalesce(sum(length(key) + length(value)), 0)::bigint \
         FROM {} WHERE checkpoint_id = ANY($1) GROUP BY checkpoint_id",
        n.checkpoint_entries
    );
    let record = format!(
        "UPDATE {} SET data_size = $2 WHERE id = $1 AND data_size IS NULL",
        n.checkpoints
    );
    store
        .on_primary(async |c| {
            let rows = c
                .client
                .query_typed(&count, &[(&ids, Type::INT8_ARRAY)])
                .await?;
            let mut sizes: Vec<(i64, i64)> = ids.iter().map(|id| (*id, 0)).collect();
            for row in rows {
                let (id, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                if let Some(s) = sizes.iter_mut().find(|(i, _)| *i == id) {
                    s.1 = bytes;
                }
            }
            for (id, bytes) in &sizes {
                c.client
                    .execute_typed(&record, &[(id, Type::INT8), (bytes, Type::INT8)])
                    .await?;
            }
            Ok(sizes)
        })
        .await
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
