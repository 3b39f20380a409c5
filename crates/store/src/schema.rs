//! The registry's tables, and how a connection is opened, checked and set up.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use zeroize::Zeroizing;

use crate::secret::{self, KeyCheck, Sealer};
use crate::{APPLICATION_ID, SCHEMA_VERSION, StoreError};

/// How long a statement waits for another connection's write lock before giving up.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection (the registry uses fewer than this).
const STATEMENT_CACHE: usize = 64;

/// The oldest schema version this build opens: a version 1 registry is migrated to
/// [`SCHEMA_VERSION`] when it is opened with a key.
const OLDEST_MIGRATABLE: i64 = 1;

/// The first schema version whose TOTP secrets are sealed (or marked unsealed by a format
/// byte): older registries need the key to be migrated.
const SEALED_SINCE: i64 = 2;

/// The `users` and `devices` tables of schema version 3 (unchanged since version 1); with
/// [`SESSIONS_V3`], the schema a new registry is written with.
///
/// Version 2 had the tables of version 1; what changed is the content of `users.totp_secret`,
/// which holds a format byte followed by the sealed (or, in a registry without a key, the raw)
/// secret, where version 1 held the raw secret alone (see `secret.rs`). Version 3 replaced
/// version 2's `revoked_sessions` (revoked session ids until their tickets expire) by
/// `sessions`, a record of every session the gate issued ([`SESSIONS_V3`]).
///
/// - `users`: one row per user, with the TOTP parameters (all four NULL when the user has no
///   second factor), the last accepted TOTP step and the lockout state.
/// - `devices`: every binding ever made; at most one active (`revoked_ms IS NULL`) binding per
///   name and per fingerprint, enforced by partial unique indexes.
/// - `sessions`: the sessions the gate issued, revoked or not, until they expire.
const SCHEMA_V3: &str = "
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
";

/// The `sessions` table of version 3: one row per session the gate issued (the ticket carries
/// the same id, sealed). Rows are deleted some time after they expire.
const SESSIONS_V3: &str = "
CREATE TABLE sessions (
    id           BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    user         TEXT    NOT NULL,
    fingerprint  BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    totp_time_ms INTEGER NOT NULL CHECK (totp_time_ms >= 0),
    expires_ms   INTEGER NOT NULL CHECK (expires_ms >= 0),
    revoked_ms   INTEGER CHECK (revoked_ms >= 0)
) STRICT, WITHOUT ROWID;
CREATE INDEX sessions_by_expiry ON sessions (expires_ms);
CREATE INDEX sessions_by_fingerprint ON sessions (fingerprint, totp_time_ms);
CREATE INDEX sessions_by_user ON sessions (user);
";

/// From version 2 to 3: the revoked session ids give way to session records. Tickets issued
/// before have no record and are refused: their holders send a one-time code once more.
const V2_TO_V3: &str = "DROP TABLE IF EXISTS revoked_sessions;";

/// The first schema version with session records (`sessions`).
const SESSIONS_SINCE: i64 = 3;

/// From version 3 to 4, and for a new registry after [`SCHEMA_V3`] and [`SESSIONS_V3`]: users
/// gain a service flag (a service account has no TOTP; its devices are exempt from the second
/// factor) and roles, one `user_roles` row per user and role.
const V3_TO_V4: &str = "
ALTER TABLE users ADD COLUMN service INTEGER NOT NULL DEFAULT 0 CHECK (service IN (0, 1));
CREATE TABLE user_roles (
    user TEXT NOT NULL REFERENCES users (name),
    role TEXT NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
    PRIMARY KEY (user, role)
) STRICT, WITHOUT ROWID;
";

/// The first schema version with service accounts and roles.
const ROLES_SINCE: i64 = 4;

/// From version 4 to 5, and for a new registry after the others: the session records lose
/// their index by user. Every index costs a page written per new session (a TOTP accept); the
/// one scan by user (`revoke_user`, an administrative change) reads the table instead. The
/// index by device serves the accept path, the index by expiry the purge.
const V4_TO_V5: &str = "
DROP INDEX IF EXISTS sessions_by_user;
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

