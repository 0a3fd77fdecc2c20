//! The history of a state table's rows for incremental checkpoints (migration 013): the
//! capture trigger's definition, and the rows of the state at a checkpoint's generation.
//! Here, in the schema layer, because converting the table to a partitioned one must carry
//! the trigger over (`partitions`).

use crate::state::schema::names::TableNames;

/// The rows of the state at generation `$1`, live at time `$2`: `cols` of each. A key has at
/// most one pre-image covering a generation, but it may be saved twice (an update that moves
/// a row to another partition fires the trigger as an update and then as a delete), so one
/// of each is read.
pub(crate) fn state_at(n: &TableNames, cols: &str) -> String {
    format!(
        "SELECT {cols} FROM {t} WHERE checkpoint_gen <= $1 \
           AND (expires_at IS NULL OR expires_at > $2) \
         UNION ALL \
         SELECT {cols} FROM (SELECT DISTINCT ON (key) * FROM {h} \
                             WHERE since_gen <= $1 AND gen > $1) h \
         WHERE expires_at IS NULL OR expires_at > $2",
        t = n.qualified,
        h = n.checkpoint_history
    )
}

/// The DDL that turns history on, at the table's first incremental checkpoint: new rows are
/// stamped (and marked inserted) with the current generation, and the capture trigger saves
/// pre-images of rows a checkpoint still needs (stamped at or before the newest needed
/// generation, which is always below the current one). Migration 014 holds the same trigger.
pub(crate) fn trigger_ddl(n: &TableNames) -> String {
    format!(
        "ALTER TABLE {t} ALTER COLUMN checkpoint_gen \
             SET DEFAULT pg_sequence_last_value('{gen}'::regclass), \
           ALTER COLUMN inserted_gen SET DEFAULT pg_sequence_last_value('{gen}'::regclass); \
         CREATE TRIGGER {trigger} BEFORE UPDATE OR DELETE ON {t} FOR EACH ROW \
         WHEN (OLD.checkpoint_gen <= pg_sequence_last_value('{max}'::regclass)) \
         EXECUTE FUNCTION {capture}()",
        trigger = n.checkpoint_trigger,
        t = n.qualified,
        gen = n.checkpoint_gen,
        max = n.checkpoint_max,
        capture = n.checkpoint_capture
    )
}

/// Saves, as the capture trigger would on a delete, the pre-images of the rows of `part` (a
/// partition about to be dropped, which fires no trigger) that a checkpoint needs.
pub(crate) fn save_before_drop(n: &TableNames, part: &str) -> String {
    format!(
        "INSERT INTO {h} (key, gen, since_gen, value, metadata, created_at, updated_at, \
                         expires_at, version) \
         SELECT key, pg_sequence_last_value('{gen}'::regclass), checkpoint_gen, value, metadata, \
                created_at, updated_at, expires_at, version FROM {part} \
         WHERE checkpoint_gen <= pg_sequence_last_value('{max}'::regclass) \
           AND expires_at IS DISTINCT FROM '-infinity'",
        h = n.checkpoint_history,
        gen = n.checkpoint_gen,
        max = n.checkpoint_max
    )
}
