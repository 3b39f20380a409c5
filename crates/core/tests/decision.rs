//! The gate's decision against PROTOCOL.md section 5 step 4 and section 6: every reject code the
//! core decides with its internal cause, the order of the checks (first failure wins, and a
//! refusal consumes nothing a later step would), single use of a code per time step, lockout,
//! sessions, the REASON rules of section 4, and the four phases (plan, fetch, decide, commit)
//! with what each of them reads and writes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};

use portcullis_core::codec::{DecodeError, Factor, Prefix, Verdict};
use portcullis_core::store::ready;
use portcullis_core::*;

/// The start of a 30-second TOTP step (1_699_999_980 is a multiple of 30).
const T0: u64 = 1_699_999_980_000;
const STEP_MS: u64 = 30_000;
const EXPORTER: [u8; 32] = [0x5e; 32];
const TICKET_KEY: [u8; 32] = [0x42; 32];
const ALICE_SECRET: &[u8] = b"alice-secret-0123456789";
const BOB_SECRET: &[u8] = b"bob-secret-9876543210xyz";

// Fingerprints whose hex is all letters, so that a REASON naming a device can never contain a
// string of code digits by accident.
const LAPTOP: DeviceFingerprint = DeviceFingerprint::from_bytes([0xab; 32]);
const PHONE: DeviceFingerprint = DeviceFingerprint::from_bytes([0xcd; 32]);
const BOB_DESK: DeviceFingerprint = DeviceFingerprint::from_bytes([0xef; 32]);
const STRANGER: DeviceFingerprint = DeviceFingerprint::from_bytes([0xee; 32]);

fn totp_config(secret: &[u8]) -> TotpConfig {
    TotpConfig::new(secret.to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap()
}

/// Runs a future that must be ready at once: the core has no runtime, and the memory
/// registry's futures (and so the gate's, over it) never wait.
#[track_caller]
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

/// A registry around [`MemoryRegistry`] that can make a user factorless or fail entirely, and
/// counts the gate's reads and writes.
struct Wrapped {
    inner: MemoryRegistry,
    no_factor_user: &'static str,
    /// Makes every call fail.
    broken: AtomicBool,
    /// Makes the session table unreachable: the session-store calls, a snapshot that reads a
    /// session, and a commit that records one fail.
    records_broken: AtomicBool,
    /// [`GateStore::snapshot`] calls.
    snapshots: AtomicUsize,
    /// [`GateStore::commit`] calls.
    commits: AtomicUsize,
}

impl Wrapped {
    fn check(&self) -> Result<(), RegistryError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(RegistryError::Backend("database is unreachable".into()));
        }
        Ok(())
    }

    fn check_records(&self) -> Result<(), RegistryError> {
        self.check()?;
        if self.records_broken.load(Ordering::SeqCst) {
            return Err(RegistryError::Backend(
                "session table is unreachable".into(),
            ));
        }
        Ok(())
    }

    fn new(no_factor_user: &'static str) -> Self {
        Self {
            inner: MemoryRegistry::new(),
            no_factor_user,
            broken: AtomicBool::new(false),
            records_broken: AtomicBool::new(false),
            snapshots: AtomicUsize::new(0),
            commits: AtomicUsize::new(0),
        }
    }

    /// (snapshots, commits) so far.
    fn io(&self) -> (usize, usize) {
        (
            self.snapshots.load(Ordering::SeqCst),
            self.commits.load(Ordering::SeqCst),
        )
    }

    fn read(&self, need: &Need) -> Result<Snapshot, RegistryError> {
        self.check()?;
        if need.session != SessionNeed::None {
            self.check_records()?;
        }
        let mut snapshot = self.inner.snapshot_now(need)?;
        if let Some(user) = snapshot
            .user
            .as_mut()
            .filter(|u| u.name == self.no_factor_user)
        {
            user.totp = None;
            user.has_totp = false;
        }
        Ok(snapshot)
    }

    fn write(&self, effects: &Effects) -> Result<Committed, RegistryError> {
        self.check()?;
        if let Effects::AcceptStep {
            session: Some(_), ..
        } = effects
        {
            self.check_records()?;
        }
        self.inner.commit_now(effects)
    }
}

impl GateStore for Wrapped {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        ready(self.read(need))
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        ready(self.write(effects))
    }
}

impl SessionStore for Wrapped {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.check_records()?;
        self.inner.session(id)
    }
    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        self.check_records()?;
        self.inner.live_session_for_device(fingerprint, now_ms)
    }
    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        self.check_records()?;
        self.inner.list_sessions(now_ms)
    }
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.check_records()?;
        self.inner.revoke_session(id, now_ms)
    }
}

impl Admin for Wrapped {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.check()?;
        Ok(self.inner.user(name)?.map(|mut u| {
            if u.name == self.no_factor_user {
                u.totp = None;
            }
            u
        }))
    }
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.check()?;
        self.inner.lock_state(user)
    }
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        self.check()?;
        self.inner.user_roles(user)
    }
    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        self.check()?;
        self.inner.set_user_roles(user, roles)
    }
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        self.check()?;
        self.inner.add_user(name, totp, now_ms)
    }
    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.check()?;
        self.inner.add_service_user(name, now_ms)
    }
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.check()?;
        self.inner.device_by_fingerprint(fingerprint)
    }
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.check()?;
        self.inner.device_by_name(name)
    }
    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        self.check()?;
        self.inner.bind_device(name, user, fingerprint, now_ms)
    }
    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        self.check()?;
        self.inner.revoke_device(name, now_ms)
    }
    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.check()?;
        self.inner.revoke_user(user, now_ms)
    }
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        self.check()?;
        self.inner.list_users()
    }
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.check()?;
        self.inner.list_devices()
    }
}

/// A gate over a registry with alice (laptop, phone) and bob (desk), a manual clock at [`T0`]
/// and the system random source.
struct World {
    gate: Arc<Gate>,
    registry: Arc<dyn Registry>,
    clock: Arc<ManualClock>,
    next_nonce: AtomicU64,
}

impl World {
    fn new() -> Self {
        Self::with_config(GateConfig::default())
    }

    fn with_config(config: GateConfig) -> Self {
        Self::build(config, Arc::new(MemoryRegistry::new()))
    }

    fn build(config: GateConfig, registry: Arc<dyn Registry>) -> Self {
        let day = 86_400_000;
        registry
            .add_user("alice", totp_config(ALICE_SECRET), T0 - day)
            .unwrap();
        registry
            .add_user("bob", totp_config(BOB_SECRET), T0 - day)
            .unwrap();
        registry
            .bind_device("laptop", "alice", &LAPTOP, T0 - day)
            .unwrap();
        registry
            .bind_device("phone", "alice", &PHONE, T0 - day)
            .unwrap();
        registry
            .bind_device("desk", "bob", &BOB_DESK, T0 - day)
            .unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let world = Self {
            gate: Arc::new(Gate::new(
                config,
                registry.clone(),
                TicketKey::from_bytes(&TICKET_KEY).unwrap(),
                clock.clone(),
                Arc::new(SystemRandom::new()),
            )),
            registry,
            clock,
            next_nonce: AtomicU64::new(1),
        };
        assert_eq!(world.gate.config(), &config);
        world
    }

    /// Another gate on the same registry, clock and ticket key, with other settings.
    fn sibling(&self, config: GateConfig) -> Gate {
        Gate::new(
            config,
            self.registry.clone(),
            TicketKey::from_bytes(&TICKET_KEY).unwrap(),
            self.clock.clone(),
            Arc::new(SystemRandom::new()),
        )
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn advance(&self, ms: u64) {
        self.clock.advance_ms(ms);
    }

    fn secret(user: &str) -> &'static [u8] {
        if user == "bob" {
            BOB_SECRET
        } else {
            ALICE_SECRET
        }
    }

    /// The valid code for `user` at the current time.
    fn code(&self, user: &str) -> String {
        self.code_at(user, self.now())
    }

    fn code_at(&self, user: &str, ms: u64) -> String {
        totp_config(Self::secret(user)).generate(ms / 1000)
    }

    /// A well-formed code that matches no step of the current window.
    fn wrong_code(&self, user: &str) -> String {
        let totp = totp_config(Self::secret(user));
        (0..1_000_000u32)
            .map(|n| format!("{n:06}"))
            .find(|c| totp.matching_step(c, self.now() / 1000).is_none())
            .unwrap()
    }

    fn nonce(&self) -> [u8; 16] {
        let n = self.next_nonce.fetch_add(1, Ordering::SeqCst);
        let mut nonce = [0x77; 16];
        nonce[8..].copy_from_slice(&n.to_be_bytes());
        nonce
    }

    fn prefix(&self, user: &str, factor: Factor) -> Prefix {
        Prefix {
            user: user.into(),
            factor,
            nonce: self.nonce(),
            time_ms: self.now(),
            binding: EXPORTER,
            agent: Some("decision-tests/1".into()),
        }
    }

    fn totp(&self, user: &str, code: &str) -> Prefix {
        self.prefix(user, Factor::Totp(code.into()))
    }

    fn session(&self, user: &str, ticket: &[u8]) -> Prefix {
        self.prefix(user, Factor::Session(ticket.to_vec()))
    }

    /// Decides `prefix` from the device `fp` on this world's gate.
    fn decide(&self, prefix: &Prefix, fp: DeviceFingerprint) -> Decision {
        self.decide_on(&self.gate, prefix, fp)
    }

    /// Decides on `gate` and checks what holds for every decision.
    fn decide_on(&self, gate: &Gate, prefix: &Prefix, fp: DeviceFingerprint) -> Decision {
        let facts = ConnectionFacts {
            exporter: EXPORTER,
            fingerprint: fp,
        };
        let d = at_once(gate.authenticate(&prefix.encode().unwrap(), &facts));
        check_invariants(&d, Some(prefix), self.now());
        d
    }

    /// Whether the recorded session with this id is revoked.
    fn is_revoked(&self, id: &SessionId) -> bool {
        let record = self.registry.session(id).unwrap();
        record.expect("a recorded session").revoked_ms.is_some()
    }

