//! Online conversion of an unpartitioned state table to a partitioned one, while other
//! backends keep reading and writing it.
//!
//! 1. A partitioned twin is created (`partitions::create_twin`) and a trigger on the table
//!    copies every later insert, update and delete to it, in the writer's transaction.
//! 2. The existing rows are copied in key order, in batches, each batch one short statement
//!    that locks the rows it copies (`FOR SHARE`) so that no write to them slips between
//!    reading and copying; a row the trigger already copied is kept as the trigger wrote it.
//! 3. In one snapshot, the twin must hold exactly the table's rows (count and sum of
//!    versions), else everything is undone.
//! 4. One short transaction takes the table exclusively (waits bounded by `lock_timeout`,
//!    retried), drops the trigger and swaps the twin in (`partitions::swap_in`). Statements
//!    other connections prepared are planned again against the new table on their next run.
//!
//! Any failure before the swap drops the trigger and the twin: the table is left as it was.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::error::{StateError, StateResult};
use crate::state::ident::Ident;
use crate::state::ops::store::Store;
use crate::state::retry::while_lock_busy;
use crate::state::schema::partitions::{self, Layout};

/// What [`migrate_to_partitioned`](crate::state::EnhancedPostgresBackend::migrate_to_partitioned) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepartitionReport {
    /// Rows copied by the batches (rows the trigger copied are not counted).
    pub rows_copied: u64,
    /// Partitions of the table now.
    pub partitions: usize,
    /// False when the table already had the strategy and nothing was done.
    pub converted: bool,
}

/// How long the swap and the trigger's creation wait for the table's lock per attempt, and
/// how many attempts they make.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_ATTEMPTS: u32 = 30;

/// Converts the state table to `strategy`, copying `batch_size` rows per batch and calling
/// `progress(copied, estimated_total)` after each batch. The caller holds the table's
/// maintenance lock.
///
/// Long on purpose: the conversion's phases in order (checks, clean-up of an earlier run,
/// set-up of the twin and its sync trigger, copy, verify, swap, statistics), each one call,
/// with the undo of a failed run beside them.
pub(crate) async fn repartition(
    store: &Store,
    strategy: &PartitionStrategy,
    batch_size: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> StateResult<RepartitionReport> {
    strategy.validate()?;
    if strategy.windowed() {
        // Every backend on the table would keep sending writes for a table keyed by `key`
        // alone: they need a restart with the new strategy, which an online change cannot do.
        return Err(StateError::config(format!(
            "{strategy} cannot be reached online: create a new table with it and copy the \
             entries over (batch_copy), or convert to hash or list partitioning"
        )));
    }
    let names = &store.ctx.names;
    if names.distributed {
        return Err(StateError::config(format!(
            "{} is distributed by Citus, which shards it already: partitioning does not apply",
            names.qualified
        )));
    }
    if store.ctx.primary.transaction_pooling() {
        // Its session settings would outlive it on a server connection PgBouncer shares.
        return Err(StateError::config(
            "converting a table to partitions needs a direct connection, not PgBouncer's \
             transaction pooling: run it from a backend whose URL reaches the server directly",
        ));
    }
    let client = store.ctx.primary.connect_unpooled().await?;
    // Bounds are compared in the server's default text forms.
    client
        .batch_execute(
            "SET statement_timeout = 0; SET lock_timeout = '5s'; SET bytea_output = hex; \
             SET standard_conforming_strings = on",
        )
        .await?;
    let count = |l: &Layout| match l {
        Layout::Plain => 0,
        Layout::Partitioned { bounds, .. } => bounds.len(),
    };
    match partitions::layout(&client, &names.qualified).await? {
        l if l.is(strategy) => {
            return Ok(RepartitionReport {
                rows_copied: 0,
                partitions: count(&l),
                converted: false,
            })
        }
        Layout::Plain => {}
        other => {
            return Err(StateError::config(format!(
                "{} already uses {}; it can be converted from an unpartitioned table only",
                names.qualified,
                other.describe()
            )))
        }
    }
    let twin = partitions::twin_name(names);
    let sync = names.table.suffixed("_repartition_sync");
    // A run that died half-way (or was cancelled) left its twin and trigger: start over.
    undo(&client, store, &twin, &sync).await?;
    // What could not move to the new table is refused before anything is built.
    partitions::refuse_what_cannot_move(&client, names).await?;
    let result = async {
        set_up(&client, store, strategy, &twin, &sync).await?;
        let copied = copy_rows(&client, store, &twin, batch_size, progress).await?;
        verify(&client, store, &twin).await?;
        swap(&client, store, &twin, &sync).await?;
        Ok(copied)
    }
    .await;
    let copied = match result {
        Ok(copied) => copied,
        Err(e) => {
            if let Err(u) = undo(&client, store, &twin, &sync).await {
                tracing::warn!(error = %u, "undoing a failed partitioning run");
            }
            return Err(e);
        }
    };
    // Planner statistics for the new partitions.
    client
        .batch_execute(&format!("ANALYZE {}", names.qualified))
        .await?;
    let parts = count(&partitions::layout(&client, &names.qualified).await?);
    tracing::info!(table = %names.qualified, %strategy, rows = copied, "table partitioned");
    Ok(RepartitionReport {
        rows_copied: copied,
        partitions: parts,
        converted: true,
    })
}

/// What the twin's comment says, so that only a twin this code built is ever dropped.
const TWIN_MARK: &str = "pgstate: partitioned copy being built";

/// Drops the twin, the trigger and its function, if they exist. A table with the twin's name
/// that does not carry [`TWIN_MARK`] is someone else's: refused, nothing dropped.
async fn undo(client: &Client, store: &Store, twin: &Ident, sync: &Ident) -> StateResult<()> {
    let (t, s) = (&store.ctx.names.qualified, &store.ctx.names.schema);
    let twin_q = format!("{s}.{twin}");
    let found: Option<Option<String>> = client
        .query_typed_opt(
            "SELECT obj_description(to_regclass($1), 'pg_class') WHERE to_regclass($1) IS NOT NULL",
            &[(&twin_q.as_str(), Type::TEXT)],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if let Some(mark) = &found {
        if mark.as_deref() != Some(TWIN_MARK) {
            return Err(StateError::config(format!(
                "{twin_q} exists and was not built by pgstate: rename or drop it first"
            )));
        }
    }
    client
        .batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {sync} ON {t}; DROP FUNCTION IF EXISTS {s}.{sync}(); \
             DROP TABLE IF EXISTS {twin_q}"
        ))
        .await?;
    Ok(())
}

