//! [`PostgresTransaction`]: isolation levels, read-only mode, begin, commit, rollback and
//! savepoints (the key/value operations inside are in `tx_ops`).
//!
//! A [`PostgresTransaction`] owns one pooled primary connection (a [`Checkout`] that knows it
//! is inside a transaction) from `BEGIN` until `COMMIT` or `ROLLBACK`. Dropped unfinished, the
//! checkout rolls the transaction back in the background and returns the connection clean, or
//! (if that fails, or no runtime is left) discards it.
//!
//! Every statement is bounded by the operation timeout. A statement whose caller gave up on it
//! (its future dropped, or timed out) has an unknown effect: from then on `commit` rolls back
//! and says so, unless the transaction was rolled back to a savepoint taken before it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::state::config::enhanced::IsolationLevel;
use crate::state::error::{sqlstate, StateError, StateResult};
use crate::state::ident::Ident;
use crate::state::pool::checkout::Checkout;
use crate::state::pool::context::Context;
use crate::state::pool::pipeline::Point;
use crate::state::pool::settle::Watch;
use crate::state::routing::causal::Session;
use crate::state::stats::counters::{failure, TxEvent};
use crate::state::stats::operation::Op;
use crate::state::wire::connection::PgConn;

/// The future a [`transaction`](crate::state::EnhancedPostgresBackend::transaction) closure
/// returns: boxed and `Send`, borrowing the transaction for its lifetime.
pub type TxFuture<'t, T> = Pin<Box<dyn Future<Output = StateResult<T>> + Send + 't>>;

/// An open transaction on the primary. Finish it with [`commit`](Self::commit) or
/// [`rollback`](Self::rollback); dropping it unfinished rolls it back.
///
/// After a statement fails on the server, PostgreSQL refuses further statements until the
/// transaction ends or rolls back to a savepoint; `commit` then rolls back and reports
/// [`StateError::TransactionFailed`] (it never reports success for work that was discarded).
/// The same holds once a statement was abandoned (its future dropped or timed out): its effect
/// is unknown, so `commit` rolls back, unless
/// [`rollback_to_savepoint`](Self::rollback_to_savepoint) went back to a savepoint set before
/// that statement.
pub struct PostgresTransaction {
    conn: Option<Checkout>,
    /// The `BEGIN` not sent yet: it goes with the first statement (see [`open_and_run`]).
    begin: Option<String>,
    /// Set while `BEGIN` was sent but not answered with success (it failed, or its statement
    /// was cut off): nothing more may be sent, since a statement sent after a `BEGIN` that
    /// failed would run on its own and commit at once.
    unopened: bool,
    /// The backend's pool, names, statistics and operation timeout (bounds every statement,
    /// COMMIT and ROLLBACK).
    pub(crate) ctx: Arc<Context>,
    /// The read-your-writes session its commit is recorded in (none when writes are not
    /// tracked, or the transaction is read-only).
    session: Option<Arc<Session>>,
    /// The handle's session: `begin` waits for its unsettled writes, and a COMMIT whose
    /// outcome is unknown is held in it until settled (see the `settle` module).
    owner: Arc<Session>,
    savepoints: Vec<String>,
    /// Bytes of the keys and values its writes wrote, counted in the statistics once it
    /// commits.
    pub(crate) written: usize,
    /// Set once a statement was abandoned: how many of `savepoints` were set before it (a
    /// rollback to one of those undoes it).
    abandoned: Option<usize>,
    aborted: bool,
    level: IsolationLevel,
    read_only: bool,
}

/// Whether a server error ends the session (FATAL or PANIC, a connection exception, an
/// operator intervention such as a terminated backend): a COMMIT answered so may or may not
/// have committed.
fn ends_session(e: &tokio_postgres::error::DbError) -> bool {
    let code = e.code().code();
    matches!(e.severity(), "FATAL" | "PANIC") || code.starts_with("08") || code.starts_with("57P")
}

/// What a transaction's connection can no longer be used for.
fn finished() -> StateError {
    StateError::NotInitialized("transaction already finished".into())
}

const ABANDONED: &str = "an operation was cancelled before it finished, so its effect is unknown: \
     the transaction was rolled back instead of committed";

