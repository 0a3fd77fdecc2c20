//! Whole entries by binary COPY: key, value, metadata and TTL in one stream into a
//! session-local staging table, then one upsert from it, in one transaction. The bulk path
//! for loads that mix plain entries with ones carrying metadata or an expiry (`pgstate
//! import`): every entry goes the same way, so the mix costs what the plain ones cost.

use std::time::Duration;

use bytes::BufMut;

use crate::state::error::{StateError, StateResult};
use crate::state::limits::{check_entry, check_metadata, check_ttl};
use crate::state::ops::batch::{last_of_each_key, put_field};
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::Use;
use crate::state::routing::causal::Session;
use crate::state::schema::names::TableNames;
use crate::state::stats::operation::Op;
use crate::state::wire::connection::PgConn;
use crate::state::wire::statements::{rewindow, upsert_sql, LIVE, REPLACE, TOMBSTONE};

/// One entry of [`batch_copy_entries`](crate::state::EnhancedPostgresBackend::batch_copy_entries):
/// its key and value, its metadata (a JSON object; `None` for none) and how long it lives
/// (`None`: until deleted; measured on the server's clock from the batch's statement).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchEntry<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value.
    pub value: &'a [u8],
    /// A JSON object, or `None` for `{}`.
    pub metadata: Option<&'a serde_json::Value>,
    /// Time to live, or `None` for an entry that does not expire.
    pub ttl: Option<Duration>,
}

/// An entry checked and encoded for COPY: its metadata as JSON text, its TTL in microseconds.
#[derive(Debug)]
struct Encoded<'a> {
    key: &'a [u8],
    value: &'a [u8],
    metadata: Vec<u8>,
    ttl_us: Option<i64>,
}

/// Checks every entry (nothing is sent when one is invalid) and encodes it; the last
/// occurrence of a key wins, and the result is in key order (the lock order of every batch).
fn encode<'a>(entries: &[BatchEntry<'a>]) -> StateResult<Vec<Encoded<'a>>> {
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let checked = (|| {
            check_entry(e.key, e.value)?;
            let metadata = match e.metadata {
                Some(m) => {
                    check_metadata(m)?;
                    serde_json::to_vec(m)
                        .map_err(|err| StateError::SerializationFailed(err.to_string()))?
                }
                None => b"{}".to_vec(),
            };
            let ttl_us = e.ttl.map(check_ttl).transpose()?;
            Ok(Encoded {
                key: e.key,
                value: e.value,
                metadata,
                ttl_us,
            })
        })();
        out.push(checked.map_err(|err| match err {
            StateError::InvalidInput(m) => StateError::invalid(format!("batch entry {i}: {m}")),
            other => other,
        })?);
    }
    Ok(last_of_each_key(out, |e| e.key))
}

