//! The epoch commit: one transaction that checks the claim is still current, applies the
//! buffered changes, records the source offsets and appends the outputs to the outbox.
//!
//! In order: a compare-and-set on the claim's own row (bump its commit count where its epoch
//! is still there; a later claim deleted it, so no row means fenced; the row's lock then
//! keeps a new claim waiting until this transaction ends), the puts by one UNNEST upsert per
//! chunk, the deletes by one UNNEST tombstone update, the offsets by one UNNEST upsert, and
//! last the outbox rows (the head row's lock, which orders commits, is held shortest).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::claim::SourceOffset;
use super::outbox::Output;
use super::{check_name, idle_limit_ms};
use crate::state::config::enhanced::IsolationLevel;
use crate::state::error::{StateError, StateResult};
use crate::state::limits::{check_value, MAX_KEY_LEN};
use crate::state::ops::batch::{BATCH_CHUNK_BYTES, BATCH_CHUNK_ROWS};
use crate::state::pool::context::Context;
use crate::state::routing::causal::Session;
use crate::state::stats::operation::Op;
use crate::state::transaction::tx::PostgresTransaction;
use crate::state::wire::statements::{rewindow, upsert_sql, Param, LIVE, REPLACE, TOMBSTONE};

/// A buffered change of one key.
#[derive(Clone, Debug)]
pub(crate) enum Pending {
    /// Write this value (with its metadata, and its TTL counted from the commit's statement).
    Put {
        value: Vec<u8>,
        metadata: Option<serde_json::Value>,
        ttl: Option<Duration>,
        /// When reads under the claim stop seeing it before it is committed (the TTL from
        /// when it was buffered: earlier than the server's count, which starts at commit).
        until: Option<Instant>,
    },
    /// Delete the key.
    Delete,
}

/// Which claim commits, and how many of its commits it saw land.
pub(crate) struct ClaimId<'a> {
    pub operator: &'a str,
    pub epoch: i64,
    pub commits: u64,
}

/// What a commit that landed reports back.
pub(crate) struct Landed {
    /// The claim's commit count after it.
    pub number: u64,
    /// The outbox positions its outputs got.
    pub outbox: Option<RangeInclusive<i64>>,
}

/// Checks what a commit would send, before anything is sent.
pub(crate) fn check_inputs(offsets: &[SourceOffset], outputs: &[Output]) -> StateResult<()> {
    for o in offsets {
        check_name("source name", &o.source)?;
    }
    for (i, o) in outputs.iter().enumerate() {
        let checked = (|| {
            check_name("output topic", &o.topic)?;
            if o.key.len() > MAX_KEY_LEN {
                return Err(StateError::invalid(format!(
                    "output key is {} bytes; at most {MAX_KEY_LEN} allowed",
                    o.key.len()
                )));
            }
            check_value(&o.payload)
        })();
        checked.map_err(|e| StateError::invalid(format!("output {i}: {e}")))?;
    }
    Ok(())
}

/// The last offset given for each source partition, in order.
fn last_offsets(offsets: &[SourceOffset]) -> BTreeMap<(&str, i32), i64> {
    offsets
        .iter()
        .map(|o| ((o.source.as_str(), o.partition), o.offset))
        .collect()
}

/// Runs the commit transaction. `Err(EpochFenced)` when the claim was replaced; any other
/// error but [`StateError::CommitOutcomeUnknown`] means nothing was committed.
pub(crate) async fn run(
    ctx: &Arc<Context>,
    owner: (Arc<Session>, bool),
    claim: &ClaimId<'_>,
    pending: &BTreeMap<Vec<u8>, Pending>,
    offsets: &[SourceOffset],
    outputs: &[Output],
) -> StateResult<Landed> {
    let mut tx =
        PostgresTransaction::begin(ctx.clone(), owner, IsolationLevel::ReadCommitted, false)
            .await?;
    let number = match check_epoch(&mut tx, claim).await? {
        Ok(number) => number,
        Err(found) => {
            let _ = tx.rollback().await;
            return Err(match found {
                None => StateError::EpochFenced {
                    operator: claim.operator.to_string(),
                    epoch: claim.epoch,
                },
                Some(found) => StateError::OutcomeUnknown(format!(
                    "operator {:?} epoch {} has {found} commits in the database, but {} were \
                     acknowledged to its claim: an acknowledged commit was lost (a failover to a \
                     standby that had not received it?); nothing of this commit was applied: \
                     claim again to continue from the database's state",
                    claim.operator, claim.epoch, claim.commits
                )),
            });
        }
    };
    write_changes(&mut tx, pending).await?;
    write_offsets(&mut tx, claim, offsets).await?;
    let outbox = write_outputs(&mut tx, claim, outputs).await?;
    tx.commit().await?;
    Ok(Landed {
        number: number.max(0) as u64,
        outbox,
    })
}

