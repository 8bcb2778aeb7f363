-- The same as migrations/mysql/0005_member_since.sql, in SQLite's dialect.
-- Where a member's view of a group starts (with `history_all` off, they see the messages after
-- it: history, sync, the conversation list; their read position starts there too):
-- `joined_seq`, the conversation's last stored seq when they joined, and `visible_from_ms`,
-- their join time less a second, because in the distributed mode the stored seq trails the
-- pipeline while persist catches up: messages stamped before it stay hidden even if they were
-- stored after the join. 0 and 0 (members from before this migration): everything.
ALTER TABLE group_members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN visible_from_ms INTEGER NOT NULL DEFAULT 0;
