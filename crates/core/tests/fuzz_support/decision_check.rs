//! The `decision` fuzz target, shared with the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! A [`Scenario`] is a setup and a sequence of operations against one [`Gate`] with a
//! [`MemoryRegistry`] and a [`ManualClock`]: add users, bind and revoke devices, move the clock
//! (also backwards), revoke sessions, make the random source fail, and decide Prefix frames built
//! from chosen fields (the right code for the clock or a wrong one, an earned ticket or a forged
//! one, nonces from a small set so that replays happen, times near the skew limit, the right or a
//! wrong channel binding), optionally edited on the wire.
//!
//! [`run`] keeps its own model of users, devices, nonces, lockout, used TOTP steps and issued
//! tickets, written from PROTOCOL.md sections 5 and 6, and panics when
//!
//! - an accepted connection breaks a guarantee: its device is not bound to the user or is
//!   revoked, its BINDING is not the exporter, |TIME - now| is over the skew, its nonce was
//!   accepted before within the retention time, its TOTP code is not valid for the clock or its
//!   time step is not later than every step accepted before for the user, its ticket was never
//!   issued for this user and device or is expired or revoked, or the user is locked out (in the
//!   model, and the plain rule: 5 consecutive failed codes, then nothing within 30 s);
//! - any decision differs from the model's (reject code, internal cause, RETRY_AFTER, identity);
//! - a Verdict breaks section 4 (status, REASON, fields, round trip) or shows a code or ticket;
//! - a phase does what it should not: phase 1 decides a frame that needs stored state or reads
//!   for one that does not, the [`Need`] asks for the wrong device, secret or session, or the
//!   [`Effects`] to commit differ from the model's (one failure charged for a wrong code, the
//!   step and the session for a good code, nothing otherwise: a reused code is not charged).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use portcullis_core::codec::{Factor, HEADER_LEN, Prefix};
use portcullis_core::store::ready;
use portcullis_core::{
    Admin, AuthMethod, Clock, Committed, ConnectionFacts, Decision, DeviceFingerprint,
    DeviceRecord, Effects, Gate, GateConfig, GateStore, Identity, LockState, LockoutPolicy,
    ManualClock, MemoryRegistry, Need, Planned, Random, RandomError, RegistryError, RejectCode,
    SessionId, SessionNeed, SessionRecord, SessionStore, Snapshot, StoreFuture, TicketKey,
    TotpAlgorithm, TotpConfig, UserRecord,
};

/// Runs a future that must be ready at once: the core has no runtime, and the memory
/// registry's futures never wait.
fn at_once<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a memory registry future was not ready at once"),
    }
}

/// The clock at the start of a scenario (plus [`Setup::start_s`] seconds); also the TIME of the
/// section 8 vector.
pub const T0: u64 = 1_700_000_000_000;
/// Every connection's exporter: the BINDING of the section 8 vector.
pub const EXPORTER: [u8; 32] = [0xab; 32];
/// The users a scenario can name.
pub const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// The device names a scenario can use.
pub const DEVICES: [&str; 4] = ["laptop", "phone", "desk", "tablet"];
/// Device fingerprints; their hex is all letters, so a REASON naming one holds no digits.
pub const FINGERPRINTS: [[u8; 32]; 5] =
    [[0xaa; 32], [0xbb; 32], [0xcc; 32], [0xdd; 32], [0xee; 32]];
/// The user the optional connection policy refuses.
pub const DENIED_USER: &str = "carol";
/// Operations run per scenario at most (keeps every input fast).
pub const MAX_OPS: usize = 256;
/// The lockout rule checked on its own: this many consecutive failed codes ...
pub const LOCK_AFTER: usize = 5;
/// ... lock the user for at least this long.
pub const FIRST_LOCK_MS: u64 = 30_000;

/// One fuzz input.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The gate's settings and the starting state.
    pub setup: Setup,
    /// What happens, in order.
    pub ops: Vec<Op>,
}

/// The gate's settings and the starting state.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The allowed clock skew.
    pub skew: Skew,
    /// Session tickets on or off, and their lifetime.
    pub sessions: Sessions,
    /// A nonce store of 3 entries (else the default million).
    pub small_nonce_store: bool,
    /// A connection policy that refuses [`DENIED_USER`].
    pub policy: bool,
    /// Start with alice (6 digits) bound on the laptop (fingerprint 0) and bob (8 digits) on
    /// the desk (fingerprint 1).
    pub preset: bool,
    /// Seconds after [`T0`] at which the clock starts.
    pub start_s: u16,
}

/// The allowed clock skew.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    /// 0 ms.
    Zero,
    /// 1 s.
    OneSecond,
    /// 60 s, the default.
    Default,
    /// 5 minutes.
    FiveMinutes,
}

impl Skew {
    fn ms(self) -> u64 {
        match self {
            Self::Zero => 0,
            Self::OneSecond => 1_000,
            Self::Default => 60_000,
            Self::FiveMinutes => 300_000,
        }
    }
}

/// Session tickets.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// Off.
    Off,
    /// On, living 1 to 256 seconds.
    Seconds(u8),
    /// On, living 1 hour (the default).
    OneHour,
}

impl Sessions {
    fn ttl_ms(self) -> Option<u64> {
        match self {
            Self::Off => None,
            Self::Seconds(s) => Some((u64::from(s) + 1) * 1000),
            Self::OneHour => Some(3_600_000),
        }
    }
}

/// One operation.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Adds `USERS[user % 4]` with 6 + `digits % 3` digits and a secret made of `secret`.
    AddUser {
        /// Index into [`USERS`].
        user: u8,
        /// 6, 7 or 8 digits.
        digits: u8,
        /// The secret's byte; also picks its length and hash.
        secret: u8,
    },
    /// Binds `DEVICES[device % 4]` with `FINGERPRINTS[fingerprint % 5]` to `USERS[user % 4]`.
    Bind {
        /// Index into [`DEVICES`].
        device: u8,
        /// Index into [`USERS`].
        user: u8,
        /// Index into [`FINGERPRINTS`].
        fingerprint: u8,
    },
    /// Revokes the active device `DEVICES[device % 4]`.
    Revoke {
        /// Index into [`DEVICES`].
        device: u8,
    },
    /// Moves the clock forward.
    Advance(Advance),
    /// Steps the clock back.
    StepBack {
        /// Seconds.
        seconds: u8,
    },
    /// Decides a Prefix built from chosen fields, edited on the wire.
    Decide {
        /// The fields.
        attempt: Attempt,
        /// The edit of the encoded frame.
        edit: Edit,
    },
    /// Decides raw bytes from the device with fingerprint 0.
    Raw(Vec<u8>),
    /// Revokes the session of an issued ticket.
    RevokeSession {
        /// Index into the issued tickets.
        ticket: u8,
    },
    /// Drops expired nonces.
    Purge,
    /// Makes the random source fail, or work again.
    RandomFails(bool),
}

/// A forward move of the clock.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// Milliseconds.
    Millis(u16),
    /// Seconds.
    Seconds(u8),
    /// 30-second steps.
    Steps(u8),
    /// Minutes.
    Minutes(u8),
    /// Hours.
    Hours(u8),
}

impl Advance {
    fn ms(self) -> u64 {
        match self {
            Self::Millis(n) => u64::from(n),
            Self::Seconds(n) => u64::from(n) * 1000,
            Self::Steps(n) => u64::from(n) * 30_000,
            Self::Minutes(n) => u64::from(n) * 60_000,
            Self::Hours(n) => u64::from(n) * 3_600_000,
        }
    }
}

/// The fields of one Prefix.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// USER.
    pub user: UserChoice,
    /// TOTP or SESSION.
    pub factor: FactorChoice,
    /// NONCE.
    pub nonce: NonceChoice,
    /// TIME.
    pub time: TimeChoice,
    /// BINDING.
    pub binding: BindingChoice,
    /// The connection's client certificate: `FINGERPRINTS[fingerprint % 5]`.
    pub fingerprint: u8,
    /// AGENT, as lossy UTF-8.
    pub agent: Option<Vec<u8>>,
}

/// USER.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum UserChoice {
    /// `USERS[i % 4]`.
    Known(u8),
    /// Any bytes, as lossy UTF-8.
    Raw(Vec<u8>),
}

/// TOTP or SESSION.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum FactorChoice {
    /// A TOTP code.
    Totp(CodeChoice),
    /// A session ticket.
    Session(TicketChoice),
}

