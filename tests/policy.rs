//! Per-method policy end to end, over real loopback TCP and real TLS: step-up answered by the
//! client without the caller doing anything, roles, allowed and denied users, and refusals
//! that never reach the service.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::CountingEcho;
use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{
    Clock, DeviceFingerprint, DeviceRecord, LockState, ManualClock, MemoryRegistry, Registry,
    RegistryError, SessionId, SessionRecord, SystemClock, TotpAlgorithm, TotpConfig, UserRecord,
};
use portcullis::demo::{EchoClient, EchoServer, SayReply, SayRequest};
use portcullis::server::PortcullisServer;
use portcullis::server::policy::{Policy, PolicyLayer};
use portcullis::tls::devpki::{DevCa, Issued};

/// Every test runs under this bound, so that a deadlock fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// The server's memory registry, seen by the policy layer with roles from a fixed map.
struct WithRoles {
    inner: Arc<MemoryRegistry>,
    roles: HashMap<String, Vec<String>>,
}

impl Registry for WithRoles {
    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.inner.device_by_fingerprint(fingerprint)
    }
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.inner.device_by_name(name)
    }
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.inner.user(name)
    }
    fn advance_totp_step(&self, user: &str, step: u64) -> Result<bool, RegistryError> {
        self.inner.advance_totp_step(user, step)
    }
    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.inner.lock_state(user)
    }
    fn update_lock_state(
        &self,
        user: &str,
        update: &mut dyn FnMut(LockState) -> LockState,
    ) -> Result<LockState, RegistryError> {
        self.inner.update_lock_state(user, update)
    }
    fn is_session_revoked(&self, id: &SessionId) -> Result<bool, RegistryError> {
        self.inner.is_session_revoked(id)
    }
    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.inner.revoke_session(id, now_ms)
    }
    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self.roles.get(user).cloned().unwrap_or_default())
    }
    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        self.inner.add_user(name, totp, now_ms)
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
    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        self.inner.list_users()
    }
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.inner.list_devices()
    }
}

/// A Portcullis server on loopback whose Echo service sits behind a [`PolicyLayer`].
struct PolicyServer {
    addr: SocketAddr,
    ca: DevCa,
    registry: Arc<MemoryRegistry>,
    /// Calls that reached the Echo service.
    calls: Arc<AtomicUsize>,
    clock: Arc<ManualClock>,
    _task: tokio::task::JoinHandle<()>,
}

