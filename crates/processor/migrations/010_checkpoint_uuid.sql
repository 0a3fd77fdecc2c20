-- Checkpoints named by a UUID, with their data size (the bytes of their keys and values), as
-- the seed project's basic backend reports them. New checkpoints get a v4 UUID from the
-- client and their size as they are taken; earlier ones get a UUID derived from their id
-- (no volatile default, which Citus refuses on a reference table) and their size counted here.
ALTER TABLE {{schema}}.state_checkpoints
    ADD COLUMN IF NOT EXISTS checkpoint_uuid uuid,
    ADD COLUMN IF NOT EXISTS data_size bigint NOT NULL DEFAULT 0;
UPDATE {{schema}}.state_checkpoints c
    SET checkpoint_uuid = md5(c.state_table || ':' || c.id)::uuid,
        data_size = (SELECT coalesce(sum(length(e.key) + length(e.value)), 0)
                     FROM {{schema}}.state_checkpoint_entries e WHERE e.checkpoint_id = c.id)
    WHERE c.checkpoint_uuid IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS state_checkpoints_uuid_idx
    ON {{schema}}.state_checkpoints (checkpoint_uuid);
