//! Partitioned state tables: a hash-partitioned table behaves like a plain one for every
//! operation, a different strategy on an existing table is refused, and a plain table is
//! converted online while other tasks read and write it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, MaintenanceOptions,
    PartitionStrategy, StateBackend,
};

use crate::{conformance, seed, support};

pub(crate) const HASH16: PartitionStrategy = PartitionStrategy::Hash { partitions: 16 };

/// (strategy letter, partition key, partition count) of `table` as the catalog has them.
pub(crate) async fn catalog_layout(table: &str) -> (Option<String>, String, i64) {
    let admin = support::raw(&support::url()).await;
    let row = admin
        .query_one(
            "SELECT pt.partstrat::text, coalesce(pg_get_partkeydef(c.oid), ''),
                    (SELECT count(*) FROM pg_inherits WHERE inhparent = c.oid)
             FROM pg_class c LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
             WHERE c.oid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn a_hash_partitioned_table_passes_the_conformance_suite_and_every_operation() {
    let b = every_operation(HASH16, "part_hash").await;
    assert_eq!(
        catalog_layout(b.table()).await,
        (Some("h".into()), "HASH (key)".into(), 16)
    );
    let stats = b.get_table_statistics().await.unwrap();
    assert!(stats
        .partitions
        .iter()
        .all(|p| p.bound.contains("modulus 16")));
}

#[tokio::test]
async fn a_list_partitioned_table_passes_the_conformance_suite_and_every_operation() {
    // The conformance suite's keys fall in the default partition and in these.
    let prefixes: Vec<Vec<u8>> = vec![
        b"k".to_vec(),
        b"batch:".to_vec(),
        b"user:".to_vec(),
        vec![0xFF],
    ];
    let b = every_operation(PartitionStrategy::List { prefixes }, "part_list").await;
    assert_eq!(
        catalog_layout(b.table()).await,
        (Some("r".into()), "RANGE (key)".into(), 5)
    );
    // Each key is in its prefix's partition, or in the default one.
    b.put(b"user:7", b"v").await.unwrap();
    b.put(b"other", b"v").await.unwrap();
    b.put(&[0xFF, 0xFF, 1], b"v").await.unwrap();
    let admin = support::raw(&support::url()).await;
    let placed: Vec<(Vec<u8>, String)> = admin
        .query(
            &format!(
                "SELECT key, c.relname::text FROM {} t JOIN pg_class c ON c.oid = t.tableoid
                 WHERE key IN ('user:7', 'other', '\\xffff01') ORDER BY key",
                b.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        placed,
        vec![
            (b"other".to_vec(), "state_entries_pdefault".to_string()),
            (b"user:7".to_vec(), "state_entries_p2".to_string()),
            (vec![0xFF, 0xFF, 1], "state_entries_p3".to_string()),
        ]
    );
    let users = b.list_keys(b"user:").await.unwrap();
    assert!(users.contains(&b"user:7".to_vec()) && users.iter().all(|k| k.starts_with(b"user:")));
    // A prefix scan of a listed prefix reads its partition only.
    let plan = support::text_lines(
        &admin,
        &format!(
            "EXPLAIN (COSTS OFF) SELECT key FROM {} WHERE key >= 'user:' AND key < 'user;'",
            b.table()
        ),
    )
    .await;
    assert!(plan.contains("state_entries_p2"), "{plan}");
    assert!(
        !plan.contains("state_entries_p0") && !plan.contains("pdefault"),
        "{plan}"
    );
}

/// Creates a backend with `strategy` on a new table and runs every operation on it: the
/// conformance suite, the enhanced operations, the seed's snippets, checkpoints, statistics.
pub(crate) async fn every_operation(
    strategy: PartitionStrategy,
    tag: &str,
) -> Arc<EnhancedPostgresBackend> {
    let cfg = support::config(tag).with_partitioning(strategy.clone());
    let b = Arc::new(EnhancedPostgresBackend::new(cfg.clone()).await.unwrap());
    let table = b.table().to_string();
    let partitions = catalog_layout(&table).await.2;
    // Each partition has the table's storage settings; the version floor still belongs to
    // the table; the live-entries view reads it.
    let admin = support::raw(&support::url()).await;
    let with_fillfactor: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
             WHERE i.inhparent = $1::text::regclass AND 'fillfactor=90' = ANY (p.reloptions)",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(with_fillfactor, partitions);
    let floor_owner: String = admin
        .query_one(
            "SELECT d.refobjid::regclass::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
             WHERE s.relname = 'state_entries_version_floor' AND s.relnamespace = $1::text::regnamespace
               AND d.deptype = 'a'",
            &[&cfg_schema(&table)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(floor_owner.ends_with("state_entries"), "{floor_owner}");

    conformance::run(b.clone(), b.as_ref()).await;
    b.clear().await.unwrap();
    conformance::run_enhanced(&b).await;
    b.clear().await.unwrap();
    seed::key_value_snippets(&b).await;
    let (acquired, got_guard, is_leader) = seed::distributed_coordination(&b).await.unwrap();
    assert!(acquired && got_guard && is_leader);
    assert!(b.resign_leader("cluster_leader").await.unwrap());
    let live_view: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".state_entries_live",
                cfg_schema(&table)
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live_view as usize, b.count().await.unwrap());

    // Checkpoints and the data-management snippet.
    let checkpoint = b.create_checkpoint("before").await.unwrap();
    b.put(b"key2", b"changed").await.unwrap();
    b.restore_checkpoint(checkpoint.id).await.unwrap();
    assert_eq!(b.get(b"key2").await.unwrap(), Some(b"value2".to_vec()));
    seed::data_management(&b).await.unwrap();

    // Statistics for the whole and for each partition.
    let stats = b.get_table_statistics().await.unwrap();
    assert_eq!(stats.partitions.len() as i64, partitions);
    assert!(stats.counts_exact);
    let rows: u64 = stats
        .partitions
        .iter()
        .map(|p| p.statistics.total_rows)
        .sum();
    assert_eq!(rows, stats.total_rows);
    assert!(stats.total_rows as usize >= b.count().await.unwrap());
    assert!(stats.table_size > 0 && stats.indexes_size > 0);
    let named = |p: &processor::state::PartitionStatistics| {
        p.name.starts_with("state_entries_p") || p.name.starts_with("state_entries_w")
    };
    assert!(stats.partitions.iter().all(named));
    assert!(stats.partitions.iter().any(|p| p.statistics.table_size > 0));
    assert!(
        stats.last_analyze.is_some(),
        "vacuum_analyze ran on every partition"
    );

    // A second backend with the same strategy starts on the table.
    EnhancedPostgresBackend::new(cfg).await.unwrap();
    b
}

/// The schema part of a qualified, quoted table name.
pub(crate) fn cfg_schema(table: &str) -> String {
    table
        .split('.')
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string()
}

#[tokio::test]
async fn a_different_strategy_on_an_existing_table_is_refused() {
    // A plain table with a row: partitioning it takes the online migration.
    let plain_cfg = support::config("part_refuse");
    let plain = EnhancedPostgresBackend::new(plain_cfg.clone())
        .await
        .unwrap();
    plain.put(b"kept", b"v").await.unwrap();
    let e = EnhancedPostgresBackend::new(plain_cfg.clone().with_partitioning(HASH16))
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(e.to_string().contains("migrate_to_partitioned"), "{e}");
    assert_eq!(catalog_layout(plain.table()).await.0, None);
    assert_eq!(plain.get(b"kept").await.unwrap(), Some(b"v".to_vec()));

    // A table with 16 hash partitions: 8 is refused; no setting uses the table as it is.
    let cfg = support::config("part_refuse16").with_partitioning(HASH16);
    let hashed = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    hashed.put(b"kept", b"v").await.unwrap();
    let e = EnhancedPostgresBackend::new(
        cfg.clone()
            .with_partitioning(PartitionStrategy::Hash { partitions: 8 }),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(e.to_string().contains("16 partitions"), "{e}");
    let unset = EnhancedPostgresConfig::new(support::url())
        .with_schema(cfg_schema(hashed.table()))
        .with_pool_config(support::small_pool());
    let b = EnhancedPostgresBackend::new(unset).await.unwrap();
    assert_eq!(b.get(b"kept").await.unwrap(), Some(b"v".to_vec()));
    // Converting a partitioned table again is refused too, and bad numbers never reach SQL.
    let e = b
        .migrate_to_partitioned(PartitionStrategy::Hash { partitions: 4 })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    let e = plain
        .migrate_to_partitioned(PartitionStrategy::Hash { partitions: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert_eq!(catalog_layout(plain.table()).await.0, None);
}

#[tokio::test]
async fn a_table_with_a_trigger_is_not_converted_and_is_left_as_it_was() {
    let b = support::backend("part_trigger").await;
    b.put(b"k", b"v").await.unwrap();
    let table = b.table().to_string();
    let admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
             CREATE TRIGGER audit AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {schema}.noop()",
            schema = format!("\"{}\"", cfg_schema(&table))
        ))
        .await
        .unwrap();
    let e = b.migrate_to_partitioned(HASH16).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(e.to_string().contains("trigger audit"), "{e}");
    assert_eq!(catalog_layout(&table).await.0, None);
    let leftovers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relnamespace = $1::text::regnamespace
             AND relname LIKE 'state_entries\\_%' AND relname NOT LIKE '%idx' AND relkind IN ('r', 'p')
             AND relname NOT IN ('state_entries_archive', 'state_entries_checkpoint_history')",
            &[&cfg_schema(&table)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "no twin or partition left behind");
    let triggers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 1, "only the user's trigger");
    b.put(b"k", b"w").await.unwrap();
    assert_eq!(b.get_entry(b"k").await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn a_plain_table_of_100k_rows_is_partitioned_online_with_reads_and_writes_throughout() {
    let _bulk = support::bulk().await;
    const ROWS: usize = 100_000;
    const WRITERS: usize = 4;
    let cfg = support::config("part_online");
    let b = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..ROWS)
        .map(|i| (format!("k{i:06}").into_bytes(), b"0".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    assert_eq!(b.batch_copy(&refs).await.unwrap(), ROWS as u64);
    // A user's view and a grant on the table carry over.
    let table = b.table().to_string();
    let schema = format!("\"{}\"", cfg_schema(&table));
    let admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "CREATE VIEW {schema}.recent AS SELECT key FROM {table} WHERE version > 1;
             GRANT SELECT ON {table} TO pg_monitor"
        ))
        .await
        .unwrap();

    // Writers own disjoint keys: they rewrite old keys and create new ones, remembering what
    // they wrote; readers check that old keys never go missing. Nothing may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let reads = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (b, stop, failures, writes) = (
            b.clone_handle(),
            stop.clone(),
            failures.clone(),
            writes.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut written: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = if i % 2 == 0 {
                    format!("k{:06}", (i * 7919 + w) % ROWS / WRITERS * WRITERS + w).into_bytes()
                } else {
                    format!("new:{w}:{i}").into_bytes()
                };
                let value = format!("{w}:{i}").into_bytes();
                match b.put(&key, &value).await {
                    Ok(()) => {
                        written.insert(key, value);
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("put: {e}")),
                }
                i += 1;
            }
            written
        }));
    }
    let mut readers = Vec::new();
    for r in 0..2usize {
        let (b, stop, failures, reads) = (
            b.clone_handle(),
            stop.clone(),
            failures.clone(),
            reads.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{:06}", (i * 104_729) % ROWS);
                match b.get(key.as_bytes()).await {
                    Ok(Some(_)) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => failures.lock().unwrap().push(format!("{key} missing")),
                    Err(e) => failures.lock().unwrap().push(format!("get: {e}")),
                }
                i += 2;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before_reads, before_writes) = (
        reads.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let started = std::time::Instant::now();
    let report = {
        let seen = seen.clone();
        let options = MaintenanceOptions::new()
            .with_progress(move |p| seen.lock().unwrap().push((p.done, p.total.unwrap_or(0))));
        b.migrate_to_partitioned_with(HASH16, options)
            .await
            .unwrap()
    };
    let took = started.elapsed();
    let (during_reads, during_writes) = (
        reads.load(Ordering::Relaxed) - before_reads,
        writes.load(Ordering::Relaxed) - before_writes,
    );
    eprintln!(
        "converted {} rows to 16 hash partitions in {took:?}, serving {during_reads} reads and \
         {during_writes} writes meanwhile",
        report.rows_copied
    );
    // And after the swap, on the new table.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut expected: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    for r in readers {
        r.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(report.converted && report.partitions == 16);
    assert!(report.rows_copied >= ROWS as u64 - 1000, "{report:?}");
    assert!(
        during_reads > 100 && during_writes > 100,
        "reads {during_reads}, writes {during_writes} during the conversion"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 10, "a progress call per batch: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(seen.last().unwrap().0, report.rows_copied);

    // Partitioned, with every row: the 100 000 and each writer's new keys, every value the
    // last one written.
    assert_eq!(
        catalog_layout(&table).await,
        (Some("h".into()), "HASH (key)".into(), 16)
    );
    let new_keys = expected.keys().filter(|k| k.starts_with(b"new:")).count();
    assert_eq!(b.count().await.unwrap(), ROWS + new_keys);
    for (i, (k, _)) in rows.iter().enumerate().step_by(97) {
        let want = expected.get(k).cloned().unwrap_or_else(|| b"0".to_vec());
        assert_eq!(b.get(k).await.unwrap(), Some(want), "row {i}");
    }
    for (k, v) in &expected {
        assert_eq!(b.get(k).await.unwrap().as_ref(), Some(v));
    }
    // Versions continue; the version floor, the view and the grant carried over; no
    // migration objects are left.
    let before = b.get_entry(b"k000001").await.unwrap().unwrap().version;
    b.put(b"k000001", b"after").await.unwrap();
    assert_eq!(
        b.get_entry(b"k000001").await.unwrap().unwrap().version,
        before + 1
    );
    let row = admin
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.recent),
                        (SELECT count(*) FROM {table} WHERE version > 1),
                        has_table_privilege('pg_monitor', $1::text::regclass, 'SELECT'),
                        (SELECT count(*) FROM pg_class WHERE relnamespace = $2::text::regnamespace
                          AND relname IN ('state_entries_repartition', 'state_entries_unpartitioned')),
                        (SELECT count(*) FROM pg_proc WHERE pronamespace = $2::text::regnamespace
                          AND proname = 'state_entries_repartition_sync'),
                        to_regclass($2 || '.state_entries_version_floor') IS NOT NULL"
            ),
            &[&table, &cfg_schema(&table)],
        )
        .await
        .unwrap();
    let (recent, updated): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(recent, updated);
    assert!(recent > 0);
    assert!(row.get::<_, bool>(2), "the grant carried over");
    assert_eq!((row.get::<_, i64>(3), row.get::<_, i64>(4)), (0, 0));
    assert!(row.get::<_, bool>(5), "the version floor carried over");
    // Running it again does nothing; a backend asking for the strategy now starts.
    let again = b.migrate_to_partitioned(HASH16).await.unwrap();
    assert!(!again.converted);
    let partitioned = EnhancedPostgresBackend::new(cfg.with_partitioning(HASH16))
        .await
        .unwrap();
    assert_eq!(
        partitioned.get(b"k000001").await.unwrap(),
        Some(b"after".to_vec())
    );
}
