//! Settling abandoned statements: the mechanism behind the outcome contract.
//!
//! A write whose caller gave up after its statement was handed to the driver (the future was
//! dropped, the operation timeout cut it off, or its connection failed while it ran) may still
//! be applied by the server: the driver sends every request it queued, and the server runs what
//! it received. pgstate therefore promises only this: such a write either never takes effect, or
//! takes effect before anything the same session does afterwards is sent. Three pieces keep it:
//!
//! - **Settled**: a one-shot signal for "every statement this stands for has completed on the
//!   server, or never will".
//! - **Drain**: how a connection with an abandoned statement is settled. A probe is sent on the
//!   same connection behind it; replies come back in order, so the probe's reply means
//!   everything before it has completed. While the probe waits (a statement stuck on a row
//!   lock), cancel requests are sent, at growing intervals, until it returns. A closed
//!   connection is settled once its server process is gone: looked up by process id and start
//!   time from a new connection, terminated if still there, and waited for; so is one whose
//!   probe does not come back within `PROBE_LIMIT` (a stopped server process), after it has
//!   been discarded, so that it does not hold a slot of the pool meanwhile. A connection whose
//!   probe came back is clean and goes back to the pool; otherwise it is discarded.
//! - **Session fence** (`SessionFence`): a session's writes not settled yet. Each write of the session (and each
//!   transaction it begins) waits for the fence first, bounded by its own operation timeout;
//!   a write that cannot wait long enough fails with a plain timeout, having sent nothing.
//!   Reads do not wait.
//!
//! Cost: nothing on the normal path (one relaxed load of the fence's count). An abandoned
//! point statement costs one probe round trip on its connection (which then goes back to the
//! pool instead of being reopened) and makes the session's next write wait for it.
//!
//! Behind PgBouncer's transaction pooling the server process of a closed connection cannot be
//! identified, so a write whose connection was lost while it ran is settled at once there: the
//! pooler may still run it (documented in the README).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::state::error::{StateError, StateResult};
use crate::state::stats::operation::Op;
use crate::state::wire::connection::{Connector, PgConn};

/// How long a drain waits for its probe before the first cancel request.
pub(crate) const FIRST_GRACE: Duration = Duration::from_millis(100);
/// The longest wait between two cancel requests.
const MAX_GRACE: Duration = Duration::from_secs(1);
/// How often a drain looks for a closed connection's server process.
const GONE_POLL: Duration = Duration::from_millis(50);

/// Fires once: the statements it stands for have completed on the server, or never will.
#[derive(Default)]
pub(crate) struct Settled {
    done: AtomicBool,
    notify: Notify,
}

impl Settled {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn fire(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

/// The unsettled writes of one session (or of one coalesced group).
#[derive(Default)]
pub(crate) struct SessionFence {
    count: AtomicUsize,
    pending: Mutex<Vec<Arc<Settled>>>,
}

impl SessionFence {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Settled>>> {
        // Each change under the lock is one push or one retain: never half done.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a write that must settle before the session's next one is sent.
    pub fn hold(&self, settled: Arc<Settled>) {
        if settled.is_done() {
            return;
        }
        let mut pending = self.lock();
        pending.push(settled);
        self.count.store(pending.len(), Ordering::Release);
    }

    /// Whether a write is still unsettled.
    pub fn is_open(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0 || {
            let mut pending = self.lock();
            pending.retain(|s| !s.is_done());
            self.count.store(pending.len(), Ordering::Release);
            pending.is_empty()
        }
    }

    /// Waits until every write held when it was called has settled.
    pub async fn wait(&self) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let snapshot: Vec<Arc<Settled>> = {
            let mut pending = self.lock();
            pending.retain(|s| !s.is_done());
            self.count.store(pending.len(), Ordering::Release);
            pending.clone()
        };
        for s in snapshot {
            s.wait().await;
        }
    }
}

/// What one write's statements tell their caller: whether one was handed to the driver, and
/// where a statement that may still be applied is held until it settles.
pub(crate) struct Watch<'a> {
    pub fence: &'a SessionFence,
    sent: AtomicBool,
    unsettled: AtomicBool,
}

impl<'a> Watch<'a> {
    pub fn new(fence: &'a SessionFence) -> Self {
        Watch {
            fence,
            sent: AtomicBool::new(false),
            unsettled: AtomicBool::new(false),
        }
    }

    /// A statement was handed to the driver.
    pub fn sent(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }

    /// Whether a statement was handed to the driver.
    pub fn was_sent(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }

    /// A statement may still be applied: it is held in the fence until `settled` fires.
    pub fn unsettled(&self, settled: Arc<Settled>) {
        self.unsettled.store(true, Ordering::Relaxed);
        self.fence.hold(settled);
    }

    /// Whether the outcome of a statement is unknown to the caller.
    pub fn is_unsettled(&self) -> bool {
        self.unsettled.load(Ordering::Relaxed)
    }

