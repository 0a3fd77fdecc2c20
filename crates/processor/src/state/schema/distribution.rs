//! Distribution of the state table over Citus workers: checked (and, for a table created now,
//! made) after the migrations, in their transaction.

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::state::config::citus_layout::CitusLayout;
use crate::state::error::{StateError, StateResult};
use crate::state::schema::names::TableNames;

/// How a table is distributed by Citus: hash-distributed on `column` into `shards` shards.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Distribution {
    pub column: String,
    pub shards: u32,
}

/// Whether the database has the `citus` extension.
async fn has_citus<C: GenericClient>(c: &C) -> StateResult<bool> {
    Ok(c.query_typed_one(
        "SELECT count(*) > 0 FROM pg_catalog.pg_extension WHERE extname = 'citus'",
        &[],
    )
    .await?
    .try_get(0)?)
}

/// How `qualified` is distributed, or `None` (no Citus, or a table of the coordinator's own).
pub(crate) async fn distribution<C: GenericClient>(
    c: &C,
    qualified: &str,
) -> StateResult<Option<Distribution>> {
    if !has_citus(c).await? {
        return Ok(None);
    }
    let row = c
        .query_typed_opt(
            "SELECT coalesce(pg_catalog.column_to_column_name(p.logicalrelid, p.partkey), ''), \
                    (SELECT count(*) FROM pg_catalog.pg_dist_shard s WHERE s.logicalrelid = p.logicalrelid) \
             FROM pg_catalog.pg_dist_partition p \
             WHERE p.logicalrelid = $1::text::regclass AND p.partmethod = 'h'",
            &[(&qualified, Type::TEXT)],
        )
        .await?;
    row.map(|r| {
        Ok(Distribution {
            column: r.try_get(0)?,
            shards: u32::try_from(r.try_get::<_, i64>(1)?).unwrap_or(u32::MAX),
        })
    })
    .transpose()
}

/// With `configured`, makes sure the state table is hash-distributed by `key` into its shard
/// count: a table not distributed yet is distributed now (`create_distributed_table`; an
/// existing table's rows move to the workers), one distributed otherwise is refused.
pub(crate) async fn ensure<C: GenericClient>(
    c: &C,
    names: &TableNames,
    configured: Option<&CitusLayout>,
) -> StateResult<()> {
    let Some(layout) = configured else {
        return Ok(());
    };
    if !has_citus(c).await? {
        return Err(StateError::config(
            "with_citus: the database has no citus extension (install Citus, preload it with \
             shared_preload_libraries = 'citus' and run CREATE EXTENSION citus on the coordinator)",
        ));
    }
    if let Some(what) = other_placement(c, &names.qualified).await? {
        return Err(StateError::config(format!(
            "{} is {what}; with_citus needs it hash-distributed by key (make it a plain table \
             again with Citus's undistribute_table, or leave with_citus out)",
            names.qualified
        )));
    }
    let want = Distribution {
        column: "key".to_string(),
        shards: layout.shard_count,
    };
    match distribution(c, &names.qualified).await? {
        Some(now) if now == want => colocate_checkpoints(c, names).await,
        Some(now) => Err(StateError::config(format!(
            "{} is distributed by {:?} into {} shards, but the configuration asks for key into {} \
             (change the shards with Citus's alter_distributed_table)",
            names.qualified, now.column, now.shards, want.shards
        ))),
        None => {
            tracing::info!(table = %names.qualified, shards = want.shards, "distributing the state table over the Citus workers");
            c.execute_typed(
                "SELECT create_distributed_table($1::text::regclass, 'key', shard_count := $2)",
                &[
                    (&names.qualified.as_str(), Type::TEXT),
                    (&i32::try_from(want.shards).unwrap_or(i32::MAX), Type::INT4),
                ],
            )
            .await?;
            colocate_checkpoints(c, names).await
        }
    }
}

/// What Citus has made of `qualified` when that is not hash distribution: a reference table, a
/// Citus local table, or an append or range distribution; `None` for a hash-distributed table
/// or one Citus does not know.
async fn other_placement<C: GenericClient>(
    c: &C,
    qualified: &str,
) -> StateResult<Option<&'static str>> {
    let row = c
        .query_typed_opt(
            "SELECT partmethod::text, repmodel::text FROM pg_catalog.pg_dist_partition \
             WHERE logicalrelid = $1::text::regclass",
            &[(&qualified, Type::TEXT)],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let method: String = row.try_get(0)?;
    let model: String = row.try_get(1)?;
    Ok(match (method.as_str(), model.as_str()) {
        ("h", _) => None,
        ("n", "t") => Some("a Citus reference table (a copy on every node)"),
        ("n", _) => Some("a Citus local table (kept on the coordinator)"),
        _ => Some("distributed by append or range"),
    })
}

/// Whether Citus has `qualified` as a reference table (`reference`) or hash-distributed.
/// (A table Citus manages on the coordinator alone, a "Citus local table", is neither.)
async fn placed<C: GenericClient>(c: &C, qualified: &str, reference: bool) -> StateResult<bool> {
    Ok(c.query_typed_one(
        "SELECT count(*) > 0 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1::text::regclass \
         AND CASE WHEN $2 THEN partmethod = 'n' AND repmodel = 't' ELSE partmethod = 'h' END",
        &[(&qualified, Type::TEXT), (&reference, Type::BOOL)],
    )
    .await?
    .try_get(0)?)
}

/// Checkpoints copy the state table's rows into `state_checkpoint_entries` and back: that
/// table is distributed by key too, beside the state table's shards (so each copy runs on
/// the workers), and the checkpoint list it refers to becomes a reference table (a copy on
/// every node).
async fn colocate_checkpoints<C: GenericClient>(c: &C, names: &TableNames) -> StateResult<()> {
    if !placed(c, &names.checkpoints, true).await? {
        c.execute_typed(
            "SELECT create_reference_table($1::text::regclass)",
            &[(&names.checkpoints.as_str(), Type::TEXT)],
        )
        .await?;
    }
    if !placed(c, &names.checkpoint_entries, false).await? {
        c.execute_typed(
            "SELECT create_distributed_table($1::text::regclass, 'key', colocate_with := $2)",
            &[
                (&names.checkpoint_entries.as_str(), Type::TEXT),
                (&names.qualified.as_str(), Type::TEXT),
            ],
        )
        .await?;
    }
    Ok(())
}
