-- Invite links to a group (docs/PROTOCOL.md, "Invites"): the token is shown once, to the owner
-- who makes it, and stored as its SHA-256 hash, like refresh tokens. An invite works until
-- `expires_ms` and at most `uses_max` times (0: no limit); revoking deletes the row.
CREATE TABLE IF NOT EXISTS group_invites (
    id         BIGINT   NOT NULL AUTO_INCREMENT PRIMARY KEY,
    group_id   BIGINT   NOT NULL,
    token_hash CHAR(64) NOT NULL,
    created_by BIGINT   NOT NULL,
    created_ms BIGINT   NOT NULL,
    expires_ms BIGINT   NOT NULL,
    uses_max   INT      NOT NULL,
    uses       INT      NOT NULL DEFAULT 0,
    UNIQUE KEY uk_invites_token (token_hash),
    KEY ix_invites_group (group_id)
) ENGINE=InnoDB;
