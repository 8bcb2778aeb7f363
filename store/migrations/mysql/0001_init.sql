-- Accounts, groups, conversations and messages (seed 001 §5 and 004's models, plus what
-- PROTOCOL.md needs). Ids are BIGINT; message ids are Snowflakes assigned by the pipeline.
CREATE TABLE users (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username      VARCHAR(32)  NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    nickname      VARCHAR(64)  NOT NULL,
    avatar        VARCHAR(512) NOT NULL DEFAULT '',
    created_ms    BIGINT       NOT NULL,
    UNIQUE KEY uk_users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Refresh tokens are stored as SHA-256 hashes and rotated on use.
CREATE TABLE refresh_tokens (
    token_hash CHAR(64) NOT NULL PRIMARY KEY,
    user_id    BIGINT   NOT NULL,
    expires_ms BIGINT   NOT NULL,
    KEY ix_refresh_user (user_id)
) ENGINE=InnoDB;

-- `groups` is a reserved word in MySQL 8.
CREATE TABLE chat_groups (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name        VARCHAR(64)  NOT NULL,
    description VARCHAR(512) NOT NULL DEFAULT '',
    owner_id    BIGINT       NOT NULL,
    max_members INT          NOT NULL,
    created_ms  BIGINT       NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE group_members (
    group_id  BIGINT NOT NULL,
    user_id   BIGINT NOT NULL,
    joined_ms BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id),
    KEY ix_members_user (user_id)
) ENGINE=InnoDB;

-- One row per conversation: the last seq handed out. Unread = max_seq - read_seq.
CREATE TABLE conversations (
    conv    VARCHAR(48) NOT NULL PRIMARY KEY,
    max_seq BIGINT      NOT NULL DEFAULT 0
) ENGINE=InnoDB;

-- A user's view of a conversation: read position and flags.
CREATE TABLE conversation_members (
    user_id  BIGINT      NOT NULL,
    conv     VARCHAR(48) NOT NULL,
    read_seq BIGINT      NOT NULL DEFAULT 0,
    muted    BOOLEAN     NOT NULL DEFAULT FALSE,
    pinned   BOOLEAN     NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, conv)
) ENGINE=InnoDB;

CREATE TABLE messages (
    id           BIGINT      NOT NULL PRIMARY KEY,
    conv         VARCHAR(48) NOT NULL,
    seq          BIGINT      NOT NULL,
    sender_id    BIGINT      NOT NULL,
    cid          VARBINARY(64) NOT NULL, -- client message ids are case-exact
    to_user_id   BIGINT      NULL,
    to_group_id  BIGINT      NULL,
    content      MEDIUMTEXT  NOT NULL,
    content_type VARCHAR(32) NOT NULL,
    ts_ms        BIGINT      NOT NULL,
    UNIQUE KEY uk_messages_conv_seq (conv, seq),
    UNIQUE KEY uk_messages_sender_cid (sender_id, cid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
