-- Performance indexes. Every predicate is immutable: expiry is decided at read time
-- (expires_at > now()), never baked into an index.

-- Finding expired rows for cleanup. Partial: most rows never expire.
CREATE INDEX IF NOT EXISTS {{ix_expires}} ON {{table}} (expires_at) WHERE expires_at IS NOT NULL;

-- Metadata containment queries (metadata @> '{...}').
CREATE INDEX IF NOT EXISTS {{ix_metadata}} ON {{table}} USING gin (metadata jsonb_path_ops);
