//! The stores, split by who uses them, and what the gate exchanges with its store.
//!
//! The gate reaches its state in four phases, the way rustls's `Acceptor` splits the handshake
//! from the I/O ([`crate::Gate`] has the details):
//!
//! 1. **plan**: from the Prefix and what TLS knows, the gate says what it must read: a [`Need`];
//! 2. **fetch**: the store reads all of it at once, in one consistent read: a [`Snapshot`]
//!    ([`GateStore::snapshot`]);
//! 3. **decide**: the gate judges the snapshot with its clock, without I/O, and says what must
//!    be written: the [`Effects`];
//! 4. **commit**: the store writes the effects as one conditional, atomic change
//!    ([`GateStore::commit`]) and says whether its condition still held: [`Committed`].
//!
//! The traits:
//!
//! - [`GateStore`]: snapshot and commit, the accept path. Its methods return futures, so that a
//!   store on a network database can be asynchronous; an embedded store returns futures that
//!   are ready at once.
//! - [`SessionStore`]: the recorded sessions (look up, the live session of a device, list,
//!   revoke).
//! - [`Admin`]: users, devices and roles: what the command line changes and lists.
//! - [`Registry`]: all three, the shape of a complete backend ([`crate::MemoryRegistry`],
//!   `portcullis-store`'s SQLite registry). Every backend passes the conformance suite of the
//!   `test-util` feature (the `conformance` module).
//!
//! No method has a default that drops data or skips a check: a backend implements each one.

use std::future::Future;
use std::pin::Pin;

use crate::{
    DeviceFingerprint, DeviceRecord, LockState, LockoutPolicy, RegistryError, SessionId,
    SessionRecord, TotpConfig, UserRecord,
};

/// A store's answer to come: boxed so that the traits stay usable as `dyn` objects, `Send` so
/// that a server may await it on any worker.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// A future that is ready at once with `value`: what an embedded store returns.
pub fn ready<'a, T: Send + 'a>(value: Result<T, RegistryError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

/// Which session the gate must read with the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionNeed {
    /// None.
    None,
    /// The recorded session with this id (the one a ticket names).
    ById(SessionId),
    /// The newest live session of the device's active binding, earned by its user since it was
    /// bound (what lets a standard gRPC client in: PROTOCOL.md section 7).
    LiveForDevice,
}

/// What the gate must read to decide one connection (phase 1, plan).
///
/// Everything hangs off the device: the user read is always the one the device is bound to
/// (a Prefix that claims another user is refused on the device alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The client certificate's fingerprint.
    pub fingerprint: DeviceFingerprint,
    /// Whether the user's TOTP secret is needed (a code is to be checked). When `false`, the
    /// store need not open it, and [`UserState::totp`] may be `None` for a user who has one.
    pub secret: bool,
    /// Which session to read.
    pub session: SessionNeed,
    /// The time of the decision, Unix ms (for [`SessionNeed::LiveForDevice`]).
    pub now_ms: u64,
}

/// A user as the gate sees them: the record, the lockout and single-use state, and the roles.
#[derive(Debug, Clone)]
pub struct UserState {
    /// The user name.
    pub name: String,
    /// The TOTP parameters, when [`Need::secret`] asked for them and the user has a factor.
    pub totp: Option<TotpConfig>,
    /// Whether the user has a TOTP factor at all (whether or not it was read).
    pub has_totp: bool,
    /// Whether the user is a service account ([`UserRecord::service`]).
    pub service: bool,
    /// When the user was added, Unix ms.
    pub created_ms: u64,
    /// The lockout state.
    pub lock: LockState,
    /// The last accepted TOTP step, if any.
    pub last_step: Option<u64>,
    /// The user's roles, sorted.
    pub roles: Vec<String>,
}

