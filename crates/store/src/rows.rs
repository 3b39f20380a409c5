//! The registry's rows as a SQL database returns them, and their decoding into the records of
//! `portcullis-core`: one place that checks what was stored, for every SQL backend (SQLite here,
//! PostgreSQL in `portcullis-postgres`).
//!
//! A backend reads the columns into these structs as they are (signed integers, optional
//! values, sealed secret bytes) and calls `decode`. A value this build cannot make sense of (a
//! negative time, a fingerprint that is not 32 bytes, TOTP parameters out of range, a secret
//! that does not open) is a [`Damaged`] naming the row, which the backend reports as
//! [`RegistryError::Backend`](portcullis_core::RegistryError::Backend) with the database's
//! name. Never a secret byte in a message.

use std::fmt;

use portcullis_core::{
    DeviceFingerprint, DeviceRecord, LockState, SessionId, SessionRecord, TotpAlgorithm,
    TotpConfig, UserRecord, UserState,
};
use zeroize::Zeroizing;

use crate::Sealer;

/// The shortest TOTP secret a registry holds (128 bits), as `TotpConfig::new` requires.
const MIN_SECRET_LEN: usize = 16;

/// A stored row that does not decode: what is wrong with it, in one line naming the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged(pub String);

impl fmt::Display for Damaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Damaged {}

/// A time in Unix ms as a SQL database stores it (a signed 64-bit integer): times past
/// `i64::MAX` ms (292 million years) are kept as `i64::MAX`.
pub fn db_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A stored non-negative integer, or [`Damaged`] naming `what`.
pub fn stored_u64(value: i64, what: &str) -> Result<u64, Damaged> {
    u64::try_from(value).map_err(|_| Damaged(format!("{what} is negative")))
}

/// A user's lockout state from its stored columns.
pub fn lock_state(user: &str, failures: i64, locked_until_ms: i64) -> Result<LockState, Damaged> {
    let failures = u32::try_from(failures)
        .map_err(|_| Damaged(format!("user {user}: failure count {failures}")))?;
    Ok(LockState {
        failures,
        locked_until_ms: stored_u64(locked_until_ms, "user locked_until_ms")?,
    })
}

/// A `devices` row: `name, user, fingerprint, created_ms, revoked_ms`.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// The device name.
    pub name: String,
    /// The user it is bound to.
    pub user: String,
    /// The fingerprint bytes (32 when sound).
    pub fingerprint: Vec<u8>,
    /// When it was bound, Unix ms.
    pub created_ms: i64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<i64>,
}

impl DeviceRow {
    /// The record, checked.
    pub fn decode(self) -> Result<DeviceRecord, Damaged> {
        let fingerprint: [u8; 32] =
            self.fingerprint.as_slice().try_into().map_err(|_| {
                Damaged(format!("device {}: fingerprint is not 32 bytes", self.name))
            })?;
        Ok(DeviceRecord {
            created_ms: stored_u64(self.created_ms, "device created_ms")?,
            revoked_ms: self
                .revoked_ms
                .map(|v| stored_u64(v, "device revoked_ms"))
                .transpose()?,
            name: self.name,
            user: self.user,
            fingerprint: DeviceFingerprint::from_bytes(fingerprint),
        })
    }
}

/// A `sessions` row: `id, user, fingerprint, totp_time_ms, expires_ms, revoked_ms`.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// The session id bytes (16 when sound).
    pub id: Vec<u8>,
    /// The user who earned it.
    pub user: String,
    /// The device fingerprint bytes (32 when sound).
    pub fingerprint: Vec<u8>,
    /// The time of the TOTP code that earned it, Unix ms.
    pub totp_time_ms: i64,
    /// When it expires, Unix ms.
    pub expires_ms: i64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<i64>,
}

impl SessionRow {
    /// The record, checked.
    pub fn decode(self) -> Result<SessionRecord, Damaged> {
        let id: [u8; 16] = self
            .id
            .as_slice()
            .try_into()
            .map_err(|_| Damaged("a session id is not 16 bytes".to_owned()))?;
        let id = SessionId(id);
        let fingerprint: [u8; 32] = self
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| Damaged(format!("session {id}: fingerprint is not 32 bytes")))?;
        Ok(SessionRecord {
            id,
            user: self.user,
            fingerprint: DeviceFingerprint::from_bytes(fingerprint),
            totp_time_ms: stored_u64(self.totp_time_ms, "session totp_time_ms")?,
            expires_ms: stored_u64(self.expires_ms, "session expires_ms")?,
            revoked_ms: self
                .revoked_ms
                .map(|v| stored_u64(v, "session revoked_ms"))
                .transpose()?,
        })
    }
}

/// A `users` row: `name, totp_secret, digits, algorithm, period, created_ms, service`.
#[derive(Clone)]
pub struct UserRow {
    /// The user name.
    pub name: String,
    /// The sealed secret, as stored (`None` for a service account, or when not read).
    pub secret: Option<Zeroizing<Vec<u8>>>,
    /// The code length.
    pub digits: Option<i64>,
    /// The HMAC algorithm's name (`SHA1`, `SHA256`, `SHA512`).
    pub algorithm: Option<String>,
    /// The time step in seconds.
    pub period: Option<i64>,
    /// When the user was added, Unix ms.
    pub created_ms: i64,
    /// Whether the user is a service account.
    pub service: bool,
}

