//! The exactly-once half of the facade: claims, epoch commits and the outbox (see
//! [`Claim`]).

use super::EnhancedPostgresBackend;
use crate::state::error::StateResult;
use crate::state::exactly_once::outbox::{prune, OutboxReader};
use crate::state::exactly_once::{Claim, Operator};

/// Exactly-once processing: claims with epochs and fencing, epoch commits of state, source
/// offsets and outputs, and the outbox. The README's "Exactly-once processing" has the
/// whole picture.
impl EnhancedPostgresBackend {
    /// Claims `operator` (a name, or an [`Operator`] with a range of key groups) under a new
    /// epoch: every claim of the same operator overlapping its key groups is replaced, and
    /// commits under those are refused from now on with
    /// [`StateError::EpochFenced`](crate::state::StateError::EpochFenced), whether or not
    /// their instances are still connected. Waits for a commit of a replaced claim that is
    /// under way, at most half the operation timeout: then it ends that commit's session
    /// (`pg_terminate_backend`: an instance paused in the middle of a commit), which needs
    /// the right to signal it (the same role, or `pg_signal_backend`).
    ///
    /// The claim's [`recovery`](Claim::recovery) holds the last committed source offsets;
    /// the state is exactly as of those commits. On the primary; works behind PgBouncer's
    /// transaction pooling (no session state is used).
    pub async fn claim(&self, operator: impl Into<Operator>) -> StateResult<Claim> {
        let s = self.store();
        let owner = (self.session.clone(), s.router.tracks_writes());
        Claim::take(s.ctx.clone(), owner, operator.into()).await
    }

    /// The outbox reader `name` of this state table (registered at position 0 the first
    /// time); it goes on from the position it last acknowledged.
    pub async fn outbox_reader(&self, name: &str) -> StateResult<OutboxReader> {
        OutboxReader::open(self.store().ctx.clone(), name).await
    }

    /// Deletes the outbox rows that every reader of this state table acknowledged (none
    /// while no reader is registered); how many. A reader registered afterwards never sees
    /// them: register every reader before pruning.
    pub async fn prune_outbox(&self) -> StateResult<u64> {
        prune(&self.store().ctx).await
    }
}
