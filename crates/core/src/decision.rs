//! The ordered decision of PROTOCOL.md section 5, step 4: first failure wins.
//!
//! The gate decides a connection in four phases, as rustls's `Acceptor` keeps the handshake
//! apart from the I/O:
//!
//! 1. [`Gate::plan`] decodes the Prefix and runs the checks that need no stored state (channel
//!    binding, clock skew, the ticket's seal). It either decides at once
//!    ([`Planned::Decided`]) or says what to read ([`Planned::Fetch`] with a [`Plan`], whose
//!    [`Plan::need`] names the device, its user and the session);
//! 2. the caller **fetches** that [`Snapshot`] from a [`GateStore`], in one read;
//! 3. [`Gate::decide`] judges the snapshot with the gate's clock, without I/O (the nonce store
//!    is the gate's own memory): an [`Outcome`] with the [`Effects`] to write;
//! 4. the caller **commits** the effects in one conditional, atomic write, and
//!    [`Gate::finish`] turns the outcome and what the commit found ([`Committed`]) into the
//!    [`Decision`]: the Verdict to write, the identity on accept, and on reject the precise
//!    internal [`Cause`] for the audit record (the client only learns the reject code). A
//!    commit that lost its condition (the TOTP step was taken meanwhile, or the user got locked
//!    out) turns an accept into the refusal it now is.
//!
//! [`Gate::authenticate`] runs the four phases against the gate's own store; a server that
//! needs a deadline between them (nothing may be committed once the client was told TIMEOUT)
//! runs them itself.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use subtle::ConstantTimeEq;

use crate::codec::{DecodeError, Factor, Prefix, Verdict};
use crate::store::{Committed, Effects, GateStore, Need, SessionNeed, Snapshot, UserState};
use crate::{
    Clock, DeviceFingerprint, DeviceRecord, LockState, LockoutPolicy, NonceError, NonceStore,
    Random, RegistryError, RejectCode, SessionClaims, SessionId, SessionRecord, TicketRing,
};

/// A correlation id: 16 random bytes, sent in the Verdict and written in the audit record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ref(pub [u8; 16]);

impl Ref {
    /// A new random REF. If the random source fails, the REF is derived from the time so that a
    /// refusal can still be written and found.
    pub fn generate(rng: &dyn Random, now_ms: u64) -> Self {
        let mut bytes = [0u8; 16];
        if rng.fill(&mut bytes).is_err() {
            bytes[..8].copy_from_slice(&now_ms.to_be_bytes());
        }
        Self(bytes)
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ref({self})")
    }
}

/// The gate's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateConfig {
    /// The largest allowed |TIME - server clock|, in ms (default 60 s).
    pub clock_skew_ms: u64,
    /// Lifetime of session tickets in ms; `None` turns sessions off (default 1 hour).
    pub session_ttl_ms: Option<u64>,
    /// The most nonces remembered at once (default 1,000,000); a full store refuses with
    /// OVERLOADED.
    pub nonce_capacity: usize,
    /// When failed codes lock a user out.
    pub lockout: LockoutPolicy,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            clock_skew_ms: 60_000,
            session_ttl_ms: Some(3_600_000),
            nonce_capacity: 1_000_000,
            lockout: LockoutPolicy::default(),
        }
    }
}

/// What the TLS layer knows of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts {
    /// This connection's RFC 9266 tls-exporter value.
    pub exporter: [u8; 32],
    /// The fingerprint of the client's leaf certificate.
    pub fingerprint: DeviceFingerprint,
}

/// How the second factor was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A TOTP code on this connection.
    Totp,
    /// A session ticket earned by an earlier TOTP check.
    Session,
    /// The device key alone: the user is a service account ([`crate::UserRecord::service`]),
    /// whose bound devices are exempt from the second factor.
    Device,
}

impl AuthMethod {
    /// `totp`, `session` or `device`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Totp => "totp",
            Self::Session => "session",
            Self::Device => "device",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who an accepted connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The authenticated user.
    pub user: String,
    /// The device's name in the registry.
    pub device_name: String,
    /// The device's fingerprint.
    pub fingerprint: DeviceFingerprint,
    /// How the second factor was proven.
    pub method: AuthMethod,
    /// When the TOTP check was made (on this connection, or the one that earned the session).
    pub totp_time_ms: u64,
    /// The session this connection holds or was given, and when it expires.
    pub session: Option<(SessionId, u64)>,
    /// The user's roles when the connection was decided, sorted (for per-method policy).
    pub roles: Vec<String>,
}

/// A rule applied to an authenticated identity before its connection is accepted: return
/// `Err(hint)` to refuse it with POLICY_DENIED. The hint goes to the client after
/// `policy_denied: `; it must not contain secrets.
///
/// Closures are policies:
///
/// ```
/// use portcullis_core::{ConnectionPolicy, Identity};
/// let only_alice = |id: &Identity| {
///     if id.user == "alice" { Ok(()) } else { Err(format!("user {} may not connect", id.user)) }
/// };
/// let _: &dyn ConnectionPolicy = &only_alice;
/// ```
pub trait ConnectionPolicy: Send + Sync {
    /// `Ok(())` lets the connection in; `Err(hint)` refuses it.
    fn check(&self, identity: &Identity) -> Result<(), String>;
}

impl<F> ConnectionPolicy for F
where
    F: Fn(&Identity) -> Result<(), String> + Send + Sync,
{
    fn check(&self, identity: &Identity) -> Result<(), String> {
        self(identity)
    }
}

