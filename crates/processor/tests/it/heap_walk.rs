//! Cleanup in heap order (the sweep that removes a large share of a table reads its pages in
//! order, a range per batch): exactly the expired rows and tombstones go, a row a writer holds
//! stays, versions never repeat, on a plain and on a hash-partitioned table; a pass dropped
//! half-way leaves no transaction open and no lock held.

use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, MaintenanceOptions, PartitionStrategy, RetentionPolicy, StateBackend,
};

use crate::support;

/// A backend on `cfg` whose table holds 20 000 rows (a few hundred pages), 15 000 of them
/// expired (the heap walk's share), `x:7` at version 40; a raw connection; the table's name.
pub(crate) async fn filled(
    cfg: processor::state::EnhancedPostgresConfig,
) -> (EnhancedPostgresBackend, tokio_postgres::Client, String) {
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let admin = support::raw(&support::url()).await;
    let t = b.table().to_string();
    admin
        .batch_execute(&format!(
            "INSERT INTO {t} (key, value, expires_at, version)
             SELECT convert_to('x:' || i, 'UTF8'), convert_to(repeat('v', 100), 'UTF8'),
                    CASE WHEN i <= 15000 THEN now() - interval '1 second' ELSE NULL END,
                    CASE WHEN i = 7 THEN 40 ELSE 1 END
             FROM generate_series(1, 20000) i;
             ANALYZE {t}"
        ))
        .await
        .unwrap();
    (b, admin, t)
}

async fn heap_walk_removes_exactly_the_expired_rows(tag: &str, partitions: Option<u32>) {
    let mut cfg = support::config(tag).with_retention_policy(RetentionPolicy {
        enabled: false,
        // No background pass during the test.
        cleanup_interval: Duration::from_secs(3600),
        batch_size: 1000,
        ..RetentionPolicy::default()
    });
    if let Some(partitions) = partitions {
        cfg = cfg.with_partitioning(PartitionStrategy::Hash { partitions });
    }
    let (b, admin, t) = filled(cfg).await;
    // Ten tombstones among the live rows.
    for i in 15_001..15_011 {
        b.delete(format!("x:{i}").as_bytes()).await.unwrap();
    }
    // A writer holds an expired row (in a transaction that has not written yet).
    let mut holder = support::raw(&support::url()).await;
    let hold = holder.transaction().await.unwrap();
    hold.execute(
        &format!("SELECT 1 FROM {t} WHERE key = 'x:5' FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();
    let removed = b.cleanup_expired().await.unwrap();
    // Every expired entry but the held one; tombstones are not entries.
    assert_eq!(removed, 14_999);
    let left: Vec<String> = admin
        .query(
            &format!(
                "SELECT convert_from(key, 'UTF8') FROM {t} WHERE expires_at <= now() ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["x:5"], "only the held row is left");
    hold.rollback().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 4_990);
    for i in [15_011u32, 17_500, 20_000] {
        assert!(b.get(format!("x:{i}").as_bytes()).await.unwrap().is_some());
    }
    // Versions never repeat: the floor went above the highest version removed (40).
    assert!(b.put_with_version(b"x:7", b"again", None).await.unwrap() > 40);
    assert!(b.put_with_version(b"new", b"v", None).await.unwrap() > 40);
    // The next pass removes the row that was held, and nothing else.
    assert_eq!(b.cleanup_expired().await.unwrap(), 1);
    assert_eq!(b.count().await.unwrap(), 4_992);
}

#[tokio::test]
async fn a_mostly_expired_table_is_cleaned_exactly_in_heap_order() {
    heap_walk_removes_exactly_the_expired_rows("heap_walk_plain", None).await;
}

#[tokio::test]
async fn a_mostly_expired_partitioned_table_is_cleaned_exactly_in_heap_order() {
    heap_walk_removes_exactly_the_expired_rows("heap_walk_hash", Some(4)).await;
}

/// Drops a heap-walk pass right after its `batches`-th batch reported, while the next one is
/// on the wire.
async fn drop_after(b: &EnhancedPostgresBackend, batches: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let options = MaintenanceOptions::new().with_progress(move |p| {
        let _ = tx.send(p.done);
    });
    let pass = b.apply_retention_policy_with(options);
    tokio::pin!(pass);
    let mut seen = 0;
    loop {
        tokio::select! {
            r = &mut pass => panic!("the pass ended before it was dropped: {r:?}"),
            Some(_) = rx.recv() => {
                seen += 1;
                if seen == batches {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_heap_walk_dropped_half_way_leaves_no_transaction_and_no_lock() {
    let cfg = support::config("heap_walk_drop").with_retention_policy(RetentionPolicy {
        enabled: false,
        cleanup_interval: Duration::from_secs(3600),
        batch_size: 1000,
        ..RetentionPolicy::default()
    });
    let (b, admin, t) = filled(cfg).await;
    // The first pass reports a batch (the first range holds the first thousand rows, `x:7`
    // among them), then it is dropped with its next batch in flight; so is the second one.
    for batches in [1, 2] {
        tokio::time::timeout(Duration::from_secs(60), drop_after(&b, batches))
            .await
            .expect("a pass did not start: the one dropped before holds its lock");
    }
    // No transaction of the walk is left open: its connection was rolled back before reuse.
    let start = Instant::now();
    loop {
        let open: i64 = admin
            .query_one(
                // (Other tests' transactions come and go: the count must reach zero once.)
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
                 AND (query LIKE '%synchronous_commit = off%' \
                      OR query LIKE '%pg_advisory_xact_lock%' OR query LIKE '%ctid >=%')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{open} walk transactions left open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Inserts take the floor lock: none is left held.
    tokio::time::timeout(Duration::from_secs(5), b.put(b"fresh", b"v"))
        .await
        .expect("an insert waited for a floor lock left held")
        .unwrap();
    // A whole pass removes the rest, exactly.
    b.cleanup_expired().await.unwrap();
    let expired: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM {t} WHERE expires_at <= now()"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(expired, 0);
    assert_eq!(b.count().await.unwrap(), 5_001);
    // The first batch removed `x:7` (version 40) and raised the floor with it.
    assert!(b.get(b"x:7").await.unwrap().is_none());
    assert!(b.put_with_version(b"x:7", b"again", None).await.unwrap() > 40);
}
