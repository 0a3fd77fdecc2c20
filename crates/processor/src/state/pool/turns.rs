//! Turns: callers of a pool are served in the order they asked. A FIFO semaphore with one
//! permit per connection comes before bb8, which alone hands a returned connection to whoever
//! asks next, so a task that gives one back and asks again at once could starve every waiter
//! (measured in BENCHMARKS.md, "the pool's foundation": 1 checkout against 1 433 in 3 s).
//! Also counts the checkouts waiting now, and those that waited, how long, and which gave up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One permit per connection, handed out first come, first served.
pub(crate) struct Turns {
    permits: Arc<Semaphore>,
    /// Callers waiting for a turn now.
    waiting: AtomicUsize,
    /// Callers that had to wait, those that gave up, and their waits in milliseconds.
    waited: AtomicU64,
    timed_out: AtomicU64,
    wait_ms: AtomicU64,
}

/// A turn: one connection's worth of the pool, given back when dropped.
pub(crate) type Turn = OwnedSemaphorePermit;

/// One caller waiting for its turn, counted in [`Turns`]'s `waiting` until dropped (also when
/// its future is dropped mid-wait).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Relaxed);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Turns {
    /// Turns for `connections` connections.
    pub fn new(connections: usize) -> Self {
        Turns {
            permits: Arc::new(Semaphore::new(connections)),
            waiting: AtomicUsize::new(0),
            waited: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            wait_ms: AtomicU64::new(0),
        }
    }

    /// A turn now, if one is free and nobody waits for one.
    pub fn try_take(&self) -> Option<Turn> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A turn, after every caller that asked before; `None` when `limit` passed first.
    pub async fn take(&self, limit: Duration) -> Option<Turn> {
        if let Some(turn) = self.try_take() {
            return Some(turn);
        }
        let start = Instant::now();
        let waiting = Queued::new(&self.waiting);
        let turn = tokio::time::timeout(limit, self.permits.clone().acquire_owned()).await;
        drop(waiting);
        let turn = turn.ok().and_then(Result::ok);
        self.waited.fetch_add(1, Relaxed);
        self.timed_out.fetch_add(u64::from(turn.is_none()), Relaxed);
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.wait_ms.fetch_add(ms, Relaxed);
        turn
    }

    /// Whether a turn is free now.
    pub fn free_now(&self) -> bool {
        self.permits.available_permits() > 0
    }

    /// Callers waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Callers that had to wait, those that gave up, and their waits in milliseconds.
    pub fn waits(&self) -> (u64, u64, u64) {
        (
            self.waited.load(Relaxed),
            self.timed_out.load(Relaxed),
            self.wait_ms.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Waiters are served in the order they asked, whoever gives a turn back and asks again.
    #[tokio::test]
    async fn waiters_are_served_in_the_order_they_asked() {
        let turns = Arc::new(Turns::new(2));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held: Vec<Turn> = (0..2).map(|_| turns.try_take().unwrap()).collect();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let turn = turns.take(Duration::from_secs(60)).await.unwrap();
                order.lock().unwrap().push(i);
                // Hold it a moment, then give it back.
                tokio::task::yield_now().await;
                drop(turn);
            }));
            // Each waiter is queued before the next one starts.
            tokio::task::yield_now().await;
        }
        assert_eq!(turns.waiting(), 6);
        // A caller that gives its turn back and asks again at once queues behind them.
        drop(held);
        let late = turns.try_take();
        assert!(late.is_none(), "a free turn went to a late caller");
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(turns.waiting(), 0);
        let (waited, timed_out, _) = turns.waits();
        assert_eq!((waited, timed_out), (6, 0));
    }

    /// A caller past its limit gets none and is counted; one whose future is dropped mid-wait
    /// no longer counts as waiting, and its place goes to the next.
    #[tokio::test]
    async fn a_timed_out_or_dropped_waiter_leaves_the_queue() {
        let turns = Arc::new(Turns::new(1));
        let held = turns.try_take().unwrap();
        assert!(turns.take(Duration::from_millis(50)).await.is_none());
        assert_eq!(turns.waits().0, 1);
        assert_eq!(turns.waits().1, 1);

        let dropped = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(Duration::from_secs(60)).await.is_some() })
        };
        tokio::task::yield_now().await;
        assert_eq!(turns.waiting(), 1);
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        assert_eq!(turns.waiting(), 0);

        let next = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(Duration::from_secs(60)).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(next.await.unwrap());
        assert!(turns.free_now());
    }
}
