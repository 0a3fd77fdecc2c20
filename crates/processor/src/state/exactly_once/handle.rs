//! [`Claim`]: the handle an instance holds while it owns an operator's key groups.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::cache::OwnedCache;
use super::claim::{Operator, Recovery, SourceOffset};
use super::commit::{self, check_inputs, ClaimId, Pending};
use super::outbox::Output;
use crate::state::error::{ErrorKind, StateError, StateResult};
use crate::state::limits::{check_entry, check_key, check_metadata, check_ttl, MAX_GET_MANY};
use crate::state::pool::context::Context;
use crate::state::routing::causal::Session;
use crate::state::stats::counters::failure;
use crate::state::stats::operation::Op;
use crate::state::wire::statements::LIVE;

/// What a commit that landed reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The claim's number of commits so far, this one included (1 for the first).
    pub number: u64,
    /// The outbox positions its outputs got (`None` without outputs).
    pub outbox: Option<RangeInclusive<i64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// A commit is under way, or was dropped or failed with an unknown outcome.
    Unsure,
    /// A later claim replaced this one.
    Fenced,
}

/// An operator (or some of its key groups) owned under an epoch, from
/// [`EnhancedPostgresBackend::claim`](crate::state::EnhancedPostgresBackend::claim).
///
/// Writes ([`put`](Self::put), [`delete`](Self::delete), ...) are buffered in memory and
/// [`get`](Self::get) sees them; [`commit`](Self::commit) applies them with source offsets
/// and outputs in one transaction, or refuses everything with
/// [`StateError::EpochFenced`] once a later claim took over. Values read or written under
/// the claim stay cached (nobody else may write the claim's keys): a repeated `get` costs
/// no round trip. Entries with a TTL are not cached (their expiry is the server's).
///
/// Keys are the application's to assign to key groups: pgstate trusts that only the
/// holder of a key's group writes it, through its claim.
///
/// Cancel-safe: dropping a [`commit`](Self::commit) future leaves the claim unsure of that
/// commit's outcome; every later call then fails with [`StateError::OutcomeUnknown`], and
/// a new claim's [`Recovery`] says whether it landed.
pub struct Claim {
    ctx: Arc<Context>,
    owner: (Arc<Session>, bool),
    operator: Operator,
    recovery: Recovery,
    pending: BTreeMap<Vec<u8>, Pending>,
    cache: OwnedCache,
    commits: u64,
    offsets: BTreeMap<(String, i32), i64>,
    state: State,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("table", &self.ctx.names.label)
            .field("operator", &self.operator.name())
            .field("key_groups", &self.operator.groups())
            .field("epoch", &self.recovery.epoch)
            .field("commits", &self.commits)
            .field("pending", &self.pending.len())
            .field("cached", &self.cache.len())
            .field("state", &self.state)
            .finish()
    }
}

impl Claim {
    /// Takes a claim of `operator` (see the `claim` module).
    pub(crate) async fn take(
        ctx: Arc<Context>,
        owner: (Arc<Session>, bool),
        operator: Operator,
    ) -> StateResult<Self> {
        let recovery = super::claim::take(&ctx, owner.clone(), &operator).await?;
        let offsets = recovery
            .offsets
            .iter()
            .map(|o| ((o.source.clone(), o.partition), o.offset))
            .collect();
        Ok(Claim {
            cache: OwnedCache::new(operator.cache_bytes()),
            ctx,
            owner,
            operator,
            recovery,
            pending: BTreeMap::new(),
            commits: 0,
            offsets,
            state: State::Open,
        })
    }

    /// The claim's epoch.
    pub fn epoch(&self) -> i64 {
        self.recovery.epoch
    }

    /// What was claimed.
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    /// What the claim started from: the committed offsets and the claims it replaced.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// How many of this claim's commits landed.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// The last committed position of `source`'s `partition` (from the recovery, then from
    /// this claim's own commits).
    pub fn offset(&self, source: &str, partition: i32) -> Option<i64> {
        self.offsets.get(&(source.to_string(), partition)).copied()
    }