    /// Accepts a fresh TOTP Prefix for `user` from `fp`: the identity and the session ticket.
    fn login(&self, user: &str, fp: DeviceFingerprint) -> (Identity, Option<(Vec<u8>, u64)>) {
        let d = self.decide(&self.totp(user, &self.code(user)), fp);
        let identity = d.outcome.clone().unwrap();
        (identity, d.verdict.session)
    }

    /// Phase 1 for `prefix` from `fp` on this world's gate: the plan, when there is state to
    /// read.
    #[track_caller]
    fn plan(&self, prefix: &Prefix, fp: DeviceFingerprint) -> Plan {
        match self.gate.plan(&prefix.encode().unwrap(), &facts(fp)) {
            Planned::Fetch(plan) => plan,
            Planned::Decided(d) => panic!("decided in phase 1: {:?}", d.outcome),
        }
    }

    /// Phases 2 and 3: the snapshot `plan` needs, read from this world's registry, and judged.
    fn fetch_and_decide(&self, plan: Plan) -> Outcome {
        let snapshot = at_once(self.registry.snapshot(plan.need()));
        self.gate.decide(plan, snapshot)
    }

    /// Phase 4: commits the outcome's effects through the gate and finishes the decision.
    fn commit_and_finish(&self, outcome: Outcome, prefix: &Prefix) -> Decision {
        let committed = at_once(self.gate.commit(&outcome));
        let d = self.gate.finish(outcome, committed);
        check_invariants(&d, Some(prefix), self.now());
        d
    }
}

/// What TLS knows of a connection from the device `fp`.
fn facts(fingerprint: DeviceFingerprint) -> ConnectionFacts {
    ConnectionFacts {
        exporter: EXPORTER,
        fingerprint,
    }
}

/// What every Decision must satisfy, accepted or not.
#[track_caller]
fn check_invariants(d: &Decision, prefix: Option<&Prefix>, now: u64) {
    let v = &d.verdict;
    assert_eq!(v.reference, d.reference.0);
    assert_eq!(v.server_time_ms, now);
    assert_eq!(Verdict::decode(&v.encode().unwrap()).unwrap(), *v);
    assert_eq!(d.claimed_user, prefix.map(|p| p.user.clone()));
    assert_eq!(d.is_accepted(), d.outcome.is_ok());
    match &d.outcome {
        Ok(identity) => {
            assert!(v.is_accepted());
            assert_eq!(v.reason, None);
            assert_eq!(v.retry_after_s, None);
            assert_eq!(
                v.session.as_ref().map(|(_, exp)| *exp),
                identity.session.map(|(_, exp)| exp)
            );
        }
        Err(rejection) => {
            assert_eq!(v.status, rejection.code.as_u8());
            assert_eq!(v.reject_code(), Some(rejection.code));
            assert_eq!(v.session, None);
            assert_eq!(
                v.retry_after_s.is_some(),
                rejection.code.has_retry_after(),
                "{rejection:?}"
            );
            let reason = v.reason.as_deref().expect("a reject carries REASON");
            assert!(
                reason.starts_with(&format!("{}: ", rejection.code.name())),
                "{reason}"
            );
            assert!(reason.len() > rejection.code.name().len() + 2, "{reason}");
            assert!(reason.len() <= 256, "{} bytes: {reason}", reason.len());
            // Never a secret: not the code, not the TOTP secrets, not the ticket.
            for secret in [ALICE_SECRET, BOB_SECRET] {
                assert!(!reason.contains(&hex::encode(secret)), "{reason}");
                assert!(
                    !reason.contains(&totp_config(secret).secret_base32()),
                    "{reason}"
                );
                assert!(!reason.contains(std::str::from_utf8(secret).unwrap()));
            }
            match prefix.map(|p| &p.factor) {
                Some(Factor::Totp(code)) => {
                    assert!(!reason.contains(code.as_str()), "{reason}");
                    assert!(!format!("{rejection:?}").contains(code.as_str()));
                }
                Some(Factor::Session(ticket)) => {
                    assert!(!reason.contains(&hex::encode(ticket)), "{reason}");
                }
                // These tests build only TOTP and SESSION Prefixes.
                Some(other) => panic!("a factor these tests never send: {other:?}"),
                None => {}
            }
        }
    }
}

#[track_caller]
fn expect(d: &Decision, code: RejectCode, cause: Cause) {
    assert_eq!(
        d.outcome,
        Err(Rejection { code, cause }),
        "reason: {:?}",
        d.verdict.reason
    );
}

#[track_caller]
fn expect_accept(d: &Decision) -> Identity {
    match &d.outcome {
        Ok(identity) => identity.clone(),
        Err(r) => panic!("expected accept, got {r:?}: {:?}", d.verdict.reason),
    }
}

