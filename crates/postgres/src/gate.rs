//! The accept path on PostgreSQL: one statement for the snapshot, one for the commit.
//!
//! **The snapshot** is one `SELECT` (one statement is one consistent read in PostgreSQL): the
//! binding of the fingerprint (the active one, else the most recently revoked one), its user's
//! row with the lockout state, the last step and the roles, and the session asked for, each
//! joined `LATERAL`ly so that the row is there even when nothing is found. The sealed secret is
//! read only when a code is to be checked, and opened in Rust.
//!
//! **An accepted step** is one statement: a conditional `UPDATE users … WHERE last_step <
//! $step AND locked_until_ms <= $now` and the session's `INSERT … SELECT … FROM` that update,
//! in one `WITH`. Two instances committing the same step at once: the second `UPDATE` waits for
//! the first's row lock, then re-checks its condition on the row the first wrote (PostgreSQL's
//! read-committed rule), finds the step taken and writes nothing. The same statement returns
//! the user's row as it was, and whether the session id was recorded already, so that the
//! outcome ([`Committed::StepTaken`], [`Committed::LockedOut`], an id already recorded) needs
//! no second round trip; only when a concurrent commit changed the row between the two reads
//! is it read once more.
//!
//! **A failure charge** is one conditional `UPDATE` that computes the new lockout state from
//! the policy's values, passed as parameters, in the same way as
//! [`LockoutPolicy::after_failure`](portcullis_core::LockoutPolicy::after_failure): the count
//! grows by one, and from the threshold on the wait doubles from the base up to the maximum.
//! A concurrent charge waits for the row lock and counts on the row the first wrote: no failure
//! is lost.

use std::sync::atomic::Ordering;

use portcullis_core::{
    Committed, Effects, GateStore, LockState, LockoutPolicy, Need, RegistryError, SessionNeed,
    SessionRecord, Snapshot, StoreFuture,
};
use portcullis_store::rows::{DeviceRow, GateUserRow, SessionRow, UserRow, db_ms, lock_state};
use tokio_postgres::Row;
use zeroize::Zeroizing;

use crate::PgRegistry;

/// The columns of a session, in the order [`session_at`] reads them.
pub(crate) const SESSION_COLUMNS: &str =
    "id, user_name, fingerprint, totp_time_ms, expires_ms, revoked_ms";

/// The snapshot's statement, with the session's `LATERAL` sub-select left to fill in. `$1` the
/// fingerprint, `$2` whether the secret is read.
const SNAPSHOT: &str = "
SELECT d.name, d.user_name, d.fingerprint, d.created_ms, d.revoked_ms,
       u.name, CASE WHEN $2::boolean THEN u.totp_secret END, u.digits::bigint, u.algorithm,
       u.period::bigint, u.created_ms, u.service, u.failures::bigint, u.locked_until_ms,
       u.last_step, u.totp_secret IS NOT NULL,
       ARRAY(SELECT r.role FROM user_roles r WHERE r.user_name = d.user_name),
       s.id, s.user_name, s.fingerprint, s.totp_time_ms, s.expires_ms, s.revoked_ms
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT * FROM devices WHERE fingerprint = $1::bytea
    ORDER BY (revoked_ms IS NULL) DESC, created_ms DESC, id DESC LIMIT 1) d ON TRUE
LEFT JOIN users u ON u.name = d.user_name
LEFT JOIN LATERAL ({session}) s ON TRUE";

/// The session sub-select for [`SessionNeed::None`]: nothing.
const NO_SESSION: &str = "SELECT * FROM sessions WHERE FALSE";

/// The session sub-select for [`SessionNeed::ById`]: `$3` the id.
const SESSION_BY_ID: &str = "SELECT * FROM sessions WHERE id = $3::bytea";