impl PostgresTransaction {
    /// Begins on a connection of the primary's pool. `session`: the handle's session, and
    /// whether the commit's WAL position is recorded in it (read-your-writes). `BEGIN` itself
    /// goes with the first statement.
    pub(crate) async fn begin(
        ctx: Arc<Context>,
        (owner, records): (Arc<Session>, bool),
        level: IsolationLevel,
        read_only: bool,
    ) -> StateResult<Self> {
        let sql = format!(
            "BEGIN ISOLATION LEVEL {}{}",
            level.as_sql(),
            if read_only { " READ ONLY" } else { "" }
        );
        let conn = ctx
            .bounded(async {
                // After the session's abandoned writes have settled (nothing is sent before).
                owner.settling.wait().await;
                ctx.primary.get().await
            })
            .await?;
        ctx.stats.tx(TxEvent::Begun);
        Ok(PostgresTransaction {
            conn: Some(conn),
            begin: Some(sql),
            unopened: false,
            ctx,
            session: records.then(|| owner.clone()),
            owner,
            savepoints: Vec::new(),
            written: 0,
            abandoned: None,
            aborted: false,
            level,
            read_only,
        })
    }

    /// The isolation level.
    pub fn isolation_level(&self) -> IsolationLevel {
        self.level
    }

    /// Whether the transaction was started read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a statement failed on the server, so that only a rollback (to a savepoint or of
    /// the whole transaction) can continue.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Runs one statement: bounded by the operation timeout, recorded in the statistics; an
    /// error that reached the server marks the transaction aborted, and an earlier statement
    /// found abandoned is remembered (see [`PostgresTransaction`]).
    pub(crate) async fn stmt<T, F>(&mut self, op: Op, rows: u64, f: F) -> StateResult<T>
    where
        F: AsyncFnOnce(&PgConn) -> StateResult<T>,
    {
        let conn = self.conn.as_mut().ok_or_else(finished)?;
        if conn.abandoned() && self.abandoned.is_none() {
            self.abandoned = Some(self.savepoints.len());
        }
        if self.unopened {
            return Err(StateError::TransactionFailed {
                message: "the transaction's BEGIN failed or was cut off, so nothing more is \
                          sent in it (a statement would run on its own): roll it back"
                    .into(),
                sqlstate: Some("25P02".into()),
            });
        }
        let begin = self.begin.take();
        if begin.is_some() {
            // From here on, a checkout dropped unfinished rolls back; and until BEGIN is
            // known to have worked, nothing else is sent.
            conn.set_in_transaction(true);
            self.unopened = true;
        }
        let mut opened = false;
        let reads = only_reads(op);
        let ctx = &self.ctx;
        let span = op.span(&self.ctx.names.label);
        // Recorded inside the span, so a failure is the span's `error.type`.
        let r =
            async {
                let start = Instant::now();
                // Boxed: every operation's future nests this one, and unboxed it made a
                // test's whole future outgrow a thread's stack (debug build).
                let r = ctx
                    .bounded(conn.run(|c| {
                        Box::pin(open_and_run(c, begin.as_deref(), reads, &mut opened, f))
                    }))
                    .await;
                ctx.stats.record(op, rows, start.elapsed(), failure(&r));
                r
            }
            .instrument(span)
            .await;
        if opened {
            self.unopened = false;
        }
        if let Err(e) = &r {
            self.note_error(e);
        }
        r
    }

    fn note_error(&mut self, e: &StateError) {
        // Client-side outcomes (a failed version check, refused input) leave the server's
        // transaction usable; anything else may not have.
        if !matches!(
            e,
            StateError::ConcurrentModification { .. } | StateError::InvalidInput(_)
        ) {
            self.aborted = true;
        }
        match e.sqlstate() {
            Some(sqlstate::SERIALIZATION_FAILURE) => {
                self.ctx.stats.tx(TxEvent::SerializationFailure)
            }
            Some(sqlstate::DEADLOCK_DETECTED) => self.ctx.stats.tx(TxEvent::Deadlock),
            _ => {}
        }
    }

