//! One clock for expiry (issue 23, case 6): an entry has expired once the server's clock at
//! the *statement* passes its `expires_at`, in and out of transactions. (`now()` is the
//! transaction's start: read by it, an entry stays live for the whole of a long transaction.)

use std::time::Duration;

use processor::state::{
    EnhancedPostgresBackend, IsolationLevel, PostgresTransaction, StateBackend, StateError,
    StateResult,
};
use serde_json::json;

use crate::support;

/// How long the test entries live, and how long into the transaction they are looked at.
const TTL: Duration = Duration::from_millis(300);
const LATER: Duration = Duration::from_millis(800);

async fn backend(tag: &str) -> EnhancedPostgresBackend {
    // Cleanup would remove the expired entries behind the test's back.
    EnhancedPostgresBackend::new(support::config(tag).with_expired_cleanup(false))
        .await
        .unwrap()
}

/// Puts `key` with the short TTL and a metadata tag, outside any transaction.
async fn put_short_lived(b: &EnhancedPostgresBackend, key: &[u8]) -> i64 {
    b.put_entry(key, b"old", json!({"tag": "short"}), Some(TTL))
        .await
        .unwrap()
}

/// What a transaction sees of `key` (expired by now on the statement's clock): every read
/// must find it gone, and writes must treat it as absent.
async fn sees_it_gone(tx: &mut PostgresTransaction, key: &[u8]) -> StateResult<()> {
    assert_eq!(tx.get(key).await?, None, "get");
    assert_eq!(tx.get_entry(key).await?.map(|e| e.key), None, "get_entry");
    assert!(!tx.contains(key).await?, "contains");
    assert_eq!(tx.count().await?, 0, "count");
    assert!(tx.list_keys(b"").await?.is_empty(), "list_keys");
    assert!(
        tx.query_by_metadata("tag", &json!("short"))
            .await?
            .is_empty(),
        "query_by_metadata"
    );
    // A compare-and-set on the expired value fails (nothing is there)...
    assert!(
        !tx.compare_and_set(key, Some(b"old"), b"cas").await?,
        "compare_and_set on an expired value"
    );
    // ...and a create-only versioned put over it succeeds.
    tx.put_with_version(key, b"new", None).await?;
    assert_eq!(tx.get(key).await?, Some(b"new".to_vec()));
    Ok(())
}

/// Runs the check at each isolation level a stream processor uses, with the transaction's
/// first statement (which fixes `now()`) taken before the entry expires.
#[tokio::test]
async fn an_entry_expires_inside_a_long_transaction() {
    for level in [
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
    ] {
        let b = backend("expiry_tx").await;
        put_short_lived(&b, b"k").await;
        let mut tx = b.begin_transaction(level).await.unwrap();
        assert_eq!(
            tx.get(b"k").await.unwrap(),
            Some(b"old".to_vec()),
            "{level:?}"
        );
        tokio::time::sleep(LATER).await;
        if let Err(e) = sees_it_gone(&mut tx, b"k").await {
            panic!("{level:?}: {e}");
        }
        tx.commit().await.unwrap();
        assert_eq!(b.get(b"k").await.unwrap(), Some(b"new".to_vec()));
    }
}

/// The same in the retrying closure form.
#[tokio::test]
async fn an_entry_expires_inside_a_transaction_closure() {
    let b = backend("expiry_closure").await;
    put_short_lived(&b, b"k").await;
    b.transaction(IsolationLevel::RepeatableRead, |tx| {
        Box::pin(async move {
            assert!(tx.contains(b"k").await?);
            tokio::time::sleep(LATER).await;
            sees_it_gone(tx, b"k").await
        })
    })
    .await
    .unwrap();
}

/// A TTL set inside a transaction counts from its statement, and the entry expires while the
/// transaction goes on.
#[tokio::test]
async fn a_ttl_set_inside_a_transaction_runs_on_the_same_clock() {
    let b = backend("expiry_in_tx").await;
    let mut tx = b
        .begin_transaction(IsolationLevel::ReadCommitted)
        .await
        .unwrap();
    assert_eq!(tx.count().await.unwrap(), 0);
    // Set 500 ms into the transaction: the entry lives until 800 ms, not 300 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.put_entry(b"k", b"old", json!({"tag": "short"}), Some(TTL))
        .await
        .unwrap();
    assert!(tx.contains(b"k").await.unwrap(), "live right after the put");
    tokio::time::sleep(LATER).await;
    sees_it_gone(&mut tx, b"k").await.unwrap();
    tx.rollback().await.unwrap();
}

/// Outside transactions nothing changes: the entry is gone once its TTL has passed.
#[tokio::test]
async fn an_entry_expires_outside_transactions() -> Result<(), StateError> {
    let b = backend("expiry_plain").await;
    put_short_lived(&b, b"k").await;
    tokio::time::sleep(LATER).await;
    assert_eq!(b.get(b"k").await?, None);
    assert!(!b.contains(b"k").await?);
    b.put_with_version(b"k", b"new", None).await?;
    Ok(())
}
