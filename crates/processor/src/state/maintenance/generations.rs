//! Incremental checkpoints: a checkpoint ends a generation instead of copying the state.
//!
//! Every row carries the generation it was last stamped in (`checkpoint_gen`). Taking a
//! checkpoint records the current generation `g` and starts `g + 1`, under a SHARE lock on
//! the table (it waits for the write transactions under way and holds new ones for that
//! instant: a multi-key transaction or an epoch commit is wholly before or after the cut).
//! From the first checkpoint on, a trigger (migration 013's capture function) saves the
//! pre-image of a row at its first change in a generation, if a checkpoint still needs it:
//! the state at checkpoint `g` is every row stamped `<= g`, except that a key with a
//! pre-image covering `g` (`since_gen <= g < gen`) held that pre-image. So:
//!
//! - taking a checkpoint is O(1) (counting what it holds is one read after the cut, which
//!   blocks nobody);
//! - restoring to `g` rewrites only the keys changed since, in one transaction under an
//!   EXCLUSIVE lock (readers see the old state or the restored one, never a mix), with new
//!   versions: a key that existed at `g` (live or a tombstone) and changed since has a
//!   pre-image covering `g`; any other key changed since was inserted after `g` (rows with
//!   `inserted_gen > g`, found by a partial index). `checkpoint_gen` itself is not indexed,
//!   so a write that restamps a row can stay a HOT update (migration 014);
//! - deleting checkpoints deletes the pre-images no remaining checkpoint needs (all of them,
//!   by TRUNCATE, when none remains) and lowers the newest needed generation, so writes stop
//!   saving pre-images once no checkpoint needs them.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient};
use uuid::Uuid;

use super::checkpoints::{step, CheckpointInfo};
use crate::state::error::{StateError, StateResult};
use crate::state::ops::store::Store;
use crate::state::schema::history::{state_at, trigger_ddl};
use crate::state::schema::locks::xact_lock;
use crate::state::schema::names::TableNames;
use crate::state::wire::statements::{rewindow, LIVE, TOMBSTONE};

/// Takes the table's checkpoint lock for the rest of the transaction on `c`: checkpoints are
/// taken, dropped (with their history) and restored one at a time, so the newest needed
/// generation is never lowered under a new checkpoint.
async fn lock_checkpoints<C: GenericClient>(c: &C, n: &TableNames) -> Result<(), Error> {
    xact_lock(c, n.checkpoint_lock).await
}

/// Takes an incremental checkpoint named `name` (checked by the caller); `progress` gets
/// the entries it holds once they are counted.
pub(crate) async fn take(
    store: &Store,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<CheckpointInfo> {
    let n = &store.ctx.names;
    let limit = store.ctx.limit;
    let table = n.qualified.clone();
    let uuid = Uuid::new_v4().to_string();
    let has_trigger = format!(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND tgname = $1",
        n.qualified
    );
    let insert = format!(
        "INSERT INTO {} (state_table, name, checkpoint_uuid, gen, created_at) \
         VALUES ($1, $2, $3::text::uuid, pg_sequence_last_value('{}'::regclass), \
                 statement_timestamp()) \
         RETURNING id, gen",
        n.checkpoints, n.checkpoint_gen
    );
    let advance = format!(
        "SELECT setval('{max}'::regclass, $1, true), setval('{gen}'::regclass, $1 + 1, true)",
        max = n.checkpoint_max,
        gen = n.checkpoint_gen
    );
    let lock = format!("LOCK TABLE {} IN SHARE MODE", n.qualified);
    let trigger = trigger_ddl(n);
    let trigger_name = n.checkpoint_trigger.as_str().to_string();
    let mut conn = store.ctx.primary.get().await?;
    conn.set_in_transaction(true);
    let id: i64 = step(&mut conn, limit, async |c| {
        c.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        lock_checkpoints(c, n).await?;
        let attached: i64 = c
            .query_typed_one(&has_trigger, &[(&trigger_name.as_str(), Type::TEXT)])
            .await?
            .try_get(0)?;
        if attached == 0 {
            c.batch_execute(&trigger).await?;
        }
        // Write transactions under way finish first; new ones wait for the commit below.
        c.batch_execute(&lock).await?;
        let row = c
            .query_typed_one(
                &insert,
                &[
                    (&table.as_str(), Type::TEXT),
                    (&name, Type::TEXT),
                    (&uuid.as_str(), Type::TEXT),
                ],
            )
            .await?;
        let (id, gen): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        c.execute_typed(&advance, &[(&gen, Type::INT8)]).await?;
        c.batch_execute("COMMIT").await?;
        Ok(id)
    })
    .await?;
    conn.set_in_transaction(false);
    drop(conn);
    let counted = count(store, &[id]).await?;
    let info = super::checkpoints::by_id(store, id).await?;
    if let Some(&(_, entries, _)) = counted.first() {
        progress(u64::try_from(entries).unwrap_or(0));
    }
    info.ok_or_else(|| StateError::CheckpointFailed(format!("checkpoint {id} vanished")))
}

/// Counts the entries and bytes of the incremental checkpoints `ids` and records them:
/// `(id, entries, bytes)` each. One statement per checkpoint (one snapshot: a row changed
/// meanwhile is seen either unchanged or with its pre-image).
pub(crate) async fn count(store: &Store, ids: &[i64]) -> StateResult<Vec<(i64, i64, i64)>> {
    let n = &store.ctx.names;
    let of = format!(
        "SELECT gen, created_at FROM {} WHERE id = $1",
        n.checkpoints
    );
    let sum = format!(
        "SELECT count(*)::bigint, coalesce(sum(bytes), 0)::bigint FROM ({}) s",
        state_at(n, "length(key) + length(value) AS bytes")
    );
    let record = format!(
        "UPDATE {} SET entry_count = $2, data_size = $3 WHERE id = $1",
        n.checkpoints
    );
    store
        .on_primary(async |c| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(row) = c.client.query_typed_opt(&of, &[(id, Type::INT8)]).await? else {
                    continue;
                };
                let (gen, at): (i64, std::time::SystemTime) = (row.try_get(0)?, row.try_get(1)?);
                let row = c
                    .client
                    .query_typed_one(&sum, &[(&gen, Type::INT8), (&at, Type::TIMESTAMPTZ)])
                    .await?;
                let (entries, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                c.client
                    .execute_typed(
                        &record,
                        &[
                            (id, Type::INT8),
                            (&entries, Type::INT8),
                            (&bytes, Type::INT8),
                        ],
                    )
                    .await?;
                out.push((*id, entries, bytes));
            }
            Ok(out)
        })
        .await
}

