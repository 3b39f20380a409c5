//! The registry: who the users are, which device certificates are bound to them, and the state
//! the gate must keep per user (last accepted TOTP step, lockout).
//!
//! The gate only needs the [`Registry`] trait. [`MemoryRegistry`] keeps everything in memory
//! (tests, examples); `portcullis-store` implements the same trait on SQLite.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{DeviceFingerprint, LockState, SessionId, TotpConfig};

/// A user known to the registry.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// The user name, 1..=128 bytes of UTF-8.
    pub name: String,
    /// The user's TOTP parameters; `None` means the user has no second factor yet, and every
    /// code is refused.
    pub totp: Option<TotpConfig>,
    /// When the user was added, Unix ms.
    pub created_ms: u64,
    /// Whether the user is a service account: it has no TOTP, its bound devices are exempt
    /// from the second factor (the device key is its factor), and it may call only the methods
    /// a policy rule grants it by name or role.
    pub service: bool,
}

/// A device certificate bound to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device name, unique among devices that are not revoked.
    pub name: String,
    /// The user it is bound to.
    pub user: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub fingerprint: DeviceFingerprint,
    /// When it was bound, Unix ms. Session tickets earned before this time do not work.
    pub created_ms: u64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

impl DeviceRecord {
    /// Whether the binding was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }
}

/// A session that a TOTP check earned (PROTOCOL.md section 6), as the server records it: the
/// ticket carries the same id, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id, also sealed in the ticket.
    pub id: SessionId,
    /// The user the TOTP check was made for.
    pub user: String,
    /// The device the TOTP check was made from.
    pub fingerprint: DeviceFingerprint,
    /// When the TOTP check succeeded, Unix ms.
    pub totp_time_ms: u64,
    /// When the session stops working, Unix ms.
    pub expires_ms: u64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

impl SessionRecord {
    /// Whether the session works at `now_ms`: not revoked and not expired.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms > now_ms
    }
}

/// What went wrong in a registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The named user or device does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The user, device name or fingerprint is already taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A name or value the registry does not take.
    #[error("invalid {0}")]
    Invalid(String),
    /// The backend failed (I/O, a corrupt or foreign database, ...).
    #[error("registry: {0}")]
    Backend(String),
}

/// Checks a user or device name: 1..=128 bytes of UTF-8 without control characters.
pub fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(RegistryError::Invalid(format!(
            "{kind} name: use 1 to 128 bytes of UTF-8 without control characters"
        )));
    }
    Ok(())
}

/// Checks a role name: 1..=64 bytes of ASCII letters, digits, `-`, `_`, `.` or `:`.
pub fn check_role(role: &str) -> Result<(), RegistryError> {
    if role.is_empty()
        || role.len() > 64
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(RegistryError::Invalid(format!(
            "role {role:?}: use 1 to 64 ASCII letters, digits, '-', '_', '.' or ':'"
        )));
    }
    Ok(())
}

