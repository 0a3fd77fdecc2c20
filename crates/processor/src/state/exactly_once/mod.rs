//! Layer `exactly_once`: state, input positions and outputs that commit together, and
//! fencing of an instance that was replaced.
//!
//! An operator's instance [claims](crate::state::EnhancedPostgresBackend::claim) the operator
//! (or a range of its key groups): the claim raises the operator's epoch in the database and
//! deletes every claim overlapping the same key groups (`claim`). The [`Claim`] handle buffers
//! puts and deletes in memory (reads see them), and its
//! [`commit`](Claim::commit) applies them with the source offsets and the outputs in one
//! transaction that starts with a compare-and-set on its own claim row (`commit`): a claim
//! taken since makes that row disappear, so the old instance's commit is refused whatever
//! it still believes and whether or not its session is alive. Values read or written under a
//! claim are cached (`cache`). Outputs go to the outbox, read in commit order by
//! [`OutboxReader`]s (`outbox`).
//!
//! May use: `transaction`, `ops`, `routing` (sessions), `pool`, `wire`, `schema`, `config`,
//! `stats`, `error`, `limits`.

pub(crate) mod cache;
pub(crate) mod claim;
mod commit;
pub(crate) mod handle;
pub(crate) mod outbox;

pub use claim::{Operator, PreviousClaim, Recovery, SourceOffset, DEFAULT_CLAIM_CACHE_BYTES};
pub use handle::{Claim, Committed};
pub use outbox::{OutboxReader, OutboxRecord, Output};

pub(crate) use crate::state::limits::check_name;
pub use crate::state::limits::MAX_NAME_LEN;

/// `set_config` of the statement's transaction: the server ends the transaction (and its
/// session) once it sits idle longer than the operation timeout, so an instance paused
/// inside a claim or commit (SIGSTOP, a long GC pause) holds the rows a new claim waits for
/// no longer than that.
pub(crate) fn idle_limit_ms(limit: std::time::Duration) -> String {
    format!("{}ms", limit.as_millis().clamp(1, i32::MAX as u128))
}