/// A TOTP code.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum CodeChoice {
    /// The claimed user's code for the clock.
    Current,
    /// The claimed user's code this many periods away from the clock.
    Steps(i8),
    /// Another user's code for the clock.
    OtherUser(u8),
    /// A code accepted earlier (for any user).
    Used(u8),
    /// Any digits: `value` on 6 + `len % 3` digits.
    Digits {
        /// The number.
        value: u32,
        /// 6, 7 or 8 digits.
        len: u8,
    },
}

/// A session ticket.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum TicketChoice {
    /// One the gate issued.
    Earned(u8),
    /// One the gate issued, with one byte changed.
    Tampered {
        /// Index into the issued tickets.
        ticket: u8,
        /// Which byte.
        at: u16,
        /// XOR mask.
        xor: u8,
    },
    /// One the gate issued, cut short.
    Truncated {
        /// Index into the issued tickets.
        ticket: u8,
        /// Bytes kept.
        keep: u16,
    },
    /// Any bytes.
    Raw(Vec<u8>),
}

/// NONCE.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceChoice {
    /// One of 6 nonces, to make replays.
    Small(u8),
    /// A nonce never used before in the scenario.
    Fresh,
    /// Any 16 bytes.
    Raw([u8; 16]),
}

/// TIME.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeChoice {
    /// The server clock.
    Now,
    /// The server clock plus some milliseconds.
    Offset(i32),
    /// Exactly the allowed skew ahead.
    EdgeAhead,
    /// Exactly the allowed skew behind.
    EdgeBehind,
    /// One millisecond past the skew, ahead.
    OutAhead,
    /// One millisecond past the skew, behind.
    OutBehind,
    /// Any time.
    Absolute(u64),
}

/// BINDING.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingChoice {
    /// The exporter.
    Right,
    /// 32 times this byte (right only for 0xab).
    Wrong(u8),
    /// Any 32 bytes.
    Raw([u8; 32]),
}

/// An edit of the encoded frame.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// None.
    None,
    /// Keep `n % (len + 1)` bytes.
    Truncate(u16),
    /// XOR one byte.
    Flip {
        /// Which byte (modulo the length).
        at: u16,
        /// XOR mask.
        xor: u8,
    },
    /// Append a field with this tag and `len` bytes, fixing the body length.
    Field {
        /// Any tag: an extension (0x80 and above), an unknown critical one, or a repeat.
        tag: u8,
        /// Value length.
        len: u8,
    },
    /// Append bytes after the frame (pipelined data: the frame no longer stands alone).
    Append(Vec<u8>),
    /// Overwrite the header's body length.
    Length(u16),
}

/// Replays one scenario; panics on the first broken guarantee or divergence from the model.
/// Returns the outcome of each decision: `accept_totp`, `accept_session`, or the internal cause
/// of the refusal (`code_wrong`, `nonce_replay`, ...).
pub fn run(scenario: &Scenario) -> Vec<&'static str> {
    run_with(scenario, Fault::None)
}

/// A registry bug to plant, to show that the checks catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The registry works.
    None,
    /// Every TOTP step is recorded as new: a used code works again.
    ReusableCodes,
    /// Revoked device bindings, and the sessions revoked with them, look active.
    IgnoreRevocation,
    /// The lockout state is never stored.
    NoLockout,
}

/// [`run`] against a registry with a planted bug.
pub fn run_with(scenario: &Scenario, fault: Fault) -> Vec<&'static str> {
    let mut h = Harness::new(&scenario.setup, fault);
    if scenario.setup.preset {
        h.apply(
            0,
            &Op::AddUser {
                user: 0,
                digits: 0,
                secret: 0x11,
            },
        );
        h.apply(
            0,
            &Op::AddUser {
                user: 1,
                digits: 2,
                secret: 0x22,
            },
        );
        h.apply(
            0,
            &Op::Bind {
                device: 0,
                user: 0,
                fingerprint: 0,
            },
        );
        h.apply(
            0,
            &Op::Bind {
                device: 2,
                user: 1,
                fingerprint: 1,
            },
        );
    }
    for (i, op) in scenario.ops.iter().take(MAX_OPS).enumerate() {
        h.apply(i, op);
    }
    h.outcomes
}

/// A [`MemoryRegistry`], with a bug when asked.
struct FaultyRegistry {
    inner: MemoryRegistry,
    fault: Fault,
    /// For [`Fault::ReusableCodes`]: the step written in place of an accepted one, newer than
    /// every step written before, so that the commit's condition always holds.
    fake_step: AtomicU64,
}

impl GateStore for FaultyRegistry {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        let snapshot = self.inner.snapshot_now(need).map(|mut s| {
            match self.fault {
                Fault::None => {}
                Fault::ReusableCodes => {
                    if let Some(user) = &mut s.user {
                        user.last_step = None;
                    }
                }
                Fault::IgnoreRevocation => {
                    if let Some(device) = &mut s.device {
                        device.revoked_ms = None;
                    }
                    if let Some(session) = &mut s.session {
                        session.revoked_ms = None;
                    }
                }
                Fault::NoLockout => {
                    if let Some(user) = &mut s.user {
                        user.lock = LockState::default();
                    }
                }
            }
            s
        });
        ready(snapshot)
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        let committed = match (self.fault, effects) {
            (Fault::NoLockout, Effects::ChargeFailure { .. }) => Ok(Committed::Applied),
            (
                Fault::ReusableCodes,
                Effects::AcceptStep {
                    user,
                    now_ms,
                    lockout,
                    session,
                    ..
                },
            ) => self.inner.commit_now(&Effects::AcceptStep {
                user: user.clone(),
                step: self.fake_step.fetch_add(1, Ordering::SeqCst) + 1,
                now_ms: *now_ms,
                lockout: *lockout,
                session: session.clone(),
            }),
            _ => self.inner.commit_now(effects),
        };
        ready(committed)
    }
}

impl SessionStore for FaultyRegistry {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        let record = self.inner.session(id)?;
        Ok(match self.fault {
            Fault::IgnoreRevocation => record.map(|r| SessionRecord {
                revoked_ms: None,
                ..r
            }),
            _ => record,
        })
    }
    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        self.inner.live_session_for_device(fingerprint, now_ms)
    }
    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        self.inner.list_sessions(now_ms)
    }
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.inner.revoke_session(id, now_ms)
    }
}

impl Admin for FaultyRegistry {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.inner.user(name)
    }
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        match self.fault {
            Fault::NoLockout => Ok(LockState::default()),
            _ => self.inner.lock_state(user),
        }
    }
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        self.inner.user_roles(user)
    }
    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        self.inner.set_user_roles(user, roles)
    }
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        self.inner.add_user(name, totp, now_ms)
    }
    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.inner.add_service_user(name, now_ms)
    }
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        let device = self.inner.device_by_fingerprint(fingerprint)?;
        Ok(match self.fault {
            Fault::IgnoreRevocation => device.map(|d| DeviceRecord {
                revoked_ms: None,
                ..d
            }),
            _ => device,
        })
    }
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.inner.device_by_name(name)
    }
    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        self.inner.bind_device(name, user, fingerprint, now_ms)
    }
    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        self.inner.revoke_device(name, now_ms)
    }
    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.inner.revoke_user(user, now_ms)
    }
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        self.inner.list_users()
    }
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.inner.list_devices()
    }
}

/// A random source from a counter (runs are reproducible) that can be made to fail.
struct CountingRandom {
    counter: AtomicU64,
    failing: AtomicBool,
}

impl Random for CountingRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), RandomError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(RandomError);
        }
        for chunk in dest.chunks_mut(8) {
            // splitmix64
            let mut z = self
                .counter
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::SeqCst)
                .wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

fn totp_for(user: u8, digits: u8, secret: u8) -> TotpConfig {
    let algorithm = match secret % 3 {
        0 => TotpAlgorithm::Sha1,
        1 => TotpAlgorithm::Sha256,
        _ => TotpAlgorithm::Sha512,
    };
    // The user's index is mixed in: two users never share a secret by accident.
    let mut bytes = vec![secret; 16 + usize::from(secret % 8)];
    bytes[0] = user;
    TotpConfig::new(bytes, 6 + digits % 3, algorithm, 30).expect("valid TOTP parameters")
}

/// The model's view of a user.
struct ModelUser {
    totp: TotpConfig,
    last_step: Option<u64>,
    failures: u32,
    locked_until: u64,
    /// Times of the consecutive failed codes since the last accepted one.
    streak: Vec<u64>,
}

/// The last binding of a fingerprint (an active one is always the last).
struct ModelDevice {
    name: &'static str,
    user: &'static str,
    created_ms: u64,
    revoked: bool,
}