/// Checks roles with [`check_role`] and returns them sorted, each once.
pub fn normalize_roles(roles: &[String]) -> Result<Vec<String>, RegistryError> {
    for role in roles {
        check_role(role)?;
    }
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Users, devices and per-user gate state.
///
/// Implementations must be safe to share between connections: the gate calls these methods from
/// many tasks at once. Every method that changes state must be atomic, in particular
/// [`Registry::advance_totp_step`], which decides that a code is used once.
pub trait Registry: Send + Sync {
    /// The device bound with this fingerprint: the active binding if there is one, else the most
    /// recently revoked one, else `None`.
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError>;

    /// The active device with this name, else the most recently revoked one with it.
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError>;

    /// The user with this name.
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError>;

    /// Records `step` as the user's last accepted TOTP step if it is later than the one stored,
    /// atomically. Returns `true` when it was recorded (the code is accepted), `false` when the
    /// stored step is the same or later (the code was already used).
    fn advance_totp_step(&self, user: &str, step: u64) -> Result<bool, RegistryError>;

    /// Like [`Registry::advance_totp_step`], and when the step is recorded also clears the
    /// user's lockout state (a success clears the failure count), as one atomic change where
    /// the backend can. The default makes two calls.
    fn accept_totp_step(&self, user: &str, step: u64) -> Result<bool, RegistryError> {
        if !self.advance_totp_step(user, step)? {
            return Ok(false);
        }
        self.update_lock_state(user, &mut |_| LockState::default())?;
        Ok(true)
    }

    /// The user's lockout state.
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError>;

    /// Replaces the user's lockout state by `update(current)`, atomically, and returns the new
    /// state.
    fn update_lock_state(
        &self,
        user: &str,
        update: &mut dyn FnMut(LockState) -> LockState,
    ) -> Result<LockState, RegistryError>;

    /// Whether the session with this id is recorded and was revoked. A session without a
    /// record is not reported as revoked, but the gate refuses its ticket anyway (it needs a
    /// live record). The default asks [`Registry::session`].
    fn is_session_revoked(&self, id: &SessionId) -> Result<bool, RegistryError> {
        Ok(self.session(id)?.is_some_and(|s| s.revoked_ms.is_some()))
    }

    /// Marks the recorded session with this id revoked at `now_ms`, and returns the record as
    /// it is now. A session revoked before keeps its first revocation time. `NotFound` when
    /// there is no such record (never recorded, or expired and forgotten).
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError>;

    /// Records a session the gate issued. Registries that keep no session records accept and
    /// forget it (then sessions cannot be listed, tickets are refused, and standard clients find
    /// no live session). A record with the id of one already kept is `AlreadyExists`.
    /// Implementations may forget records that expired by `session.totp_time_ms` meanwhile.
    fn record_session(&self, session: &SessionRecord) -> Result<(), RegistryError> {
        let _ = session;
        Ok(())
    }

    /// The recorded session with this id.
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        let _ = id;
        Ok(None)
    }

    /// The most recent live session (not revoked, not expired at `now_ms`) of the active
    /// binding of this device, if any: what lets a standard gRPC client in (PROTOCOL.md
    /// section 7). The default finds none, which fails closed.
    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        let _ = (fingerprint, now_ms);
        Ok(None)
    }

    /// Recorded sessions that have not expired at `now_ms`, revoked ones included, newest
    /// first.
    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        let _ = now_ms;
        Ok(Vec::new())
    }

    /// The roles of a user (for per-method policy). The default: none.
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        let _ = user;
        Ok(Vec::new())
    }

    /// Replaces the roles of a user (duplicates are kept once, the order is by name; an empty
    /// list clears them). Each role is checked with [`check_role`]. `NotFound` when there is no
    /// such user. The default refuses: the registry keeps no roles.
    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        let _ = (user, roles);
        Err(RegistryError::Invalid(
            "roles: this registry does not keep roles".into(),
        ))
    }

    /// Adds a service account: a user without TOTP whose devices are exempt from the second
    /// factor ([`UserRecord::service`]). The default refuses: the registry keeps no service
    /// accounts.
    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        let _ = (name, now_ms);
        Err(RegistryError::Invalid(
            "service account: this registry does not keep service accounts".into(),
        ))
    }

    /// Adds a user with TOTP parameters.
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError>;

    /// Binds a device certificate (by fingerprint) to a user under a name.
    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError>;

    /// Revokes the active device with this name, and in the same change every session of its
    /// fingerprint that is not revoked yet.
    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError>;

    /// Revokes every active device bound to the user, and returns them (none when the user has
    /// no active device). With its devices, the user's sessions are revoked and a server
    /// closes the user's live connections. The user stays enrolled: binding a device to the user
    /// again lets them in again. `NotFound` when there is no such user.
    ///
    /// The default revokes the devices (and with each its sessions) one by one; backends override
    /// it to revoke devices and sessions in one atomic change.
    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        if self.user(user)?.is_none() {
            return Err(RegistryError::NotFound(format!("user {user}")));
        }
        let mut revoked = Vec::new();
        for device in self.list_devices()? {
            if device.user == user && !device.is_revoked() {
                match self.revoke_device(&device.name, now_ms) {
                    Ok(record) => revoked.push(record),
                    // Revoked meanwhile by someone else: the outcome is the same.
                    Err(RegistryError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(revoked)
    }

    /// All users, by name.
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError>;

    /// All device bindings, active and revoked, by name then binding time.
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError>;
}

#[derive(Default)]
struct MemoryState {
    users: HashMap<String, (UserRecord, Option<u64>, LockState)>,
    roles: HashMap<String, Vec<String>>,
    devices: Vec<DeviceRecord>,
    sessions: HashMap<SessionId, SessionRecord>,
}

/// A registry held in memory: for tests, examples and embedding without a database.
///
/// ```
/// use portcullis_core::{DeviceFingerprint, MemoryRegistry, Registry, TotpAlgorithm, TotpConfig};
/// let registry = MemoryRegistry::new();
/// let totp = TotpConfig::new(vec![7; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
/// registry.add_user("alice", totp, 0).unwrap();
/// let fp = DeviceFingerprint::from_bytes([1; 32]);
/// registry.bind_device("laptop", "alice", &fp, 0).unwrap();
/// assert_eq!(registry.device_by_fingerprint(&fp).unwrap().unwrap().user, "alice");
/// assert!(registry.advance_totp_step("alice", 10).unwrap());
/// assert!(!registry.advance_totp_step("alice", 10).unwrap());
/// ```
#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<MemoryState>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut MemoryState) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut guard = self
            .state
            .lock()
            .map_err(|_| RegistryError::Backend("memory registry lock poisoned".into()))?;
        f(&mut guard)
    }
}

