-- The same as migrations/mysql/0011_conversation_members_wrote.sql, in SQLite's dialect.
-- Presence (docs/PROTOCOL.md, "Presence"): a user's contacts are the people they have
-- exchanged messages with, both ways. `wrote` marks a member of a two-person conversation
-- who has sent in it; opening a conversation with someone does not make them a contact.
ALTER TABLE conversation_members ADD COLUMN wrote INTEGER NOT NULL DEFAULT 0;