/// The session sub-select for [`SessionNeed::LiveForDevice`]: the newest live session of the
/// active binding, earned by its user since it was bound; `$3` the time.
pub(crate) const LIVE_SESSION: &str = "
    SELECT * FROM sessions x
    WHERE d.revoked_ms IS NULL AND x.fingerprint = d.fingerprint AND x.user_name = d.user_name
      AND x.totp_time_ms >= d.created_ms AND x.revoked_ms IS NULL AND x.expires_ms > $3::bigint
    ORDER BY x.totp_time_ms DESC, x.expires_ms DESC, x.id DESC LIMIT 1";

/// An accepted step, with its session: `$1` user, `$2` step, `$3` now; the session `$4` id,
/// `$5` user, `$6` fingerprint, `$7` TOTP time, `$8` expiry, `$9` revoked; `{purge}` empty or
/// [`PURGE`]. Returns whether the step was taken, the user's row before, and whether the id
/// was recorded before; no row when there is no such user.
const ACCEPT_WITH_SESSION: &str = "
WITH upd AS (
    UPDATE users SET last_step = $2::bigint, failures = 0, locked_until_ms = 0
    WHERE name = $1::text AND (last_step IS NULL OR last_step < $2::bigint)
      AND locked_until_ms <= $3::bigint
    RETURNING name
), ins AS (
    INSERT INTO sessions (id, user_name, fingerprint, totp_time_ms, expires_ms, revoked_ms)
    SELECT $4::bytea, $5::text, $6::bytea, $7::bigint, $8::bigint, $9::bigint FROM upd
    RETURNING id
){purge}
SELECT EXISTS (SELECT 1 FROM upd), u.failures::bigint, u.locked_until_ms, u.last_step,
       EXISTS (SELECT 1 FROM sessions WHERE id = $4::bytea)
FROM users u WHERE u.name = $1::text";

/// Forgets up to 64 session records that expired by `$10` (a bounded batch; rows another
/// instance is deleting are skipped, not waited for).
const PURGE: &str = ", purge AS (
    DELETE FROM sessions WHERE id IN (
        SELECT id FROM sessions WHERE expires_ms <= $10::bigint LIMIT 64 FOR UPDATE SKIP LOCKED)
)";

/// The statements whose text is put together from the pieces above, made once (not on every
/// accept): the snapshot for each [`SessionNeed`], and the accept with a session, without and
/// with the purge.
struct Statements {
    snapshot_none: String,
    snapshot_by_id: String,
    snapshot_live: String,
    accept_with_session: String,
    accept_with_session_and_purge: String,
}

static STATEMENTS: std::sync::LazyLock<Statements> = std::sync::LazyLock::new(|| Statements {
    snapshot_none: SNAPSHOT.replace("{session}", NO_SESSION),
    snapshot_by_id: SNAPSHOT.replace("{session}", SESSION_BY_ID),
    snapshot_live: SNAPSHOT.replace("{session}", LIVE_SESSION),
    accept_with_session: ACCEPT_WITH_SESSION.replace("{purge}", ""),
    accept_with_session_and_purge: ACCEPT_WITH_SESSION.replace("{purge}", PURGE),
});

/// How often a new session purges expired records, in the sessions' own time (ms).
const PURGE_EVERY_MS: u64 = 1_000;

/// An accepted step without a session: `$1` user, `$2` step, `$3` now.
const ACCEPT: &str = "
WITH upd AS (
    UPDATE users SET last_step = $2::bigint, failures = 0, locked_until_ms = 0
    WHERE name = $1::text AND (last_step IS NULL OR last_step < $2::bigint)
      AND locked_until_ms <= $3::bigint
    RETURNING name
)
SELECT EXISTS (SELECT 1 FROM upd), u.failures::bigint, u.locked_until_ms, u.last_step, FALSE
FROM users u WHERE u.name = $1::text";

