-- Data steps ferry runs once at start, after the migrations, in Rust: what
-- SQL alone cannot do (an email's IDNA form). Same shape as migrations/postgres.
CREATE TABLE data_steps (
    name    TEXT NOT NULL PRIMARY KEY,
    done_at TEXT NOT NULL
);
