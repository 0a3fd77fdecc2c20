//! Key/value operations of the enhanced backend beyond the trait: batches, COPY, versions,
//! metadata queries, TTL, statistics.

use std::sync::Arc;
use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, EnhancedPostgresConfig, StateBackend, StateError};
use serde_json::json;

use crate::support;

#[tokio::test]
async fn batch_put_and_copy_last_write_wins() {
    let b = support::backend("batch_dup").await;
    let entries: Vec<(&[u8], &[u8])> = vec![
        (b"a", b"1"),
        (b"b", b"1"),
        (b"a", b"2"),
        (b"c", b"1"),
        (b"a", b"3"),
    ];
    b.batch_put(&entries).await.unwrap();
    assert_eq!(b.get(b"a").await.unwrap(), Some(b"3".to_vec()));
    assert_eq!(b.count().await.unwrap(), 3);

    let copy: Vec<(&[u8], &[u8])> = vec![(b"a", b"x"), (b"d", b"1"), (b"a", b"y"), (b"d", b"2")];
    let written = b.batch_copy(&copy).await.unwrap();
    assert_eq!(written, 2, "distinct keys");
    assert_eq!(b.get(b"a").await.unwrap(), Some(b"y".to_vec()));
    assert_eq!(b.get(b"d").await.unwrap(), Some(b"2".to_vec()));
    // Each batch bumps the version of the keys it rewrites once.
    assert_eq!(b.get_entry(b"a").await.unwrap().unwrap().version, 2);
    assert_eq!(b.get_entry(b"d").await.unwrap().unwrap().version, 1);
    // The staging table is reused on the same connection, and emptied at commit.
    let again: Vec<(&[u8], &[u8])> = vec![(b"e", b"1")];
    assert_eq!(b.batch_copy(&again).await.unwrap(), 1);
    assert_eq!(b.count().await.unwrap(), 5);
    // Keys none of which exists are copied straight into the table: the same entries as an
    // upsert would make, duplicates resolved the same way.
    let new: Vec<(&[u8], &[u8])> = vec![(b"g", b"1"), (b"f", b"1"), (b"g", b"2")];
    assert_eq!(b.batch_copy(&new).await.unwrap(), 2);
    let g = b.get_entry(b"g").await.unwrap().unwrap();
    assert_eq!((g.value.as_slice(), g.version), (&b"2"[..], 1));
    assert_eq!(g.metadata, json!({}));
    assert_eq!(g.expires_at, None);
    assert_eq!(b.get(b"f").await.unwrap(), Some(b"1".to_vec()));
    // A deleted key is a tombstone: copying it again continues its version.
    b.delete(b"g").await.unwrap();
    assert_eq!(b.batch_copy(&new[..1]).await.unwrap(), 1);
    assert_eq!(b.get_entry(b"g").await.unwrap().unwrap().version, 3);
}

#[tokio::test]
async fn large_batches_are_chunked_and_complete() {
    let b = support::backend("batch_big").await;
    let keys: Vec<Vec<u8>> = (0..12_345u32)
        .map(|i| format!("k{i:06}").into_bytes())
        .collect();
    let entries: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), k.as_slice())).collect();
    b.batch_put(&entries).await.unwrap();
    assert_eq!(b.count().await.unwrap(), 12_345);
    b.clear().await.unwrap();
    assert_eq!(b.batch_copy(&entries).await.unwrap(), 12_345);
    assert_eq!(b.count().await.unwrap(), 12_345);
    assert_eq!(b.get(b"k012344").await.unwrap(), Some(b"k012344".to_vec()));
    let stats = b.get_stats();
    assert!(stats.batch_rows >= 24_690, "{stats:?}");
}

/// Concurrent batches over the same keys in different orders lock their rows in one order
/// (the keys'), so they never deadlock (SQLSTATE 40P01) with each other: by UNNEST in chunks
/// in a transaction of their own, by COPY, or in chunks inside a caller's transaction.
#[tokio::test]
async fn concurrent_batches_of_the_same_keys_do_not_deadlock() {
    let b = support::backend("batch_deadlock").await;
    // More than one UNNEST chunk (5 000 rows).
    let keys: Vec<Vec<u8>> = (0..6_000u32)
        .map(|i| format!("k{i:05}").into_bytes())
        .collect();
    let keys = Arc::new(keys);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (b, keys) = (b.clone_handle(), keys.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..3u64 {
                // Each task and round visits the keys in its own order.
                let mut order: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let step = (t * 1_709 + round * 2_003) as usize % order.len();
                order.rotate_left(step);
                if (t + round) % 2 == 0 {
                    order.reverse();
                }
                let entries: Vec<(&[u8], &[u8])> = order.iter().map(|k| (*k, *k)).collect();
                match (t + round) % 3 {
                    0 => b.batch_put(&entries).await?,
                    1 => b.batch_copy(&entries).await.map(|_| ())?,
                    _ => {
                        let mut tx = b.begin().await?;
                        tx.batch_put(&entries).await?;
                        tx.commit().await?
                    }
                }
            }
            Ok::<_, StateError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("no batch deadlocks");
    }
    assert_eq!(b.count().await.unwrap(), 6_000);
}

