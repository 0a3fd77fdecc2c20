//! Read-your-writes sessions and causal tokens: what a read must see.
//!
//! A [`Session`] is the scope of read-your-writes. A backend handle and its clones share one;
//! [`new_session`](crate::state::EnhancedPostgresBackend::new_session) starts another. A session
//! holds a *floor*, the newest WAL position its reads must see. It is raised by:
//! - each write committed through it (single operations, batches and transaction commits): the
//!   primary's WAL insert position read right after the commit, which is at or past the commit
//!   record;
//! - each optimistic write refused for a version conflict: the position after the refusal, so the
//!   next read of the version sees the write that won (a writer never loops on a stale replica);
//! - each [`CausalToken`] it observes, from another handle or another process.
//!
//! A replica serves a read of the session only when its replay position is at or past the floor.
//! The router knows replay positions from its monitor and learns them on demand, in the same round
//! trip as the read; a replica still behind passes the read on (to another replica, or the
//! primary). Reads of other sessions are not affected by this session's writes.
//!
//! A write whose position is unknown (its future was dropped, the position could not be read,
//! COMMIT's outcome is unknown) makes the session *unsure*: its next read first takes the
//! primary's current position as the floor (one round trip), which covers that write if it has
//! committed by then.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::state::error::StateError;
use crate::state::pool::pipeline::Point;
use crate::state::pool::settle::SessionFence;

/// A WAL position that a read must see: the position of a write, taken from the handle that
/// made it ([`causal_token`](crate::state::EnhancedPostgresBackend::causal_token)) and handed
/// to another handle or process ([`observe`](crate::state::EnhancedPostgresBackend::observe)),
/// whose reads then see that write and everything before it (read-after-write across
/// instances).
///
/// Its text form is PostgreSQL's LSN notation (`16/B374D848`), so it can travel in a message
/// header or a queue and be parsed back with [`str::parse`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CausalToken(u64);

impl CausalToken {
    /// The token of a byte offset in the WAL (as `pg_wal_lsn_diff(lsn, '0/0')` gives it).
    pub fn from_wal_offset(offset: u64) -> Self {
        CausalToken(offset)
    }

    /// The WAL position as a byte offset; 0 for a handle that has written nothing.
    pub fn wal_offset(&self) -> u64 {
        self.0
    }
}

impl fmt::Display for CausalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for CausalToken {
    type Err = StateError;

    /// Parses PostgreSQL's LSN notation: two hexadecimal numbers of at most 8 digits each,
    /// separated by `/`.
    fn from_str(s: &str) -> Result<Self, StateError> {
        let bad = || {
            StateError::InvalidInput(format!(
                "not a causal token (a WAL position such as 16/B374D848): {:?}",
                s.chars().take(40).collect::<String>()
            ))
        };
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(CausalToken((part(hi)? << 32) | part(lo)?))
    }
}

/// Where a handle's reads may go: its session, and whether it reads from the primary only.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub session: &'a Session,
    pub primary_only: bool,
}

/// One read-your-writes scope (see the module docs).
#[derive(Default)]
pub(crate) struct Session {
    floor: AtomicU64,
    /// Writes of unknown position so far.
    unknown: AtomicU64,
    /// How many of those a recorded position covers. Raised only once a position has been
    /// observed, so a read whose position query is dropped or fails leaves the session
    /// unsure, and concurrent reads each take a position of their own.
    covered: AtomicU64,
    /// Writes whose outcome their callers did not learn, not settled yet: the session's next
    /// write waits for them (see the `settle` module).
    pub settling: SessionFence,
}

impl Session {
    /// The WAL position this session's reads must see.
    pub fn floor(&self) -> u64 {
        self.floor.load(Relaxed)
    }

    /// Raises the floor to `lsn` (never lowers it).
    pub fn observe(&self, lsn: u64) {
        self.floor.fetch_max(lsn, Relaxed);
    }

    /// `Some(n)` when a write of unknown position is not covered yet: pass `n` to
    /// [`cover`](Self::cover) with a position taken afterwards.
    pub fn unsure(&self) -> Option<u64> {
        let n = self.unknown.load(Relaxed);
        (n > self.covered.load(Relaxed)).then_some(n)
    }

