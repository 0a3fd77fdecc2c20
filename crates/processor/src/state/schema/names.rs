//! The quoted names of one state table and of everything derived from it (archive table,
//! the schema's coordination tables, migration placeholders). Built from validated
//! identifiers only, so every name here is safe to place in SQL text.

use crate::state::ident::Ident;

/// The quoted names of one state table and everything derived from it.
#[derive(Clone, Debug)]
pub(crate) struct TableNames {
    pub schema: Ident,
    pub table: Ident,
    /// `"schema"."table"`.
    pub qualified: String,
    /// `schema.table`, unquoted: the table in spans, logs and metric labels.
    pub label: String,
    /// `"schema"."table_archive"`.
    pub archive: String,
    /// The schema's coordination tables, qualified: lock bookkeeping, fencing tokens, leader
    /// leases, durable event channels and events.
    pub locks: String,
    pub fences: String,
    pub leaders: String,
    pub event_channels: String,
    pub events: String,
    /// The schema's lease locks (see migration 011).
    pub leases: String,
    /// The schema's exactly-once tables (see migration 012): operators' epochs, claims,
    /// source offsets, the outbox, its heads and its readers.
    pub operators: String,
    pub claims: String,
    pub source_offsets: String,
    pub outbox: String,
    pub outbox_heads: String,
    pub outbox_readers: String,
    /// The schema's state checkpoints and their entries.
    pub checkpoints: String,
    pub checkpoint_entries: String,
    /// Incremental checkpoints (see migration 013): the sequences of the current generation
    /// and of the newest one a checkpoint needs, the history of pre-images, the function
    /// that saves them, and its trigger (unqualified: a trigger is named per table).
    pub checkpoint_gen: String,
    pub checkpoint_max: String,
    pub checkpoint_history: String,
    pub checkpoint_capture: String,
    pub checkpoint_trigger: Ident,
    /// The two-integer advisory lock that serialises taking and dropping checkpoints of the
    /// table (so the newest needed generation is never lowered under a new checkpoint).
    pub checkpoint_lock: (i32, i32),
    /// The sequence holding the highest version cleanup removed (see migration 005).
    pub version_floor: String,
    /// The function giving a new row its version.
    pub next_version: String,
    /// The two-integer advisory lock guarding the floor: inserts take it shared, cleanup
    /// batches exclusively. (Two-integer keys never collide with the `bigint` keys of the
    /// lock API.)
    pub floor_lock: (i32, i32),
    /// Time-range partitioning's write windows (`<table>_windows`), the sequence naming the
    /// transaction that last changed the current window, and the function giving a write its
    /// window (see `sql/write_windows.sql`).
    pub windows: String,
    pub window_advance: String,
    pub write_window: String,
    /// The two-integer advisory lock that serialises creating window partitions (so two
    /// instances never create the same one).
    pub windows_lock: (i32, i32),
    /// Whether the table is partitioned by write window: rows carry `write_window`, the
    /// primary key is `(key, write_window)`, and writes move an entry into the current
    /// window (see [`statements`](crate::state::wire::statements)). Read from the catalog when the
    /// backend starts.
    pub windowed: bool,
    /// Whether Citus distributes the table over workers: statements are then planned for
    /// their parameters each time (Citus routes each to its shard), never generically. Read
    /// from the catalog when the backend starts.
    pub distributed: bool,
}

