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
//! - A group carries at most [`MAX_GROUP_BYTES`] of keys, values and metadata, and a put of
//!   more than [`ALONE_BYTES`] never joins one: one member's size never makes a statement the
//!   server refuses for all of them.
//! - Each caller gets its own result: its own version. The group's statement waits for no
//!   row lock longer than a moment (its `lock_timeout`, see `statements.rs`), so one member's
//!   locked row does not hold the others. If the server refuses the group's statement (a
//!   locked row, one entry broke a constraint, a serialization failure), nothing of it was
//!   written, and every member runs its put alone, within its own deadline, getting its own
//!   result or error. If the outcome is unknown (the connection failed, the operation timed
//!   out), every member gets an outcome-unknown error, and its session's next write waits
//!   until the group's statement is settled (see the `settle` module).
//! - Each member holds a [`Claim`]: the group's leader claims its members only once it has a
//!   connection, right before sending. A caller that gives up before its claim (its future
//!   dropped, its deadline passed) is left out of its group: nothing is written for it, and
//!   it fails with a plain timeout. A caller that gives up after is held in its session until
//!   the group's statement is settled.
//!
//! Gets coalesce the same way (without the flush, the saving is the server's work per
//! statement): a get that finds [`IN_FLIGHT`] lookups running queues, and the waiting gets
//! are answered by one statement. Only where every read goes to the primary (no read
//! splitting): a replica's answer depends on each caller's read-your-writes floor.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::state::error::StateError;
use crate::state::pool::settle::Settled;

/// Put statements running at once before further puts queue and are combined.
pub(crate) const IN_FLIGHT: usize = 2;
/// How long a queue's leader waits for a statement slot before sending its group without one.
/// Slots normally free within milliseconds; statements that hold them longer are waiting for
/// row locks (perhaps held by a transaction whose own task is queued here), and the queue must
/// not wait for them to the operation timeout.
pub(crate) const SLOT_WAIT: Duration = Duration::from_millis(500);
/// Entries in one combined statement, at most.
pub(crate) const MAX_GROUP: usize = 1_000;
/// Bytes (keys, values, metadata) in one combined statement, at most (a group of one may be
/// larger): far below the server's 1 GiB message limit.
pub(crate) const MAX_GROUP_BYTES: usize = 16 << 20;
/// A put of more bytes than this runs alone, never in a group.
pub(crate) const ALONE_BYTES: usize = 1 << 20;

/// What a queued call carries to its group.
pub(crate) trait Item {
    /// The key it concerns.
    fn key(&self) -> &[u8];
    /// Whether a group may hold its key only once (writes: yes; reads: no).
    const DISTINCT: bool;
    /// What it adds to a combined statement, in bytes.
    fn bytes(&self) -> usize;
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
    fn bytes(&self) -> usize {
        // The metadata's size is counted as the server receives it, roughly: a small object
        // costs little, and the size of a large one is checked before it gets here.
        self.key.len() + self.value.len() + metadata_bytes(&self.metadata)
    }
}

/// About how many bytes `metadata` takes as JSON text.
fn metadata_bytes(metadata: &serde_json::Value) -> usize {
    match metadata {
        serde_json::Value::Object(m) if m.is_empty() => 2,
        serde_json::Value::Null => 4,
        other => other.to_string().len(),
    }
}

/// The key a get looks up.
pub(crate) struct Lookup(pub Vec<u8>);

impl Item for Lookup {
    fn key(&self) -> &[u8] {
        &self.0
    }
    const DISTINCT: bool = false;
    fn bytes(&self) -> usize {
        self.0.len()
    }
}

/// Where a queued call stands: waiting, sent in its group's statement, or given up.
#[derive(Default)]
pub(crate) struct Claim {
    state: AtomicU8,
    /// Fires once the group's statement is settled (set before the claim is sent).
    settled: OnceLock<Arc<Settled>>,
}

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const GONE: u8 = 2;

impl Claim {
    /// For the leader, right before sending: takes the call into a statement that settles
    /// with `settled`. `false` if its caller gave up first (it must be left out).
    pub fn send(&self, settled: &Arc<Settled>) -> bool {
        let _ = self.settled.set(settled.clone());
        self.state
            .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// For the caller giving up: `None` if the call was not sent (and now never will be);
    /// else what fires once its statement is settled.
    pub fn give_up(&self) -> Option<Arc<Settled>> {
        match self
            .state
            .compare_exchange(QUEUED, GONE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(GONE) => None,
            Err(_) => self.settled.get().cloned(),
        }
    }

    /// Whether the call was sent in its group's statement.
    pub fn was_sent(&self) -> bool {
        self.state.load(Ordering::Acquire) == SENT
    }

    /// What fires once the call's statement is settled, if it was sent.
    pub fn settled(&self) -> Option<Arc<Settled>> {
        self.was_sent()
            .then(|| self.settled.get().cloned())
            .flatten()
    }

    fn is_gone(&self) -> bool {
        self.state.load(Ordering::Acquire) == GONE
    }
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
    pub claim: Arc<Claim>,
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
        claim: Arc<Claim>,
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
        let claim = Arc::new(Claim::default());
        q.waiting.push_back(Waiting {
            item: item(),
            claim: claim.clone(),
            reply: tx,
        });
        let lead = !q.led;
        q.led = true;
        Admission::Queued {
            reply: rx,
            lead,
            claim,
        }
    }

