-- The same as migrations/mysql/0006_group_invites.sql, in SQLite's dialect.
-- Invite links to a group (docs/PROTOCOL.md, "Invites"): the token is shown once, to the owner
-- who makes it, and stored as its SHA-256 hash, like refresh tokens. An invite works until
-- `expires_ms` and at most `uses_max` times (0: no limit); revoking deletes the row.
CREATE TABLE IF NOT EXISTS group_invites (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id   INTEGER NOT NULL,
    token_hash TEXT    NOT NULL UNIQUE,
    created_by INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    uses_max   INTEGER NOT NULL,
    uses       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ix_invites_group ON group_invites (group_id);