/// A ticket the gate issued.
struct Issued {
    ticket: Vec<u8>,
    id: SessionId,
    user: String,
    fingerprint: usize,
    totp_time_ms: u64,
    expires_ms: u64,
    /// The registry forgot its record: it had expired when a later session was recorded.
    forgotten: bool,
}

/// What the model expects of one decision.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Accept {
        method: AuthMethod,
        device_name: &'static str,
        totp_time_ms: u64,
        /// For a session: the presented ticket's index in the issued list.
        ticket: Option<usize>,
    },
    Reject {
        code: RejectCode,
        cause: &'static str,
        retry_after_s: Option<u32>,
    },
}

fn reject(code: RejectCode, cause: &'static str) -> Expected {
    Expected::Reject {
        code,
        cause,
        retry_after_s: None,
    }
}

struct Model {
    skew_ms: u64,
    ttl_ms: Option<u64>,
    policy: bool,
    lockout: LockoutPolicy,
    users: HashMap<&'static str, ModelUser>,
    devices: HashMap<usize, ModelDevice>,
    nonces: HashMap<[u8; 16], u64>,
    nonce_capacity: usize,
    retention_ms: u64,
    last_full_purge_ms: u64,
    /// When each nonce was last accepted with.
    accepted_nonces: HashMap<[u8; 16], u64>,
    issued: Vec<Issued>,
    revoked_sessions: HashSet<SessionId>,
    used_codes: Vec<String>,
    fresh: u64,
    random_fails: bool,
}

