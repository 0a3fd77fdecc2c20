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
