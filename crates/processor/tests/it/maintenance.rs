//! Data management: TTL cleanup in the background, retention by age, archive, VACUUM and
//! table statistics, on the shared server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::state::{
    EnhancedPostgresBackend, EnhancedPostgresConfig, ErrorKind, MaintenanceOptions,
    RetentionPolicy, StateBackend, StateError,
};

use crate::support;

/// A configuration on a fresh schema with `policy`.
fn config(tag: &str, policy: RetentionPolicy) -> EnhancedPostgresConfig {
    support::config(tag).with_retention_policy(policy)
}

/// Runs `sql` on the backend's server outside the backend.
async fn sql(b: &EnhancedPostgresBackend, text: &str) {
    let admin = support::raw(&support::url()).await;
    let text = text.replace("{t}", b.table());
    admin.batch_execute(&text).await.unwrap();
}

async fn count(b: &EnhancedPostgresBackend, filter: &str) -> i64 {
    let admin = support::raw(&support::url()).await;
    let text = format!("SELECT count(*) FROM {} WHERE {filter}", b.table());
    admin.query_one(&text, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn expired_entries_are_cleaned_in_the_background_while_writers_run() {
    let _bulk = support::bulk().await;
    let b = EnhancedPostgresBackend::new(config(
        "ttl_clean",
        RetentionPolicy {
            enabled: false,
            cleanup_interval: Duration::from_millis(200),
            batch_size: 1000,
            ..RetentionPolicy::default()
        },
    ))
    .await
    .unwrap();
    // 200 000 entries with TTLs, 150 000 of them expired (written by SQL to be quick).
    sql(
        &b,
        "INSERT INTO {t} (key, value, expires_at)
         SELECT convert_to('ttl:' || i, 'UTF8'), '\\x01',
                CASE WHEN i <= 150000 THEN now() - interval '1 second' ELSE now() + interval '1 hour' END
         FROM generate_series(1, 200000) i",
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    // Writers that wrote all of their 100 keys.
    let full = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (b, stop, ops, full) = (b.clone_handle(), stop.clone(), ops.clone(), full.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("w{t}:{}", i % 100);
                    b.put(k.as_bytes(), &i.to_be_bytes()).await.unwrap();
                    assert_eq!(
                        b.get(k.as_bytes()).await.unwrap(),
                        Some(i.to_be_bytes().to_vec())
                    );
                    let live = format!("ttl:{}", 150_001 + i % 50_000);
                    assert!(b.get(live.as_bytes()).await.unwrap().is_some(), "{live}");
                    ops.fetch_add(3, Ordering::Relaxed);
                    i += 1;
                    if i == 100 {
                        full.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    while count(&b, "expires_at <= now()").await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "expired rows left after 120 s: {}",
            count(&b, "expires_at <= now()").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = start.elapsed();
    // Each writer writes its 100 keys at least once (cleanup may finish sooner than that).
    while full.load(Ordering::Relaxed) < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the writers stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    eprintln!(
        "150 000 expired rows cleaned in the background in {took:?}; {} concurrent operations succeeded",
        ops.load(Ordering::Relaxed)
    );
    assert_eq!(count(&b, "key >= 'ttl:' AND key < 'ttl;'").await, 50_000);
    assert_eq!(count(&b, "key >= 'w' AND key < 'x'").await, 400);
    let stats = b.get_table_statistics().await.unwrap();
    assert_eq!((stats.total_rows, stats.expired_rows), (50_400, 0));
    assert!(stats.counts_exact);
}

#[tokio::test]
async fn retention_removes_exactly_the_old_entries_and_passes_never_overlap() {
    let policy = RetentionPolicy {
        enabled: true,
        max_age: Duration::from_secs(3600),
        // No background pass during the test; small batches make a pass take a while.
        cleanup_interval: Duration::from_secs(3600),
        batch_size: 50,
    };
    let cfg = config("retention", policy);
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
        .map(|i| (format!("k{i:04}").into_bytes(), b"v".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = rows.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    a.batch_put(&refs).await.unwrap();
    // A key written several times, then aged: its version must not come back.
    for _ in 0..4 {
        a.put(b"k0000", b"again").await.unwrap();
    }
    let old_version = a.get_entry(b"k0000").await.unwrap().unwrap().version;
    assert_eq!(old_version, 5);
    // Age 400 of them (every key ending in 0..=3 of each ten... as SQL sees it).
    sql(
        &a,
        "UPDATE {t} SET updated_at = now() - interval '2 hours'
         WHERE right(convert_from(key, 'UTF8'), 1) IN ('0', '1', '2', '3')",
    )
    .await;
    let steps = std::sync::Mutex::new(Vec::new());
    let (ra, rb) = tokio::join!(
        async {
            let options =
                MaintenanceOptions::new().with_progress(|p| steps.lock().unwrap().push(p.done));
            Ok::<_, StateError>(
                a.apply_retention_policy_with(options)
                    .await?
                    .entries_deleted,
            )
        },
        b.apply_retention_policy()
    );
    let mut removed = [ra.unwrap(), rb.unwrap()];
    let steps = steps.into_inner().unwrap();
    // Batches of 50: the pass that did the work reported 50, 100, ... 400.
    if removed[0] == 400 {
        assert_eq!(steps.last(), Some(&400), "{steps:?}");
        assert!(
            steps.len() >= 8 && steps.windows(2).all(|w| w[0] <= w[1]),
            "{steps:?}"
        );
    }
    removed.sort();
    assert_eq!(
        removed,
        [0, 400],
        "one pass removed everything, the other ran after it"
    );
    assert_eq!(a.count().await.unwrap(), 600);
    for (k, _) in &rows {
        let digit = k[k.len() - 1];
        let kept = a.get(k).await.unwrap().is_some();
        assert_eq!(kept, digit > b'3', "{}", String::from_utf8_lossy(k));
    }
    // Versions never repeat: re-created keys start above what cleanup removed.
    assert!(a.put_with_version(b"k0000", b"new", None).await.unwrap() > old_version);
    assert!(
        a.put_with_version(b"never-written", b"new", None)
            .await
            .unwrap()
            > old_version
    );
    assert_eq!(a.apply_retention_policy().await.unwrap(), 0);
}

#[tokio::test]
async fn archive_survives_a_killed_connection_without_losing_or_duplicating_rows() {
    let _bulk = support::bulk().await;
    let app = support::unique("archiver");
    let b = EnhancedPostgresBackend::new(
        config(
            "archive",
            RetentionPolicy {
                batch_size: 500,
                ..RetentionPolicy::default()
            },
        )
        .with_application_name(&app),
    )
    .await
    .unwrap();
    sql(
        &b,
        "INSERT INTO {t} (key, value, updated_at)
         SELECT convert_to('old:' || i, 'UTF8'), convert_to('v' || i, 'UTF8'), now() - interval '100 days'
         FROM generate_series(1, 100000) i;
         INSERT INTO {t} (key, value) SELECT convert_to('new:' || i, 'UTF8'), '\\x00'
         FROM generate_series(1, 100) i",
    )
    .await;
    let archive_of = |b: &EnhancedPostgresBackend| {
        let schema = b.config().schema().to_string();
        format!("\"{schema}\".state_entries_archive_90d")
    };
    let archived = |b: EnhancedPostgresBackend| async move {
        let admin = support::raw(&support::url()).await;
        let row = admin
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT key) FROM {}",
                    archive_of(&b)
                ),
                &[],
            )
            .await;
        row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0))
    };
    let first = {
        let b = b.clone_handle();
        tokio::spawn(async move {
            b.archive_old_data("state_entries_archive_90d", Duration::from_secs(86400 * 90))
                .await
        })
    };
    // Kill the backend's connections once archiving is under way.
    let start = Instant::now();
    while archived(b.clone_handle()).await.0 < 5_000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "archiving never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    support::terminate_sessions(&app).await;
    let interrupted = first.await.unwrap();
    let (mid, _) = archived(b.clone_handle()).await;
    eprintln!("first run: {interrupted:?} with {mid} rows archived");
    let second = b
        .archive_old_data("state_entries_archive_90d", Duration::from_secs(86400 * 90))
        .await
        .unwrap();
    let (rows, distinct) = archived(b.clone_handle()).await;
    assert_eq!(
        (rows, distinct),
        (100_000, 100_000),
        "no row lost, none twice"
    );
    assert_eq!(count(&b, "key >= 'old:' AND key < 'old;'").await, 0);
    assert_eq!(count(&b, "key >= 'new:' AND key < 'new;'").await, 100);
    if interrupted.is_ok() {
        assert_eq!(second, 0);
    } else {
        assert!(second > 0 && second < 100_000, "{second}");
    }

    // Read back and restore one.
    let entry = b
        .get_archived("state_entries_archive_90d", b"old:7")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.value, b"v7");
    assert!(b.get(b"old:7").await.unwrap().is_none());
    assert!(b
        .restore_archived("state_entries_archive_90d", b"old:7")
        .await
        .unwrap());
    let back = b.get_entry(b"old:7").await.unwrap().unwrap();
    assert_eq!(back.value, b"v7");
    assert!(back.version > entry.version);
    assert!(b
        .get_archived("state_entries_archive_90d", b"old:7")
        .await
        .unwrap()
        .is_none());
    // A live key is not overwritten by a restore.
    assert!(!b
        .restore_archived("state_entries_archive_90d", b"new:1")
        .await
        .unwrap());

    // Hostile archive names: refused, nothing touched.
    for name in [
        "x; DROP TABLE state_entries",
        "state_entries",
        "a\"b",
        "",
        "pg_catalog.pg_class",
        &"a".repeat(80),
    ] {
        let e = b
            .archive_old_data(name, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name}: {e}");
    }
    assert_eq!(count(&b, "true").await, 101);
}

/// Cleanup and retention count what a user could see (issue 23, case 7): entries that expired,
/// or aged out under an enabled policy. Delete tombstones are internal rows: the report form
/// counts them apart.
#[tokio::test]
async fn cleanup_counts_the_entries_that_expired_and_tombstones_apart() {
    let b =
        EnhancedPostgresBackend::new(support::config("cleanup_counts").with_expired_cleanup(false))
            .await
            .unwrap();
    for i in 0..20u32 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..10u32 {
        b.delete(format!("k{i}").as_bytes()).await.unwrap();
    }
    b.put_with_ttl(b"short", b"v", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.cleanup_expired().await.unwrap(), 1, "one entry expired");
    assert_eq!(count(&b, "true").await, 10, "the tombstones went too");

    // After clear() and one put, the default (disabled) policy ages nothing out.
    b.clear().await.unwrap();
    b.put(b"after", b"v").await.unwrap();
    assert_eq!(b.apply_retention_policy().await.unwrap(), 0);
    assert_eq!(count(&b, "true").await, 1);

    b.delete(b"after").await.unwrap();
    b.put_with_ttl(b"short", b"v", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = b
        .apply_retention_policy_with(MaintenanceOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (report.entries_deleted, report.tombstones_removed),
        (1, 1),
        "{report:?}"
    );

    // An enabled policy counts the entries it ages out, and tombstones apart.
    let policy = RetentionPolicy {
        enabled: true,
        max_age: Duration::from_secs(1),
        ..RetentionPolicy::default()
    };
    let aged = EnhancedPostgresBackend::new(b.config().clone().with_retention_policy(policy))
        .await
        .unwrap();
    aged.put(b"old", b"v").await.unwrap();
    aged.put(b"gone", b"v").await.unwrap();
    aged.delete(b"gone").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    aged.put(b"new", b"v").await.unwrap();
    let report = aged
        .apply_retention_policy_with(MaintenanceOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (report.entries_deleted, report.tombstones_removed),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(aged.list_keys(b"").await.unwrap(), vec![b"new".to_vec()]);
}

#[tokio::test]
async fn vacuum_and_table_statistics() {
    let b = support::backend("vacuum").await;
    for i in 0..300u32 {
        b.put(format!("k{i}").as_bytes(), &[7u8; 100])
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        b.delete(format!("k{i}").as_bytes()).await.unwrap();
    }
    b.put_with_ttl(b"short", b"v", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let s = b.get_table_statistics().await.unwrap();
    assert!(s.counts_exact);
    assert_eq!(
        (s.total_rows, s.active_rows, s.expired_rows),
        (301, 200, 101)
    );
    assert!(s.table_size > 0 && s.indexes_size > 0);
    b.vacuum_analyze(false).await.unwrap();
    let s = b.get_table_statistics().await.unwrap();
    assert!(s.last_vacuum.is_some() && s.last_analyze.is_some(), "{s:?}");
    // The 100 tombstones go too, but only the expired entry is counted.
    assert_eq!(b.cleanup_expired().await.unwrap(), 1);
    let before = s.table_size;
    b.vacuum_analyze(true).await.unwrap();
    let s = b.get_table_statistics().await.unwrap();
    assert_eq!((s.total_rows, s.active_rows, s.expired_rows), (200, 200, 0));
    // A full vacuum rewrites the table with its live rows only. (Dead-tuple counts come from
    // the statistics system, which reports them late: not asserted.)
    assert!(s.table_size <= before, "{before} -> {s:?}");
}

#[tokio::test]
async fn archive_moves_live_entries_only_and_never_restores_an_expired_one() {
    let b = support::backend("archive_live").await;
    b.put(b"live", b"v").await.unwrap();
    b.put(b"tomb", b"v").await.unwrap();
    b.delete(b"tomb").await.unwrap();
    b.put_with_ttl(b"short", b"v", Duration::from_secs(2))
        .await
        .unwrap();
    sql(&b, "UPDATE {t} SET updated_at = now() - interval '10 days'").await;
    let steps = std::sync::Mutex::new(Vec::new());
    assert_eq!(
        b.archive_old_data_with(
            "arch",
            Duration::from_secs(86400),
            MaintenanceOptions::new().with_progress(|p| steps.lock().unwrap().push(p.done))
        )
        .await
        .unwrap(),
        2,
        "the live entry and the one with time left, not the tombstone"
    );
    assert_eq!(steps.into_inner().unwrap().last(), Some(&2));
    assert!(b.get_archived("arch", b"tomb").await.unwrap().is_none());
    assert_eq!(
        count(&b, "true").await,
        1,
        "the tombstone stays for cleanup"
    );
    // Once its time has run out in the archive, an entry is not restored (it would come back
    // invisible and be cleaned up); it stays archived.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(!b.restore_archived("arch", b"short").await.unwrap());
    assert!(b.get_archived("arch", b"short").await.unwrap().is_some());
    assert!(b.restore_archived("arch", b"live").await.unwrap());
    assert_eq!(b.get(b"live").await.unwrap(), Some(b"v".to_vec()));
}

/// A backup with `pg_dump` of the backend's schema, restored with `pg_restore` into a fresh
/// database, reads back identically through a new backend: values, metadata, versions, TTLs,
/// tombstones and the version floor.
#[tokio::test]
#[cfg_attr(
    pgstate_external_server,
    ignore = "needs the local cluster the tests start"
)]
async fn a_pg_dump_round_trip_reads_back_identically() {
    let cluster = support::local_cluster();
    let source_url = support::fresh_database("dump_src").await;
    let target_url = support::fresh_database("dump_dst").await;
    let schema = support::unique("dumped");
    let config = |url: &str| {
        EnhancedPostgresConfig::new(url)
            .with_schema(schema.clone())
            .with_pool_config(support::small_pool())
    };
    let b = EnhancedPostgresBackend::new(config(&source_url))
        .await
        .unwrap();
    b.put_with_metadata(
        b"user:1",
        b"alice",
        serde_json::json!({"type": "user", "id": 1}),
    )
    .await
    .unwrap();
    b.put_with_ttl(b"session:1", b"token", Duration::from_secs(3600))
        .await
        .unwrap();
    for _ in 0..3 {
        b.put(b"counter", b"x").await.unwrap();
    }
    b.put(b"gone", b"x").await.unwrap();
    b.delete(b"gone").await.unwrap();
    // Something removed, so the floor is above 1.
    b.put_with_ttl(b"short", b"x", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // 'short' expired ('gone''s tombstone goes too, uncounted).
    assert_eq!(b.cleanup_expired().await.unwrap(), 1);
    let before: Vec<_> = {
        let mut v = Vec::new();
        for k in b.list_keys(b"").await.unwrap() {
            v.push(b.get_entry(&k).await.unwrap().unwrap());
        }
        v
    };
    drop(b);

    let dump = std::env::temp_dir().join(format!("{schema}.dump"));
    let tool = |name: &str| cluster.bindir().join(name);
    support::run(
        std::process::Command::new(tool("pg_dump"))
            .args(["-Fc", "-n", &schema, "-f"])
            .arg(&dump)
            .arg("-d")
            .arg(&source_url),
    );
    support::run(
        std::process::Command::new(tool("pg_restore"))
            .args(["--exit-on-error", "-d", &target_url])
            .arg(&dump),
    );
    let _ = std::fs::remove_file(&dump);

    let r = EnhancedPostgresBackend::new(config(&target_url))
        .await
        .unwrap();
    let mut after = Vec::new();
    for k in r.list_keys(b"").await.unwrap() {
        after.push(r.get_entry(&k).await.unwrap().unwrap());
    }
    assert_eq!(
        after, before,
        "values, metadata, versions, timestamps and TTLs"
    );
    assert_eq!(after.len(), 3);
    assert!(r.get(b"gone").await.unwrap().is_none());
    // The floor came along: the highest removed version was the tombstone's, 2 (put, then
    // delete), so a key written anew, and the deleted key re-created, start at 3.
    assert_eq!(r.put_with_version(b"new", b"x", None).await.unwrap(), 3);
    assert_eq!(
        r.put_with_version(b"gone", b"again", None).await.unwrap(),
        3
    );
}

/// `get_table_activity` reads the server's counters of the table: every client's inserts,
/// updates (puts of existing keys, deletes' tombstones) and deletes (cleanup).
#[tokio::test]
async fn table_activity_counts_every_clients_writes() {
    let b = support::backend("activity").await;
    let start = b.get_table_activity().await.unwrap();
    assert_eq!(start.rows_inserted, 0, "{start:?}");
    // Another backend on the same table: the counters are the server's, not this handle's.
    let other = EnhancedPostgresBackend::new(b.config().clone())
        .await
        .unwrap();
    for i in 0..10 {
        other.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..4 {
        other.put(format!("k{i}").as_bytes(), b"w").await.unwrap();
    }
    other.delete(b"k9").await.unwrap();
    // Removes k9's tombstone, which is no entry of the user's.
    let report = b
        .apply_retention_policy_with(MaintenanceOptions::new())
        .await
        .unwrap();
    assert_eq!((report.entries_deleted, report.tombstones_removed), (0, 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = b.get_table_activity().await.unwrap();
        // PostgreSQL publishes a session's counters when it goes idle, within about a second.
        if a.rows_inserted >= 10 && a.rows_updated >= 5 && a.rows_deleted >= 1 {
            assert_eq!(a.rows_inserted, 10, "{a:?}");
            assert_eq!(a.rows_updated, 5, "{a:?}");
            assert_eq!(a.rows_deleted, 1, "{a:?}");
            assert!(a.index_scans > 0, "{a:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counters never showed the writes: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
