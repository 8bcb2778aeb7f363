-- The same schema as migrations/mysql/0001_init.sql, in SQLite's dialect.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    nickname      TEXT    NOT NULL,
    avatar        TEXT    NOT NULL DEFAULT '',
    created_ms    INTEGER NOT NULL
);

CREATE TABLE refresh_tokens (
    token_hash TEXT    NOT NULL PRIMARY KEY,
    user_id    INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX ix_refresh_user ON refresh_tokens (user_id);

CREATE TABLE chat_groups (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    owner_id    INTEGER NOT NULL,
    max_members INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL
);

CREATE TABLE group_members (
    group_id  INTEGER NOT NULL,
    user_id   INTEGER NOT NULL,
    joined_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX ix_members_user ON group_members (user_id);

CREATE TABLE conversations (
    conv    TEXT    NOT NULL PRIMARY KEY,
    max_seq INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE conversation_members (
    user_id  INTEGER NOT NULL,
    conv     TEXT    NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    muted    BOOLEAN NOT NULL DEFAULT FALSE,
    pinned   BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, conv)
);

CREATE TABLE messages (
    id           INTEGER NOT NULL PRIMARY KEY,
    conv         TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    sender_id    INTEGER NOT NULL,
    cid          BLOB    NOT NULL,
    to_user_id   INTEGER NULL,
    to_group_id  INTEGER NULL,
    content      TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    ts_ms        INTEGER NOT NULL,
    UNIQUE (conv, seq),
    UNIQUE (sender_id, cid)
);
