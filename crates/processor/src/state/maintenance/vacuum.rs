//! `VACUUM (ANALYZE)` of the state table, on a connection of its own.

use std::time::Duration;

use crate::state::error::StateResult;
use crate::state::ops::store::Store;

/// Runs `VACUUM (ANALYZE)` (with `full`, `VACUUM (FULL, ANALYZE)`, which rewrites the table
/// under an exclusive lock) on the state table. It runs outside any transaction block on a
/// connection of its own, not one of the pool's. Waiting for the table's lock is bounded by
/// `lock_wait` (`lock_timeout`, except behind PgBouncer's transaction pooling); the vacuum
/// itself runs as long as it needs.
pub(crate) async fn vacuum_analyze(
    store: &Store,
    full: bool,
    lock_wait: Duration,
) -> StateResult<()> {
    let client = store.ctx.primary.connect_unpooled().await?;
    // Numbers and validated names only in the SQL text. Behind PgBouncer's transaction
    // pooling a session setting would stick to whichever server connection ran it: the wait
    // for the lock is then the server's default.
    if !store.ctx.primary.transaction_pooling() {
        let ms = lock_wait.as_millis().clamp(1, i32::MAX as u128);
        client
            .batch_execute(&format!(
                "SET statement_timeout = 0; SET lock_timeout = {ms}"
            ))
            .await?;
    }
    let options = if full { "FULL, ANALYZE" } else { "ANALYZE" };
    client
        .batch_execute(&format!("VACUUM ({options}) {}", store.ctx.names.qualified))
        .await?;
    Ok(())
}