/// What the store read for one [`Need`], in one consistent read (phase 2, fetch).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The binding of the fingerprint: the active one if there is one, else the most recently
    /// revoked one, else `None`.
    pub device: Option<DeviceRecord>,
    /// The user the device is bound to, if the device was found and the user exists.
    pub user: Option<UserState>,
    /// The session asked for, if recorded (for [`SessionNeed::LiveForDevice`], only a live one
    /// of the active binding).
    pub session: Option<SessionRecord>,
}

/// What the decision writes (phase 3's output, phase 4's input): one conditional, atomic change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effects {
    /// Nothing: a refusal that charges nothing, a session ticket, a service account.
    None,
    /// A TOTP code matched `step`. Atomically: if the user is locked out at `now_ms`, change
    /// nothing ([`Committed::LockedOut`]); else if `step` is later than the last accepted step,
    /// record it, clear the failure count and record `session` ([`Committed::Applied`]); else
    /// (the step was taken meanwhile) change nothing ([`Committed::StepTaken`]): a code that
    /// was already accepted is no guess of the secret, and is not charged.
    AcceptStep {
        /// The user.
        user: String,
        /// The matching time step.
        step: u64,
        /// The time of the decision, Unix ms.
        now_ms: u64,
        /// The lockout policy, should a failure be charged.
        lockout: LockoutPolicy,
        /// The session to record with the step (`None` when sessions are off or the
        /// connection policy refused the connection).
        session: Option<SessionRecord>,
    },
    /// A failed code. Atomically: if the user is locked out at `now_ms`, change nothing
    /// ([`Committed::LockedOut`]); else replace the lockout state by
    /// [`LockoutPolicy::after_failure`] of it ([`Committed::Applied`]).
    ChargeFailure {
        /// The user.
        user: String,
        /// The time of the decision, Unix ms.
        now_ms: u64,
        /// The lockout policy.
        lockout: LockoutPolicy,
    },
}

impl Effects {
    /// Whether there is anything to write.
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// The user whose state the effects change, the time of the decision and the lockout
    /// policy, should a failure be charged; `None` for [`Effects::None`].
    pub fn target(&self) -> Option<(&str, u64, LockoutPolicy)> {
        match self {
            Self::None => None,
            Self::AcceptStep {
                user,
                now_ms,
                lockout,
                ..
            }
            | Self::ChargeFailure {
                user,
                now_ms,
                lockout,
            } => Some((user, *now_ms, *lockout)),
        }
    }
}

/// What a commit found (phase 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The effects were written as decided.
    Applied,
    /// [`Effects::AcceptStep`] lost its condition: the step had been taken meanwhile. Nothing
    /// was written; the lockout state is this.
    StepTaken(LockState),
    /// The user was locked out at the decision's time: nothing was written. The lockout state
    /// is this.
    LockedOut(LockState),
}

/// What the accept path needs: one read and one conditional write per connection.
///
/// Both return futures, so that a store on a network database can be asynchronous. Both must be
/// safe to call from many connections at once; [`GateStore::commit`] must be atomic, in
/// particular in deciding that a TOTP step is used once across every process that shares the
/// store.
pub trait GateStore: Send + Sync {
    /// Reads everything `need` names, in one consistent read.
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot>;

    /// Applies `effects` as one atomic, conditional change. A user that does not exist is
    /// [`RegistryError::NotFound`]; a session id that is already recorded is
    /// [`RegistryError::AlreadyExists`] and nothing is written.
    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed>;

    /// The store's change log, for a server's revocation round: what was revoked or changed
    /// after the change numbered `after`, so that a round re-reads only the connections a
    /// change names instead of every live one. `None` asks only for the newest number (what a
    /// round that reads everything starts from).
    ///
    /// A store without a change log answers [`ChangeTail::Unsupported`] (the default): every
    /// round then reads every live connection's state. A store with one must record, in the
    /// transaction of the change itself and numbered in the order of commit without gaps,
    /// every revocation of a device, a user or a session and every change of a user's roles;
    /// and answer [`ChangeTail::Resync`] when it cannot say what changed since `after` (the
    /// log was pruned past it, numbers went back after a failover, or its notifications were
    /// interrupted).
    fn changes_since(&self, after: Option<u64>) -> StoreFuture<'_, ChangeTail> {
        let _ = after;
        ready(Ok(ChangeTail::Unsupported))
    }
}

