//! Per-method policy end to end, over real loopback TCP and real TLS: step-up answered by the
//! client without the caller doing anything, roles, allowed and denied users, and refusals
//! that never reach the service.

mod common;

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestServer;
use portcullis::client::{Client, PortcullisChannel};
use portcullis::core::{Admin, Clock, ManualClock, MemoryRegistry, SystemClock, TotpConfig};
use portcullis::demo::{EchoClient, SayReply, SayRequest};
use portcullis::server::policy::Policy;
use portcullis::tls::devpki::{DevCa, Issued};

/// Every test runs under this bound, so that a deadlock fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// A Portcullis server on loopback whose Echo service sits behind a `PolicyLayer`, with a
/// manual clock shared by the gate and the layer. Users get their roles from a fixed map when
/// they are enrolled.
struct PolicyServer {
    server: TestServer,
    registry: Arc<MemoryRegistry>,
    roles: HashMap<String, Vec<String>>,
    clock: Arc<ManualClock>,
}

impl Deref for PolicyServer {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl PolicyServer {
    async fn start(policy: &str, roles: &[(&str, &[&str])]) -> Self {
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
        let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
        let ca = DevCa::generate("policy test CA").unwrap();
        let server = common::start_with_policy(ca, registry.clone(), policy, clock.clone()).await;
        Self {
            server,
            registry,
            roles,
            clock,
        }
    }

    /// Adds `user` with a TOTP secret and its roles, and binds a new device to it, on the
    /// server's clock.
    fn enroll(&self, user: &str) -> (Issued, TotpConfig) {
        let totp = common::totp_of(user);
        let now = self.clock.now_ms();
        self.registry.add_user(user, totp.clone(), now).unwrap();
        if let Some(roles) = self.roles.get(user) {
            self.registry.set_user_roles(user, roles).unwrap();
        }
        let (device, fp) = self.issue(&format!("{user}-laptop"));
        self.registry
            .bind_device(&format!("{user}-laptop"), user, &fp, now)
            .unwrap();
        (device, totp)
    }

    /// A client of `user` on the server's clock, whose code source computes codes from the
    /// secret and counts how often it was asked.
    fn client(&self, user: &str) -> (Client, Arc<AtomicUsize>) {
        let (device, totp) = self.enroll(user);
        let clock = self.clock.clone();
        let (codes, asked) = common::counting_codes(move || totp.generate(clock.now_ms() / 1000));
        let client = self
            .client_builder(&device, user, codes)
            .clock(self.clock.clone())
            .build()
            .unwrap();
        (client, asked)
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

/// One Say call over `channel` (the connection it holds).
async fn say_on(channel: &PortcullisChannel) -> Result<SayReply, tonic::Status> {
    EchoClient::new(channel.clone())
        .say(SayRequest {
            text: "hello".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Calls over `channel` until the call succeeds (`ok`) or is refused (`!ok`), as a caller would retry;
/// how long it took. Fails after 10 s.
async fn until_call(channel: &PortcullisChannel, ok: bool) -> Duration {
    let start = std::time::Instant::now();
    while say_on(channel).await.is_ok() != ok {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no change within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Roles travel with the connection (no registry read per call); a role granted or taken
/// away in the registry reaches a connection already open through the server's revocation
/// round (every 250 ms).
#[tokio::test]
async fn a_role_change_reaches_a_live_connection_within_a_round() {
    tokio::time::timeout(LIMIT, async {
        let server = PolicyServer::start(
            r#"
            [[rule]]
            service = "portcullis.demo.v1.Echo"
            roles = ["admin"]
            "#,
            &[("bob", &["viewer"])],
        )
        .await;
        let (bob, asked) = server.client("bob");
        // One channel, one connection: every call below goes over it.
        let channel = bob.connect(&server.addr_str()).await.unwrap();
        assert_denied(
            &say_on(&channel).await.unwrap_err(),
            "user bob has none of them",
        );
        let set = |roles: &[&str]| {
            let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
            server.registry.set_user_roles("bob", &roles).unwrap();
        };
        set(&["admin", "viewer"]);
        let granted = until_call(&channel, true).await;
        set(&["viewer"]);
        let taken = until_call(&channel, false).await;
        assert_denied(
            &say_on(&channel).await.unwrap_err(),
            "user bob has none of them",
        );
        // One code: no other connection was opened.
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        eprintln!("role granted after {granted:?}, taken away after {taken:?}");
        assert!(server.calls.load(Ordering::SeqCst) >= 1);
    })
    .await
    .unwrap();
}

/// Roles are not trusted past `ROLES_MAX_AGE` without a round that could read the registry: a
/// call that needs them is refused UNAVAILABLE (fail closed), and is decided again once the
/// registry answers.
#[tokio::test]
async fn roles_the_registry_cannot_confirm_are_not_used() {
    tokio::time::timeout(LIMIT, async {
        let store = Arc::new(common::store::Slowed::new(common::store::Wait::Async));
        let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
        let ca = DevCa::generate("policy test CA").unwrap();
        let server = common::start_with_policy(
            ca,
            store.clone(),
            r#"
            [[rule]]
            service = "portcullis.demo.v1.Echo"
            roles = ["admin"]
            "#,
            clock.clone(),
        )
        .await;
        let now = clock.now_ms();
        let totp = common::totp_of("carol");
        store.add_user("carol", totp.clone(), now).unwrap();
        store
            .set_user_roles("carol", &["admin".to_owned()])
            .unwrap();
        let (device, fp) = server.issue("carol-laptop");
        store
            .bind_device("carol-laptop", "carol", &fp, now)
            .unwrap();
        let source = portcullis::client::CodeSource::callback(move || {
            Ok(totp.generate(SystemClock.now_ms() / 1000))
        });
        let carol = server
            .client_builder(&device, "carol", source)
            .clock(clock.clone())
            .build()
            .unwrap();
        let channel = carol.connect(&server.addr_str()).await.unwrap();
        assert_eq!(say_on(&channel).await.unwrap().user, "carol");

        store.snapshots_fail.store(true, Ordering::SeqCst);
        let refused = until_call(&channel, false).await;
        assert!(
            refused >= portcullis::server::policy::ROLES_MAX_AGE - Duration::from_millis(500),
            "refused after {refused:?}"
        );
        let status = say_on(&channel).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(
            status.metadata().get("portcullis-reject").unwrap(),
            "policy_unavailable"
        );
        store.snapshots_fail.store(false, Ordering::SeqCst);
        until_call(&channel, true).await;
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

#[tokio::test]
async fn a_method_policy_given_to_the_builder_guards_every_service_of_server() {
    let policy = Policy::from_toml_str(
        r#"
            [[rule]]
            service = "*"
            deny_users = ["mallory"]
        "#,
    )
    .unwrap();
    let (server, _) = common::start_configured(move |b| b.method_policy(policy)).await;
    let alice = server.enroll("alice", "laptop");
    let mallory = server.enroll("mallory", "desk");
    let reply = tokio::time::timeout(LIMIT, server.say(&server.secret_client(&alice)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.user, "alice");
    let refused = tokio::time::timeout(LIMIT, server.say(&server.secret_client(&mallory)))
        .await
        .unwrap()
        .unwrap_err();
    assert_denied(&refused, "mallory");
    // Refused before the service.
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}
