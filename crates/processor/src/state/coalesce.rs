//! Coalescing: concurrent puts combined into one multi-row statement, and concurrent gets
//! into one `key = ANY($1)` lookup.
//!
//! Each autocommit put waits for its own commit to reach disk. When many tasks write at once,
//! that flush is the cost: so a put that finds [`IN_FLIGHT`] put statements already running
//! (or puts already waiting) does not send its own. It queues, and the queue's *leader* (a
//! task spawned for it, so no caller's cancellation can strand the others) sends the waiting
//! puts as one statement as soon as one of the running statements completes: one commit and
//! one flush for the whole group. A put that finds room runs alone at once, so a lone put's
//! latency does not change; throughput grows with concurrency.
//!
//! - Input errors are found before a put joins a queue (the caller checks its entry first).
//! - A group holds each key once (a second put of a key waits for a later group), so one
//!   statement never writes a row twice. Puts of one key waiting at the same time are
//!   concurrent calls, and like any two concurrent puts they may be written in either order.
//!   A group is written in key order (the lock order of every batch).
//! - A leader waits at most [`SLOT_WAIT`] for a statement slot: if the running statements
//!   are stuck (waiting for row locks), the group goes without one rather than wait for them.
//! - Each caller gets its own result: its own version. If the server refuses the group's
//!   statement (one entry broke a constraint, a serialization failure), nothing of it was
//!   written, and every member runs its put alone, getting its own result or error. If the
//!   outcome is unknown (the connection failed, the operation timed out), every member gets
//!   that error.
//! - A caller that gives up while it waits is left out of its group: nothing is written for it.
//!
//! Gets coalesce the same way (without the flush, the saving is the server's work per
//! statement): a get that finds [`IN_FLIGHT`] lookups running queues, and the waiting gets
//! are answered by one statement. Only where every read goes to the primary (no read
//! splitting): a replica's answer depends on each caller's read-your-writes floor.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::state::error::StateError;

/// Put statements running at once before further puts queue and are combined.
pub(crate) const IN_FLIGHT: usize = 2;
/// How long a queue's leader waits for a statement slot before sending its group without one.
/// Slots normally free within milliseconds; statements that hold them longer are waiting for
/// row locks (perhaps held by a transaction whose own task is queued here), and the queue must
/// not wait for them to the operation timeout.
pub(crate) const SLOT_WAIT: Duration = Duration::from_secs(2);
/// Entries in one combined statement, at most.
pub(crate) const MAX_GROUP: usize = 1_000;

/// What a queued call carries to its group.
pub(crate) trait Item {
    /// The key it concerns.
    fn key(&self) -> &[u8];
    /// Whether a group may hold its key only once (writes: yes; reads: no).
    const DISTINCT: bool;
}

/// An entry a put writes, owned (it travels to the group's leader).
pub(crate) struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub metadata: serde_json::Value,
    pub ttl_us: Option<i64>,
}

impl Item for Entry {
    fn key(&self) -> &[u8] {
        &self.key
    }
    const DISTINCT: bool = true;
}

/// The key a get looks up.
pub(crate) struct Lookup(pub Vec<u8>);

impl Item for Lookup {
    fn key(&self) -> &[u8] {
        &self.0
    }
    const DISTINCT: bool = false;
}

/// What a queued put learns from its group.
pub(crate) enum Reply {
    /// Written, with this version; the WAL position after the group's commit, if it was read.
    Written { version: i64, lsn: Option<u64> },
    /// The server refused the group's statement, so nothing was written: run the put alone.
    RunAlone,
    /// The group's outcome is unknown (or it could not run).
    Failed(StateError),
}

/// What a queued get learns from its group.
pub(crate) enum Found {
    /// The live value, if any.
    Value(Option<Vec<u8>>),
    /// The group's lookup failed: run the get alone.
    RunAlone,
}

/// A queued call.
pub(crate) struct Waiting<T, R> {
    pub item: T,
    reply: oneshot::Sender<R>,
}

impl<T, R> Waiting<T, R> {
    /// Sends the call's result (ignored if its caller gave up meanwhile).
    pub fn answer(self, reply: R) {
        let _ = self.reply.send(reply);
    }
}

/// How a call proceeds.
pub(crate) enum Admission<R> {
    /// Run alone now, holding this statement slot until done.
    Alone(OwnedSemaphorePermit),
    /// Queued: wait for the reply. With `lead`, the caller must start the queue's leader.
    Queued {
        reply: oneshot::Receiver<R>,
        lead: bool,
    },
}

struct Queue<T, R> {
    waiting: VecDeque<Waiting<T, R>>,
    /// A leader is running for this queue.
    led: bool,
}

/// The queue of one kind of call (puts, or gets) of one backend (all its handles).
pub(crate) struct Coalescer<T, R> {
    slots: Arc<Semaphore>,
    queue: Mutex<Queue<T, R>>,
}

impl<T: Item, R> Default for Coalescer<T, R> {
    fn default() -> Self {
        Coalescer {
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                led: false,
            }),
        }
    }
}

