//! The backend conformance suite (the `test-util` feature): the contract of
//! [`GateStore`](crate::GateStore), [`SessionStore`](crate::SessionStore) and
//! [`Admin`](crate::Admin), as written on each of their methods, turned into checks that every
//! backend runs. [`MemoryRegistry`](crate::MemoryRegistry) is the reference; the SQLite registry
//! of `portcullis-store` and any later backend must pass the same checks.
//!
//! # The shape
//!
//! - A **check** is a public function `fn(&dyn Registry, &dyn Runner)` that takes a fresh, empty
//!   registry, drives it through one part of the contract and panics, with a message that says
//!   what was expected, when the backend departs from it. [`CHECKS`] lists them all by name.
//! - A [`Runner`] drives the futures of [`GateStore`](crate::GateStore) to completion. The core
//!   has no async runtime, so the backend's test supplies one: [`ReadyRunner`] for a backend
//!   whose futures are ready at once (memory, SQLite), or a few lines around its runtime's
//!   `block_on` for a networked one. The concurrency checks call the runner from many threads
//!   at once.
//! - [`run_all`] runs every check, each on a registry from the caller's factory, and reports
//!   every failing check by name; [`conformance_tests!`](crate::conformance_tests) instead
//!   writes one `#[test]` per check, so that `cargo test` names each failure and runs them in
//!   parallel.
//!
//! # Running it for a backend
//!
//! In the backend's `Cargo.toml`:
//!
//! ```toml
//! [dev-dependencies]
//! portcullis-core = { workspace = true, features = ["test-util"] }
//! ```
//!
//! and in a test file, one test per check:
//!
//! ```
//! # // `#[test]` functions are not run by a doc test; the expansion is checked to compile.
//! use std::sync::Arc;
//! use portcullis_core::MemoryRegistry;
//! use portcullis_core::conformance::ReadyRunner;
//!
//! portcullis_core::conformance_tests!(|| Arc::new(MemoryRegistry::new()), ReadyRunner);
//! # fn main() {}
//! ```
//!
//! The first argument is called once per check and may return anything that dereferences to a
//! registry (an `Arc`, a `Box`, or a fixture that also holds a temporary directory); the
//! second is the [`Runner`]. The same as one test:
//!
//! ```
//! use std::sync::Arc;
//! use portcullis_core::MemoryRegistry;
//! use portcullis_core::conformance::{self, ReadyRunner};
//!
//! conformance::run_all(&|| Arc::new(MemoryRegistry::new()), &ReadyRunner);
//! ```
//!
//! A backend whose futures wait on a network gives its runtime instead:
//!
//! ```text
//! struct Tokio(tokio::runtime::Runtime);
//!
//! impl portcullis_core::conformance::Runner for Tokio {
//!     fn run(&self, task: portcullis_core::conformance::Task<'_>) {
//!         self.0.block_on(task)
//!     }
//! }
//! ```
//!
//! # What the checks assume
//!
//! Only the contract: the checks use small times (Unix ms from 0) and distinct, increasing TOTP
//! steps per user, never read a session record after a later session could have let the backend
//! forget it as expired, and compare errors by variant ([`RegistryError::NotFound`], ...), not
//! by message. What only one backend does (files, migrations, sealing, several processes on one
//! database) is tested beside that backend.

use std::fmt;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};

use crate::{
    Committed, DeviceFingerprint, DeviceRecord, Effects, LockState, LockoutPolicy, Need, Registry,
    RegistryError, SessionId, SessionNeed, SessionRecord, Snapshot, TotpAlgorithm, TotpConfig,
    UserState, check_name,
};

/// A future a [`Runner`] drives: the suite's work around one store future, with its output
/// already put where the suite reads it.
pub type Task<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Drives the futures of a [`GateStore`](crate::GateStore) to completion, on the calling thread.
///
/// The suite hands every store future to [`Runner::run`], wrapped in a [`Task`] (the trait has
/// one method and no generic one, so that checks take a `&dyn Runner`). `run` must return only
/// when the task has completed. It is called from several threads at once by the concurrency
/// checks, hence `Sync`.
pub trait Runner: Sync {
    /// Runs `task` until it completes.
    fn run(&self, task: Task<'_>);
}

impl dyn Runner + '_ {
    /// Runs `future` with [`Runner::run`] and returns its output.
    ///
    /// ```
    /// use portcullis_core::conformance::{ReadyRunner, Runner};
    /// let runner: &dyn Runner = &ReadyRunner;
    /// assert_eq!(runner.block_on(async { 7 }), 7);
    /// ```
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let mut output = None;
        let slot = &mut output;
        self.run(Box::pin(async move {
            *slot = Some(future.await);
        }));
        output.expect("Runner::run returned before its task completed")
    }
}

/// A [`Runner`] for futures that are ready at once (an embedded backend such as
/// [`MemoryRegistry`](crate::MemoryRegistry) or SQLite): it polls each future once, with a
/// waker that does nothing, and panics if the future is not ready.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadyRunner;

impl Runner for ReadyRunner {
    fn run(&self, mut task: Task<'_>) {
        let mut cx = Context::from_waker(Waker::noop());
        match task.as_mut().poll(&mut cx) {
            Poll::Ready(()) => {}
            Poll::Pending => panic!(
                "a store future was not ready at once: ReadyRunner is for embedded backends; \
                 give the suite a Runner around the backend's async runtime"
            ),
        }
    }
}

/// One check of the suite: its name and its function.
#[derive(Clone, Copy)]
pub struct Check {
    /// The check's name, which is also the name of its function in this module.
    pub name: &'static str,
    /// The check. It takes a fresh, empty registry and panics when the backend departs from
    /// the contract.
    pub run: fn(&dyn Registry, &dyn Runner),
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

/// Writes one `#[test]` per check of the conformance suite ([`conformance`](crate::conformance)),
/// each named as its check.
///
/// `conformance_tests!(make, runner)`: `make` is called once per test, with no argument, and
/// returns anything that dereferences to a registry (for instance an `Arc<MemoryRegistry>`, or a
/// fixture that holds a temporary directory with the registry in it); `runner` is a
/// [`Runner`](crate::conformance::Runner) value, evaluated once per test. (The arms that start
/// with `@` are the macro's own: they hold the one list of checks that [`CHECKS`] is also made
/// from.)
///
/// [`CHECKS`]: crate::conformance::CHECKS
///
/// ```
/// use std::sync::Arc;
/// use portcullis_core::MemoryRegistry;
/// use portcullis_core::conformance::ReadyRunner;
///
/// portcullis_core::conformance_tests!(|| Arc::new(MemoryRegistry::new()), ReadyRunner);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    // The list of checks, in the order `run_all` runs them: given to the arm named `$then`.
    (@checks $then:tt $args:tt) => {
        $crate::conformance_tests! {
            @$then $args [
                an_empty_registry_has_nothing
                users_are_added_once
                user_names_follow_check_name
                service_users_have_no_totp
                users_are_listed_by_name
                devices_are_bound_to_existing_users
                bindings_conflict_only_with_active_ones
                device_by_fingerprint_prefers_the_active_then_the_latest
                device_by_name_prefers_the_active_then_the_latest
                devices_are_listed_by_name_then_binding_time
                revoke_device_revokes_its_sessions
                roles_are_set_normalized_and_cleared
                bad_roles_and_unknown_users_are_refused
                revoke_user_revokes_every_active_device_and_session
                commit_records_the_session
                revoke_session_keeps_the_first_time
                sessions_are_listed_newest_first_without_expired_ones
                live_session_is_of_the_active_binding_since_it_was_bound
                snapshot_reads_device_user_lock_step_and_roles
                snapshot_without_the_secret_still_has_totp
                snapshot_of_unknown_and_revoked_devices
                snapshot_reads_the_session_asked_for
                commit_of_no_effects_is_applied
                accept_step_records_step_clears_failures_and_session
                steps_are_single_use_per_user
                a_taken_step_writes_nothing
                a_locked_out_user_commits_nothing
                charge_failure_follows_the_lockout_policy
                a_recorded_session_id_writes_nothing
                commit_for_an_unknown_user_is_not_found
                concurrent_accepts_of_one_step_apply_once
                concurrent_failures_lock_at_the_threshold
            ]
        }
    };
    (@table () [$($name:ident)*]) => {
        &[$($crate::conformance::Check {
            name: ::core::stringify!($name),
            run: $crate::conformance::$name,
        }),*]
    };
    (@tests ($make:expr, $runner:expr) [$($name:ident)*]) => {
        $(
            #[test]
            fn $name() {
                let registry = ($make)();
                $crate::conformance::$name(&*registry, &$runner);
            }
        )*
    };
    ($make:expr, $runner:expr $(,)?) => {
        $crate::conformance_tests! { @checks tests ($make, $runner) }
    };
}

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[Check] = crate::conformance_tests! { @checks table () };

