//! The [`StateBackend`] contract that every backend implements.

use async_trait::async_trait;

use crate::state::error::StateResult;

/// A key/value store for stream-processing state. Keys and values are arbitrary bytes.
///
/// The trait is object-safe: `Arc<dyn StateBackend>` works. Every implementation in this crate
/// passes the same conformance suite: entries whose TTL has passed are invisible to every method,
/// `delete` of a missing key succeeds, and `list_keys(prefix)` returns the live keys starting with
/// `prefix` (all keys for an empty prefix) in ascending byte order.
#[async_trait]
pub trait StateBackend: Send + Sync {
    /// The value stored under `key`, or `None` when there is none (or it has expired).
    async fn get(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>>;

    /// Stores `value` under `key`, replacing any previous entry (its metadata and TTL too).
    async fn put(&self, key: &[u8], value: &[u8]) -> StateResult<()>;

    /// Removes `key`. Removing a missing key is not an error.
    async fn delete(&self, key: &[u8]) -> StateResult<()>;

    /// The live keys that start with `prefix`, in ascending byte order.
    async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>>;

    /// Removes every entry.
    async fn clear(&self) -> StateResult<()>;

    /// The number of live entries.
    async fn count(&self) -> StateResult<usize>;

    /// Whether a live entry exists under `key`.
    async fn contains(&self, key: &[u8]) -> StateResult<bool>;
}
