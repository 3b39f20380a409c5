//! The registry's tables on PostgreSQL, versioned: migrations are applied on open, in one
//! transaction under an advisory lock (several instances opening a new database at once apply
//! each migration once), and a schema newer than this Portcullis is refused.

/// The schema version this Portcullis writes.
pub const SCHEMA_VERSION: i32 = 2;

/// The advisory lock key migrations hold (`'portcullis'` as an integer).
pub(crate) const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// Version 1: the tables of the SQLite registry (schema 5). TOTP secrets are stored sealed
/// under `registry.key` (the database never sees a plain secret); live bindings are unique by
/// partial indexes; times are Unix milliseconds.
pub(crate) const V1: &str = "
CREATE TABLE users (
    name            TEXT     NOT NULL PRIMARY KEY,
    totp_secret     BYTEA,
    digits          SMALLINT CHECK (digits BETWEEN 6 AND 8),
    algorithm       TEXT     CHECK (algorithm IN ('SHA1', 'SHA256', 'SHA512')),
    period          INTEGER  CHECK (period >= 1),
    last_step       BIGINT,
    failures        INTEGER  NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until_ms BIGINT   NOT NULL DEFAULT 0 CHECK (locked_until_ms >= 0),
    created_ms      BIGINT   NOT NULL CHECK (created_ms >= 0),
    service         BOOLEAN  NOT NULL DEFAULT FALSE,
    CHECK ((totp_secret IS NULL) = (digits IS NULL)
       AND (totp_secret IS NULL) = (algorithm IS NULL)
       AND (totp_secret IS NULL) = (period IS NULL))
);

CREATE TABLE devices (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT   NOT NULL,
    user_name   TEXT   NOT NULL REFERENCES users (name),
    fingerprint BYTEA  NOT NULL CHECK (length(fingerprint) = 32),
    created_ms  BIGINT NOT NULL CHECK (created_ms >= 0),
    revoked_ms  BIGINT CHECK (revoked_ms >= 0)
);
CREATE UNIQUE INDEX devices_active_name ON devices (name) WHERE revoked_ms IS NULL;
CREATE UNIQUE INDEX devices_active_fingerprint ON devices (fingerprint) WHERE revoked_ms IS NULL;
CREATE INDEX devices_by_name ON devices (name, created_ms);
CREATE INDEX devices_by_fingerprint ON devices (fingerprint, created_ms);
CREATE INDEX devices_by_user ON devices (user_name);

CREATE TABLE sessions (
    id           BYTEA  NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    user_name    TEXT   NOT NULL,
    fingerprint  BYTEA  NOT NULL CHECK (length(fingerprint) = 32),
    totp_time_ms BIGINT NOT NULL CHECK (totp_time_ms >= 0),
    expires_ms   BIGINT NOT NULL CHECK (expires_ms >= 0),
    revoked_ms   BIGINT CHECK (revoked_ms >= 0)
);
CREATE INDEX sessions_by_expiry ON sessions (expires_ms);
CREATE INDEX sessions_by_fingerprint ON sessions (fingerprint, totp_time_ms);

CREATE TABLE user_roles (
    user_name TEXT NOT NULL REFERENCES users (name),
    role      TEXT NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
    PRIMARY KEY (user_name, role)
);

-- What every instance's revocation round tails: one row per revocation, written in the
-- transaction of the revocation itself.
CREATE TABLE changes (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT   NOT NULL CHECK (kind IN ('device', 'user', 'session', 'roles')),
    fingerprint BYTEA  CHECK (length(fingerprint) = 32),
    user_name   TEXT,
    session_id  BYTEA  CHECK (length(session_id) = 16),
    at_ms       BIGINT NOT NULL CHECK (at_ms >= 0)
);
";

/// Version 2: changes are numbered in commit order without gaps (the highest number plus one,
/// under [`CHANGES_LOCK`]), so that a round tailing the log after number `n` misses nothing by
/// reading the numbers above `n`, and a gap means the log was pruned past it.
pub(crate) const V2: &str = "
ALTER TABLE changes ALTER COLUMN seq DROP IDENTITY;
CREATE INDEX changes_by_time ON changes (at_ms);
";

/// The migrations, in order: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2];

/// The advisory lock every change record is written under, until its transaction ends
/// (`'pcschang'` as an integer): changes are numbered, and become visible, one at a time.
pub(crate) const CHANGES_LOCK: i64 = 0x7063_7363_6861_6e67;

/// How long a change record is kept, in ms: a server whose revocation round is further behind
/// reads everything again. The newest record is always kept (the next number follows it).
pub(crate) const CHANGES_RETENTION_MS: u64 = 3_600_000;