/// Runs every check of [`CHECKS`], each on a fresh, empty registry from `factory`, and panics
/// at the end, naming every check that failed (each failure's own message is printed as it
/// happens).
pub fn run_all(factory: &dyn Fn() -> Arc<dyn Registry>, runner: &dyn Runner) {
    let mut failed = Vec::new();
    for check in CHECKS {
        let registry = factory();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| (check.run)(&*registry, runner)));
        if outcome.is_err() {
            eprintln!("conformance check {} FAILED", check.name);
            failed.push(check.name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} conformance checks failed: {}",
        failed.len(),
        CHECKS.len(),
        failed.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Far in the future: a session that expires then is never forgotten during a check.
const FAR: u64 = 1 << 60;

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn sid(byte: u8) -> SessionId {
    SessionId([byte; 16])
}

fn totp_with(seed: u8, digits: u8, algorithm: TotpAlgorithm, period: u64) -> TotpConfig {
    let secret: Vec<u8> = (0..20).map(|i| seed.wrapping_add(i)).collect();
    TotpConfig::new(secret, digits, algorithm, period).expect("valid TOTP parameters")
}

fn totp(seed: u8) -> TotpConfig {
    totp_with(seed, 6, TotpAlgorithm::Sha1, 30)
}

fn roles(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| (*r).to_owned()).collect()
}

fn device(name: &str, user: &str, f: u8, created: u64, revoked: Option<u64>) -> DeviceRecord {
    DeviceRecord {
        name: name.into(),
        user: user.into(),
        fingerprint: fp(f),
        created_ms: created,
        revoked_ms: revoked,
    }
}

fn session(id: u8, user: &str, f: u8, totp_time_ms: u64, expires_ms: u64) -> SessionRecord {
    SessionRecord {
        id: sid(id),
        user: user.into(),
        fingerprint: fp(f),
        totp_time_ms,
        expires_ms,
        revoked_ms: None,
    }
}

fn revoked_at(record: &SessionRecord, ms: u64) -> SessionRecord {
    SessionRecord {
        revoked_ms: Some(ms),
        ..record.clone()
    }
}

fn accept_with(
    user: &str,
    step: u64,
    now_ms: u64,
    session: Option<SessionRecord>,
    lockout: LockoutPolicy,
) -> Effects {
    Effects::AcceptStep {
        user: user.into(),
        step,
        now_ms,
        lockout,
        session,
    }
}

fn accept(user: &str, step: u64, now_ms: u64, session: Option<SessionRecord>) -> Effects {
    accept_with(user, step, now_ms, session, LockoutPolicy::default())
}

fn charge_with(user: &str, now_ms: u64, lockout: LockoutPolicy) -> Effects {
    Effects::ChargeFailure {
        user: user.into(),
        now_ms,
        lockout,
    }
}

fn charge(user: &str, now_ms: u64) -> Effects {
    charge_with(user, now_ms, LockoutPolicy::default())
}

/// Unwraps `result`, or fails naming the call.
#[track_caller]
fn ok<T>(result: Result<T, RegistryError>, call: &str) -> T {
    result.unwrap_or_else(|e| panic!("{call} failed: {e:?}"))
}

/// Fails unless `result` is the error that `is` accepts.
#[track_caller]
fn refused<T: fmt::Debug>(
    result: Result<T, RegistryError>,
    is: fn(&RegistryError) -> bool,
    expected: &str,
    call: &str,
) {
    match result {
        Err(e) if is(&e) => {}
        other => panic!("{call}: expected {expected}, got {other:?}"),
    }
}

#[track_caller]
fn not_found<T: fmt::Debug>(result: Result<T, RegistryError>, call: &str) {
    refused(
        result,
        |e| matches!(e, RegistryError::NotFound(_)),
        "NotFound",
        call,
    );
}

#[track_caller]
fn already_exists<T: fmt::Debug>(result: Result<T, RegistryError>, call: &str) {
    refused(
        result,
        |e| matches!(e, RegistryError::AlreadyExists(_)),
        "AlreadyExists",
        call,
    );
}

#[track_caller]
fn invalid<T: fmt::Debug>(result: Result<T, RegistryError>, call: &str) {
    refused(
        result,
        |e| matches!(e, RegistryError::Invalid(_)),
        "Invalid",
        call,
    );
}

fn commit(
    r: &dyn Registry,
    run: &dyn Runner,
    effects: &Effects,
) -> Result<Committed, RegistryError> {
    run.block_on(r.commit(effects))
}

#[track_caller]
fn committed(r: &dyn Registry, run: &dyn Runner, effects: &Effects) -> Committed {
    ok(commit(r, run, effects), &format!("commit({effects:?})"))
}

#[track_caller]
fn applied(r: &dyn Registry, run: &dyn Runner, effects: &Effects) {
    assert_eq!(
        committed(r, run, effects),
        Committed::Applied,
        "commit({effects:?})"
    );
}

/// Records `record` the only way a session is recorded: with the TOTP step that earned it.
#[track_caller]
fn earn(r: &dyn Registry, run: &dyn Runner, step: u64, record: &SessionRecord) {
    applied(
        r,
        run,
        &accept(
            &record.user,
            step,
            record.totp_time_ms,
            Some(record.clone()),
        ),
    );
}

fn need(f: u8, secret: bool, session: SessionNeed, now_ms: u64) -> Need {
    Need {
        fingerprint: fp(f),
        secret,
        session,
        now_ms,
    }
}

#[track_caller]
fn snapshot(r: &dyn Registry, run: &dyn Runner, need: &Need) -> Snapshot {
    ok(
        run.block_on(r.snapshot(need)),
        &format!("snapshot({need:?})"),
    )
}

#[track_caller]
fn snapshot_user(r: &dyn Registry, run: &dyn Runner, need: &Need) -> UserState {
    snapshot(r, run, need)
        .user
        .unwrap_or_else(|| panic!("snapshot({need:?}) has no user"))
}

#[track_caller]
fn last_step(r: &dyn Registry, run: &dyn Runner, f: u8) -> Option<u64> {
    snapshot_user(r, run, &need(f, false, SessionNeed::None, 0)).last_step
}

#[track_caller]
fn lock(r: &dyn Registry, user: &str) -> LockState {
    ok(r.lock_state(user), &format!("lock_state({user:?})"))
}

#[track_caller]
fn get_session(r: &dyn Registry, id: u8) -> Option<SessionRecord> {
    ok(r.session(&sid(id)), &format!("session({})", sid(id)))
}

#[track_caller]
fn live(r: &dyn Registry, f: u8, now_ms: u64) -> Option<SessionRecord> {
    ok(
        r.live_session_for_device(&fp(f), now_ms),
        &format!("live_session_for_device({}, {now_ms})", fp(f)),
    )
}

#[track_caller]
fn listed(r: &dyn Registry, now_ms: u64) -> Vec<SessionRecord> {
    ok(r.list_sessions(now_ms), &format!("list_sessions({now_ms})"))
}

#[track_caller]
fn by_fingerprint(r: &dyn Registry, f: u8) -> Option<DeviceRecord> {
    ok(
        r.device_by_fingerprint(&fp(f)),
        &format!("device_by_fingerprint({})", fp(f)),
    )
}

#[track_caller]
fn by_name(r: &dyn Registry, name: &str) -> Option<DeviceRecord> {
    ok(r.device_by_name(name), &format!("device_by_name({name:?})"))
}

#[track_caller]
fn add(r: &dyn Registry, name: &str, totp: TotpConfig, now_ms: u64) {
    ok(
        r.add_user(name, totp, now_ms),
        &format!("add_user({name:?})"),
    );
}

