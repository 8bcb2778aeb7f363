-- Who a group's owner removed: they cannot come back by an invite link or (public groups) by
-- the group's id, only by the owner adding them again, which deletes the row. Leaving of one's
-- own accord leaves no row.
CREATE TABLE IF NOT EXISTS group_removals (
    group_id   BIGINT NOT NULL,
    user_id    BIGINT NOT NULL,
    removed_ms BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id)
) ENGINE=InnoDB;
