//! [`HeldLock`]: one held session lock, on a shared lock session or a connection of its own.

use tokio::sync::watch;
use tokio_postgres::Client;

use super::lockconn::LockConn;
use super::sessions::Reservation;
use super::{Fence, LockMode};

/// Where a lock is held.
pub(crate) enum HeldOn {
    /// On a shared lock session (locks and guards).
    Shared(Reservation),
    /// On a connection of its own (leader election).
    Dedicated(Box<LockConn>),
}

/// A held session lock.
pub(crate) struct HeldLock {
    pub(crate) lock: HeldOn,
    pub key: i64,
    pub name: Option<String>,
    pub mode: LockMode,
    pub token: i64,
    /// Unique per acquisition (`holder id/serial`), recorded in the bookkeeping row: a fence
    /// names exactly one acquisition, even on a reused session.
    pub acquisition: String,
}

impl HeldLock {
    fn conn(&self) -> &LockConn {
        match &self.lock {
            HeldOn::Shared(r) => &r.session().conn,
            HeldOn::Dedicated(c) => c,
        }
    }

    /// The lock's name, or its key, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n:?}"),
            None => format!("advisory lock {}", self.key),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.conn().is_closed()
    }

    /// Becomes `true` when the lock's session ends.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.conn().closed.clone()
    }

    /// The server process id of the lock's session.
    pub fn backend_pid(&self) -> i32 {
        self.conn().pid
    }

    /// What a transaction checks to refuse this holder's writes once it no longer holds the
    /// lock under this acquisition.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key,
            name: self.label(),
            token: self.token,
            backend_pid: self.backend_pid(),
            acquisition: self.acquisition.clone(),
        }
    }

    /// The lock's session, for statements that must run on it (leader leases: only on a
    /// dedicated session).
    pub(crate) fn client(&self) -> &Client {
        &self.conn().client
    }
}