fn seconds_ceil(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

impl Model {
    /// PROTOCOL.md section 5 inserts the nonce after the lockout check; a full store is purged
    /// at most once a second before it refuses.
    fn insert_nonce(&mut self, nonce: [u8; 16], now: u64) -> Result<(), Expected> {
        let replay = || reject(RejectCode::Replay, "nonce_replay");
        let full = Expected::Reject {
            code: RejectCode::Overloaded,
            cause: "nonce_store_full",
            retry_after_s: Some(seconds_ceil(self.retention_ms).min(60)),
        };
        for attempt in 0..2 {
            if let Some(expires) = self.nonces.get_mut(&nonce) {
                if *expires > now {
                    return Err(replay());
                }
                *expires = now.saturating_add(self.retention_ms);
                return Ok(());
            }
            if self.nonces.len() < self.nonce_capacity {
                self.nonces
                    .insert(nonce, now.saturating_add(self.retention_ms));
                return Ok(());
            }
            if attempt == 1 || now < self.last_full_purge_ms.saturating_add(1000) {
                break;
            }
            self.last_full_purge_ms = now;
            self.purge(now);
        }
        Err(full)
    }

    fn purge(&mut self, now: u64) -> usize {
        let before = self.nonces.len();
        self.nonces.retain(|_, expires| *expires > now);
        before - self.nonces.len()
    }

    /// The latest time step within one step of `now` whose code is `code`.
    fn matching_step(totp: &TotpConfig, code: &str, now_ms: u64) -> Option<u64> {
        let origin = now_ms / 1000 / totp.period();
        (origin.saturating_sub(1)..=origin.saturating_add(1))
            .filter(|step| totp.generate(step * totp.period()) == code)
            .max()
    }

    fn after_failure(&self, user: &mut ModelUser, now: u64) {
        user.failures = user.failures.saturating_add(1);
        if let Some(extra) = user.failures.checked_sub(self.lockout.threshold) {
            let wait = if extra >= 16 {
                self.lockout.max_ms
            } else {
                (self.lockout.base_ms << extra).min(self.lockout.max_ms)
            };
            user.locked_until = now.saturating_add(wait);
        }
    }

    /// Section 5, step 4.2 onwards, for a Prefix that decoded.
    fn decide(&mut self, p: &Prefix, fingerprint: usize, now: u64) -> Expected {
        if p.binding != EXPORTER {
            return reject(RejectCode::BindingMismatch, "binding_mismatch");
        }
        if (i128::from(p.time_ms) - i128::from(now)).unsigned_abs() > u128::from(self.skew_ms) {
            return reject(RejectCode::ClockSkew, "clock_skew");
        }
        let Some(device) = self.devices.get(&fingerprint) else {
            return reject(RejectCode::DeviceUnknown, "device_unknown");
        };
        if device.revoked {
            return reject(RejectCode::DeviceRevoked, "device_revoked");
        }
        if device.user != p.user {
            return reject(RejectCode::UserMismatch, "user_mismatch");
        }
        let (device_name, device_user, device_created) =
            (device.name, device.user, device.created_ms);
        let user = self.users.get(device_user).expect("a bound user exists");
        if user.locked_until > now {
            return Expected::Reject {
                code: RejectCode::LockedOut,
                cause: "locked_out",
                retry_after_s: Some(seconds_ceil(user.locked_until - now)),
            };
        }
        if let Err(e) = self.insert_nonce(p.nonce, now) {
            return e;
        }
        let denied = self.policy && p.user == DENIED_USER;
        match &p.factor {
            Factor::Session(ticket) => {
                let mfa_required = |cause| reject(RejectCode::MfaRequired, cause);
                if self.ttl_ms.is_none() {
                    return mfa_required("sessions_disabled");
                }
                let Some(index) = self.issued.iter().position(|t| &t.ticket == ticket) else {
                    return mfa_required("ticket_invalid");
                };
                let t = &self.issued[index];
                if t.user != p.user || t.fingerprint != fingerprint {
                    return mfa_required("ticket_not_for_this_device");
                }
                if t.expires_ms <= now {
                    return mfa_required("ticket_expired");
                }
                if t.totp_time_ms > now.saturating_add(self.skew_ms) {
                    return mfa_required("ticket_from_the_future");
                }
                if t.totp_time_ms < device_created {
                    return mfa_required("ticket_before_binding");
                }
                if t.forgotten {
                    return mfa_required("ticket_invalid");
                }
                if self.revoked_sessions.contains(&t.id) {
                    return mfa_required("ticket_revoked");
                }
                if denied {
                    return reject(RejectCode::PolicyDenied, "policy_denied");
                }
                Expected::Accept {
                    method: AuthMethod::Session,
                    device_name,
                    totp_time_ms: t.totp_time_ms,
                    ticket: Some(index),
                }
            }
            Factor::Totp(code) => {
                let mut user = self.users.remove(device_user).expect("a bound user exists");
                // The decision's one write: a failure charged for a wrong code, or the good
                // code's step taken with the count cleared; a reused code writes nothing. A session that cannot be
                // issued (the random source fails) refuses before anything is to be written,
                // so the code stays good.
                let step = Self::matching_step(&user.totp, code, now);
                let outcome = match step {
                    None => {
                        self.after_failure(&mut user, now);
                        reject(RejectCode::MfaFailed, "code_wrong")
                    }
                    Some(s) if user.last_step.is_some_and(|last| last >= s) => {
                        reject(RejectCode::MfaFailed, "code_reused")
                    }
                    Some(_) if self.ttl_ms.is_some() && self.random_fails => Expected::Reject {
                        code: RejectCode::Overloaded,
                        cause: "random_failure",
                        retry_after_s: Some(5),
                    },
                    Some(s) => {
                        user.last_step = Some(s);
                        user.failures = 0;
                        user.locked_until = 0;
                        self.used_codes.push(code.clone());
                        if denied {
                            reject(RejectCode::PolicyDenied, "policy_denied")
                        } else {
                            Expected::Accept {
                                method: AuthMethod::Totp,
                                device_name,
                                totp_time_ms: now,
                                ticket: None,
                            }
                        }
                    }
                };
                self.users.insert(device_user, user);
                outcome
            }
            other => panic!("a factor the model does not know: {other:?}"),
        }
    }
}

struct Harness {
    gate: Gate,
    registry: Arc<FaultyRegistry>,
    clock: Arc<ManualClock>,
    rng: Arc<CountingRandom>,
    model: Model,
    outcomes: Vec<&'static str>,
}

impl Harness {
    fn new(setup: &Setup, fault: Fault) -> Self {
        let registry = Arc::new(FaultyRegistry {
            inner: MemoryRegistry::new(),
            fault,
            fake_step: AtomicU64::new(0),
        });
        let clock = Arc::new(ManualClock::new(T0 + u64::from(setup.start_s) * 1000));
        let rng = Arc::new(CountingRandom {
            counter: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        });
        let config = GateConfig {
            clock_skew_ms: setup.skew.ms(),
            session_ttl_ms: setup.sessions.ttl_ms(),
            nonce_capacity: if setup.small_nonce_store {
                3
            } else {
                1_000_000
            },
            lockout: LockoutPolicy::default(),
        };
        let key = TicketKey::from_bytes(&[0x42; 32]).expect("32 bytes");
        let mut gate = Gate::new(config, registry.clone(), key, clock.clone(), rng.clone());
        if setup.policy {
            let policy = |id: &Identity| {
                if id.user == DENIED_USER {
                    Err(format!("user {} may not connect", id.user))
                } else {
                    Ok(())
                }
            };
            gate = gate.with_policy(Arc::new(policy));
        }
        let model = Model {
            skew_ms: config.clock_skew_ms,
            ttl_ms: config.session_ttl_ms,
            policy: setup.policy,
            lockout: config.lockout,
            users: HashMap::new(),
            devices: HashMap::new(),
            nonces: HashMap::new(),
            nonce_capacity: config.nonce_capacity,
            retention_ms: gate.nonces().retention_ms(),
            last_full_purge_ms: 0,
            accepted_nonces: HashMap::new(),
            issued: Vec::new(),
            revoked_sessions: HashSet::new(),
            used_codes: Vec::new(),
            fresh: 0,
            random_fails: false,
        };
        assert_eq!(
            model.retention_ms,
            config
                .clock_skew_ms
                .saturating_mul(2)
                .saturating_add(1)
                .max(60_000),
            "nonces are kept for twice the skew (and at least a minute)"
        );
        Self {
            gate,
            registry,
            clock,
            rng,
            model,
            outcomes: Vec::new(),
        }
    }

    fn apply(&mut self, i: usize, op: &Op) {
        let now = self.clock.now_ms();
        match op {
            Op::AddUser {
                user,
                digits,
                secret,
            } => {
                let name = USERS[usize::from(*user) % USERS.len()];
                let totp = totp_for(*user % 4, *digits, *secret);
                let expect_ok = !self.model.users.contains_key(name);
                let result = self.registry.add_user(name, totp.clone(), now);
                assert_eq!(
                    result.is_ok(),
                    expect_ok,
                    "op {i}: add_user {name}: {result:?}"
                );
                if expect_ok {
                    self.model.users.insert(
                        name,
                        ModelUser {
                            totp,
                            last_step: None,
                            failures: 0,
                            locked_until: 0,
                            streak: Vec::new(),
                        },
                    );
                }
            }
            Op::Bind {
                device,
                user,
                fingerprint,
            } => {
                let name = DEVICES[usize::from(*device) % DEVICES.len()];
                let user = USERS[usize::from(*user) % USERS.len()];
                let fp = usize::from(*fingerprint) % FINGERPRINTS.len();
                let expect_ok = self.model.users.contains_key(user)
                    && !self
                        .model
                        .devices
                        .values()
                        .any(|d| !d.revoked && d.name == name)
                    && self.model.devices.get(&fp).is_none_or(|d| d.revoked);
                let result = self.registry.bind_device(
                    name,
                    user,
                    &DeviceFingerprint::from_bytes(FINGERPRINTS[fp]),
                    now,
                );
                assert_eq!(result.is_ok(), expect_ok, "op {i}: bind {name}: {result:?}");
                if expect_ok {
                    self.model.devices.insert(
                        fp,
                        ModelDevice {
                            name,
                            user,
                            created_ms: now,
                            revoked: false,
                        },
                    );
                }
            }
            Op::Revoke { device } => {
                let name = DEVICES[usize::from(*device) % DEVICES.len()];
                let active = self
                    .model
                    .devices
                    .iter_mut()
                    .find(|(_, d)| !d.revoked && d.name == name);
                let result = self.registry.revoke_device(name, now);
                assert_eq!(
                    result.is_ok(),
                    active.is_some(),
                    "op {i}: revoke {name}: {result:?}"
                );
                if let Some((fp, d)) = active {
                    d.revoked = true;
                    // Revoking a device revokes the sessions of its fingerprint.
                    let fp = *fp;
                    for t in &self.model.issued {
                        if t.fingerprint == fp {
                            self.model.revoked_sessions.insert(t.id);
                        }
                    }
                }
            }
            Op::Advance(a) => self.clock.advance_ms(a.ms()),
            Op::StepBack { seconds } => self
                .clock
                .set_ms(now.saturating_sub(u64::from(*seconds) * 1000)),
            Op::Decide { attempt, edit } => {
                let fp = usize::from(attempt.fingerprint) % FINGERPRINTS.len();
                let Some(prefix) = self.build(attempt, now) else {
                    return;
                };
                let mut frame = match prefix.encode() {
                    Ok(frame) => frame,
                    Err(e) => {
                        let user_ok = (1..=128).contains(&prefix.user.len());
                        let agent_ok = prefix.agent.as_ref().is_none_or(|a| a.len() <= 64);
                        assert!(
                            !(user_ok && agent_ok),
                            "op {i}: a Prefix within every limit failed to encode: {e}"
                        );
                        return;
                    }
                };
                apply_edit(&mut frame, edit);
                self.decide(i, &frame, fp, now);
            }
            Op::Raw(bytes) => self.decide(i, bytes, 0, now),
            Op::RevokeSession { ticket } => {
                if self.model.issued.is_empty() {
                    return;
                }
                let t = &self.model.issued[usize::from(*ticket) % self.model.issued.len()];
                let result = self.registry.revoke_session(&t.id, now);
                if t.forgotten {
                    assert!(
                        matches!(result, Err(RegistryError::NotFound(_))),
                        "op {i}: revoked a forgotten session: {result:?}"
                    );
                } else {
                    let record = result.expect("the memory registry revokes recorded sessions");
                    assert!(record.revoked_ms.is_some(), "op {i}: revoke session");
                    self.model.revoked_sessions.insert(t.id);
                }
            }
            Op::Purge => {
                let removed = self.gate.purge_expired();
                assert_eq!(removed, self.model.purge(now), "op {i}: purged nonces");
                assert_eq!(
                    self.gate.nonces().len(),
                    self.model.nonces.len(),
                    "op {i}: nonces held"
                );
            }
            Op::RandomFails(fail) => {
                self.rng.failing.store(*fail, Ordering::SeqCst);
                self.model.random_fails = *fail;
            }
        }
    }

    fn issued_ticket(&self, index: u8) -> Option<Vec<u8>> {
        if self.model.issued.is_empty() {
            return None;
        }
        Some(
            self.model.issued[usize::from(index) % self.model.issued.len()]
                .ticket
                .clone(),
        )
    }

    /// The Prefix an attempt describes, or `None` when it names no encodable ticket.
    fn build(&mut self, a: &Attempt, now: u64) -> Option<Prefix> {
        let user = match &a.user {
            UserChoice::Known(i) => USERS[usize::from(*i) % USERS.len()].to_owned(),
            UserChoice::Raw(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        };
        let code_at = |name: &str, unix_s: i64| {
            self.model
                .users
                .get(name)
                .map(|u| u.totp.generate(u64::try_from(unix_s).unwrap_or(0)))
        };
        let now_s = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        let factor = match &a.factor {
            FactorChoice::Totp(c) => Factor::Totp(match c {
                CodeChoice::Current => code_at(&user, now_s).unwrap_or_else(|| "123456".into()),
                CodeChoice::Steps(k) => {
                    code_at(&user, now_s + i64::from(*k) * 30).unwrap_or_else(|| "234567".into())
                }
                CodeChoice::OtherUser(j) => code_at(USERS[usize::from(*j) % USERS.len()], now_s)
                    .unwrap_or_else(|| "345678".into()),
                CodeChoice::Used(j) => match self.model.used_codes.len() {
                    0 => "456789".into(),
                    n => self.model.used_codes[usize::from(*j) % n].clone(),
                },
                CodeChoice::Digits { value, len } => {
                    let len = 6 + u32::from(*len % 3);
                    format!("{:0w$}", value % 10u32.pow(len), w = len as usize)
                }
            }),
            FactorChoice::Session(t) => Factor::Session(match t {
                TicketChoice::Earned(j) => self.issued_ticket(*j).unwrap_or_else(|| vec![1; 64]),
                TicketChoice::Tampered { ticket, at, xor } => {
                    let mut t = self.issued_ticket(*ticket).unwrap_or_else(|| vec![2; 64]);
                    let at = usize::from(*at) % t.len();
                    t[at] ^= xor;
                    t
                }
                TicketChoice::Truncated { ticket, keep } => {
                    let mut t = self.issued_ticket(*ticket).unwrap_or_else(|| vec![3; 64]);
                    t.truncate(usize::from(*keep) % t.len());
                    t
                }
                TicketChoice::Raw(bytes) => bytes.clone(),
            }),
        };
        if let Factor::Session(t) = &factor
            && !(1..=1024).contains(&t.len())
        {
            return None;
        }
        let nonce = match a.nonce {
            NonceChoice::Small(k) => [k % 6; 16],
            NonceChoice::Fresh => {
                self.model.fresh += 1;
                let mut n = [0xf0; 16];
                n[8..].copy_from_slice(&self.model.fresh.to_be_bytes());
                n
            }
            NonceChoice::Raw(n) => n,
        };
        let skew = self.model.skew_ms;
        let time_ms = match a.time {
            TimeChoice::Now => now,
            TimeChoice::Offset(ms) => now.saturating_add_signed(i64::from(ms)),
            TimeChoice::EdgeAhead => now.saturating_add(skew),
            TimeChoice::EdgeBehind => now.saturating_sub(skew),
            TimeChoice::OutAhead => now.saturating_add(skew + 1),
            TimeChoice::OutBehind => now.saturating_sub(skew + 1),
            TimeChoice::Absolute(t) => t,
        };
        let binding = match a.binding {
            BindingChoice::Right => EXPORTER,
            BindingChoice::Wrong(b) => [b; 32],
            BindingChoice::Raw(b) => b,
        };
        Some(Prefix {
            user,
            factor,
            nonce,
            time_ms,
            binding,
            agent: a
                .agent
                .as_ref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned()),
        })
    }

    fn decide(&mut self, i: usize, frame: &[u8], fp: usize, now: u64) {
        let facts = ConnectionFacts {
            exporter: EXPORTER,
            fingerprint: DeviceFingerprint::from_bytes(FINGERPRINTS[fp]),
        };
        // The four phases by hand, as a server with a deadline between them runs them.
        let (decision, effects) = match self.gate.plan(frame, &facts) {
            Planned::Decided(decision) => {
                let cause = decision.outcome.as_ref().err().map(|r| &r.cause);
                assert!(
                    matches!(
                        cause,
                        Some(
                            portcullis_core::Cause::Decode(_)
                                | portcullis_core::Cause::BindingMismatch
                                | portcullis_core::Cause::ClockSkew(_)
                        )
                    ),
                    "op {i}: phase 1 decided what needs stored state: {cause:?}"
                );
                (decision, None)
            }
            Planned::Fetch(plan) => {
                self.check_need(i, frame, fp, plan.need(), now);
                let snapshot = at_once(self.gate.store().snapshot(plan.need()));
                let outcome = self.gate.decide(plan, snapshot);
                let effects = outcome.effects().clone();
                let committed = at_once(self.gate.commit(&outcome));
                if self.registry.fault == Fault::None {
                    // One decision at a time: nothing changes between the snapshot and the
                    // commit, so the commit's condition holds.
                    assert_eq!(committed, Ok(Committed::Applied), "op {i}: commit");
                }
                (self.gate.finish(outcome, committed), Some(effects))
            }
        };
        self.outcomes.push(match &decision.outcome {
            Ok(id) if id.method == AuthMethod::Totp => "accept_totp",
            Ok(_) => "accept_session",
            Err(r) => r.cause.as_str(),
        });
        let prefix = Prefix::decode(frame);
        check_verdict(i, &decision, now);
        let Ok(prefix) = prefix else {
            let e = prefix.expect_err("checked");
            match &decision.outcome {
                Err(r) => {
                    assert_eq!(
                        r.code,
                        e.reject_code(),
                        "op {i}: a frame that does not decode"
                    );
                    assert_eq!(
                        r.cause,
                        portcullis_core::Cause::Decode(e),
                        "op {i}: the cause of a frame that does not decode"
                    );
                }
                Ok(id) => panic!(
                    "op {i}: a frame that does not decode was accepted for {}",
                    id.user
                ),
            }
            assert_eq!(
                decision.claimed_user, None,
                "op {i}: claimed user of a broken frame"
            );
            return;
        };
        assert_eq!(
            decision.claimed_user.as_ref(),
            Some(&prefix.user),
            "op {i}: claimed user"
        );
        assert_eq!(decision.agent, prefix.agent, "op {i}: agent");
        check_secrets(i, &prefix, &decision);
        if let Ok(identity) = &decision.outcome {
            self.check_accept_guarantees(i, &prefix, fp, identity, now);
        }
        // The step a code matches for the device's user, before the model takes it.
        let step = match (&prefix.factor, self.model.devices.get(&fp)) {
            (Factor::Totp(code), Some(d)) => self
                .model
                .users
                .get(d.user)
                .and_then(|u| Model::matching_step(&u.totp, code, now)),
            _ => None,
        };
        let expected = self.model.decide(&prefix, fp, now);
        self.compare(i, &prefix, fp, &expected, &decision, now);
        if let Some(effects) = &effects {
            self.check_effects(i, &prefix, fp, &expected, step, &decision, effects, now);
        }
        self.record(&prefix, fp, &decision, now);
    }

    /// Phase 1's [`Need`] for a frame it did not decide: the connection's device, the secret
    /// for a code only, and the session an issued ticket names.
    fn check_need(&self, i: usize, frame: &[u8], fp: usize, need: &Need, now: u64) {
        let p = Prefix::decode(frame).expect("phase 1 decides a frame that does not decode");
        assert!(
            p.binding == EXPORTER
                && (i128::from(p.time_ms) - i128::from(now)).unsigned_abs()
                    <= u128::from(self.model.skew_ms),
            "op {i}: phase 1 left a wrong binding or clock to the snapshot"
        );
        let session = match &p.factor {
            Factor::Session(ticket) if self.model.ttl_ms.is_some() => self
                .model
                .issued
                .iter()
                .find(|t| &t.ticket == ticket)
                .map_or(SessionNeed::None, |t| SessionNeed::ById(t.id)),
            _ => SessionNeed::None,
        };
        let expected = Need {
            fingerprint: DeviceFingerprint::from_bytes(FINGERPRINTS[fp]),
            secret: matches!(p.factor, Factor::Totp(_)),
            session,
            now_ms: now,
        };
        assert_eq!(need, &expected, "op {i}: the Need");
    }

    /// Phase 3's [`Effects`] against the model's decision: one failure to charge for a wrong
    /// code (none for a reused one); the step (and the session, when sessions are on and the connection is
    /// accepted) for a good code; nothing for any other outcome.
    #[allow(clippy::too_many_arguments)]
    fn check_effects(
        &self,
        i: usize,
        p: &Prefix,
        fp: usize,
        expected: &Expected,
        step: Option<u64>,
        decision: &Decision,
        effects: &Effects,
        now: u64,
    ) {
        let lockout = self.model.lockout;
        let accept_step = |session: Option<SessionRecord>| Effects::AcceptStep {
            user: p.user.clone(),
            step: step.expect("a good code matches a step"),
            now_ms: now,
            lockout,
            session,
        };
        let want = match expected {
            Expected::Accept {
                method: AuthMethod::Totp,
                ..
            } => accept_step(decision.outcome.as_ref().ok().and_then(|id| {
                id.session.map(|(id, expires_ms)| SessionRecord {
                    id,
                    user: p.user.clone(),
                    fingerprint: DeviceFingerprint::from_bytes(FINGERPRINTS[fp]),
                    totp_time_ms: now,
                    expires_ms,
                    revoked_ms: None,
                })
            })),
            Expected::Reject {
                cause: "code_wrong",
                ..
            } => Effects::ChargeFailure {
                user: p.user.clone(),
                now_ms: now,
                lockout,
            },
            Expected::Reject {
                cause: "policy_denied",
                ..
            } if matches!(p.factor, Factor::Totp(_)) => accept_step(None),
            _ => Effects::None,
        };
        assert_eq!(effects, &want, "op {i}: the effects to commit");
    }

    /// The guarantees of an accept, stated on their own (before the model's full prediction).
    fn check_accept_guarantees(
        &self,
        i: usize,
        p: &Prefix,
        fp: usize,
        identity: &Identity,
        now: u64,
    ) {
        let m = &self.model;
        let device = m.devices.get(&fp);
        assert!(
            device.is_some_and(|d| !d.revoked && d.user == p.user && identity.user == p.user),
            "op {i}: accepted {} from a device not bound to that user, or revoked",
            p.user
        );
        assert_eq!(
            p.binding, EXPORTER,
            "op {i}: accepted with a wrong channel binding"
        );
        assert!(
            (i128::from(p.time_ms) - i128::from(now)).unsigned_abs() <= u128::from(m.skew_ms),
            "op {i}: accepted TIME {} at server time {now}, beyond the skew {}",
            p.time_ms,
            m.skew_ms
        );
        if let Some(&at) = m.accepted_nonces.get(&p.nonce) {
            assert!(
                now >= at.saturating_add(m.retention_ms),
                "op {i}: nonce accepted at {at} accepted again at {now}, within {} ms",
                m.retention_ms
            );
        }
        let user = m.users.get(p.user.as_str()).expect("a bound user exists");
        assert!(
            user.locked_until <= now,
            "op {i}: {} accepted while locked out until {}",
            p.user,
            user.locked_until
        );
        match &p.factor {
            Factor::Totp(code) => {
                assert_eq!(identity.method, AuthMethod::Totp, "op {i}: method");
                assert!(
                    !(user.streak.len() >= LOCK_AFTER
                        && user.streak.last().is_some_and(|&t| now < t + FIRST_LOCK_MS)),
                    "op {i}: {} accepted within 30 s of {LOCK_AFTER} failed codes in a row",
                    p.user
                );
                let step = Model::matching_step(&user.totp, code, now);
                assert!(step.is_some(), "op {i}: accepted a code not valid at {now}");
                assert!(
                    step > user.last_step,
                    "op {i}: accepted step {step:?}, not later than the last accepted {:?}",
                    user.last_step
                );
            }
            Factor::Session(ticket) => {
                assert_eq!(identity.method, AuthMethod::Session, "op {i}: method");
                let issued = m.issued.iter().find(|t| &t.ticket == ticket);
                assert!(
                    issued.is_some_and(|t| t.user == p.user
                        && t.fingerprint == fp
                        && t.expires_ms > now
                        && t.totp_time_ms <= now.saturating_add(m.skew_ms)
                        && !t.forgotten
                        && !m.revoked_sessions.contains(&t.id)),
                    "op {i}: accepted a ticket not issued for this user and device, expired or \
                     revoked"
                );
            }
            other => panic!("op {i}: accepted a factor the model does not know: {other:?}"),
        }
    }

    fn compare(
        &self,
        i: usize,
        p: &Prefix,
        fp: usize,
        expected: &Expected,
        decision: &Decision,
        now: u64,
    ) {
        match (expected, &decision.outcome) {
            (
                Expected::Reject {
                    code,
                    cause,
                    retry_after_s,
                },
                Err(r),
            ) => {
                assert_eq!(
                    (r.code, r.cause.as_str()),
                    (*code, *cause),
                    "op {i}: the gate's refusal differs from the model's"
                );
                assert_eq!(
                    decision.verdict.retry_after_s, *retry_after_s,
                    "op {i}: RETRY_AFTER of {code}"
                );
            }
            (
                Expected::Accept {
                    method,
                    device_name,
                    totp_time_ms,
                    ticket,
                },
                Ok(id),
            ) => {
                assert_eq!(&id.user, &p.user, "op {i}: user");
                assert_eq!(id.device_name, *device_name, "op {i}: device name");
                assert_eq!(
                    id.fingerprint.as_bytes(),
                    &FINGERPRINTS[fp],
                    "op {i}: fingerprint"
                );
                assert_eq!(id.method, *method, "op {i}: method");
                assert_eq!(id.totp_time_ms, *totp_time_ms, "op {i}: TOTP time");
                match (ticket, self.model.ttl_ms) {
                    (Some(index), _) => {
                        let t = &self.model.issued[*index];
                        assert_eq!(id.session, Some((t.id, t.expires_ms)), "op {i}: session");
                        assert_eq!(
                            decision.verdict.session,
                            Some((t.ticket.clone(), t.expires_ms)),
                            "op {i}: a session accept sends its ticket back"
                        );
                    }
                    (None, Some(ttl)) => {
                        let expires = now + ttl;
                        assert_eq!(id.session.map(|s| s.1), Some(expires), "op {i}: expiry");
                        let sent = decision.verdict.session.as_ref().map(|s| s.1);
                        assert_eq!(sent, Some(expires), "op {i}: SESSION_EXPIRES");
                    }
                    (None, None) => {
                        assert_eq!(id.session, None, "op {i}: a session with sessions off");
                        assert_eq!(
                            decision.verdict.session, None,
                            "op {i}: a ticket with sessions off"
                        );
                    }
                }
            }
            (expected, actual) => panic!(
                "op {i}: the model expects {expected:?}, the gate decided {:?}",
                actual
                    .as_ref()
                    .map(|id| &id.user)
                    .map_err(|r| (r.code, r.cause.as_str()))
            ),
        }
    }

    fn record(&mut self, p: &Prefix, fp: usize, decision: &Decision, now: u64) {
        let m = &mut self.model;
        match (&decision.outcome, &p.factor) {
            (Ok(id), factor) => {
                m.accepted_nonces.insert(p.nonce, now);
                if let (Factor::Totp(_), Some((ticket, expires))) =
                    (factor, &decision.verdict.session)
                {
                    let (session_id, _) = id
                        .session
                        .expect("a TOTP accept with a ticket has a session");
                    // Recording a session forgets the records that have expired by then.
                    for t in &mut m.issued {
                        if t.expires_ms <= now {
                            t.forgotten = true;
                        }
                    }
                    m.issued.push(Issued {
                        ticket: ticket.clone(),
                        id: session_id,
                        user: p.user.clone(),
                        fingerprint: fp,
                        totp_time_ms: now,
                        expires_ms: *expires,
                        forgotten: false,
                    });
                }
                if matches!(factor, Factor::Totp(_))
                    && let Some(u) = m.users.get_mut(p.user.as_str())
                {
                    u.streak.clear();
                }
            }
            (Err(r), Factor::Totp(_)) => {
                if let Some(u) = m.users.get_mut(p.user.as_str()) {
                    match r.cause.as_str() {
                        "code_wrong" => u.streak.push(now),
                        // The code was good: the count is cleared even though the connection is
                        // refused afterwards. (A random failure refuses before the code's step
                        // is written: it changes nothing.)
                        "policy_denied" => u.streak.clear(),
                        _ => {}
                    }
                }
            }
            // A refused ticket changes nothing the model keeps.
            (Err(_), _) => {}
        }
    }
}

fn apply_edit(frame: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::None => {}
        Edit::Truncate(n) => frame.truncate(usize::from(*n) % (frame.len() + 1)),
        Edit::Flip { at, xor } => {
            let at = usize::from(*at) % frame.len();
            frame[at] ^= xor;
        }
        Edit::Field { tag, len } => {
            frame.push(*tag);
            frame.extend_from_slice(&u16::from(*len).to_be_bytes());
            frame.extend(std::iter::repeat_n(0x5a, usize::from(*len)));
            let body = u16::try_from(frame.len() - HEADER_LEN).unwrap_or(u16::MAX);
            frame[5..7].copy_from_slice(&body.to_be_bytes());
        }
        Edit::Append(bytes) => frame.extend_from_slice(bytes),
        Edit::Length(n) => frame[5..7].copy_from_slice(&n.to_be_bytes()),
    }
}

