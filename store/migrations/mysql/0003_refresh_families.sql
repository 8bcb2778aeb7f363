-- Refresh-token families (docs/PROTOCOL.md, "Tokens"): every refresh token of one login
-- shares its family, and records the access token issued with it. A rotated token is kept,
-- marked used, until it expires: presenting it again is reuse, and ends the whole family.
-- One statement: MySQL commits each DDL statement on its own, so a migration cut short
-- between two would leave the table half changed.
ALTER TABLE refresh_tokens
    ADD COLUMN family CHAR(32) NOT NULL DEFAULT '',
    ADD COLUMN access_jti VARCHAR(64) NOT NULL DEFAULT '',
    ADD COLUMN access_exp BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_ms BIGINT NOT NULL DEFAULT 0,
    ADD INDEX ix_refresh_family (family),
    ADD INDEX ix_refresh_access (access_jti);
