-- One clock for expiry: the statement's start (statement_timestamp()), in and out of
-- transactions. now() is the transaction's start, so inside a long transaction an entry read
-- or overwritten by now() would stay live after it expired. Upserts judge an existing entry's
-- expiry by the proposed row's updated_at (its default), and the live view filters by it.
ALTER TABLE {{table}}
    ALTER COLUMN created_at SET DEFAULT statement_timestamp(),
    ALTER COLUMN updated_at SET DEFAULT statement_timestamp();

CREATE OR REPLACE VIEW {{live_view}} AS
    SELECT key, value, metadata, created_at, updated_at, expires_at, version
    FROM {{table}}
    WHERE expires_at IS NULL OR expires_at > statement_timestamp();

COMMENT ON COLUMN {{table}}.expires_at IS 'NULL: never expires. Rows with expires_at <= statement_timestamp() are invisible to every read.';