impl<T: Item, R> Coalescer<T, R> {
    fn lock(&self) -> MutexGuard<'_, Queue<T, R>> {
        // Each change under the lock is a push, a pop or a flag: never half done.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a call of `item` (made only if it must queue): alone if a statement slot is
    /// free and nothing waits, else queued.
    pub fn admit(&self, item: impl FnOnce() -> T) -> Admission<R> {
        let mut q = self.lock();
        if q.waiting.is_empty() {
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return Admission::Alone(slot);
            }
        }
        let (tx, rx) = oneshot::channel();
        q.waiting.push_back(Waiting {
            item: item(),
            reply: tx,
        });
        let lead = !q.led;
        q.led = true;
        Admission::Queued { reply: rx, lead }
    }

    /// For the leader: waits for a statement slot, then takes the next group (in arrival
    /// order, at most [`MAX_GROUP`], each key once for [`Item::DISTINCT`] items, without
    /// calls whose callers gave up). `None` when nothing is left: the leader's work is done,
    /// and the next call to queue starts a new one.
    pub async fn next_group(&self) -> Option<(Option<OwnedSemaphorePermit>, Vec<Waiting<T, R>>)> {
        // A slot if one frees soon; else the group goes without (see SLOT_WAIT).
        let slot = tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let mut q = self.lock();
        let mut group: Vec<Waiting<T, R>> = Vec::new();
        let mut keys: HashSet<Vec<u8>> = HashSet::new();
        let mut rest = VecDeque::new();
        while let Some(w) = q.waiting.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            let fits = group.len() < MAX_GROUP && !(T::DISTINCT && keys.contains(w.item.key()));
            if fits {
                if T::DISTINCT {
                    keys.insert(w.item.key().to_vec());
                }
                group.push(w);
            } else {
                rest.push_back(w);
            }
        }
        q.waiting = rest;
        // The leader leads until it finds nothing to send: only then may the next queued call
        // start another (one leader at a time; a leader that handed its queue over at every
        // pause while calls kept coming would leave leaders piling up behind the slots).
        if group.is_empty() {
            q.led = false;
            return None;
        }
        Some((slot, group))
    }

    /// Marks the start of a leader's work; see [`Leading`].
    pub fn leading(&self) -> Leading<'_, T, R> {
        Leading {
            coalescer: self,
            finished: false,
        }
    }

    /// Puts waiting in the queue now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// A leader at work. If it ends before [`next_group`](Coalescer::next_group) found nothing
/// left (its task was cancelled, its runtime shut down), dropping this hands the queue over:
/// the next call to queue starts a new leader.
pub(crate) struct Leading<'a, T, R> {
    coalescer: &'a Coalescer<T, R>,
    finished: bool,
}

impl<T, R> Leading<'_, T, R> {
    /// The leader's work ended normally (the queue was handed over then).
    pub fn finished(mut self) {
        self.finished = true;
    }
}

impl<T, R> Drop for Leading<'_, T, R> {
    fn drop(&mut self) {
        if !self.finished {
            let mut q = self
                .coalescer
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            q.led = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            metadata: serde_json::Value::Null,
            ttl_us: None,
        }
    }

    #[tokio::test]
    async fn puts_run_alone_until_the_slots_are_taken_then_queue_in_groups_of_distinct_keys() {
        let c: Coalescer<Entry, Reply> = Coalescer::default();
        let slots: Vec<_> = (0..IN_FLIGHT)
            .map(|_| match c.admit(|| entry("x")) {
                Admission::Alone(s) => s,
                Admission::Queued { .. } => panic!("a free slot runs alone"),
            })
            .collect();
        let mut replies = Vec::new();
        for (i, k) in ["a", "b", "a", "c"].iter().enumerate() {
            match c.admit(|| entry(k)) {
                Admission::Queued { reply, lead } => {
                    assert_eq!(lead, i == 0, "the first queued put starts the leader");
                    replies.push(reply);
                }
                Admission::Alone(_) => panic!("no slot is free"),
            }
        }
        // A caller that gives up is left out.
        drop(replies.remove(3));
        assert_eq!(c.waiting(), 4);
        drop(slots);
        let (_slot, group) = c.next_group().await.unwrap();
        let keys: Vec<&[u8]> = group.iter().map(|w| w.item.key.as_slice()).collect();
        assert_eq!(
            keys,
            vec![&b"a"[..], b"b"],
            "each key once, in arrival order"
        );
        let (_slot2, group) = c.next_group().await.unwrap();
        assert_eq!(
            group.len(),
            1,
            "the second put of a waits for the next group"
        );
        assert_eq!(group[0].item.key, b"a");
        assert_eq!(c.waiting(), 0);
        // Queued while the slots are busy: the running leader takes it (no second leader).
        let _e = match c.admit(|| entry("e")) {
            Admission::Queued { lead, reply } => {
                assert!(!lead, "one leader at a time");
                reply
            }
            Admission::Alone(_) => panic!("a put waits behind the queue's leader"),
        };
        drop(_slot);
        let (_slot3, group) = c.next_group().await.unwrap();
        assert_eq!(group.len(), 1);
        drop((_slot2, _slot3));
        // Nothing left: the leader's work ends, and a put with a free slot runs alone again.
        assert!(c.next_group().await.is_none());
        assert!(matches!(c.admit(|| entry("d")), Admission::Alone(_)));
    }
}
