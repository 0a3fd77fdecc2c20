//! Embedded migrations and their runner.
//!
//! The SQL files in `crates/processor/migrations/` are compiled into the binary. `new()` applies
//! the missing ones in one transaction that first takes a transaction-scoped advisory lock, so
//! any number of instances may start at once: one applies, the others wait and then find
//! everything applied. Each applied migration is recorded in `pgstate_schema_migrations` with a
//! SHA-256 checksum of its text; a recorded migration whose embedded text changed is refused.
//!
//! Migrations create the state table unpartitioned; a table they create for a configuration
//! that asks for partitioning is then converted in the same transaction (`partitions`). So
//! every migration from 008 on must run on a partitioned table as well: no storage
//! parameters on the table itself (set them on its partitions), no unique index without
//! `key` (and, on a time-range table, without `write_window`).

use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use crate::state::config::citus_layout::CitusLayout;
use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::error::{StateError, StateResult};
use crate::state::schema::distribution;
use crate::state::schema::names::TableNames;
use crate::state::schema::partitions;

/// One embedded migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Applied in ascending order.
    pub version: i32,
    /// The file name.
    pub name: &'static str,
    /// The SQL template.
    pub sql: &'static str,
    /// Applied once per schema (it only touches the schema's shared tables), not once per
    /// state table; recorded with an empty `state_table`.
    pub per_schema: bool,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "001_create_state_table.sql",
        sql: include_str!("../../../migrations/001_create_state_table.sql"),
        per_schema: false,
    },
    Migration {
        version: 2,
        name: "002_add_indexes.sql",
        sql: include_str!("../../../migrations/002_add_indexes.sql"),
        per_schema: false,
    },
    Migration {
        version: 3,
        name: "003_enhanced_features.sql",
        sql: include_str!("../../../migrations/003_enhanced_features.sql"),
        per_schema: false,
    },
    Migration {
        version: 4,
        name: "004_coordination.sql",
        sql: include_str!("../../../migrations/004_coordination.sql"),
        per_schema: true,
    },
    Migration {
        version: 5,
        name: "005_version_floor.sql",
        sql: include_str!("../../../migrations/005_version_floor.sql"),
        per_schema: false,
    },
    Migration {
        version: 6,
        name: "006_expiry_keyset_index.sql",
        sql: include_str!("../../../migrations/006_expiry_keyset_index.sql"),
        per_schema: false,
    },
    Migration {
        version: 7,
        name: "007_checkpoint_entries.sql",
        sql: include_str!("../../../migrations/007_checkpoint_entries.sql"),
        per_schema: true,
    },
    Migration {
        version: 8,
        name: "008_statement_clock.sql",
        sql: include_str!("../../../migrations/008_statement_clock.sql"),
        per_schema: false,
    },
    Migration {
        version: 9,
        name: "009_archive_key_version_index.sql",
        sql: include_str!("../../../migrations/009_archive_key_version_index.sql"),
        per_schema: false,
    },
    Migration {
        version: 10,
        name: "010_checkpoint_uuid.sql",
        sql: include_str!("../../../migrations/010_checkpoint_uuid.sql"),
        per_schema: true,
    },
    Migration {
        version: 11,
        name: "011_leases.sql",
        sql: include_str!("../../../migrations/011_leases.sql"),
        per_schema: true,
    },
    Migration {
        version: 12,
        name: "012_exactly_once.sql",
        sql: include_str!("../../../migrations/012_exactly_once.sql"),
        per_schema: true,
    },
    Migration {
        version: 13,
        name: "013_incremental_checkpoints.sql",
        sql: include_str!("../../../migrations/013_incremental_checkpoints.sql"),
        per_schema: false,
    },
    Migration {
        version: 14,
        name: "014_hot_checkpoint_capture.sql",
        sql: include_str!("../../../migrations/014_hot_checkpoint_capture.sql"),
        per_schema: false,
    },
];

/// Name of the tracking table, in the configured schema.
pub const TRACKING_TABLE: &str = "pgstate_schema_migrations";