impl PolicyServer {
    async fn start(policy: &str, roles: &[(&str, &[&str])]) -> Self {
        let policy = Policy::from_toml_str(policy).unwrap();
        let roles = roles
            .iter()
            .map(|(user, roles)| {
                (
                    (*user).to_owned(),
                    roles.iter().map(|r| (*r).to_owned()).collect(),
                )
            })
            .collect();
        let registry = Arc::new(MemoryRegistry::new());
        let with_roles: Arc<dyn Registry> = Arc::new(WithRoles {
            inner: registry.clone(),
            roles,
        });
        let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
        let ca = DevCa::generate("policy test CA").unwrap();
        let server_cert = ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        let portcullis = PortcullisServer::builder()
            .identity(
                vec![server_cert.cert_der()],
                server_cert.key_der(),
                &[ca.cert_der()],
            )
            .unwrap()
            .registry(registry.clone())
            .clock(clock.clone())
            .build()
            .unwrap();
        let layer = PolicyLayer::new(policy, with_roles, clock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = CountingEcho::default();
        let calls = echo.calls.clone();
        let incoming = portcullis.incoming(listener);
        let task = tokio::spawn(async move {
            portcullis
                .server()
                .layer(layer)
                .add_service(EchoServer::new(echo))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Self {
            addr,
            ca,
            registry,
            calls,
            clock,
            _task: task,
        }
    }

    /// Adds `user` with a TOTP secret and binds a new device to it.
    fn enroll(&self, user: &str) -> (Issued, TotpConfig) {
        let totp = TotpConfig::new(
            format!("secret-of-{user:0>12}").into_bytes(),
            6,
            TotpAlgorithm::Sha1,
            30,
        )
        .unwrap();
        let now = self.clock.now_ms();
        self.registry.add_user(user, totp.clone(), now).unwrap();
        let device = self.ca.issue_device(&format!("{user}-laptop")).unwrap();
        let fp = portcullis::tls::fingerprint(device.cert_der().as_ref()).unwrap();
        self.registry
            .bind_device(&format!("{user}-laptop"), user, &fp, now)
            .unwrap();
        (device, totp)
    }

    /// A client of `user` on the server's clock, whose code source computes codes from the
    /// secret and counts how often it was asked.
    fn client(&self, user: &str) -> (Client, Arc<AtomicUsize>) {
        let (device, totp) = self.enroll(user);
        let asked = Arc::new(AtomicUsize::new(0));
        let clock = self.clock.clone();
        let counter = asked.clone();
        let codes = CodeSource::callback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(totp.generate(clock.now_ms() / 1000))
        });
        let tls = portcullis::tls::client_config(
            &[self.ca.cert_der()],
            vec![device.cert_der()],
            device.key_der(),
            &[ALPN_PCS1],
        )
        .unwrap();
        let client = Client::builder()
            .tls_config(tls)
            .server_name("localhost")
            .user(user)
            .code_source(codes)
            .clock(self.clock.clone())
            .build()
            .unwrap();
        (client, asked)
    }

    async fn say(&self, client: &Client) -> Result<SayReply, tonic::Status> {
        let channel = client.connect_lazy(&self.addr.to_string()).unwrap();
        EchoClient::new(channel)
            .say(SayRequest {
                text: "hello".into(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

#[track_caller]
fn assert_denied(status: &tonic::Status, needle: &str) {
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().starts_with("policy_denied: ") && status.message().contains(needle),
        "{status:?}"
    );
    assert_eq!(
        status.metadata().get("portcullis-reject").unwrap(),
        "policy_denied"
    );
}

#[tokio::test]
async fn a_stale_session_steps_up_through_the_client_without_the_caller_doing_anything() {
    tokio::time::timeout(LIMIT, async {
        let server = PolicyServer::start(
            r#"
            [[rule]]
            method = "/portcullis.demo.v1.Echo/Say"
            fresh_totp_secs = 300
            "#,
            &[],
        )
        .await;
        let (alice, asked) = server.client("alice");
        let first = server.say(&alice).await.unwrap();
        assert_eq!(first.auth_method, "totp");
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(alice.session().is_some());

        // Within the window, a new connection rides the session ticket.
        server.clock.advance_ms(200_000);
        let second = server.say(&alice).await.unwrap();
        assert_eq!(second.auth_method, "session");
        assert_eq!(asked.load(Ordering::SeqCst), 1);

        // Past it, the session is still valid for the gate but too old for Say: the client
        // gets step_up_required, asks for a new code, reconnects and sends the call again.
        server.clock.advance_ms(200_000);
        let third = server.say(&alice).await.unwrap();
        assert_eq!(third.user, "alice");
        assert_eq!(
            third.auth_method, "totp",
            "the call was answered on a TOTP connection"
        );
        assert!(third.text.starts_with("hello|"), "{}", third.text);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "the code source was asked once more"
        );
        assert_eq!(
            server.calls.load(Ordering::SeqCst),
            3,
            "the refused attempt never reached the service"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_user_without_the_role_is_refused_before_the_service() {
    tokio::time::timeout(LIMIT, async {
        let server = PolicyServer::start(
            r#"
            [[rule]]
            service = "portcullis.demo.v1.Echo"
            roles = ["admin", "operator"]
            "#,
            &[("alice", &["operator"]), ("bob", &["viewer"])],
        )
        .await;
        let (alice, _) = server.client("alice");
        assert_eq!(server.say(&alice).await.unwrap().user, "alice");
        let (bob, _) = server.client("bob");
        let status = server.say(&bob).await.unwrap_err();
        assert_denied(&status, "user bob has none of them");
        let (carol, _) = server.client("carol");
        assert_denied(&server.say(&carol).await.unwrap_err(), "carol");
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn allowed_and_denied_users() {
    tokio::time::timeout(LIMIT, async {
        let server = PolicyServer::start(
            r#"
            [[rule]]
            service = "*"
            deny_users = ["mallory"]

            [[rule]]
            method = "portcullis.demo.v1.Echo/Say"
            allow_users = ["alice", "bob"]
            deny_users = ["bob"]
            "#,
            &[],
        )
        .await;
        let (alice, _) = server.client("alice");
        assert_eq!(server.say(&alice).await.unwrap().user, "alice");
        let (bob, _) = server.client("bob");
        assert_denied(
            &server.say(&bob).await.unwrap_err(),
            "user bob may not call",
        );
        let (carol, _) = server.client("carol");
        assert_denied(
            &server.say(&carol).await.unwrap_err(),
            "not among the users allowed",
        );
        // The method rule replaces the `*` rule: mallory is not on its allow list.
        let (mallory, asked) = server.client("mallory");
        assert_denied(&server.say(&mallory).await.unwrap_err(), "mallory");
        assert_eq!(asked.load(Ordering::SeqCst), 1, "a denial is not a step-up");
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[test]
fn a_policy_file_with_an_unknown_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[[rule]]\nmethod = \"/portcullis.demo.v1.Echo/Say\"\nfresh_totp_seconds = 300\n",
    )
    .unwrap();
    let err = Policy::from_toml_file(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}, line 3: unknown field `fresh_totp_seconds`",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("fresh_totp_secs"),
        "names the keys it knows: {err}"
    );
    assert!(!err.contains('\n'), "{err}");
}