fn reason(d: &Decision) -> &str {
    d.verdict.reason.as_deref().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Acceptance and sessions.

#[test]
fn a_totp_accept_issues_a_session_ticket_and_the_ticket_is_accepted() {
    let w = World::new();
    let code = w.code("alice");
    let d = w.decide(&w.totp("alice", &code), LAPTOP);
    let id = expect_accept(&d);
    assert_eq!(id.user, "alice");
    assert_eq!(id.device_name, "laptop");
    assert_eq!(id.fingerprint, LAPTOP);
    assert_eq!(id.method, AuthMethod::Totp);
    assert_eq!(id.totp_time_ms, T0);
    let (session_id, expires) = id.session.unwrap();
    assert_eq!(expires, T0 + 3_600_000);
    assert_eq!(d.verdict.status, 0);
    let (ticket, verdict_expires) = d.verdict.session.clone().unwrap();
    assert_eq!(verdict_expires, T0 + 3_600_000);
    assert!(!ticket.is_empty() && ticket.len() <= 1024);
    assert!(!ticket.windows(code.len()).any(|w| w == code.as_bytes()));
    assert!(!format!("{d:?}").contains(&hex::encode(&ticket)));

    // Ten minutes later the ticket opens the door without a code.
    w.advance(600_000);
    let d = w.decide(&w.session("alice", &ticket), LAPTOP);
    let sid = expect_accept(&d);
    assert_eq!(sid.user, "alice");
    assert_eq!(sid.device_name, "laptop");
    assert_eq!(sid.fingerprint, LAPTOP);
    assert_eq!(sid.method, AuthMethod::Session);
    assert_eq!(sid.totp_time_ms, T0, "the time of the original TOTP check");
    assert_eq!(sid.session, Some((session_id, T0 + 3_600_000)));
    assert_eq!(d.verdict.session, Some((ticket.clone(), T0 + 3_600_000)));
    // And again, on as many connections as the client opens.
    let again = w.decide(&w.session("alice", &ticket), LAPTOP);
    assert_eq!(expect_accept(&again).method, AuthMethod::Session);
}

#[test]
fn the_session_lifetime_follows_the_config() {
    let w = World::with_config(GateConfig {
        session_ttl_ms: Some(300_000),
        ..GateConfig::default()
    });
    w.advance(12_345);
    let (id, session) = w.login("bob", BOB_DESK);
    assert_eq!(id.method, AuthMethod::Totp);
    assert_eq!(id.totp_time_ms, T0 + 12_345);
    assert_eq!(session.unwrap().1, T0 + 12_345 + 300_000);
    assert_eq!(id.session.unwrap().1, T0 + 12_345 + 300_000);
}

#[test]
fn sessions_turned_off_issue_no_ticket_and_refuse_tickets() {
    let w = World::new();
    let (_, session) = w.login("alice", LAPTOP);
    let (ticket, _) = session.unwrap();

    let off = w.sibling(GateConfig {
        session_ttl_ms: None,
        ..GateConfig::default()
    });
    let d = w.decide_on(&off, &w.session("alice", &ticket), LAPTOP);
    expect(&d, RejectCode::MfaRequired, Cause::SessionsDisabled);

    // A TOTP accept on that gate carries no session.
    w.advance(STEP_MS);
    let d = w.decide_on(&off, &w.totp("alice", &w.code("alice")), LAPTOP);
    let id = expect_accept(&d);
    assert_eq!(id.session, None);
    assert_eq!(d.verdict.session, None);

    // The ticket itself is good: the gate with sessions on still takes it.
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
}

// ---------------------------------------------------------------------------------------------
// Each reject code the core decides.

#[test]
fn malformed_and_unsupported_frames() {
    let w = World::new();
    let facts = ConnectionFacts {
        exporter: EXPORTER,
        fingerprint: LAPTOP,
    };
    let good = w.totp("alice", &w.code("alice")).encode().unwrap();

    let d = at_once(w.gate.authenticate(b"GET / HTTP/1.1\r\n\r\n", &facts));
    check_invariants(&d, None, w.now());
    assert!(matches!(
        &d.outcome,
        Err(Rejection {
            code: RejectCode::Malformed,
            cause: Cause::Decode(DecodeError::Malformed(_))
        })
    ));
    assert_eq!(d.claimed_user, None);

    let mut pcs2 = good.clone();
    pcs2[3] = b'2';
    let d = at_once(w.gate.authenticate(&pcs2, &facts));
    check_invariants(&d, None, w.now());
    assert!(matches!(
        &d.outcome,
        Err(Rejection {
            code: RejectCode::Unsupported,
            cause: Cause::Decode(DecodeError::Unsupported(_))
        })
    ));

    let verdict = Verdict::accept(1, [0; 16], None).encode().unwrap();
    let d = at_once(w.gate.authenticate(&verdict, &facts));
    check_invariants(&d, None, w.now());
    assert_eq!(
        d.outcome.as_ref().unwrap_err().code,
        RejectCode::Unsupported
    );

    let mut five_digits = Prefix {
        factor: Factor::Totp("123456".into()),
        ..w.totp("alice", "000000")
    }
    .encode()
    .unwrap();
    // Cut the TOTP value to 5 digits by editing its length and dropping a byte.
    let at = 7 + 3 + 5; // header, USER field header, "alice"
    assert_eq!(five_digits[at], 0x02);
    five_digits[at + 2] = 5;
    five_digits.remove(at + 3);
    let body = u16::try_from(five_digits.len() - 7).unwrap();
    five_digits[5..7].copy_from_slice(&body.to_be_bytes());
    let d = at_once(w.gate.authenticate(&five_digits, &facts));
    check_invariants(&d, None, w.now());
    assert!(matches!(
        &d.outcome,
        Err(Rejection {
            code: RejectCode::Malformed,
            cause: Cause::Decode(DecodeError::Malformed(_))
        })
    ));
    assert!(!reason(&d).contains("12345"));

    // A header refused before the body is read goes through refuse_decode.
    let err = codec::FrameHeader::parse(b"PCS1\x01\xff\xff", codec::FrameKind::Prefix).unwrap_err();
    let d = w.gate.refuse_decode(err);
    check_invariants(&d, None, w.now());
    assert_eq!(d.outcome.as_ref().unwrap_err().code, RejectCode::Malformed);

    // None of these consumed alice's step: the good frame is still accepted.
    expect_accept(&at_once(w.gate.authenticate(&good, &facts)));
}

#[test]
fn binding_mismatch() {
    let w = World::new();
    for flip in [0usize, 17, 31] {
        let mut p = w.totp("alice", &w.code("alice"));
        p.binding[flip] ^= 0x01;
        let d = w.decide(&p, LAPTOP);
        expect(&d, RejectCode::BindingMismatch, Cause::BindingMismatch);
        assert!(reason(&d).contains("TLS"), "{}", reason(&d));
    }
}

#[test]
fn clock_skew_on_both_sides_says_how_far_and_which_way() {
    let w = World::new();
    let mut ahead = w.totp("alice", &w.code("alice"));
    ahead.time_ms = T0 + 94_000;
    let d = w.decide(&ahead, LAPTOP);
    expect(&d, RejectCode::ClockSkew, Cause::ClockSkew(94_000));
    assert!(reason(&d).contains("94 s ahead of"), "{}", reason(&d));
    assert!(reason(&d).contains("60 s"), "{}", reason(&d));

    let mut behind = w.totp("alice", &w.code("alice"));
    behind.time_ms = T0 - 94_000;
    let d = w.decide(&behind, LAPTOP);
    expect(&d, RejectCode::ClockSkew, Cause::ClockSkew(-94_000));
    assert!(reason(&d).contains("94 s behind"), "{}", reason(&d));

    // Far off, in either direction, with no overflow.
    for time in [0, u64::MAX] {
        let mut p = w.totp("alice", &w.code("alice"));
        p.time_ms = time;
        let d = w.decide(&p, LAPTOP);
        assert_eq!(d.outcome.as_ref().unwrap_err().code, RejectCode::ClockSkew);
    }

    // The bounds: 60 s either way is allowed, one ms more is not.
    for off in [60_001i64, -60_001] {
        let mut p = w.totp("alice", &w.code("alice"));
        p.time_ms = T0.checked_add_signed(off).unwrap();
        expect(
            &w.decide(&p, LAPTOP),
            RejectCode::ClockSkew,
            Cause::ClockSkew(off),
        );
    }
    let mut p = w.totp("alice", &w.code("alice"));
    p.time_ms = T0 + 60_000;
    expect_accept(&w.decide(&p, LAPTOP));
    w.advance(STEP_MS);
    let mut p = w.totp("alice", &w.code("alice"));
    p.time_ms = w.now() - 60_000;
    expect_accept(&w.decide(&p, LAPTOP));
}

#[test]
fn clock_skew_follows_the_config() {
    let w = World::with_config(GateConfig {
        clock_skew_ms: 5_000,
        ..GateConfig::default()
    });
    let mut p = w.totp("alice", &w.code("alice"));
    p.time_ms = T0 - 6_000;
    let d = w.decide(&p, LAPTOP);
    expect(&d, RejectCode::ClockSkew, Cause::ClockSkew(-6_000));
    assert!(reason(&d).contains("6 s behind"), "{}", reason(&d));
    assert!(reason(&d).contains("allowed: 5 s"), "{}", reason(&d));
    let mut p = w.totp("alice", &w.code("alice"));
    p.time_ms = T0 + 5_000;
    expect_accept(&w.decide(&p, LAPTOP));
}

#[test]
fn device_unknown_revoked_and_user_mismatch() {
    let w = World::new();
    let d = w.decide(&w.totp("alice", &w.code("alice")), STRANGER);
    expect(&d, RejectCode::DeviceUnknown, Cause::DeviceUnknown);
    assert!(reason(&d).contains(&STRANGER.to_string()), "{}", reason(&d));

    // Bob's device claiming alice.
    let d = w.decide(&w.totp("alice", &w.code("alice")), BOB_DESK);
    expect(&d, RejectCode::UserMismatch, Cause::UserMismatch);
    // Alice's device claiming bob, with bob's valid code.
    let d = w.decide(&w.totp("bob", &w.code("bob")), LAPTOP);
    expect(&d, RejectCode::UserMismatch, Cause::UserMismatch);
    // A user nobody has heard of.
    let d = w.decide(&w.totp("mallory", "123456"), LAPTOP);
    expect(&d, RejectCode::UserMismatch, Cause::UserMismatch);

    w.registry.revoke_device("phone", T0).unwrap();
    let d = w.decide(&w.totp("alice", &w.code("alice")), PHONE);
    expect(&d, RejectCode::DeviceRevoked, Cause::DeviceRevoked);
    // The laptop is still fine.
    let (id, _) = w.login("alice", LAPTOP);
    assert_eq!(id.device_name, "laptop");
}

#[test]
fn replay_of_a_nonce() {
    let w = World::new();
    let p = w.totp("alice", &w.code("alice"));
    expect_accept(&w.decide(&p, LAPTOP));
    let d = w.decide(&p, LAPTOP);
    expect(&d, RejectCode::Replay, Cause::NonceReplay);
    // The same nonce with another, valid factor, from another device.
    w.advance(STEP_MS);
    let (_, session) = w.login("alice", PHONE);
    let mut again = w.session("alice", &session.unwrap().0);
    again.nonce = p.nonce;
    expect(
        &w.decide(&again, PHONE),
        RejectCode::Replay,
        Cause::NonceReplay,
    );
}

#[test]
fn a_replayed_frame_is_never_accepted_later() {
    // The client runs 60 s ahead (allowed) and sends a SESSION Prefix. Whenever the very same
    // frame comes again, either the nonce is still remembered or TIME is out of the skew.
    let w = World::new();
    let (_, session) = w.login("alice", LAPTOP);
    let mut p = w.session("alice", &session.unwrap().0);
    p.time_ms = T0 + 60_000;
    expect_accept(&w.decide(&p, LAPTOP));
    let mut last = T0;
    for at in [
        1u64, 59_999, 60_000, 119_999, 120_000, 120_001, 120_002, 180_000,
    ] {
        w.advance(at - (last - T0));
        last = T0 + at;
        w.gate.purge_expired();
        let d = w.decide(&p, LAPTOP);
        let code = d.outcome.as_ref().err().map(|r| r.code);
        assert!(
            matches!(code, Some(RejectCode::Replay | RejectCode::ClockSkew)),
            "replayed {at} ms later: {code:?} (None: accepted)"
        );
    }
}

#[test]
fn mfa_failed_for_a_wrong_code() {
    let w = World::new();
    let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    expect(&d, RejectCode::MfaFailed, Cause::CodeWrong);
    assert_eq!(reason(&d), "mfa_failed: the one-time code was not accepted");
    // Bob's current code is not alice's.
    let bobs = w.code("bob");
    if totp_config(ALICE_SECRET)
        .matching_step(&bobs, T0 / 1000)
        .is_none()
    {
        expect(
            &w.decide(&w.totp("alice", &bobs), LAPTOP),
            RejectCode::MfaFailed,
            Cause::CodeWrong,
        );
    }
    // Two steps old, or two steps ahead: outside the window.
    for ms in [T0 - 2 * STEP_MS, T0 + 2 * STEP_MS] {
        let code = w.code_at("alice", ms);
        assert_eq!(
            totp_config(ALICE_SECRET).matching_step(&code, T0 / 1000),
            None
        );
        expect(
            &w.decide(&w.totp("alice", &code), LAPTOP),
            RejectCode::MfaFailed,
            Cause::CodeWrong,
        );
    }
    // One step ahead is inside the window.
    expect_accept(&w.decide(&w.totp("alice", &w.code_at("alice", T0 + STEP_MS)), LAPTOP));
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);
}

#[test]
fn mfa_failed_for_a_reused_code() {
    let w = World::new();
    let code = w.code("alice");
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
    let d = w.decide(&w.totp("alice", &code), LAPTOP);
    expect(&d, RejectCode::MfaFailed, Cause::CodeReused);
    // Its own hint: the user typed the right code and has only to wait for the next one.
    assert_eq!(
        reason(&d),
        "mfa_failed: this code was already used; wait for the next one"
    );
    // A wrong code does not get it.
    let wrong = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    assert_eq!(
        reason(&wrong),
        "mfa_failed: the one-time code was not accepted"
    );
    // From the other device too.
    expect(
        &w.decide(&w.totp("alice", &code), PHONE),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
    // Bob's steps are his own.
    expect_accept(&w.decide(&w.totp("bob", &w.code("bob")), BOB_DESK));
}

#[test]
fn mfa_failed_for_a_user_without_a_factor() {
    let wrapped = Arc::new(Wrapped::new("alice"));
    let w = World::build(GateConfig::default(), wrapped);
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    expect(&d, RejectCode::MfaFailed, Cause::NoFactor);
    assert_eq!(reason(&d), "mfa_failed: the one-time code was not accepted");
    // It counts towards lockout like any failed code.
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 1);
    // Bob has his factor.
    expect_accept(&w.decide(&w.totp("bob", &w.code("bob")), BOB_DESK));
}

#[test]
fn a_failing_registry_refuses_the_connection() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    wrapped.broken.store(true, Ordering::SeqCst);
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    assert_eq!(d.outcome.as_ref().unwrap_err().code, RejectCode::Overloaded);
    assert_eq!(
        d.outcome.as_ref().unwrap_err().cause,
        Cause::Registry("registry: database is unreachable".into())
    );
    assert_eq!(d.verdict.retry_after_s, Some(5));
    // The backend's words stay in the audit cause, not in REASON.
    assert!(!reason(&d).contains("unreachable"), "{}", reason(&d));
    wrapped.broken.store(false, Ordering::SeqCst);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
}