#[track_caller]
fn bind(r: &dyn Registry, name: &str, user: &str, f: u8, now_ms: u64) -> DeviceRecord {
    ok(
        r.bind_device(name, user, &fp(f), now_ms),
        &format!("bind_device({name:?}, {user:?}, {})", fp(f)),
    )
}

#[track_caller]
fn revoke(r: &dyn Registry, name: &str, now_ms: u64) -> DeviceRecord {
    ok(
        r.revoke_device(name, now_ms),
        &format!("revoke_device({name:?}, {now_ms})"),
    )
}

#[track_caller]
fn set_roles(r: &dyn Registry, user: &str, list: &[&str]) {
    ok(
        r.set_user_roles(user, &roles(list)),
        &format!("set_user_roles({user:?}, {list:?})"),
    );
}

#[track_caller]
fn user_roles(r: &dyn Registry, user: &str) -> Vec<String> {
    ok(r.user_roles(user), &format!("user_roles({user:?})"))
}

#[track_caller]
fn user_names(r: &dyn Registry) -> Vec<String> {
    ok(r.list_users(), "list_users")
        .into_iter()
        .map(|u| u.name)
        .collect()
}

#[track_caller]
fn assert_same_totp(got: &TotpConfig, want: &TotpConfig, whose: &str) {
    assert_eq!(got.secret(), want.secret(), "{whose}: TOTP secret");
    assert_eq!(
        (got.digits(), got.algorithm(), got.period()),
        (want.digits(), want.algorithm(), want.period()),
        "{whose}: TOTP digits, algorithm and period"
    );
}

/// Alice with the laptop (fp 1) and the phone (fp 2), Bob with the desk (fp 3), bound at 100.
fn enroll(r: &dyn Registry) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    bind(r, "laptop", "alice", 1, 100);
    bind(r, "phone", "alice", 2, 100);
    bind(r, "desk", "bob", 3, 100);
}

// ---------------------------------------------------------------------------------------------
// Users.

/// A new registry has no users, devices, roles, lockout state or sessions, and reads of
/// missing things are `None`, empty or the default, not errors.
pub fn an_empty_registry_has_nothing(r: &dyn Registry, run: &dyn Runner) {
    assert!(ok(r.list_users(), "list_users").is_empty(), "no users");
    assert!(
        ok(r.list_devices(), "list_devices").is_empty(),
        "no devices"
    );
    assert!(ok(r.user("alice"), "user").is_none(), "no user alice");
    assert_eq!(by_name(r, "laptop"), None);
    assert_eq!(by_fingerprint(r, 1), None);
    assert_eq!(lock(r, "alice"), LockState::default(), "lock of no user");
    assert!(user_roles(r, "alice").is_empty(), "roles of no user");
    assert!(listed(r, 0).is_empty(), "no sessions");
    assert_eq!(get_session(r, 1), None);
    assert_eq!(live(r, 1, 0), None);
    not_found(r.revoke_session(&sid(1), 0), "revoke_session of no session");
    not_found(r.revoke_device("laptop", 0), "revoke_device of no device");
    for session in [
        SessionNeed::None,
        SessionNeed::ById(sid(1)),
        SessionNeed::LiveForDevice,
    ] {
        let s = snapshot(r, run, &need(1, true, session, 0));
        assert!(
            s.device.is_none() && s.user.is_none() && s.session.is_none(),
            "snapshot of an empty registry: {s:?}"
        );
    }
}

/// `add_user` records the name, the time and the TOTP parameters exactly; a name is taken once,
/// by a user or a service account, and a refused add changes nothing.
pub fn users_are_added_once(r: &dyn Registry, _run: &dyn Runner) {
    let alice_totp = totp_with(1, 6, TotpAlgorithm::Sha1, 30);
    let bob_totp = totp_with(3, 8, TotpAlgorithm::Sha512, 60);
    let carol_totp = totp_with(5, 7, TotpAlgorithm::Sha256, 45);
    add(r, "alice", alice_totp.clone(), 100);
    already_exists(
        r.add_user("alice", totp_with(2, 8, TotpAlgorithm::Sha256, 60), 101),
        "add_user of a taken name",
    );
    already_exists(
        r.add_service_user("alice", 102),
        "add_service_user of a user's name",
    );
    add(r, "bob", bob_totp.clone(), 102);
    add(r, "carol", carol_totp.clone(), 103);

    // The refused adds left alice as she was.
    let alice = ok(r.user("alice"), "user").expect("alice is recorded");
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.created_ms, 100, "alice's creation time");
    assert!(!alice.service, "alice is not a service account");
    let got = alice.totp.expect("alice has TOTP parameters");
    assert_same_totp(&got, &alice_totp, "alice");
    assert_eq!(
        got.generate(1_700_000_000),
        alice_totp.generate(1_700_000_000)
    );
    for (name, want, created) in [("bob", bob_totp, 102), ("carol", carol_totp, 103)] {
        let user = ok(r.user(name), "user").expect("recorded");
        assert_eq!(user.created_ms, created, "{name}'s creation time");
        assert_same_totp(&user.totp.expect("TOTP parameters"), &want, name);
    }
    assert!(ok(r.user("nobody"), "user").is_none());
    assert!(
        ok(r.user("Alice"), "user").is_none(),
        "names are case-sensitive"
    );
    assert_eq!(user_names(r), ["alice", "bob", "carol"]);
}

/// User names are refused with `Invalid` exactly when [`check_name`] refuses them, by
/// `add_user` and `add_service_user` alike, and a refused name is not recorded.
pub fn user_names_follow_check_name(r: &dyn Registry, _run: &dyn Runner) {
    let refused_names = [
        String::new(),
        "a\nb".into(),
        "tab\there".into(),
        "nul\0".into(),
        "del\u{7f}".into(),
        "x".repeat(129),
        "é".repeat(65),
        // Shown as "alicexe.gpj" reversed: a spoofed listing.
        "alice\u{202e}gpj.exe".into(),
        "zero\u{200b}width".into(),
        "isolate\u{2066}d".into(),
        "bom\u{feff}".into(),
        "a/b".into(),
        "../etc".into(),
        "back\\slash".into(),
        ".".into(),
        "..".into(),
    ];
    for name in &refused_names {
        assert!(
            check_name("user", name).is_err(),
            "check_name refuses {name:?}"
        );
        invalid(r.add_user(name, totp(1), 0), &format!("add_user({name:?})"));
        invalid(
            r.add_service_user(name, 0),
            &format!("add_service_user({name:?})"),
        );
    }
    let taken_names = [
        "x".repeat(128),
        "é".repeat(64),
        "with space".into(),
        "a.b-c_d@example".into(),
        "émile".into(),
        "a..b".into(),
        ".hidden".into(),
        "عربي".into(),
    ];
    for name in &taken_names {
        assert!(
            check_name("user", name).is_ok(),
            "check_name takes {name:?}"
        );
        add(r, name, totp(1), 0);
        assert!(ok(r.user(name), "user").is_some(), "{name:?} is recorded");
    }
    ok(
        r.add_service_user("bot ü", 0),
        "add_service_user(\"bot ü\")",
    );
    let mut want: Vec<String> = taken_names.to_vec();
    want.push("bot ü".into());
    want.sort();
    assert_eq!(user_names(r), want, "only the taken names are recorded");
}

/// A service account has no TOTP, is flagged, can have roles and devices, and its snapshot
/// says so.
pub fn service_users_have_no_totp(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 5);
    ok(r.add_service_user("backup-bot", 7), "add_service_user");
    let bot = ok(r.user("backup-bot"), "user").expect("the bot is recorded");
    assert!(bot.service, "the bot is a service account");
    assert!(bot.totp.is_none(), "a service account has no TOTP");
    assert_eq!(bot.created_ms, 7);
    let alice = ok(r.user("alice"), "user").expect("alice is recorded");
    assert!(!alice.service && alice.totp.is_some());
    already_exists(
        r.add_user("backup-bot", totp(2), 9),
        "add_user of a bot's name",
    );
    already_exists(
        r.add_service_user("backup-bot", 9),
        "add_service_user again",
    );

    set_roles(r, "backup-bot", &["backup"]);
    assert_eq!(user_roles(r, "backup-bot"), ["backup"]);
    let listed: Vec<_> = ok(r.list_users(), "list_users")
        .into_iter()
        .map(|u| (u.name, u.service))
        .collect();
    assert_eq!(
        listed,
        [("alice".to_owned(), false), ("backup-bot".to_owned(), true)]
    );

    bind(r, "bot-key", "backup-bot", 1, 10);
    let state = snapshot_user(r, run, &need(1, true, SessionNeed::None, 20));
    assert_eq!(state.name, "backup-bot");
    assert!(state.service, "snapshot: service");
    assert!(!state.has_totp, "snapshot: a service account has no TOTP");
    assert!(state.totp.is_none(), "snapshot: no TOTP to read");
    assert_eq!(state.created_ms, 7);
    assert_eq!(state.roles, ["backup"]);
}

