//! Named state checkpoints: taking, listing, deleting and restoring them. Checkpoints are
//! incremental (`generations`: a generation ended, pre-images of what changed since), except
//! on a Citus-distributed table and those taken before migration 013, which are full copies
//! (`full_copy`).

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{full_copy, generations};
use crate::state::error::{StateError, StateResult};
use crate::state::limits::check_page;
use crate::state::ops::conn_ops::StateEntry;
use crate::state::ops::store::Store;
use crate::state::pool::checkout::Checkout;
use crate::state::pool::context::bounded;
use crate::state::schema::history;
use crate::state::wire::statements::ENTRY_COLUMNS;

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
    /// Pre-images it holds: rows saved at their first change after it (and before the next
    /// checkpoint), which a restore to it writes back. Deleting it frees those no other
    /// checkpoint needs.
    #[serde(default)]
    pub history_entries: u64,
    /// Bytes of the keys and values of those pre-images.
    #[serde(default)]
    pub history_bytes: i64,
}

/// A checkpoint's UUID: its own, or (one written by an older pgstate after migration 010 ran)
/// the one that migration derives from its id.
const UUID_OF: &str = "coalesce(checkpoint_uuid, md5(state_table || ':' || id)::uuid)";

/// The columns [`CheckpointInfo::from_row`] reads, in its order.
pub(crate) fn info_columns() -> String {
    format!("id, name, created_at, entry_count, {UUID_OF}::text, data_size, metadata, gen")
}

impl CheckpointInfo {
    /// The checkpoint of `r`, whether its data size is still to be counted (one taken
    /// before migration 010, or an incremental one not counted yet), and its generation
    /// (`None`: a full copy).
    pub(crate) fn from_row(r: &tokio_postgres::Row) -> StateResult<(Self, bool, Option<i64>)> {
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
            history_entries: 0,
            history_bytes: 0,
        };
        Ok((info, size.is_none(), r.try_get(7)?))
    }
}

pub(crate) fn check_name(name: &str) -> StateResult<()> {
    if name.is_empty() || name.len() > MAX_CHECKPOINT_NAME_LEN || name.contains('\0') {
        return Err(StateError::invalid(format!(
            "a checkpoint name is 1 to {MAX_CHECKPOINT_NAME_LEN} bytes without NUL"
        )));
    }
    Ok(())
}

/// Runs `sql` on the checkout, bounded by `limit` (past it the checkout is discarded and the
/// transaction ends with its connection).
pub(crate) async fn step<T>(
    conn: &mut Checkout,
    limit: Duration,
    f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> StateResult<T> {
    bounded(limit, async {
        Ok(conn.run(async |c| f(&c.client).await).await?)
    })
    .await
}

/// Takes a checkpoint named `name` (an incremental one: see `generations`); `progress` gets
/// the entries it holds once counted.
pub(crate) async fn create(
    store: &Store,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<CheckpointInfo> {
    check_name(name)?;
    if store.ctx.names.distributed {
        // Citus runs no trigger on a distributed table's shards for us.
        return full_copy::create(store, name, progress).await;
    }
    generations::take(store, name, progress).await
}

/// `columns` of this table's checkpoint `id`, if there is one.
async fn row_of(store: &Store, columns: &str, id: i64) -> StateResult<Option<tokio_postgres::Row>> {
    let sql = format!(
        "SELECT {columns} FROM {} WHERE id = $1 AND state_table = $2",
        store.ctx.names.checkpoints
    );
    let table = store.ctx.names.qualified.as_str();
    store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed_opt(&sql, &[(&id, Type::INT8), (&table, Type::TEXT)])
                .await?)
        })
        .await
}

