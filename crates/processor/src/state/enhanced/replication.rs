//! The replication half of the facade: read sessions, causal tokens, replica status.

use std::sync::Arc;

use super::EnhancedPostgresBackend;
use crate::state::error::StateResult;
use crate::state::routing::causal::{CausalToken, Session};
use crate::state::routing::router::ReplicationStatus;

/// Read routing and read-your-writes: see [`causal`](crate::state::CausalToken) for the
/// consistency model.
impl EnhancedPostgresBackend {
    /// A handle to the same backend whose reads always go to the primary (for a read that
    /// must see the very latest state, whatever anyone wrote). It shares this handle's
    /// read-your-writes session.
    pub fn reading_from_primary(&self) -> Self {
        Self {
            primary_only: true,
            ..self.clone()
        }
    }

    /// A handle to the same backend (same pools, statistics and coordination) with a
    /// read-your-writes session of its own, starting empty.
    ///
    /// Read-your-writes is scoped to a session: a handle and its clones share one, so a read
    /// through any of them sees every write made through any of them. Reads of a session
    /// that wrote nothing are served by any qualifying replica, whatever other sessions
    /// write; give independent tasks their own session so that one task's writes do not hold
    /// another's reads back. To make a write visible to another session or process, pass a
    /// [`causal_token`](Self::causal_token) to its [`observe`](Self::observe).
    pub fn new_session(&self) -> Self {
        Self {
            session: Arc::new(Session::default()),
            ..self.clone()
        }
    }

    /// A token naming everything this handle's session has written and observed so far: pass
    /// it to [`observe`](Self::observe) on another handle, here or in another process (its text
    /// form, PostgreSQL's LSN notation, travels in a message), and that handle's later reads see
    /// those writes.
    ///
    /// Without read-your-writes tracking here (no replicas, or read-your-writes off), or when a
    /// write of this session ended with an unknown outcome, the token is the primary's current
    /// WAL position (one round trip), which covers every write committed so far.
    pub async fn causal_token(&self) -> StateResult<CausalToken> {
        let s = self.store();
        let unsure = self.session.unsure();
        if !s.router.tracks_writes() || unsure.is_some() {
            let lsn = s.on_primary(async |c| c.insert_lsn().await).await?;
            self.session.cover(unsure.unwrap_or(0), lsn);
        }
        Ok(CausalToken::from_wal_offset(self.session.floor()))
    }

    /// Makes this handle's session see at least the state `token` names: its later reads go to
    /// a replica only once that replica has replayed the token's position (or to the
    /// primary). Tokens only ever raise what a session must see.
    pub fn observe(&self, token: CausalToken) {
        self.session.observe(token.wal_offset());
    }

    /// Replication state: whether the node written to is a replica, the lag of each replica
    /// (measured now), how many replicas stream from the primary, and each replica's place in
    /// the read rotation.
    pub async fn check_replication_status(&self) -> StateResult<ReplicationStatus> {
        let s = self.store();
        s.router.check(&s.ctx.primary).await;
        let row = s
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed_one(
                        "SELECT pg_is_in_recovery(), (SELECT count(*) FROM pg_stat_replication)::bigint",
                        &[],
                    )
                    .await?)
            })
            .await?;
        let replicas = s.router.status();
        Ok(ReplicationStatus {
            is_replica: row.try_get(0)?,
            lag_ms: replicas.iter().map(|r| r.lag_ms).max().unwrap_or(0),
            lag_bytes: replicas.iter().map(|r| r.lag_bytes).max().unwrap_or(0),
            connected_replicas: u32::try_from(row.try_get::<_, i64>(1)?).unwrap_or(u32::MAX),
            primary_reads: s.router.primary_reads(),
            failovers_to_primary: s.router.failovers(),
            replicas,
            primary: s.router.primary_server(),
            primary_changes: s.router.primary_changes(),
        })
    }

    /// What the router knows of each replica now, without contacting any server (updated by
    /// the background monitor and by failed reads).
    pub fn replica_status(&self) -> Vec<crate::state::ReplicaStatus> {
        self.store().router.status()
    }
}
