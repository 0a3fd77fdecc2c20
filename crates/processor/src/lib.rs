//! `processor`: stream-processing building blocks. [`state`] stores operator state in
//! PostgreSQL (or memory) behind the [`state::StateBackend`] trait.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod state;
