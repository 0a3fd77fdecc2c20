//! The table's version floor (migration `005_version_floor.sql`) as removers use it: taking
//! its lock exclusively, and raising it. Cleanup, archive, checkpoint restore, dropping time
//! windows and `clear` all do both.

use tokio_postgres::types::Type;
use tokio_postgres::{Error, GenericClient};

use crate::state::schema::locks::xact_lock;
use crate::state::schema::names::TableNames;

/// Takes the floor's advisory lock exclusively for the rest of the transaction on `tx`
/// (inserts take it shared), waiting as the transaction's `lock_timeout` allows.
pub(crate) async fn lock<C: GenericClient>(tx: &C, names: &TableNames) -> Result<(), Error> {
    xact_lock(tx, names.floor_lock).await
}

/// Raises the floor to at least `to` (never lowers it): new rows then start above `to`.
pub(crate) async fn raise<C: GenericClient>(
    tx: &C,
    names: &TableNames,
    to: i64,
) -> Result<(), Error> {
    let sql = format!(
        "SELECT setval($1::text::regclass, GREATEST(last_value, $2)) FROM {}",
        names.version_floor
    );
    tx.query_typed_one(
        &sql,
        &[
            (&names.version_floor.as_str(), Type::TEXT),
            (&to, Type::INT8),
        ],
    )
    .await
    .map(|_| ())
}
