-- Lease locks (the seed project's DistributedLock): a resource is held by one token until
-- its lease expires on the server's clock, whether or not its holder is still alive. The
-- fence grows with every new holder, and the row outlives releases, so it never repeats.
CREATE TABLE IF NOT EXISTS {{schema}}.state_leases (
    resource    text        PRIMARY KEY,
    token       text,
    fence       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