/// The compare-and-set on the claim's row, where its epoch is still there with the commit
/// count the claim saw land: the new count. Otherwise the count found (`None`: no row, the
/// claim was replaced).
async fn check_epoch(
    tx: &mut PostgresTransaction,
    claim: &ClaimId<'_>,
) -> StateResult<Result<i64, Option<i64>>> {
    let n = &tx.ctx.names;
    let cas = format!(
        "WITH c AS (UPDATE {} SET commits = commits + 1, committed_at = statement_timestamp() \
                    WHERE state_table = $1 AND operator = $2 AND epoch = $3 AND commits = $5 \
                    RETURNING commits) \
         SELECT c.commits, set_config('idle_in_transaction_session_timeout', $4, true) FROM c",
        n.claims
    );
    let found = format!(
        "SELECT commits FROM {} WHERE state_table = $1 AND operator = $2 AND epoch = $3",
        n.claims
    );
    let table = n.table.as_str().to_string();
    let idle = idle_limit_ms(tx.ctx.limit);
    let expected = i64::try_from(claim.commits).unwrap_or(i64::MAX);
    tx.stmt(Op::EpochCheck, 1, async |c| {
        let t = || (&table as Param<'_>, Type::TEXT);
        let o = || (&claim.operator as Param<'_>, Type::TEXT);
        let e = || (&claim.epoch as Param<'_>, Type::INT8);
        let row = c
            .client
            .query_typed_opt(
                &cas,
                &[t(), o(), e(), (&idle, Type::TEXT), (&expected, Type::INT8)],
            )
            .await?;
        if let Some(r) = row {
            return Ok(Ok(r.try_get(0)?));
        }
        let row = c.client.query_typed_opt(&found, &[t(), o(), e()]).await?;
        Ok(Err(row.map(|r| r.try_get(0)).transpose()?))
    })
    .await
}

/// The buffered puts (UNNEST chunks, in key order) and deletes (tombstone updates of up to
/// [`BATCH_CHUNK_ROWS`] keys each).
async fn write_changes(
    tx: &mut PostgresTransaction,
    pending: &BTreeMap<Vec<u8>, Pending>,
) -> StateResult<()> {
    let names = &tx.ctx.names;
    let upsert = upsert_sql(
        names,
        "SELECT key, value, metadata, CASE WHEN ttl_us IS NULL THEN NULL \
                ELSE statement_timestamp() + ttl_us * interval '1 microsecond' END \
         FROM unnest($1::bytea[], $2::bytea[], $3::jsonb[], $4::int8[]) \
              AS u(key, value, metadata, ttl_us)",
        &["key", "value", "metadata", "expires_at"],
        false,
        REPLACE,
        "",
    );
    let delete = format!(
        "UPDATE {} SET {TOMBSTONE}{} WHERE key = ANY($1) AND {LIVE}",
        names.qualified,
        rewindow(names)
    );
    let empty = serde_json::Value::Object(Default::default());
    let mut deletes: Vec<&[u8]> = Vec::new();
    let mut chunk = PutChunk::default();
    for (key, change) in pending {
        match change {
            Pending::Delete => deletes.push(key),
            Pending::Put {
                value,
                metadata,
                ttl,
                ..
            } => {
                if chunk.keys.len() == BATCH_CHUNK_ROWS
                    || chunk.bytes + key.len() + value.len() > BATCH_CHUNK_BYTES
                {
                    chunk.send(tx, &upsert).await?;
                }
                chunk.keys.push(key);
                chunk.values.push(value);
                chunk.metadata.push(metadata.as_ref().unwrap_or(&empty));
                chunk
                    .ttls
                    .push(ttl.map(|t| t.as_micros().min(i64::MAX as u128) as i64));
                chunk.bytes += key.len() + value.len();
            }
        }
    }
    chunk.send(tx, &upsert).await?;
    for part in deletes.chunks(BATCH_CHUNK_ROWS) {
        tx.stmt(Op::EpochWrite, part.len() as u64, async |c| {
            Ok(c.client
                .execute_typed(&delete, &[(&part, Type::BYTEA_ARRAY)])
                .await?)
        })
        .await?;
    }
    Ok(())
}

/// One UNNEST upsert's arrays.
#[derive(Default)]
struct PutChunk<'a> {
    keys: Vec<&'a [u8]>,
    values: Vec<&'a [u8]>,
    metadata: Vec<&'a serde_json::Value>,
    ttls: Vec<Option<i64>>,
    bytes: usize,
}

impl PutChunk<'_> {
    /// Sends the chunk (if any) and empties it.
    async fn send(&mut self, tx: &mut PostgresTransaction, upsert: &str) -> StateResult<()> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let rows = self.keys.len() as u64;
        let this = &*self;
        tx.stmt(Op::EpochWrite, rows, async |c| {
            Ok(c.client
                .execute_typed(
                    upsert,
                    &[
                        (&this.keys, Type::BYTEA_ARRAY),
                        (&this.values, Type::BYTEA_ARRAY),
                        (&this.metadata, Type::JSONB_ARRAY),
                        (&this.ttls, Type::INT8_ARRAY),
                    ],
                )
                .await?)
        })
        .await?;
        tx.written += self.bytes;
        self.keys.clear();
        self.values.clear();
        self.metadata.clear();
        self.ttls.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// The source offsets (the last one given for a partition wins).
async fn write_offsets(
    tx: &mut PostgresTransaction,
    claim: &ClaimId<'_>,
    offsets: &[SourceOffset],
) -> StateResult<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let n = &tx.ctx.names;
    let sql = format!(
        "INSERT INTO {} AS o (state_table, operator, source, partition, \"offset\", epoch, committed_at) \
         SELECT $1, $2, s, p, f, $3, statement_timestamp() \
         FROM unnest($4::text[], $5::int4[], $6::int8[]) AS u(s, p, f) \
         ON CONFLICT (state_table, operator, source, partition) DO UPDATE \
         SET \"offset\" = EXCLUDED.\"offset\", epoch = EXCLUDED.epoch, committed_at = EXCLUDED.committed_at",
        n.source_offsets
    );
    let table = n.table.as_str().to_string();
    let last = last_offsets(offsets);
    let sources: Vec<&str> = last.keys().map(|(s, _)| *s).collect();
    let partitions: Vec<i32> = last.keys().map(|(_, p)| *p).collect();
    let positions: Vec<i64> = last.values().copied().collect();
    tx.stmt(Op::SourceOffsets, last.len() as u64, async |c| {
        Ok(c.client
            .execute_typed(
                &sql,
                &[
                    (&table, Type::TEXT),
                    (&claim.operator, Type::TEXT),
                    (&claim.epoch, Type::INT8),
                    (&sources, Type::TEXT_ARRAY),
                    (&partitions, Type::INT4_ARRAY),
                    (&positions, Type::INT8_ARRAY),
                ],
            )
            .await?)
    })
    .await?;
    Ok(())
}

/// The outputs, numbered from the outbox head (raised once for all of them), inserted by
/// UNNEST chunks; the positions they got.
async fn write_outputs(
    tx: &mut PostgresTransaction,
    claim: &ClaimId<'_>,
    outputs: &[Output],
) -> StateResult<Option<RangeInclusive<i64>>> {
    if outputs.is_empty() {
        return Ok(None);
    }
    let n = tx.ctx.names.clone();
    let raise = format!(
        "UPDATE {} SET position = position + $2 WHERE state_table = $1 \
         RETURNING position - $2",
        n.outbox_heads
    );
    let insert = format!(
        "INSERT INTO {} (state_table, position, operator, epoch, topic, key, payload, committed_at) \
         SELECT $1, $3 + o.n, $2, $4, o.topic, o.key, o.payload, statement_timestamp() \
         FROM unnest($5::text[], $6::bytea[], $7::bytea[]) WITH ORDINALITY AS o(topic, key, payload, n)",
        n.outbox
    );
    let table = n.table.as_str().to_string();
    let count = outputs.len() as i64;
    let row = tx
        .stmt(Op::OutboxWrite, 1, async |c| {
            Ok(c.client
                .query_typed_opt(&raise, &[(&table, Type::TEXT), (&count, Type::INT8)])
                .await?)
        })
        .await?;
    let base: i64 = match row {
        Some(r) => r.try_get(0)?,
        None => {
            return Err(StateError::NotInitialized(format!(
                "the outbox of {} has no head row",
                n.label
            )))
        }
    };
    let mut start = 0;
    while start < outputs.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < outputs.len()
            && end - start < BATCH_CHUNK_ROWS
            && (end == start
                || bytes + outputs[end].key.len() + outputs[end].payload.len() <= BATCH_CHUNK_BYTES)
        {
            bytes += outputs[end].key.len() + outputs[end].payload.len();
            end += 1;
        }
        let chunk = &outputs[start..end];
        let topics: Vec<&str> = chunk.iter().map(|o| o.topic.as_str()).collect();
        let keys: Vec<&[u8]> = chunk.iter().map(|o| o.key.as_slice()).collect();
        let payloads: Vec<&[u8]> = chunk.iter().map(|o| o.payload.as_slice()).collect();
        let first = base + start as i64;
        tx.stmt(Op::OutboxWrite, chunk.len() as u64, async |c| {
            Ok(c.client
                .execute_typed(
                    &insert,
                    &[
                        (&table, Type::TEXT),
                        (&claim.operator, Type::TEXT),
                        (&first, Type::INT8),
                        (&claim.epoch, Type::INT8),
                        (&topics, Type::TEXT_ARRAY),
                        (&keys, Type::BYTEA_ARRAY),
                        (&payloads, Type::BYTEA_ARRAY),
                    ],
                )
                .await?)
        })
        .await?;
        start = end;
    }
    Ok(Some(base + 1..=base + count))
}
