//! The fixed SQL of the key/value operations, with their parameter types: prepared once per
//! connection, or sent unnamed with every call behind PgBouncer's transaction pooling (where
//! a prepared statement would live on whichever server connection happened to serve it).
//!
//! Every read filters [`LIVE`] (the server's clock), so an expired or deleted entry is
//! invisible before any cleanup runs. Every write bumps `version`; a delete leaves a tombstone
//! (the row, expired, with its version) so that a key's version never repeats.

use futures_util::future::try_join_all;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, GenericClient, Row, Statement};

use crate::state::error::StateResult;
use crate::state::schema::names::TableNames;

/// The longest a coalesced group's statement waits for a row lock (its `lock_timeout`, set
/// for its own transaction as its input is read, before any row is written): a member's row
/// locked by another transaction must not hold the other members, so the server refuses the
/// group and each member runs alone (see the `coalesce` module). Longer than a commit's
/// flush, which is what a concurrent put of the same key makes it wait for.
pub(crate) const GROUP_LOCK_WAIT: &str = "200ms";

/// The filter of live entries: not expired on the server's clock at the statement's start
/// (`statement_timestamp()`, not `now()`, which is the transaction's start: one clock for expiry,
/// in and out of transactions).
pub(crate) const LIVE: &str = "(expires_at IS NULL OR expires_at > statement_timestamp())";
/// The columns of a [`StateEntry`](crate::state::StateEntry), in its order.
pub(crate) const ENTRY_COLUMNS: &str =
    "key, value, metadata, version, created_at, updated_at, expires_at";

/// One statement: its SQL and parameter types, and its prepared form on this connection
/// (none when statements are sent unnamed).
pub(crate) struct Stmt {
    sql: String,
    types: &'static [Type],
    prepared: Option<Statement>,
}

/// A parameter as the driver takes it.
pub(crate) type Param<'a> = &'a (dyn ToSql + Sync);

