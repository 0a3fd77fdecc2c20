//! Layer `wire`: one connection. Connecting with libpq's six sslmodes and its fallbacks
//! (`connection`, `tls`), session settings, the health probe, and the fixed statements of the
//! key/value operations, prepared by name per connection or sent unnamed behind PgBouncer
//! (`statements`).
//!
//! May use: `config`, `schema` (table names), `error`, `ident`.

pub(crate) mod connection;
pub(crate) mod statements;
pub(crate) mod tls;
