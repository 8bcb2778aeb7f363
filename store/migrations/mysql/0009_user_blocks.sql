-- Blocks (docs/PROTOCOL.md, "Blocking"): `user_id` blocks `blocked_id`. Either direction
-- stops two-person messages, receipts and typing between the two.
CREATE TABLE IF NOT EXISTS user_blocks (
    user_id    BIGINT NOT NULL,
    blocked_id BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, blocked_id),
    KEY ix_blocks_blocked (blocked_id)
) ENGINE=InnoDB;
