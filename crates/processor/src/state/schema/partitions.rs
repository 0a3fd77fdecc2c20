//! The state table's partitioned layout in the catalog: reading which strategy a table has,
//! building a partitioned twin of it and swapping the twin in under the table's name.
//!
//! A twin is `CREATE TABLE ... (LIKE <table> INCLUDING ALL) PARTITION BY ...`: the same
//! columns, defaults, constraints, comments and indexes as the table has now, whatever
//! migrations or the user added, with the table's storage settings (fillfactor, autovacuum)
//! on every partition (a partitioned table has no storage of its own). Swapping it in keeps
//! what depends on the table: views are re-pointed, sequences owned by its columns move,
//! privileges, owner, comment and index names carry over. What cannot carry over (triggers,
//! row security policies, materialized views, foreign keys into the table) is refused before
//! anything changes.
//!
//! Every name in the SQL text here is a validated identifier or comes back from the server
//! already quoted (`regclass` output, `quote_ident`, `format('%I')`).

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::state::config::partition_strategy::PartitionStrategy;
use crate::state::error::{StateError, StateResult};
use crate::state::ident::Ident;
use crate::state::schema::history;
use crate::state::schema::names::TableNames;
use crate::state::schema::windows;

/// How the state table is laid out now.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Layout {
    /// An ordinary table.
    Plain,
    /// A partitioned table: its partition key (`pg_get_partkeydef`), its partitions'
    /// bounds (`pg_get_expr`) and, when they are ranges of write windows, their lengths in
    /// seconds.
    Partitioned {
        key: String,
        bounds: Vec<String>,
        spans: Vec<f64>,
    },
}

impl Layout {
    /// Whether this layout is `strategy`.
    pub fn is(&self, strategy: &PartitionStrategy) -> bool {
        match self {
            Layout::Plain => false,
            Layout::Partitioned { key, bounds, spans } => strategy.matches(key, bounds, spans),
        }
    }

    /// Whether rows carry a write window (time-range partitioning).
    pub fn windowed(&self) -> bool {
        matches!(self, Layout::Partitioned { key, .. } if key == "RANGE (write_window)")
    }

    /// For error messages.
    pub fn describe(&self) -> String {
        match self {
            Layout::Plain => "no partitioning".to_string(),
            Layout::Partitioned { key, bounds, .. } => {
                format!("partitioning by {key} into {} partitions", bounds.len())
            }
        }
    }
}

/// The layout of the table `qualified` (quoted, schema-qualified).
pub(crate) async fn layout<C: GenericClient>(c: &C, qualified: &str) -> StateResult<Layout> {
    let row = c
        .query_typed_one(
            "SELECT pt.partrelid IS NOT NULL, coalesce(pg_get_partkeydef(c.oid), ''),
                    coalesce((SELECT array_agg(pg_get_expr(p.relpartbound, p.oid) ORDER BY p.relname)
                              FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid
                              WHERE i.inhparent = c.oid), '{}'),
                    coalesce((SELECT array_agg(extract(epoch FROM m[2]::timestamptz - m[1]::timestamptz)::float8
                                               ORDER BY p.relname)
                              FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid,
                                   regexp_match(pg_get_expr(p.relpartbound, p.oid),
                                                '^FOR VALUES FROM \\(''([^'']*)''\\) TO \\(''([^'']*)''\\)$') m
                              WHERE i.inhparent = c.oid AND pg_get_partkeydef(c.oid) = 'RANGE (write_window)'),
                             '{}')
             FROM pg_catalog.pg_class c
             LEFT JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid = c.oid
             WHERE c.oid = $1::text::regclass",
            &[(&qualified, Type::TEXT)],
        )
        .await?;
    if !row.try_get::<_, bool>(0)? {
        return Ok(Layout::Plain);
    }
    Ok(Layout::Partitioned {
        key: row.try_get(1)?,
        bounds: row.try_get(2)?,
        spans: row.try_get(3)?,
    })
}

