//! The fixed SQL of the key/value operations, prepared once per connection.
//!
//! Every read filters [`LIVE`] (the server's clock), so an expired or deleted entry is
//! invisible before any cleanup runs. Every write bumps `version`; a delete leaves a tombstone
//! (the row, expired, with its version) so that a key's version never repeats.

use futures_util::future::try_join_all;
use tokio_postgres::{Client, Statement};

use crate::state::error::{StateError, StateResult};
use crate::state::names::TableNames;

/// The filter of live entries: not expired on the server's clock.
pub(crate) const LIVE: &str = "(expires_at IS NULL OR expires_at > now())";
/// The columns of a [`StateEntry`](crate::state::StateEntry), in its order.
pub(crate) const ENTRY_COLUMNS: &str =
    "key, value, metadata, version, created_at, updated_at, expires_at";

/// The fixed statements, prepared once per connection.
pub(crate) struct Statements {
    pub get: Statement,
    pub get_entry: Statement,
    pub contains: Statement,
    pub count: Statement,
    pub upsert: Statement,
    pub insert_new: Statement,
    pub update_if_version: Statement,
    pub delete: Statement,
    pub scan_range: Statement,
    pub scan_from: Statement,
    pub clear: Statement,
    pub batch_upsert: Statement,
    pub query_contains: Statement,
    pub query_path: Statement,
    pub delete_if_version: Statement,
    pub cas_update: Statement,
    pub insert_lsn: Statement,
    pub replay_lsn: Statement,
}

/// What an upsert does to an existing row. An entry that had expired counts as new again.
pub(crate) const ON_CONFLICT_REPLACE: &str = "ON CONFLICT (key) DO UPDATE SET \
    value = EXCLUDED.value, metadata = EXCLUDED.metadata, expires_at = EXCLUDED.expires_at, \
    updated_at = now(), version = e.version + 1, \
    created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END";

/// What a delete does to a row: it becomes a tombstone, expired since the beginning of time
/// (so every read skips it), with its value and metadata dropped and its version bumped. A
/// later write of the key continues from that version, so a version read before the delete
/// never matches again. Tombstones (and expired rows, which keep their versions the same
/// way) stay in the table: nothing removes rows yet, and a cleanup that does must not let a
/// removed key's version start over.
const TOMBSTONE: &str = "value = '\\x'::bytea, metadata = '{}'::jsonb, \
    expires_at = '-infinity', updated_at = now(), version = version + 1";

/// The statement's start time plus `$n` µs, or NULL when the parameter is NULL (no TTL).
/// `statement_timestamp()`, not `now()`: inside a long transaction, `now()` is the
/// transaction's start and the entry would expire early.
fn expiry(param: usize) -> String {
    format!("statement_timestamp() + ${param}::bigint * interval '1 microsecond'")
}

impl Statements {
    pub async fn prepare(client: &Client, names: &TableNames) -> StateResult<Self> {
        let t = &names.qualified;
        let sqls = [
            format!("SELECT value FROM {t} WHERE key = $1 AND {LIVE}"),
            format!("SELECT {ENTRY_COLUMNS} FROM {t} WHERE key = $1 AND {LIVE}"),
            format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND {LIVE})"),
            format!("SELECT count(*) FROM {t} WHERE {LIVE}"),
            format!(
                "INSERT INTO {t} AS e (key, value, metadata, expires_at) VALUES ($1, $2, $3, {}) \
                 {ON_CONFLICT_REPLACE} RETURNING version",
                expiry(4)
            ),
            format!(
                "INSERT INTO {t} AS e (key, value, metadata, expires_at) VALUES ($1, $2, $3, {}) \
                 {ON_CONFLICT_REPLACE} WHERE e.expires_at <= now() RETURNING version",
                expiry(4)
            ),
            format!(
                "UPDATE {t} SET value = $2, metadata = $4, expires_at = {}, updated_at = now(), \
                 version = version + 1 WHERE key = $1 AND version = $3 AND {LIVE} RETURNING version",
                expiry(5)
            ),
            format!("UPDATE {t} SET {TOMBSTONE} WHERE key = $1 AND {LIVE}"),
            format!("SELECT key FROM {t} WHERE key >= $1 AND key < $2 AND {LIVE} ORDER BY key"),
            format!("SELECT key FROM {t} WHERE key >= $1 AND {LIVE} ORDER BY key"),
            format!("UPDATE {t} SET {TOMBSTONE} WHERE {LIVE}"),
            format!(
                "INSERT INTO {t} AS e (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 {ON_CONFLICT_REPLACE}"
            ),
            format!("SELECT {ENTRY_COLUMNS} FROM {t} WHERE metadata @> $1 AND {LIVE} ORDER BY key"),
            format!(
                "SELECT {ENTRY_COLUMNS} FROM {t} WHERE metadata @> $1 AND metadata #> $2::text[] = $3 \
                 AND {LIVE} ORDER BY key"
            ),
            format!("UPDATE {t} SET {TOMBSTONE} WHERE key = $1 AND version = $2 AND {LIVE}"),
            format!(
                "UPDATE {t} SET value = $2, metadata = '{{}}'::jsonb, expires_at = NULL, updated_at = now(), \
                 version = version + 1 WHERE key = $1 AND value = $3 AND {LIVE} RETURNING version"
            ),
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint".to_string(),
            "SELECT pg_wal_lsn_diff(coalesce(pg_last_wal_replay_lsn(), '0/0'), '0/0')::bigint"
                .to_string(),
        ];
        let prepared = try_join_all(sqls.iter().map(|s| client.prepare(s))).await?;
        let [get, get_entry, contains, count, upsert, insert_new, update_if_version, delete, scan_range, scan_from, clear, batch_upsert, query_contains, query_path, delete_if_version, cas_update, insert_lsn, replay_lsn]: [Statement; 18] =
            prepared.try_into().map_err(|_| StateError::StorageError {
                message: "statement preparation returned the wrong number of statements".into(),
                sqlstate: None,
            })?;
        Ok(Statements {
            get,
            get_entry,
            contains,
            count,
            upsert,
            insert_new,
            update_if_version,
            delete,
            scan_range,
            scan_from,
            clear,
            batch_upsert,
            query_contains,
            query_path,
            delete_if_version,
            cas_update,
            insert_lsn,
            replay_lsn,
        })
    }
}