#[test]
fn mfa_required_for_an_expired_ticket() {
    let w = World::new();
    let (_, session) = w.login("alice", LAPTOP);
    let (ticket, expires) = session.unwrap();
    w.clock.set_ms(expires - 1);
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
    w.clock.set_ms(expires);
    let d = w.decide(&w.session("alice", &ticket), LAPTOP);
    expect(&d, RejectCode::MfaRequired, Cause::TicketExpired);
    assert!(reason(&d).contains("one-time code"), "{}", reason(&d));
    w.advance(86_400_000);
    expect(
        &w.decide(&w.session("alice", &ticket), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketExpired,
    );
}

#[test]
fn mfa_required_for_a_ticket_of_another_device_or_user() {
    let w = World::new();
    let (_, laptop) = w.login("alice", LAPTOP);
    let laptop_ticket = laptop.unwrap().0;
    // Alice's laptop ticket from alice's phone.
    expect(
        &w.decide(&w.session("alice", &laptop_ticket), PHONE),
        RejectCode::MfaRequired,
        Cause::TicketNotForThisDevice,
    );
    // Bob's ticket from alice's laptop, claiming alice.
    let (_, desk) = w.login("bob", BOB_DESK);
    let bob_ticket = desk.unwrap().0;
    expect(
        &w.decide(&w.session("alice", &bob_ticket), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketNotForThisDevice,
    );
    // Alice's ticket from bob's desk, claiming bob.
    expect(
        &w.decide(&w.session("bob", &laptop_ticket), BOB_DESK),
        RejectCode::MfaRequired,
        Cause::TicketNotForThisDevice,
    );
    // Each still works where it belongs.
    expect_accept(&w.decide(&w.session("alice", &laptop_ticket), LAPTOP));
    expect_accept(&w.decide(&w.session("bob", &bob_ticket), BOB_DESK));
}

#[test]
fn mfa_required_for_a_garbage_or_altered_ticket() {
    let w = World::new();
    for garbage in [vec![0u8], vec![1; 100], vec![0xff; 1024]] {
        expect(
            &w.decide(&w.session("alice", &garbage), LAPTOP),
            RejectCode::MfaRequired,
            Cause::TicketInvalid,
        );
    }
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    for at in [0, 1, ticket.len() / 2, ticket.len() - 1] {
        let mut t = ticket.clone();
        t[at] ^= 0x80;
        expect(
            &w.decide(&w.session("alice", &t), LAPTOP),
            RejectCode::MfaRequired,
            Cause::TicketInvalid,
        );
    }
    // Sealed under another key.
    let other = Gate::new(
        GateConfig::default(),
        w.registry.clone(),
        TicketKey::from_bytes(&[0x43; 32]).unwrap(),
        w.clock.clone(),
        Arc::new(SystemRandom::new()),
    );
    expect(
        &w.decide_on(&other, &w.session("alice", &ticket), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketInvalid,
    );
}

#[test]
fn mfa_required_for_a_revoked_session() {
    let w = World::new();
    let (id1, s1) = w.login("alice", LAPTOP);
    w.advance(STEP_MS);
    let (_, s2) = w.login("alice", LAPTOP);
    let (sid, _) = id1.session.unwrap();
    let now = w.now();
    let record = w.registry.revoke_session(&sid, now).unwrap();
    assert_eq!(record.revoked_ms, Some(now));
    assert!(w.is_revoked(&sid));
    expect(
        &w.decide(&w.session("alice", &s1.unwrap().0), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketRevoked,
    );
    // Only that session.
    let s2 = s2.unwrap().0;
    expect_accept(&w.decide(&w.session("alice", &s2), LAPTOP));
    // The live session of the laptop is now the second one.
    let live = w
        .registry
        .live_session_for_device(&LAPTOP, w.now())
        .unwrap();
    assert_ne!(live.unwrap().id, sid);
    // A session without a record (never recorded, or forgotten) is refused as well.
    assert!(matches!(
        w.registry.revoke_session(&SessionId([0x99; 16]), now),
        Err(RegistryError::NotFound(_))
    ));
}

#[test]
fn a_totp_accept_records_its_session() {
    let w = World::new();
    let (identity, session) = w.login("alice", LAPTOP);
    let (sid, expires) = identity.session.unwrap();
    let (session_ticket, ticket_expires) = session.unwrap();
    assert_eq!(ticket_expires, expires);
    let record = w.registry.session(&sid).unwrap().unwrap();
    assert_eq!(
        record,
        SessionRecord {
            id: sid,
            user: "alice".into(),
            fingerprint: LAPTOP,
            totp_time_ms: identity.totp_time_ms,
            expires_ms: expires,
            revoked_ms: None,
        }
    );
    assert_eq!(
        w.registry
            .live_session_for_device(&LAPTOP, w.now())
            .unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        w.registry.live_session_for_device(&PHONE, w.now()).unwrap(),
        None
    );
    assert_eq!(w.registry.list_sessions(w.now()).unwrap(), vec![record]);
    // A connection on the ticket records nothing new.
    w.advance(1_000);
    expect_accept(&w.decide(&w.session("alice", &session_ticket), LAPTOP));
    assert_eq!(w.registry.list_sessions(w.now()).unwrap().len(), 1);
}

#[test]
fn a_ticket_without_its_record_is_refused() {
    // A registry that holds no record of it: a ticket sealed under the right key still fails.
    let w = World::new();
    let (identity, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    let (sid, _) = identity.session.unwrap();
    let other = World::new();
    // The same ticket key, but the other world's registry never saw the session.
    other.clock.set_ms(w.now());
    expect(
        &other.decide(&other.session("alice", &ticket), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketInvalid,
    );
    // In its own world it works, until the record is revoked by revoking the device.
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
    w.registry.revoke_device("laptop", w.now()).unwrap();
    assert!(w.is_revoked(&sid));
    assert_eq!(
        w.registry
            .live_session_for_device(&LAPTOP, w.now())
            .unwrap(),
        None
    );
}

#[test]
fn revoking_a_user_revokes_the_sessions_of_all_the_devices() {
    let w = World::new();
    let (laptop, _) = w.login("alice", LAPTOP);
    w.advance(STEP_MS);
    let (phone, phone_ticket) = w.login("alice", PHONE);
    let (bob, _) = w.login("bob", BOB_DESK);
    w.registry.revoke_user("alice", w.now()).unwrap();
    for id in [laptop, phone] {
        let record = w.registry.session(&id.session.unwrap().0).unwrap().unwrap();
        assert_eq!(record.revoked_ms, Some(w.now()));
    }
    assert!(!w.is_revoked(&bob.session.unwrap().0));
    expect(
        &w.decide(&w.session("alice", &phone_ticket.unwrap().0), PHONE),
        RejectCode::DeviceRevoked,
        Cause::DeviceRevoked,
    );
}

#[test]
fn a_failing_session_record_refuses_the_totp_accept_and_the_ticket() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    w.advance(STEP_MS);
    wrapped.records_broken.store(true, Ordering::SeqCst);
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    let rejection = d.outcome.as_ref().unwrap_err();
    assert_eq!(rejection.code, RejectCode::Overloaded);
    assert_eq!(
        rejection.cause,
        Cause::Registry("registry: session table is unreachable".into())
    );
    assert!(d.verdict.session.is_none());
    let d = w.decide(&w.session("alice", &ticket), LAPTOP);
    assert_eq!(d.outcome.as_ref().unwrap_err().code, RejectCode::Overloaded);
    assert_eq!(
        d.outcome.as_ref().unwrap_err().cause,
        Cause::Registry("registry: session table is unreachable".into())
    );
    wrapped.records_broken.store(false, Ordering::SeqCst);
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
    assert_eq!(w.registry.list_sessions(w.now()).unwrap().len(), 1);
    // The failed commit wrote nothing, atomically: the code's step was not spent and no failure
    // was charged, so the same code is accepted now and records its session.
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
    assert_eq!(w.registry.list_sessions(w.now()).unwrap().len(), 2);
}

#[test]
fn mfa_required_for_a_ticket_earned_before_the_device_was_bound_again() {
    let w = World::new();
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    w.advance(1_000);
    w.registry.revoke_device("laptop", w.now()).unwrap();
    expect(
        &w.decide(&w.session("alice", &ticket), LAPTOP),
        RejectCode::DeviceRevoked,
        Cause::DeviceRevoked,
    );
    // The same key bound again, to the same user: the old ticket must not come back to life.
    w.advance(1_000);
    w.registry
        .bind_device("laptop-2", "alice", &LAPTOP, w.now())
        .unwrap();
    w.advance(1_000);
    expect(
        &w.decide(&w.session("alice", &ticket), LAPTOP),
        RejectCode::MfaRequired,
        Cause::TicketBeforeBinding,
    );
    // A ticket earned under the new binding works.
    w.advance(STEP_MS);
    let (id, fresh) = w.login("alice", LAPTOP);
    assert_eq!(id.device_name, "laptop-2");
    expect_accept(&w.decide(&w.session("alice", &fresh.unwrap().0), LAPTOP));
}

#[test]
fn mfa_required_when_sessions_are_disabled_even_for_garbage() {
    let w = World::with_config(GateConfig {
        session_ttl_ms: None,
        ..GateConfig::default()
    });
    expect(
        &w.decide(&w.session("alice", b"whatever"), LAPTOP),
        RejectCode::MfaRequired,
        Cause::SessionsDisabled,
    );
    let (id, session) = w.login("alice", LAPTOP);
    assert_eq!(id.session, None);
    assert_eq!(session, None);
}

#[test]
fn overloaded_when_the_nonce_store_is_full() {
    let w = World::with_config(GateConfig {
        nonce_capacity: 2,
        ..GateConfig::default()
    });
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
    let d = w.decide(&w.session("alice", &ticket), LAPTOP);
    expect(&d, RejectCode::Overloaded, Cause::NonceStoreFull);
    assert_eq!(d.verdict.retry_after_s, Some(60));
    // A wrong code on a full store is refused before the code is looked at: no failure counted.
    let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    expect(&d, RejectCode::Overloaded, Cause::NonceStoreFull);
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    assert_eq!(w.gate.nonces().len(), 2);
    // Once the remembered nonces expire there is room again.
    w.advance(180_000);
    assert_eq!(w.gate.purge_expired(), 2);
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
}

// ---------------------------------------------------------------------------------------------
// The order of section 5 step 4: first failure wins, and a refusal leaves later state alone.

#[test]
fn binding_is_checked_before_everything_else() {
    let w = World::new();
    let mut p = w.totp("mallory", &w.wrong_code("alice"));
    p.binding = [0; 32];
    p.time_ms = 0;
    expect(
        &w.decide(&p, STRANGER),
        RejectCode::BindingMismatch,
        Cause::BindingMismatch,
    );
    let mut p = w.totp("alice", &w.code("alice"));
    p.binding = [0; 32];
    p.time_ms = T0 + 3_600_000;
    expect(
        &w.decide(&p, LAPTOP),
        RejectCode::BindingMismatch,
        Cause::BindingMismatch,
    );
}

#[test]
fn clock_is_checked_before_the_device() {
    let w = World::new();
    let mut p = w.totp("alice", &w.code("alice"));
    p.time_ms = T0 - 120_000;
    expect(
        &w.decide(&p, STRANGER),
        RejectCode::ClockSkew,
        Cause::ClockSkew(-120_000),
    );
    w.registry.revoke_device("phone", T0).unwrap();
    expect(
        &w.decide(&p, PHONE),
        RejectCode::ClockSkew,
        Cause::ClockSkew(-120_000),
    );
    expect(
        &w.decide(&p, BOB_DESK),
        RejectCode::ClockSkew,
        Cause::ClockSkew(-120_000),
    );
}

#[test]
fn refusals_before_the_nonce_step_do_not_consume_the_nonce_or_the_code() {
    let w = World::new();
    let code = w.code("alice");
    let nonce = w.nonce();
    let with_nonce = |mut p: Prefix| {
        p.nonce = nonce;
        p
    };
    let mut bad_binding = with_nonce(w.totp("alice", &code));
    bad_binding.binding[0] ^= 1;
    expect(
        &w.decide(&bad_binding, LAPTOP),
        RejectCode::BindingMismatch,
        Cause::BindingMismatch,
    );
    let mut skewed = with_nonce(w.totp("alice", &code));
    skewed.time_ms += 61_000;
    expect(
        &w.decide(&skewed, LAPTOP),
        RejectCode::ClockSkew,
        Cause::ClockSkew(61_000),
    );
    let p = with_nonce(w.totp("alice", &code));
    expect(
        &w.decide(&p, STRANGER),
        RejectCode::DeviceUnknown,
        Cause::DeviceUnknown,
    );
    expect(
        &w.decide(&p, BOB_DESK),
        RejectCode::UserMismatch,
        Cause::UserMismatch,
    );
    // The nonce and the code are both still fresh.
    expect_accept(&w.decide(&p, LAPTOP));
}

#[test]
fn device_of_another_user_cannot_add_failures_to_a_victims_lockout() {
    let w = World::new();
    for _ in 0..10 {
        let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), BOB_DESK);
        expect(&d, RejectCode::UserMismatch, Cause::UserMismatch);
    }
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    assert_eq!(w.registry.lock_state("bob").unwrap(), LockState::default());
    // Nor can an unknown or revoked device.
    w.registry.revoke_device("phone", T0).unwrap();
    for fp in [STRANGER, PHONE] {
        for _ in 0..6 {
            assert!(
                !w.decide(&w.totp("alice", &w.wrong_code("alice")), fp)
                    .is_accepted()
            );
        }
    }
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
}

#[test]
fn device_is_checked_before_lockout() {
    let w = World::new();
    lock_alice(&w);
    expect(
        &w.decide(&w.totp("alice", &w.code("alice")), STRANGER),
        RejectCode::DeviceUnknown,
        Cause::DeviceUnknown,
    );
    expect(
        &w.decide(&w.totp("alice", &w.code("alice")), BOB_DESK),
        RejectCode::UserMismatch,
        Cause::UserMismatch,
    );
}

/// Five wrong codes for alice at the current time: she is locked out for 30 s.
fn lock_alice(w: &World) {
    for i in 0..5 {
        let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
        expect(&d, RejectCode::MfaFailed, Cause::CodeWrong);
        assert_eq!(w.registry.lock_state("alice").unwrap().failures, i + 1);
    }
    assert_eq!(
        w.registry
            .lock_state("alice")
            .unwrap()
            .remaining_ms(w.now()),
        Some(30_000)
    );
}

#[test]
fn a_locked_out_user_with_a_valid_code_is_locked_out_and_consumes_nothing() {
    let w = World::new();
    lock_alice(&w);
    let code = w.code("alice");
    let p = w.totp("alice", &code);
    let d = w.decide(&p, LAPTOP);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(d.verdict.retry_after_s, Some(30));
    assert!(reason(&d).contains("30 s"), "{}", reason(&d));
    // Refusing did not count another failure.
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 5);
    // 30 s later the very same frame (same nonce, same code, one step old, TIME 30 s behind) is
    // accepted: neither the nonce nor the code's step was used up by the lockout refusal.
    w.advance(30_000);
    let d = w.decide(&p, LAPTOP);
    expect_accept(&d);
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
}

#[test]
fn a_locked_out_user_with_a_valid_ticket_is_locked_out() {
    let w = World::new();
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    lock_alice(&w);
    expect(
        &w.decide(&w.session("alice", &ticket), LAPTOP),
        RejectCode::LockedOut,
        Cause::LockedOut,
    );
    w.advance(30_000);
    expect_accept(&w.decide(&w.session("alice", &ticket), LAPTOP));
}

#[test]
fn a_replayed_nonce_with_a_valid_code_is_replay_and_does_not_consume_the_step() {
    let w = World::new();
    let first = w.totp("alice", &w.code("alice"));
    expect_accept(&w.decide(&first, LAPTOP));
    w.advance(STEP_MS);
    let code = w.code("alice");
    let mut replayed = w.totp("alice", &code);
    replayed.nonce = first.nonce;
    expect(
        &w.decide(&replayed, LAPTOP),
        RejectCode::Replay,
        Cause::NonceReplay,
    );
    // A replayed nonce with a wrong code counts no failure either.
    let mut wrong = w.totp("alice", &w.wrong_code("alice"));
    wrong.nonce = first.nonce;
    expect(
        &w.decide(&wrong, LAPTOP),
        RejectCode::Replay,
        Cause::NonceReplay,
    );
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    // The code's step is still unused.
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
}

// ---------------------------------------------------------------------------------------------
// Single use per time step.

#[test]
fn a_code_is_accepted_once_per_step() {
    let w = World::new();
    let code = w.code("alice");
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
    expect(
        &w.decide(&w.totp("alice", &code), LAPTOP),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
    // Later in the same step, the same code is still refused.
    w.advance(STEP_MS - 1);
    assert_eq!(w.code("alice"), code);
    expect(
        &w.decide(&w.totp("alice", &code), LAPTOP),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
    // The next step's code is accepted.
    w.advance(1);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
}

#[test]
fn an_older_step_after_a_newer_one_is_refused() {
    let w = World::new();
    w.advance(STEP_MS);
    let older = w.code_at("alice", T0);
    let newer = w.code("alice");
    let totp = totp_config(ALICE_SECRET);
    let now_s = w.now() / 1000;
    assert_eq!(totp.matching_step(&older, now_s), Some(T0 / 1000 / 30));
    assert_eq!(totp.matching_step(&newer, now_s), Some(T0 / 1000 / 30 + 1));
    expect_accept(&w.decide(&w.totp("alice", &newer), LAPTOP));
    expect(
        &w.decide(&w.totp("alice", &older), LAPTOP),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
}

#[test]
fn the_same_code_on_twenty_threads_is_accepted_exactly_once() {
    let w = World::with_config(GateConfig {
        // High, so that every loser reaches the factor check instead of the lockout.
        lockout: LockoutPolicy {
            threshold: 1_000,
            ..LockoutPolicy::default()
        },
        ..GateConfig::default()
    });
    let code = w.code("alice");
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|_| w.totp("alice", &code).encode().unwrap())
        .collect();
    let barrier = Arc::new(Barrier::new(frames.len()));
    let handles: Vec<_> = frames
        .into_iter()
        .map(|frame| {
            let gate = w.gate.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let facts = ConnectionFacts {
                    exporter: EXPORTER,
                    fingerprint: LAPTOP,
                };
                barrier.wait();
                at_once(gate.authenticate(&frame, &facts)).outcome
            })
        })
        .collect();
    let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(accepted, 1, "{outcomes:?}");
    for o in outcomes.iter().filter(|o| o.is_err()) {
        assert_eq!(
            o.as_ref().unwrap_err(),
            &Rejection {
                code: RejectCode::MfaFailed,
                cause: Cause::CodeReused
            }
        );
    }
    // A loser's commit finds the step taken (Committed::StepTaken), or its snapshot already
    // showed it taken: either way a reused code, which writes nothing and charges nothing.
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);
}

#[test]
fn the_same_code_on_twenty_threads_with_the_default_lockout() {
    let w = World::new();
    let code = w.code("alice");
    let barrier = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let frame = w.totp("alice", &code).encode().unwrap();
            let gate = w.gate.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let facts = ConnectionFacts {
                    exporter: EXPORTER,
                    fingerprint: PHONE,
                };
                barrier.wait();
                at_once(gate.authenticate(&frame, &facts)).outcome
            })
        })
        .collect();
    let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
    // Every loser learns that the code is reused; none is charged, so no lockout is set off
    // even with the default threshold of 5.
    for r in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(
            (r.code, &r.cause),
            (RejectCode::MfaFailed, &Cause::CodeReused),
            "{r:?}"
        );
    }
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);
    // The user is not locked: the next step's code goes through.
    w.advance(STEP_MS);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), PHONE));
}

