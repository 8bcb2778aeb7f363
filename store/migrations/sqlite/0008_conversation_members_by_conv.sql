-- The same as migrations/mysql/0008_conversation_members_by_conv.sql, in SQLite's dialect.
-- The conversation list reads the other party's read position of each two-person
-- conversation (`peer_read_seq`, for receipts): found by conversation, not by user.
CREATE INDEX IF NOT EXISTS ix_conv_members_conv ON conversation_members (conv);