/// Creates the twin and the trigger that keeps it in step with the table.
async fn set_up(
    client: &Client,
    store: &Store,
    strategy: &PartitionStrategy,
    twin: &Ident,
    sync: &Ident,
) -> StateResult<()> {
    let (t, s) = (&store.ctx.names.qualified, &store.ctx.names.schema);
    // Every column but the key, as the upsert of the trigger sets it (names quoted by the
    // server).
    let set: String = client
        .query_typed_one(
            "SELECT string_agg(format('%I = EXCLUDED.%I', attname, attname), ', ' ORDER BY attnum)
             FROM pg_catalog.pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped AND attname <> 'key'",
            &[(&t.as_str(), Type::TEXT)],
        )
        .await?
        .try_get(0)?;
    let (names, set) = (&store.ctx.names, &set);
    while_lock_busy(LOCK_ATTEMPTS, || {
        in_transaction(client, async move {
            partitions::create_twin(client, names, strategy, twin).await?;
            // The twin has the table's columns in the table's order (LIKE), so a row of one is
            // a row of the other. The function runs with its owner's rights (a writer needs
            // none on the twin). Under REPEATABLE READ a twin row a copy batch committed after
            // the writer's snapshot makes the upsert fail with a serialization failure, to be
            // retried.
            client
                .batch_execute(&format!(
                    "COMMENT ON TABLE {s}.{twin} IS '{TWIN_MARK}';
                     CREATE FUNCTION {s}.{sync}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
                         SET search_path = pg_catalog, pg_temp AS $body$
                         BEGIN
                             IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.key <> NEW.key) THEN
                                 DELETE FROM {s}.{twin} WHERE key = OLD.key;
                             END IF;
                             IF TG_OP IN ('INSERT', 'UPDATE') THEN
                                 INSERT INTO {s}.{twin} SELECT NEW.* ON CONFLICT (key) DO UPDATE SET {set};
                             END IF;
                             RETURN NULL;
                         END
                         $body$;
                         CREATE TRIGGER {sync} AFTER INSERT OR UPDATE OR DELETE ON {t}
                             FOR EACH ROW EXECUTE FUNCTION {s}.{sync}()"
                ))
                .await?;
            Ok(())
        })
    })
    .await
}