/// Section 4: every Verdict is well formed and says what the decision says.
fn check_verdict(i: usize, d: &Decision, now: u64) {
    let v = &d.verdict;
    assert_eq!(v.server_time_ms, now, "op {i}: SERVER_TIME");
    assert_eq!(v.reference, d.reference.0, "op {i}: REF");
    let frame = v.encode().expect("every Verdict encodes");
    assert_eq!(
        portcullis_core::codec::Verdict::decode(&frame).as_ref(),
        Ok(v),
        "op {i}: the Verdict changed across the wire"
    );
    match &d.outcome {
        Ok(_) => {
            assert_eq!(v.status, 0, "op {i}: an accept's status");
            assert_eq!(v.reason, None, "op {i}: an accept has no REASON");
            assert_eq!(
                v.retry_after_s, None,
                "op {i}: an accept has no RETRY_AFTER"
            );
        }
        Err(r) => {
            assert_eq!(v.status, r.code.as_u8(), "op {i}: status of {}", r.code);
            let reason = v.reason.as_deref().expect("a reject has a REASON");
            assert!(
                reason.starts_with(&format!("{}: ", r.code.name())) && reason.len() <= 256,
                "op {i}: REASON {reason:?}"
            );
            assert!(
                !reason.chars().any(char::is_control),
                "op {i}: control character in REASON"
            );
            if v.retry_after_s.is_some() {
                assert!(
                    r.code.has_retry_after(),
                    "op {i}: RETRY_AFTER on {}",
                    r.code
                );
            }
            assert_eq!(v.session, None, "op {i}: a reject carries no ticket");
        }
    }
}

