-- The same as migrations/mysql/0012_conversation_members_wrote_backfill.sql, in SQLite's dialect.
-- `wrote` for the conversations that existed before migration 11.
UPDATE conversation_members SET wrote = 1 WHERE conv LIKE 'p:%' AND EXISTS (SELECT 1 FROM messages m WHERE m.conv = conversation_members.conv AND m.sender_id = conversation_members.user_id);