    /// Ends the transaction on `conn` with ROLLBACK, bounded; the connection goes back clean
    /// only if that worked (otherwise its checkout tries again, or discards it).
    async fn roll_back_on(&self, mut conn: Checkout) -> StateResult<()> {
        self.ctx.stats.tx(TxEvent::RolledBack);
        if self.begin.is_some() || conn.is_closed() {
            // Nothing was sent, or the server ended the transaction with the connection.
            return Ok(());
        }
        self.ctx
            .bounded(async { Ok(conn.run(|c| c.client.batch_execute("ROLLBACK")).await?) })
            .await?;
        conn.set_in_transaction(false);
        Ok(())
    }

    /// Commits. A serialization failure at commit time is reported as
    /// [`StateError::TransactionFailed`] (nothing was committed); a connection lost after
    /// COMMIT was sent, or a COMMIT that outlasts the operation timeout, is
    /// [`StateError::CommitOutcomeUnknown`].
    pub async fn commit(mut self) -> StateResult<()> {
        let mut conn = self.conn.take().ok_or_else(finished)?;
        if self.begin.take().is_some() {
            // Nothing was sent: nothing to commit, and the connection goes back clean.
            self.ctx.stats.tx(TxEvent::Committed);
            return Ok(());
        }
        let cancelled = self.abandoned.is_some() || conn.abandoned();
        if self.aborted || cancelled {
            let _ = self.roll_back_on(conn).await;
            let message = if cancelled {
                ABANDONED
            } else {
                "an earlier statement failed, so the transaction was rolled back instead of committed"
            };
            return Err(StateError::TransactionFailed {
                message: message.into(),
                sqlstate: Some("25P02".into()),
            });
        }
        if conn.is_closed() {
            self.ctx.stats.tx(TxEvent::RolledBack);
            return Err(StateError::Connection {
                message: "connection lost before COMMIT was sent; nothing was committed".into(),
                sqlstate: None,
            });
        }
        // Until the commit's WAL position is known, the session is unsure (also if this
        // future is dropped half-way, or COMMIT's outcome is unknown).
        let session = self.session.clone();
        let mark = session.as_deref().map(Session::write);
        // Dropped or timed out after COMMIT was sent, the checkout settles the connection
        // (probe, cancel requests) and the session's next write waits for that.
        let watch = Watch::new(&self.owner.settling);
        let committed = tokio::time::timeout(
            self.ctx.limit,
            conn.run_watched(Some(&watch), |c| c.client.batch_execute("COMMIT")),
        )
        .await;
        match committed {
            Ok(Ok(())) => {
                conn.set_in_transaction(false);
                self.ctx.stats.tx(TxEvent::Committed);
                self.ctx.stats.moved(self.written, 0);
                if let Some(mark) = mark {
                    let mut conn = Point::Own(Box::new(conn));
                    let _ = tokio::time::timeout(self.ctx.limit, mark.record(&mut conn)).await;
                }
                Ok(())
            }
            // The server answered with an error that ended the transaction (not a FATAL one
            // that ended the session, after which the outcome is unknown).
            Ok(Err(e)) if e.as_db_error().is_some_and(|d| !ends_session(d)) => {
                // The server answered: the transaction is over (rolled back).
                if let Some(mark) = mark {
                    mark.nothing_written();
                }
                conn.set_in_transaction(false);
                let err = StateError::from(e);
                self.note_error(&err);
                self.ctx.stats.tx(TxEvent::RolledBack);
                Err(err)
            }
            Ok(Err(e)) => {
                if conn.is_closed() {
                    // Held until the server process is gone.
                    conn.lost(&watch);
                }
                Err(StateError::CommitOutcomeUnknown(format!(
                    "the connection failed after COMMIT was sent: {}",
                    StateError::from(e)
                )))
            }
            Err(_) => Err(StateError::CommitOutcomeUnknown(format!(
                "COMMIT did not complete within the operation timeout ({:?}); it either \
                 commits before the session's next write is sent, or not at all",
                self.ctx.limit
            ))),
        }
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> StateResult<()> {
        let conn = self.conn.take().ok_or_else(finished)?;
        self.roll_back_on(conn).await
    }

    /// Sets a savepoint. `name` must be a plain identifier (ASCII letters, digits, `_`, at most
    /// 63 bytes); anything else is refused with [`StateError::InvalidInput`] and the
    /// transaction stays usable.
    pub async fn savepoint(&mut self, name: &str) -> StateResult<()> {
        let id = Ident::new("savepoint name", name)?;
        self.savepoint_command(format!("SAVEPOINT {id}")).await?;
        self.savepoints.push(name.to_string());
        Ok(())
    }

    /// Undoes everything after savepoint `name` (which stays set), and clears an aborted state.
    /// An unknown name is refused without touching the transaction.
    pub async fn rollback_to_savepoint(&mut self, name: &str) -> StateResult<()> {
        let (id, idx) = self.known_savepoint(name)?;
        self.savepoint_command(format!("ROLLBACK TO SAVEPOINT {id}"))
            .await?;
        self.savepoints.truncate(idx + 1);
        self.aborted = false;
        // Undone if the abandoned statement came after this savepoint.
        if self.abandoned.is_some_and(|before| idx < before) {
            self.abandoned = None;
        }
        Ok(())
    }

    /// Forgets savepoint `name` (and later ones), keeping their work.
    pub async fn release_savepoint(&mut self, name: &str) -> StateResult<()> {
        let (id, idx) = self.known_savepoint(name)?;
        self.savepoint_command(format!("RELEASE SAVEPOINT {id}"))
            .await?;
        self.savepoints.truncate(idx);
        // Released savepoints merge into their parent: none of them can undo it any more.
        if let Some(before) = &mut self.abandoned {
            *before = (*before).min(idx);
        }
        Ok(())
    }

    fn known_savepoint(&self, name: &str) -> StateResult<(Ident, usize)> {
        let id = Ident::new("savepoint name", name)?;
        let idx = self
            .savepoints
            .iter()
            .rposition(|s| s == name)
            .ok_or_else(|| {
                StateError::invalid(format!("no savepoint named {name:?} in this transaction"))
            })?;
        Ok((id, idx))
    }

    /// Runs a savepoint command built from a validated, quoted identifier.
    async fn savepoint_command(&mut self, sql: String) -> StateResult<()> {
        self.stmt(Op::Savepoint, 1, async |c| {
            Ok(c.client.batch_execute(&sql).await?)
        })
        .await
    }
}

/// Whether a statement of `op` only reads (also when it runs on its own, outside the
/// transaction): such a statement goes out together with a pending `BEGIN`.
fn only_reads(op: Op) -> bool {
    matches!(
        op,
        Op::Get | Op::GetEntry | Op::Contains | Op::Count | Op::ListKeys | Op::QueryByMetadata
    )
}

/// Runs `f` on `c`, first opening the transaction with `begin` if it was not sent yet;
/// `opened` is set once `BEGIN` succeeded.
///
/// A statement that only reads (`reads`) is sent right behind `BEGIN`, without waiting for
/// it: one round trip instead of two. `BEGIN` is a simple query and the statement has a
/// Sync of its own, so were `BEGIN` to fail (a cancel request landing on it, say), the
/// statement would run on its own, outside any transaction: harmless for a read, whose
/// result is dropped for `BEGIN`'s error. Any other statement waits for `BEGIN`'s answer.
async fn open_and_run<T, F>(
    c: &PgConn,
    begin: Option<&str>,
    reads: bool,
    opened: &mut bool,
    f: F,
) -> StateResult<T>
where
    F: AsyncFnOnce(&PgConn) -> StateResult<T>,
{
    match begin {
        None => f(c).await,
        Some(sql) if reads => {
            // `join` polls `BEGIN` first: it is queued on the connection before the read.
            let (began, r) = futures_util::future::join(c.client.batch_execute(sql), f(c)).await;
            began?;
            *opened = true;
            r
        }
        Some(sql) => {
            c.client.batch_execute(sql).await?;
            *opened = true;
            f(c).await
        }
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        // Unfinished: the checkout rolls the transaction back as it goes (see the module docs).
        if self.conn.take().is_some() {
            self.ctx.stats.tx(TxEvent::RolledBack);
        }
    }
}

impl std::fmt::Debug for PostgresTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTransaction")
            .field("isolation_level", &self.level)
            .field("read_only", &self.read_only)
            .field("savepoints", &self.savepoints)
            .field("aborted", &self.aborted)
            .field("abandoned", &self.abandoned.is_some())
            .field("finished", &self.conn.is_none())
            .finish()
    }
}