/// `list_users` is every user and service account, by name (bytewise), with its record.
pub fn users_are_listed_by_name(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "zed", totp_with(5, 7, TotpAlgorithm::Sha256, 45), 5);
    add(r, "Adam", totp(6), 6);
    add(r, "émile", totp(7), 7);
    ok(r.add_service_user("bot", 8), "add_service_user");
    add(r, "alice", totp(1), 1);
    add(r, "bob", totp(2), 2);
    let users = ok(r.list_users(), "list_users");
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["Adam", "alice", "bob", "bot", "zed", "émile"]);
    let zed = users.iter().find(|u| u.name == "zed").expect("zed listed");
    assert_eq!(zed.created_ms, 5);
    assert_same_totp(
        zed.totp.as_ref().expect("zed has TOTP"),
        &totp_with(5, 7, TotpAlgorithm::Sha256, 45),
        "zed",
    );
    let bot = users.iter().find(|u| u.name == "bot").expect("bot listed");
    assert!(bot.service && bot.totp.is_none() && bot.created_ms == 8);
}

// ---------------------------------------------------------------------------------------------
// Devices.

/// `bind_device` returns the active record it wrote and both look-ups find it; an unknown user
/// is `NotFound` and a bad device name `Invalid` (as [`check_name`] says), and neither writes.
pub fn devices_are_bound_to_existing_users(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    let laptop = bind(r, "laptop", "alice", 1, 200);
    assert_eq!(laptop, device("laptop", "alice", 1, 200, None));
    assert_eq!(by_fingerprint(r, 1), Some(laptop.clone()));
    assert_eq!(by_name(r, "laptop"), Some(laptop.clone()));
    assert_eq!(by_fingerprint(r, 2), None);
    assert_eq!(by_name(r, "phone"), None);

    not_found(
        r.bind_device("phone", "carol", &fp(3), 201),
        "bind_device to an unknown user",
    );
    for name in ["", "bad\u{7f}name", "new\nline", &"d".repeat(129)] {
        assert!(check_name("device", name).is_err());
        invalid(
            r.bind_device(name, "alice", &fp(3), 201),
            &format!("bind_device({name:?})"),
        );
    }
    assert_eq!(by_fingerprint(r, 3), None, "a refused bind wrote nothing");
    assert_eq!(by_name(r, "phone"), None, "a refused bind wrote nothing");

    let phone = bind(r, "phone é", "alice", 2, 202);
    let longest = bind(r, &"d".repeat(128), "alice", 4, 203);
    assert_eq!(
        ok(r.list_devices(), "list_devices"),
        [longest, laptop, phone],
        "exactly the bound devices"
    );
}

/// A name or a fingerprint conflicts only with an active binding (`AlreadyExists`, nothing
/// written); once revoked, both can be bound again, to any user.
pub fn bindings_conflict_only_with_active_ones(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    let laptop = bind(r, "laptop", "alice", 1, 200);
    already_exists(
        r.bind_device("laptop", "bob", &fp(2), 201),
        "bind_device of an active name",
    );
    already_exists(
        r.bind_device("other", "bob", &fp(1), 201),
        "bind_device of an active fingerprint",
    );
    already_exists(
        r.bind_device("laptop", "alice", &fp(1), 201),
        "bind_device of the same binding again",
    );
    assert_eq!(
        ok(r.list_devices(), "list_devices"),
        [laptop],
        "refused binds wrote nothing"
    );

    let revoked = revoke(r, "laptop", 300);
    assert_eq!(revoked, device("laptop", "alice", 1, 200, Some(300)));
    // The name, then the fingerprint, are free again.
    bind(r, "laptop", "bob", 2, 400);
    bind(r, "old-laptop", "alice", 1, 500);
    already_exists(
        r.bind_device("laptop", "alice", &fp(9), 501),
        "bind_device of a name active again",
    );
    already_exists(
        r.bind_device("spare", "bob", &fp(1), 502),
        "bind_device of a fingerprint active again",
    );
    // The same name and fingerprint, to the same user, after a revocation.
    bind(r, "tablet", "alice", 5, 600);
    revoke(r, "tablet", 601);
    let tablet = bind(r, "tablet", "alice", 5, 602);
    assert_eq!(by_name(r, "tablet"), Some(tablet.clone()));
    assert_eq!(by_fingerprint(r, 5), Some(tablet));
}

/// `device_by_fingerprint` (and the snapshot's device): the active binding, even when a
/// revoked one was made later (a clock moved back); else the latest revoked one.
pub fn device_by_fingerprint_prefers_the_active_then_the_latest(
    r: &dyn Registry,
    run: &dyn Runner,
) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    bind(r, "watch", "bob", 7, 10);
    revoke(r, "watch", 11);
    bind(r, "watch2", "alice", 7, 30);
    revoke(r, "watch2", 31);
    let latest = device("watch2", "alice", 7, 30, Some(31));
    assert_eq!(by_fingerprint(r, 7), Some(latest.clone()));
    let s = snapshot(r, run, &need(7, false, SessionNeed::None, 40));
    assert_eq!(
        s.device,
        Some(latest),
        "snapshot: the latest revoked binding"
    );
    assert_eq!(s.user.map(|u| u.name).as_deref(), Some("alice"));

    bind(r, "tablet", "alice", 5, 1000);
    revoke(r, "tablet", 1001);
    let spare = bind(r, "spare", "bob", 5, 800);
    assert_eq!(by_fingerprint(r, 5), Some(spare.clone()));
    let s = snapshot(r, run, &need(5, false, SessionNeed::None, 1100));
    assert_eq!(s.device, Some(spare), "snapshot: the active binding");
    assert_eq!(s.user.map(|u| u.name).as_deref(), Some("bob"));
}

/// `device_by_name`: the active device with the name, even when a revoked one was made later;
/// else the latest revoked one.
pub fn device_by_name_prefers_the_active_then_the_latest(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    bind(r, "watch", "bob", 7, 10);
    revoke(r, "watch", 11);
    bind(r, "watch", "alice", 8, 20);
    revoke(r, "watch", 21);
    assert_eq!(
        by_name(r, "watch"),
        Some(device("watch", "alice", 8, 20, Some(21)))
    );
    let active = bind(r, "watch", "bob", 9, 30);
    assert_eq!(by_name(r, "watch"), Some(active));

    bind(r, "tablet", "alice", 5, 1000);
    revoke(r, "tablet", 1001);
    let tablet = bind(r, "tablet", "alice", 6, 900);
    assert_eq!(by_name(r, "tablet"), Some(tablet));
    assert_eq!(by_name(r, "Tablet"), None, "names are case-sensitive");
}

/// `list_devices`: every binding, active and revoked, by name (bytewise) then binding time.
pub fn devices_are_listed_by_name_then_binding_time(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    bind(r, "laptop", "alice", 1, 200);
    revoke(r, "laptop", 300);
    bind(r, "laptop", "bob", 2, 400);
    bind(r, "old-laptop", "alice", 1, 500);
    bind(r, "tablet", "alice", 5, 1000);
    revoke(r, "tablet", 1001);
    bind(r, "tablet", "alice", 6, 900);
    bind(r, "Spare", "bob", 5, 800);
    bind(r, "watch", "bob", 7, 20);
    revoke(r, "watch", 21);
    bind(r, "watch", "bob", 8, 10);
    revoke(r, "watch", 11);
    assert_eq!(
        ok(r.list_devices(), "list_devices"),
        [
            device("Spare", "bob", 5, 800, None),
            device("laptop", "alice", 1, 200, Some(300)),
            device("laptop", "bob", 2, 400, None),
            device("old-laptop", "alice", 1, 500, None),
            device("tablet", "alice", 6, 900, None),
            device("tablet", "alice", 5, 1000, Some(1001)),
            device("watch", "bob", 8, 10, Some(11)),
            device("watch", "bob", 7, 20, Some(21)),
        ]
    );
}