// ---------------------------------------------------------------------------------------------
// Lockout.

#[test]
fn five_wrong_codes_lock_for_30_s_then_the_next_failure_for_60_s() {
    let w = World::new();
    lock_alice(&w);
    // Even a valid code is refused while locked.
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(d.verdict.retry_after_s, Some(30));
    // Seconds are rounded up.
    w.advance(29_500);
    let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(d.verdict.retry_after_s, Some(1));
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 5);
    // After 30 s: a 6th wrong code is MFA_FAILED and locks for 60 s.
    w.advance(500);
    let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    expect(&d, RejectCode::MfaFailed, Cause::CodeWrong);
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(d.verdict.retry_after_s, Some(60));
    assert!(reason(&d).contains("60 s"), "{}", reason(&d));
    // Bob is not affected.
    expect_accept(&w.decide(&w.totp("bob", &w.code("bob")), BOB_DESK));
    // After the 60 s a valid code gets in and clears the state.
    w.advance(60_000);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
}

#[test]
fn a_success_clears_the_failure_count() {
    let w = World::new();
    for _ in 0..4 {
        let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
        expect(&d, RejectCode::MfaFailed, Cause::CodeWrong);
    }
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 4);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);
    for _ in 0..4 {
        let d = w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
        expect(&d, RejectCode::MfaFailed, Cause::CodeWrong);
    }
    let state = w.registry.lock_state("alice").unwrap();
    assert_eq!(state.failures, 4);
    assert_eq!(state.remaining_ms(w.now()), None);
    // Not locked: the next step's code is accepted.
    w.advance(STEP_MS);
    expect_accept(&w.decide(&w.totp("alice", &w.code("alice")), LAPTOP));
}

