//! `clear()` by TRUNCATE: nothing per row, versions still never repeat, checkpoints keep what
//! they hold.

use processor::state::StateBackend;

use crate::support;

async fn physical_rows(b: &processor::state::EnhancedPostgresBackend) -> i64 {
    support::raw(&support::url())
        .await
        .query_one(&format!("SELECT count(*) FROM {}", b.table()), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn clear_leaves_no_row_and_versions_go_on() {
    let b = support::backend("clear_truncate").await;
    for round in 0..5 {
        b.put(b"hot", format!("{round}").as_bytes()).await.unwrap();
    }
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..1000)
        .map(|i| (format!("k{i}").into_bytes(), b"v".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    b.batch_put(&refs).await.unwrap();
    b.delete(b"k0").await.unwrap();
    let before = b.get_entry(b"hot").await.unwrap().unwrap().version;
    assert_eq!(before, 5);
    b.clear().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 0);
    assert_eq!(physical_rows(&b).await, 0, "no tombstone left behind");
    b.put(b"hot", b"again").await.unwrap();
    let after = b.get_entry(b"hot").await.unwrap().unwrap().version;
    assert!(
        after > before,
        "a version never repeats: {after} after {before}"
    );
    // A key that was a tombstone before the clear starts above its old version too.
    b.put(b"k0", b"back").await.unwrap();
    assert!(b.get_entry(b"k0").await.unwrap().unwrap().version > 2);
}

#[tokio::test]
async fn a_checkpoint_taken_before_a_clear_restores_it() {
    let b = support::backend("clear_ckpt").await;
    for i in 0..100 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    let c = b.create_checkpoint("before clear").await.unwrap();
    b.clear().await.unwrap();
    assert_eq!(physical_rows(&b).await, 0);
    assert_eq!(
        b.checkpoint_entries(c.id, None, 1000).await.unwrap().len(),
        100
    );
    assert_eq!(b.restore_checkpoint(c.id).await.unwrap(), 100);
    assert_eq!(b.count().await.unwrap(), 100);
    assert_eq!(b.get(b"k7").await.unwrap(), Some(b"v".to_vec()));
}

/// A role with the table's row privileges but not TRUNCATE (nor the floor's sequence):
/// `clear()` still empties the state, with a tombstone per row as before.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "creates a role on the local cluster"
)]
async fn a_role_that_may_not_truncate_clears_with_tombstones() {
    let owner = support::backend("clear_role").await;
    for i in 0..10 {
        owner.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    let table = owner.table().to_string();
    let schema = owner.config().schema().to_string();
    let role = format!("{schema}_dml");
    let base = support::url();
    let superuser = format!("postgres:{}@", pgstate_testcluster::PASSWORD);
    assert!(
        base.contains(&superuser),
        "the local cluster's superuser URL"
    );
    support::raw(&base)
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD 'dml-secret';
             GRANT USAGE ON SCHEMA \"{schema}\" TO \"{role}\";
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO \"{role}\";
             GRANT SELECT ON \"{schema}\".pgstate_schema_migrations TO \"{role}\""
        ))
        .await
        .unwrap();
    let url = base.replace(&superuser, &format!("{role}:dml-secret@"));
    let dml = processor::state::EnhancedPostgresBackend::new(
        processor::state::EnhancedPostgresConfig::new(url)
            .with_schema(&schema)
            .with_schema_changes(false)
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap();
    dml.clear().await.unwrap();
    assert_eq!(owner.count().await.unwrap(), 0);
    assert_eq!(physical_rows(&owner).await, 10, "tombstones, not TRUNCATE");
}