#[tokio::test]
async fn every_write_path_bumps_the_version() {
    let b = support::backend("versions").await;
    let v = |e: Option<processor::state::StateEntry>| e.unwrap().version;
    assert_eq!(b.put_with_version(b"k", b"0", None).await.unwrap(), 1);
    b.put(b"k", b"1").await.unwrap();
    assert_eq!(v(b.get_entry(b"k").await.unwrap()), 2);
    b.put_with_metadata(b"k", b"2", json!({"a": 1}))
        .await
        .unwrap();
    assert_eq!(v(b.get_entry(b"k").await.unwrap()), 3);
    b.put_with_ttl(b"k", b"3", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v(b.get_entry(b"k").await.unwrap()), 4);
    b.batch_put(&[(b"k", b"4")]).await.unwrap();
    assert_eq!(v(b.get_entry(b"k").await.unwrap()), 5);
    b.batch_copy(&[(b"k", b"5")]).await.unwrap();
    assert_eq!(v(b.get_entry(b"k").await.unwrap()), 6);
    // A version read before any of those writes is stale now.
    let stale = b.put_with_version(b"k", b"x", Some(1)).await;
    assert!(matches!(
        stale,
        Err(StateError::ConcurrentModification { .. })
    ));
    assert_eq!(b.put_with_version(b"k", b"6", Some(6)).await.unwrap(), 7);
    // Updating a missing key with a version is a conflict too.
    let missing = b.put_with_version(b"nope", b"x", Some(1)).await;
    assert!(matches!(
        missing,
        Err(StateError::ConcurrentModification { .. })
    ));
}