impl TableNames {
    pub fn new(schema: Ident, table: Ident) -> Self {
        let qualified = format!("{schema}.{table}");
        let archive = format!("{schema}.{}", table.suffixed("_archive"));
        let in_schema = |t: &str| format!("{schema}.\"{t}\"");
        let floor_lock = (
            hash32(b"pgstate.version_floor"),
            hash32(format!("{}.{}", schema.as_str(), table.as_str()).as_bytes()),
        );
        TableNames {
            label: format!("{}.{}", schema.as_str(), table.as_str()),
            version_floor: format!("{schema}.{}", table.suffixed("_version_floor")),
            windows: format!("{schema}.{}", table.suffixed("_windows")),
            window_advance: format!("{schema}.{}", table.suffixed("_window_advance")),
            write_window: format!("{schema}.{}", table.suffixed("_write_window")),
            windows_lock: (hash32(b"pgstate.write_windows"), floor_lock.1),
            checkpoint_gen: format!("{schema}.{}", table.suffixed("_checkpoint_gen")),
            checkpoint_max: format!("{schema}.{}", table.suffixed("_checkpoint_max")),
            checkpoint_history: format!("{schema}.{}", table.suffixed("_checkpoint_history")),
            checkpoint_capture: format!("{schema}.{}", table.suffixed("_checkpoint_capture")),
            checkpoint_trigger: table.suffixed("_checkpoint_trigger"),
            checkpoint_lock: (hash32(b"pgstate.checkpoints"), floor_lock.1),
            windowed: false,
            distributed: false,
            next_version: format!("{schema}.{}", table.suffixed("_next_version")),
            floor_lock,
            locks: in_schema("state_advisory_locks"),
            fences: in_schema("state_lock_fences"),
            leaders: in_schema("state_leaders"),
            leases: in_schema("state_leases"),
            operators: in_schema("state_operators"),
            claims: in_schema("state_claims"),
            source_offsets: in_schema("state_source_offsets"),
            outbox: in_schema("state_outbox"),
            outbox_heads: in_schema("state_outbox_heads"),
            outbox_readers: in_schema("state_outbox_readers"),
            event_channels: in_schema("state_event_channels"),
            events: in_schema("state_events"),
            checkpoints: in_schema("state_checkpoints"),
            checkpoint_entries: in_schema("state_checkpoint_entries"),
            schema,
            table,
            qualified,
            archive,
        }
    }

    /// Fills a migration template's placeholders with quoted identifiers.
    pub fn render(&self, template: &str) -> String {
        let t = &self.table;
        let replacements = [
            ("{{table}}", self.qualified.clone()),
            ("{{schema}}", self.schema.to_string()),
            ("{{archive}}", self.archive.clone()),
            ("{{pkey}}", t.suffixed("_pkey").to_string()),
            ("{{ix_expires}}", t.suffixed("_expires_at_idx").to_string()),
            (
                "{{ix_expires_key}}",
                t.suffixed("_expires_key_idx").to_string(),
            ),
            (
                "{{ix_metadata}}",
                t.suffixed("_metadata_gin_idx").to_string(),
            ),
            (
                "{{ix_archive_key}}",
                t.suffixed("_archive_key_idx").to_string(),
            ),
            (
                "{{live_view}}",
                format!("{}.{}", self.schema, t.suffixed("_live")),
            ),
            ("{{version_floor}}", self.version_floor.clone()),
            ("{{next_version}}", self.next_version.clone()),
            ("{{windows}}", self.windows.clone()),
            ("{{checkpoint_gen}}", self.checkpoint_gen.clone()),
            ("{{checkpoint_max}}", self.checkpoint_max.clone()),
            ("{{checkpoint_history}}", self.checkpoint_history.clone()),
            ("{{checkpoint_capture}}", self.checkpoint_capture.clone()),
            (
                "{{ix_checkpoint_gen}}",
                t.suffixed("_checkpoint_gen_idx").to_string(),
            ),
            (
                "{{ix_inserted_gen}}",
                t.suffixed("_inserted_gen_idx").to_string(),
            ),
            (
                "{{checkpoint_trigger_ident}}",
                self.checkpoint_trigger.to_string(),
            ),
            (
                "{{checkpoint_trigger}}",
                self.checkpoint_trigger.as_str().to_string(),
            ),
            (
                "{{ix_checkpoint_history_gen}}",
                t.suffixed("_checkpoint_hist_idx").to_string(),
            ),
            ("{{window_advance}}", self.window_advance.clone()),
            ("{{write_window}}", self.write_window.clone()),
            ("{{floor_lock}}", {
                let (class, object) = self.floor_lock;
                format!("{class}, {object}")
            }),
        ];
        let mut sql = template.to_string();
        for (placeholder, value) in replacements {
            sql = sql.replace(placeholder, &value);
        }
        sql
    }
}

/// The first 4 bytes of SHA-256 of `data`, big-endian: fixed forever.
fn hash32(data: &[u8]) -> i32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data);
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}
