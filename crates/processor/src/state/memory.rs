//! [`MemoryStateBackend`]: an in-process backend with the same contract, for tests and for
//! state that need not survive the process; as the seed project's `processor::state` has it
//! (a default TTL, statistics, a cleanup task, checkpoint and restore).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::state::backend::StateBackend;
use crate::state::error::StateResult;
use crate::state::limits::{check_entry, check_key, check_ttl, prefix_upper_bound};

/// One entry and when it stops being visible.
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

/// Bytes an entry takes beside its key and value: the map's key vector and the entry itself
/// (the allocator's own overhead is not counted).
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Vec<u8>>() + std::mem::size_of::<Stored>();

/// Figures of a [`MemoryStateBackend`], from [`stats`](MemoryStateBackend::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryBackendStats {
    /// Entries held now, live or expired but not yet removed.
    pub total_entries: usize,
    /// Entries removed because they expired (met by a read, or by a cleanup), since the
    /// backend was made.
    pub expired_entries: usize,
    /// Bytes of the keys and values held now.
    pub total_bytes: usize,
    /// Reads of one key (`get`, `contains`).
    pub get_count: u64,
    /// Writes (`put`, `put_with_ttl`; `restore` counts each entry).
    pub put_count: u64,
    /// Deletes.
    pub delete_count: u64,
    /// Reads that found a live entry.
    pub hit_count: u64,
    /// Reads that found none (missing or expired).
    pub miss_count: u64,
}

#[derive(Default)]
struct Counters {
    expired: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner {
    entries: Mutex<BTreeMap<Vec<u8>, Stored>>,
    /// Given to every entry written without a TTL of its own.
    ttl: Option<Duration>,
    counters: Counters,
}

/// An in-memory [`StateBackend`], ordered by key, with TTLs: one default for every entry
/// ([`new`](Self::new)) and one per entry ([`put_with_ttl`](Self::put_with_ttl)).
///
/// Expired entries are invisible to every read at once (`get`, `contains`, `list_keys`,
/// `count`, `checkpoint`); they are removed when a read meets them, by
/// [`cleanup_expired`](Self::cleanup_expired), or by the task of
/// [`start_cleanup_task`](Self::start_cleanup_task). Clones share the entries.
#[derive(Clone)]
pub struct MemoryStateBackend {
    inner: Arc<Inner>,
}

impl Default for MemoryStateBackend {
    fn default() -> Self {
        Self::new(None)
    }
}

impl std::fmt::Debug for MemoryStateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStateBackend")
            .field("ttl", &self.inner.ttl)
            .field("entries", &self.lock().len())
            .finish()
    }
}

impl MemoryStateBackend {
    /// An empty backend. `ttl`: how long each entry stays visible after it was written
    /// (`None`: until deleted; `Some(Duration::ZERO)`: not at all);
    /// [`put_with_ttl`](Self::put_with_ttl) gives one entry its own.
    pub fn new(ttl: Option<Duration>) -> Self {
        MemoryStateBackend {
            inner: Arc::new(Inner {
                entries: Mutex::default(),
                ttl,
                counters: Counters::default(),
            }),
        }
    }

