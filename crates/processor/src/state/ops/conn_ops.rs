//! The key/value operations: single-key reads and writes, optimistic versions, metadata
//! queries, prefix scans and TTL (batches are in the `batch` module).
//!
//! Every read filters `expires_at IS NULL OR expires_at > statement_timestamp()` (the server's
//! clock at the statement, in and out of transactions), so an expired entry is invisible
//! before any cleanup runs. Every write bumps `version`.

use std::time::SystemTime;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::state::error::{StateError, StateResult};
use crate::state::limits::{check_entry, check_metadata, json_type, prefix_upper_bound};
use crate::state::wire::connection::PgConn;

/// One stored entry with its bookkeeping columns.
#[derive(Clone, Debug, PartialEq)]
pub struct StateEntry {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The metadata object (`{}` when none was given).
    pub metadata: serde_json::Value,
    /// The version, bumped by every write.
    pub version: i64,
    /// When the entry was first written (or rewritten after it had expired).
    pub created_at: SystemTime,
    /// When the entry was last written.
    pub updated_at: SystemTime,
    /// When the entry expires, if it has a TTL.
    pub expires_at: Option<SystemTime>,
}

impl StateEntry {
    pub(crate) fn from_row(row: &Row) -> StateResult<Self> {
        Ok(StateEntry {
            key: row.try_get(0)?,
            value: row.try_get(1)?,
            metadata: row.try_get(2)?,
            version: row.try_get(3)?,
            created_at: row.try_get(4)?,
            updated_at: row.try_get(5)?,
            expires_at: row.try_get(6)?,
        })
    }
}

/// Pre-validated metadata query: the containment document and, for scalar values, the path.
pub(crate) struct MetadataQuery {
    contains: serde_json::Value,
    path: Option<(Vec<String>, serde_json::Value)>,
}

impl MetadataQuery {
    /// `value` an object: `metadata @> value` (the path only names the query). Otherwise the
    /// field at `path` (dotted for nesting) must equal `value`; the equivalent containment
    /// document is added so the GIN index narrows the scan.
    pub(crate) fn new(path: &str, value: &serde_json::Value) -> StateResult<Self> {
        if value.is_object() {
            check_metadata(value)?;
            return Ok(MetadataQuery {
                contains: value.clone(),
                path: None,
            });
        }
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if path.is_empty() || segments.iter().any(String::is_empty) {
            return Err(StateError::invalid(format!(
                "metadata path {:?} is empty or has an empty segment; a {} value needs a path such as \"type\" or \"user.id\"",
                path.chars().take(64).collect::<String>(),
                json_type(value)
            )));
        }
        let mut doc = value.clone();
        for seg in segments.iter().rev() {
            let mut obj = serde_json::Map::new();
            obj.insert(seg.clone(), doc);
            doc = serde_json::Value::Object(obj);
        }
        check_metadata(&doc)?;
        Ok(MetadataQuery {
            contains: doc,
            path: Some((segments, value.clone())),
        })
    }
}

pub(crate) fn check_batch(entries: &[(&[u8], &[u8])]) -> StateResult<()> {
    for (i, (k, v)) in entries.iter().enumerate() {
        check_entry(k, v).map_err(|e| match e {
            StateError::InvalidInput(m) => StateError::invalid(format!("batch entry {i}: {m}")),
            other => other,
        })?;
    }
    Ok(())
}

fn rows_to_entries(rows: &[Row]) -> StateResult<Vec<StateEntry>> {
    rows.iter().map(StateEntry::from_row).collect()
}

/// The end of the last record before WAL insert position `lsn`. When the last record ended
/// exactly at a page boundary, the insert position points past the next page's header (24
/// bytes, or 40 at the start of a segment), which a replica's replay position never reaches
/// until more WAL is written: the boundary is what a reader must wait for.
fn record_end(lsn: u64, page: u64, segment: u64) -> u64 {
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    if segment > 0 && lsn % segment == LONG_HEADER {
        lsn - LONG_HEADER
    } else if page > 0 && lsn % page == SHORT_HEADER {
        lsn - SHORT_HEADER
    } else {
        lsn
    }
}