/// `revoke_device` revokes the active device with the name and, in the same change, every
/// session of its fingerprint not revoked yet (one revoked before keeps its time); other
/// devices' sessions are untouched. No active device with the name is `NotFound`.
pub fn revoke_device_revokes_its_sessions(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, FAR);
    let s2 = session(2, "alice", 2, 1_100, FAR);
    let s3 = session(3, "bob", 3, 1_200, FAR);
    let s4 = session(4, "alice", 1, 1_300, FAR);
    earn(r, run, 1, &s1);
    earn(r, run, 2, &s2);
    earn(r, run, 1, &s3);
    earn(r, run, 3, &s4);
    ok(r.revoke_session(&s4.id, 1_400), "revoke_session");

    let revoked = revoke(r, "laptop", 2_000);
    assert_eq!(revoked, device("laptop", "alice", 1, 100, Some(2_000)));
    assert_eq!(get_session(r, 1), Some(revoked_at(&s1, 2_000)));
    assert_eq!(
        get_session(r, 4),
        Some(revoked_at(&s4, 1_400)),
        "a session revoked before keeps its first revocation time"
    );
    assert_eq!(get_session(r, 2), Some(s2.clone()), "the phone's session");
    assert_eq!(get_session(r, 3), Some(s3), "bob's session");
    assert_eq!(live(r, 1, 2_100), None);
    assert_eq!(live(r, 2, 2_100), Some(s2));

    not_found(r.revoke_device("laptop", 2_001), "revoke_device again");
    not_found(
        r.revoke_device("nothing", 2_001),
        "revoke_device of no device",
    );
    assert_eq!(
        by_name(r, "laptop"),
        Some(revoked),
        "the revocation time is kept"
    );
    assert!(ok(r.user("alice"), "user").is_some(), "the user stays");
}

// ---------------------------------------------------------------------------------------------
// Roles.

/// `set_user_roles` replaces the roles, each once and sorted; an empty list clears them;
/// each user's roles are their own, and the snapshot reads them.
pub fn roles_are_set_normalized_and_cleared(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    bind(r, "laptop", "alice", 1, 0);
    assert!(user_roles(r, "alice").is_empty());
    set_roles(r, "alice", &["ops", "admin", "ops", "Admin", "a:b.c_d-e"]);
    let want = ["Admin", "a:b.c_d-e", "admin", "ops"];
    assert_eq!(user_roles(r, "alice"), want);
    assert_eq!(
        snapshot_user(r, run, &need(1, false, SessionNeed::None, 0)).roles,
        want,
        "snapshot: the roles, sorted"
    );
    assert!(user_roles(r, "bob").is_empty(), "bob's roles are his own");
    set_roles(r, "bob", &["audit"]);
    set_roles(r, "alice", &["audit"]);
    assert_eq!(user_roles(r, "alice"), ["audit"], "the roles are replaced");
    set_roles(r, "alice", &[]);
    assert!(user_roles(r, "alice").is_empty(), "an empty list clears");
    assert!(
        snapshot_user(r, run, &need(1, false, SessionNeed::None, 0))
            .roles
            .is_empty()
    );
    assert_eq!(user_roles(r, "bob"), ["audit"]);
    set_roles(r, "alice", &[]);
    assert!(user_roles(r, "alice").is_empty(), "clearing twice");
}

/// A bad role (as [`check_role`](crate::check_role) says) is `Invalid` and an unknown user
/// `NotFound`; neither changes anything.
pub fn bad_roles_and_unknown_users_are_refused(r: &dyn Registry, _run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    set_roles(r, "alice", &["admin"]);
    for bad in ["", "has space", "new\nline", "é", &"x".repeat(65)] {
        assert!(crate::check_role(bad).is_err());
        invalid(
            r.set_user_roles("alice", &roles(&["ok", bad])),
            &format!("set_user_roles with {bad:?}"),
        );
    }
    assert_eq!(
        user_roles(r, "alice"),
        ["admin"],
        "a refused change leaves the roles as they were"
    );
    set_roles(r, "alice", &[&"x".repeat(64)]);
    not_found(
        r.set_user_roles("nobody", &roles(&["admin"])),
        "set_user_roles of an unknown user",
    );
    not_found(
        r.set_user_roles("nobody", &[]),
        "clearing the roles of an unknown user",
    );
    assert!(user_roles(r, "nobody").is_empty());
}

// ---------------------------------------------------------------------------------------------
// revoke_user.

/// `revoke_user` revokes every active device of the user and every session of the user, in
/// one change, and returns those devices by name; the user stays enrolled and can be bound
/// again. An unknown user is `NotFound`.
pub fn revoke_user_revokes_every_active_device_and_session(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 1);
    add(r, "bob", totp(2), 1);
    add(r, "carol", totp(3), 1);
    bind(r, "phone", "alice", 1, 10);
    bind(r, "laptop", "alice", 2, 11);
    bind(r, "old", "alice", 3, 12);
    bind(r, "desk", "bob", 4, 14);
    let s1 = session(1, "alice", 1, 100, FAR);
    let s2 = session(2, "alice", 2, 110, FAR);
    let s3 = session(3, "alice", 2, 120, FAR);
    let s4 = session(4, "bob", 4, 130, FAR);
    earn(r, run, 1, &s1);
    earn(r, run, 2, &s2);
    earn(r, run, 3, &s3);
    earn(r, run, 1, &s4);
    ok(r.revoke_session(&s3.id, 200), "revoke_session");
    revoke(r, "old", 13);

    let revoked = ok(r.revoke_user("alice", 500), "revoke_user");
    assert_eq!(
        revoked,
        [
            device("laptop", "alice", 2, 11, Some(500)),
            device("phone", "alice", 1, 10, Some(500)),
        ],
        "alice's active devices, by name, revoked at the given time"
    );
    for f in [1, 2] {
        assert_eq!(by_fingerprint(r, f).and_then(|d| d.revoked_ms), Some(500));
    }
    assert_eq!(
        by_name(r, "old").and_then(|d| d.revoked_ms),
        Some(13),
        "a device revoked before keeps its time"
    );
    assert_eq!(by_name(r, "desk").and_then(|d| d.revoked_ms), None);
    assert_eq!(get_session(r, 1), Some(revoked_at(&s1, 500)));
    assert_eq!(get_session(r, 2), Some(revoked_at(&s2, 500)));
    assert_eq!(
        get_session(r, 3),
        Some(revoked_at(&s3, 200)),
        "a session revoked before keeps its first revocation time"
    );
    assert_eq!(get_session(r, 4), Some(s4.clone()), "bob's session");
    assert_eq!(live(r, 4, 600), Some(s4));

    assert!(
        ok(r.revoke_user("alice", 600), "revoke_user again").is_empty(),
        "nothing left to revoke"
    );
    assert!(
        ok(r.revoke_user("carol", 600), "revoke_user of carol").is_empty(),
        "a user without devices"
    );
    not_found(
        r.revoke_user("mallory", 600),
        "revoke_user of an unknown user",
    );

    assert!(
        ok(r.user("alice"), "user").is_some(),
        "alice stays enrolled"
    );
    let phone = bind(r, "new-phone", "alice", 5, 700);
    assert_eq!(by_fingerprint(r, 5), Some(phone));
    let s5 = session(5, "alice", 5, 800, FAR);
    earn(r, run, 4, &s5);
    assert_eq!(
        live(r, 5, 900),
        Some(s5),
        "a new binding lets alice in again"
    );
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// A session is recorded by the commit that accepts its step, exactly as given, and read by
/// id; an accept without a session records none.
pub fn commit_records_the_session(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, FAR);
    earn(r, run, 1, &s1);
    assert_eq!(get_session(r, 1), Some(s1.clone()));
    assert_eq!(get_session(r, 9), None);
    applied(r, run, &accept("alice", 2, 1_100, None));
    assert_eq!(
        listed(r, 0),
        std::slice::from_ref(&s1),
        "an accept without a session"
    );
    let s2 = session(2, "bob", 3, 1_200, FAR);
    earn(r, run, 1, &s2);
    assert_eq!(get_session(r, 2), Some(s2));
    assert_eq!(get_session(r, 1), Some(s1));
}

