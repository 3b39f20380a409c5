//! # portcullis-store
//!
//! The embedded registry of Portcullis: [`SqliteRegistry`] implements the store traits of
//! [`portcullis_core::store`] ([`GateStore`], [`SessionStore`], [`Admin`]) on a single SQLite
//! file, with the same behaviour as [`portcullis_core::MemoryRegistry`]: both pass the
//! conformance suite of `portcullis-core`'s `test-util` feature.
//!
//! ```
//! use portcullis_core::*;
//! use portcullis_store::{SecretKey, SqliteRegistry};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let key = SecretKey::create(&dir.path().join("registry.key")).unwrap();
//! let registry = SqliteRegistry::create_with_key(&dir.path().join("portcullis.db"), key).unwrap();
//! let totp = TotpConfig::new(vec![7; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
//! registry.add_user("alice", totp, 0).unwrap();
//! let fp = DeviceFingerprint::from_bytes([1; 32]);
//! registry.bind_device("laptop", "alice", &fp, 0).unwrap();
//!
//! // What the gate does per connection: one read, then one conditional write.
//! let need = Need { fingerprint: fp, secret: true, session: SessionNeed::None, now_ms: 300_000 };
//! let snapshot = registry.snapshot_now(&need).unwrap();
//! assert_eq!(snapshot.user.unwrap().name, "alice");
//! let accept = Effects::AcceptStep {
//!     user: "alice".into(),
//!     step: 10,
//!     now_ms: 300_000,
//!     lockout: LockoutPolicy::default(),
//!     session: None,
//! };
//! assert_eq!(registry.commit_now(&accept).unwrap(), Committed::Applied);
//! // The same step again has lost its condition: a failure is charged instead.
//! assert!(matches!(registry.commit_now(&accept).unwrap(), Committed::StepTaken(_)));
//! ```
//!
//! ## Sharing the file
//!
//! Several processes may use one registry file at once: a running server, and the command line
//! binding or revoking devices. Nothing is cached in memory, so a device revoked by another
//! process is refused by the next connection. The database runs in WAL mode (readers do not wait
//! for a writer), a connection waits up to 5 seconds for another one's write lock, and every
//! change is one statement or one `BEGIN IMMEDIATE` transaction, so that
//! [`GateStore::commit`] accepts a TOTP step once across all processes.
//!
//! ## The accept path
//!
//! Per connection, the gate makes one read transaction ([`SqliteRegistry::snapshot_now`]: the
//! device joined with its user, then the session) on a connection of its own, and at most one
//! write transaction ([`SqliteRegistry::commit_now`]: none for a session ticket). Statements are
//! prepared once and cached; the sealed secret is opened once, after the connection is released.
//! Once the gate commits, the write-ahead log is checkpointed by a thread of the registry's
//! own, every 200 ms, so that no accept pays for a checkpoint's copy and `fsync`s.
//!
//! ## Secrets at rest
//!
//! A registry opened with a [`SecretKey`] ([`SqliteRegistry::open_with_key`],
//! [`SqliteRegistry::create_with_key`]) seals every TOTP secret with AES-256-GCM before it is
//! written: a fresh random 96-bit nonce per secret, and the user's name as additional
//! authenticated data, so that a sealed secret moved into another user's row does not open. The
//! key lives in a file of its own (32 bytes, mode 0600; [`SecretKey::load`] refuses a key file
//! that the group or others may read or write). A wrong key is refused when the registry is
//! opened ([`StoreError::WrongKey`]): [`SqliteRegistry::open_with_key`] tries the sealed
//! secrets until one opens. A secret that does not open when it is read (a moved or damaged row) is a
//! [`RegistryError::Backend`] error naming the user, and the gate refuses the connection: it
//! fails closed. Decrypted secrets live in buffers that are wiped when dropped.
//!
//! [`SqliteRegistry::open`] and [`SqliteRegistry::create`], without a key, store the secrets
//! unsealed, protected by the file's permissions alone; they are meant for tests and examples.
//! A registry opened with a key refuses unsealed secrets, and one opened without a key cannot
//! read sealed ones.
//!
//! ## The file
//!
//! The file is created readable and writable by its owner only (mode 0600 on Unix); SQLite
//! gives its `-wal` and `-shm` companions the same mode. It carries `PRAGMA application_id` =
//! [`APPLICATION_ID`] and `PRAGMA user_version` = [`SCHEMA_VERSION`]: a database of another
//! application, a registry written by a newer Portcullis, and a file that is not a SQLite
//! database at all are refused with a one-line [`StoreError`] that names the file.
//!
//! A registry of schema version 1 (secrets unsealed) is migrated when it is opened with a key:
//! its secrets are sealed in one transaction, SQLite overwrites the old contents
//! (`secure_delete`) and the write-ahead log is emptied. Opened without a key, it is refused
//! ([`StoreError::NeedsKey`]) and left as it is. A registry of version 2 is migrated to version
//! 3 when it is opened, with or without a key: its list of revoked session ids gives way to a
//! table of session records. Tickets issued before have no record and are refused once: their
//! holders send a one-time code again. A registry of version 3 (or older) is migrated to version
//! 4 when it is opened: users gain a service flag ([`UserRecord::service`]) and roles
//! ([`Admin::user_roles`]); existing users are not service accounts and hold no role. A
//! registry of version 4 (or older) is migrated to version 5 when it is opened: session
//! records lose their index by user, so that recording one writes one page less.
//!
//! ## Sessions
//!
//! Every session the gate issues is recorded by the commit that accepts its code, with its user,
//! device fingerprint, TOTP time and expiry, and stays until some time after it expires:
//! recording a session deletes a bounded number of records that expired by then (by the
//! session's own time and by the registry's clock, whichever is earlier), at most once per
//! second of that time. Revoking a session,
//! a device or a user marks the records revoked; revoking a device or a user does so in the
//! same transaction as the device bindings.