impl Stmt {
    fn typed<'a>(&self, params: &[Param<'a>]) -> Vec<(Param<'a>, Type)> {
        params
            .iter()
            .copied()
            .zip(self.types.iter().cloned())
            .collect()
    }

    pub async fn query<C: GenericClient + Sync>(
        &self,
        c: &C,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        match &self.prepared {
            Some(s) => c.query(s, params).await,
            None => c.query_typed(&self.sql, &self.typed(params)).await,
        }
    }

    pub async fn query_one<C: GenericClient + Sync>(
        &self,
        c: &C,
        params: &[Param<'_>],
    ) -> Result<Row, Error> {
        match &self.prepared {
            Some(s) => c.query_one(s, params).await,
            None => c.query_typed_one(&self.sql, &self.typed(params)).await,
        }
    }

    pub async fn query_opt<C: GenericClient + Sync>(
        &self,
        c: &C,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, Error> {
        match &self.prepared {
            Some(s) => c.query_opt(s, params).await,
            None => c.query_typed_opt(&self.sql, &self.typed(params)).await,
        }
    }

    pub async fn execute<C: GenericClient + Sync>(
        &self,
        c: &C,
        params: &[Param<'_>],
    ) -> Result<u64, Error> {
        match &self.prepared {
            Some(s) => c.execute(s, params).await,
            None => c.execute_typed(&self.sql, &self.typed(params)).await,
        }
    }
}

/// Ad-hoc statements (coordination, batches, notifications) at most kept prepared per
/// connection; past it, further ones are sent unnamed.
const CACHED_MAX: usize = 64;

/// Statements prepared on a connection the first time they run, by their SQL text: the
/// ad-hoc SQL of coordination and batch calls, which would otherwise be parsed and planned on
/// every call. (Behind PgBouncer's transaction pooling nothing is cached: every statement is
/// sent unnamed.)
#[derive(Default)]
pub(crate) struct StatementCache(std::sync::Mutex<std::collections::HashMap<String, Statement>>);

impl StatementCache {
    /// `sql` prepared on `client` (once), or `None` when statements are sent unnamed or the
    /// cache is full.
    pub async fn get(
        &self,
        client: &Client,
        unnamed: bool,
        sql: &str,
        types: &[Type],
    ) -> Result<Option<Statement>, Error> {
        if unnamed {
            return Ok(None);
        }
        let found = {
            let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(stmt) = map.get(sql) {
                return Ok(Some(stmt.clone()));
            }
            map.len() < CACHED_MAX
        };
        if !found {
            return Ok(None);
        }
        let stmt = client.prepare_typed(sql, types).await?;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql.to_string(), stmt.clone());
        Ok(Some(stmt))
    }
}

/// What an upsert does to an existing row (`e`). An entry that had expired counts as new again.
///
/// The times come from the proposed row (`EXCLUDED`), whose `created_at` and `updated_at` are
/// their column defaults, `statement_timestamp()` (migration 008): the statement's clock, which
/// judges expiry everywhere (see [`LIVE`]); Citus refuses any
/// function that is not immutable in `DO UPDATE SET` on a distributed table, while it
/// evaluates the proposed row's defaults on the coordinator. Inputs of upserts using this
/// must leave both columns to their defaults.
pub(crate) const REPLACE: &str = "value = EXCLUDED.value, metadata = EXCLUDED.metadata, \
    expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, version = e.version + 1, \
    created_at = CASE WHEN e.expires_at <= EXCLUDED.updated_at THEN EXCLUDED.created_at ELSE e.created_at END";

/// The condition of a put-if-absent's `DO UPDATE`: the existing entry has expired (as of the
/// proposed row's `updated_at`, which is `statement_timestamp()`; see [`REPLACE`]).
pub(crate) const EXPIRED_NOW: &str = "e.expires_at <= EXCLUDED.updated_at";

/// An upsert of the rows of `input` (a query whose columns are `columns`, `key` first): on a
/// plain (or hash or list partitioned) table, `INSERT ... ON CONFLICT (key) DO UPDATE SET
/// {set}{tail}`; `absent_only` then must be expressed by the caller's `set`/`tail`.
///
/// On a table partitioned by write window, first each key's entry in an older window moves
/// out (with `absent_only`, only one that is not live, and a key with a live one there is
/// skipped): the new row, in the current window, carries its version on (plus one) and its
/// creation time (unless it had expired); a key with no entry anywhere takes its version from
/// the version floor. A key whose entry is already in the current window merges as on a plain
/// table.
pub(crate) fn upsert_sql(
    names: &TableNames,
    input: &str,
    columns: &[&str],
    absent_only: bool,
    set: &str,
    tail: &str,
) -> String {
    let t = &names.qualified;
    let cols = columns.join(", ");
    if !names.windowed {
        return format!(
            "INSERT INTO {t} AS e ({cols}) {input} ON CONFLICT (key) DO UPDATE SET {set}{tail}"
        );
    }
    let window = format!("{}()", names.write_window);
    let picked: Vec<String> = columns.iter().map(|c| format!("i.{c}")).collect();
    let (created_col, created) = if columns.contains(&"created_at") {
        ("", String::new())
    } else {
        (
            ", created_at",
            ", CASE WHEN m.key IS NULL OR m.expires_at <= statement_timestamp() \
                 THEN statement_timestamp() ELSE m.created_at END"
                .to_string(),
        )
    };
    let (moved_filter, skip_live) = if absent_only {
        (
            format!(" AND NOT {LIVE}"),
            format!(
                " WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE x.key = i.key \
                 AND x.write_window < {window} AND (x.expires_at IS NULL OR x.expires_at > statement_timestamp()))"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "WITH i ({cols}) AS ({input}), \
              m AS (DELETE FROM {t} WHERE key IN (SELECT key FROM i) AND write_window < {window}{moved_filter} \
                    RETURNING key, version, created_at, expires_at) \
         INSERT INTO {t} AS e ({cols}, version{created_col}) \
         SELECT {}, coalesce(m.version + 1, {}()){created} \
         FROM i LEFT JOIN m ON m.key = i.key{skip_live} \
         ON CONFLICT (key, write_window) DO UPDATE SET {set}{tail}",
        picked.join(", "),
        names.next_version
    )
}

/// What every update of an entry (value, version, tombstone) also sets: on a table partitioned
/// by write window, the current window (the row moves there). So a window that ended only ever
/// loses rows, and no version in it grows after it ended.
pub(crate) fn rewindow(names: &TableNames) -> &'static str {
    if names.windowed {
        ", write_window = DEFAULT"
    } else {
        ""
    }
}

/// What a delete does to a row: it becomes a tombstone, expired since the beginning of time
/// (so every read skips it), with its value and metadata dropped and its version bumped. A
/// later write of the key continues from that version, so a version read before the delete
/// never matches again. Tombstones (and expired rows, which keep their versions the same
/// way) stay in the table: nothing removes rows yet, and a cleanup that does must not let a
/// removed key's version start over.
pub(crate) const TOMBSTONE: &str = "value = '\\x'::bytea, metadata = '{}'::jsonb, \
    expires_at = '-infinity', updated_at = statement_timestamp(), version = version + 1";

/// The statement's start time plus `$n` µs, or NULL when the parameter is NULL (no TTL).
/// `statement_timestamp()`, not `now()`: inside a long transaction, `now()` is the
/// transaction's start and the entry would expire early.
fn expiry(param: usize) -> String {
    format!("statement_timestamp() + ${param}::bigint * interval '1 microsecond'")
}

impl Statements {
    /// Whether statements are sent unnamed (PgBouncer's transaction pooling).
    pub fn unnamed(&self) -> bool {
        self.get.prepared.is_none()
    }
}

const BYTEA: &[Type] = &[Type::BYTEA];
const NONE: &[Type] = &[];
/// A single entry's input: key, value, metadata, TTL in µs.
const ENTRY: &[Type] = &[Type::BYTEA, Type::BYTEA, Type::JSONB, Type::INT8];
/// The columns a single entry's input fills.
const ENTRY_INPUT: &[&str] = &["key", "value", "metadata", "expires_at"];

/// A page of keys as one row holding one array, in key order, instead of a row per key:
/// the client decodes one message instead of a thousand (each a row of its own to allocate
/// and hand over), which made a page of 1 000 keys cost 0.58 of pgbench's time reading the
/// same rows (BENCHMARKS.md). The aggregate takes the rows in the order the page's
/// `ORDER BY` gives them (its own `ORDER BY` would sort them again: 0.65 of the rate, by
/// pgbench); SQL does not promise that order, so the client checks it (and sorts a page
/// that came otherwise).
fn key_page(page: &str) -> String {
    format!("SELECT coalesce(array_agg(key), '{{}}'::bytea[]) FROM ({page}) p")
}

/// Declares the fixed statements, each once: its field of [`Statements`], its parameter types
/// and its SQL, built from the table's names (`$t` its qualified name, `$rewindow` the
/// partition-key update of a table partitioned by write window, `$one_entry` a single
/// entry's input). `prepare` prepares them all at once (pipelined) and fills each field from
/// its own declaration, so a statement cannot end up in another's field.
macro_rules! statements {
    (
        |$names:ident, $t:ident, $rewindow:ident, $one_entry:ident|
        $( $(#[$doc:meta])* $field:ident ($types:expr) = $sql:expr; )*
    ) => {
        /// The fixed statements of one connection.
        pub(crate) struct Statements {
            $( $(#[$doc])* pub $field: Stmt, )*
        }

        impl Statements {
            /// The statements for `names`: prepared on `client`, or (`unnamed`) kept as SQL to
            /// send unnamed with each call.
            pub async fn prepare(
                client: &Client,
                $names: &TableNames,
                unnamed: bool,
            ) -> StateResult<Self> {
                let $t = &$names.qualified;
                let $rewindow = rewindow($names);
                let $one_entry =
                    format!("VALUES ($1::bytea, $2::bytea, $3::jsonb, {})", expiry(4));
                $( let $field: (String, &'static [Type]) = ($sql, $types); )*
                let prepared = if unnamed {
                    Vec::new()
                } else {
                    try_join_all([$( client.prepare_typed(&$field.0, $field.1), )*]).await?
                };
                let mut prepared = prepared.into_iter();
                Ok(Statements {
                    $( $field: Stmt {
                        sql: $field.0,
                        types: $field.1,
                        prepared: prepared.next(),
                    }, )*
                })
            }
        }
    };
}

statements! { |names, t, rewindow, one_entry|
    /// The value of a live key.
    get (BYTEA) = format!("SELECT value FROM {t} WHERE key = $1 AND {LIVE}");
    /// The whole live entry of a key.
    get_entry (BYTEA) = format!("SELECT {ENTRY_COLUMNS} FROM {t} WHERE key = $1 AND {LIVE}");
    /// Whether a key is live. (Not `EXISTS (subquery)`: Citus cannot route that with a
    /// generic plan.)
    contains (BYTEA) = format!("SELECT count(*) > 0 FROM {t} WHERE key = $1 AND {LIVE}");
    /// The number of live entries.
    count (NONE) = format!("SELECT count(*) FROM {t} WHERE {LIVE}");
    /// Writes one entry; returns its version.
    upsert (ENTRY) =
        upsert_sql(names, &one_entry, ENTRY_INPUT, false, REPLACE, " RETURNING version");
    /// Writes one entry only where no live one is; returns its version, or no row.
    insert_new (ENTRY) = upsert_sql(
        names,
        &one_entry,
        ENTRY_INPUT,
        true,
        REPLACE,
        &format!(" WHERE {EXPIRED_NOW} RETURNING version"),
    );
    /// Replaces a live entry at an expected version: key, value, version, metadata, TTL.
    update_if_version (&[Type::BYTEA, Type::BYTEA, Type::INT8, Type::JSONB, Type::INT8]) = format!(
        "UPDATE {t} SET value = $2, metadata = $4, expires_at = {}, \
         updated_at = statement_timestamp(), version = version + 1{rewindow} \
         WHERE key = $1 AND version = $3 AND {LIVE} RETURNING version",
        expiry(5)
    );
    /// Deletes a live key (a tombstone keeps its version).
    delete (BYTEA) = format!("UPDATE {t} SET {TOMBSTONE}{rewindow} WHERE key = $1 AND {LIVE}");
    /// The live keys in `[$1, $2)`.
    scan_range (&[Type::BYTEA, Type::BYTEA]) = format!(
        "SELECT key FROM {t} WHERE key >= $1 AND key < $2 AND {LIVE} ORDER BY key"
    );
    /// The live keys from `$1` on.
    scan_from (BYTEA) = format!("SELECT key FROM {t} WHERE key >= $1 AND {LIVE} ORDER BY key");
    /// Deletes every live entry (tombstones).
    clear (NONE) = format!("UPDATE {t} SET {TOMBSTONE}{rewindow} WHERE {LIVE}");
    /// Writes keys and values from two arrays.
    batch_upsert (&[Type::BYTEA_ARRAY, Type::BYTEA_ARRAY]) = upsert_sql(
        names,
        "SELECT * FROM unnest($1::bytea[], $2::bytea[])",
        &["key", "value"],
        false,
        REPLACE,
        "",
    );
    /// The live entries whose metadata contains `$1`.
    query_contains (&[Type::JSONB]) = format!(
        "SELECT {ENTRY_COLUMNS} FROM {t} WHERE metadata @> $1 AND {LIVE} ORDER BY key"
    );
    /// The live entries whose metadata contains `$1` and has `$3` at path `$2`.
    query_path (&[Type::JSONB, Type::TEXT_ARRAY, Type::JSONB]) = format!(
        "SELECT {ENTRY_COLUMNS} FROM {t} WHERE metadata @> $1 AND metadata #> $2::text[] = $3 \
         AND {LIVE} ORDER BY key"
    );
    /// Deletes a live key at an expected version.
    delete_if_version (&[Type::BYTEA, Type::INT8]) = format!(
        "UPDATE {t} SET {TOMBSTONE}{rewindow} WHERE key = $1 AND version = $2 AND {LIVE}"
    );
    /// Replaces a live entry whose value is `$3` by `$2`; returns its version.
    cas_update (&[Type::BYTEA, Type::BYTEA, Type::BYTEA]) = format!(
        "UPDATE {t} SET value = $2, metadata = '{{}}'::jsonb, expires_at = NULL, \
         updated_at = statement_timestamp(), version = version + 1{rewindow} \
         WHERE key = $1 AND value = $3 AND {LIVE} RETURNING version"
    );
    /// The primary's WAL insert position, block size and segment size.
    insert_lsn (NONE) = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, \
         current_setting('wal_block_size')::bigint, \
         pg_size_bytes(current_setting('wal_segment_size'))"
        .to_string();
    /// A replica's replay position.
    replay_lsn (NONE) =
        "SELECT pg_wal_lsn_diff(coalesce(pg_last_wal_replay_lsn(), '0/0'), '0/0')::bigint"
            .to_string();
    /// The live keys and values among `$1`.
    get_many (&[Type::BYTEA_ARRAY]) =
        format!("SELECT key, value FROM {t} WHERE key = ANY($1) AND {LIVE}");
    /// A page of live keys with prefix `$1` after `$2`, below `$3`, at most `$4`: one row,
    /// one array (see [`key_page`]).
    page_range (&[Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT8]) = key_page(&format!(
        "SELECT key FROM {t} WHERE key >= $1 AND key > $2 AND key < $3 AND {LIVE} \
         ORDER BY key LIMIT $4"
    ));
    /// A page of live keys from `$1` after `$2`, at most `$3`: one row, one array.
    page_from (&[Type::BYTEA, Type::BYTEA, Type::INT8]) = key_page(&format!(
        "SELECT key FROM {t} WHERE key >= $1 AND key > $2 AND {LIVE} ORDER BY key LIMIT $3"
    ));
    /// Writes a coalesced group of entries (waiting at most `GROUP_LOCK_WAIT` for a row
    /// lock); returns each key's version.
    upsert_many (&[Type::BYTEA_ARRAY, Type::BYTEA_ARRAY, Type::JSONB_ARRAY, Type::INT8_ARRAY]) =
        upsert_sql(
            names,
            &format!(
                "SELECT k, v, m, {} FROM unnest($1::bytea[], $2::bytea[], $3::jsonb[], \
                 $4::bigint[]) AS u (k, v, m, t) \
                 WHERE set_config('lock_timeout', '{GROUP_LOCK_WAIT}', true) IS NOT NULL",
                "statement_timestamp() + t * interval '1 microsecond'"
            ),
            ENTRY_INPUT,
            false,
            REPLACE,
            " RETURNING key, version",
        );
    /// A page of live entries with prefix `$1` after `$2`, below `$3`, at most `$4`.
    entries_range (&[Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT8]) = format!(
        "SELECT {ENTRY_COLUMNS} FROM {t} WHERE key >= $1 AND key > $2 AND key < $3 \
         AND {LIVE} ORDER BY key LIMIT $4"
    );
    /// A page of live entries from `$1` after `$2`, at most `$3`.
    entries_from (&[Type::BYTEA, Type::BYTEA, Type::INT8]) = format!(
        "SELECT {ENTRY_COLUMNS} FROM {t} WHERE key >= $1 AND key > $2 AND {LIVE} \
         ORDER BY key LIMIT $3"
    );
}