/// Checkpoint `id` of this table, just taken and counted (it holds no history yet).
pub(crate) async fn by_id(store: &Store, id: i64) -> StateResult<Option<CheckpointInfo>> {
    let row = row_of(store, &info_columns(), id).await?;
    row.map(|r| Ok(CheckpointInfo::from_row(&r)?.0)).transpose()
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
    let (mut uncounted, mut uncounted_gens, mut gens) = (Vec::new(), Vec::new(), Vec::new());
    for row in &rows {
        let (info, needs_size, gen) = CheckpointInfo::from_row(row)?;
        match (needs_size, gen) {
            (true, None) => uncounted.push(info.id),
            (true, Some(_)) => uncounted_gens.push(info.id),
            _ => {}
        }
        if let Some(g) = gen {
            gens.push((info.id, g));
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
    let counted = generations::count(store, &uncounted_gens).await?;
    let held = generations::held(store, &gens).await?;
    for info in &mut infos {
        if let Some(&(_, entries, bytes)) = counted.iter().find(|(id, ..)| *id == info.id) {
            info.entry_count = u64::try_from(entries).unwrap_or(0);
            info.row_count = entries;
            info.data_size = bytes;
        }
        if let Some(&(_, entries, bytes)) = held.iter().find(|(id, ..)| *id == info.id) {
            info.history_entries = u64::try_from(entries).unwrap_or(0);
            info.history_bytes = bytes;
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

/// Deletes checkpoint `id` of this table (its entries with it, and the history only it
/// needed); whether there was one.
pub(crate) async fn delete(store: &Store, id: i64) -> StateResult<bool> {
    let sql = format!(
        "DELETE FROM {} WHERE state_table = $1 AND id = $2",
        store.ctx.names.checkpoints
    );
    Ok(generations::drop_checkpoints(store, &sql, id).await? > 0)
}

/// Deletes all but the newest `keep` checkpoints of this table; returns how many went.
pub(crate) async fn prune(store: &Store, keep: usize) -> StateResult<u64> {
    let sql = format!(
        "DELETE FROM {c} WHERE state_table = $1 AND id NOT IN (
             SELECT id FROM {c} WHERE state_table = $1 ORDER BY id DESC LIMIT $2)",
        c = store.ctx.names.checkpoints
    );
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    generations::drop_checkpoints(store, &sql, keep).await
}

/// Replaces the live state with checkpoint `id`'s, atomically; returns the entries restored.
pub(crate) async fn restore(store: &Store, id: i64) -> StateResult<u64> {
    let table = &store.ctx.names.qualified;
    let row = row_of(store, "gen, entry_count, data_size IS NULL", id).await?;
    let Some(row) = row else {
        return Err(StateError::invalid(format!(
            "no checkpoint {id} of {table}"
        )));
    };
    match row.try_get::<_, Option<i64>>(0)? {
        Some(gen) => {
            // Not counted yet (the count after taking it did not finish): count it now.
            let entries = if row.try_get(2)? {
                let counted = generations::count(store, &[id]).await?;
                counted.first().map_or(0, |c| c.1)
            } else {
                row.try_get(1)?
            };
            generations::restore(store, id, gen, entries).await
        }
        None => full_copy::restore(store, id).await,
    }
}

/// Up to `limit` entries checkpoint `id` holds, in key order, after `after` (from the start
/// when `None`): the entries live at the checkpoint's instant, as they were then.
pub(crate) async fn entries_page(
    store: &Store,
    id: i64,
    after: Option<&[u8]>,
    limit: usize,
) -> StateResult<Vec<StateEntry>> {
    let (_, after, limit) = check_page(&[], after, limit)?;
    let n = &store.ctx.names;
    let of = format!(
        "SELECT gen, created_at FROM {} WHERE id = $1 AND state_table = $2",
        n.checkpoints
    );
    let incremental = format!(
        "SELECT {ENTRY_COLUMNS} FROM ({}) s WHERE key > $3 ORDER BY key LIMIT $4",
        history::state_at(n, ENTRY_COLUMNS)
    );
    let copied = format!(
        "SELECT {ENTRY_COLUMNS} FROM {} WHERE checkpoint_id = $1 \
           AND (expires_at IS NULL OR expires_at > $2) AND key > $3 ORDER BY key LIMIT $4",
        n.checkpoint_entries
    );
    let table = n.qualified.clone();
    let rows = store
        .on_primary(async |c| {
            let Some(row) = c
                .client
                .query_typed_opt(&of, &[(&id, Type::INT8), (&table.as_str(), Type::TEXT)])
                .await?
            else {
                return Err(StateError::invalid(format!(
                    "no checkpoint {id} of {table}"
                )));
            };
            let (gen, at): (Option<i64>, SystemTime) = (row.try_get(0)?, row.try_get(1)?);
            let (sql, first) = match gen {
                Some(g) => (&incremental, g),
                None => (&copied, id),
            };
            Ok(c.client
                .query_typed(
                    sql,
                    &[
                        (&first, Type::INT8),
                        (&at, Type::TIMESTAMPTZ),
                        (&after, Type::BYTEA),
                        (&limit, Type::INT8),
                    ],
                )
                .await?)
        })
        .await?;
    rows.iter().map(StateEntry::from_row).collect()
}
