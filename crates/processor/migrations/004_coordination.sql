-- Coordination: lock bookkeeping keyed by the holding session, fencing tokens, leader leases
-- and durable notification events. Shared by every state table of the schema, so applied once
-- per schema (recorded with an empty state_table).

-- One row per held lock and holding session (shared locks have several holders).
ALTER TABLE {{schema}}.state_advisory_locks ADD COLUMN IF NOT EXISTS backend_pid integer;
ALTER TABLE {{schema}}.state_advisory_locks ADD COLUMN IF NOT EXISTS lock_mode text NOT NULL DEFAULT 'exclusive';
-- Names one acquisition (a fence checks it), whatever session or token it shares.
ALTER TABLE {{schema}}.state_advisory_locks ADD COLUMN IF NOT EXISTS acquisition_id text;
DELETE FROM {{schema}}.state_advisory_locks WHERE backend_pid IS NULL;
ALTER TABLE {{schema}}.state_advisory_locks ALTER COLUMN backend_pid SET NOT NULL;
ALTER TABLE {{schema}}.state_advisory_locks DROP CONSTRAINT IF EXISTS state_advisory_locks_pkey;
ALTER TABLE {{schema}}.state_advisory_locks ADD CONSTRAINT state_advisory_locks_pkey PRIMARY KEY (lock_key, backend_pid);

-- The fencing token of each lock: incremented on every acquisition, never reset.
CREATE TABLE IF NOT EXISTS {{schema}}.state_lock_fences (
    lock_key    bigint      PRIMARY KEY,
    lock_name   text,
    token       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Leader leases: the term grows with every new leader; expiry is on the server's clock.
CREATE TABLE IF NOT EXISTS {{schema}}.state_leaders (
    name             text        PRIMARY KEY,
    holder_id        text,
    holder_host      text,
    holder_pid       integer,
    backend_pid      integer,
    term             bigint      NOT NULL,
    acquired_at      timestamptz NOT NULL,
    renewed_at       timestamptz NOT NULL,
    lease_expires_at timestamptz NOT NULL
);

-- Durable notifications: a gapless sequence per channel; the row lock on the channel orders
-- producers, so sequence numbers become visible in order.
CREATE TABLE IF NOT EXISTS {{schema}}.state_event_channels (
    channel  text   PRIMARY KEY,
    last_seq bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS {{schema}}.state_events (
    channel    text        NOT NULL,
    seq        bigint      NOT NULL,
    payload    text        NOT NULL,
    -- The insert's own time (not its transaction's start), so age-based pruning follows the
    -- sequence order of a channel.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, seq)
);
CREATE INDEX IF NOT EXISTS state_events_created_at_idx ON {{schema}}.state_events (created_at);