/// A failure charge: `$1` user, `$2` now, `$3` threshold (at least 1), `$4` first wait, `$5`
/// longest wait. Returns whether it was charged and the user's row before.
const CHARGE: &str = "
WITH c AS (
    UPDATE users SET
        failures = LEAST(failures::bigint + 1, 2147483647)::integer,
        locked_until_ms = CASE
            WHEN failures::bigint + 1 < $3::bigint THEN locked_until_ms
            ELSE LEAST(
                $2::bigint::numeric + LEAST(
                    $4::bigint::numeric
                        * power(2::numeric, LEAST(failures::bigint + 1 - $3::bigint, 63)),
                    $5::bigint::numeric),
                9223372036854775807)::bigint
        END
    WHERE name = $1::text AND locked_until_ms <= $2::bigint
    RETURNING name
)
SELECT EXISTS (SELECT 1 FROM c), u.failures::bigint, u.locked_until_ms, u.last_step, FALSE
FROM users u WHERE u.name = $1::text";

/// The user's row now (after a concurrent commit changed it under a lost condition).
const USER_STATE: &str = "SELECT TRUE, failures::bigint, locked_until_ms, last_step, FALSE
    FROM users WHERE name = $1::text";

/// A session from the columns of [`SESSION_COLUMNS`] starting at `at`; `None` when its id is
/// NULL (nothing was joined).
pub(crate) fn session_at(
    row: &Row,
    at: usize,
) -> Result<Option<SessionRow>, tokio_postgres::Error> {
    let Some(id) = row.try_get::<_, Option<Vec<u8>>>(at)? else {
        return Ok(None);
    };
    Ok(Some(SessionRow {
        id,
        user: row.try_get(at + 1)?,
        fingerprint: row.try_get(at + 2)?,
        totp_time_ms: row.try_get(at + 3)?,
        expires_ms: row.try_get(at + 4)?,
        revoked_ms: row.try_get(at + 5)?,
    }))
}

/// A device from `name, user_name, fingerprint, created_ms, revoked_ms` starting at `at`;
/// `None` when its name is NULL.
pub(crate) fn device_at(row: &Row, at: usize) -> Result<Option<DeviceRow>, tokio_postgres::Error> {
    let Some(name) = row.try_get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    Ok(Some(DeviceRow {
        name,
        user: row.try_get(at + 1)?,
        fingerprint: row.try_get(at + 2)?,
        created_ms: row.try_get(at + 3)?,
        revoked_ms: row.try_get(at + 4)?,
    }))
}

/// A user from `name, totp_secret, digits, algorithm, period, created_ms, service` starting at
/// `at` (digits and period as `bigint`); `None` when its name is NULL.
pub(crate) fn user_at(row: &Row, at: usize) -> Result<Option<UserRow>, tokio_postgres::Error> {
    let Some(name) = row.try_get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    Ok(Some(UserRow {
        name,
        secret: row
            .try_get::<_, Option<Vec<u8>>>(at + 1)?
            .map(Zeroizing::new),
        digits: row.try_get(at + 2)?,
        algorithm: row.try_get(at + 3)?,
        period: row.try_get(at + 4)?,
        created_ms: row.try_get(at + 5)?,
        service: row.try_get(at + 6)?,
    }))
}

/// What a commit statement returned: whether its condition held, the user's row before it,
/// and whether the session id was recorded before.
struct CommitRow {
    applied: bool,
    lock: LockState,
    last_step: Option<u64>,
    id_recorded: bool,
}

