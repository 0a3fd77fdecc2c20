//! Claims: an operator (or a range of its key groups) taken by one instance under a new
//! epoch, and what the instance recovers with it.
//!
//! One transaction: raise the operator's epoch (its row's lock serialises claims of the
//! operator), delete every claim overlapping the key groups (waiting for a commit of one of
//! them that is under way, which holds its row, at most half the operation timeout: then
//! that commit's session is ended), insert this claim, then read the committed source
//! offsets. READ COMMITTED: each statement sees what committed before it started, so
//! the offsets read are those of the last commit of any replaced claim.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::{check_name, idle_limit_ms};
use crate::state::config::enhanced::IsolationLevel;
use crate::state::error::{StateError, StateResult};
use crate::state::pool::context::Context;
use crate::state::routing::causal::Session;
use crate::state::schema::names::TableNames;
use crate::state::stats::operation::Op;
use crate::state::transaction::tx::PostgresTransaction;
use crate::state::wire::connection::PgConn;
use crate::state::wire::statements::Param;

/// The default bound of a claim's cache of owned keys: 64 MiB of keys and values.
pub const DEFAULT_CLAIM_CACHE_BYTES: usize = 64 << 20;

/// What to claim: an operator, optionally a range of its key groups.
///
/// Key groups are numbers the application gives its keys (typically a hash of the key modulo
/// a fixed count, as Flink does); pgstate does not look inside keys. A claim of some groups
/// replaces (fences) every current claim of the same operator that overlaps them, so
/// rescaling from two instances owning `0..=63` and `64..=127` to one owning `0..=127`
/// fences both. The whole operator is groups `0..=u32::MAX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    name: String,
    groups: RangeInclusive<u32>,
    cache_bytes: usize,
}

impl Operator {
    /// The whole operator `name` (every key group).
    pub fn new(name: impl Into<String>) -> Self {
        Operator {
            name: name.into(),
            groups: 0..=u32::MAX,
            cache_bytes: DEFAULT_CLAIM_CACHE_BYTES,
        }
    }

    /// Claims only key groups `groups` (an empty range is refused when claiming).
    pub fn key_groups(mut self, groups: RangeInclusive<u32>) -> Self {
        self.groups = groups;
        self
    }

    /// Bounds the claim's cache of owned keys to about `bytes` of keys and values (least
    /// recently used ones go first); `0` turns the cache off. Default [`DEFAULT_CLAIM_CACHE_BYTES`].
    pub fn cache_capacity(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key groups claimed.
    pub fn groups(&self) -> RangeInclusive<u32> {
        self.groups.clone()
    }

    /// The cache bound, in bytes.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    fn check(&self) -> StateResult<()> {
        check_name("operator name", &self.name)?;
        if self.groups.is_empty() {
            return Err(StateError::invalid(format!(
                "key group range {:?} is empty",
                self.groups
            )));
        }
        Ok(())
    }
}

impl From<&str> for Operator {
    fn from(name: &str) -> Self {
        Operator::new(name)
    }
}

impl From<String> for Operator {
    fn from(name: String) -> Self {
        Operator::new(name)
    }
}

/// A position in a source: how far the input of one partition of `source` was consumed.
/// pgstate stores it; what it means (a Kafka offset, a row id, a byte position) is the
/// application's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceOffset {
    /// The source (a topic, a table, a file).
    pub source: String,
    /// The source's partition.
    pub partition: i32,
    /// The position committed.
    pub offset: i64,
}

impl SourceOffset {
    /// The position `offset` of `source`'s `partition`.
    pub fn new(source: impl Into<String>, partition: i32, offset: i64) -> Self {
        SourceOffset {
            source: source.into(),
            partition,
            offset,
        }
    }
}

/// A claim that a new one replaced: its epoch, its key groups and how many commits it made
/// (so a commit whose outcome was unknown is settled: it landed if its number is at most
/// `commits`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousClaim {
    /// Its epoch.
    pub epoch: i64,
    /// Its key groups.
    pub key_groups: RangeInclusive<u32>,
    /// Its commits that landed.
    pub commits: u64,
    /// When it was claimed (the server's clock).
    pub claimed_at: SystemTime,
    /// When its last commit landed, if any.
    pub last_commit_at: Option<SystemTime>,
}