/// Restores the state to incremental checkpoint `id` (generation `gen`): see the module
/// docs. Returns the entries the checkpoint holds.
pub(crate) async fn restore(store: &Store, id: i64, gen: i64, entries: i64) -> StateResult<u64> {
    let n = &store.ctx.names;
    let (t, h) = (&n.qualified, &n.checkpoint_history);
    // The pre-images covering `gen`: at most one per key, but the same one may be saved
    // twice (an update that moves a row to another partition fires the trigger as an update
    // and as a delete), so one of each.
    let covering =
        format!("(SELECT DISTINCT ON (key) * FROM {h} WHERE since_gen <= $1 AND gen > $1) h");
    let bury = format!(
        "UPDATE {t} s SET {TOMBSTONE}{} \
         WHERE s.inserted_gen > 0 AND s.inserted_gen > $1 AND {LIVE} \
           AND NOT EXISTS (SELECT 1 FROM {h} h WHERE h.key = s.key \
                             AND h.since_gen <= $1 AND h.gen > $1)",
        rewindow(n)
    );
    let update = format!(
        "UPDATE {t} s SET value = h.value, metadata = h.metadata, created_at = h.created_at, \
             expires_at = h.expires_at, updated_at = statement_timestamp(), \
             version = s.version + 1{} \
         FROM {covering} WHERE h.key = s.key",
        rewindow(n)
    );
    let insert = format!(
        "INSERT INTO {t} (key, value, metadata, created_at, expires_at) \
         SELECT h.key, h.value, h.metadata, h.created_at, h.expires_at FROM {covering} \
         WHERE h.expires_at IS DISTINCT FROM '-infinity' \
           AND NOT EXISTS (SELECT 1 FROM {t} s WHERE s.key = h.key)"
    );
    let still = format!(
        "SELECT count(*) FROM {} WHERE id = $1 AND gen = $2",
        n.checkpoints
    );
    let lock = format!("LOCK TABLE {t} IN EXCLUSIVE MODE");
    store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            // No checkpoint is taken or dropped (with its history) meanwhile.
            lock_checkpoints(&tx, n).await?;
            let there: i64 = tx
                .query_typed_one(&still, &[(&id, Type::INT8), (&gen, Type::INT8)])
                .await?
                .try_get(0)?;
            if there == 0 {
                return Err(StateError::RestoreFailed(format!(
                    "checkpoint {id} was deleted"
                )));
            }
            // Writers wait (readers go on).
            tx.batch_execute(&lock).await?;
            let g = [(
                &gen as &(dyn tokio_postgres::types::ToSql + Sync),
                Type::INT8,
            )];
            tx.execute_typed(&bury, &g).await?;
            tx.execute_typed(&update, &g).await?;
            tx.execute_typed(&insert, &g).await?;
            tx.commit().await?;
            Ok(u64::try_from(entries).unwrap_or(0))
        })
        .await
}

