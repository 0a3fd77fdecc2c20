//! Fencing tokens against the local cluster: a stale holder's fence never passes once a later
//! holder acquired the lock, and a new holder waits for a stale holder's fenced transaction.

use std::time::Duration;

use processor::state::{EnhancedPostgresBackend, PostgresLockGuard, StateBackend, StateError};

use crate::coordination::terminate;
use crate::support;

#[tokio::test]
async fn a_stale_fence_never_passes_for_a_later_acquisition() {
    let cfg = support::config("stalefence");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let name = support::unique("stale");
    let writer = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let stale = writer.fence();
    let pid = writer.backend_pid();
    writer.release().await.unwrap();
    // The released session is reused for the next acquisitions of the same name (same server
    // process, and for a reader the same token): the old fence still names another
    // acquisition.
    for shared in [true, false] {
        let g = if shared {
            PostgresLockGuard::new_shared(a.clone_handle(), &name, Duration::ZERO).await
        } else {
            PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO).await
        }
        .unwrap()
        .unwrap();
        assert_eq!(
            g.backend_pid(),
            pid,
            "expected the spare session to be reused"
        );
        let mut tx = a.begin().await.unwrap();
        match tx.check_fence(&stale).await {
            Err(StateError::Fenced { .. }) => {}
            other => panic!("stale fence accepted: {other:?}"),
        }
        tx.check_fence(&g.fence()).await.unwrap();
        tx.rollback().await.unwrap();
        g.release().await.unwrap();
    }
}

#[tokio::test]
async fn a_new_holder_waits_for_a_stale_holders_fenced_transaction() {
    let cfg = support::config("fencewait");
    let a = EnhancedPostgresBackend::new(cfg.clone()).await.unwrap();
    let b = EnhancedPostgresBackend::new(cfg).await.unwrap();
    let name = support::unique("fencewait");
    for shared in [true, false] {
        let writer = PostgresLockGuard::new(a.clone_handle(), &name, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        // The writer passes its fence check, then loses its lock before committing.
        let mut tx = a.begin().await.unwrap();
        tx.check_fence(&writer.fence()).await.unwrap();
        tx.put(b"fenced", if shared { b"w1" } else { b"w2" })
            .await
            .unwrap();
        terminate(writer.backend_pid()).await;
        let next = {
            let (b, name) = (b.clone_handle(), name.clone());
            tokio::spawn(async move {
                let g = if shared {
                    PostgresLockGuard::new_shared(b.clone_handle(), &name, Duration::from_secs(30))
                        .await
                } else {
                    PostgresLockGuard::new(b.clone_handle(), &name, Duration::from_secs(30)).await
                }
                .unwrap()
                .unwrap();
                let seen = b.get(b"fenced").await.unwrap();
                g.release().await.unwrap();
                seen
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !next.is_finished(),
            "the next holder did not wait for the fenced transaction"
        );
        tx.commit().await.unwrap();
        // It starts only after the stale write settled, and sees it.
        let seen = next.await.unwrap();
        assert_eq!(
            seen.as_deref(),
            Some(if shared { &b"w1"[..] } else { &b"w2"[..] })
        );
        drop(writer);
    }
}
