//! Archive: moving entries not written for a while into an archive table, reading them back
//! and restoring them.
//!
//! Each batch is one statement (`WITH moved AS (DELETE ... RETURNING ...) INSERT ...`): a row
//! leaves the state table exactly when it enters the archive, so an interruption at any point
//! neither loses nor duplicates one. Archived rows raise the version floor like cleanup does,
//! so a key re-created later never repeats a version.

use std::time::Duration;

use tokio_postgres::types::Type;

use super::cleanup::{sweep, Sweep};
use crate::state::error::{StateError, StateResult};
use crate::state::ident::Ident;
use crate::state::ops::conn_ops::StateEntry;
use crate::state::ops::store::Store;
use crate::state::schema::names::TableNames;
use crate::state::wire::statements::{upsert_sql, ENTRY_COLUMNS, EXPIRED_NOW};

/// `archive_table` as a quoted name in the backend's schema: a plain identifier (letters,
/// digits, `_`, at most [`MAX_TABLE_NAME_LEN`](crate::state::MAX_TABLE_NAME_LEN) bytes), never
/// the state table itself. Anything else is refused, nothing touched.
pub(crate) fn archive_name(names: &TableNames, archive_table: &str) -> StateResult<String> {
    let ident = Ident::new_table(archive_table)?;
    if ident.as_str() == names.table.as_str() {
        return Err(StateError::invalid(
            "the archive table cannot be the state table itself",
        ));
    }
    Ok(format!("{}.{ident}", names.schema))
}

/// Creates the archive table when missing, like the migrated default archive table (the one
/// definition of an archive table: the state table's columns plus `archived_at`, and the index
/// on `(key, version)`; see migrations 003 and 009).
async fn ensure_table(store: &Store, archive: &str) -> StateResult<()> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {archive} (LIKE {} INCLUDING ALL)",
        store.ctx.names.archive
    );
    store
        .on_primary(async |c| Ok(c.client.batch_execute(&sql).await?))
        .await
}

/// Moves the live entries not written for `older_than` into `archive_table` (created when
/// missing), in batches of `batch_size`; returns how many moved. Expired entries and delete
/// tombstones are cleanup's, not archived.
pub(crate) async fn archive(
    store: &Store,
    archive_table: &str,
    older_than: Duration,
    batch_size: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<u64> {
    let archive = archive_name(&store.ctx.names, archive_table)?;
    ensure_table(store, &archive).await?;
    sweep(
        store,
        Sweep::Archive(older_than, archive),
        batch_size,
        progress,
    )
    .await
    .map(|moved| moved.entries)
}

/// The newest archived entry under `key` in `archive_table`, if any.
pub(crate) async fn get_archived(
    store: &Store,
    archive_table: &str,
    key: &[u8],
) -> StateResult<Option<StateEntry>> {
    let archive = archive_name(&store.ctx.names, archive_table)?;
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM {archive} WHERE key = $1 ORDER BY version DESC LIMIT 1"
    );
    let row = store
        .on_primary(async |c| {
            Ok(c.client
                .query_typed_opt(&sql, &[(&key, Type::BYTEA)])
                .await?)
        })
        .await?;
    row.as_ref().map(StateEntry::from_row).transpose()
}

/// Moves the newest archived entry under `key` back into the state table, unless the key has
/// a live entry there or the archived entry's expiry has passed; whether it did. The restored
/// entry gets a new version (above every version the key had) and its value, metadata, creation time and expiry back; it leaves the
/// archive in the same transaction.
pub(crate) async fn restore(store: &Store, archive_table: &str, key: &[u8]) -> StateResult<bool> {
    let archive = archive_name(&store.ctx.names, archive_table)?;
    let newest = format!(
        "SELECT value, metadata, created_at, expires_at, archived_at, version, \
                (expires_at <= statement_timestamp()) IS TRUE FROM {archive} \
         WHERE key = $1 ORDER BY version DESC LIMIT 1 FOR UPDATE"
    );
    let insert = upsert_sql(
        &store.ctx.names,
        "VALUES ($1::bytea, $2::bytea, $3::jsonb, $4::timestamptz, $5::timestamptz)",
        &["key", "value", "metadata", "created_at", "expires_at"],
        true,
        "value = EXCLUDED.value, metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at, \
         expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, version = e.version + 1",
        &format!(" WHERE e.expires_at IS NOT NULL AND {EXPIRED_NOW} RETURNING version"),
    );
    let forget =
        format!("DELETE FROM {archive} WHERE key = $1 AND archived_at = $2 AND version = $3");
    store
        .on_primary(async |c| {
            let tx = c.client.transaction().await?;
            let Some(row) = tx.query_typed_opt(&newest, &[(&key, Type::BYTEA)]).await? else {
                return Ok(false);
            };
            let value: Vec<u8> = row.try_get(0)?;
            let metadata: serde_json::Value = row.try_get(1)?;
            let created: std::time::SystemTime = row.try_get(2)?;
            let expires: Option<std::time::SystemTime> = row.try_get(3)?;
            let archived: std::time::SystemTime = row.try_get(4)?;
            let version: i64 = row.try_get(5)?;
            // An entry whose time ran out in the archive (by the server's clock, as every
            // expiry) would come back invisible and be cleaned up: it stays archived.
            if row.try_get::<_, bool>(6)? {
                return Ok(false);
            }
            let restored = tx
                .query_typed_opt(
                    &insert,
                    &[
                        (&key, Type::BYTEA),
                        (&value, Type::BYTEA),
                        (&metadata, Type::JSONB),
                        (&created, Type::TIMESTAMPTZ),
                        (&expires, Type::TIMESTAMPTZ),
                    ],
                )
                .await?
                .is_some();
            if restored {
                tx.execute_typed(
                    &forget,
                    &[
                        (&key, Type::BYTEA),
                        (&archived, Type::TIMESTAMPTZ),
                        (&version, Type::INT8),
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(restored)
        })
        .await
}
