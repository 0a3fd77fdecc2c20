//! Online conversion to a partitioned table, the hard cases: a writer with table privileges
//! only, a table named like the twin, a conversion left half way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, ErrorKind, MaintenanceOptions, StateBackend};

use crate::partitioning::{catalog_layout, cfg_schema, HASH16};
use crate::support;

#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn a_writer_with_only_table_privileges_keeps_writing_through_the_conversion() {
    // The local cluster's superuser URL, to log in as a second role.
    let base = support::url();
    let owner = format!("postgres:{}@", pgstate_testcluster::PASSWORD);
    assert!(base.contains(&owner), "the local cluster's superuser URL");
    let b = support::backend("part_roles").await;
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..20_000u32)
        .map(|i| (format!("k{i:05}").into_bytes(), b"0".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_copy(&refs).await.unwrap();
    let table = b.table().to_string();
    let schema = cfg_schema(&table);
    let role = format!("{schema}_writer");
    let admin = support::raw(&base).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD 'writer-secret';
             GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\";
             GRANT SELECT, UPDATE ON {table} TO \"{role}\""
        ))
        .await
        .unwrap();
    let writer = support::raw(&base.replace(&owner, &format!("{role}:writer-secret@"))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (stop, table) = (stop.clone(), table.clone());
        tokio::spawn(async move {
            let mut last = HashMap::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{:05}", (i * 7919) % 20_000).into_bytes();
                let value = i.to_string().into_bytes();
                writer
                    .execute(
                        &format!("UPDATE {table} SET value = $1 WHERE key = $2"),
                        &[&value, &key],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("the writer's update failed: {e}"));
                last.insert(key, value);
                i += 1;
            }
            last
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.migrate_to_partitioned(HASH16).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let last = task.await.unwrap();
    assert!(last.len() > 10, "{} keys updated", last.len());
    for (k, v) in &last {
        assert_eq!(b.get(k).await.unwrap().as_ref(), Some(v));
    }
    assert_eq!(catalog_layout(&table).await.0, Some("h".into()));
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON {table} FROM \"{role}\"; REVOKE ALL ON SCHEMA \"{schema}\" FROM \"{role}\"; \
             DROP ROLE \"{role}\""
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_table_named_like_the_twin_is_never_dropped() {
    let b = support::backend("part_twin_name").await;
    b.put(b"k", b"v").await.unwrap();
    let schema = cfg_schema(b.table());
    let admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{schema}\".state_entries_repartition (x int); \
             INSERT INTO \"{schema}\".state_entries_repartition VALUES (1)"
        ))
        .await
        .unwrap();
    let e = b.migrate_to_partitioned(HASH16).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(e.to_string().contains("not built by pgstate"), "{e}");
    let kept: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".state_entries_repartition"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
    assert_eq!(catalog_layout(b.table()).await.0, None);
}

#[tokio::test]
async fn a_conversion_left_half_way_is_started_over() {
    let b = support::backend("part_rerun").await;
    for i in 0..100 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    let table = b.table().to_string();
    let schema = format!("\"{}\"", cfg_schema(&table));
    // What a cancelled run leaves: its marked copy, its function and its trigger. And a table
    // without a comment (the copy's mark must not end up on it).
    let admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {schema}.state_entries_repartition (LIKE {table} INCLUDING ALL) PARTITION BY HASH (key);
             COMMENT ON TABLE {schema}.state_entries_repartition IS 'pgstate: partitioned copy being built';
             CREATE FUNCTION {schema}.state_entries_repartition_sync() RETURNS trigger LANGUAGE plpgsql
                 AS $$BEGIN RETURN NULL; END$$;
             CREATE TRIGGER state_entries_repartition_sync AFTER INSERT ON {table}
                 FOR EACH ROW EXECUTE FUNCTION {schema}.state_entries_repartition_sync();
             COMMENT ON TABLE {table} IS NULL"
        ))
        .await
        .unwrap();
    let report = b.migrate_to_partitioned(HASH16).await.unwrap();
    assert!(report.converted);
    assert_eq!(b.count().await.unwrap(), 100);
    let row = admin
        .query_one(
            "SELECT obj_description($1::text::regclass, 'pg_class'),
                    (SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal)",
            &[&table],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, i64>(1), 0);
}

/// The futures of the partitioning and maintenance calls can be spawned on a multi-threaded
/// runtime (a command-line tool runs them as tasks). Checked when this file compiles.
#[test]
fn their_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let _ = |b: &'static EnhancedPostgresBackend| {
        send(&b.migrate_to_partitioned(HASH16));
        send(&b.migrate_to_partitioned_with(HASH16, MaintenanceOptions::new()));
        send(&b.apply_retention_policy_with(MaintenanceOptions::new()));
        send(&b.get_table_statistics());
        send(&b.get_many(&[]));
        send(&b.list_keys_page(b"", None, 1));
    };
}
