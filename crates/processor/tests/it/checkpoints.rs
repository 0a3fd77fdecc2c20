//! State checkpoints: one instant of the state under concurrent writers, and an atomic
//! restore.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use processor::state::{ErrorKind, MaintenanceOptions, StateBackend};

use crate::support;
use crate::transfers::Transfers;

#[tokio::test]
async fn a_checkpoint_is_one_instant_and_its_restore_is_atomic() {
    let _bulk = support::bulk().await;
    let b = support::backend("ckpt").await;
    let admin = support::raw(&support::url()).await;
    let t = b.table().to_string();
    let schema = format!("\"{}\"", b.config().schema());
    // The entries checkpoint `id` holds: the rows stamped in its generation or before, and
    // the pre-images of the keys changed since (migration 013).
    let at = |id: i64| {
        let g = format!("(SELECT gen FROM {schema}.state_checkpoints WHERE id = {id})");
        format!(
            "(SELECT key, value, version FROM {t} WHERE checkpoint_gen <= {g} \
              UNION ALL SELECT key, value, version FROM {schema}.state_entries_checkpoint_history \
              WHERE since_gen <= {g} AND gen > {g}) c"
        )
    };
    // 100 000 accounts of 10 units: the writers move units around, so the total stays
    // 1 000 000 at every instant.
    admin
        .batch_execute(&format!(
            "INSERT INTO {t} (key, value)
             SELECT convert_to('acct:' || i, 'UTF8'), convert_to('10', 'UTF8')
             FROM generate_series(1, 100000) i"
        ))
        .await
        .unwrap();
    let sum = |table: String, filter: String| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    &format!(
                        "SELECT coalesce(sum(convert_from(value, 'UTF8')::bigint), 0)::bigint \
                         FROM {table} WHERE {filter}"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let transfers = Transfers::start(&b, 1, 100_000, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let before = transfers.moves();
    let checkpoint = {
        let seen = seen.clone();
        let options = MaintenanceOptions::new().with_progress(move |p| {
            seen.lock().unwrap().push(p.done);
        });
        b.create_checkpoint_with("mid-transfer", options)
            .await
            .unwrap()
    };
    let during = transfers.moves() - before;
    transfers.stop().await;
    eprintln!("checkpoint of 100 000 entries taken while {during} transfers committed");
    assert_eq!(checkpoint.entry_count, 100_000);
    let progress = seen.lock().unwrap().clone();
    assert_eq!(progress, vec![100_000], "one report, once counted");
    let id = checkpoint.id;
    assert_eq!(
        sum(at(id), "true".into()).await,
        1_000_000,
        "the checkpoint is the state at one instant"
    );
    assert_eq!(sum(t.clone(), "true".into()).await, 1_000_000);

    // Change everything in one statement, add a key; then restore while a reader watches.
    admin
        .batch_execute(&format!(
            "UPDATE {t} SET value = convert_to('0', 'UTF8'), version = version + 1;
             INSERT INTO {t} (key, value) VALUES ('extra', '\\x00')"
        ))
        .await
        .unwrap();
    let watching = Arc::new(AtomicBool::new(true));
    let reader = {
        let (watching, t) = (watching.clone(), t.clone());
        tokio::spawn(async move {
            let admin = support::raw(&support::url()).await;
            let mut states = HashSet::new();
            while watching.load(Ordering::Relaxed) {
                let row = admin
                    .query_one(
                        &format!(
                            "SELECT count(*) FILTER (WHERE value = convert_to('0', 'UTF8')), count(*)
                             FROM {t} WHERE expires_at IS NULL OR expires_at > now()"
                        ),
                        &[],
                    )
                    .await
                    .unwrap();
                states.insert((row.get::<_, i64>(0), row.get::<_, i64>(1)));
            }
            states
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.restore_checkpoint(id).await.unwrap(), 100_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    watching.store(false, Ordering::Relaxed);
    let states = reader.await.unwrap();
    eprintln!("the reader saw {states:?}");
    assert!(
        states
            .iter()
            .all(|s| *s == (100_000, 100_001) || *s == (0, 100_000)),
        "a reader saw a mix: {states:?}"
    );
    assert!(states.contains(&(0, 100_000)));

    // Exactly the checkpoint's state is back, every entry with a new version.
    let same: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {} JOIN {t} s USING (key)
                 WHERE s.value = c.value AND s.version > c.version
                   AND (s.expires_at IS NULL OR s.expires_at > now())",
                at(id)
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, 100_000);
    assert_eq!(b.count().await.unwrap(), 100_000, "the extra key is gone");
    assert!(b.get(b"extra").await.unwrap().is_none());

    // Listing, deleting, pruning.
    let second = b.create_checkpoint("after").await.unwrap();
    let listed = b.list_checkpoints().await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![second.id, id]
    );
    assert_eq!(b.prune_checkpoints(1).await.unwrap(), 1);
    assert!(!b.delete_checkpoint(id).await.unwrap());
    assert!(b.delete_checkpoint(second.id).await.unwrap());
    assert!(b.list_checkpoints().await.unwrap().is_empty());
    let e = b.restore_checkpoint(id).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    for name in ["", "a\0b"] {
        let e = b.create_checkpoint(name).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
