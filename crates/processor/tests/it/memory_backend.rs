//! The memory backend as the seed project's users call it: a default TTL, expiry, the cleanup
//! task, statistics, checkpoint and restore, memory usage.

use std::sync::Arc;
use std::time::Duration;

use processor::state::{ErrorKind, MemoryStateBackend, StateBackend};

#[tokio::test]
async fn the_default_ttl_expires_every_entry_and_a_ttl_of_its_own_wins() {
    let backend = MemoryStateBackend::new(Some(Duration::from_millis(100)));
    backend.put(b"key1", b"value1").await.unwrap();
    backend
        .put_with_ttl(b"long", b"lives", Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(backend.get(b"key1").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Invisible to every read once expired.
    assert!(backend.get(b"key1").await.unwrap().is_none());
    assert!(!backend.contains(b"key1").await.unwrap());
    assert_eq!(
        backend.list_keys(b"").await.unwrap(),
        vec![b"long".to_vec()]
    );
    assert_eq!(backend.count().await.unwrap(), 1);

    let forever = MemoryStateBackend::new(None);
    forever.put(b"k", b"v").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(forever.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(forever.cleanup_expired().await, 0);
}

#[tokio::test]
async fn cleanup_removes_the_expired_entries_and_the_task_does_it_alone() {
    let backend = MemoryStateBackend::new(Some(Duration::from_millis(100)));
    for key in [b"a", b"b", b"c"] {
        backend.put(key, b"v").await.unwrap();
    }
    assert_eq!(backend.stats().await.total_entries, 3);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(backend.cleanup_expired().await, 3);
    let stats = backend.stats().await;
    assert_eq!((stats.total_entries, stats.expired_entries), (0, 3));

    let backend = Arc::new(MemoryStateBackend::new(Some(Duration::from_millis(50))));
    let task = backend.start_cleanup_task(Duration::from_millis(20));
    backend.put(b"x", b"v").await.unwrap();
    backend.put(b"y", b"v").await.unwrap();
    // The task removes them without any read meeting them (bounded wait, not a timing
    // assertion: it only has to happen at all).
    let removed = async {
        while backend.stats().await.total_entries > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), removed)
        .await
        .expect("the cleanup task removed the expired entries");
    assert_eq!(backend.stats().await.expired_entries, 2);
    // The task ends by itself once the backend is gone.
    drop(backend);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the cleanup task ended with its backend")
        .unwrap();
}

#[tokio::test]
async fn statistics_count_reads_writes_hits_and_bytes() {
    let backend = MemoryStateBackend::new(None);
    backend.put(b"k1", b"v1").await.unwrap();
    backend.put(b"k2", b"value2").await.unwrap();
    assert!(backend.get(b"k1").await.unwrap().is_some());
    assert!(backend.get(b"k2").await.unwrap().is_some());
    assert!(backend.get(b"nope").await.unwrap().is_none());
    backend.delete(b"k1").await.unwrap();
    let stats = backend.stats().await;
    assert_eq!(stats.put_count, 2);
    assert_eq!(stats.get_count, 3);
    assert_eq!(stats.delete_count, 1);
    assert_eq!(stats.hit_count, 2);
    assert_eq!(stats.miss_count, 1);
    assert_eq!(stats.total_entries, 1);
    assert_eq!(stats.total_bytes, 2 + 6);
    let hit_rate = 100.0 * stats.hit_count as f64 / (stats.hit_count + stats.miss_count) as f64;
    assert!(hit_rate > 66.0 && hit_rate < 67.0);
}

#[tokio::test]
async fn checkpoint_and_restore_and_memory_usage() {
    let backend = MemoryStateBackend::new(None);
    assert_eq!(backend.memory_usage().await, 0);
    backend.put(b"a", b"1").await.unwrap();
    backend.put(b"b", b"2").await.unwrap();
    assert!(backend.memory_usage().await > 4);
    let checkpoint = backend.checkpoint().await;
    assert_eq!(checkpoint.len(), 2);
    backend.clear().await.unwrap();
    backend.put(b"c", b"3").await.unwrap();
    backend.restore(checkpoint.clone()).await.unwrap();
    assert_eq!(backend.count().await.unwrap(), 2);
    assert_eq!(backend.get(b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(
        backend.get(b"c").await.unwrap(),
        None,
        "restore replaces everything"
    );

    // A bad entry anywhere: refused, nothing changed.
    let mut bad = checkpoint;
    bad.push((Vec::new(), b"empty key".to_vec()));
    let e = backend.restore(bad).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(backend.count().await.unwrap(), 2);

    backend.delete(b"a").await.unwrap();
    backend.delete(b"b").await.unwrap();
    assert_eq!(backend.memory_usage().await, 0);
}

#[tokio::test]
async fn clones_and_tasks_share_one_store() {
    let backend = Arc::new(MemoryStateBackend::new(None));
    let mut tasks = Vec::new();
    for t in 0..10 {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                backend
                    .put(format!("{t}:{i}").as_bytes(), b"v")
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(backend.count().await.unwrap(), 100);
    let clone = backend.as_ref().clone();
    clone.clear().await.unwrap();
    assert_eq!(backend.count().await.unwrap(), 0);
}
