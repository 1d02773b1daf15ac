-- Console sessions signed out before they expire. Sessions are stateless
-- (a signed cookie, valid on every replica), so a sign-out is remembered
-- here until the session would have expired anyway, then purged. Same
-- shape as migrations/sqlite.
CREATE TABLE console_sign_outs (
    session_id TEXT   NOT NULL PRIMARY KEY,
    -- Unix seconds: when the session would have expired.
    expires_at BIGINT NOT NULL
);
