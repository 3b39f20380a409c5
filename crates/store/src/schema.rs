//! The registry's tables, and how a connection is opened, checked and set up.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::{APPLICATION_ID, SCHEMA_VERSION, StoreError};

/// How long a statement waits for another connection's write lock before giving up.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection (the registry uses fewer than this).
const STATEMENT_CACHE: usize = 32;

/// Schema version 1.
///
/// - `users`: one row per user, with the TOTP parameters (all four NULL when the user has no
///   second factor), the last accepted TOTP step and the lockout state.
/// - `devices`: every binding ever made; at most one active (`revoked_ms IS NULL`) binding per
///   name and per fingerprint, enforced by partial unique indexes.
/// - `revoked_sessions`: revoked session ids until their tickets expire.
const SCHEMA_V1: &str = "
CREATE TABLE users (
    name            TEXT    NOT NULL PRIMARY KEY,
    totp_secret     BLOB,
    digits          INTEGER CHECK (digits BETWEEN 6 AND 8),
    algorithm       TEXT    CHECK (algorithm IN ('SHA1', 'SHA256', 'SHA512')),
    period          INTEGER CHECK (period >= 1),
    last_step       INTEGER,
    failures        INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until_ms INTEGER NOT NULL DEFAULT 0 CHECK (locked_until_ms >= 0),
    created_ms      INTEGER NOT NULL CHECK (created_ms >= 0),
    CHECK ((totp_secret IS NULL) = (digits IS NULL)
       AND (totp_secret IS NULL) = (algorithm IS NULL)
       AND (totp_secret IS NULL) = (period IS NULL))
) STRICT;

CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    user        TEXT    NOT NULL REFERENCES users (name),
    fingerprint BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    created_ms  INTEGER NOT NULL CHECK (created_ms >= 0),
    revoked_ms  INTEGER CHECK (revoked_ms >= 0)
) STRICT;
CREATE UNIQUE INDEX devices_active_name ON devices (name) WHERE revoked_ms IS NULL;
CREATE UNIQUE INDEX devices_active_fingerprint ON devices (fingerprint) WHERE revoked_ms IS NULL;
CREATE INDEX devices_by_name ON devices (name, created_ms);
CREATE INDEX devices_by_fingerprint ON devices (fingerprint, created_ms);
CREATE INDEX devices_by_user ON devices (user);

CREATE TABLE revoked_sessions (
    id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    expires_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX revoked_sessions_by_expiry ON revoked_sessions (expires_ms);
";

/// What the header and catalogue of a database say about it.
struct Identity {
    application_id: u32,
    user_version: i64,
    objects: i64,
}

impl Identity {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        // `application_id` is a signed 32-bit value in SQLite; its bits are what count.
        let application_id: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
        let user_version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // Reading the catalogue parses the schema, which finds most damaged files.
        let objects: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        Ok(Self {
            application_id: application_id as u32,
            user_version,
            objects,
        })
    }

    /// A database with nothing in it: a file just made, or an empty file.
    fn is_blank(&self) -> bool {
        self.application_id == 0 && self.user_version == 0 && self.objects == 0
    }
}

/// Opens the existing file at `path` as a registry: checks what it is, sets the connection up
/// and writes the schema into a blank database.
pub(crate) fn connect(path: &Path) -> Result<Connection, StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);

    // No SQLITE_OPEN_CREATE: the file is made (with its permissions) before SQLite sees it.
    // No SQLITE_OPEN_URI: a path is a path.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

    let identity = Identity::read(&conn).map_err(sqlite)?;
    if !identity.is_blank() {
        check_identity(path, &identity)?;
    }
    if conn.is_readonly("main").map_err(sqlite)? {
        return Err(StoreError::ReadOnly {
            path: path.to_owned(),
        });
    }

    // WAL lets readers go on while another connection writes. The mode is stored in the file;
    // it cannot change inside a transaction, hence before the schema is written. Where WAL is
    // not available SQLite keeps the rollback journal, which is slower but just as correct.
    let _mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sqlite)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(sqlite)?;
    // In WAL mode, NORMAL syncs at checkpoints instead of on every commit: a commit survives a
    // crash of the process, and the file stays consistent after a power loss, which may only
    // lose the last moments of commits. The gate writes on every code it checks (lockout
    // charge, single-use step), so a sync per commit would dominate its cost.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sqlite)?;

    if identity.is_blank() {
        initialize(conn, path)
    } else {
        Ok(conn)
    }
}

/// Refuses a database that is not a registry this build can read.
fn check_identity(path: &Path, identity: &Identity) -> Result<(), StoreError> {
    if identity.application_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            application_id: identity.application_id,
        });
    }
    if identity.user_version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            version: identity.user_version,
        });
    }
    if identity.user_version < SCHEMA_VERSION {
        return Err(StoreError::Unsupported {
            path: path.to_owned(),
            version: identity.user_version,
        });
    }
    Ok(())
}

/// Writes the schema into a blank database, in one transaction. Another process may be doing the
/// same at the same moment: the write lock decides, and the loser checks what the winner wrote.
fn initialize(mut conn: Connection, path: &Path) -> Result<Connection, StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    let identity = Identity::read(&tx).map_err(sqlite)?;
    if identity.is_blank() {
        tx.execute_batch(SCHEMA_V1).map_err(sqlite)?;
        // The header stores the id as a signed 32-bit integer.
        tx.pragma_update(None, "application_id", APPLICATION_ID as i32)
            .map_err(sqlite)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
    } else {
        check_identity(path, &identity)?;
        tx.rollback().map_err(sqlite)?;
    }
    Ok(conn)
}