mod checkpoint;
mod error;
mod gate;
pub mod rows;
mod schema;
mod secret;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use portcullis_core::store::ready;
use portcullis_core::{
    Admin, Clock, Committed, DeviceFingerprint, DeviceRecord, Effects, GateStore, LockState, Need,
    RegistryError, SessionId, SessionRecord, SessionStore, Snapshot, StoreFuture, SystemClock,
    TotpConfig, UserRecord, check_name, normalize_roles,
};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use zeroize::Zeroizing;

pub use error::StoreError;
pub use secret::{KeyCheck, Sealer, SecretError, SecretKey};

use rows::{DeviceRow, SessionRow, UserRow, db_ms};

/// The version of the registry's schema that this build writes and reads
/// (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 5;

/// The `PRAGMA application_id` of a registry file: `PCS1` in ASCII.
pub const APPLICATION_ID: u32 = 0x5043_5331;

/// A complete registry ([`portcullis_core::Registry`]: the gate's store, the sessions and the
/// administration) kept in a SQLite file.
///
/// Three connections: a writer (commits and administration) and a reader (the gate's
/// snapshots), each behind a mutex held only for its statements, and, from the first gate
/// commit on, one for the checkpoint thread. Open one `SqliteRegistry` per process and share it (it is `Send + Sync`). Other
/// processes may open the same file at the same time.
pub struct SqliteRegistry {
    path: PathBuf,
    /// Changes: commits and every administrative call.
    conn: Mutex<Connection>,
    /// The gate's snapshots: in WAL mode a reader never waits for the writer.
    reader: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    sealer: Sealer,
    /// When a new session last purged expired records (the sessions' time, Unix ms).
    last_purge_ms: AtomicU64,
    /// The thread that checkpoints the write-ahead log, started by the first gate commit (a
    /// command that only administers the registry needs none); `None` inside: the writer does.
    checkpointer: OnceLock<Option<checkpoint::Checkpointer>>,
}

impl fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteRegistry")
            .field("path", &self.path)
            .field("sealed", &self.sealer.is_sealed())
            .finish_non_exhaustive()
    }
}

impl SqliteRegistry {
    /// Opens an existing registry file whose TOTP secrets are sealed under `key`.
    ///
    /// A registry of schema version 1 is migrated: its secrets are sealed under `key`. An empty
    /// file is set up as a new registry; a file that does not exist is an error
    /// ([`StoreError::Missing`]).
    ///
    /// A wrong key is refused here: after any migration, the stored secrets are opened under
    /// `key` in turn until one opens; if none opens and at least one fails its authentication
    /// tag (another key, or damage), the open fails with [`StoreError::WrongKey`]. One secret
    /// that opens is enough (the others may be damaged; a secret stored unsealed or in an unknown format is
    /// not counted either way), and a registry without secrets opens under any key. A secret
    /// that does not open later (a damaged or moved row, or one sealed by another process under
    /// another key) fails its read with a [`RegistryError::Backend`] that names the user.
    pub fn open_with_key(path: &Path, key: SecretKey) -> Result<Self, StoreError> {
        Self::open_sealed_by(path, sealer(path, Some(key))?)
    }

