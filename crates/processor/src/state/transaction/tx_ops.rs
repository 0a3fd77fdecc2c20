//! The key/value operations inside a [`PostgresTransaction`]: reads, writes, versions,
//! compare-and-set, batches and metadata queries, each one statement on the transaction's
//! connection.

use std::time::Duration;

use crate::state::error::StateResult;
use crate::state::limits::{check_entry, check_key, check_metadata, check_ttl};
use crate::state::ops::batch::batch_bytes;
use crate::state::ops::conn_ops::{check_batch, empty_object, MetadataQuery, StateEntry};
use crate::state::stats::operation::Op;
use crate::state::transaction::tx::PostgresTransaction;

impl PostgresTransaction {
    /// The value under `key`, as this transaction sees it.
    pub async fn get(&mut self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        check_key(key)?;
        let value = self
            .stmt(Op::Get, 1, async |c| c.get_value(key).await)
            .await?;
        self.ctx.stats.moved(0, value.as_ref().map_or(0, Vec::len));
        Ok(value)
    }

    /// The whole entry under `key`.
    pub async fn get_entry(&mut self, key: &[u8]) -> StateResult<Option<StateEntry>> {
        check_key(key)?;
        let entry = self
            .stmt(Op::GetEntry, 1, async |c| c.get_entry(key).await)
            .await?;
        self.ctx
            .stats
            .moved(0, entry.as_ref().map_or(0, |e| e.value.len()));
        Ok(entry)
    }

    /// The value and version under `key`.
    pub async fn get_with_version(&mut self, key: &[u8]) -> StateResult<Option<(Vec<u8>, i64)>> {
        Ok(self.get_entry(key).await?.map(|e| (e.value, e.version)))
    }

    /// Whether a live entry exists under `key`.
    pub async fn contains(&mut self, key: &[u8]) -> StateResult<bool> {
        check_key(key)?;
        self.stmt(Op::Contains, 1, async |c| c.contains(key).await)
            .await
    }

    /// The number of live entries.
    pub async fn count(&mut self) -> StateResult<usize> {
        self.stmt(Op::Count, 1, async |c| c.count().await).await
    }

    /// The live keys starting with `prefix`, in byte order.
    pub async fn list_keys(&mut self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        self.stmt(Op::ListKeys, 1, async |c| c.list_keys(prefix).await)
            .await
    }

    /// Stores `value` under `key`, replacing the entry.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> StateResult<()> {
        self.put_entry(key, value, empty_object(), None)
            .await
            .map(|_| ())
    }

    /// Stores `value` with a metadata object.
    pub async fn put_with_metadata(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
    ) -> StateResult<()> {
        self.put_entry(key, value, metadata, None).await.map(|_| ())
    }

    /// Stores `value` for `ttl` (server clock).
    pub async fn put_with_ttl(
        &mut self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StateResult<()> {
        self.put_entry(key, value, empty_object(), Some(ttl))
            .await
            .map(|_| ())
    }

    /// Stores a whole entry; returns its new version.
    pub async fn put_entry(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
        ttl: Option<Duration>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        check_metadata(&metadata)?;
        let micros = ttl.map(check_ttl).transpose()?;
        let version = self
            .stmt(Op::Upsert, 1, async |c| {
                c.upsert(key, value, &metadata, micros).await
            })
            .await?;
        self.written += key.len() + value.len();
        Ok(version)
    }

    /// Optimistic write, as [`EnhancedPostgresBackend::put_with_version`](crate::state::EnhancedPostgresBackend::put_with_version).
    pub async fn put_with_version(
        &mut self,
        key: &[u8],
        value: &[u8],
        expected: Option<i64>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        let version = self
            .stmt(Op::PutWithVersion, 1, async |c| {
                c.put_with_version(key, value, expected).await
            })
            .await?;
        self.written += key.len() + value.len();
        Ok(version)
    }

    /// Deletes the entry only if its version is `expected`
    /// ([`StateError::ConcurrentModification`](crate::state::StateError::ConcurrentModification) otherwise).
    pub async fn delete_with_version(&mut self, key: &[u8], expected: i64) -> StateResult<()> {
        check_key(key)?;
        self.stmt(Op::DeleteWithVersion, 1, async |c| {
            c.delete_with_version(key, expected).await
        })
        .await
    }

    /// Replaces the value only if it is currently `expected` (`None`: only if absent); returns
    /// whether it did.
    pub async fn compare_and_set(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> StateResult<bool> {
        check_entry(key, value)?;
        let set = self
            .stmt(Op::CompareAndSet, 1, async |c| {
                c.compare_and_set(key, expected, value).await
            })
            .await?
            .is_some();
        if set {
            self.written += key.len() + value.len();
        }
        Ok(set)
    }

    /// Removes `key` (missing keys are fine).
    pub async fn delete(&mut self, key: &[u8]) -> StateResult<()> {
        check_key(key)?;
        self.stmt(Op::Delete, 1, async |c| c.delete(key).await)
            .await
    }

    /// Writes many entries (last occurrence of a key wins), inside this transaction.
    pub async fn batch_put(&mut self, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        check_batch(entries)?;
        if entries.is_empty() {
            return Ok(());
        }
        self.stmt(Op::BatchPut, entries.len() as u64, async |c| {
            c.batch_put(entries, false).await
        })
        .await?;
        self.written += batch_bytes(entries);
        Ok(())
    }

    /// Live entries whose metadata matches, as [`EnhancedPostgresBackend::query_by_metadata`](crate::state::EnhancedPostgresBackend::query_by_metadata).
    pub async fn query_by_metadata(
        &mut self,
        path: &str,
        value: &serde_json::Value,
    ) -> StateResult<Vec<StateEntry>> {
        let q = MetadataQuery::new(path, value)?;
        let entries = self
            .stmt(Op::QueryByMetadata, 1, async |c| {
                c.query_by_metadata(&q).await
            })
            .await?;
        let read = entries.iter().map(|e| e.value.len()).sum();
        self.ctx.stats.moved(0, read);
        Ok(entries)
    }
}