impl PgConn {
    /// COPYs `entries` (checked, in key order, one per key) into the staging table and merges
    /// them by one upsert, in one transaction; returns the keys written. With `replace`, the
    /// live keys not among them become tombstones first, under an EXCLUSIVE lock (readers see
    /// the old state or the new one). On an exclusively held connection.
    async fn copy_entries(
        &self,
        names: &TableNames,
        entries: &[Encoded<'_>],
        replace: bool,
    ) -> StateResult<u64> {
        let merge = upsert_sql(
            names,
            "SELECT key, value, metadata, CASE WHEN ttl_us IS NULL THEN NULL \
                    ELSE statement_timestamp() + ttl_us * interval '1 microsecond' END \
             FROM pg_temp.pgstate_copy_entries ORDER BY key",
            &["key", "value", "metadata", "expires_at"],
            false,
            REPLACE,
            "",
        );
        // Behind PgBouncer's transaction pooling the next transaction may run on another
        // server session: the staging table then lives for this transaction only.
        let stage = if self.stmts.unnamed() {
            "CREATE TEMP TABLE pgstate_copy_entries (key bytea NOT NULL, value bytea NOT NULL, \
             metadata jsonb NOT NULL, ttl_us bigint) ON COMMIT DROP"
        } else {
            "CREATE TEMP TABLE IF NOT EXISTS pgstate_copy_entries (key bytea NOT NULL, \
             value bytea NOT NULL, metadata jsonb NOT NULL, ttl_us bigint) ON COMMIT DELETE ROWS"
        };
        self.in_transaction(async {
            self.client.batch_execute(stage).await?;
            let copy = "COPY pg_temp.pgstate_copy_entries (key, value, metadata, ttl_us) \
                        FROM STDIN (FORMAT binary)";
            self.copy_binary(copy, entries, |buf, e| {
                buf.put_i16(4);
                put_field(buf, e.key)?;
                put_field(buf, e.value)?;
                // jsonb's binary form: version 1, then the text.
                let len = i32::try_from(e.metadata.len() + 1)
                    .map_err(|_| StateError::invalid("a COPY field is larger than 2 GiB"))?;
                buf.put_i32(len);
                buf.put_u8(1);
                buf.put_slice(&e.metadata);
                match e.ttl_us {
                    Some(us) => {
                        buf.put_i32(8);
                        buf.put_i64(us);
                    }
                    None => buf.put_i32(-1),
                }
                Ok(())
            })
            .await?;
            if replace {
                let t = &names.qualified;
                self.client
                    .batch_execute(&format!(
                        "LOCK TABLE {t} IN EXCLUSIVE MODE; \
                         UPDATE {t} s SET {TOMBSTONE}{} WHERE {LIVE} AND NOT EXISTS \
                             (SELECT 1 FROM pg_temp.pgstate_copy_entries c WHERE c.key = s.key)",
                        rewindow(names)
                    ))
                    .await?;
            }
            Ok(self.execute_cached(merge.as_str(), &[]).await?)
        })
        .await
    }
}

impl Store {
    /// Writes whole entries by binary COPY and one upsert, all or nothing (see the module
    /// notes); returns the number of distinct keys written.
    pub async fn batch_copy_entries(
        &self,
        session: &Session,
        entries: &[BatchEntry<'_>],
    ) -> StateResult<u64> {
        let encoded = encode(entries)?;
        if encoded.is_empty() {
            return Ok(0);
        }
        let names = &self.ctx.names;
        let rows = encoded.len() as u64;
        let written = self
            .write(session, Op::BatchCopy, rows, Use::Own, async |c| {
                c.copy_entries(names, &encoded, false).await
            })
            .await?;
        let bytes = encoded.iter().map(|e| e.key.len() + e.value.len()).sum();
        self.ctx.stats.moved(bytes, 0);
        Ok(written)
    }
}

impl Store {
    /// Replaces the whole live state with `entries` (see [`PgConn::copy_entries`]); returns
    /// the number of distinct keys written.
    pub async fn replace_with_entries(
        &self,
        session: &Session,
        entries: &[BatchEntry<'_>],
    ) -> StateResult<u64> {
        let encoded = encode(entries)?;
        let names = &self.ctx.names;
        let rows = encoded.len() as u64;
        let written = self
            .write(session, Op::BatchCopy, rows, Use::Own, async |c| {
                c.copy_entries(names, &encoded, true).await
            })
            .await?;
        let bytes = encoded.iter().map(|e| e.key.len() + e.value.len()).sum();
        self.ctx.stats.moved(bytes, 0);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked_deduplicated_and_ordered() {
        let meta = serde_json::json!({"a": 1});
        let e = |k: &'static [u8], v: &'static [u8]| BatchEntry {
            key: k,
            value: v,
            metadata: None,
            ttl: None,
        };
        let out = encode(&[
            e(b"b", b"1"),
            BatchEntry {
                metadata: Some(&meta),
                ttl: Some(Duration::from_secs(2)),
                ..e(b"a", b"2")
            },
            e(b"b", b"3"),
        ])
        .unwrap();
        let keys: Vec<&[u8]> = out.iter().map(|e| e.key).collect();
        assert_eq!(keys, [b"a".as_slice(), b"b".as_slice()]);
        assert_eq!(out[0].metadata, br#"{"a":1}"#);
        assert_eq!(out[0].ttl_us, Some(2_000_000));
        assert_eq!(out[1].value, b"3");
        assert_eq!(out[1].metadata, b"{}");
        let bad = encode(&[e(b"ok", b"v"), e(b"", b"v")]).unwrap_err();
        assert!(bad.to_string().contains("batch entry 1"), "{bad}");
        let not_object = serde_json::json!([1]);
        let bad = encode(&[BatchEntry {
            metadata: Some(&not_object),
            ..e(b"k", b"v")
        }])
        .unwrap_err();
        assert!(matches!(bad, StateError::InvalidInput(_)), "{bad}");
        let bad = encode(&[BatchEntry {
            ttl: Some(Duration::ZERO),
            ..e(b"k", b"v")
        }])
        .unwrap_err();
        assert!(matches!(bad, StateError::InvalidInput(_)), "{bad}");
    }
}