    /// Opens the registry of a directory made by `portcullis init` (`DIR/portcullis.db`) with
    /// its key (`DIR/registry.key`); see [`DirLayout`](portcullis_core::layout::DirLayout).
    ///
    /// Unlike [`SqliteRegistry::open_with_key`], an empty registry file is refused
    /// ([`StoreError::Empty`]): a registry that lost its content does not turn into a new,
    /// empty one. A missing key file is [`StoreError::KeyMissing`], naming it; a directory
    /// where a `portcullis keys rekey` was interrupted is [`StoreError::RekeyPending`].
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        let layout = portcullis_core::layout::DirLayout::new(dir);
        let path = layout.registry();
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 => return Err(StoreError::Empty { path }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { path });
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        let pending = layout.registry_key_new();
        if pending.exists() {
            return Err(StoreError::RekeyPending { path: pending });
        }
        let key = SecretKey::load(&layout.registry_key())?;
        Self::open_with_key(&path, key)
    }

    /// Creates a new registry file, readable by its owner only, whose TOTP secrets are sealed
    /// under `key`. Refuses a file that exists ([`StoreError::AlreadyExists`]).
    pub fn create_with_key(path: &Path, key: SecretKey) -> Result<Self, StoreError> {
        Self::create_sealed_by(path, sealer(path, Some(key))?)
    }

    /// Opens an existing registry file without a key: TOTP secrets are written unsealed, and
    /// sealed ones cannot be read. For tests and examples; a server uses
    /// [`SqliteRegistry::open_with_key`].
    ///
    /// An empty file is set up as a new registry; a file that does not exist is an error
    /// ([`StoreError::Missing`]); a registry of schema version 1 is refused
    /// ([`StoreError::NeedsKey`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_sealed_by(path, Sealer::plain())
    }

    /// Creates a new registry file without a key, readable by its owner only: TOTP secrets are
    /// written unsealed. For tests and examples; a server uses
    /// [`SqliteRegistry::create_with_key`]. Refuses a file that exists
    /// ([`StoreError::AlreadyExists`]).
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        Self::create_sealed_by(path, Sealer::plain())
    }

    fn open_sealed_by(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        match fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(StoreError::io(path, e)),
        }
        let conn = schema::connect(path, &sealer)?;
        // After the migration, which seals a version 1 registry's secrets under this key.
        schema::check_key(&conn, path, &sealer)?;
        Self::with_connection(path, conn, sealer)
    }

    fn create_sealed_by(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        let file = create_private_file(path)?;
        drop(file);
        match schema::connect(path, &sealer)
            .and_then(|conn| Self::with_connection(path, conn, sealer))
        {
            Ok(registry) => Ok(registry),
            Err(e) => {
                remove_database_files(path);
                Err(e)
            }
        }
    }

    /// Opens the registry file, creating it first if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, StoreError> {
        match Self::create(path) {
            Err(StoreError::AlreadyExists { .. }) => Self::open(path),
            other => other,
        }
    }

    /// Replaces the clock that, with the time of each new session, decides when an expired
    /// session record can be forgotten (by default the system clock). Give it the gate's clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-seals every TOTP secret under `key` in one write transaction, and returns how many.
    /// `progress` is called after each row with (rows done, rows in all).
    ///
    /// The transaction commits every row or none: interrupted anywhere (an error, the process
    /// killed), the registry holds each secret sealed under the key it was opened with, and
    /// after the commit each secret sealed under `key`; never some of each. The registry is
    /// consumed: open it again with `key` (keep `key`'s file written before calling this).
    /// A registry opened without a key, or a secret that does not open under its key, is
    /// refused and nothing changes.
    pub fn rekey(
        self,
        key: SecretKey,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<usize, RegistryError> {
        if !self.sealer.is_sealed() {
            return Err(RegistryError::Backend(format!(
                "{}: opened without a registry key; open it with its key to re-seal it",
                self.path.display()
            )));
        }
        let next =
            sealer(&self.path, Some(key)).map_err(|e| RegistryError::Backend(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.backend(e))?;
        let rows = tx
            .prepare(
                "SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL ORDER BY name",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Zeroizing::new(r.get::<_, Vec<u8>>(1)?),
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        let total = rows.len();
        for (done, (name, stored)) in rows.into_iter().enumerate() {
            let secret = Zeroizing::new(self.sealer.open(&name, stored).map_err(|e| {
                self.damaged(&format!(
                    "user {name}: its TOTP secret does not open ({e}); nothing was re-sealed"
                ))
            })?);
            let sealed = next
                .seal(&name, &secret)
                .map_err(|e| self.damaged(&format!("user {name}: {e}")))?;
            tx.prepare_cached("UPDATE users SET totp_secret = ?2 WHERE name = ?1")
                .and_then(|mut stmt| stmt.execute(params![name, &sealed[..]]))
                .map_err(|e| self.backend(e))?;
            progress(done + 1, total);
        }
        tx.commit().map_err(|e| self.backend(e))?;
        Ok(total)
    }

    /// Whether TOTP secrets are sealed under a key (the registry was opened or created with one).
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_sealed()
    }

    /// The registry on `conn` (set up and migrated), with a second connection for the gate's
    /// reads.
    fn with_connection(path: &Path, conn: Connection, sealer: Sealer) -> Result<Self, StoreError> {
        let reader = schema::connect(path, &sealer)?;
        Ok(Self {
            checkpointer: OnceLock::new(),
            path: path.to_owned(),
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            clock: Arc::new(SystemClock),
            sealer,
            last_purge_ms: AtomicU64::new(0),
        })
    }

    /// The connection. A panic while it was held rolled its transaction back when the
    /// transaction was dropped, so the connection is still sound and is used on.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer connection (an alias of the administrative one), for the gate's commits.
    fn writer(&self) -> MutexGuard<'_, Connection> {
        self.conn()
    }

    /// The reader connection, for the gate's snapshots.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A SQLite failure. The message is SQLite's, which never contains bound values (secrets).
    fn backend(&self, error: rusqlite::Error) -> RegistryError {
        RegistryError::Backend(format!(
            "{}: {}",
            self.path.display(),
            error::one_line(&error.to_string())
        ))
    }

    /// A row whose content this build cannot make sense of.
    fn damaged(&self, what: &str) -> RegistryError {
        RegistryError::Backend(format!("{}: {what}", self.path.display()))
    }

    fn device_record(&self, row: DeviceRow) -> Result<DeviceRecord, RegistryError> {
        row.decode().map_err(|d| self.damaged(&d.0))
    }

    fn session_record(&self, row: SessionRow) -> Result<SessionRecord, RegistryError> {
        row.decode().map_err(|d| self.damaged(&d.0))
    }

    fn user_record(&self, row: UserRow) -> Result<UserRecord, RegistryError> {
        row.decode(&self.sealer).map_err(|d| self.damaged(&d.0))
    }
}

