-- Base schema: the state table.
-- Names in double braces are replaced by validated, quoted identifiers before this runs.
CREATE TABLE IF NOT EXISTS {{table}} (
    key         bytea       NOT NULL,
    value       bytea       NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    version     bigint      NOT NULL DEFAULT 1,
    CONSTRAINT {{pkey}} PRIMARY KEY (key),
    CONSTRAINT state_key_length CHECK (octet_length(key) BETWEEN 1 AND 2048),
    CONSTRAINT state_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT state_version_positive CHECK (version >= 1)
);

COMMENT ON TABLE {{table}} IS 'pgstate: stream-processing state (bytea keys and values, jsonb metadata, TTL, versions)';
COMMENT ON COLUMN {{table}}.expires_at IS 'NULL: never expires. Rows with expires_at <= now() are invisible to every read.';
COMMENT ON COLUMN {{table}}.version IS 'Bumped by every write, for optimistic locking.';