/// Checks the table against the configured strategy after the migrations ran (in their
/// transaction, under their lock). A table those migrations just created is converted to the
/// strategy; an existing one must already have it.
pub(crate) async fn ensure<C: GenericClient>(
    c: &C,
    names: &TableNames,
    configured: Option<&PartitionStrategy>,
    created_now: bool,
) -> StateResult<()> {
    let Some(strategy) = configured else {
        return Ok(());
    };
    let now = layout(c, &names.qualified).await?;
    if now.is(strategy) {
        return Ok(());
    }
    if now == Layout::Plain && created_now {
        let twin = twin_name(names);
        create_twin(c, names, strategy, &twin).await?;
        return swap_in(c, names, &twin).await;
    }
    let hint = if now == Layout::Plain {
        "convert it online with EnhancedPostgresBackend::migrate_to_partitioned"
    } else {
        "start with the table's own strategy"
    };
    Err(StateError::config(format!(
        "state table {} exists with {}, but the configuration asks for {strategy}: {hint}",
        names.qualified,
        now.describe()
    )))
}

/// The twin's name while it is built: `<table>_repartition`.
pub(crate) fn twin_name(names: &TableNames) -> Ident {
    names.table.suffixed("_repartition")
}

/// Creates `twin`, a partitioned copy of the state table's definition (no rows) with
/// `strategy`'s partitions, each carrying the table's storage settings.
pub(crate) async fn create_twin<C: GenericClient>(
    c: &C,
    names: &TableNames,
    strategy: &PartitionStrategy,
    twin: &Ident,
) -> StateResult<()> {
    let (t, s) = (&names.qualified, &names.schema);
    let with = storage_options(c, t).await?;
    if let PartitionStrategy::TimeRange { interval, premake } = strategy {
        // The primary key gains the partition column; the other indexes are the table's.
        windows::create_controls(c, names).await?;
        c.batch_execute(&format!(
            "CREATE TABLE {s}.{twin} (
                 LIKE {t} INCLUDING ALL EXCLUDING INDEXES,
                 write_window timestamptz NOT NULL DEFAULT {ww}(),
                 PRIMARY KEY (key, write_window)
             ) PARTITION BY {by}",
            by = strategy.partition_by(),
            ww = names.write_window
        ))
        .await?;
        let twin_q = format!("{s}.{twin}");
        let indexes = c
            .query_typed(
                "SELECT regexp_replace(pg_get_indexdef(i.indexrelid),
                                       '^CREATE (UNIQUE )?INDEX \\S+ ON (ONLY )?\\S+ ',
                                       'CREATE \\1INDEX ON ' || $2 || ' ')
                 FROM pg_catalog.pg_index i
                 WHERE i.indrelid = $1::text::regclass AND NOT i.indisprimary",
                &[(&t.as_str(), Type::TEXT), (&twin_q.as_str(), Type::TEXT)],
            )
            .await?;
        for row in &indexes {
            c.batch_execute(&row.try_get::<_, String>(0)?).await?;
        }
        // Windows left by an earlier table of this name belong to no partition of this one.
        c.batch_execute(&format!(
            "DELETE FROM {}; SELECT setval('{}', 0)",
            names.windows, names.window_advance
        ))
        .await?;
        windows::premake(c, names, &twin_q, *interval, *premake, &with).await?;
        if windows::advance(c, names, *interval).await? != windows::Advance::Changed {
            return Err(StateError::StorageError {
                message: format!("no partition for the write window of now in {twin_q}"),
                sqlstate: None,
            });
        }
        return Ok(());
    }
    c.batch_execute(&format!(
        "CREATE TABLE {s}.{twin} (LIKE {t} INCLUDING ALL) PARTITION BY {}",
        strategy.partition_by()
    ))
    .await?;
    for (suffix, bound) in strategy.partitions() {
        let part = names.table.suffixed(&suffix);
        c.batch_execute(&format!(
            "CREATE TABLE {s}.{part} PARTITION OF {s}.{twin} {bound}{with}"
        ))
        .await?;
    }
    Ok(())
}