/// No code or ticket in the REASON, the audit cause or the Debug output of a decision.
fn check_secrets(i: usize, p: &Prefix, d: &Decision) {
    let reason = d.verdict.reason.as_deref().unwrap_or_default();
    let cause = d
        .outcome
        .as_ref()
        .err()
        .map(|r| r.cause.to_string())
        .unwrap_or_default();
    match &p.factor {
        Factor::Totp(code) => {
            // A REASON can quote the claimed user or a clock difference: check only when
            // neither can hold digits.
            let quiet = USERS.contains(&p.user.as_str())
                && d.outcome
                    .as_ref()
                    .err()
                    .is_none_or(|r| r.code != RejectCode::ClockSkew);
            if quiet {
                assert!(
                    !reason.contains(code.as_str()),
                    "op {i}: REASON shows the code"
                );
                assert!(
                    !cause.contains(code.as_str()),
                    "op {i}: the audit cause shows the code"
                );
            }
        }
        Factor::Session(t) if t.len() >= 8 => {
            let hex = hex::encode(t);
            assert!(!reason.contains(&hex), "op {i}: REASON shows the ticket");
            assert!(
                !format!("{d:?}").contains(&hex),
                "op {i}: Debug of a decision shows the ticket"
            );
        }
        // A ticket too short to be found by accident in a text.
        _ => {}
    }
    if let Some((ticket, _)) = &d.verdict.session {
        let hex = hex::encode(ticket);
        assert!(
            !format!("{d:?}").contains(&hex),
            "op {i}: Debug of a decision shows the issued ticket"
        );
    }
}

