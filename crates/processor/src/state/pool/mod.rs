//! Layer `pool`: connections shared. bb8 with our manager and the health task
//! (`conn_pool`); first-come-first-served turns in front of it (`turns`); the operation
//! context every operation runs in (`context`: the primary's pool, names, statistics, and the
//! operation timeout with its one bound); the one checkout type that decides each
//! connection's fate when it is dropped (`checkout`); pipelined lanes for point statements
//! (`pipeline`); and the settling of abandoned statements behind the outcome contract
//! (`settle`: drain, session fence, a write's outcome).
//!
//! May use: `wire`, `schema`, `config`, `stats`, `error`.

pub(crate) mod checkout;
pub(crate) mod conn_pool;
pub(crate) mod context;
pub(crate) mod pipeline;
pub(crate) mod settle;
pub(crate) mod turns;