#[test]
fn reused_codes_do_not_count_towards_lockout_and_wrong_ones_still_do() {
    let w = World::new();
    let code = w.code("alice");
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
    for _ in 0..10 {
        expect(
            &w.decide(&w.totp("alice", &code), LAPTOP),
            RejectCode::MfaFailed,
            Cause::CodeReused,
        );
    }
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);
    for _ in 0..5 {
        expect(
            &w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP),
            RejectCode::MfaFailed,
            Cause::CodeWrong,
        );
    }
    expect(
        &w.decide(&w.totp("alice", &code), LAPTOP),
        RejectCode::LockedOut,
        Cause::LockedOut,
    );
}

#[test]
fn lockout_follows_the_config() {
    let w = World::with_config(GateConfig {
        lockout: LockoutPolicy {
            threshold: 2,
            base_ms: 10_000,
            max_ms: 15_000,
        },
        ..GateConfig::default()
    });
    for _ in 0..2 {
        w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    }
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    assert_eq!(d.verdict.retry_after_s, Some(10));
    w.advance(10_000);
    w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    let d = w.decide(&w.totp("alice", &w.code("alice")), LAPTOP);
    assert_eq!(d.verdict.retry_after_s, Some(15));
}

// ---------------------------------------------------------------------------------------------
// REASON and other refusals.

#[test]
fn reasons_stay_within_256_bytes_with_long_names() {
    let w = World::new();
    let long_user = "é".repeat(64); // 128 bytes
    let other_user = "ü".repeat(64);
    let device = "ß".repeat(64);
    let fp = DeviceFingerprint::from_bytes([0xfa; 32]);
    let totp = totp_config(ALICE_SECRET);
    w.registry.add_user(&long_user, totp.clone(), 0).unwrap();
    w.registry.add_user(&other_user, totp, 0).unwrap();
    w.registry.bind_device(&device, &long_user, &fp, 0).unwrap();
    // USER_MISMATCH names the device and the claimed user: over 256 bytes before the cut.
    let d = w.decide(&w.totp(&other_user, &w.code("alice")), fp);
    expect(&d, RejectCode::UserMismatch, Cause::UserMismatch);
    assert!(reason(&d).len() >= 250, "{}", reason(&d).len());
    // LOCKED_OUT names the user.
    for _ in 0..5 {
        w.decide(&w.totp(&long_user, &w.wrong_code("alice")), fp);
    }
    let d = w.decide(&w.totp(&long_user, &w.code("alice")), fp);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    w.registry.revoke_device(&device, 1).unwrap();
    let d = w.decide(&w.totp(&long_user, &w.code("alice")), fp);
    expect(&d, RejectCode::DeviceRevoked, Cause::DeviceRevoked);
}

#[test]
fn refusals_decided_outside_the_core() {
    let w = World::new();
    let d = w.gate.refuse(
        RejectCode::Timeout,
        Cause::Server(ServerCause::PrefixTimeout),
        "the Prefix did not arrive within 10 s",
        None,
    );
    check_invariants(&d, None, w.now());
    assert_eq!(
        d.verdict.reason.as_deref(),
        Some("timeout: the Prefix did not arrive within 10 s")
    );
    let d = w.gate.refuse(
        RejectCode::RateLimited,
        Cause::Server(ServerCause::RateLimited),
        &"x".repeat(1000),
        Some(7),
    );
    check_invariants(&d, None, w.now());
    assert_eq!(d.verdict.retry_after_s, Some(7));
    assert_eq!(d.verdict.reason.as_ref().unwrap().len(), 256);
}

#[test]
fn decisions_never_show_the_code_or_the_ticket_in_debug() {
    let w = World::new();
    let code = w.code("alice");
    let d = w.decide(&w.totp("alice", &code), LAPTOP);
    let ticket = d.verdict.session.clone().unwrap().0;
    let text = format!("{d:?} {:?} {:?}", w.gate, w.totp("alice", &code));
    assert!(!text.contains(&hex::encode(&ticket)));
    assert!(!text.contains(&format!("{ticket:?}")));
    let d = w.decide(&w.totp("alice", &code), LAPTOP);
    assert!(!format!("{d:?}").contains(code.as_str()));
    let d = w.decide(&w.session("alice", &ticket), LAPTOP);
    assert!(!format!("{d:?}").contains(&hex::encode(&ticket)));
    assert!(!format!("{:?}", w.session("alice", &ticket)).contains(&format!("{ticket:?}")));
}

/// Attempts that race each other cannot each find the user unlocked: with the default policy
/// (5 failures lock), 40 wrong codes at once are refused MFA_FAILED exactly 5 times. Each is
/// charged by its commit, which is conditional on the user not being locked: the commits after
/// the 5th find the user locked and write nothing, and the decisions whose snapshot already
/// showed the lock are refused before their code is looked at; all 35 are LOCKED_OUT.
#[test]
fn concurrent_wrong_codes_cannot_outrun_the_lockout() {
    let w = World::new();
    let wrong = {
        let good = w.code("alice");
        let mut b = good.into_bytes();
        b[0] = if b[0] == b'9' { b'0' } else { b[0] + 1 };
        String::from_utf8(b).unwrap()
    };
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|_| w.totp("alice", &wrong).encode().unwrap())
        .collect();
    let barrier = Arc::new(Barrier::new(frames.len()));
    let handles: Vec<_> = frames
        .into_iter()
        .map(|frame| {
            let gate = w.gate.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let facts = ConnectionFacts {
                    exporter: EXPORTER,
                    fingerprint: LAPTOP,
                };
                barrier.wait();
                at_once(gate.authenticate(&frame, &facts)).outcome
            })
        })
        .collect();
    let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let code_checked = outcomes
        .iter()
        .filter(|o| matches!(o, Err(r) if r.cause == Cause::CodeWrong))
        .count();
    let locked = outcomes
        .iter()
        .filter(|o| matches!(o, Err(r) if r.code == RejectCode::LockedOut))
        .count();
    assert_eq!(code_checked, 5, "{outcomes:?}");
    assert_eq!(locked, 35);
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 5);
}

#[test]
fn control_characters_in_a_claimed_user_do_not_reach_the_reason() {
    let w = World::new();
    let d = w.decide(&w.totp("alice\n\u{1b}[31mroot", &w.code("alice")), LAPTOP);
    assert_eq!(
        d.outcome.as_ref().unwrap_err().code,
        RejectCode::UserMismatch
    );
    let reason = reason(&d);
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
    assert!(
        reason.contains("alice\u{fffd}\u{fffd}[31mroot"),
        "{reason:?}"
    );
}

