//! A store for tests whose snapshots and commits can be slowed down or made to fail, around a
//! [`MemoryRegistry`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use portcullis::core::store::StoreFuture;
use portcullis::core::{
    Admin, Committed, DeviceFingerprint, DeviceRecord, Effects, GateStore, LockState,
    MemoryRegistry, Need, RegistryError, SessionId, SessionRecord, SessionStore, Snapshot,
    TotpConfig, UserRecord,
};

/// How a slowed-down call waits: blocking its thread (a synchronous store on the blocking
/// pool) or awaiting a timer (an asynchronous store).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Blocking,
    Async,
}

/// A [`MemoryRegistry`] whose snapshots and commits can be made slow; it counts the commits
/// that wrote something.
pub struct Slowed {
    pub inner: MemoryRegistry,
    wait: Wait,
    /// Milliseconds each snapshot waits before it reads.
    pub snapshot_delay_ms: AtomicU64,
    /// Milliseconds each commit waits before it writes.
    pub commit_delay_ms: AtomicU64,
    /// Commits that had effects to write.
    pub commits: AtomicU64,
    /// Makes every snapshot fail, as a registry that does not answer.
    pub snapshots_fail: AtomicBool,
}

impl Slowed {
    pub fn new(wait: Wait) -> Self {
        Self {
            inner: MemoryRegistry::new(),
            wait,
            snapshot_delay_ms: AtomicU64::new(0),
            commit_delay_ms: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            snapshots_fail: AtomicBool::new(false),
        }
    }

    fn delay<'a, T: Send + 'a>(
        &'a self,
        ms: u64,
        then: impl FnOnce() -> Result<T, RegistryError> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        let pause = Duration::from_millis(ms);
        match self.wait {
            Wait::Blocking => {
                std::thread::sleep(pause);
                Box::pin(std::future::ready(then()))
            }
            Wait::Async => Box::pin(async move {
                tokio::time::sleep(pause).await;
                then()
            }),
        }
    }
}

impl GateStore for Slowed {
    fn snapshot<'a>(&'a self, need: &'a Need) -> StoreFuture<'a, Snapshot> {
        let ms = self.snapshot_delay_ms.load(Ordering::SeqCst);
        self.delay(ms, move || {
            if self.snapshots_fail.load(Ordering::SeqCst) {
                return Err(RegistryError::Backend("the test registry is down".into()));
            }
            self.inner.snapshot_now(need)
        })
    }

    fn commit<'a>(&'a self, effects: &'a Effects) -> StoreFuture<'a, Committed> {
        let ms = self.commit_delay_ms.load(Ordering::SeqCst);
        self.delay(ms, move || {
            if !effects.is_none() {
                self.commits.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.commit_now(effects)
        })
    }
}

impl SessionStore for Slowed {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.inner.session(id)
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

impl Admin for Slowed {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.inner.user(name)
    }
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.inner.lock_state(user)
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
        self.inner.device_by_fingerprint(fingerprint)
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
