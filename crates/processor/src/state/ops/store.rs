//! [`Store`]: the key/value operations over the primary's pool and the replicas, each bounded
//! by the operation timeout, counted in the statistics, with reads routed (replicas, failover,
//! read-your-writes) and writes recorded in their session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join;
use tracing::Instrument;

use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::limits::{check_entry, check_key, check_metadata, check_page, MAX_GET_MANY};
use crate::state::ops::coalesce::{Admission, Coalescer, Entry, Found, Lookup, Reply, ALONE_BYTES};
use crate::state::ops::conn_ops::{MetadataQuery, StateEntry};
use crate::state::pool::conn_pool::Use;
use crate::state::pool::context::{bounded, Context};
use crate::state::pool::settle::Watch;
use crate::state::routing::causal::{Scope, Session};
use crate::state::routing::router::{
    current_lsn, replica_failure, ReadTarget, ReplicaFailure, Router,
};
use crate::state::stats::counters::{failure, OpRecord};
use crate::state::stats::operation::{Kind, Op};
use crate::state::wire::connection::PgConn;

/// The future of one read attempt (boxed: see [`Store::read`]).
type ReadFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = StateResult<T>> + Send + 'a>>;

/// Runs of a single write that failed with a serialization failure, after the first.
const WRITE_RETRIES: u32 = 20;

/// The operations over the primary's pool and the replicas; the backends are thin handles
/// around this. (Cloned for the leader of a put group: every field is shared or small.)
#[derive(Clone)]
pub(crate) struct Store {
    /// The primary's pool, names, statistics and operation timeout.
    pub ctx: Arc<Context>,
    pub router: Arc<Router>,
    /// Combines concurrent puts (see the `coalesce` module).
    pub coalescer: Arc<Coalescer<Entry, Reply>>,
    /// Combines concurrent gets, when every read goes to the primary.
    pub lookups: Arc<Coalescer<Lookup, Found>>,
}

impl Store {
    /// Runs `f` on a primary connection, bounded by the operation timeout (no statistics: for
    /// administrative statements).
    pub async fn on_primary<T, F>(&self, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&mut PgConn) -> StateResult<T>,
    {
        self.ctx.on_primary(f).await
    }

    /// Runs `f`, a write made outside [`write`](Self::write) (checkpoint restore, archive,
    /// retention, cleanup), for `session`: with read-your-writes, the primary's WAL position
    /// after it (also after a failure: batches before it may have committed) is raised into
    /// the session's floor, so the session's later reads see it. When that position cannot be
    /// read, the session's next read takes the primary's.
    pub async fn tracked<T>(
        &self,
        session: &Session,
        f: impl std::future::Future<Output = StateResult<T>>,
    ) -> StateResult<T> {
        let mark = self.router.tracks_writes().then(|| session.write());
        let result = f.await;
        if let Some(mark) = mark {
            match self.ctx.bounded(current_lsn(&self.ctx.primary)).await {
                Ok(lsn) => mark.learned(lsn),
                // Dropped unknown: the session is unsure.
                Err(e) => tracing::debug!(error = %e, "cannot read the WAL position after a write"),
            }
        }
        result
    }

