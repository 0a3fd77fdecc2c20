//! The transactional outbox: outputs committed with an epoch's state, numbered in commit
//! order, read by named readers that acknowledge how far they got.
//!
//! Positions follow commit order: a commit raises its state table's outbox head under the
//! head row's lock, held until the commit ends, so a later commit gets higher positions and
//! a reader that sees a position has every lower one visible too (no gap to skip over).
//!
//! Delivery: a sink that records the position with its own write (a PostgreSQL sink in the
//! same transaction, through [`OutboxReader::acknowledge_in`]) sees each output once; any
//! other sink sees each output at least once (it may get a batch again if it stopped after
//! writing it and before acknowledging).

use std::sync::Arc;
use std::time::SystemTime;

use tokio_postgres::types::Type;

use super::check_name;
use crate::state::error::{ErrorKind, StateError, StateResult};
use crate::state::limits::MAX_PAGE;
use crate::state::pool::context::Context;
use crate::state::stats::operation::Op;
use crate::state::transaction::tx::PostgresTransaction;
use crate::state::wire::connection::PgConn;
use crate::state::wire::statements::Param;

/// One output of an epoch commit: a topic (where the sink sends it), a key and a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Where the output goes (a topic, a table, a channel: the sink's choice).
    pub topic: String,
    /// Its key (may be empty).
    pub key: Vec<u8>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Output {
    /// An output of `payload` under `key` to `topic`.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<Vec<u8>>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Output {
            topic: topic.into(),
            key: key.into(),
            payload: payload.into(),
        }
    }
}

/// An output as committed: its position in the outbox, and the operator and epoch that
/// committed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Its position (1, 2, 3, ... in commit order, per state table).
    pub position: i64,
    /// The operator whose commit wrote it.
    pub operator: String,
    /// That commit's epoch.
    pub epoch: i64,
    /// The output's topic.
    pub topic: String,
    /// The output's key.
    pub key: Vec<u8>,
    /// The output's payload.
    pub payload: Vec<u8>,
    /// When its commit ran (the server's clock).
    pub committed_at: SystemTime,
}

/// A named reader of a state table's outbox: where it acknowledged up to is kept in the
/// database, so a restarted reader goes on from there.
pub struct OutboxReader {
    ctx: Arc<Context>,
    name: String,
    acknowledged: i64,
}

impl std::fmt::Debug for OutboxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxReader")
            .field("table", &self.ctx.names.label)
            .field("name", &self.name)
            .field("acknowledged", &self.acknowledged)
            .finish()
    }
}

