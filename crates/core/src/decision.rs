//! The ordered decision of PROTOCOL.md section 5, step 4: first failure wins.
//!
//! [`Gate::decide`] takes the Prefix frame and what the TLS layer knows of the connection (its
//! exporter and the client certificate's fingerprint) and returns the [`Decision`]: the Verdict
//! to write, the identity on accept, and on reject the precise internal [`Cause`] for the audit
//! record (the client only learns the reject code).

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::codec::{DecodeError, Factor, Prefix, Verdict};
use crate::{
    Clock, DeviceFingerprint, DeviceRecord, LockoutPolicy, NonceError, NonceStore, Random,
    Registry, RegistryError, RejectCode, SessionClaims, SessionId, SessionRecord, TicketKey,
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
    /// The ticket belongs to another user or device.
    TicketNotForThisDevice,
    /// The ticket was earned before the current device binding.
    TicketBeforeBinding,
    /// The session's record was revoked.
    TicketRevoked,
    /// The connection policy refused the authenticated identity.
    PolicyDenied,
    /// The registry failed; the connection is refused (fail closed).
    Registry(String),
    /// The random source failed while sealing a ticket.
    Random,
    /// A cause decided outside the core (server limits, deadline, ALPN, ...).
    Other(&'static str),
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
            Self::TicketNotForThisDevice => "ticket_not_for_this_device",
            Self::TicketBeforeBinding => "ticket_before_binding",
            Self::TicketRevoked => "ticket_revoked",
            Self::PolicyDenied => "policy_denied",
            Self::Registry(_) => "registry_error",
            Self::Random => "random_failure",
            Self::Other(name) => name,
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

fn seconds_ceil(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// The sans-IO gate: holds the registry, the nonce store, the ticket key, the clock and the
/// random source, and decides each Prefix in the order of PROTOCOL.md section 5.
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
/// let gate = Gate::new(GateConfig::default(), registry, key, clock, rng);
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
/// let decision = gate.decide(&prefix.encode().unwrap(), &facts);
/// assert_eq!(decision.outcome.unwrap().method, AuthMethod::Totp);
/// ```
pub struct Gate {
    config: GateConfig,
    registry: Arc<dyn Registry>,
    nonces: NonceStore,
    tickets: TicketKey,
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
        registry: Arc<dyn Registry>,
        tickets: TicketKey,
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
            registry,
            tickets,
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

    /// The registry.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
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

    /// Decides one Prefix frame (header and body) for a connection.
    pub fn decide(&self, frame: &[u8], facts: &ConnectionFacts) -> Decision {
        match Prefix::decode(frame) {
            Ok(prefix) => self.decide_prefix(&prefix, facts),
            Err(e) => self.refuse_decode(e),
        }
    }

    /// Decides an already decoded Prefix (steps 4.2 to 4.7).
    pub fn decide_prefix(&self, prefix: &Prefix, facts: &ConnectionFacts) -> Decision {
        let now = self.clock.now_ms();
        let reference = Ref::generate(self.rng.as_ref(), now);
        let claimed_user = Some(prefix.user.clone());
        let agent = prefix.agent.clone();
        let checked = self
            .check(prefix, facts, now)
            .and_then(|(identity, session)| {
                self.apply_policy(&identity)?;
                Ok((identity, session))
            })
            .and_then(|(identity, session)| {
                // A new session is recorded once the connection is sure to be accepted (a
                // session the policy refused must not let a standard client in), and no ticket
                // goes out without its record: a registry failure refuses (fail closed).
                if let (AuthMethod::Totp, Some((id, expires_ms))) =
                    (identity.method, identity.session)
                {
                    self.registry.record_session(&SessionRecord {
                        id,
                        user: identity.user.clone(),
                        fingerprint: identity.fingerprint,
                        totp_time_ms: identity.totp_time_ms,
                        expires_ms,
                        revoked_ms: None,
                    })?;
                }
                Ok((identity, session))
            });
        Self::decision(now, reference, claimed_user, agent, checked)
    }

    /// Decides a standard gRPC client (PROTOCOL.md section 7): a connection that negotiated
    /// ALPN `h2` and sends no Prefix, judged on its client certificate's fingerprint alone.
    /// The device must be bound and not revoked, its user not locked out, and the device must
    /// hold a live session in the registry (a service account's device needs none); the
    /// connection policy then applies. The decision's `claimed_user` is the user the device is
    /// bound to, when known; its Verdict is what a refusal's gRPC status carries.
    pub fn decide_standard(&self, fingerprint: &DeviceFingerprint) -> Decision {
        let now = self.clock.now_ms();
        let reference = Ref::generate(self.rng.as_ref(), now);
        let mut user = None;
        let checked = self
            .check_standard(fingerprint, now, &mut user)
            .and_then(|identity| {
                self.apply_policy(&identity)?;
                Ok((identity, None))
            });
        Self::decision(now, reference, user, None, checked)
    }

    fn check_standard(
        &self,
        fp: &DeviceFingerprint,
        now: u64,
        user: &mut Option<String>,
    ) -> Result<Identity, Refusal> {
        let device = self.registry.device_by_fingerprint(fp)?.ok_or_else(|| {
            Refusal::new(
                RejectCode::DeviceUnknown,
                Cause::DeviceUnknown,
                format!(
                    "device {fp} is bound to no user; bind it with portcullis device bind, then run \
                     portcullis login"
                ),
            )
        })?;
        *user = Some(device.user.clone());
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
        if let Some(left) = self.registry.lock_state(&device.user)?.remaining_ms(now) {
            return Err(locked_out(&device.user, left));
        }
        // A service account has no second factor: a bound, non-revoked device of it is let in
        // on its key alone, without a session. The per-method policy then admits it only to the
        // methods a rule grants it by name or role.
        if self.registry.user(&device.user)?.is_some_and(|u| u.service) {
            return Ok(Identity {
                user: device.user.clone(),
                device_name: device.name.clone(),
                fingerprint: device.fingerprint,
                method: AuthMethod::Device,
                totp_time_ms: now,
                session: None,
            });
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
        let session = self
            .registry
            .live_session_for_device(fp, now)?
            .ok_or_else(|| no_session(Cause::Other("no_live_session")))?;
        // The registry answers for the active binding; checked again here, fail closed.
        if session.user != device.user || session.fingerprint != device.fingerprint {
            return Err(no_session(Cause::TicketNotForThisDevice));
        }
        if session.totp_time_ms < device.created_ms {
            return Err(no_session(Cause::TicketBeforeBinding));
        }
        if !session.is_live(now) {
            return Err(no_session(Cause::TicketExpired));
        }
        Ok(Identity {
            user: device.user,
            device_name: device.name,
            fingerprint: device.fingerprint,
            method: AuthMethod::Session,
            totp_time_ms: session.totp_time_ms,
            session: Some((session.id, session.expires_ms)),
        })
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
    #[allow(clippy::type_complexity)]
    fn decision(
        now: u64,
        reference: Ref,
        claimed_user: Option<String>,
        agent: Option<String>,
        checked: Result<(Identity, Option<(Vec<u8>, u64)>), Refusal>,
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

    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        prefix: &Prefix,
        facts: &ConnectionFacts,
        now: u64,
    ) -> Result<(Identity, Option<(Vec<u8>, u64)>), Refusal> {
        // 4.2 channel binding, in constant time.
        if !bool::from(prefix.binding.ct_eq(&facts.exporter)) {
            return Err(Refusal::new(
                RejectCode::BindingMismatch,
                Cause::BindingMismatch,
                "BINDING is not this TLS connection's exporter: something between client and \
                 server terminates TLS (a proxy or load balancer); connect directly",
            ));
        }
        // 4.3 clock skew.
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
        // 4.4 device binding.
        let device = self.device(prefix, facts)?;
        // 4.5 lockout.
        let lock = self.registry.lock_state(&prefix.user)?;
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
        if let Some(user) = self.registry.user(&prefix.user)?
            && user.service
        {
            let identity = Identity {
                user: user.name,
                device_name: device.name.clone(),
                fingerprint: device.fingerprint,
                method: AuthMethod::Device,
                totp_time_ms: now,
                session: None,
            };
            return Ok((identity, None));
        }
        match &prefix.factor {
            Factor::Session(ticket) => self.check_session(ticket, prefix, &device, now),
            Factor::Totp(code) => self.check_totp(code, prefix, &device, now),
        }
    }

    fn device(&self, prefix: &Prefix, facts: &ConnectionFacts) -> Result<DeviceRecord, Refusal> {
        let fp = facts.fingerprint;
        let device = self.registry.device_by_fingerprint(&fp)?.ok_or_else(|| {
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
        Ok(device)
    }

    #[allow(clippy::type_complexity)]
    fn check_session(
        &self,
        ticket: &[u8],
        prefix: &Prefix,
        device: &DeviceRecord,
        now: u64,
    ) -> Result<(Identity, Option<(Vec<u8>, u64)>), Refusal> {
        let refuse = |cause: Cause| {
            Refusal::new(
                RejectCode::MfaRequired,
                cause,
                "the session is expired, revoked or not valid for this device; send a one-time code",
            )
        };
        if self.config.session_ttl_ms.is_none() {
            return Err(refuse(Cause::SessionsDisabled));
        }
        let claims: SessionClaims = self
            .tickets
            .open(ticket)
            .ok_or_else(|| refuse(Cause::TicketInvalid))?;
        if claims.user != prefix.user || claims.fingerprint != device.fingerprint {
            return Err(refuse(Cause::TicketNotForThisDevice));
        }
        if claims.expires_ms <= now {
            return Err(refuse(Cause::TicketExpired));
        }
        if claims.totp_time_ms < device.created_ms {
            return Err(refuse(Cause::TicketBeforeBinding));
        }
        // The ticket must also have a live record: revoking the record (`portcullis session
        // revoke`, a revoked device or user) ends the session, and a ticket whose record is
        // gone or does not match is not one this server issued.
        let Some(record) = self.registry.session(&claims.id)? else {
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
        let identity = Identity {
            user: claims.user,
            device_name: device.name.clone(),
            fingerprint: device.fingerprint,
            method: crate::AuthMethod::Session,
            totp_time_ms: claims.totp_time_ms,
            session: Some((claims.id, claims.expires_ms)),
        };
        Ok((identity, Some((ticket.to_vec(), claims.expires_ms))))
    }

    #[allow(clippy::type_complexity)]
    fn check_totp(
        &self,
        code: &str,
        prefix: &Prefix,
        device: &DeviceRecord,
        now: u64,
    ) -> Result<(Identity, Option<(Vec<u8>, u64)>), Refusal> {
        let mfa_failed = |cause| {
            Refusal::new(
                RejectCode::MfaFailed,
                cause,
                "the one-time code was not accepted",
            )
        };
        let Some(user) = self.registry.user(&prefix.user)? else {
            return Err(mfa_failed(Cause::NoFactor));
        };
        // Charge the attempt as a failure before the code is checked, in one atomic step with
        // the lock check: attempts racing each other cannot all find the user unlocked, and
        // a registry failure refuses before the code is tried. A success clears the count.
        let policy = self.config.lockout;
        let mut locked_for = None;
        self.registry.update_lock_state(
            &prefix.user,
            &mut |state| match state.remaining_ms(now) {
                Some(left) => {
                    locked_for = Some(left);
                    state
                }
                None => policy.after_failure(state, now),
            },
        )?;
        if let Some(left) = locked_for {
            return Err(locked_out(&prefix.user, left));
        }
        let Some(totp) = user.totp.as_ref() else {
            return Err(mfa_failed(Cause::NoFactor));
        };
        match totp.matching_step(code, now / 1000) {
            None => return Err(mfa_failed(Cause::CodeWrong)),
            // Single use and "a success clears the count" in one registry change.
            Some(step) => {
                if !self.registry.accept_totp_step(&prefix.user, step)? {
                    return Err(mfa_failed(Cause::CodeReused));
                }
            }
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
                    user: prefix.user.clone(),
                    fingerprint: device.fingerprint,
                    totp_time_ms: now,
                    expires_ms: now.saturating_add(ttl),
                };
                let ticket = self
                    .tickets
                    .seal(&claims, self.rng.as_ref())
                    .map_err(cannot_issue)?;
                Some((claims, ticket))
            }
            None => None,
        };
        let identity = Identity {
            user: prefix.user.clone(),
            device_name: device.name.clone(),
            fingerprint: device.fingerprint,
            method: crate::AuthMethod::Totp,
            totp_time_ms: now,
            session: session.as_ref().map(|(c, _)| (c.id, c.expires_ms)),
        };
        Ok((identity, session.map(|(c, t)| (t, c.expires_ms))))
    }
}
