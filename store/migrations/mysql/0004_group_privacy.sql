-- Private groups (docs/PROTOCOL.md, "Groups"): a group is private unless its owner makes it
-- public, and what a new member sees of the history is a setting, from their join by default.
-- Groups made before this migration become private too: anyone could join them until now, and
-- their owners decide whether that goes on. Their members keep what they see (joined_seq 0).
-- One statement: MySQL commits each DDL statement on its own.
ALTER TABLE chat_groups
    ADD COLUMN is_public BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN history_all BOOLEAN NOT NULL DEFAULT FALSE;