/// What a new claim starts from: its epoch, the last committed source offsets of the
/// operator (state is exactly as of those commits), and the claims it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The new claim's epoch (higher than every earlier epoch of the operator).
    pub epoch: i64,
    /// The operator's committed positions, by source and partition.
    pub offsets: Vec<SourceOffset>,
    /// The claims this one replaced (fenced), oldest first.
    pub previous: Vec<PreviousClaim>,
}

impl Recovery {
    /// The committed position of `source`'s `partition`, if one was ever committed.
    pub fn offset(&self, source: &str, partition: i32) -> Option<i64> {
        self.offsets
            .iter()
            .find(|o| o.source == source && o.partition == partition)
            .map(|o| o.offset)
    }
}

/// The statements of a claim, on one state table's names. Parameters: `$1` the table,
/// `$2` the operator, `$3`/`$4` the first and last key group (`bump`: `$3` the idle limit;
/// `insert`: `$3` the epoch, `$4`/`$5` the groups).
struct ClaimSql {
    /// Raises the operator's epoch (and sets the transaction's idle limit).
    bump: String,
    /// Deletes the overlapping claims, returning them.
    replace: String,
    /// Ends the sessions of the transactions holding overlapping claim rows: a commit under
    /// way locks its row, so its transaction id is the row's xmax, and a transaction holds
    /// the lock on its own id.
    holders: String,
    insert: String,
    /// Makes sure the table's outbox has a head row.
    head: String,
    /// The operator's committed offsets.
    offsets: String,
}

impl ClaimSql {
    fn new(n: &TableNames) -> Self {
        ClaimSql {
            bump: format!(
                "WITH s AS (SELECT set_config('idle_in_transaction_session_timeout', $3, true)) \
                 INSERT INTO {} AS o (state_table, operator, epoch) SELECT $1, $2, 1 FROM s \
                 ON CONFLICT (state_table, operator) DO UPDATE SET epoch = o.epoch + 1 \
                 RETURNING epoch",
                n.operators
            ),
            replace: format!(
                "DELETE FROM {} WHERE state_table = $1 AND operator = $2 \
                   AND first_group <= $4 AND last_group >= $3 \
                 RETURNING epoch, first_group, last_group, commits, claimed_at, committed_at",
                n.claims
            ),
            holders: format!(
                "SELECT pg_terminate_backend(l.pid) FROM {} c \
                 JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid = c.xmax \
                                AND l.granted AND l.mode = 'ExclusiveLock' \
                 WHERE c.state_table = $1 AND c.operator = $2 \
                   AND c.first_group <= $4 AND c.last_group >= $3 AND l.pid <> pg_backend_pid()",
                n.claims
            ),
            insert: format!(
                "INSERT INTO {} (state_table, operator, epoch, first_group, last_group, claimed_at) \
                 VALUES ($1, $2, $3, $4, $5, statement_timestamp())",
                n.claims
            ),
            head: format!(
                "INSERT INTO {} (state_table, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                n.outbox_heads
            ),
            offsets: format!(
                "SELECT source, partition, \"offset\" FROM {} \
                 WHERE state_table = $1 AND operator = $2 ORDER BY source, partition",
                n.source_offsets
            ),
        }
    }
}