impl fmt::Debug for UserRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRow")
            .field("name", &self.name)
            .field("secret", &self.secret.as_ref().map(|_| "<sealed>"))
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl UserRow {
    /// The record, checked, with the secret opened by `sealer`. The TOTP parameters are all
    /// present or all absent; a service account has none.
    pub fn decode(self, sealer: &Sealer) -> Result<UserRecord, Damaged> {
        let created_ms = stored_u64(self.created_ms, "user created_ms")?;
        let name = self.name;
        let totp = match (self.secret, self.digits, self.algorithm, self.period) {
            (None, None, None, None) => None,
            (Some(stored), Some(digits), Some(algorithm), Some(period)) => {
                let invalid = |detail: String| {
                    Damaged(format!(
                        "user {name}: stored TOTP parameters are invalid ({detail})"
                    ))
                };
                let digits = u8::try_from(digits)
                    .ok()
                    .filter(|d| (6..=8).contains(d))
                    .ok_or_else(|| invalid(format!("digits {digits}")))?;
                let algorithm: TotpAlgorithm =
                    algorithm.parse().map_err(|e| invalid(format!("{e}")))?;
                let period = u64::try_from(period)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid(format!("period {period}")))?;
                let mut secret =
                    Zeroizing::new(sealer.open(&name, stored).map_err(|e| {
                        Damaged(format!("cannot open the TOTP secret of {name}: {e}"))
                    })?);
                if secret.len() < MIN_SECRET_LEN {
                    return Err(invalid(format!("a secret of {} bytes", secret.len())));
                }
                // The checks above are those of `TotpConfig::new`, which therefore takes the
                // buffer without a copy and wipes it when the configuration is dropped.
                let totp = TotpConfig::new(std::mem::take(&mut *secret), digits, algorithm, period)
                    .map_err(|e| invalid(e.to_string()))?;
                Some(totp)
            }
            _ => {
                return Err(Damaged(format!(
                    "user {name}: stored TOTP parameters are incomplete"
                )));
            }
        };
        if self.service && totp.is_some() {
            return Err(Damaged(format!(
                "user {name}: a service account with TOTP parameters"
            )));
        }
        Ok(UserRecord {
            name,
            totp,
            created_ms,
            service: self.service,
        })
    }
}

/// A user as the gate's snapshot reads it: the row (the secret only when the code is to be
/// checked), the lockout and single-use state, whether a secret is stored, and the roles.
#[derive(Debug)]
pub struct GateUserRow {
    /// The user's row.
    pub row: UserRow,
    /// The failure count.
    pub failures: i64,
    /// Until when the user is locked out, Unix ms.
    pub locked_until_ms: i64,
    /// The last accepted TOTP step.
    pub last_step: Option<i64>,
    /// Whether a TOTP secret is stored (whether or not it was read).
    pub has_totp: bool,
    /// The roles, in any order.
    pub roles: Vec<String>,
}

impl GateUserRow {
    /// The gate's view of the user, checked; the secret (when read) opened by `sealer`.
    pub fn decode(self, sealer: &Sealer) -> Result<UserState, Damaged> {
        let name = self.row.name.clone();
        let lock = lock_state(&name, self.failures, self.locked_until_ms)?;
        let last_step = self
            .last_step
            .map(|s| stored_u64(s, "user last_step"))
            .transpose()?;
        let mut roles = self.roles;
        roles.sort();
        let record = if self.row.secret.is_some() {
            self.row.decode(sealer)?
        } else {
            // The secret was not asked for: the parameters alone say nothing the gate uses.
            UserRecord {
                created_ms: stored_u64(self.row.created_ms, "user created_ms")?,
                name: self.row.name,
                totp: None,
                service: self.row.service,
            }
        };
        Ok(UserState {
            name,
            totp: record.totp,
            has_totp: self.has_totp,
            service: record.service,
            created_ms: record.created_ms,
            lock,
            last_step,
            roles,
        })
    }
}

/// A user as stored, with the state the gate keeps: what a copy of the registry moves.
#[derive(Debug, Clone)]
pub struct ExportedUser {
    /// The user's row (the secret sealed, as stored).
    pub row: UserRow,
    /// The failure count.
    pub failures: i64,
    /// Until when the user is locked out, Unix ms.
    pub locked_until_ms: i64,
    /// The last accepted TOTP step.
    pub last_step: Option<i64>,
}

/// Everything a registry holds, as stored: users with their sealed secrets, lockout and
/// single-use state, every device binding (active and revoked, in binding order), roles and
/// session records. Read in one consistent read ([`crate::SqliteRegistry::export`]); the
/// secrets stay sealed under the registry key, so that a copy to another backend under the
/// same key needs no plain secret anywhere.
#[derive(Debug, Clone, Default)]
pub struct RegistryExport {
    /// The users, by name.
    pub users: Vec<ExportedUser>,
    /// The device bindings, in the order they were made.
    pub devices: Vec<DeviceRow>,
    /// `(user, role)` pairs.
    pub roles: Vec<(String, String)>,
    /// The session records.
    pub sessions: Vec<SessionRow>,
}