/// The sealer for a registry file opened with `key`, or without a key.
fn sealer(path: &Path, key: Option<SecretKey>) -> Result<Sealer, StoreError> {
    Sealer::new(key).map_err(|_| {
        StoreError::io(
            path,
            io::Error::other("AES-256-GCM refused the registry key"),
        )
    })
}

/// Creates `path`, refusing an existing file, readable and writable by the owner only.
fn create_private_file(path: &Path) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            StoreError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            StoreError::io(path, e)
        }
    })
}

/// Removes a registry file that could not be set up, with SQLite's companion files. Best effort:
/// the error that led here is the one reported.
fn remove_database_files(path: &Path) {
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        let _ = fs::remove_file(PathBuf::from(companion));
    }
    let _ = fs::remove_file(path);
}

/// Whether `error` is a UNIQUE or PRIMARY KEY constraint failure.
fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_extended_error_code(),
        Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

/// Reads the columns `name, user, fingerprint, created_ms, revoked_ms`.
fn read_device(row: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        name: row.get(0)?,
        user: row.get(1)?,
        fingerprint: row.get(2)?,
        created_ms: row.get(3)?,
        revoked_ms: row.get(4)?,
    })
}

/// The columns of a session record, in the order [`read_session`] reads them.
const SESSION_COLUMNS: &str = "id, user, fingerprint, totp_time_ms, expires_ms, revoked_ms";

