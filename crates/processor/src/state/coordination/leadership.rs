//! [`Leadership`]: a won leader election as its holder sees it (term, fence, whether it still
//! believes it leads, resigning), and [`LeaderInfo`], the current leader as anyone sees it. The
//! election itself is in `leader`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::state::coordination::{locked, Fence};
use crate::state::error::StateResult;

/// The current holder of a leadership, from
/// [`EnhancedPostgresBackend::current_leader`](crate::state::EnhancedPostgresBackend::current_leader).
#[derive(Clone, Debug, PartialEq)]
pub struct LeaderInfo {
    /// The leadership's name.
    pub name: String,
    /// The leader's holder id (`host:pid:serial:random`, one per backend instance).
    pub holder_id: String,
    /// The leader's host name.
    pub holder_host: Option<String>,
    /// The leader's operating-system process id.
    pub holder_pid: Option<i32>,
    /// The term: grows by one with every new leader.
    pub term: i64,
    /// Time left on the lease, by the database clock.
    pub lease_remaining: Duration,
}

pub(super) struct State {
    /// `true` once this leadership has ended.
    pub ended: watch::Sender<bool>,
    /// Until when this holder may believe it leads (monotonic clock).
    pub deadline: Mutex<Instant>,
    /// The same on the wall clock, which (unlike the monotonic one) keeps counting while the
    /// machine is suspended: after a resume the belief has ended if the lease has.
    pub wall_deadline: Mutex<SystemTime>,
}

impl State {
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    pub fn believes(&self) -> bool {
        !*self.ended.borrow()
            && Instant::now() < *locked(&self.deadline)
            && SystemTime::now() < *locked(&self.wall_deadline)
    }

    /// Extends the belief to `valid` from `sent` (monotonic) and `sent_wall` (wall clock).
    pub fn extend(&self, sent: Instant, sent_wall: SystemTime, valid: Duration) {
        *locked(&self.deadline) = sent + valid;
        *locked(&self.wall_deadline) = sent_wall + valid;
    }
}

/// Leadership of a name, from [`EnhancedPostgresBackend::campaign`](crate::state::EnhancedPostgresBackend::campaign)
/// or [`try_campaign`](crate::state::EnhancedPostgresBackend::try_campaign).
///
/// Renewed in the background while held. Check [`is_leader`](Self::is_leader) before acting as
/// leader, or run the leader's work beside [`lost`](Self::lost). Dropping it resigns (in the
/// background, on the runtime it was won on).
pub struct Leadership {
    pub(super) name: String,
    pub(super) term: i64,
    pub(super) ttl: Duration,
    pub(super) fence: Fence,
    pub(super) state: Arc<State>,
    pub(super) resign: Option<oneshot::Sender<oneshot::Sender<StateResult<()>>>>,
}

impl Leadership {
    /// The leadership's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This leader's term: greater than every earlier term of the name.
    pub fn term(&self) -> i64 {
        self.term
    }

    /// The lease length.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The fence of this leadership's lock acquisition: pass it to
    /// [`PostgresTransaction::check_fence`](crate::state::PostgresTransaction::check_fence) so
    /// that a leader paused or cut off past its lease cannot write once another has been
    /// elected ([`StateError::Fenced`](crate::state::StateError::Fenced)). Cheap to clone.
    ///
    /// ```no_run
    /// # async fn demo(backend: processor::state::EnhancedPostgresBackend) -> processor::state::StateResult<()> {
    /// use std::time::Duration;
    /// let leadership = backend.campaign("scheduler", Duration::from_secs(10)).await?;
    /// let mut tx = backend.begin().await?;
    /// tx.check_fence(&leadership.fence()).await?;
    /// tx.put(b"schedule", b"next run").await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Whether this holder still leads: its lease was renewed recently enough that nobody else
    /// can have claimed it, and the session holding it is alive.
    pub fn is_leader(&self) -> bool {
        self.state.believes()
    }

    /// Resolves when this leadership ends (connection lost, renewal failed or too late,
    /// resigned). It is a timer on the monotonic clock set `ttl / 5` before the lease's expiry
    /// as the server computed it, so it fires before anyone else can become leader, provided
    /// this runtime is not starved for that long and the database clock does not jump ahead.
    /// Check [`is_leader`](Self::is_leader) right before each leader action, and pass the
    /// [`term`](Self::term) along where a stale leader's action must be refused. Does not
    /// borrow the handle.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.state.ended.subscribe();
        let state = self.state.clone();
        // Also wake now and then: the wall-clock bound can end the belief (after a suspend)
        // while the monotonic deadline is still ahead.
        let poll = (self.ttl / 10).max(Duration::from_millis(50));
        async move {
            loop {
                let deadline = (*locked(&state.deadline)).min(Instant::now() + poll);
                tokio::select! {
                    _ = ended.wait_for(|e| *e) => return,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        // A renewal may have moved the deadline meanwhile.
                        if !state.believes() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Gives up leadership now: stops believing, clears the lease (the next candidate takes over
    /// at once) and releases the advisory lock.
    pub async fn resign(mut self) -> StateResult<()> {
        self.state.end();
        let Some(tx) = self.resign.take() else {
            return Ok(());
        };
        let (done_tx, done) = oneshot::channel();
        if tx.send(done_tx).is_err() {
            // The renewal task already ended (leadership lost); nothing is held.
            return Ok(());
        }
        done.await.unwrap_or(Ok(()))
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Dropping the resign sender tells the renewal task to resign.
        self.state.end();
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("term", &self.term)
            .field("ttl", &self.ttl)
            .field("is_leader", &self.is_leader())
            .finish()
    }
}
