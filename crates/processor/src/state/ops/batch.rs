//! Batches: `batch_put` by UNNEST in chunks, `batch_copy` by binary COPY, both with the last
//! occurrence of a key winning and rows written in key order (so concurrent batches lock rows
//! in one order and never deadlock with each other).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::types::Type;

use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::ops::conn_ops::check_batch;
use crate::state::ops::store::Store;
use crate::state::pool::conn_pool::Use;
use crate::state::routing::causal::Session;
use crate::state::schema::names::TableNames;
use crate::state::stats::operation::Op;
use crate::state::wire::connection::PgConn;
use crate::state::wire::statements::{upsert_sql, REPLACE};

/// Rows per UNNEST statement in `batch_put`.
pub(crate) const BATCH_CHUNK_ROWS: usize = 5_000;
/// Payload bytes per UNNEST statement in `batch_put`.
pub(crate) const BATCH_CHUNK_BYTES: usize = 32 * 1024 * 1024;

/// Bytes of binary COPY data sent at a time.
const COPY_SEND_BYTES: usize = 256 * 1024;

/// Keys and values of one UNNEST statement.
type Chunk<'a> = (Vec<&'a [u8]>, Vec<&'a [u8]>);

/// Keeps the last occurrence of each key, in key order (bytes, as PostgreSQL orders `bytea`).
///
/// Key order is the order the rows are then written and locked in: two batches over the same
/// keys, whatever order their callers gave, lock them in one order and so never deadlock with
/// each other (also across the chunks of one batch).
fn last_wins<'a>(entries: &'a [(&'a [u8], &'a [u8])]) -> Vec<(&'a [u8], &'a [u8])> {
    last_of_each_key(entries.to_vec(), |e| e.0)
}

/// `items` in key order (`key` of each), keeping the last given of each key (see
/// [`last_wins`]).
pub(crate) fn last_of_each_key<T>(mut items: Vec<T>, key: impl Fn(&T) -> &[u8]) -> Vec<T> {
    // Stable: equal keys keep their order, so the last of each run is the last given.
    items.sort_by(|a, b| key(a).cmp(key(b)));
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for e in items {
        match out.last_mut() {
            Some(last) if key(last) == key(&e) => *last = e,
            _ => out.push(e),
        }
    }
    out
}

/// Splits a batch (already deduplicated) into UNNEST chunks.
fn chunk<'a>(entries: &[(&'a [u8], &'a [u8])]) -> Vec<Chunk<'a>> {
    let mut chunks: Vec<Chunk<'a>> = Vec::new();
    let mut bytes = 0usize;
    for (k, v) in entries {
        let size = k.len() + v.len();
        match chunks.last_mut() {
            Some((keys, values))
                if keys.len() < BATCH_CHUNK_ROWS && bytes + size <= BATCH_CHUNK_BYTES =>
            {
                keys.push(k);
                values.push(v);
                bytes += size;
            }
            _ => {
                chunks.push((vec![*k], vec![*v]));
                bytes = size;
            }
        }
    }
    chunks
}

