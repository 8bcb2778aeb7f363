-- The same as migrations/mysql/0007_group_removals.sql, in SQLite's dialect.
-- Who a group's owner removed: they cannot come back by an invite link or (public groups) by
-- the group's id, only by the owner adding them again, which deletes the row. Leaving of one's
-- own accord leaves no row.
CREATE TABLE IF NOT EXISTS group_removals (
    group_id   INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
