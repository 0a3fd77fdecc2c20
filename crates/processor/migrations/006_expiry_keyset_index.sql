-- Cleanup walks expired rows in (expires_at, key) order and continues each batch after the
-- previous one's last row, so it never rescans the index entries of rows it already deleted
-- (still in the index until VACUUM). Replaces the expires_at-only index of migration 002.
CREATE INDEX IF NOT EXISTS {{ix_expires_key}} ON {{table}} (expires_at, key) WHERE expires_at IS NOT NULL;
DROP INDEX IF EXISTS {{ix_expires}};
