//! The deadline covers the decision up to its commit (PROTOCOL.md section 5, step 1): a
//! decision that outlives the deadline commits nothing, so a client told TIMEOUT keeps its
//! code usable and its failure count unchanged; a commit that has started finishes and its
//! result stands. Over real loopback TCP and real TLS, with a store whose reads or writes are
//! slowed down on purpose.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Options, TestServer};
use portcullis::client::CodeSource;
use portcullis::core::Clock;
use portcullis::core::store::StoreFuture;
use portcullis::core::{
    Admin, Committed, DeviceFingerprint, DeviceRecord, Effects, GateStore, LockState,
    MemoryRegistry, Need, RegistryError, SessionId, SessionRecord, SessionStore, Snapshot,
    SystemClock, TotpConfig, UserRecord,
};

/// Every test runs under this bound, so that a hang fails instead.
const LIMIT: Duration = Duration::from_secs(60);

/// The server's deadline in these tests.
const DEADLINE: Duration = Duration::from_millis(400);

/// How a slowed-down call waits: blocking its thread (a synchronous store on the blocking
/// pool) or awaiting a timer (an asynchronous store).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Blocking,
    Async,
}

/// A [`MemoryRegistry`] whose snapshots and commits can be made slow; it counts the commits
/// that wrote something.
struct Slowed {
    inner: MemoryRegistry,
    wait: Wait,
    /// Milliseconds each snapshot waits before it reads.
    snapshot_delay_ms: AtomicU64,
    /// Milliseconds each commit waits before it writes.
    commit_delay_ms: AtomicU64,
    /// Commits that had effects to write.
    commits: AtomicU64,
}

impl Slowed {
    fn new(wait: Wait) -> Self {
        Self {
            inner: MemoryRegistry::new(),
            wait,
            snapshot_delay_ms: AtomicU64::new(0),
            commit_delay_ms: AtomicU64::new(0),
            commits: AtomicU64::new(0),
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
        self.delay(ms, move || self.inner.snapshot_now(need))
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

/// A server with the [`DEADLINE`] on a [`Slowed`] store; blocking stores go to the blocking
/// pool (`blocking_registry(true)`), as a server with a slow synchronous store would be set up.
async fn start(wait: Wait) -> (TestServer, Arc<Slowed>) {
    let store = Arc::new(Slowed::new(wait));
    let options = Options {
        deadline: DEADLINE,
        ..Options::default()
    };
    let ca = portcullis::tls::devpki::DevCa::generate("deadline CA").unwrap();
    let configure = move |builder: portcullis::server::Builder| {
        builder
            .deadline(options.deadline)
            .blocking_registry(wait == Wait::Blocking)
    };
    let (server, _) = common::start_custom(ca, store.clone(), configure).await;
    (server, store)
}

/// A decision whose read outlives the deadline: the client is told TIMEOUT, and once the slow
/// read has finished in the background nothing was written: no step taken, no failure charged,
/// and the same code is accepted on the next connection.
async fn a_decision_past_its_deadline_commits_nothing(wait: Wait) {
    let (server, store) = start(wait).await;
    let alice = server.enroll("alice", "laptop");
    // Far enough from the end of its step that the code is still good for the second try.
    let code = loop {
        let now_s = SystemClock.now_ms() / 1000;
        if now_s % 30 < 20 {
            break alice.totp.generate(now_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    store.snapshot_delay_ms.store(1_200, Ordering::SeqCst);
    let client = server.client(&alice, CodeSource::fixed(code.clone()));
    let status = server.say(&client).await.unwrap_err();
    assert_eq!(
        status
            .metadata()
            .get("portcullis-reject")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("timeout".to_owned()),
        "{status:?}"
    );
    // The slow read ends in the background; nothing may follow it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(store.commits.load(Ordering::SeqCst), 0);
    assert_eq!(store.lock_state("alice").unwrap(), LockState::default());

    store.snapshot_delay_ms.store(0, Ordering::SeqCst);
    let client = server.client(&alice, CodeSource::fixed(code));
    let reply = server.say(&client).await.unwrap();
    assert_eq!(reply.user, "alice");
    assert_eq!(reply.auth_method, "totp");
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_store_past_the_deadline_commits_nothing_and_the_code_stays_usable() {
    tokio::time::timeout(
        LIMIT,
        a_decision_past_its_deadline_commits_nothing(Wait::Blocking),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_store_past_the_deadline_commits_nothing_and_the_code_stays_usable() {
    tokio::time::timeout(
        LIMIT,
        a_decision_past_its_deadline_commits_nothing(Wait::Async),
    )
    .await
    .unwrap();
}

/// A commit that started before the deadline is not cut off: it finishes, and the client gets
/// the decision it made (here an accept), not a TIMEOUT over a code that was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_started_in_time_finishes_and_its_decision_stands() {
    tokio::time::timeout(LIMIT, async {
        for wait in [Wait::Blocking, Wait::Async] {
            let (server, store) = start(wait).await;
            let alice = server.enroll("alice", "laptop");
            store.commit_delay_ms.store(800, Ordering::SeqCst);
            let client = server.secret_client(&alice);
            let reply = server.say(&client).await.unwrap();
            assert_eq!(reply.auth_method, "totp");
            assert_eq!(store.commits.load(Ordering::SeqCst), 1);
            server.stop().await;
        }
    })
    .await
    .unwrap();
}