/// The precise internal cause of a refusal: for the audit record only, never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cause {
    /// The frame breaks the codec rules (the detail names the rule).
    Decode(DecodeError),
    /// BINDING differs from the exporter.
    BindingMismatch,
    /// TIME minus the server clock, in ms, beyond the allowed skew.
    ClockSkew(i64),
    /// No binding for the fingerprint.
    DeviceUnknown,
    /// The binding was revoked.
    DeviceRevoked,
    /// The device is bound to another user.
    UserMismatch,
    /// The user is locked out.
    LockedOut,
    /// The nonce was seen before.
    NonceReplay,
    /// The nonce store is full.
    NonceStoreFull,
    /// The code matches no time step in the window.
    CodeWrong,
    /// The code's time step is not later than the last accepted one.
    CodeReused,
    /// The user does not exist or has no TOTP factor.
    NoFactor,
    /// Sessions are off on this server.
    SessionsDisabled,
    /// The ticket does not open under the server key, or the server keeps no matching record
    /// of its session.
    TicketInvalid,
    /// The ticket has expired.
    TicketExpired,
    /// The ticket was earned later than the server's clock allows (more than the allowed skew
    /// ahead of it): the clock went back, and the ticket's age cannot be told.
    TicketFromTheFuture,
    /// The ticket belongs to another user or device.
    TicketNotForThisDevice,
    /// The ticket was earned before the current device binding.
    TicketBeforeBinding,
    /// The session's record was revoked.
    TicketRevoked,
    /// A standard client's device holds no live session.
    NoLiveSession,
    /// The connection policy refused the authenticated identity.
    PolicyDenied,
    /// The registry failed; the connection is refused (fail closed).
    Registry(String),
    /// The random source failed while sealing a ticket.
    Random,
    /// A cause decided by the server around the core (limits, deadline, TLS, ...).
    Server(ServerCause),
}

impl Cause {
    /// A stable snake_case name for logs and metrics: `code_reused`, `ticket_expired`, ...
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Decode(DecodeError::Malformed(_)) => "frame_malformed",
            Self::Decode(DecodeError::Unsupported(_)) => "frame_unsupported",
            Self::BindingMismatch => "binding_mismatch",
            Self::ClockSkew(_) => "clock_skew",
            Self::DeviceUnknown => "device_unknown",
            Self::DeviceRevoked => "device_revoked",
            Self::UserMismatch => "user_mismatch",
            Self::LockedOut => "locked_out",
            Self::NonceReplay => "nonce_replay",
            Self::NonceStoreFull => "nonce_store_full",
            Self::CodeWrong => "code_wrong",
            Self::CodeReused => "code_reused",
            Self::NoFactor => "no_factor",
            Self::SessionsDisabled => "sessions_disabled",
            Self::TicketInvalid => "ticket_invalid",
            Self::TicketExpired => "ticket_expired",
            Self::TicketFromTheFuture => "ticket_from_the_future",
            Self::TicketNotForThisDevice => "ticket_not_for_this_device",
            Self::TicketBeforeBinding => "ticket_before_binding",
            Self::TicketRevoked => "ticket_revoked",
            Self::NoLiveSession => "no_live_session",
            Self::PolicyDenied => "policy_denied",
            Self::Registry(_) => "registry_error",
            Self::Random => "random_failure",
            Self::Server(cause) => cause.as_str(),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "{}: {e}", self.as_str()),
            Self::ClockSkew(ms) => write!(f, "clock_skew: client is {ms} ms off"),
            Self::Registry(e) => write!(f, "registry_error: {e}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// The causes a server decides around the core: its limits, its deadline, and what the TLS
/// layer saw. Every refusal or close that is not the gate's own has one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerCause {
    /// The source's rate limit is spent (RATE_LIMITED).
    RateLimited,
    /// The rate limiter tracks as many sources as it may (OVERLOADED).
    RateLimiterFull,
    /// As many connections are being authenticated as allowed (OVERLOADED).
    TooManyPending,
    /// As many connections from this source are being authenticated as one source may have
    /// (OVERLOADED).
    TooManyPendingFromSource,
    /// The client sent no first TLS byte within the hello deadline: closed.
    HelloTimeout,
    /// The server must keep an audit record of every connection and cannot write its audit
    /// trail now (OVERLOADED).
    AuditUnavailable,
    /// The server was at its cap of connections being authenticated and closed this one, the
    /// oldest still in its TLS handshake, to make room for a newer one.
    Shed,
    /// The client certificate is listed in a certificate revocation list (DEVICE_REVOKED).
    CertificateRevoked,
    /// The client certificate is outside its validity period on a resumed TLS session, which
    /// rustls does not verify again (DEVICE_REVOKED).
    CertificateExpired,
    /// The server's certificate revocation lists are past their nextUpdate and it refuses
    /// while they are (OVERLOADED).
    CrlStale,
    /// No complete Prefix arrived within the deadline (TIMEOUT).
    PrefixTimeout,
    /// The decision did not finish within the deadline (TIMEOUT); nothing was committed.
    DecisionTimeout,
    /// A check failed unexpectedly (a panic); the connection is refused (OVERLOADED).
    GateFailed,
    /// The first bytes were no TLS record (a plaintext client).
    NotTls,
    /// The TLS handshake failed.
    TlsHandshakeFailed,
    /// The TLS handshake did not finish within the deadline.
    TlsHandshakeTimeout,
    /// The client offered no ALPN id the server speaks.
    AlpnRefused,
    /// The client negotiated a TLS version other than 1.3.
    TlsVersionRefused,
    /// The client sent no certificate the server could use.
    NoUsableClientCertificate,
    /// Reading the Prefix failed (the connection broke).
    PrefixReadFailed,
    /// The client went away before the connection was decided.
    Abandoned,
    /// PROXY protocol is on and the peer is not a trusted proxy: closed before TLS.
    ProxyUntrusted,
    /// PROXY protocol is on and the trusted peer sent no valid version 2 header (none, a
    /// version 1 header, a malformed or too long one): closed before TLS.
    ProxyHeaderRefused,
    /// PROXY protocol is on and the header did not arrive in time: closed before TLS.
    ProxyHeaderTimeout,
}

