//! Layer `stats`: what the backend counts. Operation names and kinds (`operation`), counters
//! and the slow-operation log (`counters`), latency histograms (`latency`), and the `metrics`
//! facade that publishes them (`published`).
//!
//! May use: `error`. Everything above records into it; it calls nothing above.

pub(crate) mod counters;
pub(crate) mod latency;
pub(crate) mod operation;
pub(crate) mod published;