    /// How many keys have buffered changes.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// How many keys the cache holds, and the bytes accounted to them.
    pub fn cached(&self) -> (usize, usize) {
        (self.cache.len(), self.cache.used())
    }

    fn usable(&self) -> StateResult<()> {
        match self.state {
            State::Open => Ok(()),
            State::Fenced => Err(StateError::EpochFenced {
                operator: self.operator.name().to_string(),
                epoch: self.epoch(),
            }),
            State::Unsure => Err(StateError::OutcomeUnknown(format!(
                "a commit of operator {:?} epoch {} was cancelled or lost before its outcome \
                 was known: claim the operator again (its recovery says whether commit {} \
                 landed)",
                self.operator.name(),
                self.epoch(),
                self.commits + 1
            ))),
        }
    }

    /// The value of `key`: a buffered change, else the cache, else the primary (cached then).
    pub async fn get(&mut self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        Ok(self.get_many(&[key]).await?.pop().flatten())
    }

    /// The values of `keys`, in order: what is not buffered or cached is read from the
    /// primary in one statement per [`MAX_GET_MANY`] keys.
    pub async fn get_many(&mut self, keys: &[&[u8]]) -> StateResult<Vec<Option<Vec<u8>>>> {
        self.usable()?;
        let mut out = Vec::with_capacity(keys.len());
        let mut missing: Vec<(usize, &[u8])> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            check_key(key)?;
            match self.known(key) {
                Some(v) => out.push(v),
                None => {
                    out.push(None);
                    missing.push((i, key));
                }
            }
        }
        for part in missing.chunks(MAX_GET_MANY) {
            let wanted: Vec<&[u8]> = part.iter().map(|(_, k)| *k).collect();
            let found = self.read(&wanted).await?;
            for (i, key) in part {
                let hit = found.get(*key);
                if let Some((value, cacheable)) = hit {
                    out[*i] = Some(value.clone());
                    if *cacheable {
                        self.cache.insert(key, Some(value.clone()));
                    }
                } else {
                    self.cache.insert(key, None);
                }
            }
        }
        Ok(out)
    }

    /// What is known of `key` without a round trip.
    fn known(&mut self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(change) = self.pending.get(key) {
            return Some(match change {
                Pending::Delete => None,
                Pending::Put { value, until, .. } => {
                    let expired = until.is_some_and(|at| Instant::now() >= at);
                    (!expired).then(|| value.clone())
                }
            });
        }
        self.cache.get(key).map(|v| v.map(<[u8]>::to_vec))
    }

    /// Reads live entries of `keys` from the primary: value, and whether it may be cached
    /// (it does not expire).
    async fn read(&self, keys: &[&[u8]]) -> StateResult<HashMap<Vec<u8>, (Vec<u8>, bool)>> {
        let sql = format!(
            "SELECT key, value, expires_at IS NULL FROM {} WHERE key = ANY($1) AND {LIVE}",
            self.ctx.names.qualified
        );
        let start = Instant::now();
        let rows = self
            .ctx
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed(&sql, &[(&keys, Type::BYTEA_ARRAY)])
                    .await?)
            })
            .await;
        let op = if keys.len() == 1 {
            Op::Get
        } else {
            Op::GetMany
        };
        self.ctx
            .stats
            .record(op, keys.len() as u64, start.elapsed(), failure(&rows));
        let mut found = HashMap::new();
        let mut bytes = 0;
        for r in rows? {
            let value: Vec<u8> = r.try_get(1)?;
            bytes += value.len();
            found.insert(r.try_get(0)?, (value, r.try_get(2)?));
        }
        self.ctx.stats.moved(0, bytes);
        Ok(found)
    }

    /// Buffers a put of `value` under `key`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> StateResult<()> {
        self.put_entry(key, value, None, None)
    }

    /// Buffers a put that expires `ttl` after its commit (on the server's clock).
    pub fn put_with_ttl(&mut self, key: &[u8], value: &[u8], ttl: Duration) -> StateResult<()> {
        self.put_entry(key, value, None, Some(ttl))
    }

    /// Buffers a put with metadata (a JSON object).
    pub fn put_with_metadata(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: serde_json::Value,
    ) -> StateResult<()> {
        self.put_entry(key, value, Some(metadata), None)
    }

    /// Buffers a put with optional metadata and TTL; refused (nothing buffered) when the
    /// key, value, metadata or TTL is invalid.
    pub fn put_entry(
        &mut self,
        key: &[u8],
        value: &[u8],
        metadata: Option<serde_json::Value>,
        ttl: Option<Duration>,
    ) -> StateResult<()> {
        self.usable()?;
        check_entry(key, value)?;
        if let Some(m) = &metadata {
            check_metadata(m)?;
        }
        if let Some(t) = ttl {
            check_ttl(t)?;
        }
        self.pending.insert(
            key.to_vec(),
            Pending::Put {
                value: value.to_vec(),
                metadata,
                ttl,
                until: ttl.and_then(|t| Instant::now().checked_add(t)),
            },
        );
        Ok(())
    }

    /// Buffers a delete of `key` (a missing key is fine).
    pub fn delete(&mut self, key: &[u8]) -> StateResult<()> {
        self.usable()?;
        check_key(key)?;
        self.pending.insert(key.to_vec(), Pending::Delete);
        Ok(())
    }

    /// Drops every buffered change.
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    /// Applies the buffered changes, records `offsets` (the last one given for a source
    /// partition wins) and appends `outputs` to the outbox, all in one transaction, if this
    /// claim is still current: otherwise [`StateError::EpochFenced`] and nothing is applied
    /// (the claim is then dead: its buffer and cache are dropped).
    ///
    /// Any other error but an unknown outcome means nothing was committed: the buffer is kept
    /// and `commit` may be called again. [`StateError::CommitOutcomeUnknown`] (the
    /// connection failed after COMMIT was sent), or this future dropped before it finished,
    /// leaves the claim unsure: claim again, and compare the recovery's
    /// [`PreviousClaim::commits`](super::PreviousClaim::commits) with this claim's
    /// [`commits`](Self::commits)` + 1`.
    pub async fn commit(
        &mut self,
        offsets: &[SourceOffset],
        outputs: &[Output],
    ) -> StateResult<Committed> {
        self.usable()?;
        check_inputs(offsets, outputs)?;
        self.state = State::Unsure;
        let id = ClaimId {
            operator: self.operator.name(),
            epoch: self.recovery.epoch,
            commits: self.commits,
        };
        let result = commit::run(
            &self.ctx,
            self.owner.clone(),
            &id,
            &self.pending,
            offsets,
            outputs,
        )
        .await;
        match result {
            Ok(landed) => {
                self.state = State::Open;
                self.landed(offsets);
                self.commits = landed.number;
                Ok(Committed {
                    number: landed.number,
                    outbox: landed.outbox,
                })
            }
            Err(e @ StateError::EpochFenced { .. }) => {
                self.state = State::Fenced;
                self.discard();
                self.cache.clear();
                Err(e)
            }
            // (The state stays unsure.)
            Err(e) if e.kind() == ErrorKind::OutcomeUnknown => {
                self.cache.clear();
                Err(e)
            }
            Err(e) => {
                self.state = State::Open;
                Err(e)
            }
        }
    }

    /// Moves a landed commit's changes into the cache and its offsets into the claim's.
    fn landed(&mut self, offsets: &[SourceOffset]) {
        for (key, change) in std::mem::take(&mut self.pending) {
            match change {
                Pending::Put {
                    value, ttl: None, ..
                } => self.cache.insert(&key, Some(value)),
                Pending::Put { .. } => self.cache.remove(&key),
                Pending::Delete => self.cache.insert(&key, None),
            }
        }
        for o in offsets {
            self.offsets
                .insert((o.source.clone(), o.partition), o.offset);
        }
    }
}