/// Deletes checkpoints by `delete` (`$1` the table, `$2` its argument) and, in the same
/// transaction, the pre-images no remaining checkpoint needs (all of them, by TRUNCATE, when
/// none remains); then lowers the newest needed generation (`lower_needed`). Returns how
/// many checkpoints went.
pub(crate) async fn drop_checkpoints(store: &Store, delete: &str, arg: i64) -> StateResult<u64> {
    let n = &store.ctx.names;
    let left = format!(
        "SELECT count(*) FROM {} WHERE state_table = $1 AND gen IS NOT NULL",
        n.checkpoints
    );
    let truncate = format!("TRUNCATE {}", n.checkpoint_history);
    let prune = format!(
        "DELETE FROM {h} h WHERE NOT EXISTS (SELECT 1 FROM {c} c WHERE c.state_table = $1 \
           AND c.gen IS NOT NULL AND c.gen >= h.since_gen AND c.gen < h.gen)",
        h = n.checkpoint_history,
        c = n.checkpoints
    );
    let table = n.qualified.as_str();
    let gone = store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            lock_checkpoints(&tx, n).await?;
            let t = || (&table as &(dyn ToSql + Sync), Type::TEXT);
            let gone = tx.execute_typed(delete, &[t(), (&arg, Type::INT8)]).await?;
            let left: i64 = tx.query_typed_one(&left, &[t()]).await?.try_get(0)?;
            if left == 0 {
                tx.batch_execute(&truncate).await?;
            } else if gone > 0 {
                tx.execute_typed(&prune, &[t()]).await?;
            }
            tx.commit().await?;
            Ok(gone)
        })
        .await?;
    if let Err(e) = lower_needed(store).await {
        // Writes keep saving pre-images nobody needs until the next delete: wasted room,
        // never a wrong checkpoint.
        tracing::warn!(target: "pgstate", error = %e, table = %n.label,
            "checkpoints were deleted but the newest needed generation was not lowered");
    }
    Ok(gone)
}

/// Sets the newest generation a checkpoint needs from the checkpoints that exist (it only
/// ever drops when they were deleted), so writes stop saving pre-images nobody needs; with
/// none left, empties the history of what writes saved meanwhile. Under the checkpoints'
/// lock: no checkpoint is taken between the reading and the setting. Its value comes from
/// committed checkpoints only, so a rollback after the (non-transactional) setval is safe.
async fn lower_needed(store: &Store) -> StateResult<()> {
    let n = &store.ctx.names;
    let newest = format!(
        "SELECT coalesce(max(gen), -1) FROM {} WHERE state_table = $1 AND gen IS NOT NULL",
        n.checkpoints
    );
    let lower = format!("SELECT setval('{}'::regclass, $1, true)", n.checkpoint_max);
    let truncate = format!("TRUNCATE {}", n.checkpoint_history);
    let table = n.qualified.clone();
    store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            lock_checkpoints(&tx, n).await?;
            let max: i64 = tx
                .query_typed_one(&newest, &[(&table.as_str(), Type::TEXT)])
                .await?
                .try_get(0)?;
            tx.execute_typed(&lower, &[(&max, Type::INT8)]).await?;
            if max < 0 {
                tx.batch_execute(&truncate).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
}

/// The pre-images each incremental checkpoint holds: those saved in the generations after
/// it and before the next one. `(id, entries, bytes)` for each of `gens` (`(id, gen)`).
pub(crate) async fn held(store: &Store, gens: &[(i64, i64)]) -> StateResult<Vec<(i64, i64, i64)>> {
    if gens.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT gen, count(*)::bigint, coalesce(sum(length(key) + length(value)), 0)::bigint \
         FROM (SELECT DISTINCT ON (gen, key) gen, key, value FROM {}) h GROUP BY gen",
        store.ctx.names.checkpoint_history
    );
    let rows = store
        .on_primary(async |c| Ok(c.client.query_typed(&sql, &[]).await?))
        .await?;
    let mut sorted: Vec<(i64, i64)> = gens.to_vec();
    sorted.sort_by_key(|(_, g)| *g);
    let mut out: Vec<(i64, i64, i64)> = sorted.iter().map(|(id, _)| (*id, 0, 0)).collect();
    for r in rows {
        let (gen, entries, bytes): (i64, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        // The newest checkpoint before the generation that saved them.
        if let Some(i) = sorted.iter().rposition(|(_, g)| *g < gen) {
            out[i].1 += entries;
            out[i].2 += bytes;
        }
    }
    Ok(out)
}