/// `revoke_session` marks the record revoked and returns it; revoking again keeps the first
/// time; an unknown id is `NotFound`.
pub fn revoke_session_keeps_the_first_time(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, FAR);
    let s2 = session(2, "alice", 1, 1_100, FAR);
    earn(r, run, 1, &s1);
    earn(r, run, 2, &s2);
    assert_eq!(
        ok(r.revoke_session(&s1.id, 1_500), "revoke_session"),
        revoked_at(&s1, 1_500),
        "revoke_session returns the record as it is now"
    );
    assert_eq!(get_session(r, 1), Some(revoked_at(&s1, 1_500)));
    assert_eq!(get_session(r, 2), Some(s2.clone()), "only that session");
    assert_eq!(
        ok(r.revoke_session(&s1.id, 1_600), "revoke_session again"),
        revoked_at(&s1, 1_500),
        "revoking again keeps the first time"
    );
    assert_eq!(get_session(r, 1), Some(revoked_at(&s1, 1_500)));
    ok(r.revoke_session(&s2.id, 1_700), "revoke_session");
    assert_eq!(
        listed(r, 2_000),
        [revoked_at(&s2, 1_700), revoked_at(&s1, 1_500)]
    );
    not_found(
        r.revoke_session(&sid(3), 1_700),
        "revoke_session of no session",
    );
}

/// `list_sessions(now)`: the records that have not expired at `now` (expiry later than
/// `now`), revoked ones included, newest first.
pub fn sessions_are_listed_newest_first_without_expired_ones(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let first = session(1, "alice", 1, 1_000, 5_000);
    let bob = session(4, "bob", 3, 1_200, 9_000);
    let phone = session(3, "alice", 2, 1_500, 9_000);
    let second = session(2, "alice", 1, 2_000, 6_000);
    earn(r, run, 1, &first);
    earn(r, run, 1, &bob);
    earn(r, run, 2, &phone);
    earn(r, run, 3, &second);
    let all = [second.clone(), phone.clone(), bob.clone(), first.clone()];
    assert_eq!(listed(r, 0), all);
    assert_eq!(listed(r, 4_999), all);
    assert_eq!(
        listed(r, 5_000),
        [second.clone(), phone.clone(), bob.clone()],
        "a session expires at its expiry time"
    );
    assert_eq!(listed(r, 6_000), [phone.clone(), bob.clone()]);
    assert!(listed(r, 9_000).is_empty());

    ok(r.revoke_session(&second.id, 3_000), "revoke_session");
    assert_eq!(
        listed(r, 3_000),
        [revoked_at(&second, 3_000), phone, bob, first],
        "revoked sessions are listed with their revocation time"
    );
}

/// `live_session_for_device` (and the snapshot's `LiveForDevice`): the newest session that is
/// not revoked and not expired, of the device's active binding, earned by its user since it was
/// bound (at the binding time included).
pub fn live_session_is_of_the_active_binding_since_it_was_bound(
    r: &dyn Registry,
    run: &dyn Runner,
) {
    enroll(r);
    let first = session(1, "alice", 1, 1_000, 5_000);
    let phone = session(3, "alice", 2, 1_500, 9_000);
    let second = session(2, "alice", 1, 2_000, 6_000);
    earn(r, run, 1, &first);
    earn(r, run, 2, &phone);
    earn(r, run, 3, &second);
    assert_eq!(live(r, 1, 2_000), Some(second.clone()), "the newest");
    assert_eq!(live(r, 2, 2_000), Some(phone.clone()));
    assert_eq!(live(r, 3, 2_000), None, "bob has no session");
    assert_eq!(live(r, 9, 2_000), None, "an unknown device");
    ok(r.revoke_session(&second.id, 3_000), "revoke_session");
    assert_eq!(
        live(r, 1, 3_000),
        Some(first.clone()),
        "not the revoked one"
    );
    let s = snapshot(r, run, &need(1, false, SessionNeed::LiveForDevice, 3_000));
    assert_eq!(s.session, Some(first), "snapshot: LiveForDevice");
    assert_eq!(live(r, 1, 5_000), None, "expired at its expiry time");
    let s = snapshot(r, run, &need(1, false, SessionNeed::LiveForDevice, 5_000));
    assert_eq!(s.session, None, "snapshot: LiveForDevice, expired");

    // The laptop's key bound again, to bob: alice's sessions on it do not count for bob, nor
    // do bob's from before the binding.
    revoke(r, "laptop", 6_000);
    bind(r, "laptop-2", "bob", 1, 8_000);
    earn(r, run, 2, &session(5, "bob", 1, 7_000, FAR));
    earn(r, run, 4, &session(6, "alice", 1, 8_500, FAR));
    assert_eq!(live(r, 1, 9_000), None, "neither alice's nor an older one");
    let s = snapshot(r, run, &need(1, false, SessionNeed::LiveForDevice, 9_000));
    assert_eq!(
        s.session, None,
        "snapshot: neither alice's nor an older one"
    );
    let at_binding = session(7, "bob", 1, 8_000, FAR);
    earn(r, run, 3, &at_binding);
    assert_eq!(
        live(r, 1, 9_000),
        Some(at_binding),
        "earned at the binding time"
    );
    let newest = session(8, "bob", 1, 9_000, FAR);
    earn(r, run, 4, &newest);
    assert_eq!(live(r, 1, 9_100), Some(newest.clone()));
    let s = snapshot(r, run, &need(1, false, SessionNeed::LiveForDevice, 9_100));
    assert_eq!(s.session, Some(newest));

    revoke(r, "laptop-2", 9_500);
    assert_eq!(live(r, 1, 9_600), None, "no active binding");
    let s = snapshot(r, run, &need(1, false, SessionNeed::LiveForDevice, 9_600));
    assert_eq!(s.session, None, "snapshot: no active binding");
}

// ---------------------------------------------------------------------------------------------
// Snapshot.

/// The snapshot reads the device's binding and the user it is bound to: the record, the TOTP
/// parameters when asked for, the lockout state, the last accepted step and the roles.
pub fn snapshot_reads_device_user_lock_step_and_roles(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 5);
    add(r, "bob", totp(2), 6);
    let laptop = bind(r, "laptop", "alice", 1, 100);
    let desk = bind(r, "desk", "bob", 2, 100);
    set_roles(r, "alice", &["ops", "admin"]);

    let s = snapshot(r, run, &need(1, true, SessionNeed::None, 1_000));
    assert_eq!(s.device, Some(laptop.clone()));
    assert_eq!(s.session, None, "SessionNeed::None reads no session");
    let alice = s.user.expect("the snapshot has the device's user");
    assert_eq!(alice.name, "alice");
    assert_same_totp(
        alice.totp.as_ref().expect("secret: true reads the TOTP"),
        &totp(1),
        "alice",
    );
    assert!(alice.has_totp && !alice.service);
    assert_eq!(alice.created_ms, 5);
    assert_eq!(alice.lock, LockState::default());
    assert_eq!(alice.last_step, None);
    assert_eq!(alice.roles, ["admin", "ops"]);

    applied(r, run, &accept("alice", 7, 1_000, None));
    applied(r, run, &charge("alice", 2_000));
    applied(r, run, &charge("alice", 2_001));
    let alice = snapshot_user(r, run, &need(1, true, SessionNeed::None, 3_000));
    assert_eq!(alice.last_step, Some(7));
    assert_eq!(
        alice.lock,
        LockState {
            failures: 2,
            locked_until_ms: 0
        }
    );
    assert_eq!(alice.lock, lock(r, "alice"), "the same as lock_state");

    // The user read is the one the device is bound to, with their own state.
    let s = snapshot(r, run, &need(2, true, SessionNeed::None, 3_000));
    assert_eq!(s.device, Some(desk));
    let bob = s.user.expect("bob");
    assert_eq!(bob.name, "bob");
    assert_same_totp(bob.totp.as_ref().expect("bob's TOTP"), &totp(2), "bob");
    assert_eq!((bob.lock, bob.last_step), (LockState::default(), None));
    assert!(bob.roles.is_empty());
}

