//! Lock sessions: the few dedicated connections that every held session lock of a backend
//! shares (at most [`MAX_LOCK_SESSIONS`] for locks taken at once).
//!
//! PostgreSQL's session locks are re-entrant: a session that holds a lock gets it again, so a
//! session shared by two holders of one key could not exclude them from each other. So a key
//! is held (or being acquired) at most once per session: each acquisition *reserves* its key on
//! a session that does not have it, and the server then excludes holders in this process from
//! each other as it excludes other processes. Each release matches exactly one acquisition.
//!
//! Only non-blocking statements run on a shared session (`pg_try_advisory_lock`, unlock and
//! the bookkeeping delete), so no holder waits behind another. A lock that must be waited for is
//! waited for on a connection of its own; once granted there, that connection joins the lock
//! sessions (so a backend may briefly have more than [`MAX_LOCK_SESSIONS`]; sessions left
//! without locks beyond [`IDLE_SESSIONS`] are closed).
//!
//! When a session ends (terminated, network failure), the server releases every lock on it and
//! each of their holders' lost signals fires. A reservation whose future is dropped, or a held
//! lock dropped without a release, is unlocked in the background on the session's runtime
//! before its key is free in the process again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lockconn::LockConn;
use super::{locked, LockMode};
use crate::state::error::StateResult;
use crate::state::schema::names::TableNames;
use crate::state::wire::connection::Connector;

/// The most lock sessions opened for locks granted at once (see the module docs).
pub const MAX_LOCK_SESSIONS: usize = 8;
/// Locks per session before another session is opened (while under the maximum).
const SPREAD: usize = 16;
/// Sessions without locks kept open for the next acquisitions.
const IDLE_SESSIONS: usize = 2;

/// One shared lock session.
pub(crate) struct LockSession {
    id: u64,
    pub conn: LockConn,
    /// The runtime its connection runs on: background unlocks go there.
    runtime: tokio::runtime::Handle,
}

struct Slot {
    session: Arc<LockSession>,
    /// Keys held or reserved on it.
    load: usize,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    /// The sessions each key is held or reserved on in this process (once each).
    keys: HashMap<i64, Vec<u64>>,
}

/// The lock sessions of one backend and what the process holds on them.
pub(crate) struct LockSessions {
    connector: Connector,
    names: TableNames,
    state: Mutex<State>,
    /// One session opened at a time.
    opening: tokio::sync::Mutex<()>,
    ids: AtomicU64,
}

impl LockSessions {
    pub fn new(connector: Connector, names: TableNames) -> Arc<Self> {
        Arc::new(LockSessions {
            connector,
            names,
            state: Mutex::new(State::default()),
            opening: tokio::sync::Mutex::new(()),
            ids: AtomicU64::new(0),
        })
    }

    /// How lock sessions (and waits for locks) connect.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Reserves `key` (to be taken in `mode`) on a session that does not hold it, opening one
    /// when none is free or the open ones are busy enough (under [`MAX_LOCK_SESSIONS`]).
    pub async fn reserve(self: &Arc<Self>, key: i64, mode: LockMode) -> StateResult<Reservation> {
        loop {
            if let Some(r) = self.try_reserve(key, mode) {
                return Ok(r);
            }
            let _one = self.opening.lock().await;
            if let Some(r) = self.try_reserve(key, mode) {
                return Ok(r);
            }
            let conn = LockConn::open(&self.connector, &self.names).await?;
            self.adopt(conn);
        }
    }

