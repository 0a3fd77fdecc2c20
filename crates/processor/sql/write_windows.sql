-- Write windows of a table partitioned by time range (PartitionStrategy::TimeRange). Created
-- with the partitioned table; names in double braces are replaced by quoted identifiers.
--
-- One row per window whose partition exists. Exactly one window is current (became_current
-- set, ended not): every write puts its entry there. A window that ended holds only entries
-- last written before it ended.
CREATE TABLE IF NOT EXISTS {{windows}} (
    window_start   timestamptz PRIMARY KEY,
    window_end     timestamptz NOT NULL,
    became_current timestamptz,
    ended          timestamptz
);

-- The transaction id (xid8, as bigint) of the last transaction that changed the current
-- window; 0 before the first change. A sequence: read outside any snapshot.
CREATE SEQUENCE IF NOT EXISTS {{window_advance}} AS bigint MINVALUE 0 START WITH 0;

-- The current window, for a write. Takes the table's floor lock shared for the transaction
-- (a change of window takes it exclusively), so the window cannot change until the write
-- commits. A statement whose snapshot predates the last change of window could miss an entry
-- a write committed into the old window just before the change, and would then create the key
-- a second time: it fails with a serialization failure instead, to be retried.
--
-- STABLE: its queries see the calling statement's snapshot, which is what is checked.
CREATE OR REPLACE FUNCTION {{write_window}}() RETURNS timestamptz
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changed_by bigint;
    status text;
    current_window timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock_shared({{floor_lock}});
    SELECT last_value INTO changed_by FROM {{window_advance}};
    IF changed_by > 0 AND NOT pg_visible_in_snapshot(changed_by::text::xid8, pg_current_snapshot()) THEN
        BEGIN
            status := pg_xact_status(changed_by::text::xid8);
        EXCEPTION WHEN invalid_parameter_value THEN
            -- An id this cluster has not reached: it came with a restored dump of another
            -- cluster and says nothing here.
            status := NULL;
        END;
        IF coalesce(status, 'aborted') <> 'aborted' THEN
            RAISE EXCEPTION 'the current write window changed after this statement''s snapshot was taken'
                USING ERRCODE = 'serialization_failure', HINT = 'Retry the statement or transaction.';
        END IF;
    END IF;
    SELECT window_start INTO current_window FROM {{windows}}
        WHERE became_current IS NOT NULL AND ended IS NULL;
    IF current_window IS NULL THEN
        RAISE EXCEPTION 'no current write window: the table''s windows were never started'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN current_window;
END
$$;
