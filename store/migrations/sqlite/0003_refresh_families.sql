-- The same as migrations/mysql/0003_refresh_families.sql, in SQLite's dialect.
-- Refresh-token families (docs/PROTOCOL.md, "Tokens"): every refresh token of one login
-- shares its family, and records the access token issued with it. A rotated token is kept,
-- marked used, until it expires: presenting it again is reuse, and ends the whole family.
ALTER TABLE refresh_tokens ADD COLUMN family TEXT NOT NULL DEFAULT '';
ALTER TABLE refresh_tokens ADD COLUMN access_jti TEXT NOT NULL DEFAULT '';
ALTER TABLE refresh_tokens ADD COLUMN access_exp INTEGER NOT NULL DEFAULT 0;
ALTER TABLE refresh_tokens ADD COLUMN used_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_refresh_family ON refresh_tokens (family);
CREATE INDEX ix_refresh_access ON refresh_tokens (access_jti);
