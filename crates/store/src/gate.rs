//! The accept path on SQLite: one read transaction for the snapshot, one write transaction for
//! the commit.
//!
//! The snapshot is two cached statements in one deferred (read) transaction on the reader
//! connection: the device of the fingerprint joined with its user (lockout state, last step,
//! roles, and the sealed secret only when the code is to be checked), then the session asked
//! for. The rows are copied out and the connection is released before anything is decoded: the
//! secret is opened (AES-256-GCM) once, outside the lock.
//!
//! The commit is one `BEGIN IMMEDIATE` transaction on the writer connection. An accepted step
//! is one conditional `UPDATE` (the step still newer, the user not locked out) plus the
//! session's `INSERT`; when the condition fails, the same transaction reads why and charges
//! the failure (a reused code) or writes nothing (a locked-out user). A wrong code is the same
//! one transaction with the failure charge. SQLite's write lock makes each commit one step
//! across connections and processes.

use portcullis_core::{
    Committed, DeviceRecord, Effects, LockState, LockoutPolicy, Need, RegistryError, SessionNeed,
    SessionRecord, Snapshot, UserState,
};
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};

use crate::rows::{GateUserRow, UserRow, db_ms};
use crate::{SqliteRegistry, is_unique_violation, read_device, read_session};

/// The device of a fingerprint (the active binding, else the most recently revoked one) and its
/// user's row, with the lockout state, the last step and the roles (comma-separated: role
/// names have no commas; sorted after the read). The secret is read only when `?2` is true.
/// Both lookups of the binding walk an index: no sort, no temporary table.
const DEVICE_AND_USER: &str = "
    SELECT d.name, d.user, d.fingerprint, d.created_ms, d.revoked_ms,
           u.name, CASE WHEN ?2 THEN u.totp_secret END, u.digits, u.algorithm, u.period,
           u.created_ms, u.service, u.failures, u.locked_until_ms, u.last_step,
           u.totp_secret IS NOT NULL,
           (SELECT group_concat(role, ',') FROM user_roles WHERE user = d.user)
    FROM devices d LEFT JOIN users u ON u.name = d.user
    WHERE d.id = coalesce(
        (SELECT id FROM devices WHERE fingerprint = ?1 AND revoked_ms IS NULL),
        (SELECT id FROM devices WHERE fingerprint = ?1 ORDER BY created_ms DESC, id DESC LIMIT 1))";

/// Forgets up to 64 records that expired by `?1`: a bounded batch, so that a purge never holds
/// the write lock for long. The batch size is written into the statement: a bound `LIMIT`
/// makes SQLite (built with STAT4) plan the statement anew on every run.
const PURGE: &str = "DELETE FROM sessions WHERE id IN
    (SELECT id FROM sessions WHERE expires_ms <= ?1 LIMIT 64)";

/// How often a new session purges expired records, in the sessions' own time (ms).
const PURGE_EVERY_MS: u64 = 1_000;

/// A transaction begun and ended with cached statements: rusqlite's `Transaction` prepares
/// `BEGIN` and `COMMIT` anew each time, which costs more than the gate's own statements. Rolled
/// back when dropped uncommitted (an error, a lost condition).
struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    fn begin(conn: &'c Connection, begin: &'static str) -> rusqlite::Result<Self> {
        // A transaction left open (a ROLLBACK that failed) would make every BEGIN fail and
        // keep other processes waiting on its lock: ended first.
        if !conn.is_autocommit() {
            conn.prepare_cached("ROLLBACK")?.execute([])?;
        }
        conn.prepare_cached(begin)?.execute([])?;
        Ok(Self { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut stmt| stmt.execute([]));
        }
    }
}

/// The session with an id ([`crate::SESSION_COLUMNS`]).
const SESSION_BY_ID: &str = "SELECT id, user, fingerprint, totp_time_ms, expires_ms, revoked_ms
    FROM sessions WHERE id = ?1";