/// Advisory lock key that serialises migrations database-wide: the first 8 bytes of
/// SHA-256("pgstate.migrations"), big-endian (`0x3dbd6fa682afdea5`). Fixed forever, so every
/// version of pgstate takes the same lock.
pub(crate) fn migration_lock_key() -> i64 {
    let digest = Sha256::digest(b"pgstate.migrations");
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// SHA-256 of a migration's template, hex.
pub(crate) fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies the missing migrations for `names` on `client`, a connection of their own (closed
/// afterwards), then checks the table's partitioning against `partitioning` (a table created by this run
/// is created partitioned that way). Returns the table's layout.
pub(crate) async fn migrate(
    mut client: tokio_postgres::Client,
    names: &TableNames,
    partitioning: Option<&PartitionStrategy>,
    citus: Option<&CitusLayout>,
) -> StateResult<Migrated> {
    let result = migrate_on(&mut client, names, partitioning, citus).await;
    drop(client);
    result.map_err(|e| match e {
        StateError::StorageError { message, sqlstate } => StateError::StorageError {
            message: format!("applying migrations to {}: {message}", names.qualified),
            sqlstate,
        },
        other => other,
    })
}

/// One migration as a schema's tracking table records it, from
/// [`EnhancedPostgresBackend::migration_status`](crate::state::EnhancedPostgresBackend::migration_status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version.
    pub version: i32,
    /// Its file name.
    pub name: String,
    /// The SHA-256 of its text when it was applied.
    pub checksum: String,
    /// When it was applied (the server's clock).
    pub applied_at: std::time::SystemTime,
    /// Whether the embedded file still has that checksum.
    pub matches: bool,
}

/// Where a state table stands with the embedded migrations: read without creating or
/// changing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Whether the state table exists.
    pub table_exists: bool,
    /// The migrations recorded for it (and its schema's shared ones), by version.
    pub applied: Vec<AppliedMigration>,
    /// The embedded migrations not recorded yet, in the order they would run.
    pub pending: Vec<&'static Migration>,
}

/// The migration status of `names` on `client`, read in one statement each; nothing is
/// created.
pub(crate) async fn status<C: GenericClient>(
    c: &C,
    names: &TableNames,
) -> StateResult<MigrationStatus> {
    let tracking = format!("{}.{TRACKING_TABLE}", names.schema);
    let exists = |name: &str| {
        let name = name.to_string();
        async move {
            let row = c
                .query_typed_one("SELECT to_regclass($1) IS NOT NULL", &[(&name, Type::TEXT)])
                .await?;
            Ok::<bool, StateError>(row.try_get(0)?)
        }
    };
    let table_exists = exists(&names.qualified).await?;
    let mut applied = Vec::new();
    if exists(&tracking).await? {
        let rows = c
            .query_typed(
                &format!(
                    "SELECT version, name, checksum, applied_at FROM {tracking} \
                     WHERE state_table IN ($1, '') ORDER BY version"
                ),
                &[(&names.table.as_str(), Type::TEXT)],
            )
            .await?;
        for r in rows {
            let version: i32 = r.try_get(0)?;
            let sum: String = r.try_get(2)?;
            let matches = MIGRATIONS
                .iter()
                .any(|m| m.version == version && checksum(m.sql) == sum);
            applied.push(AppliedMigration {
                version,
                name: r.try_get(1)?,
                checksum: sum,
                applied_at: r.try_get(3)?,
                matches,
            });
        }
    }
    let pending = MIGRATIONS
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .collect();
    Ok(MigrationStatus {
        table_exists,
        applied,
        pending,
    })
}

/// Opens an existing state table without changing anything: it must exist with every
/// migration applied (else [`StateError::NotInitialized`], saying what `pgstate migrate` or a
/// backend allowed to change the schema would do). Returns its layout.
pub(crate) async fn verify(client: &Client, names: &TableNames) -> StateResult<Migrated> {
    let s = status(client, names).await?;
    if !s.table_exists {
        return Err(StateError::NotInitialized(format!(
            "the state table {} does not exist (`pgstate migrate`, or a backend that may change \
             the schema, creates it)",
            names.qualified
        )));
    }
    if let Some(bad) = s.applied.iter().find(|a| !a.matches) {
        return Err(StateError::config(format!(
            "migration {} was applied to {} with checksum {}, but the embedded file differs: \
             the schema was created by a different version of pgstate",
            bad.name, names.qualified, bad.checksum
        )));
    }
    if !s.pending.is_empty() {
        let names_of: Vec<&str> = s.pending.iter().map(|m| m.name).collect();
        return Err(StateError::NotInitialized(format!(
            "{} lacks migrations {} (`pgstate migrate` applies them)",
            names.qualified,
            names_of.join(", ")
        )));
    }
    let layout = partitions::layout(client, &names.qualified).await?;
    let distributed = distribution::distribution(client, &names.qualified)
        .await?
        .is_some();
    Ok(Migrated {
        layout,
        distributed,
    })
}

/// What the migrations found the state table to be.
pub(crate) struct Migrated {
    /// Its partitioning.
    pub layout: partitions::Layout,
    /// Whether Citus distributes it over workers.
    pub distributed: bool,
}