impl OutboxReader {
    /// The reader `name` of `ctx`'s table, registered at position 0 if new.
    pub(crate) async fn open(ctx: Arc<Context>, name: &str) -> StateResult<Self> {
        check_name("outbox reader name", name)?;
        let n = &ctx.names;
        let table = n.table.as_str();
        let sql = format!(
            "WITH r AS (INSERT INTO {} (state_table, reader, position, acknowledged_at) \
                        VALUES ($1, $2, 0, statement_timestamp()) \
                        ON CONFLICT (state_table, reader) DO NOTHING RETURNING position) \
             SELECT position FROM r UNION ALL \
             SELECT position FROM {} WHERE state_table = $1 AND reader = $2",
            n.outbox_readers, n.outbox_readers
        );
        let acknowledged = ctx
            .on_primary(async |c| {
                let params = [(&table as Param<'_>, Type::TEXT), (&name, Type::TEXT)];
                // Registered concurrently by another caller, the row is invisible to this
                // statement's snapshot: the second try sees it.
                for _ in 0..2 {
                    let rows = c.client.query_typed(&sql, &params).await?;
                    if let Some(row) = rows.first() {
                        return Ok(row.try_get::<_, i64>(0)?);
                    }
                }
                Err(StateError::NotInitialized(format!(
                    "outbox reader {name:?} could not be registered"
                )))
            })
            .await?;
        Ok(OutboxReader {
            ctx,
            name: name.to_string(),
            acknowledged,
        })
    }

    /// The reader's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The position acknowledged so far (0: none).
    pub fn acknowledged(&self) -> i64 {
        self.acknowledged
    }

    /// Up to `limit` outputs after the acknowledged position, in commit order (at most
    /// [`MAX_PAGE`] per call).
    pub async fn read(&self, limit: usize) -> StateResult<Vec<OutboxRecord>> {
        self.read_after(self.acknowledged, limit).await
    }

    /// Up to `limit` outputs after `position`, in commit order: for a sink that keeps its
    /// position itself (in its own transaction).
    pub async fn read_after(&self, position: i64, limit: usize) -> StateResult<Vec<OutboxRecord>> {
        if limit == 0 || limit > MAX_PAGE {
            return Err(StateError::invalid(format!(
                "outbox read limit {limit}: between 1 and {MAX_PAGE}"
            )));
        }
        let n = &self.ctx.names;
        let table = n.table.as_str();
        let limit = limit as i64;
        let sql = format!(
            "SELECT position, operator, epoch, topic, key, payload, committed_at FROM {} \
             WHERE state_table = $1 AND position > $2 ORDER BY position LIMIT $3",
            n.outbox
        );
        let start = std::time::Instant::now();
        let rows = self
            .ctx
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed(
                        &sql,
                        &[
                            (&table, Type::TEXT),
                            (&position, Type::INT8),
                            (&limit, Type::INT8),
                        ],
                    )
                    .await?)
            })
            .await;
        self.ctx.stats.record(
            Op::OutboxRead,
            1,
            start.elapsed(),
            crate::state::stats::counters::failure(&rows),
        );
        rows?
            .iter()
            .map(|r| {
                Ok(OutboxRecord {
                    position: r.try_get(0)?,
                    operator: r.try_get(1)?,
                    epoch: r.try_get(2)?,
                    topic: r.try_get(3)?,
                    key: r.try_get(4)?,
                    payload: r.try_get(5)?,
                    committed_at: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Records that everything up to `position` was delivered. Positions only move forward
    /// (a lower one changes nothing); one past the outbox's head is refused. At least once:
    /// a sink that stops after delivering and before this returns gets the batch again.
    ///
    /// A timeout or a lost connection after the statement was sent is
    /// [`StateError::OutcomeUnknown`]: acknowledging again is safe.
    pub async fn acknowledge(&mut self, position: i64) -> StateResult<()> {
        let now = self
            .ctx
            .on_primary(async |c| self.ack_on(c, None, position).await)
            .await
            .map_err(unknown_if_sent)?;
        self.acknowledged = now;
        Ok(())
    }

    /// Records, inside `tx` (a transaction of the same database that also writes the sink's
    /// effect), that everything up to `position` was delivered by a batch read after `after`:
    /// both commit or neither, and a second sink instance that read the same batch is refused
    /// ([`StateError::ConcurrentModification`]: roll back), so each output takes effect once.
    /// The reader's own [`acknowledged`](Self::acknowledged) moves only after
    /// [`refresh`](Self::refresh), since `tx` may still roll back.
    pub async fn acknowledge_in(
        &self,
        tx: &mut PostgresTransaction,
        after: i64,
        position: i64,
    ) -> StateResult<()> {
        if position < after {
            return Err(StateError::invalid(format!(
                "outbox position {position} is before {after}, where the batch was read from"
            )));
        }
        tx.stmt(Op::OutboxAck, 1, async |c| {
            self.ack_on(c, Some(after), position).await
        })
        .await?;
        Ok(())
    }

    /// Moves the reader's position to `position` on `c` (from exactly `after`, or else never
    /// back); the position now.
    async fn ack_on(&self, c: &PgConn, after: Option<i64>, position: i64) -> StateResult<i64> {
        let n = &self.ctx.names;
        let sql = format!(
            "UPDATE {} AS r SET position = greatest(r.position, $3), \
                    acknowledged_at = statement_timestamp() \
             WHERE state_table = $1 AND reader = $2 AND $3 >= 0 \
               AND ($4::bigint IS NULL OR r.position = $4) \
               AND $3 <= coalesce((SELECT position FROM {} WHERE state_table = $1), 0) \
             RETURNING r.position",
            n.outbox_readers, n.outbox_heads
        );
        let (table, name) = (n.table.as_str(), self.name.as_str());
        let row = c
            .client
            .query_typed_opt(
                &sql,
                &[
                    (&table, Type::TEXT),
                    (&name, Type::TEXT),
                    (&position, Type::INT8),
                    (&after, Type::INT8),
                ],
            )
            .await?;
        if let Some(r) = row {
            return Ok(r.try_get(0)?);
        }
        let Some(after) = after else {
            return Err(past_head(position));
        };
        let now = format!(
            "SELECT position FROM {} WHERE state_table = $1 AND reader = $2",
            n.outbox_readers
        );
        let row = c
            .client
            .query_typed_opt(&now, &[(&table, Type::TEXT), (&name, Type::TEXT)])
            .await?;
        let now: Option<i64> = row.map(|r| r.try_get(0)).transpose()?;
        if now.is_some_and(|p| p != after) {
            return Err(StateError::ConcurrentModification {
                key: format!("outbox reader {name:?} (acknowledged {now:?}, not {after})")
                    .into_bytes(),
            });
        }
        Err(past_head(position))
    }

    /// Reads the acknowledged position again from the database.
    pub async fn refresh(&mut self) -> StateResult<i64> {
        let fresh = OutboxReader::open(self.ctx.clone(), &self.name).await?;
        self.acknowledged = fresh.acknowledged;
        Ok(self.acknowledged)
    }
}

/// A write that timed out or lost its connection may have been applied.
fn unknown_if_sent(e: StateError) -> StateError {
    match e.kind() {
        ErrorKind::Timeout | ErrorKind::Connection => {
            StateError::OutcomeUnknown(format!("{e}; the statement may have been applied"))
        }
        _ => e,
    }
}

fn past_head(position: i64) -> StateError {
    StateError::invalid(format!(
        "outbox position {position} cannot be acknowledged: it is negative or past the last \
         committed output"
    ))
}

/// Deletes the outputs every reader of `ctx`'s table has acknowledged; with no reader,
/// nothing. Returns how many were deleted. (A reader registered later never sees them.)
pub(crate) async fn prune(ctx: &Context) -> StateResult<u64> {
    let n = &ctx.names;
    let table = n.table.as_str();
    let sql = format!(
        "DELETE FROM {} WHERE state_table = $1 \
           AND position <= (SELECT min(position) FROM {} WHERE state_table = $1)",
        n.outbox, n.outbox_readers
    );
    ctx.on_primary(async |c| {
        Ok(c.client
            .execute_typed(&sql, &[(&table, Type::TEXT)])
            .await?)
    })
    .await
    .map_err(unknown_if_sent)
}
