-- Web Push (docs/PROTOCOL.md, "Offline push"): the browsers a user asked to be woken in. An
-- endpoint is one browser's address at its push service, so it belongs to one user at a time
-- (the last to subscribe with it); endpoints are ASCII URLs, which keeps the unique key within
-- InnoDB's 3072 bytes.
CREATE TABLE IF NOT EXISTS push_subscriptions (
    id         BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id    BIGINT NOT NULL,
    endpoint   VARCHAR(1024) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    p256dh     VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    auth       VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE KEY ux_push_endpoint (endpoint),
    KEY ix_push_user (user_id, created_ms)
) ENGINE=InnoDB;