impl SqliteRegistry {
    /// [`portcullis_core::GateStore::snapshot`], at once: one read transaction.
    pub fn snapshot_now(&self, need: &Need) -> Result<Snapshot, RegistryError> {
        let (device, user, session) = {
            let conn = self.reader();
            // One statement is a consistent read of its own; two need a read transaction.
            let begin = if need.session == SessionNeed::None {
                None
            } else {
                Some(Tx::begin(&conn, "BEGIN DEFERRED").map_err(|e| self.backend(e))?)
            };
            let tx: &Connection = &conn;
            let found = tx
                .prepare_cached(DEVICE_AND_USER)
                .and_then(|mut stmt| {
                    stmt.query_row(params![need.fingerprint.as_bytes(), need.secret], |r| {
                        let device = read_device(r)?;
                        let user = match r.get::<_, Option<String>>(5)? {
                            None => None,
                            Some(name) => Some(GateUserRow {
                                row: UserRow {
                                    name,
                                    secret: r
                                        .get::<_, Option<Vec<u8>>>(6)?
                                        .map(zeroize::Zeroizing::new),
                                    digits: r.get(7)?,
                                    algorithm: r.get(8)?,
                                    period: r.get(9)?,
                                    created_ms: r.get(10)?,
                                    service: r.get::<_, i64>(11)? != 0,
                                },
                                failures: r.get(12)?,
                                locked_until_ms: r.get(13)?,
                                last_step: r.get(14)?,
                                has_totp: r.get(15)?,
                                roles: r
                                    .get::<_, Option<String>>(16)?
                                    .map(|r| r.split(',').map(str::to_owned).collect())
                                    .unwrap_or_default(),
                            }),
                        };
                        Ok((device, user))
                    })
                    .optional()
                })
                .map_err(|e| self.backend(e))?;
            let (device, user) = match found {
                Some((device, user)) => (Some(device), user),
                None => (None, None),
            };
            let session = match need.session {
                SessionNeed::None => None,
                SessionNeed::ById(id) => tx
                    .prepare_cached(SESSION_BY_ID)
                    .and_then(|mut stmt| {
                        stmt.query_row(params![&id.0[..]], read_session).optional()
                    })
                    .map_err(|e| self.backend(e))?,
                SessionNeed::LiveForDevice if device.is_some() => tx
                    .prepare_cached(LIVE_SESSION)
                    .and_then(|mut stmt| {
                        stmt.query_row(
                            params![need.fingerprint.as_bytes(), db_ms(need.now_ms)],
                            read_session,
                        )
                        .optional()
                    })
                    .map_err(|e| self.backend(e))?,
                SessionNeed::LiveForDevice => None,
            };
            if let Some(begin) = begin {
                begin.commit().map_err(|e| self.backend(e))?;
            }
            (device, user, session)
        };
        // The connection is free again: decode, and open the secret, outside the lock.
        let device: Option<DeviceRecord> = device.map(|d| self.device_record(d)).transpose()?;
        let user = user.map(|u| self.gate_user(u)).transpose()?;
        let session = session.map(|s| self.session_record(s)).transpose()?;
        Ok(Snapshot {
            device,
            user,
            session,
        })
    }

    fn gate_user(&self, u: GateUserRow) -> Result<UserState, RegistryError> {
        u.decode(&self.sealer).map_err(|d| self.damaged(&d.0))
    }

    /// [`portcullis_core::GateStore::commit`], at once: one write transaction.
    pub fn commit_now(&self, effects: &Effects) -> Result<Committed, RegistryError> {
        let Some((user, now_ms, lockout)) = effects.target() else {
            return Ok(Committed::Applied);
        };
        let conn = self.writer();
        self.checkpointer
            .get_or_init(|| self.start_checkpointer(&conn));
        let tx = Tx::begin(&conn, "BEGIN IMMEDIATE").map_err(|e| self.backend(e))?;
        if let Effects::AcceptStep { step, session, .. } = effects {
            let step = i64::try_from(*step).map_err(|_| {
                RegistryError::Invalid(format!("TOTP step {step}: larger than {}", i64::MAX))
            })?;
            // The session first: an id already recorded refuses the whole commit (nothing is
            // written) whatever the step's fate, as in every store.
            if let Some(session) = session {
                self.insert_session(&tx, session)?;
            }
            // The fast path: the step still newer and the user not locked out, in one
            // statement.
            let accepted = tx
                .prepare_cached(
                    "UPDATE users SET last_step = ?2, failures = 0, locked_until_ms = 0
                     WHERE name = ?1 AND (last_step IS NULL OR last_step < ?2)
                       AND locked_until_ms <= ?3",
                )
                .and_then(|mut stmt| stmt.execute(params![user, step, db_ms(now_ms)]))
                .map_err(|e| self.backend(e))?;
            if accepted > 0 {
                tx.commit().map_err(|e| self.backend(e))?;
                return Ok(Committed::Applied);
            }
            // Lost: the step was taken meanwhile, or the user is locked out. Nothing is
            // written (the session goes again with the step): a reused code is no guess of
            // the secret, and is not charged.
            let Some(current) = self.read_lock(&tx, user)? else {
                return Err(RegistryError::NotFound(format!("user {user}")));
            };
            drop(tx);
            return Ok(if current.remaining_ms(now_ms).is_some() {
                Committed::LockedOut(current)
            } else {
                Committed::StepTaken(current)
            });
        }
        // A failure to charge (a wrong code), unless the user is locked out.
        let Some(current) = self.read_lock(&tx, user)? else {
            return Err(RegistryError::NotFound(format!("user {user}")));
        };
        if current.remaining_ms(now_ms).is_some() {
            // Nothing to write: the transaction ends without a change.
            return Ok(Committed::LockedOut(current));
        }
        let charged = charge(&lockout, current, now_ms);
        tx.prepare_cached("UPDATE users SET failures = ?2, locked_until_ms = ?3 WHERE name = ?1")
            .and_then(|mut stmt| {
                stmt.execute(params![
                    user,
                    i64::from(charged.failures),
                    db_ms(charged.locked_until_ms)
                ])
            })
            .map_err(|e| self.backend(e))?;
        tx.commit().map_err(|e| self.backend(e))?;
        Ok(Committed::Applied)
    }

