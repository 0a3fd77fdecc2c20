-- Enhanced features: checkpoints, advisory lock bookkeeping, the archive table and a view of
-- live entries.

CREATE TABLE IF NOT EXISTS {{schema}}.state_checkpoints (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state_table  text        NOT NULL,
    name         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    entry_count  bigint      NOT NULL DEFAULT 0,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS {{schema}}.state_advisory_locks (
    lock_key      bigint      PRIMARY KEY,
    lock_name     text,
    holder_id     text        NOT NULL,
    holder_host   text,
    holder_pid    integer,
    acquired_at   timestamptz NOT NULL DEFAULT now(),
    fencing_token bigint      NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS {{archive}} (
    key         bytea       NOT NULL,
    value       bytea       NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    version     bigint      NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {{ix_archive_key}} ON {{archive}} (key);

CREATE OR REPLACE VIEW {{live_view}} AS
    SELECT key, value, metadata, created_at, updated_at, expires_at, version
    FROM {{table}}
    WHERE expires_at IS NULL OR expires_at > now();
