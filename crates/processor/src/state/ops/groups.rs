//! Running coalesced calls (see the `coalesce` module for the queues): the waiting side of
//! a queued put or get, the queues' leaders, and the combined statements.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::state::error::{StateError, StateResult};
use crate::state::ops::coalesce::{Claim, Entry, Found, Lookup, Reply, Waiting};
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::Use;
use crate::state::pool::context::bounded;
use crate::state::pool::settle::{SessionFence, Settled, Watch};
use crate::state::routing::causal::Session;
use crate::state::stats::operation::{Kind, Op};

impl Store {
    /// Waits for a queued get's answer (starting the queue's leader if `lead`); runs the get
    /// alone (`alone`) if its group's lookup failed.
    pub(crate) async fn get_queued<F, Fut>(
        &self,
        reply: oneshot::Receiver<Found>,
        lead: bool,
        alone: F,
    ) -> StateResult<Option<Vec<u8>>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = StateResult<Option<Vec<u8>>>>,
    {
        if lead {
            tokio::spawn(self.clone().lead_gets());
        }
        let start = Instant::now();
        if let Ok(Ok(Found::Value(value))) = tokio::time::timeout(self.ctx.limit, reply).await {
            self.ctx.stats.record(Op::Get, 1, start.elapsed(), None);
            self.ctx.stats.coalesced(Kind::Get);
            return Ok(value);
        }
        // The group's lookup failed or never ran: a read runs again safely, within what is
        // left of the operation timeout. Boxed: this rare path would otherwise make every
        // get's future as large as two reads.
        bounded(self.ctx.left(start), Box::pin(alone())).await
    }

    /// The leader of the get queue (see [`lead_puts`](Self::lead_puts)).
    async fn lead_gets(self) {
        let leading = self.lookups.leading();
        while let Some((slot, group)) = self.lookups.next_group().await {
            let store = self.clone();
            tokio::spawn(async move {
                store.read_group(group).await;
                drop(slot);
            });
        }
        leading.finished();
    }

    /// Answers a group of gets with one lookup on the primary (each asks again alone if it
    /// fails).
    async fn read_group(&self, group: Vec<Waiting<Lookup, Found>>) {
        let keys: Vec<&[u8]> = group.iter().map(|w| w.item.0.as_slice()).collect();
        let found = self
            .ctx
            .bounded(async {
                let mut conn = self.ctx.primary.connection(Use::Point).await?;
                conn.run(|c| c.get_many(&keys)).await
            })
            .await;
        let values: HashMap<Vec<u8>, Vec<u8>> = match found {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => {
                tracing::debug!(error = %e, gets = group.len(), "a get group failed; its gets run alone");
                for w in group {
                    w.answer(Found::RunAlone);
                }
                return;
            }
        };
        self.router.primary_read(group.len() as u64);
        for w in group {
            let value = values.get(&w.item.0).cloned();
            w.answer(Found::Value(value));
        }
    }

