//! Layer `routing`: where a read goes. Primary / replica selection, the lag monitor and
//! failover (`router`); read-your-writes sessions and causal tokens (`causal`).
//!
//! May use: `pool`, `config`, `error`.

pub(crate) mod causal;
pub(crate) mod router;