/// Copies the table's rows to the twin in key order; returns how many were copied.
async fn copy_rows(
    client: &Client,
    store: &Store,
    twin: &Ident,
    batch_size: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> StateResult<u64> {
    let (t, s) = (&store.ctx.names.qualified, &store.ctx.names.schema);
    let estimate: i64 = client
        .query_typed_one(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_catalog.pg_class WHERE oid = $1::text::regclass",
            &[(&t.as_str(), Type::TEXT)],
        )
        .await?
        .try_get(0)?;
    let estimate = u64::try_from(estimate).unwrap_or(0);
    // Rows the trigger already copied (written since it was created) are left as it wrote
    // them: they are at least as new as what this batch read.
    let batch = format!(
        "WITH batch AS (SELECT * FROM ONLY {t} WHERE key > $1 ORDER BY key LIMIT $2 FOR SHARE),
              copied AS (INSERT INTO {s}.{twin} SELECT * FROM batch ON CONFLICT (key) DO NOTHING)
         SELECT count(*), (SELECT key FROM batch ORDER BY key DESC LIMIT 1) FROM batch"
    );
    let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let mut after: Vec<u8> = Vec::new();
    let mut copied = 0u64;
    loop {
        // A writer holding one of the batch's rows for long makes the batch wait again.
        let (batch, after_key, limit_ref) = (&batch, &after, &limit);
        let row = while_lock_busy(LOCK_ATTEMPTS, || async move {
            Ok(client
                .query_typed_one(batch, &[(after_key, Type::BYTEA), (limit_ref, Type::INT8)])
                .await?)
        })
        .await?;
        let n: i64 = row.try_get(0)?;
        let last: Option<Vec<u8>> = row.try_get(1)?;
        copied += u64::try_from(n).unwrap_or(0);
        progress(copied, estimate.max(copied));
        match last {
            Some(last) if n == limit => after = last,
            _ => return Ok(copied),
        }
    }
}

/// The twin must hold exactly the table's rows, seen in one snapshot (the trigger writes in
/// the writer's own transaction, so every snapshot sees both or neither).
async fn verify(client: &Client, store: &Store, twin: &Ident) -> StateResult<()> {
    let (t, s) = (&store.ctx.names.qualified, &store.ctx.names.schema);
    let row = client
        .query_typed_one(
            &format!(
                "WITH a AS (SELECT count(*) AS n, coalesce(sum(version), 0) AS v FROM ONLY {t}),
                      b AS (SELECT count(*) AS n, coalesce(sum(version), 0) AS v FROM {s}.{twin})
                 SELECT a.n, b.n, a.v = b.v FROM a, b"
            ),
            &[],
        )
        .await?;
    let (rows, twin_rows, same_versions): (i64, i64, bool) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if rows != twin_rows || !same_versions {
        return Err(StateError::StorageError {
            message: format!(
                "partitioning {}: the copy holds {twin_rows} rows against {rows} (versions {}); \
                 nothing was changed",
                t,
                if same_versions { "equal" } else { "differ" }
            ),
            sqlstate: None,
        });
    }
    Ok(())
}

/// Takes the table exclusively, drops the trigger and swaps the twin in.
async fn swap(client: &Client, store: &Store, twin: &Ident, sync: &Ident) -> StateResult<()> {
    let (t, s) = (&store.ctx.names.qualified, &store.ctx.names.schema);
    let names = &store.ctx.names;
    while_lock_busy(LOCK_ATTEMPTS, || {
        in_transaction(client, async move {
            client
                .batch_execute(&format!(
                    "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; DROP TRIGGER {sync} ON {t}; \
                     DROP FUNCTION {s}.{sync}()"
                ))
                .await?;
            partitions::swap_in(client, names, twin).await
        })
    })
    .await
}

/// Runs `work` (statements on `client`) in a transaction whose lock waits are bounded by
/// [`LOCK_WAIT`]: committed when it succeeds, rolled back when it fails.
async fn in_transaction(
    client: &Client,
    work: impl std::future::Future<Output = StateResult<()>>,
) -> StateResult<()> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = {}",
            LOCK_WAIT.as_millis()
        ))
        .await?;
    match work.await {
        Ok(()) => Ok(client.batch_execute("COMMIT").await?),
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            Err(e)
        }
    }
}
