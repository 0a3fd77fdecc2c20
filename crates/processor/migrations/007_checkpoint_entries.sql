-- State checkpoints keep their entries as rows (one per key), so a checkpoint of millions of
-- entries is as cheap to write and read as the state table itself. Shared by the schema's state
-- tables (a checkpoint row names its table), so applied once per schema.
CREATE TABLE IF NOT EXISTS {{schema}}.state_checkpoint_entries (
    checkpoint_id bigint      NOT NULL REFERENCES {{schema}}.state_checkpoints (id) ON DELETE CASCADE,
    key           bytea       NOT NULL,
    value         bytea       NOT NULL,
    metadata      jsonb       NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    expires_at    timestamptz,
    version       bigint      NOT NULL,
    PRIMARY KEY (checkpoint_id, key)
);
CREATE INDEX IF NOT EXISTS state_checkpoints_table_idx ON {{schema}}.state_checkpoints (state_table, id);