/// Writes inputs in the byte layout `arbitrary` reads them from (integers little-endian, an
/// enum variant as a u32 scaled to the number of variants, a bool before each element of a
/// collection), so that seed scenarios can be written as values.
pub trait Seed {
    /// Appends the bytes from which `arbitrary` builds this value.
    fn seed(&self, out: &mut Vec<u8>);
}

fn variant(out: &mut Vec<u8>, index: u64, count: u64) {
    // The derive picks variant (x * count) >> 32 for a u32 x: the smallest x for `index`.
    let x = u32::try_from((index << 32).div_ceil(count)).expect("index < count");
    out.extend_from_slice(&x.to_le_bytes());
}

macro_rules! seed_int {
    ($($t:ty),*) => {$(
        impl Seed for $t {
            fn seed(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
seed_int!(u8, u16, u32, u64, i8, i32);

impl Seed for bool {
    fn seed(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<const N: usize> Seed for [u8; N] {
    fn seed(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl<T: Seed> Seed for Vec<T> {
    fn seed(&self, out: &mut Vec<u8>) {
        for x in self {
            out.push(1);
            x.seed(out);
        }
        out.push(0);
    }
}

impl<T: Seed> Seed for Option<T> {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                x.seed(out);
            }
        }
    }
}

impl Seed for Scenario {
    fn seed(&self, out: &mut Vec<u8>) {
        self.setup.seed(out);
        self.ops.seed(out);
    }
}

impl Seed for Setup {
    fn seed(&self, out: &mut Vec<u8>) {
        self.skew.seed(out);
        self.sessions.seed(out);
        self.small_nonce_store.seed(out);
        self.policy.seed(out);
        self.preset.seed(out);
        self.start_s.seed(out);
    }
}

impl Seed for Skew {
    fn seed(&self, out: &mut Vec<u8>) {
        variant(out, *self as u64, 4);
    }
}

impl Seed for Sessions {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Off => variant(out, 0, 3),
            Self::Seconds(s) => {
                variant(out, 1, 3);
                s.seed(out);
            }
            Self::OneHour => variant(out, 2, 3),
        }
    }
}

impl Seed for Op {
    fn seed(&self, out: &mut Vec<u8>) {
        const N: u64 = 10;
        match self {
            Self::AddUser {
                user,
                digits,
                secret,
            } => {
                variant(out, 0, N);
                user.seed(out);
                digits.seed(out);
                secret.seed(out);
            }
            Self::Bind {
                device,
                user,
                fingerprint,
            } => {
                variant(out, 1, N);
                device.seed(out);
                user.seed(out);
                fingerprint.seed(out);
            }
            Self::Revoke { device } => {
                variant(out, 2, N);
                device.seed(out);
            }
            Self::Advance(a) => {
                variant(out, 3, N);
                a.seed(out);
            }
            Self::StepBack { seconds } => {
                variant(out, 4, N);
                seconds.seed(out);
            }
            Self::Decide { attempt, edit } => {
                variant(out, 5, N);
                attempt.seed(out);
                edit.seed(out);
            }
            Self::Raw(bytes) => {
                variant(out, 6, N);
                bytes.seed(out);
            }
            Self::RevokeSession { ticket } => {
                variant(out, 7, N);
                ticket.seed(out);
            }
            Self::Purge => variant(out, 8, N),
            Self::RandomFails(b) => {
                variant(out, 9, N);
                b.seed(out);
            }
        }
    }
}

impl Seed for Advance {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Millis(n) => {
                variant(out, 0, 5);
                n.seed(out);
            }
            Self::Seconds(n) => {
                variant(out, 1, 5);
                n.seed(out);
            }
            Self::Steps(n) => {
                variant(out, 2, 5);
                n.seed(out);
            }
            Self::Minutes(n) => {
                variant(out, 3, 5);
                n.seed(out);
            }
            Self::Hours(n) => {
                variant(out, 4, 5);
                n.seed(out);
            }
        }
    }
}

impl Seed for Attempt {
    fn seed(&self, out: &mut Vec<u8>) {
        self.user.seed(out);
        self.factor.seed(out);
        self.nonce.seed(out);
        self.time.seed(out);
        self.binding.seed(out);
        self.fingerprint.seed(out);
        self.agent.seed(out);
    }
}

impl Seed for UserChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Known(i) => {
                variant(out, 0, 2);
                i.seed(out);
            }
            Self::Raw(bytes) => {
                variant(out, 1, 2);
                bytes.seed(out);
            }
        }
    }
}

impl Seed for FactorChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Totp(c) => {
                variant(out, 0, 2);
                c.seed(out);
            }
            Self::Session(t) => {
                variant(out, 1, 2);
                t.seed(out);
            }
        }
    }
}

impl Seed for CodeChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Current => variant(out, 0, 5),
            Self::Steps(k) => {
                variant(out, 1, 5);
                k.seed(out);
            }
            Self::OtherUser(j) => {
                variant(out, 2, 5);
                j.seed(out);
            }
            Self::Used(j) => {
                variant(out, 3, 5);
                j.seed(out);
            }
            Self::Digits { value, len } => {
                variant(out, 4, 5);
                value.seed(out);
                len.seed(out);
            }
        }
    }
}

impl Seed for TicketChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Earned(j) => {
                variant(out, 0, 4);
                j.seed(out);
            }
            Self::Tampered { ticket, at, xor } => {
                variant(out, 1, 4);
                ticket.seed(out);
                at.seed(out);
                xor.seed(out);
            }
            Self::Truncated { ticket, keep } => {
                variant(out, 2, 4);
                ticket.seed(out);
                keep.seed(out);
            }
            Self::Raw(bytes) => {
                variant(out, 3, 4);
                bytes.seed(out);
            }
        }
    }
}

impl Seed for NonceChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Small(k) => {
                variant(out, 0, 3);
                k.seed(out);
            }
            Self::Fresh => variant(out, 1, 3),
            Self::Raw(n) => {
                variant(out, 2, 3);
                n.seed(out);
            }
        }
    }
}

impl Seed for TimeChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Now => variant(out, 0, 7),
            Self::Offset(ms) => {
                variant(out, 1, 7);
                ms.seed(out);
            }
            Self::EdgeAhead => variant(out, 2, 7),
            Self::EdgeBehind => variant(out, 3, 7),
            Self::OutAhead => variant(out, 4, 7),
            Self::OutBehind => variant(out, 5, 7),
            Self::Absolute(t) => {
                variant(out, 6, 7);
                t.seed(out);
            }
        }
    }
}

impl Seed for BindingChoice {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Right => variant(out, 0, 3),
            Self::Wrong(b) => {
                variant(out, 1, 3);
                b.seed(out);
            }
            Self::Raw(b) => {
                variant(out, 2, 3);
                b.seed(out);
            }
        }
    }
}