    /// Waits for a queued put's result (starting the queue's leader if `lead`), recording its
    /// WAL position in `session`; runs the put alone (`alone`, given what is left of the
    /// operation timeout) if the server refused its group.
    ///
    /// Given up (its deadline passed, or this future dropped) before its group's leader
    /// claimed it, the put is never sent: a plain timeout. Given up after, its outcome is
    /// unknown: it is held in `session` until the group's statement is settled (see the
    /// `coalesce` and `settle` modules).
    pub(crate) async fn put_queued<F, Fut>(
        &self,
        session: &Session,
        mut reply: oneshot::Receiver<Reply>,
        lead: bool,
        claim: Arc<Claim>,
        alone: F,
    ) -> StateResult<i64>
    where
        F: FnOnce(Duration) -> Fut,
        Fut: Future<Output = StateResult<i64>>,
    {
        if lead {
            tokio::spawn(self.clone().lead_puts());
        }
        let mut waiting = GiveUp {
            claim: &claim,
            session,
            armed: true,
        };
        let mark = self.router.tracks_writes().then(|| session.write());
        let start = Instant::now();
        let reply = match tokio::time::timeout(self.ctx.limit, &mut reply).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Reply::Failed(group_ended(&claim)),
            Err(_) => match claim.give_up() {
                None => Reply::Failed(StateError::op_timeout(self.ctx.limit).not_sent("put")),
                // Settled meanwhile: the answer is on its way.
                Some(s) if s.is_done() => reply.try_recv().unwrap_or_else(|_| {
                    Reply::Failed(StateError::OutcomeUnknown(
                        "the put's group ended without a result".into(),
                    ))
                }),
                Some(s) => {
                    session.settling.hold(s);
                    Reply::Failed(StateError::OutcomeUnknown(format!(
                        "the put was sent in a group that did not complete within the \
                         operation timeout ({:?}); it may or may not have been applied, and is \
                         settled before this session's next write is sent",
                        self.ctx.limit
                    )))
                }
            },
        };
        waiting.armed = false;
        match reply {
            Reply::Written { version, lsn } => {
                self.ctx.stats.record(Op::Upsert, 1, start.elapsed(), None);
                self.ctx.stats.coalesced(Kind::Put);
                if let (Some(mark), Some(lsn)) = (mark, lsn) {
                    mark.learned(lsn);
                }
                Ok(version)
            }
            Reply::RunAlone => {
                if let Some(mark) = mark {
                    mark.nothing_written();
                }
                alone(self.ctx.left(start)).await
            }
            Reply::Failed(e) => {
                // Sent and not settled: held (see above).
                if let Some(s) = claim.settled() {
                    session.settling.hold(s);
                }
                self.ctx
                    .stats
                    .record(Op::Upsert, 1, start.elapsed(), Some(e.kind()));
                Err(e)
            }
        }
    }

    /// The leader of the put queue: sends its groups until it is empty, each as one
    /// statement on a task of its own holding a statement slot.
    async fn lead_puts(self) {
        let leading = self.coalescer.leading();
        while let Some((slot, group)) = self.coalescer.next_group().await {
            let store = self.clone();
            tokio::spawn(async move {
                store.write_group(group).await;
                drop(slot);
            });
        }
        leading.finished();
    }

    /// Writes a group of puts in one statement and answers each (see [`Reply`]); its members
    /// are claimed once the connection is there, right before sending, and the group's
    /// [`Settled`] fires once its statement is settled.
    async fn write_group(&self, mut group: Vec<Waiting<Entry, Reply>>) {
        // Key order: the lock order of every batch.
        group.sort_by(|a, b| a.item.key.cmp(&b.item.key));
        let tracks = self.router.tracks_writes();
        let settled = Settled::new();
        let fence = SessionFence::default();
        let watch = Watch::new(&fence);
        let outcome = self
            .ctx
            .bounded(async {
                let mut conn = self.ctx.primary.connection(Use::Point).await?;
                // Those whose callers gave up meanwhile are left out: nothing is sent for them.
                group.retain(|w| w.claim.send(&settled));
                if group.is_empty() {
                    return Ok(None);
                }
                let keys: Vec<&[u8]> = group.iter().map(|w| w.item.key.as_slice()).collect();
                let values: Vec<&[u8]> = group.iter().map(|w| w.item.value.as_slice()).collect();
                let metadata: Vec<&serde_json::Value> =
                    group.iter().map(|w| &w.item.metadata).collect();
                let ttls: Vec<Option<i64>> = group.iter().map(|w| w.item.ttl_us).collect();
                let written = conn
                    .run_watched(Some(&watch), |c| {
                        c.upsert_many(&keys, &values, &metadata, &ttls)
                    })
                    .await;
                if written.is_err() && conn.is_closed() {
                    conn.lost(&watch);
                }
                let lsn = match (&written, tracks) {
                    (Ok(_), true) => conn.run(|c| c.insert_lsn()).await.ok(),
                    _ => None,
                };
                Ok(Some((written, lsn)))
            })
            .await;
        let outcome = match outcome {
            Ok(None) => return settled.fire(),
            Ok(Some((written, lsn))) => written.map(|rows| (rows, lsn)),
            Err(e) => Err(e),
        };
        answer(group, outcome, watch.is_unsettled());
        // Answered; now the group's statement must be settled before its members' sessions
        // send their next writes.
        fence.wait().await;
        settled.fire();
    }
}

/// Each key of a group and the version its statement wrote.
type Written = Vec<(Vec<u8>, i64)>;

/// Answers each member of a group from its statement's outcome: its version; a refusal (nothing
/// written: each runs alone); or the error, as an unknown outcome when the statement was sent
/// and is `unknown` (not settled).
fn answer(
    group: Vec<Waiting<Entry, Reply>>,
    outcome: StateResult<(Written, Option<u64>)>,
    unknown: bool,
) {
    match outcome {
        Ok((written, lsn)) => {
            let versions: HashMap<Vec<u8>, i64> = written.into_iter().collect();
            for w in group {
                let reply = match versions.get(&w.item.key) {
                    Some(&version) => Reply::Written { version, lsn },
                    None => Reply::Failed(StateError::StorageError {
                        message: "the put's group returned no version for its key".into(),
                        sqlstate: None,
                    }),
                };
                w.answer(reply);
            }
        }
        // Refused by the server: nothing was written (a member's row locked past the
        // group's lock_timeout, a constraint, a serialization failure).
        Err(e) if !unknown && e.is_refusal() => {
            tracing::debug!(error = %e, puts = group.len(), "a put group was refused; its puts run alone");
            for w in group {
                w.answer(Reply::RunAlone);
            }
        }
        Err(e) => {
            for w in group {
                let e = if unknown {
                    StateError::OutcomeUnknown(format!(
                        "the put was sent in a group, then {e}; it may or may not have been \
                         applied, and is settled before this session's next write is sent"
                    ))
                } else {
                    e.shared()
                };
                w.answer(Reply::Failed(e));
            }
        }
    }
}

/// A queued put's caller waiting for its reply; dropped while armed (the caller gave up), it
/// leaves the put out of its group if it was not sent yet, else holds it in the session until
/// the group's statement is settled.
struct GiveUp<'a> {
    claim: &'a Claim,
    session: &'a Session,
    armed: bool,
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(s) = self.claim.give_up() {
                self.session.settling.hold(s);
            }
        }
    }
}

/// The error of a put whose group's leader ended without answering (its runtime is shutting
/// down, or it panicked): nothing written if the put was never sent, else an unknown outcome
/// (the caller holds it in its session until settled).
fn group_ended(claim: &Claim) -> StateError {
    match claim.give_up() {
        None => StateError::Connection {
            message: "the put's group ended before the put was sent; nothing was written".into(),
            sqlstate: None,
        },
        Some(_) => StateError::OutcomeUnknown(
            "the put's group ended without a result after the put was sent; it may or may not \
             have been applied, and is settled before this session's next write is sent"
                .into(),
        ),
    }
}