/// Sorts session records newest first: by TOTP time, then expiry, then id (all descending).
fn sort_newest_first(sessions: &mut [SessionRecord]) {
    sessions.sort_by(|a, b| {
        b.totp_time_ms
            .cmp(&a.totp_time_ms)
            .then(b.expires_ms.cmp(&a.expires_ms))
            .then(b.id.0.cmp(&a.id.0))
    });
}

fn newest<'a>(mut it: impl Iterator<Item = &'a DeviceRecord>) -> Option<DeviceRecord> {
    let mut best: Option<&DeviceRecord> = None;
    for d in it.by_ref() {
        best = match best {
            None => Some(d),
            Some(b) if b.is_revoked() && !d.is_revoked() => Some(d),
            Some(b) if b.is_revoked() == d.is_revoked() && d.created_ms >= b.created_ms => Some(d),
            keep => keep,
        };
    }
    best.cloned()
}

impl Registry for MemoryRegistry {
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|s| {
            Ok(newest(
                s.devices.iter().filter(|d| &d.fingerprint == fingerprint),
            ))
        })
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|s| Ok(newest(s.devices.iter().filter(|d| d.name == name))))
    }

    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.with(|s| Ok(s.users.get(name).map(|(u, _, _)| u.clone())))
    }

    fn advance_totp_step(&self, user: &str, step: u64) -> Result<bool, RegistryError> {
        self.with(|s| {
            let (_, last, _) = s
                .users
                .get_mut(user)
                .ok_or_else(|| RegistryError::NotFound(format!("user {user}")))?;
            if last.is_some_and(|l| l >= step) {
                return Ok(false);
            }
            *last = Some(step);
            Ok(true)
        })
    }

    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.with(|s| Ok(s.users.get(user).map(|(_, _, l)| *l).unwrap_or_default()))
    }

    fn update_lock_state(
        &self,
        user: &str,
        update: &mut dyn FnMut(LockState) -> LockState,
    ) -> Result<LockState, RegistryError> {
        self.with(|s| {
            let (_, _, lock) = s
                .users
                .get_mut(user)
                .ok_or_else(|| RegistryError::NotFound(format!("user {user}")))?;
            *lock = update(*lock);
            Ok(*lock)
        })
    }

    fn is_session_revoked(&self, id: &SessionId) -> Result<bool, RegistryError> {
        self.with(|s| Ok(s.sessions.get(id).is_some_and(|r| r.revoked_ms.is_some())))
    }

    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.with(|s| {
            let record = s
                .sessions
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(format!("session {}", id)))?;
            record.revoked_ms.get_or_insert(now_ms);
            Ok(record.clone())
        })
    }

    fn record_session(&self, session: &SessionRecord) -> Result<(), RegistryError> {
        self.with(|s| {
            // Expired records are of no use any more: forget them while here.
            s.sessions
                .retain(|_, r| r.expires_ms > session.totp_time_ms);
            if s.sessions.contains_key(&session.id) {
                return Err(RegistryError::AlreadyExists(format!(
                    "session {}",
                    session.id
                )));
            }
            s.sessions.insert(session.id, session.clone());
            Ok(())
        })
    }

    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.with(|s| Ok(s.sessions.get(id).cloned()))
    }

    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        self.with(|s| {
            let Some(device) = newest(
                s.devices
                    .iter()
                    .filter(|d| &d.fingerprint == fingerprint && !d.is_revoked()),
            ) else {
                return Ok(None);
            };
            Ok(s.sessions
                .values()
                .filter(|r| {
                    &r.fingerprint == fingerprint
                        && r.user == device.user
                        && r.totp_time_ms >= device.created_ms
                        && r.is_live(now_ms)
                })
                .max_by(|a, b| {
                    a.totp_time_ms
                        .cmp(&b.totp_time_ms)
                        .then(a.expires_ms.cmp(&b.expires_ms))
                        .then(a.id.0.cmp(&b.id.0))
                })
                .cloned())
        })
    }

    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        self.with(|s| {
            let mut sessions: Vec<_> = s
                .sessions
                .values()
                .filter(|r| r.expires_ms > now_ms)
                .cloned()
                .collect();
            sort_newest_first(&mut sessions);
            Ok(sessions)
        })
    }

    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        check_name("user", name)?;
        self.with(|s| {
            if s.users.contains_key(name) {
                return Err(RegistryError::AlreadyExists(format!("user {name}")));
            }
            let record = UserRecord {
                name: name.to_owned(),
                totp: Some(totp),
                created_ms: now_ms,
                service: false,
            };
            s.users
                .insert(name.to_owned(), (record, None, LockState::default()));
            Ok(())
        })
    }

    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        check_name("user", name)?;
        self.with(|s| {
            if s.users.contains_key(name) {
                return Err(RegistryError::AlreadyExists(format!("user {name}")));
            }
            let record = UserRecord {
                name: name.to_owned(),
                totp: None,
                created_ms: now_ms,
                service: true,
            };
            s.users
                .insert(name.to_owned(), (record, None, LockState::default()));
            Ok(())
        })
    }

    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        self.with(|s| Ok(s.roles.get(user).cloned().unwrap_or_default()))
    }

    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        let roles = normalize_roles(roles)?;
        self.with(|s| {
            if !s.users.contains_key(user) {
                return Err(RegistryError::NotFound(format!("user {user}")));
            }
            if roles.is_empty() {
                s.roles.remove(user);
            } else {
                s.roles.insert(user.to_owned(), roles);
            }
            Ok(())
        })
    }

    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        check_name("device", name)?;
        self.with(|s| {
            if !s.users.contains_key(user) {
                return Err(RegistryError::NotFound(format!("user {user}")));
            }
            if s.devices.iter().any(|d| !d.is_revoked() && d.name == name) {
                return Err(RegistryError::AlreadyExists(format!("device {name}")));
            }
            if let Some(d) = s
                .devices
                .iter()
                .find(|d| !d.is_revoked() && &d.fingerprint == fingerprint)
            {
                return Err(RegistryError::AlreadyExists(format!(
                    "a device with fingerprint {fingerprint} (bound as {})",
                    d.name
                )));
            }
            let record = DeviceRecord {
                name: name.to_owned(),
                user: user.to_owned(),
                fingerprint: *fingerprint,
                created_ms: now_ms,
                revoked_ms: None,
            };
            s.devices.push(record.clone());
            Ok(record)
        })
    }

    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        self.with(|s| {
            let d = s
                .devices
                .iter_mut()
                .find(|d| !d.is_revoked() && d.name == name)
                .ok_or_else(|| RegistryError::NotFound(format!("active device {name}")))?;
            d.revoked_ms = Some(now_ms);
            let device = d.clone();
            for r in s.sessions.values_mut() {
                if r.fingerprint == device.fingerprint && r.revoked_ms.is_none() {
                    r.revoked_ms = Some(now_ms);
                }
            }
            Ok(device)
        })
    }

    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.with(|s| {
            if !s.users.contains_key(user) {
                return Err(RegistryError::NotFound(format!("user {user}")));
            }
            let mut revoked = Vec::new();
            for d in s
                .devices
                .iter_mut()
                .filter(|d| !d.is_revoked() && d.user == user)
            {
                d.revoked_ms = Some(now_ms);
                revoked.push(d.clone());
            }
            for r in s.sessions.values_mut() {
                if r.user == user && r.revoked_ms.is_none() {
                    r.revoked_ms = Some(now_ms);
                }
            }
            revoked.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(revoked)
        })
    }

    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        self.with(|s| {
            let mut users: Vec<_> = s.users.values().map(|(u, _, _)| u.clone()).collect();
            users.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(users)
        })
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.with(|s| {
            let mut devices = s.devices.clone();
            devices.sort_by(|a, b| a.name.cmp(&b.name).then(a.created_ms.cmp(&b.created_ms)));
            Ok(devices)
        })
    }
}