impl Seed for Edit {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::None => variant(out, 0, 6),
            Self::Truncate(n) => {
                variant(out, 1, 6);
                n.seed(out);
            }
            Self::Flip { at, xor } => {
                variant(out, 2, 6);
                at.seed(out);
                xor.seed(out);
            }
            Self::Field { tag, len } => {
                variant(out, 3, 6);
                tag.seed(out);
                len.seed(out);
            }
            Self::Append(bytes) => {
                variant(out, 4, 6);
                bytes.seed(out);
            }
            Self::Length(n) => {
                variant(out, 5, 6);
                n.seed(out);
            }
        }
    }
}

/// The bytes of a scenario, as the fuzz target reads them.
pub fn seed_bytes(s: &Scenario) -> Vec<u8> {
    let mut out = Vec::new();
    s.seed(&mut out);
    out
}

fn attempt(user: u8, factor: FactorChoice, nonce: NonceChoice) -> Attempt {
    Attempt {
        user: UserChoice::Known(user),
        factor,
        nonce,
        time: TimeChoice::Now,
        binding: BindingChoice::Right,
        fingerprint: user,
        agent: None,
    }
}

fn decide(a: Attempt) -> Op {
    Op::Decide {
        attempt: a,
        edit: Edit::None,
    }
}

fn preset(sessions: Sessions) -> Setup {
    Setup {
        skew: Skew::Default,
        sessions,
        small_nonce_store: false,
        policy: false,
        preset: true,
        start_s: 0,
    }
}

/// Seed scenarios for the `decision` target: the section 8 vectors as raw frames, and each rule
/// of section 5 and 6 exercised once.
pub fn seeds() -> Vec<(&'static str, Scenario)> {
    use CodeChoice::*;
    use FactorChoice::*;
    let vector = hex::decode(crate::codec_check::SECTION8_PREFIX_HEX).expect("hex");
    let accept_vector = hex::decode(crate::codec_check::SECTION8_ACCEPT_HEX).expect("hex");
    vec![
        (
            "section8_vectors",
            Scenario {
                setup: preset(Sessions::OneHour),
                ops: vec![
                    Op::Raw(vector.clone()),
                    Op::Raw(vector.clone()),
                    Op::Raw(accept_vector),
                ],
            },
        ),
        (
            "section8_fields",
            Scenario {
                setup: preset(Sessions::Off),
                ops: vec![decide(Attempt {
                    user: UserChoice::Known(0),
                    factor: Totp(Digits {
                        value: 287_082,
                        len: 0,
                    }),
                    nonce: NonceChoice::Raw(core::array::from_fn(|i| i as u8)),
                    time: TimeChoice::Absolute(T0),
                    binding: BindingChoice::Raw([0xab; 32]),
                    fingerprint: 0,
                    agent: None,
                })],
            },
        ),
        (
            "totp_then_session_then_replays",
            Scenario {
                setup: preset(Sessions::OneHour),
                ops: vec![
                    decide(attempt(0, Totp(Current), NonceChoice::Small(0))),
                    decide(attempt(0, Totp(Current), NonceChoice::Small(1))),
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(0)),
                        NonceChoice::Small(0),
                    )),
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(0)),
                        NonceChoice::Small(2),
                    )),
                    Op::Advance(Advance::Steps(1)),
                    decide(attempt(0, Totp(Steps(-1)), NonceChoice::Fresh)),
                    decide(attempt(0, Totp(Current), NonceChoice::Fresh)),
                    decide(attempt(1, Totp(Current), NonceChoice::Fresh)),
                    decide(attempt(
                        0,
                        Session(TicketChoice::Tampered {
                            ticket: 0,
                            at: 20,
                            xor: 1,
                        }),
                        NonceChoice::Fresh,
                    )),
                    Op::RevokeSession { ticket: 0 },
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(0)),
                        NonceChoice::Fresh,
                    )),
                    Op::Advance(Advance::Hours(1)),
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(1)),
                        NonceChoice::Fresh,
                    )),
                    Op::RandomFails(true),
                    decide(attempt(1, Totp(Current), NonceChoice::Fresh)),
                    Op::RandomFails(false),
                    decide(attempt(1, Totp(Current), NonceChoice::Fresh)),
                ],
            },
        ),
        (
            "lockout",
            Scenario {
                setup: preset(Sessions::OneHour),
                ops: {
                    let mut ops: Vec<Op> = (0..5u32)
                        .map(|k| {
                            decide(attempt(
                                0,
                                Totp(Digits {
                                    value: 100_000 + k,
                                    len: 0,
                                }),
                                NonceChoice::Fresh,
                            ))
                        })
                        .collect();
                    ops.push(decide(attempt(0, Totp(Current), NonceChoice::Fresh)));
                    ops.push(Op::Advance(Advance::Seconds(29)));
                    ops.push(decide(attempt(0, Totp(Current), NonceChoice::Fresh)));
                    ops.push(Op::Advance(Advance::Seconds(2)));
                    ops.push(decide(attempt(0, Totp(Current), NonceChoice::Fresh)));
                    ops
                },
            },
        ),
        (
            "devices_rebound_and_revoked",
            Scenario {
                setup: preset(Sessions::Seconds(120)),
                ops: vec![
                    decide(attempt(0, Totp(Current), NonceChoice::Fresh)),
                    Op::Revoke { device: 0 },
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(0)),
                        NonceChoice::Fresh,
                    )),
                    Op::Advance(Advance::Millis(1)),
                    Op::Bind {
                        device: 1,
                        user: 0,
                        fingerprint: 0,
                    },
                    decide(attempt(
                        0,
                        Session(TicketChoice::Earned(0)),
                        NonceChoice::Fresh,
                    )),
                    Op::AddUser {
                        user: 2,
                        digits: 1,
                        secret: 0x33,
                    },
                    Op::Bind {
                        device: 3,
                        user: 2,
                        fingerprint: 2,
                    },
                    decide(attempt(2, Totp(Current), NonceChoice::Fresh)),
                    decide(Attempt {
                        fingerprint: 2,
                        ..attempt(0, Totp(OtherUser(2)), NonceChoice::Fresh)
                    }),
                    decide(Attempt {
                        fingerprint: 4,
                        ..attempt(0, Totp(Current), NonceChoice::Fresh)
                    }),
                ],
            },
        ),
        (
            "skew_binding_and_edits",
            Scenario {
                setup: Setup {
                    skew: Skew::OneSecond,
                    sessions: Sessions::Off,
                    small_nonce_store: true,
                    policy: true,
                    preset: true,
                    start_s: 15,
                },
                ops: vec![
                    decide(Attempt {
                        time: TimeChoice::EdgeAhead,
                        ..attempt(0, Totp(Current), NonceChoice::Small(0))
                    }),
                    decide(Attempt {
                        time: TimeChoice::OutBehind,
                        ..attempt(0, Totp(Current), NonceChoice::Small(1))
                    }),
                    decide(Attempt {
                        binding: BindingChoice::Wrong(0xac),
                        ..attempt(1, Totp(Current), NonceChoice::Small(1))
                    }),
                    decide(attempt(1, Totp(Current), NonceChoice::Small(2))),
                    decide(attempt(1, Totp(Steps(1)), NonceChoice::Small(3))),
                    decide(attempt(1, Totp(Steps(1)), NonceChoice::Small(4))),
                    Op::Purge,
                    Op::Advance(Advance::Minutes(2)),
                    decide(attempt(1, Totp(Current), NonceChoice::Small(4))),
                    Op::Purge,
                    Op::Decide {
                        attempt: attempt(0, Totp(Current), NonceChoice::Fresh),
                        edit: Edit::Field { tag: 0x80, len: 3 },
                    },
                    Op::Decide {
                        attempt: attempt(0, Totp(Current), NonceChoice::Fresh),
                        edit: Edit::Field { tag: 0x03, len: 16 },
                    },
                    Op::Decide {
                        attempt: attempt(0, Totp(Current), NonceChoice::Fresh),
                        edit: Edit::Truncate(40),
                    },
                    Op::Decide {
                        attempt: attempt(0, Totp(Current), NonceChoice::Fresh),
                        edit: Edit::Append(b"PRI * HTTP/2.0".to_vec()),
                    },
                    Op::StepBack { seconds: 90 },
                    decide(attempt(0, Totp(Current), NonceChoice::Fresh)),
                    Op::Advance(Advance::Minutes(3)),
                    Op::AddUser {
                        user: 2,
                        digits: 0,
                        secret: 0x44,
                    },
                    Op::Bind {
                        device: 3,
                        user: 2,
                        fingerprint: 2,
                    },
                    decide(attempt(2, Totp(Current), NonceChoice::Fresh)),
                    decide(attempt(2, Totp(Current), NonceChoice::Fresh)),
                ],
            },
        ),
    ]
}
