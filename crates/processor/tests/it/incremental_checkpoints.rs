//! Incremental checkpoints: taking one is a cut, not a copy; a restore rewrites only what
//! changed since; deleting checkpoints frees the history they held. Under concurrent
//! transfers, every checkpoint is one instant and a restore is atomic for readers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, PartitionStrategy, StateBackend, StateEntry};

use crate::support;
use crate::transfers::Transfers;

/// Every live entry: key -> (value, version).
async fn dump(b: &EnhancedPostgresBackend) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
    let admin = support::raw(&support::url()).await;
    admin
        .query(
            &format!(
                "SELECT key, value, version FROM {} WHERE expires_at IS NULL OR expires_at > now()",
                b.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn values(d: &BTreeMap<Vec<u8>, (Vec<u8>, i64)>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    d.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
}

async fn history_rows(b: &EnhancedPostgresBackend) -> i64 {
    let admin = support::raw(&support::url()).await;
    let t = b.table().trim_end_matches('"').to_string();
    admin
        .query_one(
            &format!("SELECT count(*) FROM {t}_checkpoint_history\""),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// 10 000 keys; after a checkpoint, 100 change (50 updated, 25 deleted, 25 new): the restore
/// brings back exactly the checkpoint's state, gives the 100 new versions and leaves the
/// other 9 900 rows alone (their versions unchanged: nothing rewrote them). A key deleted
/// before the checkpoint and written after it is absent again; its tombstone's pre-image is
/// saved when the write updates the row in place (`moves`: false), not when the write moves
/// the key out of an ended time window into a new row (which counts as inserted after).
async fn restore_rewrites_only_what_changed(b: &EnhancedPostgresBackend, moves: bool) {
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..10_000)
        .map(|i| {
            (
                format!("k{i:05}").into_bytes(),
                format!("v{i}").into_bytes(),
            )
        })
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    b.batch_put(&refs).await.unwrap();
    b.put_with_ttl(b"k00007", b"ttl", Duration::from_secs(3600))
        .await
        .unwrap();
    // A tombstone at the checkpoint, written again after it.
    b.put(b"back", b"x").await.unwrap();
    b.delete(b"back").await.unwrap();
    let before = dump(b).await;
    let checkpoint = b.create_checkpoint("before").await.unwrap();
    assert_eq!(checkpoint.entry_count, 10_000);
    // On 1 s time windows, the changes below move rows out of an ended window.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..50 {
        b.put(format!("k{:05}", i * 3).as_bytes(), b"changed")
            .await
            .unwrap();
    }
    for i in 0..25 {
        b.delete(format!("k{:05}", 5000 + i).as_bytes())
            .await
            .unwrap();
        b.put(format!("new{i}").as_bytes(), b"n").await.unwrap();
    }
    b.put(b"back", b"again").await.unwrap();
    let listed = b.list_checkpoints().await.unwrap();
    let held = listed.iter().find(|c| c.id == checkpoint.id).unwrap();
    assert_eq!(
        held.history_entries,
        if moves { 75 } else { 76 },
        "pre-images of the 50 updated, the 25 deleted (and the tombstone written again)"
    );
    assert!(held.history_bytes > 0);
    assert_eq!(b.restore_checkpoint(checkpoint.id).await.unwrap(), 10_000);
    let after = dump(b).await;
    assert_eq!(
        values(&after),
        values(&before),
        "exactly the checkpoint's state"
    );
    let mut rewritten = 0;
    for (k, (_, version)) in &after {
        let old = before[k].1;
        if *version != old {
            assert!(*version > old, "versions never repeat");
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 75, "only the changed keys were rewritten");
    assert!(b.get(b"new0").await.unwrap().is_none());
    assert!(
        b.get(b"back").await.unwrap().is_none(),
        "deleted at the checkpoint"
    );
    let ttl = b
        .get_entry(b"k00007")
        .await
        .unwrap()
        .map(|e: StateEntry| e.expires_at);
    assert!(ttl.flatten().is_some(), "a restored entry keeps its expiry");
}

#[tokio::test]
async fn a_restore_rewrites_only_what_changed() {
    let b = support::backend("inc_restore").await;
    restore_rewrites_only_what_changed(&b, false).await;
}

#[tokio::test]
async fn incremental_checkpoints_work_on_partitioned_tables() {
    for (i, layout) in [
        PartitionStrategy::Hash { partitions: 4 },
        PartitionStrategy::TimeRange {
            interval: Duration::from_secs(1),
            premake: 2,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let config = support::config(&format!("inc_part{i}")).with_partitioning(layout);
        let b = EnhancedPostgresBackend::new(config).await.unwrap();
        restore_rewrites_only_what_changed(&b, i == 1).await;
    }
}

/// A table converted to a partitioned one after its first checkpoint keeps recording.
#[tokio::test]
async fn a_conversion_carries_the_history_trigger_over() {
    let b = support::backend("inc_convert").await;
    b.put(b"a", b"1").await.unwrap();
    let c = b.create_checkpoint("c").await.unwrap();
    b.migrate_to_partitioned(PartitionStrategy::Hash { partitions: 4 })
        .await
        .unwrap();
    b.put(b"a", b"2").await.unwrap();
    b.put(b"b", b"2").await.unwrap();
    b.restore_checkpoint(c.id).await.unwrap();
    assert_eq!(b.get(b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(b.get(b"b").await.unwrap(), None);
}

/// Deleting every checkpoint empties the history, and writes stop saving pre-images.
#[tokio::test]
async fn deleting_checkpoints_frees_their_history() {
    let b = support::backend("inc_free").await;
    for i in 0..1000 {
        b.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }
    let first = b.create_checkpoint("1").await.unwrap();
    for i in 0..500 {
        b.put(format!("k{i}").as_bytes(), b"w").await.unwrap();
    }
    let second = b.create_checkpoint("2").await.unwrap();
    for i in 0..1000 {
        b.put(format!("k{i}").as_bytes(), b"x").await.unwrap();
    }
    assert_eq!(history_rows(&b).await, 1500);
    // The first checkpoint's pre-images (500) are needed by nobody else.
    assert!(b.delete_checkpoint(first.id).await.unwrap());
    assert_eq!(history_rows(&b).await, 1000);
    assert!(b.delete_checkpoint(second.id).await.unwrap());
    assert_eq!(history_rows(&b).await, 0);
    for i in 0..1000 {
        b.put(format!("k{i}").as_bytes(), b"y").await.unwrap();
    }
    assert_eq!(history_rows(&b).await, 0, "no checkpoint needs pre-images");
}

/// Transfers between 1 000 accounts under 4 writers while checkpoints are taken every
/// 200 ms and restored at random: every checkpoint holds exactly the total, and a reader
/// summing the live state never sees anything else (a mix would show another total).
#[tokio::test]
async fn transfers_under_checkpoints_and_restores_stay_exact() {
    let _timed = support::timed().await;
    let b = support::backend("inc_transfers").await;
    let accounts = 1000u64;
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..accounts)
        .map(|i| (format!("acct:{i}").into_bytes(), b"100".to_vec()))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = entries
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    b.batch_put(&refs).await.unwrap();
    let total = 100 * accounts as i64;
    let transfers = Transfers::start(&b, 0, accounts, 4);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, t) = (stop.clone(), b.table().to_string());
        tokio::spawn(async move {
            let admin = support::raw(&support::url()).await;
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sum: i64 = admin
                    .query_one(
                        &format!(
                            "SELECT coalesce(sum(convert_from(value, 'UTF8')::bigint), 0)::bigint \
                             FROM {t} WHERE expires_at IS NULL OR expires_at > now()"
                        ),
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(sum, total, "a reader saw a total that never was");
                reads += 1;
            }
            reads
        })
    };
    let mut taken = Vec::new();
    let mut restores = 0;
    let mut x = 12345u64;
    for round in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        taken.push(b.create_checkpoint(&format!("r{round}")).await.unwrap());
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if (x >> 33) % 2 == 0 {
            let pick = &taken[(x >> 40) as usize % taken.len()];
            b.restore_checkpoint(pick.id).await.unwrap();
            restores += 1;
        }
    }
    let moves = transfers.stop().await;
    stop.store(true, Ordering::Relaxed);
    let reads = reader.await.unwrap();
    assert!(restores > 0);
    let admin = support::raw(&support::url()).await;
    let schema = format!("\"{}\"", b.config().schema());
    for c in &taken {
        let g = format!(
            "(SELECT gen FROM {schema}.state_checkpoints WHERE id = {})",
            c.id
        );
        let sum: i64 = admin
            .query_one(
                &format!(
                    "SELECT coalesce(sum(convert_from(value, 'UTF8')::bigint), 0)::bigint FROM \
                     (SELECT value FROM {t} WHERE checkpoint_gen <= {g} \
                      UNION ALL SELECT value FROM {schema}.state_entries_checkpoint_history \
                      WHERE since_gen <= {g} AND gen > {g}) c",
                    t = b.table()
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(sum, total, "checkpoint {} holds another total", c.name);
        assert_eq!(c.entry_count, accounts);
    }
    eprintln!(
        "{moves} transfers, {} checkpoints, {restores} restores, {reads} reads",
        taken.len()
    );
}

/// A checkpoint's entries, page by page, are the state at its instant (not the changes
/// since); replacing the state with them brings that state back, and a bad entry changes
/// nothing.
#[tokio::test]
async fn a_checkpoint_pages_out_and_replaces_a_state() {
    use processor::state::{BatchEntry, ErrorKind};
    let b = support::backend("inc_pages").await;
    for i in 0..2500 {
        b.put(format!("k{i:04}").as_bytes(), b"then").await.unwrap();
    }
    let c = b.create_checkpoint("then").await.unwrap();
    b.put(b"k0001", b"now").await.unwrap();
    b.delete(b"k0002").await.unwrap();
    b.put(b"later", b"x").await.unwrap();
    let mut entries = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = b
            .checkpoint_entries(c.id, after.as_deref(), 1000)
            .await
            .unwrap();
        after = page.last().map(|e| e.key.clone());
        let done = page.len() < 1000;
        entries.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(entries.len(), 2500);
    assert!(entries.windows(2).all(|w| w[0].key < w[1].key), "key order");
    assert!(entries.iter().all(|e| e.value == b"then"));
    assert!(b.checkpoint_entries(c.id, None, 0).await.is_err());

    let other = support::backend("inc_pages_to").await;
    other.put(b"stale", b"s").await.unwrap();
    let batch: Vec<BatchEntry<'_>> = entries
        .iter()
        .map(|e| BatchEntry {
            key: &e.key,
            value: &e.value,
            metadata: Some(&e.metadata),
            ttl: None,
        })
        .collect();
    let mut bad = batch.clone();
    bad.push(BatchEntry {
        key: b"",
        value: b"v",
        metadata: None,
        ttl: None,
    });
    let e = other.replace_state(&bad).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(other.get(b"stale").await.unwrap(), Some(b"s".to_vec()));
    assert_eq!(other.replace_state(&batch).await.unwrap(), 2500);
    assert_eq!(other.count().await.unwrap(), 2500);
    assert!(other.get(b"stale").await.unwrap().is_none());
    assert_eq!(other.get(b"k0002").await.unwrap(), Some(b"then".to_vec()));
}

/// An entry live at the checkpoint that expires and is removed by cleanup afterwards is
/// still part of the checkpoint (paged out with the time it had left); one already expired
/// at the checkpoint is not.
#[tokio::test]
async fn an_entry_removed_after_it_expired_stays_in_the_checkpoint_that_held_it() {
    let b = support::backend("inc_expired").await;
    b.put_with_ttl(b"brief", b"v", Duration::from_millis(1500))
        .await
        .unwrap();
    b.put_with_ttl(b"gone", b"v", Duration::from_millis(1))
        .await
        .unwrap();
    b.put(b"kept", b"v").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = b.create_checkpoint("c").await.unwrap();
    assert_eq!(c.entry_count, 2);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(b.cleanup_expired().await.unwrap() >= 2);
    let keys: Vec<Vec<u8>> = b
        .checkpoint_entries(c.id, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, vec![b"brief".to_vec(), b"kept".to_vec()]);
}

/// A table that recorded history before migration 014 (its rows have no insertion
/// generation yet, its history a primary key): the migration counts rows stamped after a
/// checkpoint as inserted then, so a restore still removes a key added after it.
#[tokio::test]
async fn a_table_checkpointed_before_migration_014_still_restores_exactly() {
    let b = support::backend("inc_upgrade").await;
    b.put(b"old", b"1").await.unwrap();
    let checkpoint = b.create_checkpoint("before").await.unwrap();
    b.put(b"new", b"2").await.unwrap();
    b.put(b"old", b"changed").await.unwrap();
    let (t, schema) = (b.table().to_string(), b.config().schema().to_string());
    let history = format!("{}_checkpoint_history\"", t.trim_end_matches('"'));
    let mut admin = support::raw(&support::url()).await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE {t} DROP COLUMN inserted_gen;
             ALTER TABLE {history} ADD PRIMARY KEY (key, gen);
             DELETE FROM \"{schema}\".pgstate_schema_migrations WHERE version = 14"
        ))
        .await
        .unwrap();
    drop(b);
    let b = EnhancedPostgresBackend::new(
        processor::state::EnhancedPostgresConfig::new(support::url())
            .with_schema(&schema)
            .with_pool_config(support::small_pool()),
    )
    .await
    .unwrap();
    let keys: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_constraint \
                 WHERE conrelid = '{history}'::regclass AND contype = 'p'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 0, "the history's primary key is gone");
    b.put(b"newer", b"3").await.unwrap();
    b.restore_checkpoint(checkpoint.id).await.unwrap();
    assert_eq!(b.get(b"old").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(
        b.get(b"new").await.unwrap(),
        None,
        "inserted before 014, after the checkpoint"
    );
    assert_eq!(b.get(b"newer").await.unwrap(), None, "inserted after 014");

    // The first write of a row after a checkpoint saves its pre-image and stays a HOT
    // update: its generation is not indexed.
    b.create_checkpoint("after").await.unwrap();
    let saved = history_rows(&b).await;
    let tx = admin.transaction().await.unwrap();
    tx.execute(
        &format!("UPDATE {t} SET value = 'x' WHERE key = 'old'"),
        &[],
    )
    .await
    .unwrap();
    let hot: i64 = tx
        .query_one(
            &format!("SELECT pg_stat_get_xact_tuples_hot_updated('{t}'::regclass)"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(hot, 1, "a HOT update");
    assert_eq!(history_rows(&b).await, saved + 1, "its pre-image saved");
}