/// With `secret: false` the store need not read the TOTP parameters, but `has_totp` still says
/// whether the user has them (and parameters it does return are the user's).
pub fn snapshot_without_the_secret_still_has_totp(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    let alice = snapshot_user(r, run, &need(1, false, SessionNeed::None, 0));
    assert!(alice.has_totp, "has_totp without reading the secret");
    if let Some(got) = &alice.totp {
        assert_same_totp(got, &totp(1), "alice (secret: false)");
    }
    let alice = snapshot_user(r, run, &need(1, true, SessionNeed::None, 0));
    assert!(alice.has_totp);
    assert!(alice.totp.is_some(), "secret: true reads the TOTP");
}

/// An unknown fingerprint reads nothing; a revoked binding is still read, with its user, but
/// has no live session.
pub fn snapshot_of_unknown_and_revoked_devices(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, FAR);
    earn(r, run, 1, &s1);
    let s = snapshot(r, run, &need(9, true, SessionNeed::LiveForDevice, 2_000));
    assert!(
        s.device.is_none() && s.user.is_none() && s.session.is_none(),
        "an unknown fingerprint: {s:?}"
    );
    let revoked = revoke(r, "laptop", 1_500);
    let s = snapshot(r, run, &need(1, true, SessionNeed::LiveForDevice, 2_000));
    assert_eq!(s.device, Some(revoked), "the revoked binding");
    let alice = s.user.expect("the revoked binding's user");
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.last_step, Some(1));
    assert_eq!(s.session, None, "no live session without an active binding");
}

/// `SessionNeed::None` reads no session, `ById` the recorded session with the id whatever it
/// is (revoked, or of another device: the gate judges it), `LiveForDevice` as
/// `live_session_for_device`.
pub fn snapshot_reads_the_session_asked_for(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, 5_000);
    let s2 = session(2, "alice", 2, 1_100, FAR);
    earn(r, run, 1, &s1);
    earn(r, run, 2, &s2);
    let read = |session, now| snapshot(r, run, &need(1, false, session, now)).session;
    assert_eq!(read(SessionNeed::None, 2_000), None);
    assert_eq!(read(SessionNeed::ById(s1.id), 2_000), Some(s1.clone()));
    assert_eq!(read(SessionNeed::ById(sid(9)), 2_000), None);
    assert_eq!(
        read(SessionNeed::ById(s2.id), 2_000),
        Some(s2.clone()),
        "ById reads the session whatever its device"
    );
    assert_eq!(read(SessionNeed::LiveForDevice, 2_000), Some(s1.clone()));
    assert_eq!(read(SessionNeed::LiveForDevice, 5_000), None);
    ok(r.revoke_session(&s1.id, 3_000), "revoke_session");
    assert_eq!(
        read(SessionNeed::ById(s1.id), 3_000),
        Some(revoked_at(&s1, 3_000)),
        "ById reads a revoked session, with its revocation"
    );
    assert_eq!(read(SessionNeed::LiveForDevice, 3_000), None);
    let s = snapshot(r, run, &need(1, true, SessionNeed::ById(s2.id), 3_000));
    assert!(
        s.device.is_some() && s.user.is_some(),
        "with the device and user"
    );
}

// ---------------------------------------------------------------------------------------------
// Commit.

/// `Effects::None` writes nothing and is applied.
pub fn commit_of_no_effects_is_applied(r: &dyn Registry, run: &dyn Runner) {
    applied(r, run, &Effects::None);
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    applied(r, run, &Effects::None);
    assert_eq!(lock(r, "alice"), LockState::default());
    assert_eq!(last_step(r, run, 1), None);
    assert!(listed(r, 0).is_empty());
}

/// `AcceptStep` of a later step records the step, clears the failures (and an expired lock)
/// and records the session, in one change.
pub fn accept_step_records_step_clears_failures_and_session(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    for now in [1_000, 1_001, 1_002] {
        applied(r, run, &charge("alice", now));
    }
    assert_eq!(lock(r, "alice").failures, 3);
    let s1 = session(1, "alice", 1, 2_000, FAR);
    applied(r, run, &accept("alice", 10, 2_000, Some(s1.clone())));
    assert_eq!(lock(r, "alice"), LockState::default(), "failures cleared");
    assert_eq!(last_step(r, run, 1), Some(10));
    assert_eq!(get_session(r, 1), Some(s1));
    applied(r, run, &accept("alice", 11, 2_100, None));
    assert_eq!(last_step(r, run, 1), Some(11));
    applied(r, run, &accept("alice", 1_000_000, 2_200, None));
    assert_eq!(last_step(r, run, 1), Some(1_000_000));

    // A lock that has expired does not stop an accept, which clears it.
    let once = LockoutPolicy {
        threshold: 1,
        ..LockoutPolicy::default()
    };
    applied(r, run, &charge_with("alice", 3_000, once));
    let locked = lock(r, "alice");
    assert_eq!(locked.locked_until_ms, 33_000, "locked at the threshold");
    applied(
        r,
        run,
        &accept("alice", 1_000_001, locked.locked_until_ms, None),
    );
    assert_eq!(lock(r, "alice"), LockState::default(), "lock cleared");
    assert_eq!(last_step(r, run, 1), Some(1_000_001));
}

/// Steps are single use and never go backwards, per user (step 0 included).
pub fn steps_are_single_use_per_user(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    add(r, "carol", totp(3), 0);
    bind(r, "pad", "carol", 4, 0);
    let lenient = LockoutPolicy {
        threshold: 1_000,
        ..LockoutPolicy::default()
    };
    let step =
        |user: &str, step: u64| committed(r, run, &accept_with(user, step, 1_000, None, lenient));
    assert_eq!(step("alice", 10), Committed::Applied);
    assert_eq!(step("bob", 10), Committed::Applied, "steps are per user");
    assert!(matches!(step("alice", 10), Committed::StepTaken(_)));
    assert!(matches!(step("alice", 9), Committed::StepTaken(_)));
    assert!(matches!(step("bob", 5), Committed::StepTaken(_)));
    assert_eq!(step("alice", 11), Committed::Applied);
    assert_eq!(step("carol", 0), Committed::Applied, "step 0 is a step");
    assert!(matches!(step("carol", 0), Committed::StepTaken(_)));
    assert_eq!(last_step(r, run, 1), Some(11));
    assert_eq!(last_step(r, run, 3), Some(10));
    assert_eq!(last_step(r, run, 4), Some(0));
}

/// `AcceptStep` of a step that is not later than the last one (taken meanwhile) writes
/// nothing: neither the step nor the session, and no failure (a code already accepted is no
/// guess of the secret). It says so with the unchanged lockout state, also when failures were
/// charged before.
pub fn a_taken_step_writes_nothing(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    applied(r, run, &accept("alice", 10, 1_000, None));
    applied(r, run, &charge("alice", 1_500));
    let before = lock(r, "alice");
    assert_eq!(before.failures, 1);
    for (i, (step, now)) in [
        (10, 2_000),
        (9, 2_001),
        (10, 2_002),
        (10, 2_003),
        (3, 2_004),
    ]
    .into_iter()
    .enumerate()
    {
        let s = session(i as u8 + 1, "alice", 1, now, FAR);
        assert_eq!(
            committed(
                r,
                run,
                &accept_with("alice", step, now, Some(s), LockoutPolicy::default())
            ),
            Committed::StepTaken(before),
            "step {step} again at {now}"
        );
        assert_eq!(lock(r, "alice"), before, "no failure is charged");
        assert_eq!(get_session(r, i as u8 + 1), None, "no session recorded");
    }
    assert_eq!(last_step(r, run, 1), Some(10), "the last step is unchanged");
    assert!(listed(r, 0).is_empty());
}