/// Opens the existing file at `path` as a registry: checks what it is, sets the connection up,
/// writes the schema into a blank database and migrates an older one.
pub(crate) fn connect(path: &Path, sealer: &Sealer) -> Result<Connection, StoreError> {
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
        // Refused before anything is written to the file.
        if identity.user_version < SEALED_SINCE && !sealer.is_sealed() {
            return Err(StoreError::NeedsKey {
                path: path.to_owned(),
                version: identity.user_version,
            });
        }
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
    } else if identity.user_version < SCHEMA_VERSION {
        migrate(conn, path, sealer)
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
    if identity.user_version < OLDEST_MIGRATABLE {
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
        tx.execute_batch(SCHEMA_V3).map_err(sqlite)?;
        tx.execute_batch(SESSIONS_V3).map_err(sqlite)?;
        tx.execute_batch(V3_TO_V4).map_err(sqlite)?;
        tx.execute_batch(V4_TO_V5).map_err(sqlite)?;
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

/// Migrates an older registry to [`SCHEMA_VERSION`] in one transaction. From version 1, every
/// TOTP secret is sealed under the registry's key, in place; from version 2 (or 1),
/// `revoked_sessions` gives way to `sessions`; from version 3 (or older), users gain a service
/// flag and roles ([`V3_TO_V4`]); from version 4 (or older), sessions lose their index by user
/// ([`V4_TO_V5`]). Another process may be migrating the same file
/// at the same moment: the write lock decides, and the loser finds the work done.
///
/// The raw secrets must not outlive the migration in the file: `secure_delete` makes SQLite
/// overwrite the old cell contents, and a checkpoint moves the rewritten pages into the main file
/// and empties the write-ahead log that held them.
fn migrate(mut conn: Connection, path: &Path, sealer: &Sealer) -> Result<Connection, StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);
    let secure_delete: i64 = conn
        .pragma_query_value(None, "secure_delete", |r| r.get(0))
        .map_err(sqlite)?;
    conn.pragma_update(None, "secure_delete", true)
        .map_err(sqlite)?;
    let migrated = migrate_in_transaction(&mut conn, path, sealer);
    let restored = conn.pragma_update(None, "secure_delete", secure_delete != 0);
    migrated?;
    restored.map_err(sqlite)?;
    // Best effort: a reader in another process may hold the log; the rewritten pages then reach
    // the main file at the next checkpoint.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    Ok(conn)
}

fn migrate_in_transaction(
    conn: &mut Connection,
    path: &Path,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    let identity = Identity::read(&tx).map_err(sqlite)?;
    check_identity(path, &identity)?;
    if identity.user_version == SCHEMA_VERSION {
        return tx.rollback().map_err(sqlite);
    }
    if identity.user_version < SEALED_SINCE {
        seal_secrets(&tx, path, sealer)?;
    }
    if identity.user_version < SESSIONS_SINCE {
        tx.execute_batch(V2_TO_V3).map_err(sqlite)?;
        tx.execute_batch(SESSIONS_V3).map_err(sqlite)?;
    }
    if identity.user_version < ROLES_SINCE {
        tx.execute_batch(V3_TO_V4).map_err(sqlite)?;
    }
    tx.execute_batch(V4_TO_V5).map_err(sqlite)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sqlite)?;
    tx.commit().map_err(sqlite)
}

/// From version 1 to 2: seals every TOTP secret in place.
fn seal_secrets(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);
    let secrets = tx
        .prepare("SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Zeroizing::new(r.get::<_, Vec<u8>>(1)?),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sqlite)?;
    {
        let mut update = tx
            .prepare("UPDATE users SET totp_secret = ?2 WHERE name = ?1")
            .map_err(sqlite)?;
        for (name, secret) in &secrets {
            let sealed = sealer.seal(name, secret).map_err(|e| {
                StoreError::io(
                    path,
                    std::io::Error::other(format!("cannot seal the TOTP secret of {name}: {e}")),
                )
            })?;
            update
                .execute(rusqlite::params![name, sealed.as_slice()])
                .map_err(sqlite)?;
        }
    }
    Ok(())
}

/// Refuses a key under which the registry's TOTP secrets do not open, so that a wrong key shows
/// when the registry is opened rather than at the first login.
///
/// Tries the stored secrets in turn until one opens, which proves the key (its plaintext is
/// wiped at once): with the right key that is the first one, unless rows are damaged. If none
/// opens and at least one failed its authentication tag, the open is refused with
/// [`StoreError::WrongKey`]. A secret stored unsealed or in an unknown format decides nothing:
/// the read of that user reports it. A registry without secrets opens under any key. Opened
/// without a key, a registry that holds a sealed secret is refused
/// ([`StoreError::SealedWithoutKey`]).
pub(crate) fn check_key(conn: &Connection, path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let sqlite = |e: rusqlite::Error| StoreError::from_sqlite(path, &e);
    if !sealer.is_sealed() {
        // Without a key, a sealed secret could never be read: refused now, not at an accept.
        let sealed: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM users WHERE substr(totp_secret, 1, 1) = ?1)",
                [&[secret::FORMAT_AES_256_GCM][..]],
                |r| r.get(0),
            )
            .map_err(sqlite)?;
        return if sealed {
            Err(StoreError::SealedWithoutKey {
                path: path.to_owned(),
            })
        } else {
            Ok(())
        };
    }
    let mut stmt = conn
        .prepare("SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL")
        .map_err(sqlite)?;
    let stored = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Zeroizing::new(r.get::<_, Vec<u8>>(1)?),
            ))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(sqlite)?;
    match sealer.check_key(stored) {
        KeyCheck::Opens => Ok(()),
        KeyCheck::WrongKey => Err(StoreError::WrongKey {
            path: path.to_owned(),
        }),
    }
}