    /// A write's result as its caller must see it: an error after its statement was sent, with
    /// the write still unsettled, is [`StateError::OutcomeUnknown`] (the write is held in the
    /// session until it settles); a timeout before anything was sent says so.
    pub fn outcome<T>(&self, op: Op, result: StateResult<T>) -> StateResult<T> {
        match result {
            Err(e) if self.is_unsettled() => Err(match e {
                StateError::OutcomeUnknown(_) | StateError::CommitOutcomeUnknown(_) => e,
                e => StateError::OutcomeUnknown(format!(
                    "the {} was sent, then {e}; it may or may not have been applied, and is settled \
                     before this session's next write is sent",
                    op.name()
                )),
            }),
            Err(e @ StateError::Timeout(_)) if !self.was_sent() => Err(e.not_sent(op.name())),
            other => other,
        }
    }
}

/// How a connection with an abandoned statement was settled (see [`drain`]).
pub(crate) enum Drained {
    /// Its probe came back: everything sent before it has completed, and the connection is
    /// idle and clean.
    Clean,
    /// The server answered the probe with an error: everything before it has completed, but
    /// the connection's state is unknown. Discard it.
    Unfit,
    /// The connection closed, or its probe did not come back in [`PROBE_LIMIT`] (a frozen
    /// server process): discard the connection first, so that it does not hold a slot of the
    /// pool, then wait for [`Gone::wait`] before calling the statements settled.
    Lost(Box<Gone>),
}

/// The longest a drain waits for its probe, cancel requests included, before it gives the
/// connection up and waits for its server process to end instead. A statement cancelled by
/// a request ends within milliseconds; one that does not is on a server process that cannot
/// run (stopped, or cut off from us).
pub(crate) const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// Settles `conn` after a statement on it was abandoned (see the module notes). With
/// `rollback` the probe is a ROLLBACK, which also ends an open transaction.
pub(crate) async fn drain(conn: &PgConn, rollback: bool) -> Drained {
    if !conn.client.is_closed() {
        let probe = conn
            .client
            .simple_query(if rollback { "ROLLBACK" } else { "" });
        tokio::pin!(probe);
        let mut grace = FIRST_GRACE;
        let deadline = tokio::time::Instant::now() + PROBE_LIMIT;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + grace),
                &mut probe,
            )
            .await
            {
                Ok(Ok(_)) => return Drained::Clean,
                // The server answered (a cancel request reached the probe itself): everything
                // before it is done, but a transaction may be left open.
                Ok(Err(e)) if e.as_db_error().is_some() && !conn.client.is_closed() => {
                    return Drained::Unfit
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    let _ = tokio::time::timeout(grace, conn.origin.cancel(&conn.cancel)).await;
                    grace = (grace * 2).min(MAX_GRACE);
                }
            }
        }
    }
    Drained::Lost(Box::new(Gone {
        origin: (*conn.origin).clone(),
        backend: conn.backend,
    }))
}

/// The server process of a discarded connection, to be waited for.
pub(crate) struct Gone {
    origin: Connector,
    backend: Option<(i32, i64)>,
}

impl Gone {
    /// Returns once the server process has ended: checked from new connections (one at a
    /// time, outside the pool), terminated if it is still there. Retries until it can tell.
    /// Without a known process (behind PgBouncer's transaction pooling) it returns at once.
    pub async fn wait(self: Box<Self>) {
        let Some((pid, started)) = self.backend else {
            return;
        };
        let mut pause = GONE_POLL;
        loop {
            if let Ok(client) = self.origin.connect().await {
                let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                           WHERE pid = $1 \
                           AND (extract(epoch FROM backend_start) * 1000000)::int8 = $2";
                loop {
                    match client.query(sql, &[&pid, &started]).await {
                        Ok(rows) if rows.is_empty() => return,
                        Ok(_) => tokio::time::sleep(GONE_POLL).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot look for an abandoned server process");
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_GRACE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_waits_for_what_it_held_when_called_and_only_that() {
        let fence = SessionFence::default();
        assert!(fence.is_open());
        fence.wait().await;
        let first = Settled::new();
        fence.hold(first.clone());
        fence.hold(Settled::new().tap_fire());
        assert!(!fence.is_open());
        let waiter = {
            let fence = Arc::new(fence);
            let f = fence.clone();
            (fence, tokio::spawn(async move { f.wait().await }))
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.1.is_finished(),
            "an unsettled write holds the fence"
        );
        // Held after the wait began: not waited for.
        waiter.0.hold(Settled::new());
        first.fire();
        waiter.1.await.unwrap();
        assert!(!waiter.0.is_open(), "the later write still holds it");
    }

    /// What a write's caller is told: unknown once a sent statement is unsettled, "nothing
    /// written" for a timeout before anything was sent, the error itself otherwise.
    #[test]
    fn a_writes_outcome_follows_what_was_sent_and_settled() {
        let fence = SessionFence::default();
        let timeout = || StateError::op_timeout(Duration::from_secs(1));

        let unsent = Watch::new(&fence);
        let e = unsent
            .outcome::<()>(Op::Upsert, Err(timeout()))
            .unwrap_err();
        assert!(
            matches!(&e, StateError::Timeout(m) if m.contains("nothing was written")),
            "{e}"
        );

        let answered = Watch::new(&fence);
        answered.sent();
        let e = answered
            .outcome::<()>(Op::Upsert, Err(timeout()))
            .unwrap_err();
        assert!(
            matches!(&e, StateError::Timeout(m) if !m.contains("nothing")),
            "{e}"
        );
        assert!(answered.outcome(Op::Upsert, Ok(7)).is_ok());

        let cut = Watch::new(&fence);
        cut.sent();
        let settled = Settled::new();
        cut.unsettled(settled.clone());
        let e = cut.outcome::<()>(Op::Delete, Err(timeout())).unwrap_err();
        assert!(
            matches!(&e, StateError::OutcomeUnknown(m) if m.contains("delete")),
            "{e}"
        );
        assert!(!fence.is_open(), "held in the session until it settles");
        settled.fire();
        assert!(fence.is_open());
    }

    impl Settled {
        fn tap_fire(self: Arc<Self>) -> Arc<Self> {
            self.fire();
            self
        }
    }
}
