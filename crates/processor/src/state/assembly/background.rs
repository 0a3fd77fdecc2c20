//! The background maintenance task: cleanup passes and, on a table partitioned by write
//! window, the change to each new window.

use std::sync::Arc;
use std::time::Duration;

use super::Core;
use crate::state::config::enhanced::EnhancedPostgresConfig;
use crate::state::error::{StateError, StateResult};
use crate::state::maintenance::{self, CleanupPlan, RetentionReport};
use crate::state::routing::causal::Session;

/// What the configuration asks cleanup passes to do, and how often.
pub(crate) fn plan(config: &EnhancedPostgresConfig) -> (CleanupPlan, Duration) {
    let policy = config.retention.clone().unwrap_or_default();
    (
        CleanupPlan {
            expired: config.expired_cleanup,
            max_age: policy.enabled.then_some(policy.max_age),
            batch_size: policy.batch_size,
        },
        policy.cleanup_interval,
    )
}

/// Starts the background maintenance task when there is anything to do: a cleanup pass every
/// `cleanup_interval` (the first one interval after start), skipped while another instance
/// runs one, and, on a table partitioned by write window, the change to each new window (with
/// partitions created ahead), checked every half window. It ends when the backend is dropped
/// (stopping a pass in progress between statements: the batch under way rolls back).
pub(super) fn spawn_cleanup(
    inner: &Arc<Core>,
    windows: Option<(Duration, u32)>,
) -> Option<tokio::task::JoinHandle<()>> {
    let (plan, interval) = plan(&inner.config);
    let cleans = plan.expired || plan.max_age.is_some();
    if !cleans && windows.is_none() {
        return None;
    }
    let tick = match windows {
        Some((window, _)) => interval.min(window / 2),
        None => interval,
    };
    let weak = Arc::downgrade(inner);
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last_pass = tokio::time::Instant::now();
        loop {
            ticker.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let due = cleans && last_pass.elapsed() >= interval;
            let work = async {
                if let Some((window, premake)) = windows {
                    if let Err(e) = maintenance::roll_windows(&inner.store, window, premake).await {
                        tracing::warn!(error = %e, "starting a new write window failed; it is tried again");
                    }
                }
                if !due {
                    return;
                }
                let pass = maintenance::cleanup_pass(
                    &inner.store,
                    &inner.coordinator,
                    plan,
                    Duration::ZERO,
                    &|_| {},
                );
                match pass.await {
                    Ok(Some(_)) => {}
                    Ok(None) => tracing::debug!("cleanup pass skipped: another instance runs one"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cleanup pass failed; it runs again at the next interval")
                    }
                }
            };
            // This task's reference keeps the backend alive: once it is the only one left,
            // every handle is gone and the work stops.
            let orphaned = async {
                while Arc::strong_count(&inner) > 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                () = work => {}
                () = orphaned => return,
            }
            if due {
                last_pass = tokio::time::Instant::now();
            }
        }
    }))
}

impl Core {
    /// One cleanup pass now, for `session` (see
    /// [`EnhancedPostgresBackend::apply_retention_policy`](crate::state::EnhancedPostgresBackend::apply_retention_policy)):
    /// waits up to the operation timeout while another instance runs one on the table.
    pub async fn pass(
        &self,
        session: &Session,
        plan: CleanupPlan,
        progress: &(dyn Fn(u64) + Sync),
    ) -> StateResult<RetentionReport> {
        let (store, wait) = (&self.store, self.store.ctx.limit);
        let pass = maintenance::cleanup_pass(store, &self.coordinator, plan, wait, progress);
        let removed = store.tracked(session, pass).await?;
        removed.ok_or_else(|| {
            StateError::Timeout(format!(
                "another instance's cleanup pass on {} did not finish within {wait:?}",
                store.ctx.names.qualified
            ))
        })
    }

    /// Deletes expired entries and delete tombstones now; how many entries had expired.
    pub async fn cleanup_expired(&self, session: &Session) -> StateResult<u64> {
        let (plan, _) = plan(&self.config);
        let plan = CleanupPlan {
            expired: true,
            max_age: None,
            ..plan
        };
        Ok(self.pass(session, plan, &|_| {}).await?.entries_deleted)
    }
}