/// A user locked out at the decision's time commits nothing, accept or failure, and the answer
/// carries the lock; at the lock's deadline the user is no longer locked.
pub fn a_locked_out_user_commits_nothing(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    let policy = LockoutPolicy::default();
    for _ in 0..policy.threshold {
        applied(r, run, &charge("alice", 1_000));
    }
    let locked = lock(r, "alice");
    assert_eq!(
        locked,
        LockState {
            failures: 5,
            locked_until_ms: 31_000
        }
    );
    let s1 = session(1, "alice", 1, 2_000, FAR);
    for (effects, what) in [
        (accept("alice", 10, 2_000, Some(s1.clone())), "accept"),
        (charge("alice", 2_000), "charge"),
        (
            accept("alice", 10, 30_999, None),
            "accept just before the deadline",
        ),
    ] {
        assert_eq!(
            committed(r, run, &effects),
            Committed::LockedOut(locked),
            "{what} while locked out"
        );
        assert_eq!(lock(r, "alice"), locked, "{what}: the lock is unchanged");
    }
    assert_eq!(last_step(r, run, 1), None, "no step was recorded");
    assert_eq!(get_session(r, 1), None, "no session was recorded");
    assert!(listed(r, 0).is_empty());

    // At the deadline the lock has lifted: a failure doubles the wait.
    applied(r, run, &charge("alice", 31_000));
    assert_eq!(
        lock(r, "alice"),
        LockState {
            failures: 6,
            locked_until_ms: 91_000
        }
    );
    applied(r, run, &accept("alice", 10, 91_000, Some(s1.clone())));
    assert_eq!(lock(r, "alice"), LockState::default());
    assert_eq!(get_session(r, 1), Some(s1));
}

/// `ChargeFailure` replaces the lockout state by [`LockoutPolicy::after_failure`] of it, with
/// the policy it carries: locked at the threshold, then doubling waits up to the maximum.
pub fn charge_failure_follows_the_lockout_policy(r: &dyn Registry, run: &dyn Runner) {
    add(r, "alice", totp(1), 0);
    add(r, "bob", totp(2), 0);
    let policy = LockoutPolicy {
        threshold: 3,
        base_ms: 1_000,
        max_ms: 3_000,
    };
    let mut state = LockState::default();
    let mut waits = Vec::new();
    for i in 1..=6u64 {
        // Each failure after the previous lock lifted.
        let now = i * 10_000;
        state = policy.after_failure(state, now);
        applied(r, run, &charge_with("alice", now, policy));
        assert_eq!(lock(r, "alice"), state, "after failure {i}");
        waits.push(state.remaining_ms(now).unwrap_or(0));
    }
    assert_eq!(waits, [0, 0, 1_000, 2_000, 3_000, 3_000]);
    assert_eq!(
        lock(r, "bob"),
        LockState::default(),
        "bob's state is his own"
    );
    // A success clears the count.
    applied(r, run, &accept("alice", 1, 100_000, None));
    applied(r, run, &charge_with("alice", 100_001, policy));
    assert_eq!(
        lock(r, "alice"),
        LockState {
            failures: 1,
            locked_until_ms: 0
        }
    );
}

/// An `AcceptStep` whose session id is already recorded is `AlreadyExists` and writes nothing:
/// the step is not taken, the failures are not cleared, the recorded session is unchanged.
pub fn a_recorded_session_id_writes_nothing(r: &dyn Registry, run: &dyn Runner) {
    enroll(r);
    let s1 = session(1, "alice", 1, 1_000, FAR);
    earn(r, run, 1, &s1);
    applied(r, run, &charge("alice", 1_500));
    let dup = session(1, "alice", 2, 2_000, FAR);
    already_exists(
        commit(r, run, &accept("alice", 2, 2_000, Some(dup))),
        "AcceptStep with a recorded session id",
    );
    assert_eq!(
        get_session(r, 1),
        Some(s1.clone()),
        "the record is unchanged"
    );
    assert_eq!(lock(r, "alice").failures, 1, "the failures are not cleared");
    assert_eq!(last_step(r, run, 1), Some(1), "the step is not taken");
    // Bob's commit with alice's session id: the same.
    already_exists(
        commit(
            r,
            run,
            &accept("bob", 5, 2_000, Some(session(1, "bob", 3, 2_000, FAR))),
        ),
        "AcceptStep with another user's session id",
    );
    assert_eq!(last_step(r, run, 3), None, "bob's step is not taken");
    assert_eq!(get_session(r, 1), Some(s1.clone()));
    // The step is still there to take.
    let s2 = session(2, "alice", 2, 2_000, FAR);
    applied(r, run, &accept("alice", 2, 2_000, Some(s2.clone())));
    assert_eq!(lock(r, "alice"), LockState::default());
    assert_eq!(listed(r, 0), [s2.clone(), s1.clone()]);
    // A taken step with a recorded session id: the id decides first, and no failure is charged.
    already_exists(
        commit(
            r,
            run,
            &accept("alice", 2, 2_500, Some(session(1, "alice", 2, 2_500, FAR))),
        ),
        "AcceptStep with a taken step and a recorded session id",
    );
    assert_eq!(lock(r, "alice"), LockState::default(), "no failure charged");
    assert_eq!(listed(r, 0), [s2, s1]);
}

/// A commit for a user that does not exist is `NotFound` and writes nothing.
pub fn commit_for_an_unknown_user_is_not_found(r: &dyn Registry, run: &dyn Runner) {
    let s = session(1, "nobody", 1, 1_000, FAR);
    not_found(
        commit(r, run, &accept("nobody", 1, 1_000, None)),
        "AcceptStep",
    );
    not_found(
        commit(r, run, &accept("nobody", 1, 1_000, Some(s))),
        "AcceptStep with a session",
    );
    not_found(commit(r, run, &charge("nobody", 1_000)), "ChargeFailure");
    assert_eq!(get_session(r, 1), None, "no session was recorded");
    assert!(listed(r, 0).is_empty());
    assert!(ok(r.list_users(), "list_users").is_empty());
}

/// 20 commits of the same `AcceptStep` at once, each with its own session: exactly one is
/// applied and records its session; the 19 others lose the step and charge nothing.
pub fn concurrent_accepts_of_one_step_apply_once(r: &dyn Registry, run: &dyn Runner) {
    const N: u8 = 20;
    add(r, "alice", totp(1), 0);
    bind(r, "laptop", "alice", 1, 0);
    // The default threshold: losers charge nothing, so none of them finds a lock.
    let lenient = LockoutPolicy::default();
    let barrier = Barrier::new(usize::from(N));
    let results: Vec<(u8, Committed)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=N)
            .map(|i| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let s = session(i, "alice", 1, 5_000, FAR);
                    let effects = accept_with("alice", 42, 5_000, Some(s), lenient);
                    barrier.wait();
                    (i, committed(r, run, &effects))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a committing thread panicked"))
            .collect()
    });
    let winners: Vec<u8> = results
        .iter()
        .filter(|(_, c)| *c == Committed::Applied)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one accept applied: {results:?}");
    assert!(
        results
            .iter()
            .all(|(_, c)| matches!(c, Committed::Applied | Committed::StepTaken(_))),
        "the others lost the step: {results:?}"
    );
    assert_eq!(last_step(r, run, 1), Some(42));
    assert_eq!(
        lock(r, "alice"),
        LockState::default(),
        "no loser charged a failure"
    );
    let sessions = listed(r, 0);
    assert_eq!(
        sessions.iter().map(|s| s.id).collect::<Vec<_>>(),
        [sid(winners[0])],
        "only the winner's session is recorded"
    );
}

/// 40 `ChargeFailure` commits at once with a threshold of 5: exactly 5 are applied, the 35
/// others find the user locked out, and the stored state is the lock of the 5th failure.
pub fn concurrent_failures_lock_at_the_threshold(r: &dyn Registry, run: &dyn Runner) {
    const N: usize = 40;
    add(r, "alice", totp(1), 0);
    let policy = LockoutPolicy::default();
    let effects = charge_with("alice", 5_000, policy);
    let barrier = Barrier::new(N);
    let results: Vec<Committed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (barrier, effects) = (&barrier, &effects);
                scope.spawn(move || {
                    barrier.wait();
                    committed(r, run, effects)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a committing thread panicked"))
            .collect()
    });
    let locked = LockState {
        failures: policy.threshold,
        locked_until_ms: 5_000 + policy.base_ms,
    };
    let applied = results.iter().filter(|c| **c == Committed::Applied).count();
    let locked_out = results
        .iter()
        .filter(|c| **c == Committed::LockedOut(locked))
        .count();
    assert_eq!(
        (applied, locked_out),
        (policy.threshold as usize, N - policy.threshold as usize),
        "5 failures applied, 35 locked out at {locked:?}: {results:?}"
    );
    assert_eq!(lock(r, "alice"), locked);
}