/// Takes a claim of `op` (see the module docs).
pub(crate) async fn take(
    ctx: &Arc<Context>,
    owner: (Arc<Session>, bool),
    op: &Operator,
) -> StateResult<Recovery> {
    op.check()?;
    let sql = ClaimSql::new(&ctx.names);
    let table = ctx.names.table.as_str();
    let name = op.name.as_str();
    let (first, last) = (i64::from(*op.groups.start()), i64::from(*op.groups.end()));
    let idle = idle_limit_ms(ctx.limit);
    let mut tx =
        PostgresTransaction::begin(ctx.clone(), owner, IsolationLevel::ReadCommitted, false)
            .await?;
    let recovery = tx
        .stmt(Op::Claim, 1, async |c| {
            let t = || (&table as Param<'_>, Type::TEXT);
            let o = || (&name as Param<'_>, Type::TEXT);
            let lo = || (&first as Param<'_>, Type::INT8);
            let hi = || (&last as Param<'_>, Type::INT8);
            let epoch: i64 = c
                .client
                .query_typed_one(&sql.bump, &[t(), o(), (&idle, Type::TEXT)])
                .await?
                .try_get(0)?;
            let params = [t(), o(), lo(), hi()];
            let replaced = replace_claims(c, &sql, &params, ctx.limit / 2).await?;
            let mut previous = replaced
                .iter()
                .map(previous_claim)
                .collect::<StateResult<Vec<_>>>()?;
            previous.sort_by_key(|p| p.epoch);
            c.client
                .execute_typed(&sql.insert, &[t(), o(), (&epoch, Type::INT8), lo(), hi()])
                .await?;
            c.client.execute_typed(&sql.head, &[t()]).await?;
            let offsets = c
                .client
                .query_typed(&sql.offsets, &[t(), o()])
                .await?
                .iter()
                .map(|r| {
                    Ok(SourceOffset {
                        source: r.try_get(0)?,
                        partition: r.try_get(1)?,
                        offset: r.try_get(2)?,
                    })
                })
                .collect::<StateResult<Vec<_>>>()?;
            Ok(Recovery {
                epoch,
                offsets,
                previous,
            })
        })
        .await?;
    tx.commit().await?;
    Ok(recovery)
}

/// Deletes the claims overlapping the new one (`sql.replace`), waiting at most `grace` for a
/// commit under way on one of them; past that, its session is ended (`sql.holders`: an instance
/// paused in the middle of sending a statement, which the server's idle timeout does not
/// end) and the delete waits for it to go. Its rows.
async fn replace_claims(
    c: &PgConn,
    sql: &ClaimSql,
    params: &[(Param<'_>, Type)],
    grace: Duration,
) -> StateResult<Vec<tokio_postgres::Row>> {
    // (The driver takes the parameters by value, and `Type` is not `Copy`.)
    let again =
        || -> Vec<(Param<'_>, Type)> { params.iter().map(|(v, t)| (*v, t.clone())).collect() };
    c.client
        .batch_execute(&format!(
            "SAVEPOINT pgstate_claim; SET LOCAL lock_timeout = '{}ms'",
            grace.as_millis().clamp(1, i32::MAX as u128)
        ))
        .await?;
    match c.client.query_typed(&sql.replace, &again()).await {
        Ok(rows) => return Ok(rows),
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {}
        Err(e) => return Err(e.into()),
    }
    c.client
        .batch_execute("ROLLBACK TO SAVEPOINT pgstate_claim; SET LOCAL lock_timeout = 0")
        .await?;
    let ended = c.client.query_typed(&sql.holders, &again()).await?;
    tracing::warn!(
        target: "pgstate",
        sessions = ended.len(),
        "a claim ended the sessions of commits that held a replaced claim past the grace period"
    );
    Ok(c.client.query_typed(&sql.replace, &again()).await?)
}

fn previous_claim(r: &tokio_postgres::Row) -> StateResult<PreviousClaim> {
    let group = |i: usize| -> StateResult<u32> {
        let g: i64 = r.try_get(i)?;
        u32::try_from(g).map_err(|_| StateError::DeserializationFailed(format!("key group {g}")))
    };
    let commits: i64 = r.try_get(3)?;
    Ok(PreviousClaim {
        epoch: r.try_get(0)?,
        key_groups: group(1)?..=group(2)?,
        commits: commits.max(0) as u64,
        claimed_at: r.try_get(4)?,
        last_commit_at: r.try_get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_are_checked() {
        assert!(Operator::new("wc").check().is_ok());
        assert!(Operator::new("").check().is_err());
        assert!(Operator::new("a\0b").check().is_err());
        assert!(Operator::new("x".repeat(super::super::MAX_NAME_LEN + 1))
            .check()
            .is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = Operator::new("wc").key_groups(5..=4);
        assert!(matches!(empty.check(), Err(StateError::InvalidInput(_))));
        assert_eq!(Operator::from("wc").groups(), 0..=u32::MAX);
    }

    #[test]
    fn recovery_finds_offsets() {
        let r = Recovery {
            epoch: 3,
            offsets: vec![SourceOffset::new("s", 0, 10), SourceOffset::new("s", 1, 20)],
            previous: vec![],
        };
        assert_eq!(r.offset("s", 1), Some(20));
        assert_eq!(r.offset("s", 2), None);
        assert_eq!(r.offset("t", 0), None);
    }
}
