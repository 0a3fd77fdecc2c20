//! Listing the session advisory locks of the database ([`AdvisoryLockInfo`]), with pgstate's
//! bookkeeping, after cleaning the rows of dead holders.

use std::time::SystemTime;

use super::{Coordinator, LockMode, ADVISORY_LOCKS};
use crate::state::error::StateResult;

/// A session advisory lock as the server sees it, from
/// [`EnhancedPostgresBackend::list_advisory_locks`](crate::state::EnhancedPostgresBackend::list_advisory_locks).
#[derive(Clone, Debug, PartialEq)]
pub struct AdvisoryLockInfo {
    /// The lock's key.
    pub key: i64,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// Process id of the server session holding it.
    pub backend_pid: i32,
    /// The lock's name, when a pgstate holder recorded it (named locks).
    pub name: Option<String>,
    /// The holder's id (`host:pid:serial:random`), when a pgstate holder recorded it.
    pub holder_id: Option<String>,
    /// The holder's host name, when recorded.
    pub holder_host: Option<String>,
    /// The holder's operating-system process id, when recorded.
    pub holder_pid: Option<i32>,
    /// When it was acquired, when recorded.
    pub acquired_at: Option<SystemTime>,
    /// The fencing token of this acquisition, when recorded.
    pub fencing_token: Option<i64>,
    /// Sessions waiting for this key now.
    pub waiters: i64,
}

impl Coordinator {
    /// Every session advisory lock granted in this database, with pgstate's bookkeeping where
    /// there is any and the number of waiters. Bookkeeping rows whose session no longer holds
    /// the lock (a dead holder) are deleted first.
    pub async fn list(&self) -> StateResult<Vec<AdvisoryLockInfo>> {
        let n = &self.ctx.names;
        let advisory = format!("adv AS ({ADVISORY_LOCKS})");
        let cleanup = format!(
            "WITH {advisory}
             DELETE FROM {locks} b WHERE NOT EXISTS (
                 SELECT 1 FROM adv a WHERE a.granted AND a.lock_key = b.lock_key AND a.pid = b.backend_pid)",
            locks = n.locks
        );
        let list = format!(
            "WITH {advisory}
             SELECT a.lock_key, a.pid, a.mode = 'ShareLock', b.lock_name, b.holder_id, b.holder_host,
                    b.holder_pid, b.acquired_at, b.fencing_token,
                    (SELECT count(*) FROM adv w WHERE w.lock_key = a.lock_key AND NOT w.granted)
             FROM adv a LEFT JOIN {locks} b ON b.lock_key = a.lock_key AND b.backend_pid = a.pid
             WHERE a.granted
             ORDER BY a.lock_key, a.pid",
            locks = n.locks
        );
        let rows = self
            .on_primary(async |c| {
                c.client.execute_typed(cleanup.as_str(), &[]).await?;
                Ok(c.client.query_typed(list.as_str(), &[]).await?)
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AdvisoryLockInfo {
                    key: r.try_get(0)?,
                    backend_pid: r.try_get(1)?,
                    mode: if r.try_get(2)? {
                        LockMode::Shared
                    } else {
                        LockMode::Exclusive
                    },
                    name: r.try_get(3)?,
                    holder_id: r.try_get(4)?,
                    holder_host: r.try_get(5)?,
                    holder_pid: r.try_get(6)?,
                    acquired_at: r.try_get(7)?,
                    fencing_token: r.try_get(8)?,
                    waiters: r.try_get(9)?,
                })
            })
            .collect()
    }
}
