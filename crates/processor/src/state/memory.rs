//! [`MemoryStateBackend`]: an in-process backend with the same contract, for tests and for
//! state that need not survive the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::state::backend::StateBackend;
use crate::state::error::StateResult;
use crate::state::limits::{check_entry, check_key, check_ttl, prefix_upper_bound};

#[derive(Clone)]
struct Stored {
    value: Vec<u8>,
    expires_at: Option<Instant>,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// An in-memory [`StateBackend`], ordered by key, with TTL support.
///
/// Expired entries are invisible at once; they are removed when a read meets them, or by
/// [`MemoryStateBackend::purge_expired`].
#[derive(Default)]
pub struct MemoryStateBackend {
    entries: Mutex<BTreeMap<Vec<u8>, Stored>>,
}

impl MemoryStateBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value` under `key`, invisible after `ttl`.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        check_entry(key, value)?;
        check_ttl(ttl)?;
        let entry = Stored {
            value: value.to_vec(),
            expires_at: Instant::now().checked_add(ttl),
        };
        self.lock().insert(key.to_vec(), entry);
        Ok(())
    }

    /// Removes every expired entry and returns how many there were.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.live(now));
        before - map.len()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Stored>> {
        // A panic while holding the lock cannot leave the map half-updated (every change is one
        // insert or remove), so a poisoned lock is safe to keep using.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl StateBackend for MemoryStateBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        check_key(key)?;
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(key) {
            Some(e) if e.live(now) => Ok(Some(e.value.clone())),
            Some(_) => {
                map.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        check_entry(key, value)?;
        let entry = Stored {
            value: value.to_vec(),
            expires_at: None,
        };
        self.lock().insert(key.to_vec(), entry);
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        check_key(key)?;
        self.lock().remove(key);
        Ok(())
    }

    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        let now = Instant::now();
        let upper = match prefix_upper_bound(prefix) {
            Some(u) => Bound::Excluded(u),
            None => Bound::Unbounded,
        };
        let map = self.lock();
        Ok(map
            .range::<[u8], _>((
                Bound::Included(prefix),
                upper.as_ref().map(|u| u.as_slice()),
            ))
            .filter(|(_, e)| e.live(now))
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn clear(&self) -> StateResult<()> {
        self.lock().clear();
        Ok(())
    }

    async fn count(&self) -> StateResult<usize> {
        let now = Instant::now();
        Ok(self.lock().values().filter(|e| e.live(now)).count())
    }

    async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        Ok(self.get(key).await?.is_some())
    }
}
