//! TTL cleanup and retention: deleting expired entries (delete tombstones included) and, with a
//! retention policy, entries not written for `max_age`, in short batches. Archive moves rows
//! with the same machinery. Entries and tombstones are counted apart: a tombstone (what
//! `delete` and `clear` leave, `expires_at = '-infinity'`) was never an entry a user could
//! read, so the counts callers report leave them out.
//!
//! A cleanup pass reads the table in page order instead when a sweep removes a large share
//! of it, and for every sweep by age (the `heap_walk` module); the walk below serves the
//! rest: few expired rows, archive, tables Citus distributes.
//!
//! A batch is one READ COMMITTED transaction:
//! 1. pick and row-lock the victims (`FOR UPDATE SKIP LOCKED`, at most `batch_size`, skipping
//!    rows a writer holds), continuing after the previous batch's last row, so a pass is one
//!    walk over an index that never rescans entries of rows it already removed; walks by key
//!    look at a bounded window of keys per batch, so a batch is short even when few rows
//!    match;
//! 2. take the table's version-floor lock exclusively, waiting at most 100 ms (writers arriving
//!    meanwhile queue behind the request, so it is granted as soon as the writers in flight
//!    finish); if it is not granted by then, roll back and try the batch again (its victims are
//!    picked anew);
//! 3. delete (or move) the victims and raise the floor to the highest version removed (see
//!    migration `005_version_floor.sql`), then commit.
//!
//! Writers wait at most for step 2's queueing and step 3 of a batch: one statement over at
//! most `batch_size` rows.
//!
//! On a table Citus distributes, step 1 cannot lock rows (Citus refuses row locks in a
//! multi-shard query): the victims are picked unlocked, and step 3's delete checks each again
//! (a row written meanwhile no longer qualifies and stays). That delete runs on the workers,
//! where the batch's 100 ms `lock_timeout` applies too (`citus.propagate_set_commands`): a
//! victim row held by a writer makes the batch roll back and start over, as in step 2, so
//! cleanup never holds the floor lock while it waits for a row.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;

use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::ops::store::Store;
use crate::state::schema::floor;
use crate::state::schema::names::TableNames;
use crate::state::wire::statements::LIVE;

/// What a sweep removes.
#[derive(Clone, Debug)]
pub(crate) enum Sweep {
    /// Expired entries and delete tombstones (`expires_at <= statement_timestamp()`).
    Expired,
    /// Entries whose `updated_at` is older than this.
    OlderThan(Duration),
    /// Live entries older than this, moved into the archive table (quoted, qualified name).
    Archive(Duration, String),
}

/// Keys a walk by key looks at per batch.
const WINDOW: i64 = 10_000;
/// How long a batch waits for the floor lock before it rolls back and starts over.
pub(crate) const FLOOR_LOCK_WAIT: Duration = Duration::from_millis(100);
/// Batches started over for the floor lock before the pass gives up.
const FLOOR_LOCK_ATTEMPTS: u32 = 50;

/// Where a walk stands: after this key (and, for expired rows, this expiry, as text).
#[derive(Default, Clone)]
struct Cursor {
    key: Vec<u8>,
    expiry: Option<String>,
}

/// The statements of one sweep.
struct Plan {
    /// `$1` limit, `$2` cursor key, `$3` cursor expiry (text), `$4` window end (bytea or
    /// NULL), `$5` age in seconds: returns `key` and, for expired rows, `expires_at::text`, in
    /// walk order, row-locked (unless the table is distributed).
    victims: String,
    /// Walks by key first find the end of the next window: `$1` cursor key, `$2` window size.
    window: Option<String>,
    /// `$1` the victims' keys, `$2` age in seconds: removes those that still qualify, returns
    /// (entries, tombstones, highest version).
    remove: String,
    age: f64,
}

