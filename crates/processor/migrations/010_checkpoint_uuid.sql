-- Checkpoints named by a UUID, with their data size (the bytes of their keys and values), as
-- the seed project's basic backend reports them. New checkpoints get a v4 UUID from the
-- client and their size as they are taken. Earlier ones get a UUID derived from their id
-- (an immutable expression: no volatile default, which Citus refuses on a reference table);
-- their size is counted when they are first listed (a statement here reading the entries
-- would join a reference table to a distributed one, which Citus refuses in an UPDATE).
ALTER TABLE {{schema}}.state_checkpoints
    ADD COLUMN IF NOT EXISTS checkpoint_uuid uuid,
    ADD COLUMN IF NOT EXISTS data_size bigint;
UPDATE {{schema}}.state_checkpoints
    SET checkpoint_uuid = md5(state_table || ':' || id)::uuid
    WHERE checkpoint_uuid IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS state_checkpoints_uuid_idx
    ON {{schema}}.state_checkpoints (checkpoint_uuid);
