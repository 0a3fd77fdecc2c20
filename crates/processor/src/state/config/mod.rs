//! Layer `config`: what a backend is told. [`EnhancedPostgresConfig`](enhanced::EnhancedPostgresConfig)
//! and the seed's option structs (`settings`), connection strings (`connstr`: URL and keyword
//! syntax; `connspec`: one server's settings, TLS keys, `pgbouncer=true`), the partitioning
//! setting (`partition_strategy`) and the Citus setting (`citus_layout`), each validated before
//! anything connects.
//!
//! May use: `error`, `limits`, `ident`. Plain data: no I/O.

pub(crate) mod citus_layout;
pub(crate) mod connspec;
pub(crate) mod connstr;
pub(crate) mod enhanced;
pub(crate) mod libpq_env;
pub(crate) mod partition_strategy;
pub(crate) mod settings;
