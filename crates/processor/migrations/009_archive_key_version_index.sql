-- One definition of an archive table: the default archive table (migration 003) is the model
-- every archive table is created from (CREATE TABLE .. (LIKE <default archive> INCLUDING ALL)).
-- Its index becomes the one the archive's reads use: the newest version of a key.
DROP INDEX IF EXISTS {{schema}}.{{ix_archive_key}};
CREATE INDEX {{ix_archive_key}} ON {{archive}} (key, version);