    /// For the leader: waits for a statement slot, then takes the next group (in arrival
    /// order, at most [`MAX_GROUP`] calls and [`MAX_GROUP_BYTES`] (one call may be larger),
    /// each key once for [`Item::DISTINCT`] items, without calls whose callers gave up). `None` when nothing is left: the leader's work is done,
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
        let mut bytes = 0;
        let mut rest = VecDeque::new();
        // Once the group is full, later calls wait for the next one in their order: one that
        // was passed over must not be overtaken by a later call of the same key.
        let mut full = false;
        while let Some(w) = q.waiting.pop_front() {
            if w.reply.is_closed() || w.claim.is_gone() {
                continue;
            }
            let size = w.item.bytes();
            full = full
                || group.len() >= MAX_GROUP
                || (!group.is_empty() && bytes + size > MAX_GROUP_BYTES);
            let passed = full || (T::DISTINCT && keys.contains(w.item.key()));
            if !passed {
                if T::DISTINCT {
                    keys.insert(w.item.key().to_vec());
                }
                bytes += size;
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

    fn entry(key: &str, size: usize) -> Entry {
        Entry {
            key: key.as_bytes().to_vec(),
            value: vec![0; size],
            metadata: serde_json::Value::Null,
            ttl_us: None,
        }
    }

    #[tokio::test]
    async fn puts_run_alone_until_the_slots_are_taken_then_queue_in_groups_of_distinct_keys() {
        let c: Coalescer<Entry, Reply> = Coalescer::default();
        let slots: Vec<_> = (0..IN_FLIGHT)
            .map(|_| match c.admit(|| entry("x", 0)) {
                Admission::Alone(s) => s,
                Admission::Queued { .. } => panic!("a free slot runs alone"),
            })
            .collect();
        let mut replies = Vec::new();
        for (i, k) in ["a", "b", "a", "c"].iter().enumerate() {
            match c.admit(|| entry(k, 0)) {
                Admission::Queued { reply, lead, .. } => {
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
        let _e = match c.admit(|| entry("e", 0)) {
            Admission::Queued { lead, reply, .. } => {
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
        assert!(matches!(c.admit(|| entry("d", 0)), Admission::Alone(_)));
    }

    #[tokio::test]
    async fn groups_stay_under_their_byte_limit_and_leave_out_callers_who_gave_up() {
        let c: Coalescer<Entry, Reply> = Coalescer::default();
        let _slots: Vec<_> = (0..IN_FLIGHT).map(|_| c.admit(|| entry("x", 0))).collect();
        let third = MAX_GROUP_BYTES / 3;
        let mut claims = Vec::new();
        let mut replies = Vec::new();
        for (k, size) in [("a", third), ("b", third), ("c", third), ("d", 1), ("e", 1)] {
            match c.admit(|| entry(k, size)) {
                Admission::Queued { reply, claim, .. } => {
                    claims.push(claim);
                    replies.push(reply);
                }
                Admission::Alone(_) => panic!("no slot is free"),
            }
        }
        // e's caller gave up while it waited: never sent.
        assert!(claims[4].give_up().is_none());
        drop(_slots);
        let keys = |g: &[Waiting<Entry, Reply>]| -> Vec<String> {
            g.iter()
                .map(|w| String::from_utf8_lossy(&w.item.key).into_owned())
                .collect()
        };
        let (_s1, g1) = c.next_group().await.unwrap();
        assert_eq!(
            keys(&g1),
            ["a", "b"],
            "a third entry would pass the byte limit, and d waits behind c"
        );
        let (_s2, g2) = c.next_group().await.unwrap();
        assert_eq!(keys(&g2), ["c", "d"], "e gave up: left out");
        // Claimed right before sending: a caller who gives up afterwards learns it was sent.
        let settled = Settled::new();
        assert!(g2.iter().all(|w| w.claim.send(&settled)));
        assert!(claims[2].give_up().is_some(), "c was sent");
        assert!(!claims[4].send(&settled), "e is never sent");
    }
}
