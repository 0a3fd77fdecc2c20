//! Layer `schema`: the database objects of one state table. Quoted names of the table and what
//! derives from it (`names`), the embedded migrations and their runner (`migrations`), the
//! partitioned layout in the catalog (`partitions`), write windows of time-range tables
//! (`windows`), distribution over Citus workers (`distribution`), the history of rows that
//! incremental checkpoints keep (`history`), the version floor as removers raise it
//! (`floor`) and the table's advisory transaction locks (`locks`).
//!
//! May use: `config`, `error`, `limits`, `ident`; runs its SQL on a client it is given (it
//! opens no connection of its own).

pub(crate) mod distribution;
pub(crate) mod floor;
pub(crate) mod history;
pub(crate) mod locks;
pub(crate) mod migrations;
pub(crate) mod names;
pub(crate) mod partitions;
pub(crate) mod windows;
