-- The same as migrations/mysql/0013_push_subscriptions.sql, in SQLite's dialect.
-- Web Push (docs/PROTOCOL.md, "Offline push"): the browsers a user asked to be woken in. An
-- endpoint is one browser's address at its push service, so it belongs to one user at a time
-- (the last to subscribe with it).
CREATE TABLE IF NOT EXISTS push_subscriptions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    INTEGER NOT NULL,
    endpoint   TEXT NOT NULL UNIQUE,
    p256dh     TEXT NOT NULL,
    auth       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_push_user ON push_subscriptions (user_id, created_ms);
