-- The group conversation's last stored seq when a member joined: with `history_all` off, the
-- member sees the messages after it (history, sync, the conversation list), and their read
-- position starts there.
ALTER TABLE group_members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