/// Reads the columns of [`SESSION_COLUMNS`].
fn read_session(row: &Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: row.get(0)?,
        user: row.get(1)?,
        fingerprint: row.get(2)?,
        totp_time_ms: row.get(3)?,
        expires_ms: row.get(4)?,
        revoked_ms: row.get(5)?,
    })
}

/// Reads the columns `name, totp_secret, digits, algorithm, period, created_ms, service`.
fn read_user(row: &Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        name: row.get(0)?,
        secret: row.get::<_, Option<Vec<u8>>>(1)?.map(Zeroizing::new),
        digits: row.get(2)?,
        algorithm: row.get(3)?,
        period: row.get(4)?,
        created_ms: row.get(5)?,
        service: row.get::<_, i64>(6)? != 0,
    })
}

impl GateStore for SqliteRegistry {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        ready(self.snapshot_now(need))
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        ready(self.commit_now(effects))
    }
}

impl SessionStore for SqliteRegistry {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        let conn = self.conn();
        let row = conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row(params![&id.0[..]], read_session).optional())
            .map_err(|e| self.backend(e))?;
        row.map(|r| self.session_record(r)).transpose()
    }

    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        let conn = self.conn();
        // The active binding of the fingerprint, and of its sessions the newest live one that
        // was earned for the binding's user since it was bound.
        let row = conn
            .prepare_cached(gate::LIVE_SESSION)
            .and_then(|mut stmt| {
                stmt.query_row(params![fingerprint.as_bytes(), db_ms(now_ms)], read_session)
                    .optional()
            })
            .map_err(|e| self.backend(e))?;
        row.map(|r| self.session_record(r)).transpose()
    }

    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE expires_ms > ?1
                 ORDER BY totp_time_ms DESC, expires_ms DESC, id DESC"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![db_ms(now_ms)], read_session)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        rows.into_iter().map(|r| self.session_record(r)).collect()
    }

    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        let conn = self.conn();
        // One statement: a session revoked before keeps its first revocation time.
        let row = conn
            .prepare_cached(&format!(
                "UPDATE sessions SET revoked_ms = coalesce(revoked_ms, ?2) WHERE id = ?1
                 RETURNING {SESSION_COLUMNS}"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![&id.0[..], db_ms(now_ms)], read_session)
                    .optional()
            })
            .map_err(|e| self.backend(e))?;
        match row {
            Some(row) => self.session_record(row),
            None => Err(RegistryError::NotFound(format!("session {id}"))),
        }
    }
}