/// Applies the missing migrations in one transaction under the migration lock, then checks
/// (or, for a table created now, makes) its partitioning and distribution.
///
/// Long on purpose: the runner's steps in the order they must run in that transaction (lock,
/// tracking table, checksums of applied migrations, each missing one, layout, distribution).
async fn migrate_on(
    client: &mut Client,
    names: &TableNames,
    partitioning: Option<&PartitionStrategy>,
    citus: Option<&CitusLayout>,
) -> StateResult<Migrated> {
    let tx = client.transaction().await?;
    // Waiting for another instance's migration must not trip a configured statement_timeout.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&migration_lock_key(), Type::INT8)],
    )
    .await?;
    let schema_exists: bool = tx
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            &[(&names.schema.as_str(), Type::TEXT)],
        )
        .await?
        .get(0);
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA {}", names.schema))
            .await?;
    }
    let tracking = format!("{}.{TRACKING_TABLE}", names.schema);
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {tracking} (
            state_table text        NOT NULL,
            version     integer     NOT NULL,
            name        text        NOT NULL,
            checksum    text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (state_table, version)
        )"
    ))
    .await?;
    let applied = tx
        .query_typed(
            &format!(
                "SELECT state_table, version, checksum FROM {tracking} WHERE state_table IN ($1, '')"
            ),
            &[(&names.table.as_str(), Type::TEXT)],
        )
        .await?;
    // Only a table these migrations create may be given its partitioning here: an existing
    // one keeps its rows, so it is converted by the online migration or not at all.
    let created_now: bool = tx
        .query_typed_one(
            "SELECT to_regclass($1) IS NULL",
            &[(&names.qualified.as_str(), Type::TEXT)],
        )
        .await?
        .get(0);
    let insert = format!(
        "INSERT INTO {tracking} (state_table, version, name, checksum) VALUES ($1, $2, $3, $4)"
    );
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        let scope = if m.per_schema {
            ""
        } else {
            names.table.as_str()
        };
        let mut recorded = None;
        for row in &applied {
            if row.try_get::<_, i32>(1)? == m.version && row.try_get::<_, &str>(0)? == scope {
                recorded = Some(row.try_get::<_, String>(2)?);
            }
        }
        match recorded {
            Some(r) if r == sum => continue,
            Some(r) => {
                return Err(StateError::config(format!(
                    "migration {} was applied to {} with checksum {r}, but the embedded file has {sum}: \
                     the schema was created by a different version of pgstate",
                    m.name, names.qualified
                )))
            }
            None => {
                tracing::info!(migration = m.name, table = %names.qualified, "applying migration");
                tx.batch_execute(&names.render(m.sql)).await?;
                tx.execute_typed(
                    &insert,
                    &[
                        (&scope, Type::TEXT),
                        (&m.version, Type::INT4),
                        (&m.name, Type::TEXT),
                        (&sum, Type::TEXT),
                    ],
                )
                    .await?;
            }
        }
    }
    // Partition bounds are compared in the server's default text forms.
    tx.batch_execute("SET LOCAL bytea_output = hex; SET LOCAL standard_conforming_strings = on")
        .await?;
    partitions::ensure(&tx, names, partitioning, created_now).await?;
    let layout = partitions::layout(&tx, &names.qualified).await?;
    distribution::ensure(&tx, names, citus).await?;
    let distributed = distribution::distribution(&tx, &names.qualified)
        .await?
        .is_some();
    tx.commit().await?;
    Ok(Migrated {
        layout,
        distributed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ident::Ident;

    #[test]
    fn templates_render_fully() {
        let names = TableNames::new(
            Ident::new("schema", "s").unwrap(),
            Ident::new_table("t").unwrap(),
        );
        for m in MIGRATIONS {
            let sql = names.render(m.sql);
            assert!(!sql.contains("{{"), "{} left a placeholder", m.name);
            assert!(!sql.to_lowercase().contains("now()) where"), "{}", m.name);
        }
        assert!(names.render(MIGRATIONS[0].sql).contains("\"s\".\"t\""));
        assert_eq!(names.archive, "\"s\".\"t_archive\"");
    }

    #[test]
    fn index_predicates_are_immutable() {
        // No non-immutable function may appear in a partial index predicate.
        for m in MIGRATIONS {
            for stmt in m.sql.split(';') {
                let s = stmt.to_lowercase();
                if s.contains("create index") {
                    if let Some((_, predicate)) = s.split_once(" where ") {
                        for f in ["now()", "current_timestamp", "clock_timestamp", "random("] {
                            assert!(!predicate.contains(f), "{}: {predicate}", m.name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lock_key_and_checksums_are_pinned() {
        // Documented values: changing them would let old and new versions migrate at once.
        assert_eq!(migration_lock_key(), 0x3dbd_6fa6_82af_dea5_i64);
        assert_eq!(
            checksum("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