impl ServerCause {
    /// A stable snake_case name for logs, audit records and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::RateLimiterFull => "rate_limiter_full",
            Self::TooManyPending => "too_many_pending",
            Self::TooManyPendingFromSource => "too_many_pending_from_source",
            Self::HelloTimeout => "client_hello_timeout",
            Self::Shed => "shed_for_newer",
            Self::AuditUnavailable => "audit_unavailable",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CertificateExpired => "certificate_expired",
            Self::CrlStale => "crl_stale",
            Self::PrefixTimeout => "prefix_timeout",
            Self::DecisionTimeout => "decision_timeout",
            Self::GateFailed => "gate_failed",
            Self::NotTls => "not_tls",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::AlpnRefused => "alpn_refused",
            Self::TlsVersionRefused => "tls_version_refused",
            Self::NoUsableClientCertificate => "no_usable_client_certificate",
            Self::PrefixReadFailed => "prefix_read_failed",
            Self::Abandoned => "abandoned",
            Self::ProxyUntrusted => "proxy_untrusted",
            Self::ProxyHeaderRefused => "proxy_header_refused",
            Self::ProxyHeaderTimeout => "proxy_header_timeout",
        }
    }
}

impl fmt::Display for ServerCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code the client sees and the cause the audit record keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reject code sent in the Verdict.
    pub code: RejectCode,
    /// The precise cause.
    pub cause: Cause,
}

/// The outcome of one connection's Prefix.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The Verdict to write.
    pub verdict: Verdict,
    /// The REF, as in the Verdict.
    pub reference: Ref,
    /// The user the Prefix claimed, when it decoded.
    pub claimed_user: Option<String>,
    /// The AGENT the Prefix sent, when it decoded and had one (for the audit record; log it
    /// escaped, it is the client's text).
    pub agent: Option<String>,
    /// The identity on accept, the refusal otherwise.
    pub outcome: Result<Identity, Rejection>,
}

impl Decision {
    /// Whether the connection was accepted.
    pub fn is_accepted(&self) -> bool {
        self.outcome.is_ok()
    }
}

struct Refusal {
    code: RejectCode,
    cause: Cause,
    hint: String,
    retry_after_s: Option<u32>,
}

impl Refusal {
    fn new(code: RejectCode, cause: Cause, hint: impl Into<String>) -> Self {
        Self {
            code,
            cause,
            hint: hint.into(),
            retry_after_s: None,
        }
    }

    fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
}

impl From<RegistryError> for Refusal {
    fn from(e: RegistryError) -> Self {
        Refusal::new(
            RejectCode::Overloaded,
            Cause::Registry(e.to_string()),
            "the server cannot check credentials right now; retry shortly",
        )
        .retry_after(5)
    }
}

fn locked_out(user: &str, left_ms: u64) -> Refusal {
    let secs = seconds_ceil(left_ms);
    Refusal::new(
        RejectCode::LockedOut,
        Cause::LockedOut,
        format!("too many failed codes for {user}; retry in {secs} s"),
    )
    .retry_after(secs)
}

fn mfa_failed(cause: Cause) -> Refusal {
    Refusal::new(
        RejectCode::MfaFailed,
        cause,
        "the one-time code was not accepted",
    )
}

/// A correct code whose time step (or a later one) was already accepted for the user.
fn code_reused() -> Refusal {
    Refusal::new(RejectCode::MfaFailed, Cause::CodeReused, CODE_REUSED_HINT)
}

/// The hint of a reused code (PROTOCOL.md section 4): not wrong, but spent.
pub const CODE_REUSED_HINT: &str = "this code was already used; wait for the next one";

fn seconds_ceil(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// An accepted identity and, for the Verdict, the session ticket it carries and its expiry.
type Accepted = (Identity, Option<(Vec<u8>, u64)>);

/// Phase 1's answer ([`Gate::plan`]).
#[derive(Debug)]
pub enum Planned {
    /// Decided without stored state: a frame that does not decode, a binding or clock that
    /// fails. Nothing is read or written.
    Decided(Decision),
    /// Read [`Plan::need`], then [`Gate::decide`].
    Fetch(Plan),
}

/// What phase 1 learnt of a connection, and what it needs read ([`Plan::need`]).
pub struct Plan {
    need: Need,
    now: u64,
    reference: Ref,
    kind: PlanKind,
}

// One plan per connection, moved a few times: boxing the Prefix would cost an allocation for
// nothing.
#[allow(clippy::large_enum_variant)]
enum PlanKind {
    /// A Prefix that passed binding and clock; its ticket opened (or not) under the key.
    Prefix {
        prefix: Prefix,
        claims: Option<SessionClaims>,
    },
    /// A standard client (ALPN h2, no Prefix).
    Standard,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The Prefix's factor is never shown.
        f.debug_struct("Plan")
            .field("need", &self.need)
            .field("now", &self.now)
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// What the store must read for this connection, in one read.
    pub fn need(&self) -> &Need {
        &self.need
    }

    /// The time of the decision, Unix ms.
    pub fn now_ms(&self) -> u64 {
        self.now
    }

    fn claimed_user(&self) -> Option<String> {
        match &self.kind {
            PlanKind::Prefix { prefix, .. } => Some(prefix.user.clone()),
            PlanKind::Standard => None,
        }
    }

    fn agent(&self) -> Option<String> {
        match &self.kind {
            PlanKind::Prefix { prefix, .. } => prefix.agent.clone(),
            PlanKind::Standard => None,
        }
    }
}

/// Phase 3's answer ([`Gate::decide`]): the decision as it stands, and the [`Effects`] to
/// commit before it holds ([`Gate::finish`]).
pub struct Outcome {
    effects: Effects,
    now: u64,
    reference: Ref,
    claimed_user: Option<String>,
    agent: Option<String>,
    checked: Result<Accepted, Refusal>,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("effects", &self.effects)
            .field("accepted", &self.checked.is_ok())
            .finish_non_exhaustive()
    }
}