impl Admin for SqliteRegistry {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        let conn = self.conn();
        let row = conn
            .prepare_cached(
                "SELECT name, totp_secret, digits, algorithm, period, created_ms, service FROM users
                 WHERE name = ?1",
            )
            .and_then(|mut stmt| stmt.query_row(params![name], read_user).optional())
            .map_err(|e| self.backend(e))?;
        row.map(|r| self.user_record(r)).transpose()
    }

    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        Ok(self.read_lock(&self.conn(), user)?.unwrap_or_default())
    }

    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        conn.prepare_cached("SELECT role FROM user_roles WHERE user = ?1 ORDER BY role")
            .and_then(|mut stmt| {
                stmt.query_map(params![user], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .map_err(|e| self.backend(e))
    }

    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        let roles = normalize_roles(roles)?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.backend(e))?;
        self.require_user(&tx, user)?;
        tx.prepare_cached("DELETE FROM user_roles WHERE user = ?1")
            .and_then(|mut stmt| stmt.execute(params![user]))
            .map_err(|e| self.backend(e))?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO user_roles (user, role) VALUES (?1, ?2)")
                .map_err(|e| self.backend(e))?;
            for role in &roles {
                insert
                    .execute(params![user, role])
                    .map_err(|e| self.backend(e))?;
            }
        }
        tx.commit().map_err(|e| self.backend(e))
    }

    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        check_name("user", name)?;
        let period = i64::try_from(totp.period()).map_err(|_| {
            RegistryError::Invalid(format!("TOTP period: at most {} seconds", i64::MAX))
        })?;
        let sealed = self
            .sealer
            .seal(name, totp.secret())
            .map_err(|e| self.damaged(&format!("cannot seal the TOTP secret of {name}: {e}")))?;
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO users (name, totp_secret, digits, algorithm, period, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                name,
                sealed.as_slice(),
                i64::from(totp.digits()),
                totp.algorithm().name(),
                period,
                db_ms(now_ms)
            ])
        })
        .map_err(|e| {
            if is_unique_violation(&e) {
                RegistryError::AlreadyExists(format!("user {name}"))
            } else {
                self.backend(e)
            }
        })?;
        Ok(())
    }

    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        check_name("user", name)?;
        let conn = self.conn();
        conn.prepare_cached("INSERT INTO users (name, created_ms, service) VALUES (?1, ?2, 1)")
            .and_then(|mut stmt| stmt.execute(params![name, db_ms(now_ms)]))
            .map_err(|e| {
                if is_unique_violation(&e) {
                    RegistryError::AlreadyExists(format!("user {name}"))
                } else {
                    self.backend(e)
                }
            })?;
        Ok(())
    }

    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        let conn = self.conn();
        let row = conn
            .prepare_cached(
                "SELECT name, user, fingerprint, created_ms, revoked_ms FROM devices
                 WHERE fingerprint = ?1
                 ORDER BY revoked_ms IS NULL DESC, created_ms DESC, id DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![fingerprint.as_bytes()], read_device)
                    .optional()
            })
            .map_err(|e| self.backend(e))?;
        row.map(|r| self.device_record(r)).transpose()
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        let conn = self.conn();
        let row = conn
            .prepare_cached(
                "SELECT name, user, fingerprint, created_ms, revoked_ms FROM devices
                 WHERE name = ?1
                 ORDER BY revoked_ms IS NULL DESC, created_ms DESC, id DESC LIMIT 1",
            )
            .and_then(|mut stmt| stmt.query_row(params![name], read_device).optional())
            .map_err(|e| self.backend(e))?;
        row.map(|r| self.device_record(r)).transpose()
    }

    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        check_name("device", name)?;
        let created_ms = db_ms(now_ms);
        let mut conn = self.conn();
        // The checks and the insert in one write transaction, so that the error names the
        // conflict exactly; the partial unique indexes enforce the same rules underneath.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.backend(e))?;
        self.require_user(&tx, user)?;
        let name_taken = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE name = ?1 AND revoked_ms IS NULL)",
            )
            .and_then(|mut stmt| stmt.query_row(params![name], |r| r.get::<_, bool>(0)))
            .map_err(|e| self.backend(e))?;
        if name_taken {
            return Err(RegistryError::AlreadyExists(format!("device {name}")));
        }
        let holder = tx
            .prepare_cached(
                "SELECT name FROM devices WHERE fingerprint = ?1 AND revoked_ms IS NULL",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![fingerprint.as_bytes()], |r| r.get::<_, String>(0))
                    .optional()
            })
            .map_err(|e| self.backend(e))?;
        if let Some(holder) = holder {
            return Err(RegistryError::AlreadyExists(format!(
                "a device with fingerprint {fingerprint} (bound as {holder})"
            )));
        }
        tx.prepare_cached(
            "INSERT INTO devices (name, user, fingerprint, created_ms) VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut stmt| stmt.execute(params![name, user, fingerprint.as_bytes(), created_ms]))
        .map_err(|e| {
            if is_unique_violation(&e) {
                RegistryError::AlreadyExists(format!(
                    "device {name} or a device with fingerprint {fingerprint}"
                ))
            } else {
                self.backend(e)
            }
        })?;
        tx.commit().map_err(|e| self.backend(e))?;
        Ok(DeviceRecord {
            name: name.to_owned(),
            user: user.to_owned(),
            fingerprint: *fingerprint,
            created_ms: created_ms as u64,
            revoked_ms: None,
        })
    }

    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        let mut conn = self.conn();
        // The binding and its sessions in one write transaction.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.backend(e))?;
        let rows = tx
            .prepare_cached(
                "UPDATE devices SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL
                 RETURNING name, user, fingerprint, created_ms, revoked_ms",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![name, db_ms(now_ms)], read_device)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        // The partial unique index allows one active binding per name.
        let Some(row) = rows.into_iter().next() else {
            return Err(RegistryError::NotFound(format!("active device {name}")));
        };
        tx.prepare_cached(
            "UPDATE sessions SET revoked_ms = ?2 WHERE fingerprint = ?1 AND revoked_ms IS NULL",
        )
        .and_then(|mut stmt| stmt.execute(params![row.fingerprint, db_ms(now_ms)]))
        .map_err(|e| self.backend(e))?;
        tx.commit().map_err(|e| self.backend(e))?;
        self.device_record(row)
    }

    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut conn = self.conn();
        // The check and the revocation in one write transaction: every device active at that
        // moment is revoked, and no other.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.backend(e))?;
        self.require_user(&tx, user)?;
        let rows = tx
            .prepare_cached(
                "UPDATE devices SET revoked_ms = ?2 WHERE user = ?1 AND revoked_ms IS NULL
                 RETURNING name, user, fingerprint, created_ms, revoked_ms",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![user, db_ms(now_ms)], read_device)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        tx.prepare_cached(
            "UPDATE sessions SET revoked_ms = ?2 WHERE user = ?1 AND revoked_ms IS NULL",
        )
        .and_then(|mut stmt| stmt.execute(params![user, db_ms(now_ms)]))
        .map_err(|e| self.backend(e))?;
        tx.commit().map_err(|e| self.backend(e))?;
        let mut revoked = rows
            .into_iter()
            .map(|row| self.device_record(row))
            .collect::<Result<Vec<_>, _>>()?;
        revoked.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(revoked)
    }

    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT name, totp_secret, digits, algorithm, period, created_ms, service FROM users
                 ORDER BY name",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], read_user)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        rows.into_iter().map(|r| self.user_record(r)).collect()
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT name, user, fingerprint, created_ms, revoked_ms FROM devices
                 ORDER BY name, created_ms, id",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], read_device)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.backend(e))?;
        rows.into_iter().map(|r| self.device_record(r)).collect()
    }
}