/// `{}`: the metadata of an entry written without any.
pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// The statements themselves, on one connection, without validation or bookkeeping: the
/// pooled operations (the `store` module) and transactions call these after checking their input.
impl PgConn {
    /// The server's WAL insert position as a byte offset (primary only): taken after a write
    /// committed, it is at or past that write's commit record.
    pub(crate) async fn insert_lsn(&self) -> StateResult<u64> {
        let row = self.stmts.insert_lsn.query_one(&self.client, &[]).await?;
        let n = |i: usize| -> StateResult<u64> {
            Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
        };
        Ok(record_end(n(0)?, n(1)?, n(2)?))
    }

    /// A replica's WAL replay position as a byte offset (0 on a primary): every commit whose
    /// record ends at or before it is visible to the replica's next snapshot.
    pub(crate) async fn replay_lsn(&self) -> StateResult<u64> {
        let row = self.stmts.replay_lsn.query_one(&self.client, &[]).await?;
        Ok(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))
    }

    pub(crate) async fn get_value(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        let row = self.stmts.get.query_opt(&self.client, &[&key]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The live entries among `keys`, as (key, value), in no order.
    pub(crate) async fn get_many(&self, keys: &[&[u8]]) -> StateResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let rows = self.stmts.get_many.query(&self.client, &[&keys]).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub(crate) async fn get_entry(&self, key: &[u8]) -> StateResult<Option<StateEntry>> {
        let row = self
            .stmts
            .get_entry
            .query_opt(&self.client, &[&key])
            .await?;
        row.as_ref().map(StateEntry::from_row).transpose()
    }

    pub(crate) async fn contains(&self, key: &[u8]) -> StateResult<bool> {
        let row = self.stmts.contains.query_one(&self.client, &[&key]).await?;
        Ok(row.try_get(0)?)
    }

    pub(crate) async fn count(&self) -> StateResult<usize> {
        let row = self.stmts.count.query_one(&self.client, &[]).await?;
        let n: i64 = row.try_get(0)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Writes a whole entry (value, metadata, expiry); returns its new version.
    pub(crate) async fn upsert(
        &self,
        key: &[u8],
        value: &[u8],
        metadata: &serde_json::Value,
        ttl_us: Option<i64>,
    ) -> StateResult<i64> {
        let params: [&(dyn ToSql + Sync); 4] = [&key, &value, metadata, &ttl_us];
        let row = self.stmts.upsert.query_one(&self.client, &params).await?;
        Ok(row.try_get(0)?)
    }

    /// Writes whole entries (distinct keys, in key order) in one statement; returns each
    /// key's new version, in no order.
    pub(crate) async fn upsert_many(
        &self,
        keys: &[&[u8]],
        values: &[&[u8]],
        metadata: &[&serde_json::Value],
        ttl_us: &[Option<i64>],
    ) -> StateResult<Vec<(Vec<u8>, i64)>> {
        let params: [&(dyn ToSql + Sync); 4] = [&keys, &values, &metadata, &ttl_us];
        let rows = self.stmts.upsert_many.query(&self.client, &params).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Creates the entry only if no live one exists; returns its version, or `None`.
    async fn insert_if_absent(&self, key: &[u8], value: &[u8]) -> StateResult<Option<i64>> {
        let (empty, no_ttl) = (empty_object(), None::<i64>);
        let params: [&(dyn ToSql + Sync); 4] = [&key, &value, &empty, &no_ttl];
        let row = self
            .stmts
            .insert_new
            .query_opt(&self.client, &params)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// `None`: create (no live entry may exist). `Some(v)`: replace if the version is `v`.
    pub(crate) async fn put_with_version(
        &self,
        key: &[u8],
        value: &[u8],
        expected: Option<i64>,
    ) -> StateResult<i64> {
        let version = match expected {
            None => self.insert_if_absent(key, value).await?,
            Some(v) => {
                let (empty, no_ttl) = (empty_object(), None::<i64>);
                let params: [&(dyn ToSql + Sync); 5] = [&key, &value, &v, &empty, &no_ttl];
                let row = self
                    .stmts
                    .update_if_version
                    .query_opt(&self.client, &params)
                    .await?;
                row.map(|r| r.try_get(0)).transpose()?
            }
        };
        version.ok_or_else(|| StateError::ConcurrentModification { key: key.to_vec() })
    }

    /// Replaces the entry only if its current value is `expected` (`None`: only if there is no
    /// live entry). Returns the new version, or `None` when the comparison failed.
    pub(crate) async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> StateResult<Option<i64>> {
        match expected {
            None => self.insert_if_absent(key, value).await,
            Some(old) => {
                let row = self
                    .stmts
                    .cas_update
                    .query_opt(&self.client, &[&key, &value, &old])
                    .await?;
                Ok(row.map(|r| r.try_get(0)).transpose()?)
            }
        }
    }

    pub(crate) async fn delete(&self, key: &[u8]) -> StateResult<()> {
        self.stmts.delete.execute(&self.client, &[&key]).await?;
        Ok(())
    }

    /// Deletes the live entry only if its version is `expected`.
    pub(crate) async fn delete_with_version(&self, key: &[u8], expected: i64) -> StateResult<()> {
        let n = self
            .stmts
            .delete_if_version
            .execute(&self.client, &[&key, &expected])
            .await?;
        if n == 0 {
            return Err(StateError::ConcurrentModification { key: key.to_vec() });
        }
        Ok(())
    }

    pub(crate) async fn list_keys(&self, prefix: &[u8]) -> StateResult<Vec<Vec<u8>>> {
        let rows = match prefix_upper_bound(prefix) {
            Some(u) => {
                self.stmts
                    .scan_range
                    .query(&self.client, &[&prefix, &u.as_slice()])
                    .await?
            }
            None => self.stmts.scan_from.query(&self.client, &[&prefix]).await?,
        };
        rows.iter()
            .map(|r| r.try_get(0).map_err(StateError::from))
            .collect()
    }

    /// Up to `limit` live keys starting with `prefix` and after `after` (the empty string: from
    /// the first), in key order.
    pub(crate) async fn list_keys_page(
        &self,
        prefix: &[u8],
        after: &[u8],
        limit: i64,
    ) -> StateResult<Vec<Vec<u8>>> {
        let row = match prefix_upper_bound(prefix) {
            Some(u) => {
                self.stmts
                    .page_range
                    .query_one(&self.client, &[&prefix, &after, &u.as_slice(), &limit])
                    .await?
            }
            None => {
                self.stmts
                    .page_from
                    .query_one(&self.client, &[&prefix, &after, &limit])
                    .await?
            }
        };
        let mut keys: Vec<Vec<u8>> = row.try_get(0)?;
        if !keys.is_sorted() {
            keys.sort_unstable();
        }
        Ok(keys)
    }

    /// Like [`list_keys_page`](Self::list_keys_page), whole entries.
    pub(crate) async fn entries_page(
        &self,
        prefix: &[u8],
        after: &[u8],
        limit: i64,
    ) -> StateResult<Vec<StateEntry>> {
        let rows = match prefix_upper_bound(prefix) {
            Some(u) => {
                self.stmts
                    .entries_range
                    .query(&self.client, &[&prefix, &after, &u.as_slice(), &limit])
                    .await?
            }
            None => {
                self.stmts
                    .entries_from
                    .query(&self.client, &[&prefix, &after, &limit])
                    .await?
            }
        };
        rows_to_entries(&rows)
    }

    pub(crate) async fn query_by_metadata(
        &self,
        q: &MetadataQuery,
    ) -> StateResult<Vec<StateEntry>> {
        let rows = match &q.path {
            None => {
                self.stmts
                    .query_contains
                    .query(&self.client, &[&q.contains])
                    .await?
            }
            Some((segments, v)) => {
                self.stmts
                    .query_path
                    .query(&self.client, &[&q.contains, segments, v])
                    .await?
            }
        };
        rows_to_entries(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_after_a_page_header_means_the_boundary() {
        let (page, seg) = (8192, 16 << 20);
        assert_eq!(record_end(3 * 8192 + 24, page, seg), 3 * 8192);
        assert_eq!(record_end(5 * seg + 40, page, seg), 5 * seg);
        assert_eq!(record_end(3 * 8192 + 100, page, seg), 3 * 8192 + 100);
        assert_eq!(record_end(3 * 8192, page, seg), 3 * 8192);
    }

    #[test]
    fn metadata_queries() {
        let q = MetadataQuery::new("user.id", &serde_json::json!(7)).unwrap();
        assert_eq!(q.contains, serde_json::json!({"user": {"id": 7}}));
        assert_eq!(
            q.path.unwrap().0,
            vec!["user".to_string(), "id".to_string()]
        );
        let q = MetadataQuery::new("type", &serde_json::json!({"type": "user"})).unwrap();
        assert!(q.path.is_none());
        assert!(MetadataQuery::new("", &serde_json::json!(1)).is_err());
        assert!(MetadataQuery::new("a..b", &serde_json::json!(1)).is_err());
    }
}