/// The most changes [`GateStore::changes_since`] returns at once; a round that is further
/// behind reads everything instead.
pub const MAX_CHANGES_PER_READ: usize = 1000;

/// What [`GateStore::changes_since`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeTail {
    /// The store keeps no change log.
    Unsupported,
    /// The changes after the one asked for, in order (at most [`MAX_CHANGES_PER_READ`]);
    /// `head` is the number of the last one, or the number asked for when there is none.
    Changes {
        /// The changes, oldest first.
        changes: Vec<Change>,
        /// The number to ask after next time.
        head: u64,
    },
    /// The log cannot say what changed since the number asked for (or none was asked for):
    /// read everything, and ask after `head` next time.
    Resync {
        /// The newest change's number when the log was read (0 for an empty log).
        head: u64,
    },
}

/// One recorded change: what it names is read again by every server holding connections of
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its number in the log.
    pub seq: u64,
    /// The device whose binding was revoked.
    pub fingerprint: Option<DeviceFingerprint>,
    /// The user who was revoked or whose roles changed.
    pub user: Option<String>,
    /// The session that was revoked.
    pub session: Option<SessionId>,
}

/// The sessions the gate issued (PROTOCOL.md section 6). They are recorded by
/// [`GateStore::commit`] with the TOTP step that earned them.
pub trait SessionStore: Send + Sync {
    /// The recorded session with this id.
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError>;

    /// The most recent live session (not revoked, not expired at `now_ms`) of the active
    /// binding of this device, earned by the binding's user since it was bound.
    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError>;

    /// Recorded sessions that have not expired at `now_ms`, revoked ones included, newest
    /// first.
    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError>;

    /// Marks the recorded session with this id revoked at `now_ms`, and returns the record as
    /// it is now. A session revoked before keeps its first revocation time. `NotFound` when
    /// there is no such record (never recorded, or expired and forgotten).
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError>;
}

/// Users, devices and roles: what an operator changes and lists (the command line).
///
/// Every change is atomic.
pub trait Admin: Send + Sync {
    /// The user with this name.
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError>;

    /// The user's lockout state (the default state for a user without failures, and for a
    /// user that does not exist).
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError>;

    /// The roles of a user, sorted (none for a user without roles, and for a user that does
    /// not exist).
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError>;

    /// Replaces the roles of a user (duplicates are kept once, the order is by name; an empty
    /// list clears them). Each role is checked with [`crate::check_role`]. `NotFound` when
    /// there is no such user.
    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError>;

    /// Adds a user with TOTP parameters.
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError>;

    /// Adds a service account: a user without TOTP whose devices are exempt from the second
    /// factor ([`UserRecord::service`]).
    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError>;

    /// The device bound with this fingerprint: the active binding if there is one, else the most
    /// recently revoked one, else `None`.
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError>;

    /// The active device with this name, else the most recently revoked one with it.
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError>;

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

    /// Revokes every active device bound to the user and every session of the user, in one
    /// change, and returns the devices by name (none when the user has no active device). The
    /// user stays enrolled: binding a device to the user again lets them in again. `NotFound`
    /// when there is no such user.
    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError>;

    /// All users, by name.
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError>;

    /// All device bindings, active and revoked, by name then binding time.
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError>;
}

/// A complete backend: the accept path, the sessions and the administration.
///
/// Implemented for every type that implements the three traits.
pub trait Registry: GateStore + SessionStore + Admin {}

impl<T: GateStore + SessionStore + Admin + ?Sized> Registry for T {}