impl PgConn {
    /// Runs `body` in a transaction of its own: `BEGIN`, then `COMMIT` if it succeeded, else
    /// `ROLLBACK`. Only on a connection held exclusively (a checkout, never a shared lane):
    /// if this future is dropped midway, the checkout discards the connection.
    pub(crate) async fn in_transaction<T>(
        &self,
        body: impl Future<Output = StateResult<T>>,
    ) -> StateResult<T> {
        self.client.batch_execute("BEGIN").await?;
        match body.await {
            Ok(v) => {
                self.client.batch_execute("COMMIT").await?;
                Ok(v)
            }
            Err(e) => {
                // A failed ROLLBACK means the connection is gone (and with it the transaction).
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Runs UNNEST chunks. With `atomic` and more than one chunk they run in a transaction of
    /// their own (on an exclusively held connection); inside a caller's transaction pass
    /// `false`.
    pub(crate) async fn batch_put(
        &self,
        entries: &[(&[u8], &[u8])],
        atomic: bool,
    ) -> StateResult<()> {
        let entries = last_wins(entries);
        let chunks = chunk(&entries);
        let all = async {
            for (keys, values) in &chunks {
                self.stmts
                    .batch_upsert
                    .execute(&self.client, &[keys, values])
                    .await?;
            }
            Ok(())
        };
        if chunks.len() > 1 && atomic {
            self.in_transaction(all).await
        } else {
            all.await
        }
    }

    /// Writes a batch by binary COPY (last occurrence of a key wins); returns the number of
    /// distinct keys written. On an exclusively held connection.
    ///
    /// When none of the keys has a row yet (one `key = ANY($1)` probe) and the table is not
    /// partitioned by write window, the rows are copied straight into the table, in one
    /// transaction: a new key gets what an upsert would give it (its version from the version
    /// floor, empty metadata, no expiry). Otherwise (or if a concurrent write created one of
    /// the keys meanwhile) they are copied into a session-local staging table, which writes
    /// no WAL, and merged from it by one upsert, in one transaction. Either way the rows go
    /// in key order, the lock order of every batch.
    pub(crate) async fn batch_copy(
        &self,
        names: &TableNames,
        entries: &[(&[u8], &[u8])],
    ) -> StateResult<u64> {
        let entries = last_wins(entries);
        if !names.windowed {
            let keys: Vec<&[u8]> = entries.iter().map(|(k, _)| *k).collect();
            let probe = copy_probe_sql(&names.qualified);
            let any_exists = self
                .query_opt_cached(probe.as_str(), &[(&keys, Type::BYTEA_ARRAY)])
                .await?
                .is_some();
            if !any_exists {
                let copy = format!(
                    "COPY {} (key, value) FROM STDIN (FORMAT binary)",
                    names.qualified
                );
                let direct = self
                    .in_transaction(async {
                        self.copy_rows(&copy, &entries).await?;
                        Ok(entries.len() as u64)
                    })
                    .await;
                match direct {
                    // A concurrent write created one of the keys: upsert after all.
                    Err(e)
                        if e.sqlstate() == Some(sqlstate::UNIQUE_VIOLATION)
                            && !self.client.is_closed() => {}
                    other => return other,
                }
            }
        }
        self.copy_merged(names, &entries).await
    }

    /// Streams `entries` (key, value) into the `COPY ... FROM STDIN (FORMAT binary)`
    /// statement `copy`: PostgreSQL's binary COPY format, encoded here into chunks of about
    /// [`COPY_SEND_BYTES`] (one send each, rather than one per row).
    async fn copy_rows(&self, copy: &str, entries: &[(&[u8], &[u8])]) -> StateResult<()> {
        self.copy_binary(copy, entries, |buf, (k, v)| {
            buf.put_i16(2);
            for field in [k, v] {
                put_field(buf, field)?;
            }
            Ok(())
        })
        .await
    }

    /// Streams `rows` into the `COPY ... FROM STDIN (FORMAT binary)` statement `copy`:
    /// PostgreSQL's binary COPY format (header, each row as `put_row` encodes it, trailer),
    /// sent in chunks of about [`COPY_SEND_BYTES`] (one send each, rather than one per row).
    pub(crate) async fn copy_binary<T>(
        &self,
        copy: &str,
        rows: &[T],
        put_row: impl Fn(&mut BytesMut, &T) -> StateResult<()>,
    ) -> StateResult<()> {
        let sink = self.client.copy_in::<_, Bytes>(copy).await?;
        let mut sink = pin!(sink);
        let mut buf = BytesMut::with_capacity(COPY_SEND_BYTES + 64);
        // Header: signature, flags, header extension length.
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0);
        buf.put_i32(0);
        for row in rows {
            put_row(&mut buf, row)?;
            if buf.len() >= COPY_SEND_BYTES {
                sink.send(buf.split().freeze()).await?;
            }
        }
        // Trailer.
        buf.put_i16(-1);
        sink.send(buf.split().freeze()).await?;
        sink.finish().await?;
        Ok(())
    }

    /// Binary COPY into a session-local staging table, then one upsert from it, in one
    /// transaction (`entries` already without duplicate keys, in key order).
    async fn copy_merged(
        &self,
        names: &TableNames,
        entries: &[(&[u8], &[u8])],
    ) -> StateResult<u64> {
        let merge = upsert_sql(
            names,
            "SELECT key, value FROM pg_temp.pgstate_copy_rows ORDER BY key",
            &["key", "value"],
            false,
            REPLACE,
            "",
        );
        let stage_ready = self.copy_stage_ready.load(Relaxed);
        // Behind PgBouncer's transaction pooling the next transaction may run on another
        // server session: the staging table lives for this transaction only.
        let per_transaction = self.stmts.unnamed();
        let written = self
            .in_transaction(async {
                if per_transaction {
                    self.client
                        .batch_execute(
                            "CREATE TEMP TABLE pgstate_copy_rows \
                             (key bytea NOT NULL, value bytea NOT NULL) ON COMMIT DROP",
                        )
                        .await?;
                } else if !stage_ready {
                    self.client
                        .batch_execute(
                            "CREATE TEMP TABLE IF NOT EXISTS pgstate_copy_rows \
                             (key bytea NOT NULL, value bytea NOT NULL) ON COMMIT DELETE ROWS",
                        )
                        .await?;
                }
                self.copy_rows(
                    "COPY pg_temp.pgstate_copy_rows (key, value) FROM STDIN (FORMAT binary)",
                    entries,
                )
                .await?;
                Ok(self.execute_cached(merge.as_str(), &[]).await?)
            })
            .await?;
        self.copy_stage_ready.store(!per_transaction, Relaxed);
        Ok(written)
    }
}

/// One binary COPY field: its length, then its bytes. (Keys and values are checked far
/// below 2 GiB before a batch gets here.)
pub(crate) fn put_field(buf: &mut BytesMut, field: &[u8]) -> StateResult<()> {
    let len = i32::try_from(field.len())
        .map_err(|_| StateError::invalid("a COPY field is larger than 2 GiB"))?;
    buf.put_i32(len);
    buf.put_slice(field);
    Ok(())
}

/// The probe for any existing key among `$1` (a `bytea[]`): a row when one exists.
///
/// Not `EXISTS (subquery)`: Citus cannot plan that generically. Not `key = ANY($1) LIMIT 1`
/// either: a generic plan made while the table is empty (the first batch of a new table, and
/// statements stay prepared per connection) is a sequential scan filtering each row against
/// the whole array, which later batches then ran over every row (measured: 17 s for a
/// 10 000-key probe of a 100 000-row table). Joined with the array, every plan is linear: a
/// hash join, or an index lookup per key.
pub(crate) fn copy_probe_sql(table: &str) -> String {
    format!("SELECT 1 FROM unnest($1::bytea[]) AS probe(key) JOIN {table} t ON t.key = probe.key LIMIT 1")
}

impl Store {
    /// UNNEST batches of at most [`BATCH_CHUNK_ROWS`](crate::state::ops::batch::BATCH_CHUNK_ROWS) rows / [`BATCH_CHUNK_BYTES`](crate::state::ops::batch::BATCH_CHUNK_BYTES) bytes, all in
    /// one transaction when there is more than one chunk, so the batch is all-or-nothing.
    pub async fn batch_put(
        &self,
        session: &Session,
        entries: &[(&[u8], &[u8])],
    ) -> StateResult<()> {
        check_batch(entries)?;
        if entries.is_empty() {
            return Ok(());
        }
        self.write(
            session,
            Op::BatchPut,
            entries.len() as u64,
            Use::Own,
            async |c| c.batch_put(entries, true).await,
        )
        .await?;
        self.ctx.stats.moved(batch_bytes(entries), 0);
        Ok(())
    }

    pub async fn batch_copy(
        &self,
        session: &Session,
        entries: &[(&[u8], &[u8])],
    ) -> StateResult<u64> {
        check_batch(entries)?;
        if entries.is_empty() {
            return Ok(0);
        }
        let names = &self.ctx.names;
        self.write(
            session,
            Op::BatchCopy,
            entries.len() as u64,
            Use::Own,
            async |c| c.batch_copy(names, entries).await,
        )
        .await
        .inspect(|_| self.ctx.stats.moved(batch_bytes(entries), 0))
    }
}

/// The bytes of a batch's keys and values.
pub(crate) fn batch_bytes(entries: &[(&[u8], &[u8])]) -> usize {
    entries.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_occurrence_wins_in_key_order() {
        let e: Vec<(&[u8], &[u8])> = vec![
            (b"b", b"1"),
            (b"a", b"1"),
            (b"b", b"2"),
            (b"ab", b"1"),
            (b"a", b"3"),
        ];
        let v = |k: &'static [u8], v: &'static [u8]| (k, v);
        assert_eq!(
            last_wins(&e),
            vec![v(b"a", b"3"), v(b"ab", b"1"), v(b"b", b"2")]
        );
    }
}

#[cfg(test)]
mod probe_plan {
    use pgstate_testcluster::{Cluster, ClusterOptions};

    use super::copy_probe_sql;
    use crate::state::{EnhancedPostgresBackend, EnhancedPostgresConfig};

    /// The COPY probe, planned generically on an empty table and run after the table filled,
    /// never filters rows against the array (which made each probe scan every row times every
    /// key).
    #[tokio::test]
    async fn the_copy_probe_planned_on_an_empty_table_never_filters_rows_by_the_array() {
        let cluster = tokio::task::spawn_blocking(|| {
            Cluster::start(ClusterOptions {
                tls: false,
                ..ClusterOptions::default()
            })
        })
        .await
        .expect("cluster task")
        .expect("cluster");
        let url = cluster.primary_url();
        let backend = EnhancedPostgresBackend::new(
            EnhancedPostgresConfig::new(url.clone()).with_schema("probe"),
        )
        .await
        .expect("backend");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let sql = copy_probe_sql(backend.table());
        client
            .batch_execute(&format!(
                "SET plan_cache_mode = force_generic_plan; PREPARE probe(bytea[]) AS {sql}"
            ))
            .await
            .expect("prepare");
        let array = "'{\"\\\\x6e31\",\"\\\\x6e32\"}'::bytea[]";
        // Planned now, on the empty table: the plan is kept for the session.
        client
            .batch_execute(&format!("EXECUTE probe({array})"))
            .await
            .expect("first probe");
        client
            .batch_execute(&format!(
                "INSERT INTO {} (key, value) SELECT convert_to('k' || g, 'UTF8'), 'v' \
                 FROM generate_series(1, 20000) g",
                backend.table()
            ))
            .await
            .expect("fill");
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN EXECUTE probe({array})"), &[])
            .await
            .expect("explain")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Scan"), "a plan: {plan}");
        assert!(
            !plan.contains("ANY"),
            "a row filter against the array: {plan}"
        );
        assert!(
            !plan.contains("Join Filter"),
            "a join filtering pairs: {plan}"
        );
    }
}
