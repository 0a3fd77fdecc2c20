//! Layer `ops`: the key/value operations. The statements on one connection (`conn_ops`),
//! batches by UNNEST and binary COPY (`batch`), whole entries (metadata, TTL) by binary COPY
//! (`entry_copy`), `clear` by TRUNCATE (`clear`), the coalescing of concurrent puts and gets
//! (`coalesce` for the queues, `groups` for running them), and [`Store`](store::Store): every
//! operation over the pools, bounded by the operation timeout, counted, routed.
//!
//! May use: `routing`, `pool`, `wire`, `schema`, `stats`, `config`, `error`, `limits`.

pub(crate) mod batch;
mod clear;
pub(crate) mod coalesce;
pub(crate) mod conn_ops;
pub(crate) mod entry_copy;
pub(crate) mod groups;
pub(crate) mod store;
