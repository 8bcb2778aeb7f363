-- Presence (docs/PROTOCOL.md, "Presence"): a user who hides their presence looks offline to
-- everyone else, and nobody is told when they come and go.
ALTER TABLE users ADD COLUMN presence_hidden TINYINT NOT NULL DEFAULT 0;
