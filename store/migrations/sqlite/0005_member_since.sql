-- The same as migrations/mysql/0005_member_since.sql, in SQLite's dialect.
-- The group conversation's last stored seq when a member joined: with `history_all` off, the
-- member sees the messages after it (history, sync, the conversation list), and their read
-- position starts there.
ALTER TABLE group_members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0;
