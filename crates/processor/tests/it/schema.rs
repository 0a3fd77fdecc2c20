//! Migrations: concurrent starts, tracking table, idempotence, index predicates.

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend, MIGRATIONS};

use crate::support;

#[tokio::test]
async fn ten_backends_starting_at_once_on_an_empty_database() {
    let url = support::fresh_database("mig").await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            EnhancedPostgresBackend::new(
                EnhancedPostgresConfig::new(url).with_pool_config(support::small_pool()),
            )
            .await
        }));
    }
    let mut backends = Vec::new();
    for t in tasks {
        backends.push(t.await.unwrap().expect("every concurrent new() succeeds"));
    }
    backends[0].put(b"k", b"v").await.unwrap();
    assert_eq!(backends[9].get(b"k").await.unwrap(), Some(b"v".to_vec()));

    let db = support::raw(&url).await;
    let rows = db
        .query(
            "SELECT version, name, count(*) OVER (PARTITION BY version) AS n \
             FROM public.pgstate_schema_migrations WHERE state_table IN ('state_entries', '') \
             ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), MIGRATIONS.len(), "each migration recorded once");
    for (row, m) in rows.iter().zip(MIGRATIONS) {
        assert_eq!(row.get::<_, i32>(0), m.version);
        assert_eq!(row.get::<_, &str>(1), m.name);
        assert_eq!(row.get::<_, i64>(2), 1);
    }

    // The tables the seed names exist.
    for table in [
        "state_entries",
        "state_checkpoints",
        "state_advisory_locks",
        "state_entries_archive",
    ] {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{table}");
    }
    // No partial-index predicate calls a function that is not immutable.
    let bad: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_proc p ON i.indpred IS NOT NULL \
               AND pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || p.proname || '\\(') \
             WHERE n.nspname = 'public' AND p.provolatile <> 'i'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);

    // A later start finds everything applied and changes nothing.
    drop(backends);
    EnhancedPostgresBackend::new(EnhancedPostgresConfig::new(url.clone()))
        .await
        .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM public.pgstate_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, MIGRATIONS.len());

    // A second state table in the same schema gets its own per-table migrations; the
    // schema-wide one (coordination tables) is not applied again, so nothing shared is
    // rebuilt under another backend's feet.
    let pkey = "SELECT oid FROM pg_constraint WHERE conname = 'state_advisory_locks_pkey' \
                AND connamespace = 'public'::regnamespace";
    let before: u32 = db.query_one(pkey, &[]).await.unwrap().get(0);
    let other = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(url.clone()).with_table_name("other_entries"),
    )
    .await
    .unwrap();
    other.put(b"k", b"other").await.unwrap();
    assert_eq!(other.get(b"k").await.unwrap(), Some(b"other".to_vec()));
    let after: u32 = db.query_one(pkey, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "the shared primary key was rebuilt");
    let rows = db
        .query(
            "SELECT state_table, version FROM public.pgstate_schema_migrations ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    let per_table = MIGRATIONS.iter().filter(|m| !m.per_schema).count();
    let per_schema = MIGRATIONS.len() - per_table;
    assert_eq!(rows.len(), 2 * per_table + per_schema);
    let shared: Vec<i32> = rows
        .iter()
        .filter(|r| r.get::<_, &str>(0).is_empty())
        .map(|r| r.get(1))
        .collect();
    let expected: Vec<i32> = MIGRATIONS
        .iter()
        .filter(|m| m.per_schema)
        .map(|m| m.version)
        .collect();
    assert_eq!(shared, expected);
}

#[tokio::test]
async fn a_tampered_migration_record_is_refused() {
    let cfg = support::config("tamper");
    let schema = cfg.schema().to_string();
    EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let db = support::raw(&support::url()).await;
    db.execute(
        &format!(
            "UPDATE \"{schema}\".pgstate_schema_migrations SET checksum = 'x' WHERE version = 2"
        ),
        &[],
    )
    .await
    .unwrap();
    let err = EnhancedPostgresBackend::new(cfg).await.unwrap_err();
    assert!(err.to_string().contains("002_add_indexes.sql"), "{err}");
}

/// An archive table has one definition, the migrated default archive table's: an archive
/// table named by the caller is created like it (same columns, types, defaults and nullability)
/// with the same index, on `(key, version)`, which serves the archive's reads (the newest
/// version of a key).
#[tokio::test]
async fn every_archive_table_is_made_like_the_migrated_one() {
    let config = support::config("archive_shape");
    let schema = config.schema().to_string();
    let b = EnhancedPostgresBackend::new(config).await.unwrap();
    b.put(b"k", b"v").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let moved = b
        .archive_old_data("named_archive", std::time::Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let db = support::raw(&support::url()).await;
    // One line per column (name, type, nullability, default), then per index (its method
    // and columns), of `table` in the schema.
    let lines = async |sql: &str, table: &str| -> Vec<String> {
        let rows = db.query(sql, &[&schema, &table]).await.unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    let shape = async |table: &str| {
        let columns = "SELECT format('%s %s %s %s', column_name, data_type, is_nullable, \
                               coalesce(column_default, '-')) \
                       FROM information_schema.columns \
                       WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position";
        let indexes = "SELECT regexp_replace(indexdef, '^.* USING ', '') FROM pg_indexes \
                       WHERE schemaname = $1 AND tablename = $2 ORDER BY 1";
        (lines(columns, table).await, lines(indexes, table).await)
    };
    let (model_columns, model_indexes) = shape("state_entries_archive").await;
    let (columns, indexes) = shape("named_archive").await;
    assert_eq!(model_columns.len(), 8, "{model_columns:?}");
    assert_eq!(columns, model_columns);
    assert_eq!(model_indexes, vec!["btree (key, version)".to_string()]);
    assert_eq!(indexes, model_indexes);
}

/// With schema changes off, `new()` opens only a migrated table and creates nothing;
/// `migration_status` reads where a table stands without changing it.
#[tokio::test]
async fn a_backend_without_schema_changes_creates_nothing() {
    let config = support::config("no_changes");
    let schema = config.schema().to_string();
    let status = EnhancedPostgresBackend::migration_status(&config)
        .await
        .unwrap();
    assert!(!status.table_exists);
    assert!(status.applied.is_empty());
    assert_eq!(status.pending.len(), MIGRATIONS.len());
    let e = EnhancedPostgresBackend::new(config.clone().with_schema_changes(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, processor::state::StateError::NotInitialized(m) if m.contains("does not exist")),
        "{e}"
    );
    let db = support::raw(&support::url()).await;
    let schemas: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0, "the schema was created");

    let b = EnhancedPostgresBackend::new(config.clone()).await.unwrap();
    b.put(b"k", b"v").await.unwrap();
    let status = EnhancedPostgresBackend::migration_status(&config)
        .await
        .unwrap();
    assert!(status.table_exists && status.pending.is_empty());
    assert_eq!(status.applied.len(), MIGRATIONS.len());
    assert!(status.applied.iter().all(|m| m.matches));
    let reader = EnhancedPostgresBackend::new(config.with_schema_changes(false))
        .await
        .unwrap();
    assert_eq!(reader.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}