/// Puts `twin` in the state table's place, in the caller's transaction. The caller holds the
/// table exclusively (or created it in this transaction) and has made the twin hold the same
/// rows. The old table is dropped.
///
/// Long on purpose: one transaction's DDL in the order it must run (views, sequences,
/// grants, owners and comments, index names, the renames, the drop), read top to bottom as
/// one procedure.
pub(crate) async fn swap_in<C: GenericClient>(
    c: &C,
    names: &TableNames,
    twin: &Ident,
) -> StateResult<()> {
    let (t, s) = (names.qualified.as_str(), &names.schema);
    let twin_q = format!("{s}.{twin}");
    let twin_q = twin_q.as_str();
    // Server-printed names and view definitions come back schema-qualified.
    c.batch_execute("SET LOCAL search_path = pg_catalog")
        .await?;
    refuse_what_cannot_move(c, names).await?;
    let captured: i64 = c
        .query_typed_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
            &[
                (&t, Type::TEXT),
                (&names.checkpoint_trigger.as_str(), Type::TEXT),
            ],
        )
        .await?
        .try_get(0)?;
    let text = |sql: &'static str| async move {
        let rows = c
            .query_typed(sql, &[(&t, Type::TEXT), (&twin_q, Type::TEXT)])
            .await?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StateError::from)
    };
    // Statements to run once the twin has the table's name: they name it as `$1`, which
    // then means the twin (views too: their text names the table, not its old identity).
    let views = text(
        "SELECT DISTINCT format('CREATE OR REPLACE VIEW %s AS %s', v.oid::regclass, pg_get_viewdef(v.oid))
         FROM pg_depend d
         JOIN pg_rewrite r ON r.oid = d.objid
         JOIN pg_class v ON v.oid = r.ev_class
         WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
           AND d.refobjid = $1::text::regclass AND v.oid <> $1::text::regclass AND v.relkind = 'v'
           AND $2 IS NOT NULL",
    )
    .await?;
    let sequences = text(
        "SELECT format('ALTER SEQUENCE %s OWNED BY %s.%I', q.oid::regclass, $1, a.attname)
         FROM pg_depend d
         JOIN pg_class q ON q.oid = d.objid AND q.relkind = 'S'
         JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
           AND d.refobjid = $1::text::regclass AND d.deptype = 'a' AND $2 IS NOT NULL",
    )
    .await?;
    let grants = text(
        "SELECT format('GRANT %s ON %s TO %s%s', a.privilege_type, $1,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                       CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
         FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = $1::text::regclass AND a.grantee <> c.relowner AND $2 IS NOT NULL",
    )
    .await?;
    // The owner and comment, for the twin and each of its partitions.
    let owner_and_comment = text(
        "SELECT format('ALTER TABLE %s OWNER TO %I',
                       CASE WHEN p.relid = $2::text::regclass THEN $1 ELSE p.relid::regclass::text END,
                       pg_get_userbyid(c.relowner))
         FROM pg_class c, pg_partition_tree($2::text::regclass) p
         WHERE c.oid = $1::text::regclass AND c.relowner <> (SELECT relowner FROM pg_class WHERE oid = p.relid)
         UNION ALL
         SELECT format('COMMENT ON TABLE %s IS %s', $1,
                       coalesce(quote_literal(obj_description($1::text::regclass, 'pg_class')), 'NULL'))
         WHERE $2 IS NOT NULL",
    )
    .await?;
    // Each index of the twin takes the name of the table's index with the same definition
    // (the primary key's, whatever its columns: time-range adds one).
    let index_names = c
        .query_typed(
            "WITH defs AS (
                 SELECT i.indrelid, x.relname, x.oid, i.indisprimary,
                        regexp_replace(pg_get_indexdef(i.indexrelid),
                                       '^CREATE (UNIQUE )?INDEX \\S+ ON (ONLY )?\\S+ ', 'CREATE \\1INDEX ON ') AS def
                 FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
                 WHERE i.indrelid IN ($1::text::regclass, $2::text::regclass))
             SELECT format('ALTER INDEX %s RENAME TO %I', n.oid::regclass, o.relname), o.relname, n.relname
             FROM defs o LEFT JOIN defs n
               ON (n.def = o.def OR (n.indisprimary AND o.indisprimary)) AND n.indrelid = $2::text::regclass
             WHERE o.indrelid = $1::text::regclass",
            &[(&t, Type::TEXT), (&twin_q, Type::TEXT)],
        )
        .await?;
    let mut renames = Vec::new();
    for row in &index_names {
        match row.try_get::<_, Option<String>>(0)? {
            Some(sql) => renames.push(sql),
            None => {
                let name: String = row.try_get(1)?;
                return Err(StateError::config(format!(
                    "index {name} of {t} has no counterpart on the partitioned table"
                )));
            }
        }
    }
    let old = names.table.suffixed("_unpartitioned");
    c.batch_execute(&format!(
        "ALTER TABLE {t} RENAME TO {old}; ALTER TABLE {twin_q} RENAME TO {}",
        names.table
    ))
    .await?;
    for sql in views
        .iter()
        .chain(&sequences)
        .chain(&grants)
        .chain(&owner_and_comment)
    {
        c.batch_execute(sql).await?;
    }
    c.batch_execute(&format!("DROP TABLE {s}.{old}")).await?;
    if captured > 0 {
        // Incremental checkpoints go on recording what changes.
        c.batch_execute(&history::trigger_ddl(names)).await?;
    }
    for sql in &renames {
        c.batch_execute(sql).await?;
    }
    c.batch_execute("RESET search_path").await?;
    Ok(())
}

