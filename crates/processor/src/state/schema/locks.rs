//! The table's advisory transaction locks, each by its key pair in `names` (the version
//! floor's, the write windows', the checkpoints'): taken until the transaction ends.

use tokio_postgres::types::Type;
use tokio_postgres::{Error, GenericClient};

/// Takes the advisory lock `(class, object)` exclusively for the rest of the transaction on
/// `c`, waiting as the transaction's `lock_timeout` allows.
pub(crate) async fn xact_lock<C: GenericClient>(
    c: &C,
    (class, object): (i32, i32),
) -> Result<(), Error> {
    c.execute_typed(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[(&class, Type::INT4), (&object, Type::INT4)],
    )
    .await
    .map(|_| ())
}

/// [`xact_lock`] as a statement of its own, for a simple-query string that begins a
/// transaction and takes the lock in one message (the keys are the table's own integers).
pub(crate) fn xact_lock_statement((class, object): (i32, i32)) -> String {
    format!("SELECT pg_catalog.pg_advisory_xact_lock({class}, {object})")
}