impl Outcome {
    /// What must be written before the decision holds ([`GateStore::commit`]).
    pub fn effects(&self) -> &Effects {
        &self.effects
    }

    /// Whether the connection is accepted, should the commit hold.
    pub fn is_accept(&self) -> bool {
        self.checked.is_ok()
    }
}

/// The sans-IO gate: holds the store, the nonce store, the ticket key, the clock and the random
/// source, and decides each connection in the order of PROTOCOL.md section 5, in four phases:
/// [`Gate::plan`] (what to read), one fetch of a [`Snapshot`] from a [`GateStore`],
/// [`Gate::decide`] (no I/O: the verdict and the [`Effects`] to write), and one commit of the
/// effects, after which [`Gate::finish`] makes the [`Decision`]. [`Gate::authenticate`] runs
/// them all against the gate's store.
///
/// ```
/// use std::sync::Arc;
/// use portcullis_core::codec::{Factor, Prefix};
/// use portcullis_core::*;
///
/// let registry = Arc::new(MemoryRegistry::new());
/// let totp = TotpConfig::new(vec![7; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
/// registry.add_user("alice", totp.clone(), 0).unwrap();
/// let fingerprint = DeviceFingerprint::from_bytes([1; 32]);
/// registry.bind_device("laptop", "alice", &fingerprint, 0).unwrap();
///
/// let clock = Arc::new(ManualClock::new(1_700_000_000_000));
/// let rng = Arc::new(SystemRandom::new());
/// let key = TicketKey::generate(rng.as_ref()).unwrap();
/// let gate = Gate::new(GateConfig::default(), registry.clone(), key, clock, rng);
///
/// let facts = ConnectionFacts { exporter: [5; 32], fingerprint };
/// let prefix = Prefix {
///     user: "alice".into(),
///     factor: Factor::Totp(totp.generate(1_700_000_000)),
///     nonce: [9; 16],
///     time_ms: 1_700_000_000_000,
///     binding: [5; 32],
///     agent: None,
/// };
/// // The four phases, by hand (a server runs them with a deadline in between).
/// let Planned::Fetch(plan) = gate.plan(&prefix.encode().unwrap(), &facts) else {
///     unreachable!("binding and clock are right");
/// };
/// let snapshot = registry.snapshot_now(plan.need());
/// let outcome = gate.decide(plan, snapshot);
/// let committed = registry.commit_now(outcome.effects());
/// let decision = gate.finish(outcome, committed);
/// assert_eq!(decision.outcome.unwrap().method, AuthMethod::Totp);
/// ```
pub struct Gate {
    config: GateConfig,
    store: Arc<dyn GateStore>,
    nonces: NonceStore,
    tickets: RwLock<Arc<TicketRing>>,
    clock: Arc<dyn Clock>,
    rng: Arc<dyn Random>,
    policy: Option<Arc<dyn ConnectionPolicy>>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("config", &self.config)
            .field("nonces", &self.nonces.len())
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate. The nonce store keeps each nonce one millisecond longer than twice the allowed
    /// skew (and at least one minute): a frame first seen at `t` carries a TIME of at most
    /// `t + skew`, so it passes the clock check until `t + 2 * skew` inclusive, and its nonce must
    /// still be remembered at that instant.
    pub fn new(
        config: GateConfig,
        store: Arc<dyn GateStore>,
        tickets: impl Into<TicketRing>,
        clock: Arc<dyn Clock>,
        rng: Arc<dyn Random>,
    ) -> Self {
        let retention = config
            .clock_skew_ms
            .saturating_mul(2)
            .saturating_add(1)
            .max(60_000);
        Self {
            nonces: NonceStore::new(config.nonce_capacity, retention),
            config,
            store,
            tickets: RwLock::new(Arc::new(tickets.into())),
            clock,
            rng,
            policy: None,
        }
    }