fn plan(names: &TableNames, sweep: &Sweep) -> Plan {
    let t = &names.qualified;
    // Citus cannot lock rows of a multi-shard query: on a distributed table the victims are
    // picked unlocked, and the removal checks each one again (a row written meanwhile no
    // longer qualifies and stays).
    let lock = if names.distributed {
        ""
    } else {
        " FOR UPDATE SKIP LOCKED"
    };
    // Not written for the age in parameter `$n` (seconds).
    let aged = |n: usize| {
        format!("updated_at < statement_timestamp() - ${n}::float8 * interval '1 second'")
    };
    let by_key = |extra: &str| {
        format!(
            "SELECT key, NULL::text FROM {t} WHERE key > $2 AND ($4::bytea IS NULL OR key <= $4) \
             AND {} {extra} ORDER BY key LIMIT $1{lock}",
            aged(5)
        )
    };
    let window = format!("SELECT key FROM {t} WHERE key > $1 ORDER BY key OFFSET $2 - 1 LIMIT 1");
    // `$1` the victims' keys, `$2` the age in seconds (for the check again).
    let delete = |recheck: &str| {
        format!(
            "WITH gone AS (DELETE FROM {t} WHERE key = ANY($1) AND {recheck} \
                           RETURNING version, coalesce(expires_at = '-infinity', false) AS tombstone) \
             SELECT count(*) FILTER (WHERE NOT tombstone)::bigint, \
                    count(*) FILTER (WHERE tombstone)::bigint, \
                    coalesce(max(version), 0)::bigint FROM gone"
        )
    };
    match sweep {
        Sweep::Expired => Plan {
            victims: format!(
                "SELECT key, expires_at::text AS expiry FROM {t} WHERE expires_at <= statement_timestamp() \
                 AND (expires_at, key) > (coalesce($3::text::timestamptz, '-infinity'), $2) \
                 ORDER BY expires_at, key LIMIT $1{lock}"
            ),
            window: None,
            // (`$2` unused: no age.)
            remove: delete("expires_at <= statement_timestamp() AND $2::float8 IS NOT NULL"),
            age: 0.0,
        },
        Sweep::OlderThan(age) => Plan {
            victims: by_key(""),
            window: Some(window),
            remove: delete(&aged(2)),
            age: age.as_secs_f64(),
        },
        Sweep::Archive(age, archive) => Plan {
            // Only live entries are archived: expired ones and tombstones are cleanup's.
            victims: by_key(&format!("AND {LIVE}")),
            window: Some(window),
            remove: format!(
                "WITH moved AS (DELETE FROM {t} WHERE key = ANY($1) AND {} AND {LIVE} RETURNING *), \
                 kept AS (INSERT INTO {archive} ({COLUMNS}) SELECT {COLUMNS} FROM moved \
                          RETURNING version) \
                 SELECT count(*)::bigint, 0::bigint, coalesce(max(version), 0)::bigint FROM kept",
                aged(2)
            ),
            age: age.as_secs_f64(),
        },
    }
}

/// The state table's columns, as an archive keeps them.
pub(crate) const COLUMNS: &str =
    "key, value, metadata, created_at, updated_at, expires_at, version";

/// Rows a sweep removed (or moved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    /// Entries a user could have read once: expired, aged out or archived.
    pub entries: u64,
    /// Delete tombstones (the rows `delete` and `clear` leave; never an entry of the user's).
    pub tombstones: u64,
}

impl Removed {
    /// Every row.
    pub fn rows(self) -> u64 {
        self.entries + self.tombstones
    }
}

