//! The backend conformance suite against `MemoryRegistry`, the reference: one test per check,
//! and the whole suite once through `run_all`; then the suite's own tools: `ReadyRunner` refuses
//! a future that waits, and `run_all` names the checks a broken backend fails.

use std::panic;
use std::sync::Arc;

use portcullis_core::conformance::{self, ReadyRunner, Runner};
use portcullis_core::store::{Admin, GateStore, SessionStore, StoreFuture};
use portcullis_core::*;

portcullis_core::conformance_tests!(|| Arc::new(MemoryRegistry::new()), ReadyRunner);

#[test]
fn run_all_passes() {
    conformance::run_all(&|| Arc::new(MemoryRegistry::new()), &ReadyRunner);
}

#[test]
fn the_checks_are_listed_once_each() {
    let mut names: Vec<&str> = conformance::CHECKS.iter().map(|c| c.name).collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count);
    assert!(count >= 30, "{count} checks");
}

#[test]
#[should_panic(expected = "not ready at once")]
fn ready_runner_refuses_a_future_that_waits() {
    let runner: &dyn Runner = &ReadyRunner;
    runner.block_on(std::future::pending::<()>());
}

/// `MemoryRegistry`, but users are listed in the wrong order.
struct Unsorted(MemoryRegistry);

impl GateStore for Unsorted {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        self.0.snapshot(need)
    }
    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        self.0.commit(effects)
    }
}

impl SessionStore for Unsorted {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.0.session(id)
    }
    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        self.0.live_session_for_device(fingerprint, now_ms)
    }
    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        self.0.list_sessions(now_ms)
    }
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.0.revoke_session(id, now_ms)
    }
}

impl Admin for Unsorted {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.0.user(name)
    }
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.0.lock_state(user)
    }
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        self.0.user_roles(user)
    }
    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        self.0.set_user_roles(user, roles)
    }
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        self.0.add_user(name, totp, now_ms)
    }
    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.0.add_service_user(name, now_ms)
    }
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.0.device_by_fingerprint(fingerprint)
    }
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.0.device_by_name(name)
    }
    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        self.0.bind_device(name, user, fingerprint, now_ms)
    }
    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        self.0.revoke_device(name, now_ms)
    }
    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.0.revoke_user(user, now_ms)
    }
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        let mut users = self.0.list_users()?;
        users.reverse();
        Ok(users)
    }
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.0.list_devices()
    }
}

#[test]
fn run_all_names_the_checks_a_backend_fails() {
    let failure = panic::catch_unwind(|| {
        conformance::run_all(&|| Arc::new(Unsorted(MemoryRegistry::new())), &ReadyRunner)
    })
    .expect_err("a backend that lists users out of order fails the suite");
    let message = failure
        .downcast_ref::<String>()
        .expect("run_all's message")
        .clone();
    for check in [
        "users_are_added_once",
        "user_names_follow_check_name",
        "service_users_have_no_totp",
        "users_are_listed_by_name",
    ] {
        assert!(message.contains(check), "{check} in {message:?}");
    }
    assert!(
        !message.contains("roles_are_set_normalized_and_cleared"),
        "only the failing checks are named: {message}"
    );
}