impl SqliteRegistry {
    /// Everything the registry holds, as stored (secrets sealed), in one read transaction: what
    /// `portcullis registry copy` moves to another backend.
    pub fn export(&self) -> Result<rows::RegistryExport, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.backend(e))?;
        let sqlite = |e: rusqlite::Error| self.backend(e);
        let users = tx
            .prepare(
                "SELECT name, totp_secret, digits, algorithm, period, created_ms, service,
                        failures, locked_until_ms, last_step FROM users ORDER BY name",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok(rows::ExportedUser {
                        row: read_user(r)?,
                        failures: r.get(7)?,
                        locked_until_ms: r.get(8)?,
                        last_step: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sqlite)?;
        let devices = tx
            .prepare(
                "SELECT name, user, fingerprint, created_ms, revoked_ms FROM devices ORDER BY id",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], read_device)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sqlite)?;
        let roles = tx
            .prepare("SELECT user, role FROM user_roles ORDER BY user, role")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sqlite)?;
        let sessions = tx
            .prepare(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY totp_time_ms, id"
            ))
            .and_then(|mut stmt| {
                stmt.query_map([], read_session)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        Ok(rows::RegistryExport {
            users,
            devices,
            roles,
            sessions,
        })
    }

    /// The user's lockout state read on `conn` (which may be in a transaction); `None` when
    /// there is no such user.
    fn read_lock(&self, conn: &Connection, user: &str) -> Result<Option<LockState>, RegistryError> {
        let row = conn
            .prepare_cached("SELECT failures, locked_until_ms FROM users WHERE name = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![user], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
            })
            .map_err(|e| self.backend(e))?;
        row.map(|(failures, locked_until_ms)| self.lock_from_row(user, failures, locked_until_ms))
            .transpose()
    }
}

impl SqliteRegistry {
    fn lock_from_row(
        &self,
        user: &str,
        failures: i64,
        locked_until_ms: i64,
    ) -> Result<LockState, RegistryError> {
        rows::lock_state(user, failures, locked_until_ms).map_err(|d| self.damaged(&d.0))
    }
}

impl SqliteRegistry {
    /// `NotFound` unless the user exists (read on `conn`, which may be a transaction).
    fn require_user(&self, conn: &rusqlite::Connection, user: &str) -> Result<(), RegistryError> {
        let exists = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)")
            .and_then(|mut stmt| stmt.query_row(params![user], |r| r.get::<_, bool>(0)))
            .map_err(|e| self.backend(e))?;
        if exists {
            Ok(())
        } else {
            Err(RegistryError::NotFound(format!("user {user}")))
        }
    }
}
