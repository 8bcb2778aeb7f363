-- The same as migrations/mysql/0010_presence_hidden.sql, in SQLite's dialect.
-- Presence (docs/PROTOCOL.md, "Presence"): a user who hides their presence looks offline to
-- everyone else, and nobody is told when they come and go.
ALTER TABLE users ADD COLUMN presence_hidden INTEGER NOT NULL DEFAULT 0;
