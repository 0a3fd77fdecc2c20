//! `clear()`: every entry gone at once, by TRUNCATE instead of a tombstone per row.
//!
//! One transaction on an exclusively held connection: an ACCESS EXCLUSIVE lock on the table
//! (readers and writers wait for the instant it takes: they see every entry or none), the
//! version floor's lock, the floor raised past every version in the table (one read of the
//! `version` column: re-created keys start above, so a version never repeats), the rows a
//! checkpoint holds saved to its history (as the capture trigger would on a delete; nothing
//! when no checkpoint needs them), then TRUNCATE. Writes nothing per row, and leaves no
//! tombstones for cleanup.
//!
//! A role that may not TRUNCATE the table or raise the floor, and a Citus-distributed table,
//! get the tombstone per row instead (the statement `clear` of
//! [`Statements`](crate::state::wire::statements::Statements)).

use crate::state::error::StateResult;
use crate::state::schema::names::TableNames;
use crate::state::schema::{floor, history};
use crate::state::wire::connection::PgConn;

impl PgConn {
    /// Removes every entry (see the module docs).
    pub(crate) async fn clear(&self, names: &TableNames) -> StateResult<()> {
        let t = &names.qualified;
        let may = format!(
            "SELECT has_table_privilege('{t}', 'TRUNCATE') \
                    AND has_sequence_privilege('{}', 'UPDATE')",
            names.version_floor
        );
        // (On a Citus-distributed table, untested here with TRUNCATE: tombstones as before.)
        // Unnamed statements (`query_typed`): behind PgBouncer's transaction pooling a named
        // one may be prepared on one server connection and run on another.
        let allowed =
            !names.distributed && self.client.query_typed_one(&may, &[]).await?.try_get(0)?;
        if !allowed {
            self.stmts.clear.execute(&self.client, &[]).await?;
            return Ok(());
        }
        let top = format!("SELECT coalesce(max(version), 0) FROM {t}");
        self.in_transaction(async {
            let tx = &self.client;
            tx.batch_execute(&format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"))
                .await?;
            floor::lock(tx, names).await?;
            let highest: i64 = tx.query_typed_one(&top, &[]).await?.try_get(0)?;
            floor::raise(tx, names, highest).await?;
            tx.batch_execute(&history::save_before_drop(names, t))
                .await?;
            tx.batch_execute(&format!("TRUNCATE {t}")).await?;
            Ok(())
        })
        .await
    }
}
