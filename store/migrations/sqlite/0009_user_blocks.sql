-- The same as migrations/mysql/0009_user_blocks.sql, in SQLite's dialect.
-- Blocks (docs/PROTOCOL.md, "Blocking"): `user_id` blocks `blocked_id`. Either direction
-- stops two-person messages, receipts and typing between the two.
CREATE TABLE IF NOT EXISTS user_blocks (
    user_id    INTEGER NOT NULL,
    blocked_id INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
);
CREATE INDEX IF NOT EXISTS ix_blocks_blocked ON user_blocks (blocked_id);
