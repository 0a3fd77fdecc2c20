//! The retry loop of [`transaction`](crate::state::EnhancedPostgresBackend::transaction): a
//! whole transaction run again after a serialization failure, a deadlock or a connection lost
//! before COMMIT was sent, with jittered exponential backoff.

use std::future::Future;
use std::time::Duration;

use crate::state::error::{sqlstate, ErrorKind, StateError, StateResult};
use crate::state::retry::backoff;
use crate::state::stats::counters::{Stats, TxEvent};
use crate::state::transaction::tx::{PostgresTransaction, TxFuture};

/// Runs `f` in a transaction from `begin` and commits, again after a failure
/// [`worth_retrying`], up to `max_retries` times, waiting [`backoff`] from `base` between
/// attempts. Any other error is returned at once, the transaction rolled back.
pub(crate) async fn run<T, F, B, BF>(
    mut begin: B,
    mut f: F,
    max_retries: u32,
    base: Duration,
    stats: &Stats,
) -> StateResult<T>
where
    B: FnMut() -> BF,
    BF: Future<Output = StateResult<PostgresTransaction>>,
    F: for<'t> FnMut(&'t mut PostgresTransaction) -> TxFuture<'t, T>,
{
    let mut attempt = 0u32;
    loop {
        let result = match begin().await {
            Ok(mut tx) => match f(&mut tx).await {
                Ok(value) => tx.commit().await.map(|()| value),
                Err(e) => {
                    // A failed rollback only means the connection is discarded.
                    let _ = tx.rollback().await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match result {
            Err(e) if attempt < max_retries && worth_retrying(&e) => {
                let wait = backoff(base, attempt);
                tracing::debug!(error = %e, attempt, ?wait, "retrying transaction");
                stats.tx(TxEvent::Retried);
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Whether the retry loop may run a failed transaction again: serialization failure,
/// deadlock, or a connection lost before COMMIT was sent.
pub(crate) fn worth_retrying(e: &StateError) -> bool {
    match e {
        StateError::CommitOutcomeUnknown(_) => false,
        _ if matches!(
            e.sqlstate(),
            Some(sqlstate::SERIALIZATION_FAILURE | sqlstate::DEADLOCK_DETECTED)
        ) =>
        {
            true
        }
        _ => e.kind() == ErrorKind::Connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification() {
        let ser = StateError::TransactionFailed {
            message: "x".into(),
            sqlstate: Some("40001".into()),
        };
        assert!(worth_retrying(&ser));
        let conn = StateError::Connection {
            message: "x".into(),
            sqlstate: None,
        };
        assert!(worth_retrying(&conn));
        assert!(!worth_retrying(&StateError::CommitOutcomeUnknown(
            "x".into()
        )));
        assert!(!worth_retrying(&StateError::ConcurrentModification {
            key: vec![1]
        }));
        assert!(!worth_retrying(&StateError::InvalidInput("x".into())));
    }
}