    /// The WAL position a read of `scope` must see (see the `causal` module); `None` when only
    /// the primary will do (the session is unsure and the primary's position cannot be read).
    async fn floor(&self, scope: Scope<'_>) -> Option<u64> {
        if scope.primary_only || !self.router.splits_reads() {
            return Some(0);
        }
        if let Some(n) = scope.session.unsure() {
            // Boxed: rare, and as large as a checkout (it would be room in every read).
            match Box::pin(current_lsn(&self.ctx.primary)).await {
                Ok(lsn) => scope.session.cover(n, lsn),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the primary's WAL position");
                    return None;
                }
            }
        }
        Some(scope.session.floor())
    }

    /// A read, routed by the router and bounded by the operation timeout. A replica serves it
    /// only once it has replayed the session's floor: checked in the same round trip for point
    /// reads, before the read for scans (so a lagging replica does not run a scan for nothing);
    /// a replica still behind passes the read on. A replica that fails with a connection error
    /// leaves the rotation and the read runs elsewhere (reads are idempotent); see
    /// [`replica_failure`].
    ///
    /// `f` gets the connection and `arg` for the same lifetime (a closure capturing `arg`
    /// instead could not be run again on the next node's connection).
    ///
    /// Long on purpose: the routing loop (primary, replicas in turn, failover) with the
    /// statistics and floor checks each attempt needs, in one place.
    async fn read<A, T, F>(&self, scope: Scope<'_>, op: Op, arg: &A, f: F) -> StateResult<T>
    where
        A: ?Sized + Sync,
        F: for<'a> Fn(&'a PgConn, &'a A) -> ReadFuture<'a, T>,
    {
        let record = OpRecord::new(&self.ctx.stats, op, 1);
        let record = &record;
        // One future (not one built, then moved into another: rustc would keep room for both).
        async move {
            let result = self
                .ctx
                .bounded(async {
                    let floor = self.floor(scope).await;
                    let force_primary = scope.primary_only || floor.is_none();
                    let floor = floor.unwrap_or(0);
                    // Point reads share pipelined connections; scans, counts and queries (which
                    // would stall the point reads queued behind them) take their own.
                    let (pipelined, how) = if op.kind() == Kind::Get {
                        (true, Use::Point)
                    } else {
                        (false, Use::Own)
                    };
                    let mut tried: Vec<usize> = Vec::new();
                    loop {
                        let (index, replica, verify) =
                            match self.router.pick(&tried, force_primary, floor)? {
                                ReadTarget::Primary => {
                                    let start = Instant::now();
                                    let result = match self.ctx.primary.connection(how).await {
                                        Ok(mut conn) => conn.run(|c| f(c, arg)).await,
                                        Err(e) => Err(e),
                                    };
                                    record.attempt(start, failure(&result));
                                    return result;
                                }
                                ReadTarget::Replica {
                                    index,
                                    replica,
                                    verify,
                                } => (index, replica, verify),
                            };
                        let start = Instant::now();
                        let f = &f;
                        let attempt = match replica.pool.connection(how).await {
                            Err(e) => Err(e),
                            Ok(mut conn) => {
                                conn.run(|c| async move {
                                    if !verify {
                                        return Ok(Some(f(c, arg).await?));
                                    }
                                    let (replay, read) = if pipelined {
                                        let (replay, read) = join(c.replay_lsn(), f(c, arg)).await;
                                        (replay?, Some(read))
                                    } else {
                                        let replay = c.replay_lsn().await?;
                                        let read = if replay >= floor {
                                            Some(f(c, arg).await)
                                        } else {
                                            None
                                        };
                                        (replay, read)
                                    };
                                    if !self.router.learned(index, replay, floor) {
                                        return Ok(None);
                                    }
                                    read.map_or(Ok(None), |r| r.map(Some))
                                })
                                .await
                            }
                        };
                        record.attempt(start, failure(&attempt));
                        match attempt {
                            Ok(Some(value)) => return Ok(value),
                            // Behind the session's floor: not a failure, the read goes elsewhere.
                            Ok(None) => {}
                            Err(e) => match replica_failure(&e) {
                                ReplicaFailure::Down => self.router.replicas[index].mark_down(&e),
                                ReplicaFailure::Conflict => {}
                                ReplicaFailure::Caller => return Err(e),
                            },
                        }
                        self.router.undo_read(index);
                        tried.push(index);
                    }
                })
                .await;
            record.finish(&result);
            result
        }
        .instrument(op.span(&self.ctx.names.label))
        .await
    }

    /// A write on the primary, bounded by the operation timeout, on a connection of kind
    /// `how` (`Use::Point` only for a single autocommit statement). With read-your-writes, the
    /// WAL position after it (also after a version conflict: what the refused write saw) is
    /// raised into `session`'s floor before the connection goes back.
    ///
    /// The outcome contract (see the `settle` module): the write first waits for the
    /// session's unsettled writes; a write cut off before its statement was sent fails with
    /// [`StateError::Timeout`] having written nothing; one whose statement was sent and whose
    /// outcome its caller did not learn (timeout, dropped future, connection lost while it
    /// ran) is held in the session until settled, and fails with
    /// [`StateError::OutcomeUnknown`].
    ///
    /// A write that fails with a serialization failure (possible only on a table partitioned
    /// by write window: an entry moved by a concurrent write, or a window changed after the
    /// statement's snapshot) wrote nothing and runs again, up to [`WRITE_RETRIES`] times.
    pub(crate) async fn write<T, F>(
        &self,
        session: &Session,
        op: Op,
        rows: u64,
        how: Use,
        f: F,
    ) -> StateResult<T>
    where
        F: AsyncFnOnce(&PgConn) -> StateResult<T> + Clone,
    {
        self.write_within(self.ctx.limit, session, op, rows, how, f)
            .await
    }

    /// [`write`](Self::write) bounded by `limit` instead of the operation timeout (what is
    /// left of it).
    async fn write_within<T, F>(
        &self,
        limit: Duration,
        session: &Session,
        op: Op,
        rows: u64,
        how: Use,
        f: F,
    ) -> StateResult<T>
    where
        F: AsyncFnOnce(&PgConn) -> StateResult<T> + Clone,
    {
        let record = OpRecord::new(&self.ctx.stats, op, rows);
        let record = &record;
        let watch = Watch::new(&session.settling);
        let watch = &watch;
        // One future (not one built, then moved into another: rustc would keep room for both).
        async move {
            let result = bounded(limit, async {
                session.settling.wait().await;
                let mut conn = self.ctx.primary.connection(how).await?;
                // Dropped before its position is known (also with this future), the session is
                // unsure: its next read takes the primary's position.
                let mark = self.router.tracks_writes().then(|| session.write());
                let start = Instant::now();
                let first = f.clone();
                // A single statement's WAL position is read by a query sent right behind it on
                // the same connection: it runs after the statement committed, and costs no round
                // trip of its own. (Not behind PgBouncer's transaction pooling, which could run
                // it on another server connection before the write.)
                let fold =
                    mark.is_some() && how == Use::Point && !self.ctx.primary.transaction_pooling();
                let (mut result, mut lsn) = if fold {
                    let both = conn
                        .run_watched(Some(watch), |c| async move {
                            Ok::<_, StateError>(join(first(c), c.insert_lsn()).await)
                        })
                        .await;
                    match both {
                        Ok((result, lsn)) => (result, lsn.ok()),
                        Err(e) => (Err(e), None),
                    }
                } else {
                    (conn.run_watched(Some(watch), |c| first(c)).await, None)
                };
                let mut retries = 0;
                while retries < WRITE_RETRIES && serialization_failure(&result) {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(retries.into())).await;
                    let again = f.clone();
                    result = conn.run_watched(Some(watch), |c| again(c)).await;
                    lsn = None;
                }
                if result.is_err() && conn.is_closed() {
                    // Lost while it ran: it may have committed.
                    conn.lost(watch);
                }
                record.attempt(start, failure(&result));
                if let Some(mark) = mark {
                    mark.outcome(&result, lsn, &mut conn).await;
                }
                result
            })
            .await;
            let result = watch.outcome(op, result);
            record.finish(&result);
            result
        }
        .instrument(op.span(&self.ctx.names.label))
        .await
    }

    /// The live value of `key`: alone, or (when every read goes to the primary) answered
    /// with concurrent gets by one lookup (see the `coalesce` module).
    pub async fn get(&self, key: &[u8], scope: Scope<'_>) -> StateResult<Option<Vec<u8>>> {
        let value = self.get_value(key, scope).await?;
        self.ctx.stats.moved(0, value.as_ref().map_or(0, Vec::len));
        Ok(value)
    }

    async fn get_value(&self, key: &[u8], scope: Scope<'_>) -> StateResult<Option<Vec<u8>>> {
        check_key(key)?;
        let alone = || self.read(scope, Op::Get, key, |c, k| Box::pin(c.get_value(k)));
        if self.router.splits_reads() {
            return alone().await;
        }
        match self.lookups.admit(|| Lookup(key.to_vec())) {
            Admission::Alone(slot) => {
                let result = alone().await;
                drop(slot);
                result
            }
            Admission::Queued { reply, lead, .. } => {
                self.get_queued(reply, lead, alone)
                    .instrument(Op::Get.span(&self.ctx.names.label))
                    .await
            }
        }
    }

    pub async fn get_entry(&self, key: &[u8], scope: Scope<'_>) -> StateResult<Option<StateEntry>> {
        check_key(key)?;
        let entry = self
            .read(scope, Op::GetEntry, key, |c, k| Box::pin(c.get_entry(k)))
            .await?;
        self.ctx
            .stats
            .moved(0, entry.as_ref().map_or(0, |e| e.value.len()));
        Ok(entry)
    }

    pub async fn contains(&self, key: &[u8], scope: Scope<'_>) -> StateResult<bool> {
        check_key(key)?;
        self.read(scope, Op::Contains, key, |c, k| Box::pin(c.contains(k)))
            .await
    }

    pub async fn count(&self, scope: Scope<'_>) -> StateResult<usize> {
        self.read(scope, Op::Count, &(), |c, ()| Box::pin(c.count()))
            .await
    }

    /// The values of `keys` (at most [`MAX_GET_MANY`]) in their order, `None` for a key with
    /// no live entry, from one statement on one node.
    pub async fn get_many(
        &self,
        keys: &[&[u8]],
        scope: Scope<'_>,
    ) -> StateResult<Vec<Option<Vec<u8>>>> {
        if keys.len() > MAX_GET_MANY {
            return Err(StateError::invalid(format!(
                "get_many takes at most {MAX_GET_MANY} keys, not {}",
                keys.len()
            )));
        }
        for key in keys {
            check_key(key)?;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let found: HashMap<Vec<u8>, Vec<u8>> = self
            .read(scope, Op::GetMany, keys, |c, k| Box::pin(c.get_many(k)))
            .await?
            .into_iter()
            .collect();
        self.ctx.stats.moved(0, found.values().map(Vec::len).sum());
        Ok(keys.iter().map(|k| found.get(*k).cloned()).collect())
    }

    /// One page of [`list_keys`](Self::list_keys): at most `limit` (1 to [`MAX_PAGE`](crate::state::limits::MAX_PAGE)) keys
    /// after `start_after`, in key order.
    pub async fn list_keys_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        scope: Scope<'_>,
    ) -> StateResult<Vec<Vec<u8>>> {
        let page = check_page(prefix, start_after, limit)?;
        self.read(scope, Op::KeysPage, &page, |c, (p, a, l)| {
            Box::pin(c.list_keys_page(p, a, *l))
        })
        .await
    }

    /// Like [`list_keys_page`](Self::list_keys_page), whole live entries.
    pub async fn entries_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        scope: Scope<'_>,
    ) -> StateResult<Vec<StateEntry>> {
        let page = check_page(prefix, start_after, limit)?;
        let entries = self
            .read(scope, Op::EntriesPage, &page, |c, (p, a, l)| {
                Box::pin(c.entries_page(p, a, *l))
            })
            .await?;
        self.ctx.stats.moved(0, values_len(&entries));
        Ok(entries)
    }

    pub async fn list_keys(&self, prefix: &[u8], scope: Scope<'_>) -> StateResult<Vec<Vec<u8>>> {
        self.read(scope, Op::ListKeys, prefix, |c, p| Box::pin(c.list_keys(p)))
            .await
    }

    pub async fn query_by_metadata(
        &self,
        path: &str,
        value: &serde_json::Value,
        scope: Scope<'_>,
    ) -> StateResult<Vec<StateEntry>> {
        let q = MetadataQuery::new(path, value)?;
        let entries = self
            .read(scope, Op::QueryByMetadata, &q, |c, q| {
                Box::pin(c.query_by_metadata(q))
            })
            .await?;
        self.ctx.stats.moved(0, values_len(&entries));
        Ok(entries)
    }

    /// Writes a whole entry (value, metadata, expiry) and returns its new version: alone, or
    /// combined with concurrent puts into one statement (see the `coalesce` module).
    pub async fn upsert(
        &self,
        session: &Session,
        key: &[u8],
        value: &[u8],
        metadata: &serde_json::Value,
        ttl_us: Option<i64>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        check_metadata(metadata)?;
        let version = self
            .upsert_entry(session, key, value, metadata, ttl_us)
            .await?;
        self.ctx.stats.moved(key.len() + value.len(), 0);
        Ok(version)
    }

    async fn upsert_entry(
        &self,
        session: &Session,
        key: &[u8],
        value: &[u8],
        metadata: &serde_json::Value,
        ttl_us: Option<i64>,
    ) -> StateResult<i64> {
        let alone = async |limit| {
            self.write_within(limit, session, Op::Upsert, 1, Use::Point, async |c| {
                c.upsert(key, value, metadata, ttl_us).await
            })
            .await
        };
        let entry = || Entry {
            key: key.to_vec(),
            value: value.to_vec(),
            metadata: metadata.clone(),
            ttl_us,
        };
        // On a Citus table a multi-row upsert goes through the coordinator (measured: 182
        // puts/s at 32 tasks against 2514 for plain single-row upserts); each put goes to
        // its shard on its own. A large put runs alone (see the `coalesce` module), and so
        // does one whose session must first wait for an unsettled write (`write` waits).
        if self.ctx.names.distributed
            || key.len() + value.len() > ALONE_BYTES
            || !session.settling.is_open()
        {
            return alone(self.ctx.limit).await;
        }
        match self.coalescer.admit(entry) {
            Admission::Alone(slot) => {
                let result = alone(self.ctx.limit).await;
                drop(slot);
                result
            }
            Admission::Queued { reply, lead, claim } => {
                self.put_queued(session, reply, lead, claim, alone)
                    .instrument(Op::Upsert.span(&self.ctx.names.label))
                    .await
            }
        }
    }

    pub async fn put_with_version(
        &self,
        session: &Session,
        key: &[u8],
        value: &[u8],
        expected: Option<i64>,
    ) -> StateResult<i64> {
        check_entry(key, value)?;
        let version = self
            .write(session, Op::PutWithVersion, 1, Use::Point, async |c| {
                c.put_with_version(key, value, expected).await
            })
            .await?;
        self.ctx.stats.moved(key.len() + value.len(), 0);
        Ok(version)
    }

    pub async fn compare_and_set(
        &self,
        session: &Session,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> StateResult<Option<i64>> {
        check_entry(key, value)?;
        if let Some(old) = expected {
            check_entry(key, old)?;
        }
        let set = self
            .write(session, Op::CompareAndSet, 1, Use::Point, async |c| {
                c.compare_and_set(key, expected, value).await
            })
            .await?;
        if set.is_some() {
            self.ctx.stats.moved(key.len() + value.len(), 0);
        }
        Ok(set)
    }

    pub async fn delete(&self, session: &Session, key: &[u8]) -> StateResult<()> {
        check_key(key)?;
        self.write(session, Op::Delete, 1, Use::Point, async |c| {
            c.delete(key).await
        })
        .await
    }

    pub async fn delete_with_version(
        &self,
        session: &Session,
        key: &[u8],
        expected: i64,
    ) -> StateResult<()> {
        check_key(key)?;
        self.write(session, Op::DeleteWithVersion, 1, Use::Point, async |c| {
            c.delete_with_version(key, expected).await
        })
        .await
    }

    pub async fn clear(&self, session: &Session) -> StateResult<()> {
        let names = &self.ctx.names;
        self.write(session, Op::Clear, 1, Use::Own, async |c| {
            c.clear(names).await
        })
        .await
    }

    /// One round trip on a pooled primary connection.
    pub async fn ping(&self) -> StateResult<()> {
        self.on_primary(async |c| c.probe().await).await
    }
}

/// Whether a write failed with a serialization failure (it wrote nothing and may run again).
fn serialization_failure<T>(result: &StateResult<T>) -> bool {
    matches!(result, Err(e) if e.sqlstate() == Some(sqlstate::SERIALIZATION_FAILURE))
}

/// The bytes of the values of `entries`.
fn values_len(entries: &[StateEntry]) -> usize {
    entries.iter().map(|e| e.value.len()).sum()
}