    /// Adds a connection policy, checked after every other step (POLICY_DENIED).
    pub fn with_policy(mut self, policy: Arc<dyn ConnectionPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The settings.
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// The store the gate reads and commits to in [`Gate::authenticate`].
    pub fn store(&self) -> &Arc<dyn GateStore> {
        &self.store
    }

    /// The ticket keys new tickets are sealed and old ones opened under.
    pub fn tickets(&self) -> Arc<TicketRing> {
        self.tickets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the ticket keys (a key rotated): tickets are sealed under the new ring's
    /// current key from the next accept on, and opened under any key it holds.
    pub fn set_tickets(&self, tickets: TicketRing) {
        *self.tickets.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tickets);
    }

    /// The nonce store (for purging and metrics).
    pub fn nonces(&self) -> &NonceStore {
        &self.nonces
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Drops expired nonces; call it now and then (the server does every few seconds).
    pub fn purge_expired(&self) -> usize {
        self.nonces.purge_expired(self.clock.now_ms())
    }

    /// A refusal decided outside the Prefix (deadline, server limits, a header that failed to
    /// parse): the Verdict and its REF.
    pub fn refuse(
        &self,
        code: RejectCode,
        cause: Cause,
        hint: &str,
        retry_after_s: Option<u32>,
    ) -> Decision {
        let now = self.clock.now_ms();
        let reference = Ref::generate(self.rng.as_ref(), now);
        Decision {
            verdict: Verdict::reject(code, hint, now, reference.0, retry_after_s),
            reference,
            claimed_user: None,
            agent: None,
            outcome: Err(Rejection { code, cause }),
        }
    }

    /// A refusal for a frame header that failed [`crate::codec::FrameHeader::parse`].
    pub fn refuse_decode(&self, error: DecodeError) -> Decision {
        let (code, hint) = match &error {
            DecodeError::Malformed(d) | DecodeError::Unsupported(d) => {
                (error.reject_code(), d.clone())
            }
        };
        self.refuse(code, Cause::Decode(error), &hint, None)
    }

    /// Runs the four phases for one Prefix frame (header and body) against the gate's store:
    /// [`Gate::plan`], one snapshot, [`Gate::decide`], one commit, [`Gate::finish`].
    pub async fn authenticate(&self, frame: &[u8], facts: &ConnectionFacts) -> Decision {
        match self.plan(frame, facts) {
            Planned::Decided(decision) => decision,
            Planned::Fetch(plan) => self.run(plan).await,
        }
    }

    /// Runs the four phases for a standard gRPC client (PROTOCOL.md section 7): a connection
    /// that negotiated ALPN `h2` and sends no Prefix, judged on its client certificate's
    /// fingerprint alone ([`Gate::plan_standard`]).
    pub async fn authenticate_standard(&self, fingerprint: &DeviceFingerprint) -> Decision {
        self.run(self.plan_standard(fingerprint)).await
    }

    /// Phases 2 to 4 for a plan, against the gate's store.
    pub async fn run(&self, plan: Plan) -> Decision {
        let snapshot = self.store.snapshot(plan.need()).await;
        let outcome = self.decide(plan, snapshot);
        let committed = self.commit(&outcome).await;
        self.finish(outcome, committed)
    }

    /// Phase 4 against the gate's store: commits the outcome's effects (none to write: at once).
    pub async fn commit(&self, outcome: &Outcome) -> Result<Committed, RegistryError> {
        if outcome.effects.is_none() {
            return Ok(Committed::Applied);
        }
        self.store.commit(&outcome.effects).await
    }

    /// Phase 1 for a Prefix frame (header and body): decodes it and checks what needs no
    /// stored state, in the order of PROTOCOL.md section 5: the channel binding (in constant
    /// time), then the clock skew. A ticket is opened here (it names the session to read).
    pub fn plan(&self, frame: &[u8], facts: &ConnectionFacts) -> Planned {
        match Prefix::decode(frame) {
            Ok(prefix) => self.plan_prefix(prefix, facts),
            Err(e) => Planned::Decided(self.refuse_decode(e)),
        }
    }

    /// Phase 1 for an already decoded Prefix ([`Gate::plan`]).
    pub fn plan_prefix(&self, prefix: Prefix, facts: &ConnectionFacts) -> Planned {
        let now = self.clock.now_ms();
        let reference = Ref::generate(self.rng.as_ref(), now);
        if let Err(refusal) = self.check_stateless(&prefix, facts, now) {
            let claimed_user = Some(prefix.user.clone());
            let agent = prefix.agent.clone();
            return Planned::Decided(Self::decision(
                now,
                reference,
                claimed_user,
                agent,
                Err(refusal),
            ));
        }
        let (secret, claims) = match &prefix.factor {
            Factor::Totp(_) => (true, None),
            Factor::Session(ticket) => match self.config.session_ttl_ms {
                Some(ttl) => (false, self.tickets().open(ticket, now, ttl)),
                None => (false, None),
            },
        };
        let session = match &claims {
            Some(c) => SessionNeed::ById(c.id),
            None => SessionNeed::None,
        };
        Planned::Fetch(Plan {
            need: Need {
                fingerprint: facts.fingerprint,
                secret,
                session,
                now_ms: now,
            },
            now,
            reference,
            kind: PlanKind::Prefix { prefix, claims },
        })
    }

    /// Phase 1 for a standard gRPC client (PROTOCOL.md section 7): nothing to check without
    /// state; the device, its user and the device's live session are to be read.
    pub fn plan_standard(&self, fingerprint: &DeviceFingerprint) -> Plan {
        let now = self.clock.now_ms();
        let reference = Ref::generate(self.rng.as_ref(), now);
        let session = if self.config.session_ttl_ms.is_some() {
            SessionNeed::LiveForDevice
        } else {
            SessionNeed::None
        };
        Plan {
            need: Need {
                fingerprint: *fingerprint,
                secret: false,
                session,
                now_ms: now,
            },
            now,
            reference,
            kind: PlanKind::Standard,
        }
    }

    /// Phase 3: judges the snapshot read for `plan` (or the failure to read it, which refuses
    /// with OVERLOADED: fail closed) in the order of PROTOCOL.md section 5 (device binding,
    /// lockout, nonce, factor, then the connection policy). No I/O: the only state it changes
    /// is the gate's own nonce store. The [`Outcome`] holds once its effects are committed
    /// ([`Gate::finish`]).
    pub fn decide(&self, plan: Plan, snapshot: Result<Snapshot, RegistryError>) -> Outcome {
        let claimed_user = plan.claimed_user();
        let agent = plan.agent();
        let Plan {
            need,
            now,
            reference,
            kind,
        } = plan;
        let fp = need.fingerprint;
        // The claimed user of a standard client is the user its device is bound to.
        let device_user = match (&kind, &snapshot) {
            (PlanKind::Standard, Ok(s)) => s.device.as_ref().map(|d| d.user.clone()),
            _ => None,
        };
        let claimed_user = claimed_user.or(device_user);
        let mut effects = Effects::None;
        let checked = match snapshot {
            Err(e) => Err(Refusal::from(e)),
            Ok(snapshot) => match &kind {
                PlanKind::Prefix { prefix, claims } => {
                    self.check_prefix(prefix, claims.as_ref(), &fp, snapshot, now, &mut effects)
                }
                PlanKind::Standard => self.check_standard(&fp, snapshot, now).map(|i| (i, None)),
            },
        };
        let checked = checked.and_then(|(identity, session)| match self.apply_policy(&identity) {
            Ok(()) => Ok((identity, session)),
            Err(refusal) => {
                // A refused connection gets no session (it must not let a standard client
                // in); the code it spent stays spent.
                if let Effects::AcceptStep { session, .. } = &mut effects {
                    *session = None;
                }
                Err(refusal)
            }
        });
        Outcome {
            effects,
            now,
            reference,
            claimed_user,
            agent,
            checked,
        }
    }

    /// Phase 4's end: the [`Decision`] once the outcome's effects were committed (or failed to
    /// be). A commit that lost its condition turns the outcome into the refusal it now is: the
    /// step taken meanwhile is a reused code (MFA_FAILED), a lockout set off meanwhile is
    /// LOCKED_OUT. A failed commit refuses with OVERLOADED (fail closed).
    pub fn finish(
        &self,
        outcome: Outcome,
        committed: Result<Committed, RegistryError>,
    ) -> Decision {
        let Outcome {
            effects,
            now,
            reference,
            claimed_user,
            agent,
            checked,
        } = outcome;
        let checked = match committed {
            Err(e) => Err(Refusal::from(e)),
            Ok(Committed::Applied) => checked,
            Ok(Committed::StepTaken(_)) => Err(code_reused()),
            Ok(Committed::LockedOut(state)) => {
                let user = match effects.target() {
                    Some((user, _, _)) => user,
                    None => claimed_user.as_deref().unwrap_or(""),
                };
                Err(locked_out(user, state.remaining_ms(now).unwrap_or(1)))
            }
        };
        Self::decision(now, reference, claimed_user, agent, checked)
    }

    /// The connection policy's answer for an authenticated identity (POLICY_DENIED).
    fn apply_policy(&self, identity: &Identity) -> Result<(), Refusal> {
        match self.policy.as_ref().map(|p| p.check(identity)) {
            Some(Err(hint)) => Err(Refusal::new(
                RejectCode::PolicyDenied,
                Cause::PolicyDenied,
                hint,
            )),
            _ => Ok(()),
        }
    }

    /// The Decision of a check's outcome: the Verdict to write, the identity or the refusal.
    fn decision(
        now: u64,
        reference: Ref,
        claimed_user: Option<String>,
        agent: Option<String>,
        checked: Result<Accepted, Refusal>,
    ) -> Decision {
        match checked {
            Ok((identity, session)) => Decision {
                verdict: Verdict::accept(now, reference.0, session),
                reference,
                claimed_user,
                agent,
                outcome: Ok(identity),
            },
            Err(r) => Decision {
                verdict: Verdict::reject(r.code, &r.hint, now, reference.0, r.retry_after_s),
                reference,
                claimed_user,
                agent,
                outcome: Err(Rejection {
                    code: r.code,
                    cause: r.cause,
                }),
            },
        }
    }

    /// Steps 4.2 and 4.3: channel binding (in constant time) and clock skew.
    fn check_stateless(
        &self,
        prefix: &Prefix,
        facts: &ConnectionFacts,
        now: u64,
    ) -> Result<(), Refusal> {
        if !bool::from(prefix.binding.ct_eq(&facts.exporter)) {
            return Err(Refusal::new(
                RejectCode::BindingMismatch,
                Cause::BindingMismatch,
                "BINDING is not this TLS connection's exporter: something between client and \
                 server terminates TLS (a proxy or load balancer); connect directly",
            ));
        }
        let diff = i128::from(prefix.time_ms) - i128::from(now);
        if diff.unsigned_abs() > u128::from(self.config.clock_skew_ms) {
            let secs = diff.unsigned_abs().div_ceil(1000);
            let side = if diff > 0 { "ahead of" } else { "behind" };
            return Err(Refusal::new(
                RejectCode::ClockSkew,
                Cause::ClockSkew(i64::try_from(diff).unwrap_or(i64::MAX)),
                format!(
                    "your clock is {secs} s {side} the server's (allowed: {} s); set it right, \
                     e.g. with NTP",
                    self.config.clock_skew_ms / 1000
                ),
            ));
        }
        Ok(())
    }

    /// Steps 4.4 to 4.7 on the snapshot.
    fn check_prefix(
        &self,
        prefix: &Prefix,
        claims: Option<&SessionClaims>,
        fp: &DeviceFingerprint,
        snapshot: Snapshot,
        now: u64,
        effects: &mut Effects,
    ) -> Result<Accepted, Refusal> {
        // 4.4 device binding.
        let device = snapshot.device.ok_or_else(|| {
            Refusal::new(
                RejectCode::DeviceUnknown,
                Cause::DeviceUnknown,
                format!("device {fp} is bound to no user; bind it with `portcullis device bind`"),
            )
        })?;
        if device.is_revoked() {
            return Err(Refusal::new(
                RejectCode::DeviceRevoked,
                Cause::DeviceRevoked,
                format!("device {} ({fp}) was revoked", device.name),
            ));
        }
        if device.user != prefix.user {
            return Err(Refusal::new(
                RejectCode::UserMismatch,
                Cause::UserMismatch,
                format!(
                    "device {} is not bound to user {}; use the user it was issued for",
                    device.name, prefix.user
                ),
            ));
        }
        // 4.5 lockout.
        let user = snapshot.user;
        let lock = user.as_ref().map(|u| u.lock).unwrap_or_default();
        if let Some(left) = lock.remaining_ms(now) {
            return Err(locked_out(&prefix.user, left));
        }
        // 4.6 nonce.
        match self.nonces.insert(prefix.nonce, now) {
            Ok(()) => {}
            Err(NonceError::Replay) => {
                return Err(Refusal::new(
                    RejectCode::Replay,
                    Cause::NonceReplay,
                    "this NONCE was already used; send 16 new random bytes on every connection",
                ));
            }
            Err(NonceError::Full) => {
                return Err(Refusal::new(
                    RejectCode::Overloaded,
                    Cause::NonceStoreFull,
                    "the server is at its limit of recent connections; retry shortly",
                )
                .retry_after(seconds_ceil(self.nonces.retention_ms()).min(60)));
            }
        }
        // 4.7 the factor. A service account has none: its device key (checked by the TLS
        // handshake and the binding above) is its factor, so the frame's factor is not checked,
        // no failure is charged and no session is issued. What it may call is limited by the
        // per-method policy, which admits a service account only where a rule names it.
        if let Some(user) = &user
            && user.service
        {
            return Ok((identity(&device, user, AuthMethod::Device, now, None), None));
        }
        match &prefix.factor {
            Factor::Session(ticket) => {
                self.check_session(ticket, claims, prefix, &device, user, snapshot.session, now)
            }
            Factor::Totp(code) => self.check_totp(code, &device, user, now, effects),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_session(
        &self,
        ticket: &[u8],
        claims: Option<&SessionClaims>,
        prefix: &Prefix,
        device: &DeviceRecord,
        user: Option<UserState>,
        record: Option<SessionRecord>,
        now: u64,
    ) -> Result<Accepted, Refusal> {
        let refuse = |cause: Cause| {
            Refusal::new(
                RejectCode::MfaRequired,
                cause,
                format!(
                    "{}; send a one-time code",
                    crate::advice::advice(RejectCode::MfaRequired).cause
                ),
            )
        };
        if self.config.session_ttl_ms.is_none() {
            return Err(refuse(Cause::SessionsDisabled));
        }
        let claims = claims.ok_or_else(|| refuse(Cause::TicketInvalid))?;
        if claims.user != prefix.user || claims.fingerprint != device.fingerprint {
            return Err(refuse(Cause::TicketNotForThisDevice));
        }
        if claims.expires_ms <= now {
            return Err(refuse(Cause::TicketExpired));
        }
        // A server clock set back must not lengthen a session: a ticket earned after "now"
        // (beyond the skew allowed between servers) cannot be told how old it is.
        if claims.totp_time_ms > now.saturating_add(self.config.clock_skew_ms) {
            return Err(refuse(Cause::TicketFromTheFuture));
        }
        if claims.totp_time_ms < device.created_ms {
            return Err(refuse(Cause::TicketBeforeBinding));
        }
        // The ticket must also have a live record: revoking the record (`portcullis session
        // revoke`, a revoked device or user) ends the session, and a ticket whose record is
        // gone or does not match is not one this server issued.
        let Some(record) = record.filter(|r| r.id == claims.id) else {
            return Err(refuse(Cause::TicketInvalid));
        };
        if record.revoked_ms.is_some() {
            return Err(refuse(Cause::TicketRevoked));
        }
        if record.user != claims.user
            || record.fingerprint != claims.fingerprint
            || record.totp_time_ms != claims.totp_time_ms
            || record.expires_ms != claims.expires_ms
        {
            return Err(refuse(Cause::TicketInvalid));
        }
        if !record.is_live(now) {
            return Err(refuse(Cause::TicketExpired));
        }
        let Some(user) = user else {
            return Err(refuse(Cause::TicketInvalid));
        };
        let identity = identity(
            device,
            &user,
            AuthMethod::Session,
            claims.totp_time_ms,
            Some((claims.id, claims.expires_ms)),
        );
        Ok((identity, Some((ticket.to_vec(), claims.expires_ms))))
    }

    /// The code against the snapshot. Whatever the code, the result is one write: a matching
    /// step to accept ([`Effects::AcceptStep`]), or a failure to charge
    /// ([`Effects::ChargeFailure`]) for a wrong code, a reused one, or a user without a factor.
    fn check_totp(
        &self,
        code: &str,
        device: &DeviceRecord,
        user: Option<UserState>,
        now: u64,
        effects: &mut Effects,
    ) -> Result<Accepted, Refusal> {
        let Some(user) = user else {
            return Err(mfa_failed(Cause::NoFactor));
        };
        let lockout = self.config.lockout;
        let charge = Effects::ChargeFailure {
            user: user.name.clone(),
            now_ms: now,
            lockout,
        };
        let Some(totp) = user.totp.as_ref() else {
            if user.has_totp {
                // The store has a secret but did not give it: it failed, not the client.
                // Refused without a charge (fail closed).
                return Err(Refusal::from(RegistryError::Backend(format!(
                    "the TOTP secret of {} was asked for and not returned",
                    user.name
                ))));
            }
            *effects = charge;
            return Err(mfa_failed(Cause::NoFactor));
        };
        let Some(step) = totp.matching_step(code, now / 1000) else {
            *effects = charge;
            return Err(mfa_failed(Cause::CodeWrong));
        };
        if user.last_step.is_some_and(|last| last >= step) {
            // Already accepted (this step or a later one): no guess of the secret, no charge.
            return Err(code_reused());
        }
        let session = match self.config.session_ttl_ms {
            Some(ttl) => {
                let cannot_issue = |_| {
                    Refusal::new(
                        RejectCode::Overloaded,
                        Cause::Random,
                        "the server could not issue a session; retry shortly",
                    )
                    .retry_after(5)
                };
                let mut id = [0u8; 16];
                self.rng.fill(&mut id).map_err(|e| cannot_issue(e.into()))?;
                let claims = SessionClaims {
                    id: SessionId(id),
                    user: user.name.clone(),
                    fingerprint: device.fingerprint,
                    totp_time_ms: now,
                    expires_ms: now.saturating_add(ttl),
                };
                let ticket = self
                    .tickets()
                    .seal(&claims, self.rng.as_ref())
                    .map_err(cannot_issue)?;
                Some((claims, ticket))
            }
            None => None,
        };
        *effects = Effects::AcceptStep {
            user: user.name.clone(),
            step,
            now_ms: now,
            lockout,
            session: session.as_ref().map(|(c, _)| SessionRecord {
                id: c.id,
                user: c.user.clone(),
                fingerprint: c.fingerprint,
                totp_time_ms: c.totp_time_ms,
                expires_ms: c.expires_ms,
                revoked_ms: None,
            }),
        };
        let identity = identity(
            device,
            &user,
            AuthMethod::Totp,
            now,
            session.as_ref().map(|(c, _)| (c.id, c.expires_ms)),
        );
        Ok((identity, session.map(|(c, t)| (t, c.expires_ms))))
    }

    /// Section 7 on the snapshot: the device must be bound and not revoked, its user not locked
    /// out, and the device must hold a live session (a service account's device needs none).
    fn check_standard(
        &self,
        fp: &DeviceFingerprint,
        snapshot: Snapshot,
        now: u64,
    ) -> Result<Identity, Refusal> {
        let Some(device) = snapshot.device else {
            return Err(Refusal::new(
                RejectCode::DeviceUnknown,
                Cause::DeviceUnknown,
                format!(
                    "device {fp} is bound to no user; bind it with portcullis device bind, then \
                     run portcullis login"
                ),
            ));
        };
        if device.is_revoked() {
            return Err(Refusal::new(
                RejectCode::DeviceRevoked,
                Cause::DeviceRevoked,
                format!(
                    "device {} ({fp}) was revoked; use a device that is bound to you",
                    device.name
                ),
            ));
        }
        let user = snapshot.user;
        let lock: LockState = user.as_ref().map(|u| u.lock).unwrap_or_default();
        if let Some(left) = lock.remaining_ms(now) {
            return Err(locked_out(&device.user, left));
        }
        // A service account has no second factor: a bound, non-revoked device of it is let in
        // on its key alone, without a session. The per-method policy then admits it only to the
        // methods a rule grants it by name or role.
        if let Some(user) = &user
            && user.service
        {
            return Ok(identity(&device, user, AuthMethod::Device, now, None));
        }
        if self.config.session_ttl_ms.is_none() {
            return Err(Refusal::new(
                RejectCode::MfaRequired,
                Cause::SessionsDisabled,
                "sessions are off on this server, so a standard gRPC client cannot be let in; \
                 use a Portcullis client",
            ));
        }
        let no_session = |cause: Cause| {
            Refusal::new(
                RejectCode::MfaRequired,
                cause,
                format!(
                    "no live session for device {} ({fp}); run portcullis login",
                    device.name
                ),
            )
        };
        let session = snapshot
            .session
            .ok_or_else(|| no_session(Cause::NoLiveSession))?;
        // The store answers for the active binding; checked again here, fail closed.
        if session.user != device.user || session.fingerprint != device.fingerprint {
            return Err(no_session(Cause::TicketNotForThisDevice));
        }
        if session.totp_time_ms < device.created_ms {
            return Err(no_session(Cause::TicketBeforeBinding));
        }
        if !session.is_live(now) {
            return Err(no_session(Cause::TicketExpired));
        }
        if session.totp_time_ms > now.saturating_add(self.config.clock_skew_ms) {
            return Err(no_session(Cause::TicketFromTheFuture));
        }
        let Some(user) = user else {
            return Err(no_session(Cause::NoFactor));
        };
        Ok(identity(
            &device,
            &user,
            AuthMethod::Session,
            session.totp_time_ms,
            Some((session.id, session.expires_ms)),
        ))
    }
}

/// The identity of an accepted connection.
fn identity(
    device: &DeviceRecord,
    user: &UserState,
    method: AuthMethod,
    totp_time_ms: u64,
    session: Option<(SessionId, u64)>,
) -> Identity {
    Identity {
        user: user.name.clone(),
        device_name: device.name.clone(),
        fingerprint: device.fingerprint,
        method,
        totp_time_ms,
        session,
        roles: user.roles.clone(),
    }
}