    /// `None`: a session must be opened first.
    fn try_reserve(self: &Arc<Self>, key: i64, mode: LockMode) -> Option<Reservation> {
        let mut st = locked(&self.state);
        st.slots
            .retain(|s| s.load > 0 || !s.session.conn.is_closed());
        let taken: &[u64] = st.keys.get(&key).map_or(&[], Vec::as_slice);
        let open = st
            .slots
            .iter()
            .filter(|s| !s.session.conn.is_closed())
            .count();
        let (i, load) = st
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.session.conn.is_closed() && !taken.contains(&s.session.id))
            .min_by_key(|(_, s)| s.load)
            .map(|(i, s)| (i, s.load))?;
        if load >= SPREAD && open < MAX_LOCK_SESSIONS {
            return None;
        }
        st.slots[i].load += 1;
        let session = st.slots[i].session.clone();
        st.keys.entry(key).or_default().push(session.id);
        Some(Reservation {
            sessions: self.clone(),
            key,
            mode,
            session,
            maybe_held: false,
        })
    }

    /// Makes `conn` a lock session; returns it.
    fn adopt(&self, conn: LockConn) -> Arc<LockSession> {
        let session = Arc::new(LockSession {
            id: self.ids.fetch_add(1, Relaxed),
            conn,
            runtime: tokio::runtime::Handle::current(),
        });
        locked(&self.state).slots.push(Slot {
            session: session.clone(),
            load: 0,
        });
        session
    }

    /// Ends the reservation of `key` on `session`: the key is free for others in the process.
    fn unreserve(&self, session: &Arc<LockSession>, key: i64) {
        {
            let mut st = locked(&self.state);
            if let Some(on) = st.keys.get_mut(&key) {
                on.retain(|id| *id != session.id);
                if on.is_empty() {
                    st.keys.remove(&key);
                }
            }
            if let Some(slot) = st.slots.iter_mut().find(|s| s.session.id == session.id) {
                slot.load = slot.load.saturating_sub(1);
            }
            // Sessions without locks beyond the few kept idle are closed (with the last
            // reference to them).
            let mut idle = 0;
            st.slots.retain(|s| {
                if s.load > 0 {
                    return true;
                }
                idle += 1;
                idle <= IDLE_SESSIONS && !s.session.conn.is_closed()
            });
        }
    }
}

/// A key reserved (and maybe held on the server) on one lock session. Dropped while the
/// server may hold it, the key is unlocked in the background before it is free in the process
/// again; a held multiplexed lock is a reservation that the server granted.
pub(crate) struct Reservation {
    sessions: Arc<LockSessions>,
    pub key: i64,
    pub mode: LockMode,
    session: Arc<LockSession>,
    /// Whether the server may hold the lock for this reservation.
    maybe_held: bool,
}

impl Reservation {
    /// The session the key is reserved on.
    pub fn session(&self) -> &LockSession {
        &self.session
    }

    /// `pg_try_advisory_lock` on the reserved session.
    pub async fn try_lock(&mut self) -> StateResult<bool> {
        self.maybe_held = true;
        let got = self
            .session()
            .conn
            .lock(
                &self.sessions.connector,
                self.key,
                self.mode,
                Duration::ZERO,
            )
            .await?;
        self.maybe_held = got;
        Ok(got)
    }

    /// `conn` was granted the lock after waiting for it: it becomes a lock session and the
    /// reservation moves there.
    pub fn granted_on(&mut self, conn: LockConn) {
        let new = self.sessions.adopt(conn);
        {
            let mut st = locked(&self.sessions.state);
            if let Some(slot) = st.slots.iter_mut().find(|s| s.session.id == new.id) {
                slot.load += 1;
            }
            st.keys.entry(self.key).or_default().push(new.id);
        }
        let old = std::mem::replace(&mut self.session, new);
        self.sessions.unreserve(&old, self.key);
        self.maybe_held = true;
    }

    /// Unlocks on the server (and deletes the bookkeeping row); whether the session held it.
    pub async fn unlock(&mut self) -> StateResult<bool> {
        let held = self.session().conn.unlock(self.key, self.mode).await?;
        self.maybe_held = false;
        Ok(held)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let session = self.session.clone();
        if !self.maybe_held || session.conn.is_closed() {
            self.sessions.unreserve(&session, self.key);
            return;
        }
        // Unlock first, then free the key: another holder in the process must not take the
        // key on the server before this hold is gone. If the runtime is gone, so is the
        // connection (and with it the lock); the key stays reserved in a backend nobody can
        // use any more.
        let (sessions, key, mode) = (self.sessions.clone(), self.key, self.mode);
        let runtime = session.runtime.clone();
        runtime.spawn(async move {
            if let Err(e) = session.conn.unlock(key, mode).await {
                tracing::debug!(key, error = %e, "background unlock of an abandoned lock");
            }
            sessions.unreserve(&session, key);
        });
    }
}
