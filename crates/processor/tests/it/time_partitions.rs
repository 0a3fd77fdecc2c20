//! Time-range partitioning by write window: every operation behaves as on a plain table, keys
//! stay unique while windows change under concurrent writers, and retention drops whole
//! partitions and reports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, IsolationLevel, MaintenanceOptions,
    PartitionStrategy, RetentionPolicy, RetentionReport, StateBackend,
};

use crate::partitioning::every_operation;
use crate::support;

fn windows(seconds: u64) -> PartitionStrategy {
    PartitionStrategy::TimeRange {
        interval: Duration::from_secs(seconds),
        premake: 2,
    }
}

/// The name of one of the control objects of `b`'s time-range table (`_windows`,
/// `_window_advance`), quoted and qualified like the table.
fn control(b: &EnhancedPostgresBackend, suffix: &str) -> String {
    b.table()
        .replace("\"state_entries\"", &format!("\"state_entries{suffix}\""))
}

/// Windows of `b`'s table that ended.
async fn ended_windows(b: &EnhancedPostgresBackend) -> i64 {
    let admin = support::raw(&support::url()).await;
    let windows = control(b, "_windows");
    admin
        .query_one(
            &format!("SELECT count(*) FROM {windows} WHERE ended IS NOT NULL"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits (up to 30 s) until more than `seen` windows of `b`'s table ended; returns how many.
async fn next_window(b: &EnhancedPostgresBackend, seen: i64) -> i64 {
    let start = Instant::now();
    loop {
        let n = ended_windows(b).await;
        if n > seen {
            return n;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let admin = support::raw(&support::url()).await;
            let windows = control(b, "_windows");
            let state: Vec<String> = admin
                .query(
                    &format!("SELECT row({windows}.*)::text FROM {windows} ORDER BY 1"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let waits: Vec<String> = admin
                .query(
                    "SELECT coalesce(wait_event_type, '') || ' ' || coalesce(state, '') || ' ' || left(query, 120)                      FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            panic!("no new write window: {state:#?} {waits:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retention passes on `b` until they dropped partitions holding at least `rows` rows (a pass
/// leaves a partition whose table is busy for the next one), for up to 30 s; what they removed
/// in all.
async fn retention_until(b: &EnhancedPostgresBackend, rows: u64) -> RetentionReport {
    let start = Instant::now();
    let mut all = RetentionReport::default();
    loop {
        let report = b
            .apply_retention_policy_with(MaintenanceOptions::new())
            .await
            .unwrap();
        all.entries_deleted += report.entries_deleted;
        all.tombstones_removed += report.tombstones_removed;
        all.partitions_dropped.extend(report.partitions_dropped);
        if all.partitions_dropped.iter().map(|p| p.rows).sum::<u64>() >= rows
            || start.elapsed() > Duration::from_secs(30)
        {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A backend on 1 s windows with retention by `max_age` (passes run when the test asks) and
/// `n` entries `old0`, `old1`, ...
async fn with_old_entries(tag: &str, max_age: Duration, n: usize) -> EnhancedPostgresBackend {
    let cfg = support::config(tag)
        .with_partitioning(windows(1))
        .with_retention_policy(RetentionPolicy {
            enabled: true,
            max_age,
            cleanup_interval: Duration::from_secs(3600),
            ..RetentionPolicy::default()
        });
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    for i in 0..n {
        b.put(format!("old{i}").as_bytes(), b"v").await.unwrap();
    }
    b
}

/// Keys that appear more than once in `b`'s table.
async fn duplicate_keys(b: &EnhancedPostgresBackend) -> i64 {
    let admin = support::raw(&support::url()).await;
    admin
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT key FROM {} GROUP BY key HAVING count(*) > 1) d",
                b.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_time_range_partitioned_table_passes_the_conformance_suite_and_every_operation() {
    let b = every_operation(windows(3600), "part_time").await;
    let admin = support::raw(&support::url()).await;
    let row = admin
        .query_one(
            "SELECT pg_get_partkeydef($1::text::regclass),
                    (SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass),
                    (SELECT array_agg(a.attname::text ORDER BY k.n)
                     FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n)
                     JOIN pg_attribute a ON a.attnum = k.attnum
                     WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                       AND a.attrelid = $1::text::regclass)",
            &[&b.table()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "RANGE (write_window)");
    // The current window and two ahead (one more if the test crossed an hour's end).
    assert!(row.get::<_, i64>(1) >= 3);
    assert_eq!(
        row.get::<_, Vec<String>>(2),
        vec!["key".to_string(), "write_window".to_string()]
    );
    assert_eq!(duplicate_keys(&b).await, 0);
    // Another window length on the same table is refused.
    let cfg = EnhancedPostgresConfig::new(support::url())
        .with_schema(b.table().split('.').next().unwrap().trim_matches('"'))
        .with_pool_config(support::small_pool());
    let e = EnhancedPostgresBackend::new(cfg.clone().with_partitioning(windows(60)))
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    // No setting: the backend finds the windows in the catalog and writes as it must.
    let plain = EnhancedPostgresBackend::new(cfg).await.unwrap();
    plain.put(b"key2", b"again").await.unwrap();
    assert_eq!(b.get(b"key2").await.unwrap(), Some(b"again".to_vec()));
    // Converting a table to time ranges online is refused (its writers would need a restart).
    let other = support::backend("part_time_online").await;
    let e = other
        .migrate_to_partitioned(windows(3600))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
}

#[tokio::test]
async fn keys_stay_unique_and_versions_count_every_write_while_windows_change() {
    const TASKS: usize = 8;
    const KEYS: usize = 20;
    let cfg = support::config("part_time_race").with_partitioning(windows(1));
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let deadline = Instant::now() + Duration::from_millis(3500);
    let tasks = (0..TASKS).map(|t| {
        let (b, counts) = (b.clone_handle(), counts.clone());
        tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < deadline {
                let k = i % KEYS;
                b.put(format!("k{k}").as_bytes(), format!("{t}:{i}").as_bytes())
                    .await
                    .unwrap_or_else(|e| panic!("put failed: {e}"));
                counts[k].fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        t.unwrap();
    }
    assert!(
        ended_windows(&b).await >= 2,
        "the writes spanned window changes"
    );
    assert_eq!(duplicate_keys(&b).await, 0);
    let mut total = 0;
    for (k, n) in counts.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        total += n;
        let entry = b
            .get_entry(format!("k{k}").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entry.version, n as i64, "k{k}: one version per write");
    }
    assert!(total > 100, "{total} writes");
}

#[tokio::test]
async fn a_transaction_whose_snapshot_predates_a_new_window_is_retried() {
    let cfg = support::config("part_time_tx").with_partitioning(windows(1));
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"k", b"1").await.unwrap();
    let seen = ended_windows(&b).await;
    let mut tx = b
        .begin_transaction(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    assert_eq!(tx.get(b"k").await.unwrap(), Some(b"1".to_vec()));
    next_window(&b, seen).await;
    let e = tx.put(b"k", b"2").await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("40001"), "{e}");
    assert!(e.is_retryable(), "{e}");
    drop(tx);
    // Also when the transaction had its id before the window changed (an earlier write that
    // takes no window).
    let seen = ended_windows(&b).await;
    let mut tx = b
        .begin_transaction(IsolationLevel::RepeatableRead)
        .await
        .unwrap();
    tx.notify_durable("windows", "x").await.unwrap();
    next_window(&b, seen).await;
    let e = tx.put(b"k", b"2").await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("40001"), "{e}");
    drop(tx);
    // The retry loop runs it again with a new snapshot.
    b.transaction(IsolationLevel::RepeatableRead, |tx| {
        Box::pin(async move { tx.put(b"k", b"3").await })
    })
    .await
    .unwrap();
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"3".to_vec()));
    assert_eq!(b.get_entry(b"k").await.unwrap().unwrap().version, 2);
    assert_eq!(duplicate_keys(&b).await, 0);

    // A restored dump carries the last change's transaction id from another cluster, maybe
    // one this cluster has not reached: writes go on.
    let admin = support::raw(&support::url()).await;
    let advance = control(&b, "_window_advance");
    admin
        .execute(
            &format!("SELECT setval('{advance}', pg_current_xact_id()::text::bigint + 1000000)"),
            &[],
        )
        .await
        .unwrap();
    b.put(b"k", b"4").await.unwrap();
    assert_eq!(b.get_entry(b"k").await.unwrap().unwrap().version, 3);
}

#[tokio::test]
async fn retention_drops_whole_windows_and_reports_them() {
    let b = with_old_entries("part_time_drop", Duration::from_secs(2), 50).await;
    b.put(b"moved", b"v").await.unwrap();
    let old_version = b.get_entry(b"old0").await.unwrap().unwrap().version;
    for _ in 0..3 {
        b.put(b"old0", b"v").await.unwrap();
    }
    next_window(&b, ended_windows(&b).await).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Written again now: it moves to the current window and survives the drop.
    b.put(b"moved", b"again").await.unwrap();
    b.put(b"fresh", b"v").await.unwrap();
    let report = retention_until(&b, 50).await;
    let dropped_rows: u64 = report.partitions_dropped.iter().map(|p| p.rows).sum();
    assert!(!report.partitions_dropped.is_empty(), "{report:?}");
    assert_eq!(dropped_rows, 50, "{report:?}");
    assert!(report.entries_deleted >= 50, "{report:?}");
    assert!(report
        .partitions_dropped
        .iter()
        .all(|p| p.name.starts_with("state_entries_w")));
    assert_eq!(b.get(b"old1").await.unwrap(), None);
    assert_eq!(b.get(b"moved").await.unwrap(), Some(b"again".to_vec()));
    assert_eq!(b.get(b"fresh").await.unwrap(), Some(b"v".to_vec()));
    // The dropped entries' versions are never reused.
    b.put(b"old0", b"back").await.unwrap();
    assert!(b.get_entry(b"old0").await.unwrap().unwrap().version > old_version + 3);
    // Their partitions and windows are gone.
    let stats = b.get_table_statistics().await.unwrap();
    assert!(stats
        .partitions
        .iter()
        .all(|p| report.partitions_dropped.iter().all(|d| d.name != p.name)));
    assert_eq!(duplicate_keys(&b).await, 0);
}

#[tokio::test]
async fn expired_cleanup_drops_windows_whose_entries_all_expired() {
    let cfg = support::config("part_time_ttl").with_partitioning(windows(1));
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    for i in 0..20 {
        b.put_with_ttl(format!("t{i}").as_bytes(), b"v", Duration::from_millis(200))
            .await
            .unwrap();
    }
    b.put(b"kept", b"v").await.unwrap();
    let seen = next_window(&b, ended_windows(&b).await).await;
    // A window whose entries all expired goes whole; the one holding a live entry stays.
    b.put_with_ttl(b"late", b"v", Duration::from_millis(200))
        .await
        .unwrap();
    next_window(&b, seen).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = retention_until(&b, 1).await;
    let dropped_rows: u64 = report.partitions_dropped.iter().map(|p| p.rows).sum();
    // The window of 'late' holds nothing else; the expired entries written beside 'kept' go
    // row by row (or whole, those written in a window of their own if the writes crossed a
    // window's end).
    assert!(dropped_rows >= 1, "the window of 'late': {report:?}");
    assert_eq!(report.entries_deleted, 21, "{report:?}");
    assert_eq!(b.get(b"late").await.unwrap(), None);
    assert_eq!(b.get(b"kept").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.count().await.unwrap(), 1);
}

/// The partition `key`'s entry is in.
async fn partition_of(b: &EnhancedPostgresBackend, key: &[u8]) -> String {
    let admin = support::raw(&support::url()).await;
    admin
        .query_one(
            &format!(
                "SELECT c.relname::text FROM {} t JOIN pg_class c ON c.oid = t.tableoid WHERE key = $1",
                b.table()
            ),
            &[&key],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn conditional_writes_and_restores_see_entries_in_older_windows() {
    let cfg = support::config("part_time_cond").with_partitioning(windows(1));
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let live = b.put_with_version(b"live", b"1", None).await.unwrap();
    let gone = b
        .put_with_version(b"gone", b"1", None)
        .await
        .and(
            b.put_with_ttl(b"gone", b"2", Duration::from_millis(100))
                .await,
        )
        .map(|_| 2)
        .unwrap();
    b.put(b"deleted", b"1").await.unwrap();
    b.delete(b"deleted").await.unwrap();
    b.put(b"cas", b"a").await.unwrap();
    b.put(b"archived", b"kept").await.unwrap();
    let archived_version = b.get_entry(b"archived").await.unwrap().unwrap().version;
    let old_window = partition_of(&b, b"live").await;
    next_window(&b, ended_windows(&b).await).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    // Create-if-absent: refused for a live entry in an older window, allowed for an expired
    // or deleted one, whose version it continues.
    let e = b.put_with_version(b"live", b"x", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(
        b.put_with_version(b"gone", b"3", None).await.unwrap(),
        gone + 1
    );
    assert_eq!(b.put_with_version(b"deleted", b"2", None).await.unwrap(), 3);
    // Version and value checks find the entry where it is, and move it to the current window.
    assert_eq!(
        b.put_with_version(b"live", b"2", Some(live)).await.unwrap(),
        live + 1
    );
    assert_ne!(partition_of(&b, b"live").await, old_window);
    assert!(b.compare_and_set(b"cas", Some(b"a"), b"b").await.unwrap());
    assert_ne!(partition_of(&b, b"cas").await, old_window);
    assert!(!b.compare_and_set(b"cas", Some(b"a"), b"c").await.unwrap());
    // Archive and restore.
    let admin = support::raw(&support::url()).await;
    admin
        .execute(
            &format!(
                "UPDATE {} SET updated_at = now() - interval '2 days' WHERE key = 'archived'",
                b.table()
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        b.archive_old_data("old_entries", Duration::from_secs(86_400))
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.get(b"archived").await.unwrap(), None);
    assert!(b
        .restore_archived("old_entries", b"archived")
        .await
        .unwrap());
    let back = b.get_entry(b"archived").await.unwrap().unwrap();
    assert_eq!(back.value, b"kept");
    assert!(back.version > archived_version);
    assert_eq!(duplicate_keys(&b).await, 0);
}

#[tokio::test]
async fn a_backend_starts_after_a_downtime_longer_than_the_windows_made_ahead() {
    let strategy = PartitionStrategy::TimeRange {
        interval: Duration::from_secs(1),
        premake: 1,
    };
    let cfg = support::config("part_time_down").with_partitioning(strategy);
    let b = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    b.put(b"before", b"v").await.unwrap();
    drop(b);
    // Two windows ahead were made; three pass with no backend running.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    b.put(b"after", b"v").await.unwrap();
    assert_eq!(b.get(b"before").await.unwrap(), Some(b"v".to_vec()));
    let admin = support::raw(&support::url()).await;
    let windows = control(&b, "_windows");
    let lag: f64 = admin
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now() - window_start)::float8 FROM {windows} \
                 WHERE became_current IS NOT NULL AND ended IS NULL"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        lag < 2.0,
        "the current window is the window of now: {lag} s behind"
    );
    assert_ne!(
        partition_of(&b, b"after").await,
        partition_of(&b, b"before").await
    );
}

#[tokio::test]
async fn whole_windows_are_dropped_while_writers_keep_writing() {
    let b = with_old_entries("part_time_busy", Duration::from_secs(1), 100).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (b, stop, writes) = (b.clone_handle(), stop.clone(), writes.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    b.put(format!("w{t}:{}", i % 50).as_bytes(), b"v")
                        .await
                        .unwrap_or_else(|e| panic!("put failed: {e}"));
                    writes.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    next_window(&b, ended_windows(&b).await).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dropped = retention_until(&b, 100).await.partitions_dropped;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        dropped.iter().map(|p| p.rows).sum::<u64>() >= 100,
        "the old keys' window went whole: {dropped:?}"
    );
    assert!(writes.load(Ordering::Relaxed) > 100);
    assert_eq!(b.get(b"old7").await.unwrap(), None);
    assert_eq!(duplicate_keys(&b).await, 0);
    for t in 0..4 {
        assert!(b.get(format!("w{t}:0").as_bytes()).await.unwrap().is_some());
    }
}

/// A backend that may not change the schema starts no write window and creates no partition:
/// once the windows made ahead have passed, opening one adds none (one that may change the
/// schema starts the window of now and makes partitions ahead of it).
#[tokio::test]
async fn a_backend_without_schema_changes_creates_no_partition() {
    let config = support::config("part_readonly").with_partitioning(windows(1));
    let b = EnhancedPostgresBackend::new(config.clone()).await.unwrap();
    b.put(b"k", b"v").await.unwrap();
    let table = b.table().to_string();
    drop(b);
    let admin = support::raw(&support::url()).await;
    let count = async || -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass",
                &[&table],
            )
            .await
            .unwrap()
            .get(0)
    };
    // Every window made ahead (two, of 1 s) has passed.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = count().await;
    let reader = EnhancedPostgresBackend::new(config.clone().with_schema_changes(false))
        .await
        .unwrap();
    reader.list_keys(b"").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count().await,
        before,
        "a read-only backend created partitions"
    );
    drop(reader);
    let _writer = EnhancedPostgresBackend::new(config).await.unwrap();
    assert!(count().await > before);
}

/// Dropping an aged window (no trigger fires for a dropped partition) first saves what a
/// checkpoint holds: the checkpoint still pages its entries out and a restore brings them
/// back.
#[tokio::test]
async fn a_dropped_window_keeps_what_a_checkpoint_holds() {
    let b = with_old_entries("part_time_ckpt", Duration::from_secs(2), 5).await;
    let c = b.create_checkpoint("before").await.unwrap();
    assert_eq!(c.entry_count, 5);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = retention_until(&b, 5).await;
    assert!(
        report
            .partitions_dropped
            .iter()
            .map(|p| p.rows)
            .sum::<u64>()
            >= 5,
        "{report:?}"
    );
    assert_eq!(b.count().await.unwrap(), 0);
    let held = b.checkpoint_entries(c.id, None, 100).await.unwrap();
    assert_eq!(held.len(), 5, "{held:?}");
    assert_eq!(b.restore_checkpoint(c.id).await.unwrap(), 5);
    assert_eq!(b.get(b"old0").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(b.count().await.unwrap(), 5);
}