impl PgRegistry {
    pub(crate) async fn snapshot_async(&self, need: &Need) -> Result<Snapshot, RegistryError> {
        let client = self.conn().await?;
        let fingerprint = need.fingerprint.as_bytes().as_slice();
        let (sql, rows) = match need.session {
            SessionNeed::None => (&STATEMENTS.snapshot_none, None),
            SessionNeed::ById(id) => (&STATEMENTS.snapshot_by_id, Some(Param::Id(id.0.to_vec()))),
            SessionNeed::LiveForDevice => (
                &STATEMENTS.snapshot_live,
                Some(Param::Time(db_ms(need.now_ms))),
            ),
        };
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.backend(&e))?;
        let row = match &rows {
            None => {
                client
                    .query_one(&statement, &[&fingerprint, &need.secret])
                    .await
            }
            Some(Param::Id(id)) => {
                client
                    .query_one(&statement, &[&fingerprint, &need.secret, id])
                    .await
            }
            Some(Param::Time(t)) => {
                client
                    .query_one(&statement, &[&fingerprint, &need.secret, t])
                    .await
            }
        }
        .map_err(|e| self.backend(&e))?;
        // The connection goes back to the pool before the secret is opened.
        drop(client);
        let read = |e: tokio_postgres::Error| self.backend(&e);
        let device = device_at(&row, 0).map_err(read)?;
        let user = match user_at(&row, 5).map_err(read)? {
            None => None,
            Some(user) => Some(GateUserRow {
                row: user,
                failures: row.try_get(12).map_err(read)?,
                locked_until_ms: row.try_get(13).map_err(read)?,
                last_step: row.try_get(14).map_err(read)?,
                has_totp: row.try_get(15).map_err(read)?,
                roles: row.try_get(16).map_err(read)?,
            }),
        };
        let session = session_at(&row, 17).map_err(read)?;
        Ok(Snapshot {
            device: device
                .map(|d| d.decode().map_err(|e| self.damaged(e)))
                .transpose()?,
            user: user
                .map(|u| u.decode(&self.sealer).map_err(|e| self.damaged(e)))
                .transpose()?,
            session: session
                .map(|s| s.decode().map_err(|e| self.damaged(e)))
                .transpose()?,
        })
    }

    async fn commit_async(&self, effects: &Effects) -> Result<Committed, RegistryError> {
        let Some((user, now_ms, lockout)) = effects.target() else {
            return Ok(Committed::Applied);
        };
        let now = db_ms(now_ms);
        let client = self.conn().await?;
        let row = match effects {
            Effects::AcceptStep { step, session, .. } => {
                let step = i64::try_from(*step).map_err(|_| {
                    RegistryError::Invalid(format!("TOTP step {step}: larger than {}", i64::MAX))
                })?;
                match session {
                    None => {
                        let statement = client
                            .prepare_cached(ACCEPT)
                            .await
                            .map_err(|e| self.backend(&e))?;
                        client.query_opt(&statement, &[&user, &step, &now]).await
                    }
                    Some(session) => {
                        let horizon = self.purge_horizon(session);
                        let sql = if horizon.is_some() {
                            &STATEMENTS.accept_with_session_and_purge
                        } else {
                            &STATEMENTS.accept_with_session
                        };
                        let statement = client
                            .prepare_cached(sql)
                            .await
                            .map_err(|e| self.backend(&e))?;
                        let id = session.id.0.as_slice();
                        let fingerprint = session.fingerprint.as_bytes().as_slice();
                        let totp_time = db_ms(session.totp_time_ms);
                        let expires = db_ms(session.expires_ms);
                        let revoked = session.revoked_ms.map(db_ms);
                        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
                            &user,
                            &step,
                            &now,
                            &id,
                            &session.user,
                            &fingerprint,
                            &totp_time,
                            &expires,
                            &revoked,
                        ];
                        if let Some(horizon) = &horizon {
                            params.push(horizon);
                        }
                        let result = client.query_opt(&statement, &params).await;
                        if result.as_ref().is_err_and(is_unique_violation) {
                            return Err(RegistryError::AlreadyExists(format!(
                                "session {}",
                                session.id
                            )));
                        }
                        result
                    }
                }
            }
            Effects::ChargeFailure { .. } => {
                let statement = client
                    .prepare_cached(CHARGE)
                    .await
                    .map_err(|e| self.backend(&e))?;
                let (threshold, base, max) = policy_params(&lockout);
                client
                    .query_opt(&statement, &[&user, &now, &threshold, &base, &max])
                    .await
            }
            Effects::None => return Ok(Committed::Applied),
        }
        .map_err(|e| self.backend(&e))?;
        let Some(row) = row else {
            return Err(RegistryError::NotFound(format!("user {user}")));
        };
        let found = self.commit_row(user, &row)?;
        if found.applied {
            return Ok(Committed::Applied);
        }
        if let Effects::AcceptStep { session, step, .. } = effects {
            if let Some(session) = session
                && found.id_recorded
            {
                // The id decides first, as in every store: nothing was written.
                return Err(RegistryError::AlreadyExists(format!(
                    "session {}",
                    session.id
                )));
            }
            if found.lock.remaining_ms(now_ms).is_some() {
                return Ok(Committed::LockedOut(found.lock));
            }
            if found.last_step.is_some_and(|last| last >= *step) {
                return Ok(Committed::StepTaken(found.lock));
            }
        } else if found.lock.remaining_ms(now_ms).is_some() {
            return Ok(Committed::LockedOut(found.lock));
        }
        // The row read before the change does not say why the condition failed: a commit of
        // another instance changed it meanwhile. Read it as it is now.
        let statement = client
            .prepare_cached(USER_STATE)
            .await
            .map_err(|e| self.backend(&e))?;
        let Some(row) = client
            .query_opt(&statement, &[&user])
            .await
            .map_err(|e| self.backend(&e))?
        else {
            return Err(RegistryError::NotFound(format!("user {user}")));
        };
        let now_row = self.commit_row(user, &row)?;
        Ok(match effects {
            Effects::AcceptStep { .. } if now_row.lock.remaining_ms(now_ms).is_none() => {
                Committed::StepTaken(now_row.lock)
            }
            _ => Committed::LockedOut(now_row.lock),
        })
    }

    fn commit_row(&self, user: &str, row: &Row) -> Result<CommitRow, RegistryError> {
        let read = |e: tokio_postgres::Error| self.backend(&e);
        let lock = lock_state(
            user,
            row.try_get(1).map_err(read)?,
            row.try_get(2).map_err(read)?,
        )
        .map_err(|e| self.damaged(e))?;
        let last_step = row
            .try_get::<_, Option<i64>>(3)
            .map_err(read)?
            .map(|s| portcullis_store::rows::stored_u64(s, "user last_step"))
            .transpose()
            .map_err(|e| self.damaged(e))?;
        Ok(CommitRow {
            applied: row.try_get(0).map_err(read)?,
            lock,
            last_step,
            id_recorded: row.try_get(4).map_err(read)?,
        })
    }

    /// The time up to which expired records are forgotten with this session, when it is time
    /// for that (at most once a second of the sessions' own time).
    fn purge_horizon(&self, session: &SessionRecord) -> Option<i64> {
        let horizon = session.totp_time_ms.min(self.clock.now_ms());
        let last = self.last_purge_ms.load(Ordering::Relaxed);
        if horizon < last || horizon - last >= PURGE_EVERY_MS {
            self.last_purge_ms.store(horizon, Ordering::Relaxed);
            Some(db_ms(horizon))
        } else {
            None
        }
    }
}

/// A third parameter of the snapshot.
enum Param {
    Id(Vec<u8>),
    Time(i64),
}

/// The lockout policy as the charge statement's parameters: the threshold (at least 1), the
/// first and the longest wait.
fn policy_params(policy: &LockoutPolicy) -> (i64, i64, i64) {
    (
        i64::from(policy.threshold.max(1)),
        db_ms(policy.base_ms),
        db_ms(policy.max_ms),
    )
}

/// Whether `e` is a unique constraint's refusal (SQLSTATE 23505).
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl GateStore for PgRegistry {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        Box::pin(self.snapshot_async(need))
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        Box::pin(self.commit_async(effects))
    }

    fn changes_since(&self, after: Option<u64>) -> StoreFuture<'_, portcullis_core::ChangeTail> {
        Box::pin(self.changes_since_async(after))
    }
}