    /// Raises the floor to `lsn`, a position taken after [`unsure`](Self::unsure) returned
    /// `Some(n)`: the first `n` writes of unknown position are covered.
    pub fn cover(&self, n: u64, lsn: u64) {
        self.observe(lsn);
        self.covered.fetch_max(n, Relaxed);
    }

    /// Records a write of unknown position.
    pub fn set_unsure(&self) {
        self.unknown.fetch_add(1, Relaxed);
    }

    /// Marks a write as under way: unless [`WriteMark::record`] learns its position, the
    /// session becomes unsure when the mark is dropped (also when the write's future is).
    pub fn write(&self) -> WriteMark<'_> {
        WriteMark {
            session: self,
            known: false,
        }
    }
}

/// A write under way in a session (see [`Session::write`]).
pub(crate) struct WriteMark<'a> {
    session: &'a Session,
    known: bool,
}

impl WriteMark<'_> {
    /// Reads the WAL insert position on `conn` (the primary connection that just committed
    /// the write) and raises the session's floor to it.
    pub async fn record(mut self, conn: &mut Point) {
        match conn.run(|c| c.insert_lsn()).await {
            Ok(lsn) => {
                self.session.observe(lsn);
                self.known = true;
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the WAL position after a write"),
        }
    }

    /// The write committed at or before WAL position `lsn` (read after it on the primary):
    /// raises the session's floor to it.
    pub fn learned(mut self, lsn: u64) {
        self.session.observe(lsn);
        self.known = true;
    }

    /// The write did not happen (it failed before changing anything): nothing to record.
    pub fn nothing_written(mut self) {
        self.known = true;
    }

    /// Records the write's outcome on `conn`, the connection it ran on: the position `lsn`
    /// read right behind it, or one read now, when it committed (also after a version
    /// conflict: what the refused write saw); nothing when the server refused it on a
    /// connection still open (not after a FATAL connection error such as 57P01 or
    /// PgBouncer's 08P01: the statement may have committed before it). Otherwise the
    /// session is left unsure.
    pub async fn outcome<T>(
        self,
        result: &Result<T, StateError>,
        lsn: Option<u64>,
        conn: &mut Point,
    ) {
        match result {
            Ok(_) | Err(StateError::ConcurrentModification { .. }) => match lsn {
                Some(lsn) => self.learned(lsn),
                None => self.record(conn).await,
            },
            Err(e) if e.is_refusal() && !conn.is_closed() => self.nothing_written(),
            Err(_) => {}
        }
    }
}

impl Drop for WriteMark<'_> {
    fn drop(&mut self) {
        if !self.known {
            self.session.set_unsure();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_postgres_lsn_notation() {
        for v in [0u64, 1, 0xB374_D848, 0x16_B374_D848, u64::MAX] {
            let t = CausalToken::from_wal_offset(v);
            assert_eq!(t.to_string().parse::<CausalToken>().unwrap(), t);
        }
        assert_eq!(
            CausalToken::from_wal_offset(0x16_B374_D848).to_string(),
            "16/B374D848"
        );
        assert_eq!(
            "0/1".parse::<CausalToken>().unwrap().wal_offset(),
            1,
            "lower-case and short forms parse"
        );
        assert_eq!(
            "a/ff".parse::<CausalToken>().unwrap().wal_offset(),
            0xA_0000_00FF
        );
    }

    #[test]
    fn malformed_tokens_are_invalid_input() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "g/1",
            "123456789/0",
            "-1/0",
            " 1/0",
            "1/+2",
        ] {
            let e = s.parse::<CausalToken>().unwrap_err();
            assert!(matches!(e, StateError::InvalidInput(_)), "{s:?}: {e}");
        }
    }

    #[test]
    fn the_floor_only_rises_and_a_dropped_mark_makes_the_session_unsure() {
        let s = Session::default();
        s.observe(10);
        s.observe(5);
        assert_eq!(s.floor(), 10);
        assert_eq!(s.unsure(), None);
        drop(s.write());
        let n = s.unsure().expect("a dropped write is unknown");
        assert_eq!(
            s.unsure(),
            Some(n),
            "still unsure until a position covers it"
        );
        s.cover(n, 20);
        assert_eq!((s.unsure(), s.floor()), (None, 20));
        s.write().nothing_written();
        assert_eq!(s.unsure(), None);
    }
}
