-- Versions stay monotonic when cleanup removes rows (expired entries, delete tombstones, rows
-- past the retention age): the floor is a sequence holding the highest version cleanup ever
-- removed from this table, and a newly created row starts one above it. On a table nothing was
-- ever removed from, new keys start at 1.
--
-- A sequence, not a row: its value is read outside any snapshot, so a transaction at
-- REPEATABLE READ or SERIALIZABLE sees a floor raised after it began.
CREATE SEQUENCE IF NOT EXISTS {{version_floor}} AS bigint MINVALUE 0 START WITH 0;
-- Dumped and dropped with the table.
ALTER SEQUENCE {{version_floor}} OWNED BY {{table}}.version;

-- The version of a newly created row. Every insert takes the floor's advisory lock shared (for
-- its transaction); a cleanup batch takes it exclusively while it deletes and raises the floor.
-- So an insert either finishes before a batch starts (and a key it re-creates is then live, not
-- deleted), or reads the floor after the batch committed.
--
-- SECURITY DEFINER (as the role that applied the migrations, with a fixed search_path): a role
-- granted only the table's privileges can still write without rights on the sequence.
CREATE OR REPLACE FUNCTION {{next_version}}() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({{floor_lock}});
    RETURN (SELECT last_value FROM {{version_floor}}) + 1;
END
$$;

ALTER TABLE {{table}} ALTER COLUMN version SET DEFAULT {{next_version}}();

-- Heavy updates: every write rewrites its row. Vacuum and analyze the state table well before
-- the defaults (20% and 10% of the table) would, and leave room on each page for HOT updates.
ALTER TABLE {{table}} SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    fillfactor = 90
);