#[test]
fn a_totp_accept_the_policy_refuses_records_no_session() {
    let w = World::new();
    let gate = w
        .sibling(GateConfig::default())
        .with_policy(Arc::new(|id: &Identity| {
            if id.user == "alice" {
                Err("alice may not connect".to_owned())
            } else {
                Ok(())
            }
        }));
    let d = w.decide_on(&gate, &w.totp("alice", &w.code("alice")), LAPTOP);
    expect(&d, RejectCode::PolicyDenied, Cause::PolicyDenied);
    assert!(w.registry.list_sessions(w.now()).unwrap().is_empty());
    assert_eq!(
        w.registry
            .live_session_for_device(&LAPTOP, w.now())
            .unwrap(),
        None
    );
    let d = w.decide_on(&gate, &w.totp("bob", &w.code("bob")), BOB_DESK);
    expect_accept(&d);
    assert_eq!(w.registry.list_sessions(w.now()).unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The four phases: plan (no state), fetch (one read), decide (no I/O), commit (one write).

/// The 30-second time step [`T0`] falls in.
const STEP0: u64 = T0 / STEP_MS;
/// The device of a service account; its hex is all letters.
const SERVICE: DeviceFingerprint = DeviceFingerprint::from_bytes([0xfb; 32]);

fn charge(user: &str, now_ms: u64) -> Effects {
    Effects::ChargeFailure {
        user: user.into(),
        now_ms,
        lockout: LockoutPolicy::default(),
    }
}

#[test]
fn plan_decides_garbage_binding_and_clock_without_a_need() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    let mut bad_binding = w.totp("alice", &w.code("alice"));
    bad_binding.binding[3] ^= 1;
    let mut skewed = w.totp("alice", &w.code("alice"));
    skewed.time_ms = T0 + 61_000;
    // Even with the store down: phase 1 does not reach it.
    wrapped.broken.store(true, Ordering::SeqCst);
    for (frame, code, cause) in [
        (
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            RejectCode::Malformed,
            "frame_malformed",
        ),
        (
            bad_binding.encode().unwrap(),
            RejectCode::BindingMismatch,
            "binding_mismatch",
        ),
        (
            skewed.encode().unwrap(),
            RejectCode::ClockSkew,
            "clock_skew",
        ),
    ] {
        match w.gate.plan(&frame, &facts(LAPTOP)) {
            Planned::Decided(d) => {
                check_invariants(&d, Prefix::decode(&frame).ok().as_ref(), w.now());
                let rejection = d.outcome.unwrap_err();
                assert_eq!((rejection.code, rejection.cause.as_str()), (code, cause));
            }
            Planned::Fetch(plan) => panic!("{code}: a Need {:?}", plan.need()),
        }
    }
    // Nothing was read or written, and no nonce was remembered.
    assert_eq!(wrapped.io(), (0, 0));
    assert_eq!(w.gate.nonces().len(), 0);
    // A frame that passes binding and clock is left to the snapshot, whatever its device.
    wrapped.broken.store(false, Ordering::SeqCst);
    assert!(matches!(
        w.gate.plan(
            &w.totp("mallory", "123456").encode().unwrap(),
            &facts(STRANGER)
        ),
        Planned::Fetch(_)
    ));
    assert_eq!(wrapped.io(), (0, 0));
}

#[test]
fn the_need_asks_for_the_secret_only_for_a_code_and_names_the_tickets_session() {
    let w = World::new();
    let code = w.code("alice");
    let plan = w.plan(&w.totp("alice", &code), LAPTOP);
    assert_eq!(
        plan.need(),
        &Need {
            fingerprint: LAPTOP,
            secret: true,
            session: SessionNeed::None,
            now_ms: T0,
        }
    );
    assert_eq!(plan.now_ms(), T0);
    // The plan does not show the code.
    assert!(!format!("{plan:?}").contains(code.as_str()));
    // The device is the connection's: who it belongs to is read, not planned.
    assert_eq!(
        w.plan(&w.totp("mallory", "123456"), STRANGER)
            .need()
            .fingerprint,
        STRANGER
    );

    let (identity, session) = w.login("alice", LAPTOP);
    let (sid, _) = identity.session.unwrap();
    let ticket = session.unwrap().0;
    w.advance(1_000);
    let plan = w.plan(&w.session("alice", &ticket), LAPTOP);
    assert_eq!(
        plan.need(),
        &Need {
            fingerprint: LAPTOP,
            secret: false,
            session: SessionNeed::ById(sid),
            now_ms: T0 + 1_000,
        }
    );
    assert!(!format!("{plan:?}").contains(&hex::encode(&ticket)));
    // A ticket that does not open under the key names no session (and asks for no secret).
    let mut forged = ticket.clone();
    forged[5] ^= 1;
    let need = *w.plan(&w.session("alice", &forged), LAPTOP).need();
    assert_eq!((need.secret, need.session), (false, SessionNeed::None));
    // Neither does a good ticket on a gate with sessions off.
    let off = w.sibling(GateConfig {
        session_ttl_ms: None,
        ..GateConfig::default()
    });
    match off.plan(
        &w.session("alice", &ticket).encode().unwrap(),
        &facts(LAPTOP),
    ) {
        Planned::Fetch(plan) => {
            assert_eq!(plan.need().session, SessionNeed::None);
            assert!(!plan.need().secret);
        }
        Planned::Decided(d) => panic!("decided in phase 1: {:?}", d.outcome),
    }
    // A standard client: the device's live session, never a secret; nothing with sessions off.
    assert_eq!(
        w.gate.plan_standard(&LAPTOP).need(),
        &Need {
            fingerprint: LAPTOP,
            secret: false,
            session: SessionNeed::LiveForDevice,
            now_ms: T0 + 1_000,
        }
    );
    assert_eq!(off.plan_standard(&LAPTOP).need().session, SessionNeed::None);
}

#[test]
fn decide_says_what_to_write_for_codes() {
    let wrapped = Arc::new(Wrapped::new("carol"));
    let w = World::build(GateConfig::default(), wrapped.clone());
    const CAROL: DeviceFingerprint = DeviceFingerprint::from_bytes([0xca; 32]);
    w.registry
        .add_user("carol", totp_config(ALICE_SECRET), T0 - 1)
        .unwrap();
    w.registry
        .bind_device("tablet", "carol", &CAROL, T0 - 1)
        .unwrap();

    // A wrong code: one failure to charge.
    let p = w.totp("alice", &w.wrong_code("alice"));
    let outcome = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(!outcome.is_accept());
    assert_eq!(outcome.effects(), &charge("alice", T0));
    expect(
        &w.commit_and_finish(outcome, &p),
        RejectCode::MfaFailed,
        Cause::CodeWrong,
    );
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 1);

    // A matching code: its step, and the session to record with it.
    let p = w.totp("alice", &w.code("alice"));
    let outcome = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(outcome.is_accept());
    let effects = outcome.effects().clone();
    let d = w.commit_and_finish(outcome, &p);
    let id = expect_accept(&d);
    let (sid, expires) = id.session.unwrap();
    let record = SessionRecord {
        id: sid,
        user: "alice".into(),
        fingerprint: LAPTOP,
        totp_time_ms: T0,
        expires_ms: expires,
        revoked_ms: None,
    };
    assert_eq!(
        effects,
        Effects::AcceptStep {
            user: "alice".into(),
            step: STEP0,
            now_ms: T0,
            lockout: LockoutPolicy::default(),
            session: Some(record.clone()),
        }
    );
    assert_eq!(w.registry.session(&sid).unwrap(), Some(record));
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );

    // The same code again: reused, which writes nothing (no guess of the secret).
    let p = w.totp("alice", &w.code("alice"));
    let outcome = w.fetch_and_decide(w.plan(&p, PHONE));
    assert_eq!(outcome.effects(), &Effects::None);
    expect(
        &w.commit_and_finish(outcome, &p),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 0);

    // A user without a factor: charged too (it counts towards lockout like any failed code).
    let p = w.totp("carol", &w.code("alice"));
    let outcome = w.fetch_and_decide(w.plan(&p, CAROL));
    assert_eq!(outcome.effects(), &charge("carol", T0));
    expect(
        &w.commit_and_finish(outcome, &p),
        RejectCode::MfaFailed,
        Cause::NoFactor,
    );
    assert_eq!(w.registry.lock_state("carol").unwrap().failures, 1);

    // A matching code on a gate with sessions off: the step alone.
    let off = w.sibling(GateConfig {
        session_ttl_ms: None,
        ..GateConfig::default()
    });
    let p = w.totp("bob", &w.code("bob"));
    let Planned::Fetch(plan) = off.plan(&p.encode().unwrap(), &facts(BOB_DESK)) else {
        panic!("binding and clock are right");
    };
    let snapshot = at_once(w.registry.snapshot(plan.need()));
    let outcome = off.decide(plan, snapshot);
    assert!(outcome.is_accept());
    assert_eq!(
        outcome.effects(),
        &Effects::AcceptStep {
            user: "bob".into(),
            step: STEP0,
            now_ms: T0,
            lockout: LockoutPolicy::default(),
            session: None,
        }
    );
    let committed = at_once(off.commit(&outcome));
    assert_eq!(committed, Ok(Committed::Applied));
    let d = off.finish(outcome, committed);
    check_invariants(&d, Some(&p), w.now());
    assert_eq!(expect_accept(&d).session, None);

    // Refusals before the factor write nothing.
    for (p, fp) in [
        (w.totp("alice", &w.wrong_code("alice")), STRANGER),
        (w.totp("alice", &w.wrong_code("alice")), BOB_DESK),
    ] {
        let outcome = w.fetch_and_decide(w.plan(&p, fp));
        assert_eq!(outcome.effects(), &Effects::None, "{outcome:?}");
    }
    // One read per decision; one write per code checked but the reused one (the sessions-off
    // gate shares the store), none for the refusals before the factor.
    assert_eq!(wrapped.io(), (7, 4));
}

#[test]
fn a_policy_refused_accept_spends_the_step_but_records_no_session() {
    let w = World::new();
    for _ in 0..2 {
        w.decide(&w.totp("alice", &w.wrong_code("alice")), LAPTOP);
    }
    assert_eq!(w.registry.lock_state("alice").unwrap().failures, 2);
    let gate = w
        .sibling(GateConfig::default())
        .with_policy(Arc::new(|id: &Identity| {
            if id.user == "alice" {
                Err("alice may not connect".to_owned())
            } else {
                Ok(())
            }
        }));
    let code = w.code("alice");
    let p = w.totp("alice", &code);
    let Planned::Fetch(plan) = gate.plan(&p.encode().unwrap(), &facts(LAPTOP)) else {
        panic!("binding and clock are right");
    };
    let snapshot = at_once(w.registry.snapshot(plan.need()));
    let outcome = gate.decide(plan, snapshot);
    assert!(!outcome.is_accept());
    // The code was good: its step is written, without the session a refused connection must
    // not get (it would let a standard client in).
    assert_eq!(
        outcome.effects(),
        &Effects::AcceptStep {
            user: "alice".into(),
            step: STEP0,
            now_ms: T0,
            lockout: LockoutPolicy::default(),
            session: None,
        }
    );
    let committed = at_once(gate.commit(&outcome));
    assert_eq!(committed, Ok(Committed::Applied));
    let d = gate.finish(outcome, committed);
    check_invariants(&d, Some(&p), w.now());
    expect(&d, RejectCode::PolicyDenied, Cause::PolicyDenied);
    assert_eq!(reason(&d), "policy_denied: alice may not connect");
    // No session; the count is cleared and the step is spent.
    assert!(w.registry.list_sessions(w.now()).unwrap().is_empty());
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    expect(
        &w.decide(&w.totp("alice", &code), LAPTOP),
        RejectCode::MfaFailed,
        Cause::CodeReused,
    );
}

