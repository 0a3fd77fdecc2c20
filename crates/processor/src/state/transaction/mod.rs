//! Layer `transaction`: [`PostgresTransaction`](tx::PostgresTransaction) on one pooled
//! primary connection from `BEGIN` to `COMMIT` or `ROLLBACK` (`tx`), the key/value operations
//! inside it (`tx_ops`), and the retry loop that runs a whole transaction again (`retry`).
//!
//! May use: `ops` (the statements on a connection), `routing` (sessions), `pool`, `wire`,
//! `schema`, `stats`, `config`, `error`, `limits`.

pub(crate) mod retry;
pub(crate) mod tx;
mod tx_ops;