    /// Starts the checkpoint thread on a connection of its own, and leaves the writer's
    /// automatic checkpoint as a backstop only. `None` (the writer checkpoints, as SQLite's
    /// default) when no connection or thread can be had.
    fn start_checkpointer(&self, writer: &Connection) -> Option<crate::checkpoint::Checkpointer> {
        let conn = crate::schema::connect(&self.path, &self.sealer).ok()?;
        let checkpointer = crate::checkpoint::Checkpointer::start(conn)?;
        // Without the backstop raised, the writer would still checkpoint at 1,000 pages.
        let _ = writer.pragma_update(
            None,
            "wal_autocheckpoint",
            crate::checkpoint::BACKSTOP_PAGES,
        );
        Some(checkpointer)
    }

    /// Records a session the gate issued, inside the commit's transaction, and forgets a
    /// bounded number of expired records while here (so that the table stays small without a
    /// purge ever holding the write lock for long).
    fn insert_session(
        &self,
        tx: &Connection,
        session: &SessionRecord,
    ) -> Result<(), RegistryError> {
        let horizon = session.totp_time_ms.min(self.clock.now_ms());
        // At most once a second (of the sessions' own time): the purge costs about as much as
        // the insert it comes with.
        let last = self.last_purge_ms.load(Ordering::Relaxed);
        if horizon < last || horizon - last >= PURGE_EVERY_MS {
            tx.prepare_cached(PURGE)
                .and_then(|mut stmt| stmt.execute(params![db_ms(horizon)]))
                .map_err(|e| self.backend(e))?;
            self.last_purge_ms.store(horizon, Ordering::Relaxed);
        }
        tx.prepare_cached(
            "INSERT INTO sessions (id, user, fingerprint, totp_time_ms, expires_ms, revoked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                &session.id.0[..],
                session.user,
                session.fingerprint.as_bytes(),
                db_ms(session.totp_time_ms),
                db_ms(session.expires_ms),
                session.revoked_ms.map(db_ms),
            ])
        })
        .map_err(|e| {
            if is_unique_violation(&e) {
                RegistryError::AlreadyExists(format!("session {}", session.id))
            } else {
                self.backend(e)
            }
        })?;
        Ok(())
    }
}

/// The lockout state after one more failure, as SQLite stores it (times past `i64::MAX` ms are
/// kept as `i64::MAX`).
fn charge(policy: &LockoutPolicy, current: LockState, now_ms: u64) -> LockState {
    let wanted = policy.after_failure(current, now_ms);
    LockState {
        failures: wanted.failures,
        locked_until_ms: wanted.locked_until_ms.min(i64::MAX as u64),
    }
}

/// The newest live session of the active binding of a fingerprint, earned by the binding's
/// user since it was bound.
pub(crate) const LIVE_SESSION: &str =
    "SELECT s.id, s.user, s.fingerprint, s.totp_time_ms, s.expires_ms, s.revoked_ms
     FROM sessions s
     JOIN devices d ON d.fingerprint = s.fingerprint AND d.revoked_ms IS NULL
     WHERE s.fingerprint = ?1 AND s.user = d.user
       AND s.totp_time_ms >= d.created_ms
       AND s.revoked_ms IS NULL AND s.expires_ms > ?2
     ORDER BY s.totp_time_ms DESC, s.expires_ms DESC, s.id DESC LIMIT 1";

#[cfg(test)]
mod tests {
    use crate::SESSION_COLUMNS;

    #[test]
    fn the_session_queries_read_the_columns_session_row_reads() {
        assert!(super::SESSION_BY_ID.contains(SESSION_COLUMNS));
        let aliased = SESSION_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(super::LIVE_SESSION.contains(&aliased));
    }
}
