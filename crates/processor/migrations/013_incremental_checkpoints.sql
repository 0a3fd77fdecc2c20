-- Incremental checkpoints (maintenance/checkpoints.rs): a checkpoint is a generation number,
-- not a copy. Every row carries the generation it was last stamped in; a checkpoint ends the
-- current generation (under a SHARE lock: no write transaction spans it). The first change of
-- a row after a checkpoint saves the row as it was (its pre-image) into the history table,
-- through a trigger that pgstate attaches when the table's first incremental checkpoint is
-- taken; a restore rewrites only the keys changed since.

-- The current generation, and the newest generation a checkpoint still needs (-1: none).
-- Readable by every role: writers' trigger conditions read them.
CREATE SEQUENCE IF NOT EXISTS {{checkpoint_gen}} AS bigint MINVALUE 0 START WITH 0;
SELECT setval('{{checkpoint_gen}}', 0, true) FROM {{checkpoint_gen}} WHERE NOT is_called;
CREATE SEQUENCE IF NOT EXISTS {{checkpoint_max}} AS bigint MINVALUE -1 START WITH -1;
SELECT setval('{{checkpoint_max}}', -1, true) FROM {{checkpoint_max}} WHERE NOT is_called;
GRANT SELECT ON SEQUENCE {{checkpoint_gen}}, {{checkpoint_max}} TO PUBLIC;

-- A constant default (no table rewrite). The first incremental checkpoint makes it the
-- current generation, when it attaches the trigger: a table never checkpointed (or a Citus
-- table, whose checkpoints are full copies) pays nothing.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS checkpoint_gen bigint NOT NULL DEFAULT 0;
-- The rows changed since a checkpoint (none are indexed before the first one).
CREATE INDEX IF NOT EXISTS {{ix_checkpoint_gen}} ON {{table}} (checkpoint_gen)
    WHERE checkpoint_gen > 0;

-- Pre-images: the row of `key` as it was before its first change in generation `gen`, last
-- stamped in `since_gen`; it is the key's state at every checkpoint of a generation in
-- [since_gen, gen).
CREATE TABLE IF NOT EXISTS {{checkpoint_history}} (
    key         bytea       NOT NULL,
    gen         bigint      NOT NULL,
    since_gen   bigint      NOT NULL,
    value       bytea       NOT NULL,
    metadata    jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    version     bigint      NOT NULL,
    PRIMARY KEY (key, gen)
);
CREATE INDEX IF NOT EXISTS {{ix_checkpoint_history_gen}} ON {{checkpoint_history}} (gen);

-- Saves the pre-image of a row (not of a tombstone: a deleted key reads as absent) and
-- stamps the new row with the current generation. An expired row is saved too: a checkpoint
-- taken before it expired holds it (reads of a checkpoint judge expiry by its instant).
-- SECURITY DEFINER: a role with only the state table's privileges can still write.
CREATE OR REPLACE FUNCTION {{checkpoint_capture}}() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g bigint := pg_sequence_last_value('{{checkpoint_gen}}'::regclass);
BEGIN
    IF OLD.expires_at IS DISTINCT FROM '-infinity' THEN
        INSERT INTO {{checkpoint_history}}
            (key, gen, since_gen, value, metadata, created_at, updated_at, expires_at, version)
        VALUES (OLD.key, g, OLD.checkpoint_gen, OLD.value, OLD.metadata, OLD.created_at,
                OLD.updated_at, OLD.expires_at, OLD.version)
        ON CONFLICT (key, gen) DO NOTHING;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.checkpoint_gen := g;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;

-- Which generation an incremental checkpoint ended (NULL: a full copy, in
-- state_checkpoint_entries, taken before this migration).
ALTER TABLE {{schema}}.state_checkpoints ADD COLUMN IF NOT EXISTS gen bigint;