/// Removes (or moves) what `sweep` selects in batches of `batch_size` rows until the walk
/// ends; returns how many rows of each kind. `progress` gets the running total of rows
/// (tombstones included) after each batch.
pub(crate) async fn sweep(
    store: &Store,
    sweep: Sweep,
    batch_size: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> StateResult<Removed> {
    let plan = plan(&store.ctx.names, &sweep);
    let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let mut cursor = Cursor::default();
    let mut total = Removed::default();
    let mut contended = 0u32;
    loop {
        let step = batch(store, &plan, limit, &cursor).await?;
        let Some(step) = step else {
            contended = floor_lock_kept(&store.ctx.names, contended, total)?;
            continue;
        };
        total.entries += step.removed.entries;
        total.tombstones += step.removed.tombstones;
        progress(total.rows());
        match step.next {
            Some(next) => cursor = next,
            None => return Ok(total),
        }
        tokio::task::yield_now().await;
    }
}

/// One more batch found the floor lock kept (`contended` before it): the count to go on
/// with, or, after [`FLOOR_LOCK_ATTEMPTS`], the error that ends the pass (`total` removed).
pub(crate) fn floor_lock_kept(
    names: &TableNames,
    contended: u32,
    total: Removed,
) -> StateResult<u32> {
    let contended = contended + 1;
    if contended >= FLOOR_LOCK_ATTEMPTS {
        return Err(StateError::Timeout(format!(
            "cleanup of {} could not take the version floor lock in {contended} tries: a long \
             write transaction on the table holds it ({} rows removed so far; the rest goes at \
             the next pass)",
            names.qualified,
            total.rows()
        )));
    }
    Ok(contended)
}

/// What one batch did.
struct Step {
    removed: Removed,
    /// Where the next batch starts; `None` when the walk is over.
    next: Option<Cursor>,
}

/// One batch; `None` when the floor lock stayed taken (the batch rolled back).
///
/// Long on purpose: the statements of one transaction in the order they run (the module
/// notes' steps 1 to 3), where the order is the argument for correctness; split, each part
/// would need the transaction and the step's state handed to it.
async fn batch(
    store: &Store,
    plan: &Plan,
    limit: i64,
    cursor: &Cursor,
) -> StateResult<Option<Step>> {
    let names = &store.ctx.names;
    store
        .on_primary(async |c| {
            let tx = c
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await?;
            // Planned with this batch's values (pooled sessions plan generically, which would
            // guess the LIMIT).
            tx.batch_execute("SET LOCAL plan_cache_mode = auto").await?;
            let window_end: Option<Vec<u8>> = match &plan.window {
                Some(sql) => tx
                    .query_typed_opt(
                        sql,
                        &[(&cursor.key.as_slice(), Type::BYTEA), (&WINDOW, Type::INT8)],
                    )
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?,
                None => None,
            };
            let rows = tx
                .query_typed(
                    &plan.victims,
                    &[
                        (&limit, Type::INT8),
                        (&cursor.key.as_slice(), Type::BYTEA),
                        (&cursor.expiry, Type::TEXT),
                        (&window_end, Type::BYTEA),
                        (&plan.age, Type::FLOAT8),
                    ],
                )
                .await?;
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
            let last = match rows.last() {
                Some(r) => Some(Cursor {
                    key: r.try_get(0)?,
                    expiry: r.try_get(1)?,
                }),
                None => None,
            };
            // Where the next batch starts: after the last victim while batches come back
            // full; after the window when it is exhausted; nowhere when the walk is done.
            let next = match (&plan.window, full, last.clone(), window_end) {
                (_, true, Some(last), _) => Some(last),
                (Some(_), false, _, Some(end)) => Some(Cursor {
                    key: end,
                    expiry: None,
                }),
                _ => None,
            };
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(Some(Step {
                    removed: Removed::default(),
                    next,
                }));
            }
            let keys: Vec<Vec<u8>> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            // Queued, but only for a moment: writers arriving meanwhile wait behind this
            // request, for at most FLOOR_LOCK_WAIT plus the batch's one statement.
            if names.distributed {
                // The delete runs on the workers: let the lock timeout reach them.
                tx.batch_execute("SET LOCAL citus.propagate_set_commands = 'local'")
                    .await?;
            }
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = {}",
                FLOOR_LOCK_WAIT.as_millis()
            ))
            .await?;
            match floor::lock(&tx, names).await {
                Ok(_) => {}
                // Writers kept it (one may be waiting for a row this batch locked): let go
                // of everything and pick again.
                Err(e) if e.code().map(|c| c.code()) == Some(sqlstate::LOCK_NOT_AVAILABLE) => {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
            let removed = tx
                .query_typed_one(
                    &plan.remove,
                    &[(&keys, Type::BYTEA_ARRAY), (&plan.age, Type::FLOAT8)],
                )
                .await;
            let row = match removed {
                Ok(row) => row,
                // Unlocked victims (a distributed table): a writer holds one of them. Let go
                // of the floor lock and pick again.
                Err(e) if e.code().map(|c| c.code()) == Some(sqlstate::LOCK_NOT_AVAILABLE) => {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            let count = |i: usize| -> StateResult<u64> {
                Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
            };
            let removed = Removed {
                entries: count(0)?,
                tombstones: count(1)?,
            };
            let highest: i64 = row.try_get(2)?;
            if removed.rows() > 0 {
                floor::raise(&tx, names, highest).await?;
            }
            tx.commit().await?;
            Ok(Some(Step { removed, next }))
        })
        .await
}