/// Refuses a conversion that would lose something attached to the table.
/// (pgstate's own checkpoint trigger moves: `swap_in` attaches it to the new table.)
pub(crate) async fn refuse_what_cannot_move<C: GenericClient>(
    c: &C,
    names: &TableNames,
) -> StateResult<()> {
    let t = names.qualified.as_str();
    let ours = names.checkpoint_trigger.as_str();
    let found: Vec<String> = c
        .query_typed(
            "SELECT 'trigger ' || quote_ident(tgname) FROM pg_trigger
              WHERE tgrelid = $1::text::regclass AND NOT tgisinternal AND tgname <> $2
             UNION ALL
             SELECT 'row security policy ' || quote_ident(polname) FROM pg_policy
              WHERE polrelid = $1::text::regclass
             UNION ALL
             SELECT 'foreign key ' || quote_ident(conname) || ' of ' || conrelid::regclass::text
               FROM pg_constraint WHERE confrelid = $1::text::regclass AND contype = 'f'
             UNION ALL
             SELECT 'foreign key ' || quote_ident(conname) || ' to ' || confrelid::regclass::text
               FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'f'
             UNION ALL
             SELECT 'identity column ' || quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attidentity <> '' AND NOT attisdropped
             UNION ALL
             SELECT 'column privileges on ' || quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attacl IS NOT NULL AND NOT attisdropped
             UNION ALL
             SELECT 'row level security' FROM pg_class
              WHERE oid = $1::text::regclass AND (relrowsecurity OR relforcerowsecurity)
             UNION ALL
             SELECT 'publication ' || quote_ident(p.pubname) FROM pg_publication_rel r
               JOIN pg_publication p ON p.oid = r.prpubid WHERE r.prrelid = $1::text::regclass
             UNION ALL
             SELECT DISTINCT 'view with options ' || v.oid::regclass::text
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = $1::text::regclass
                AND v.relkind = 'v' AND v.reloptions IS NOT NULL
             UNION ALL
             SELECT 'rule ' || quote_ident(rulename) FROM pg_rewrite
              WHERE ev_class = $1::text::regclass AND rulename <> '_RETURN'
             UNION ALL
             SELECT 'inheritance ' || inhparent::regclass::text || ' -> ' || inhrelid::regclass::text
               FROM pg_inherits WHERE inhrelid = $1::text::regclass OR inhparent = $1::text::regclass
             UNION ALL
             SELECT 'generated column ' || quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attgenerated <> '' AND NOT attisdropped
             UNION ALL
             SELECT 'a table named ' || c.oid::regclass::text || ' (the name the old table takes)'
               FROM pg_class c JOIN pg_class t ON t.oid = $1::text::regclass
              WHERE c.relnamespace = t.relnamespace AND c.relname = t.relname || '_unpartitioned'
             UNION ALL
             SELECT DISTINCT 'materialized view ' || v.oid::regclass::text
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = $1::text::regclass
                AND v.relkind = 'm'",
            &[(&t, Type::TEXT), (&ours, Type::TEXT)],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if found.is_empty() {
        return Ok(());
    }
    Err(StateError::config(format!(
        "{t} cannot be replaced by a partitioned table while it has: {} (remove them, partition, \
         then re-create them)",
        found.join(", ")
    )))
}

/// The storage settings of `relation` as a ` WITH (...)` clause printed by the server, or
/// empty when it has none.
pub(crate) async fn storage_options<C: GenericClient>(
    c: &C,
    relation: &str,
) -> StateResult<String> {
    let options: Option<String> = c
        .query_typed_one(
            "SELECT string_agg(quote_ident(option_name) || ' = ' || quote_literal(option_value), ', ')
             FROM pg_catalog.pg_options_to_table(
                 (SELECT reloptions FROM pg_catalog.pg_class WHERE oid = $1::text::regclass))",
            &[(&relation, Type::TEXT)],
        )
        .await?
        .try_get(0)?;
    Ok(options.map(|o| format!(" WITH ({o})")).unwrap_or_default())
}
