//! [`MemoryRegistry`]: every store trait, in memory.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use crate::store::{
    Admin, Committed, Effects, GateStore, Need, SessionNeed, SessionStore, Snapshot, StoreFuture,
    UserState, ready,
};
use crate::{
    DeviceFingerprint, DeviceRecord, LockState, RegistryError, SessionId, SessionRecord,
    TotpConfig, UserRecord, check_name, normalize_roles,
};

#[derive(Default)]
struct MemoryState {
    users: HashMap<String, (UserRecord, Option<u64>, LockState)>,
    roles: HashMap<String, Vec<String>>,
    devices: Vec<DeviceRecord>,
    sessions: HashMap<SessionId, SessionRecord>,
    /// The sessions by expiry, so that forgetting the expired ones reads only those.
    by_expiry: BTreeSet<(u64, SessionId)>,
}

/// A registry held in memory: for tests, examples and embedding without a database.
///
/// ```
/// use portcullis_core::*;
/// let registry = MemoryRegistry::new();
/// let totp = TotpConfig::new(vec![7; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
/// registry.add_user("alice", totp, 0).unwrap();
/// let fp = DeviceFingerprint::from_bytes([1; 32]);
/// registry.bind_device("laptop", "alice", &fp, 0).unwrap();
/// assert_eq!(registry.device_by_fingerprint(&fp).unwrap().unwrap().user, "alice");
///
/// // The accept path: one snapshot, one conditional commit.
/// let accept = Effects::AcceptStep {
///     user: "alice".into(),
///     step: 10,
///     now_ms: 300_000,
///     lockout: LockoutPolicy::default(),
///     session: None,
/// };
/// let commit = |effects| registry.commit_now(effects).unwrap();
/// assert_eq!(commit(&accept), Committed::Applied);
/// assert!(matches!(commit(&accept), Committed::StepTaken(_)));
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

impl MemoryRegistry {
    /// [`GateStore::commit`], at once (the memory registry never waits).
    pub fn commit_now(&self, effects: &Effects) -> Result<Committed, RegistryError> {
        self.with(|s| commit(s, effects))
    }

    /// [`GateStore::snapshot`], at once (the memory registry never waits).
    pub fn snapshot_now(&self, need: &Need) -> Result<Snapshot, RegistryError> {
        self.with(|s| Ok(snapshot(s, need)))
    }
}

fn snapshot(s: &MemoryState, need: &Need) -> Snapshot {
    let device = newest(
        s.devices
            .iter()
            .filter(|d| d.fingerprint == need.fingerprint),
    );
    let user = device.as_ref().and_then(|d| {
        let (record, last_step, lock) = s.users.get(&d.user)?;
        Some(UserState {
            name: record.name.clone(),
            totp: if need.secret {
                record.totp.clone()
            } else {
                None
            },
            has_totp: record.totp.is_some(),
            service: record.service,
            created_ms: record.created_ms,
            lock: *lock,
            last_step: *last_step,
            roles: s.roles.get(&d.user).cloned().unwrap_or_default(),
        })
    });
    let session = match need.session {
        SessionNeed::None => None,
        SessionNeed::ById(id) => s.sessions.get(&id).cloned(),
        SessionNeed::LiveForDevice => live_session(s, &need.fingerprint, need.now_ms),
    };
    Snapshot {
        device,
        user,
        session,
    }
}

fn commit(s: &mut MemoryState, effects: &Effects) -> Result<Committed, RegistryError> {
    let Some((user, now_ms, lockout)) = effects.target() else {
        return Ok(Committed::Applied);
    };
    if let Effects::AcceptStep {
        session: Some(session),
        ..
    } = effects
        && s.sessions.contains_key(&session.id)
    {
        return Err(RegistryError::AlreadyExists(format!(
            "session {}",
            session.id
        )));
    }
    let (_, last, lock) = s
        .users
        .get_mut(user)
        .ok_or_else(|| RegistryError::NotFound(format!("user {user}")))?;
    if lock.remaining_ms(now_ms).is_some() {
        return Ok(Committed::LockedOut(*lock));
    }
    match effects {
        Effects::AcceptStep { step, session, .. } => {
            if last.is_some_and(|l| l >= *step) {
                // A reused code is no guess of the secret: nothing is charged.
                return Ok(Committed::StepTaken(*lock));
            }
            *last = Some(*step);
            *lock = LockState::default();
            if let Some(session) = session {
                // Expired records are of no use any more: forget them while here.
                while let Some(&(expires_ms, id)) = s.by_expiry.first()
                    && expires_ms <= session.totp_time_ms
                {
                    s.by_expiry.pop_first();
                    s.sessions.remove(&id);
                }
                s.by_expiry.insert((session.expires_ms, session.id));
                s.sessions.insert(session.id, session.clone());
            }
        }
        _ => *lock = lockout.after_failure(*lock, now_ms),
    }
    Ok(Committed::Applied)
}

fn live_session(
    s: &MemoryState,
    fingerprint: &DeviceFingerprint,
    now_ms: u64,
) -> Option<SessionRecord> {
    let device = newest(
        s.devices
            .iter()
            .filter(|d| &d.fingerprint == fingerprint && !d.is_revoked()),
    )?;
    s.sessions
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
        .cloned()
}

impl GateStore for MemoryRegistry {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        ready(self.snapshot_now(need))
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        ready(self.commit_now(effects))
    }
}

impl SessionStore for MemoryRegistry {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.with(|s| Ok(s.sessions.get(id).cloned()))
    }

    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        self.with(|s| Ok(live_session(s, fingerprint, now_ms)))
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
}

impl Admin for MemoryRegistry {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.with(|s| Ok(s.users.get(name).map(|(u, _, _)| u.clone())))
    }

    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.with(|s| Ok(s.users.get(user).map(|(_, _, l)| *l).unwrap_or_default()))
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