#[tokio::test]
async fn concurrent_versioned_increments_lose_nothing() {
    let b = Arc::new(support::backend("cas").await);
    b.put_with_version(b"counter", b"0", None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..500 {
                loop {
                    let e = b.get_entry(b"counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&e.value).unwrap().parse().unwrap();
                    let next = (n + 1).to_string();
                    match b
                        .put_with_version(b"counter", next.as_bytes(), Some(e.version))
                        .await
                    {
                        Ok(_) => break,
                        Err(StateError::ConcurrentModification { .. }) => conflicts += 1,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let e = b.get_entry(b"counter").await.unwrap().unwrap();
    assert_eq!(e.value, b"4000");
    assert_eq!(e.version, 4001);
    eprintln!("4000 increments, {conflicts} conflicts retried");
}

#[tokio::test]
async fn metadata_queries_by_containment_and_path() {
    let b = support::backend("meta").await;
    b.put_with_metadata(
        b"u1",
        b"a",
        json!({"type": "user", "profile": {"city": "Oslo", "age": 30}}),
    )
    .await
    .unwrap();
    b.put_with_metadata(
        b"u2",
        b"b",
        json!({"type": "user", "profile": {"city": "Rome", "age": 30.0}}),
    )
    .await
    .unwrap();
    b.put_with_metadata(
        b"o1",
        b"c",
        json!({"type": "order", "tags": ["x", "y"], "gone": null}),
    )
    .await
    .unwrap();
    b.put(b"plain", b"d").await.unwrap();
    let keys =
        |v: Vec<processor::state::StateEntry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();

    assert_eq!(
        keys(
            b.query_by_metadata("type", &json!({"type": "user"}))
                .await
                .unwrap()
        ),
        vec![b"u1".to_vec(), b"u2".to_vec()]
    );
    assert_eq!(
        keys(b.query_by_metadata("type", &json!("order")).await.unwrap()),
        vec![b"o1".to_vec()]
    );
    assert_eq!(
        keys(
            b.query_by_metadata("profile.city", &json!("Rome"))
                .await
                .unwrap()
        ),
        vec![b"u2".to_vec()]
    );
    // jsonb compares numbers by value: 30 == 30.0.
    assert_eq!(
        keys(
            b.query_by_metadata("profile.age", &json!(30))
                .await
                .unwrap()
        )
        .len(),
        2
    );
    assert_eq!(
        keys(
            b.query_by_metadata("tags", &json!(["x", "y"]))
                .await
                .unwrap()
        ),
        vec![b"o1".to_vec()]
    );
    // Path equality is exact: a subset of an array is not equal to it.
    assert!(b
        .query_by_metadata("tags", &json!(["x"]))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        keys(b.query_by_metadata("gone", &json!(null)).await.unwrap()),
        vec![b"o1".to_vec()]
    );
    assert!(b
        .query_by_metadata("profile", &json!("Oslo"))
        .await
        .unwrap()
        .is_empty());
    // Hostile paths are data, not SQL.
    assert!(b
        .query_by_metadata("x'); DROP TABLE state_entries; --", &json!(1))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(b.count().await.unwrap(), 4);

    // Expired entries are invisible to queries.
    b.put_entry(
        b"u3",
        b"e",
        json!({"type": "user"}),
        Some(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    assert_eq!(
        b.query_by_metadata("type", &json!({"type": "user"}))
            .await
            .unwrap()
            .len(),
        3
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.query_by_metadata("type", &json!({"type": "user"}))
            .await
            .unwrap()
            .len(),
        2
    );

    let entry = b.get_entry(b"u1").await.unwrap().unwrap();
    assert_eq!(entry.metadata["profile"]["city"], "Oslo");
    assert!(entry.expires_at.is_none());
}

#[tokio::test]
async fn statistics_count_operations_and_slow_queries() {
    let cfg = support::config("stats").with_slow_query_threshold(Duration::ZERO);
    let b = processor::state::EnhancedPostgresBackend::new(cfg)
        .await
        .unwrap();
    b.put(b"a", b"1").await.unwrap();
    b.get(b"a").await.unwrap();
    b.get(b"b").await.unwrap();
    b.delete(b"a").await.unwrap();
    let s = b.get_stats();
    assert_eq!((s.put_count, s.get_count, s.delete_count), (1, 2, 1));
    assert_eq!(s.query_count, 4);
    assert_eq!(s.slow_query_count, 4, "threshold zero: every query is slow");
    assert!(s.avg_query_duration_ms > 0.0);
    assert!(b.health_check().await.unwrap());
    let h = b.clone_handle();
    h.put(b"c", b"1").await.unwrap();
    assert_eq!(b.get_stats().put_count, 2, "handles share statistics");
    let p = b.get_pool_stats();
    assert_eq!(p.max_size, 4);
    assert!(p.size >= 1 && p.size <= 4, "{p:?}");
}

/// Review defect: a key's version must never repeat, also across delete and `clear()`, or a
/// writer holding a version from before the delete overwrites the re-created entry.
#[tokio::test]
async fn a_version_never_repeats_after_delete_or_clear() {
    let b = support::backend("vreuse").await;
    assert_eq!(b.put_with_version(b"k", b"a", None).await.unwrap(), 1);
    b.delete(b"k").await.unwrap();
    assert_eq!(b.get(b"k").await.unwrap(), None);
    let v2 = b.put_with_version(b"k", b"b", None).await.unwrap();
    assert!(v2 > 1, "re-created at version {v2}");
    // The writer that read version 1 before the delete is refused; `b` survives.
    assert!(matches!(
        b.put_with_version(b"k", b"c", Some(1)).await,
        Err(StateError::ConcurrentModification { .. })
    ));
    assert!(matches!(
        b.delete_with_version(b"k", 1).await,
        Err(StateError::ConcurrentModification { .. })
    ));
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"b".to_vec()));

    // Deleted by version, by plain put over a deleted entry, and inside a transaction.
    b.delete_with_version(b"k", v2).await.unwrap();
    let v3 = b.put_entry(b"k", b"d", json!({}), None).await.unwrap();
    assert!(v3 > v2, "{v3} after {v2}");
    let mut tx = b.begin().await.unwrap();
    tx.delete(b"k").await.unwrap();
    tx.commit().await.unwrap();
    let v4 = b.put_with_version(b"k", b"e", None).await.unwrap();
    assert!(v4 > v3, "{v4} after {v3}");

    // clear() keeps the versions too.
    b.put_with_metadata(b"m", b"1", json!({"t": "x"}))
        .await
        .unwrap();
    b.clear().await.unwrap();
    assert_eq!(b.count().await.unwrap(), 0);
    assert!(b.list_keys(b"").await.unwrap().is_empty());
    assert!(!b.contains(b"k").await.unwrap());
    assert!(b
        .query_by_metadata("t", &json!("x"))
        .await
        .unwrap()
        .is_empty());
    let v5 = b.put_with_version(b"k", b"f", None).await.unwrap();
    assert!(v5 > v4, "{v5} after clear, {v4} before");
    assert!(matches!(
        b.put_with_version(b"k", b"g", Some(v4)).await,
        Err(StateError::ConcurrentModification { .. })
    ));
    // clear() removes the rows (TRUNCATE) and raises the version floor past every version
    // they held: any key written next starts above (a key never written starts at 1 only on
    // a table nothing was removed from, as the seed's example runs).
    let fresh = b.put_with_version(b"fresh", b"1", None).await.unwrap();
    assert!(fresh > v4, "{fresh} after clear, {v4} before");
    assert_eq!(b.count().await.unwrap(), 2);
}

/// Session settings in the URL's `options` reach every connection (the README's way to choose
/// `synchronous_commit` per backend): with `default_transaction_read_only` on, the server looks
/// read-only to the backend's writable-server check.
#[tokio::test]
async fn session_settings_in_the_url_options_reach_the_server() {
    let url = support::url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let read_only = format!("{url}{sep}options=-c%20default_transaction_read_only%3Don");
    let err = EnhancedPostgresBackend::new(
        EnhancedPostgresConfig::new(read_only).with_schema(support::unique("opts_ro")),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not allow writes"), "{err}");
}

/// An overwrite keeps the entry's creation time and moves its update time; a write after the
/// entry expired starts it over (both times new). (Upserts take these times from the proposed
/// row's defaults, as Citus needs.)
#[tokio::test]
async fn creation_time_is_kept_on_overwrite_and_new_after_expiry() {
    let b = support::backend("created").await;
    b.put(b"k", b"1").await.unwrap();
    let first = b.get_entry(b"k").await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.put(b"k", b"2").await.unwrap();
    let second = b.get_entry(b"k").await.unwrap().unwrap();
    assert_eq!(second.created_at, first.created_at);
    assert!(second.updated_at > first.updated_at);

    b.put_with_ttl(b"k", b"3", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.get(b"k").await.unwrap(), None, "expired");
    b.put(b"k", b"4").await.unwrap();
    let again = b.get_entry(b"k").await.unwrap().unwrap();
    assert!(
        again.created_at > second.updated_at,
        "started over after expiry"
    );
    assert_eq!(again.created_at, again.updated_at);
    assert!(again.version > second.version);
}

/// After N gets and M puts the statistics say N and M, and each kind has its latency
/// percentiles, in order.
#[tokio::test]
async fn statistics_count_gets_and_puts_with_latency_percentiles() {
    let b = support::backend("stats_counts").await;
    let before = b.get_stats();
    let timed = |s: &processor::state::BackendStats, op: &str| {
        s.latencies
            .iter()
            .find(|l| l.operation == op)
            .cloned()
            .unwrap_or_default()
    };
    for i in 0..7 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..11 {
        b.get(format!("k{i}").as_bytes()).await.unwrap();
    }
    let after = b.get_stats();
    assert_eq!(after.put_count - before.put_count, 7);
    assert_eq!(after.get_count - before.get_count, 11);
    for (op, n) in [("put", 7), ("get", 11)] {
        let (was, now) = (timed(&before, op), timed(&after, op));
        assert_eq!(now.count - was.count, n, "{op}");
        assert!(
            now.p50_us > 0 && now.p50_us <= now.p95_us && now.p95_us <= now.p99_us,
            "{op}: {now:?}"
        );
    }
}

/// Failed operations are counted by kind of error, adding up to the error count.
#[tokio::test]
async fn statistics_count_errors_by_kind() {
    let b = support::backend("stats_errors").await;
    b.put(b"k", b"v").await.unwrap();
    let (_, version) = b.get_with_version(b"k").await.unwrap().unwrap();
    let before = b.get_stats();
    for _ in 0..3 {
        let e = b
            .put_with_version(b"k", b"w", Some(version + 100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), processor::state::ErrorKind::Conflict, "{e}");
    }
    let after = b.get_stats();
    let conflicts = |s: &processor::state::BackendStats| {
        s.errors_by_kind
            .iter()
            .find(|(k, _)| *k == processor::state::ErrorKind::Conflict)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(conflicts(&after) - conflicts(&before), 3);
    assert_eq!(
        after.errors_by_kind.iter().map(|(_, n)| n).sum::<u64>(),
        after.error_count
    );
}
