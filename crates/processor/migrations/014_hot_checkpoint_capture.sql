-- Cheaper capture for incremental checkpoints (migration 013): the first write of a row after
-- a checkpoint stays a HOT update, and saving its pre-image costs one heap row and one index
-- entry (BENCHMARKS.md, 2026-12-07).
--
-- * `checkpoint_gen` is no longer indexed (changing an indexed column makes an update write
--   an entry in every index of the table). A restore finds the keys that did not exist at a
--   checkpoint by `inserted_gen` instead: the generation a row was inserted in, which no
--   update changes. Every other key changed since has a pre-image, now also when it was a
--   tombstone (so a key deleted before a checkpoint and written again after is found).
-- * The history has no primary key: the trigger's condition saves a row once per generation
--   (the first save restamps it, or the row is gone), so `(key, gen)` needed no check.
-- * The capture function names everything with its schema instead of setting `search_path`
--   (a function-level setting costs a configuration change and its undoing on every call).
-- * The trigger's condition reads one sequence: the newest needed generation is always
--   below the current one, so `checkpoint_gen <= needed` implies `< current`.

ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS inserted_gen bigint NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS {{schema}}.{{ix_checkpoint_gen}};

DO $migration$
DECLARE
    pk name;
BEGIN
    SELECT conname INTO pk FROM pg_catalog.pg_constraint
    WHERE conrelid = '{{checkpoint_history}}'::regclass AND contype = 'p';
    IF pk IS NOT NULL THEN
        EXECUTE pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I',
                                  '{{checkpoint_history}}', pk);
    END IF;
END
$migration$;

-- Saves the pre-image of a row and stamps the new row with the current generation. A
-- tombstone is saved when it is updated (the key comes back: the checkpoint held it as
-- absent), not when it is deleted (a key inserted again gets a new `inserted_gen`). An
-- expired row is saved too: a checkpoint taken before it expired holds it.
-- SECURITY DEFINER: a role with only the state table's privileges can still write. Every
-- name, type and operator is schema-qualified, so the caller's search_path cannot redirect it.
CREATE OR REPLACE FUNCTION {{checkpoint_capture}}() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    g pg_catalog.int8 := pg_catalog.pg_sequence_last_value('{{checkpoint_gen}}'::pg_catalog.regclass);
    upd pg_catalog.bool := TG_OP OPERATOR(pg_catalog.=) 'UPDATE'::pg_catalog.text;
BEGIN
    IF upd OR OLD.expires_at IS NULL
       OR OLD.expires_at OPERATOR(pg_catalog.<>) '-infinity'::pg_catalog.timestamptz THEN
        INSERT INTO {{checkpoint_history}}
            (key, gen, since_gen, value, metadata, created_at, updated_at, expires_at, version)
        VALUES (OLD.key, g, OLD.checkpoint_gen, OLD.value, OLD.metadata, OLD.created_at,
                OLD.updated_at, OLD.expires_at, OLD.version);
    END IF;
    IF upd THEN
        NEW.checkpoint_gen := g;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;

-- A table that already records history: rows stamped after the oldest incremental
-- checkpoint may have been inserted after it, so they count as inserted then (a restore to
-- a checkpoint removes them unless a pre-image says otherwise; rows stamped at or before
-- every checkpoint are never removed, so they keep 0); the trigger gets its new condition.
-- The trigger is dropped first, so this update saves nothing; the index comes after it.
DO $migration$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger
               WHERE tgrelid = '{{table}}'::regclass AND tgname = '{{checkpoint_trigger}}') THEN
        DROP TRIGGER {{checkpoint_trigger_ident}} ON {{table}};
        UPDATE {{table}} SET inserted_gen = checkpoint_gen
        WHERE checkpoint_gen > (SELECT coalesce(min(gen), 9223372036854775807)
                                FROM {{schema}}.state_checkpoints
                                WHERE state_table = '{{table}}' AND gen IS NOT NULL);
        ALTER TABLE {{table}} ALTER COLUMN inserted_gen
            SET DEFAULT pg_sequence_last_value('{{checkpoint_gen}}'::regclass);
        CREATE TRIGGER {{checkpoint_trigger_ident}} BEFORE UPDATE OR DELETE ON {{table}}
            FOR EACH ROW
            WHEN (OLD.checkpoint_gen <= pg_sequence_last_value('{{checkpoint_max}}'::regclass))
            EXECUTE FUNCTION {{checkpoint_capture}}();
    END IF;
END
$migration$;
CREATE INDEX IF NOT EXISTS {{ix_inserted_gen}} ON {{table}} (inserted_gen)
    WHERE inserted_gen > 0;