#[test]
fn a_ticket_and_a_service_account_write_nothing() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    let (_, session) = w.login("alice", LAPTOP);
    let ticket = session.unwrap().0;
    assert_eq!(wrapped.io(), (1, 1));

    // A session ticket.
    w.advance(1_000);
    let p = w.session("alice", &ticket);
    let outcome = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(outcome.is_accept());
    assert_eq!(outcome.effects(), &Effects::None);
    let d = w.commit_and_finish(outcome, &p);
    assert_eq!(expect_accept(&d).method, AuthMethod::Session);

    // A service account: its device key is its factor; the frame's is not looked at.
    w.registry.add_service_user("backup", T0 - 1).unwrap();
    w.registry
        .bind_device("backup-host", "backup", &SERVICE, T0 - 1)
        .unwrap();
    w.registry
        .set_user_roles("backup", &["ops".to_owned()])
        .unwrap();
    let p = w.totp("backup", "000000");
    let outcome = w.fetch_and_decide(w.plan(&p, SERVICE));
    assert!(outcome.is_accept());
    assert_eq!(outcome.effects(), &Effects::None);
    let d = w.commit_and_finish(outcome, &p);
    let id = expect_accept(&d);
    assert_eq!(id.method, AuthMethod::Device);
    assert_eq!((id.session, &id.roles), (None, &vec!["ops".to_owned()]));
    assert_eq!(d.verdict.session, None);
    // The same device as a standard client.
    let plan = w.gate.plan_standard(&SERVICE);
    let outcome = w.fetch_and_decide(plan);
    assert_eq!(outcome.effects(), &Effects::None);
    let d = w.gate.finish(outcome, Ok(Committed::Applied));
    assert_eq!(expect_accept(&d).method, AuthMethod::Device);

    // Three more reads, and no write: the gate does not call the store for a commit with
    // nothing to write.
    assert_eq!(wrapped.io(), (4, 1));
    let outcome = w.fetch_and_decide(w.plan(&w.session("alice", &ticket), LAPTOP));
    assert_eq!(at_once(w.gate.commit(&outcome)), Ok(Committed::Applied));
    assert_eq!(wrapped.io(), (5, 1));
}

/// One read and at most one write per connection: a wrong code writes its charge, a reused one
/// writes nothing (it is not charged).
#[test]
fn a_wrong_code_costs_one_read_and_one_write_a_reused_one_a_read() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    // The refusal's cause (None: accepted) and the (reads, writes) the decision cost.
    let cost = |prefix: &Prefix, fp: DeviceFingerprint| {
        let before = wrapped.io();
        let d = w.decide(prefix, fp);
        let after = wrapped.io();
        (
            d.outcome.err().map(|r| r.cause),
            (after.0 - before.0, after.1 - before.1),
        )
    };
    let code = w.code("alice");
    let wrong = w.wrong_code("alice");
    let totp = |code: &str| w.totp("alice", code);
    assert_eq!(
        cost(&totp(&wrong), LAPTOP),
        (Some(Cause::CodeWrong), (1, 1))
    );
    assert_eq!(cost(&totp(&code), LAPTOP), (None, (1, 1)));
    assert_eq!(
        cost(&totp(&code), LAPTOP),
        (Some(Cause::CodeReused), (1, 0))
    );
    // A ticket: a read, no write.
    let ticket = w.login("bob", BOB_DESK).1.unwrap().0;
    assert_eq!(cost(&w.session("bob", &ticket), BOB_DESK), (None, (1, 0)));
    // Refused before the factor: a read, no write.
    assert_eq!(
        cost(&totp(&code), STRANGER),
        (Some(Cause::DeviceUnknown), (1, 0))
    );
    let replayed = totp(&wrong);
    w.decide(&replayed, LAPTOP);
    assert_eq!(cost(&replayed, LAPTOP), (Some(Cause::NonceReplay), (1, 0)));
    // Refused in phase 1: nothing.
    let mut skewed = totp(&code);
    skewed.time_ms = T0 - 120_000;
    assert_eq!(
        cost(&skewed, LAPTOP),
        (Some(Cause::ClockSkew(-120_000)), (0, 0))
    );
}

#[test]
fn a_commit_that_finds_the_step_taken_is_a_reused_code() {
    let w = World::new();
    let code = w.code("alice");
    let p = w.totp("alice", &code);
    let outcome = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(outcome.is_accept());
    assert!(matches!(
        outcome.effects(),
        Effects::AcceptStep { step: STEP0, .. }
    ));
    // Meanwhile another connection with the same code decides and commits first.
    expect_accept(&w.decide(&w.totp("alice", &code), PHONE));
    // The first commit finds the step taken: nothing is written, and the accept turns into
    // the reused code it now is.
    let committed = at_once(w.registry.commit(outcome.effects())).unwrap();
    let Committed::StepTaken(state) = committed else {
        panic!("the step was taken meanwhile: {committed:?}");
    };
    assert_eq!(state.failures, 0);
    let d = w.gate.finish(outcome, Ok(committed));
    check_invariants(&d, Some(&p), w.now());
    expect(&d, RejectCode::MfaFailed, Cause::CodeReused);
    assert_eq!(
        reason(&d),
        "mfa_failed: this code was already used; wait for the next one"
    );
    assert_eq!(w.registry.lock_state("alice").unwrap(), state);
    // Only the winner's session is recorded.
    let sessions = w.registry.list_sessions(w.now()).unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].fingerprint, PHONE);
}

#[test]
fn a_commit_that_finds_the_user_locked_is_locked_out_and_writes_nothing() {
    let w = World::new();
    let p = w.totp("alice", &w.code("alice"));
    let accept = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(accept.is_accept());
    let q = w.totp("alice", &w.wrong_code("alice"));
    let wrong = w.fetch_and_decide(w.plan(&q, PHONE));
    assert_eq!(wrong.effects(), &charge("alice", T0));
    // Meanwhile five wrong codes lock alice out.
    lock_alice(&w);
    let committed = at_once(w.registry.commit(accept.effects())).unwrap();
    let Committed::LockedOut(state) = committed else {
        panic!("alice was locked meanwhile: {committed:?}");
    };
    assert_eq!(state.failures, 5);
    assert_eq!(state.remaining_ms(w.now()), Some(30_000));
    let d = w.gate.finish(accept, Ok(committed));
    check_invariants(&d, Some(&p), w.now());
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(d.verdict.retry_after_s, Some(30));
    assert!(reason(&d).contains("alice"), "{}", reason(&d));
    // The wrong code's commit finds the lock too, and charges nothing more.
    let d = w.commit_and_finish(wrong, &q);
    expect(&d, RejectCode::LockedOut, Cause::LockedOut);
    assert_eq!(w.registry.lock_state("alice").unwrap(), state);
    assert!(w.registry.list_sessions(w.now()).unwrap().is_empty());
    // The accept's step was not spent: once the lock lifts, the same code (one step old now)
    // gets in.
    w.advance(30_000);
    expect_accept(&w.decide(&w.totp("alice", &w.code_at("alice", T0)), LAPTOP));
}

#[test]
fn a_store_error_at_fetch_or_commit_refuses_with_overloaded() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    #[track_caller]
    fn overloaded(d: &Decision) {
        expect(
            d,
            RejectCode::Overloaded,
            Cause::Registry("registry: database is unreachable".into()),
        );
        assert_eq!(d.verdict.retry_after_s, Some(5));
        assert_eq!(d.verdict.session, None);
        assert!(!reason(d).contains("unreachable"), "{}", reason(d));
    }
    let code = w.code("alice");

    // At fetch: nothing to write.
    wrapped.broken.store(true, Ordering::SeqCst);
    let p = w.totp("alice", &code);
    let outcome = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(!outcome.is_accept());
    assert_eq!(outcome.effects(), &Effects::None);
    overloaded(&w.commit_and_finish(outcome, &p));
    // A server that read the snapshot itself hands the error in the same way.
    let p = w.totp("alice", &code);
    let outcome = w.gate.decide(
        w.plan(&p, LAPTOP),
        Err(RegistryError::Backend("database is unreachable".into())),
    );
    assert_eq!(outcome.effects(), &Effects::None);
    overloaded(&w.commit_and_finish(outcome, &p));

    // At commit: an accept and a wrong code are both refused, fail closed.
    wrapped.broken.store(false, Ordering::SeqCst);
    let p = w.totp("alice", &code);
    let accept = w.fetch_and_decide(w.plan(&p, LAPTOP));
    assert!(accept.is_accept());
    let q = w.totp("alice", &w.wrong_code("alice"));
    let wrong = w.fetch_and_decide(w.plan(&q, LAPTOP));
    assert!(!wrong.effects().is_none());
    wrapped.broken.store(true, Ordering::SeqCst);
    overloaded(&w.commit_and_finish(accept, &p));
    overloaded(&w.commit_and_finish(wrong, &q));
    // Nothing was written: no failure charged, and the code is still good.
    wrapped.broken.store(false, Ordering::SeqCst);
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
}

#[test]
fn a_decision_that_is_never_committed_spends_nothing() {
    let wrapped = Arc::new(Wrapped::new(""));
    let w = World::build(GateConfig::default(), wrapped.clone());
    let code = w.code("alice");
    // A server whose deadline passes between decide and commit drops the outcome.
    let accept = w.fetch_and_decide(w.plan(&w.totp("alice", &code), LAPTOP));
    assert!(matches!(accept.effects(), Effects::AcceptStep { .. }));
    drop(accept);
    let wrong = w.fetch_and_decide(w.plan(&w.totp("alice", &w.wrong_code("alice")), LAPTOP));
    assert_eq!(wrong.effects(), &charge("alice", T0));
    drop(wrong);
    assert_eq!(wrapped.io(), (2, 0));
    // The step is not taken, no failure is charged, no session is recorded.
    assert_eq!(
        w.registry.lock_state("alice").unwrap(),
        LockState::default()
    );
    assert!(w.registry.list_sessions(w.now()).unwrap().is_empty());
    // The code still works on a new connection (with a new nonce, as every connection has).
    expect_accept(&w.decide(&w.totp("alice", &code), LAPTOP));
}