    /// Stores `value` under `key`, invisible after `ttl` (positive, at most 100 years),
    /// whatever the default TTL.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        check_entry(key, value)?;
        check_ttl(ttl)?;
        self.insert(key, value, Some(ttl));
        Ok(())
    }

    /// Removes every expired entry now; returns how many there were.
    pub async fn cleanup_expired(&self) -> usize {
        let now = Instant::now();
        let removed = {
            let mut map = self.lock();
            let before = map.len();
            map.retain(|_, e| e.live(now));
            before - map.len()
        };
        self.count_expired(removed);
        removed
    }

    /// Starts a task that runs [`cleanup_expired`](Self::cleanup_expired) every `interval`
    /// (the first run at once). It ends by itself at its first tick after every handle to the
    /// backend was dropped (it holds none itself), or when the returned handle is aborted.
    ///
    /// # Panics
    /// Outside a Tokio runtime, as `tokio::spawn` does.
    pub fn start_cleanup_task(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = interval.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                MemoryStateBackend { inner }.cleanup_expired().await;
            }
        })
    }

    /// Every live entry, `(key, value)` in key order.
    pub async fn checkpoint(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, e)| e.live(now))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// Replaces every entry with `checkpoint`'s (as [`checkpoint`](Self::checkpoint) gives
    /// them), each with the default TTL from now. An invalid key or value anywhere in it is
    /// [`StateError::InvalidInput`](crate::state::StateError::InvalidInput), with nothing
    /// changed.
    pub async fn restore(&self, checkpoint: Vec<(Vec<u8>, Vec<u8>)>) -> StateResult<()> {
        for (key, value) in &checkpoint {
            check_entry(key, value)?;
        }
        let expires_at = self.inner.ttl.and_then(|t| Instant::now().checked_add(t));
        let restored = u64::try_from(checkpoint.len()).unwrap_or(u64::MAX);
        let map: BTreeMap<Vec<u8>, Stored> = checkpoint
            .into_iter()
            .map(|(k, value)| (k, Stored { value, expires_at }))
            .collect();
        *self.lock() = map;
        self.inner.counters.puts.fetch_add(restored, Relaxed);
        Ok(())
    }

    /// Bytes the entries take: keys, values, and each entry's own size in the map.
    pub async fn memory_usage(&self) -> usize {
        self.lock()
            .iter()
            .map(|(k, e)| k.len() + e.value.len() + ENTRY_OVERHEAD)
            .sum()
    }

    /// Entries, bytes and operation counts.
    pub async fn stats(&self) -> MemoryBackendStats {
        let (total_entries, total_bytes) = {
            let map = self.lock();
            let bytes = map.iter().map(|(k, e)| k.len() + e.value.len()).sum();
            (map.len(), bytes)
        };
        let c = &self.inner.counters;
        MemoryBackendStats {
            total_entries,
            expired_entries: usize::try_from(c.expired.load(Relaxed)).unwrap_or(usize::MAX),
            total_bytes,
            get_count: c.gets.load(Relaxed),
            put_count: c.puts.load(Relaxed),
            delete_count: c.deletes.load(Relaxed),
            hit_count: c.hits.load(Relaxed),
            miss_count: c.misses.load(Relaxed),
        }
    }

    fn insert(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) {
        let expires_at = ttl
            .or(self.inner.ttl)
            .and_then(|t| Instant::now().checked_add(t));
        let entry = Stored {
            value: value.to_vec(),
            expires_at,
        };
        self.lock().insert(key.to_vec(), entry);
        self.inner.counters.puts.fetch_add(1, Relaxed);
    }

    /// The live value under `key`; removes it if it expired. Counted as a read.
    fn read(&self, key: &[u8]) -> Option<Vec<u8>> {
        let now = Instant::now();
        let found = {
            let mut map = self.lock();
            match map.get(key) {
                Some(e) if e.live(now) => Some(e.value.clone()),
                Some(_) => {
                    map.remove(key);
                    drop(map);
                    self.count_expired(1);
                    None
                }
                None => None,
            }
        };
        let c = &self.inner.counters;
        c.gets.fetch_add(1, Relaxed);
        match found {
            Some(_) => c.hits.fetch_add(1, Relaxed),
            None => c.misses.fetch_add(1, Relaxed),
        };
        found
    }

    fn count_expired(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.inner.counters.expired.fetch_add(n, Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Stored>> {
        // A panic while holding the lock cannot leave the map half-updated (every change is one
        // insert, remove, retain or replacement), so a poisoned lock is safe to keep using.
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl StateBackend for MemoryStateBackend {
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        check_key(key)?;
        Ok(self.read(key))
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()> {
        check_entry(key, value)?;
        self.insert(key, value, None);
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> StateResult<()> {
        check_key(key)?;
        self.lock().remove(key);
        self.inner.counters.deletes.fetch_add(1, Relaxed);
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
        check_key(key)?;
        Ok(self.read(key).is_some())
    }
}
