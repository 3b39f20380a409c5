//! Service accounts end to end, over real loopback TCP and real TLS: a service account's device
//! gets in without a one-time code, and the account may call only the methods a policy rule
//! grants it by name or role.

mod common;

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use portcullis::client::{Client, CodeSource};
use portcullis::core::{
    Admin, AuthMethod, Clock, MemoryRegistry, SystemClock, TotpAlgorithm, TotpConfig,
};
use portcullis::demo::{EchoClient, SayRequest};
use portcullis::server::{AuditOutcome, AuditRecord};
use portcullis::tls::devpki::{DevCa, Issued};

/// Every test runs under this bound, so that a deadlock fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// A test server whose Echo service sits behind a `PolicyLayer` reading roles from the
/// server's own memory registry.
struct Server {
    server: TestServer,
    registry: Arc<MemoryRegistry>,
}

impl Deref for Server {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl Server {
    async fn start(policy: &str) -> Self {
        let registry = Arc::new(MemoryRegistry::new());
        let ca = DevCa::generate("service account test CA").unwrap();
        let clock = Arc::new(SystemClock);
        let server = common::start_with_policy(ca, registry.clone(), policy, clock).await;
        Self { server, registry }
    }

    fn device(&self, user: &str) -> Issued {
        let name = format!("{user}-box");
        let (device, fp) = self.issue(&name);
        self.registry.bind_device(&name, user, &fp, 0).unwrap();
        device
    }

    /// A client of `user` whose code source counts how often it is asked and answers `code`.
    fn client(&self, user: &str, device: &Issued, code: String) -> (Client, Arc<AtomicUsize>) {
        let (codes, asked) = common::counting_codes(move || code.clone());
        (self.client_as(device, user, codes), asked)
    }
}

fn roles(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| (*r).to_owned()).collect()
}

#[tokio::test]
async fn a_service_account_is_refused_outside_its_list() {
    tokio::time::timeout(LIMIT, async {
        // No rule covers Say: any authenticated person may call it, a service account may not.
        let server = Server::start(
            r#"
            [[rule]]
            service = "portcullis.backup.v1.Backup"
            allow_users = ["backup-bot"]
            "#,
        )
        .await;
        server.registry.add_service_user("backup-bot", 0).unwrap();
        let device = server.device("backup-bot");
        let (bot, _) = server.client("backup-bot", &device, "000000".into());
        let status = server.say(&bot).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(
            status.message(),
            "policy_denied: service account backup-bot may only call the methods its policy lists"
        );
        assert_eq!(
            status.metadata().get("portcullis-reject").unwrap(),
            "policy_denied"
        );
        assert_eq!(
            server.calls.load(Ordering::SeqCst),
            0,
            "the refusal reached Echo"
        );

        // A person with a code reaches Say on the same server.
        let totp =
            TotpConfig::new(b"secret-of-alice-000".to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap();
        server.registry.add_user("alice", totp.clone(), 0).unwrap();
        let alice_device = server.device("alice");
        let code = common::current_code(&totp);
        let (alice, _) = server.client("alice", &alice_device, code);
        let reply = server.say(&alice).await.unwrap();
        assert_eq!(reply.user, "alice");
        assert_eq!(reply.auth_method, "totp");
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_service_account_named_or_holding_a_listed_role_gets_in_without_a_code() {
    tokio::time::timeout(LIMIT, async {
        let server = Server::start(
            r#"
            [[rule]]
            method = "/portcullis.demo.v1.Echo/Say"
            roles = ["deploy"]
            "#,
        )
        .await;
        server.registry.add_service_user("deploy-bot", 0).unwrap();
        server
            .registry
            .set_user_roles("deploy-bot", &roles(&["deploy"]))
            .unwrap();
        let device = server.device("deploy-bot");
        // Any well-formed frame will do: the factor of a service account is its device key.
        let (bot, asked) = server.client("deploy-bot", &device, "000000".into());
        let reply = server.say(&bot).await.unwrap();
        assert_eq!(reply.user, "deploy-bot");
        assert_eq!(reply.auth_method, "device");
        assert!(asked.load(Ordering::SeqCst) <= 1);
        assert!(
            bot.session().is_none(),
            "a service account earns no session"
        );
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);

        // Without the role, the same account is refused.
        server.registry.set_user_roles("deploy-bot", &[]).unwrap();
        let status = server.say(&bot).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().starts_with("policy_denied: "),
            "{status:?}"
        );
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);

        // A revoked device of a service account is refused at the gate.
        server.registry.revoke_device("deploy-bot-box", 1).unwrap();
        let status = server.say(&bot).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_accept_of_a_service_account_is_audited_once_with_method_device() {
    tokio::time::timeout(LIMIT, async {
        let records: Arc<Mutex<Vec<AuditRecord>>> = Arc::default();
        let keep = records.clone();
        let registry = Arc::new(MemoryRegistry::new());
        let ca = DevCa::generate("service account audit CA").unwrap();
        let (server, _handle) = common::start_custom(ca, registry.clone(), |builder| {
            builder.audit_sink(Arc::new(move |r: &AuditRecord| {
                keep.lock().unwrap().push(r.clone())
            }))
        })
        .await;
        registry
            .add_service_user("backup-bot", SystemClock.now_ms())
            .unwrap();
        let (device, fingerprint) = server.issue("backup-box");
        registry
            .bind_device(
                "backup-box",
                "backup-bot",
                &fingerprint,
                SystemClock.now_ms(),
            )
            .unwrap();
        // Any well-formed frame will do: the factor of a service account is its device key.
        let bot = server.client_as(
            &device,
            "backup-bot",
            CodeSource::callback(|| Ok("000000".to_owned())),
        );
        let channel = bot.connect(&server.addr_str()).await.unwrap();
        let reply = EchoClient::new(channel)
            .say(SayRequest {
                text: "hello".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.user, "backup-bot");
        assert_eq!(reply.auth_method, "device");

        // The call was served, so the accept was decided; wait for its record to reach the sink.
        while records.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = records.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        let r = &seen[0];
        assert_eq!(r.outcome, AuditOutcome::Accepted);
        assert_eq!(r.method, Some(AuthMethod::Device));
        assert_eq!(r.user.as_deref(), Some("backup-bot"));
        assert_eq!(r.device.as_deref(), Some("backup-box"));
        assert_eq!(r.fingerprint, Some(fingerprint));
        assert_eq!(r.code, None);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["method"], "device", "{json}");
        assert!(
            r.to_json().contains(r#""method":"device""#),
            "{}",
            r.to_json()
        );
        assert_eq!(server.calls.load(Ordering::SeqCst), 1);
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn fresh_totp_secs_does_not_hold_back_a_listed_service_account_however_old_its_connection() {
    tokio::time::timeout(LIMIT, async {
        let registry = Arc::new(MemoryRegistry::new());
        let ca = DevCa::generate("service account test CA").unwrap();
        let clock = Arc::new(portcullis::core::ManualClock::new(SystemClock.now_ms()));
        let server = common::start_with_policy(
            ca,
            registry.clone(),
            r#"
            [[rule]]
            method = "/portcullis.demo.v1.Echo/Say"
            allow_users = ["deploy-bot"]
            fresh_totp_secs = 60
            "#,
            clock.clone(),
        )
        .await;
        let server = Server { server, registry };
        server.registry.add_service_user("deploy-bot", 0).unwrap();
        let device = server.device("deploy-bot");
        let (bot, _) = server.client("deploy-bot", &device, "000000".into());
        let channel = bot.connect_lazy(&server.addr_str()).unwrap();
        let mut echo = EchoClient::new(channel);
        let say = SayRequest {
            text: "hello".into(),
        };
        echo.say(say.clone()).await.unwrap();
        // Ten minutes later, on the same connection: still let in (no code could be given).
        clock.advance_ms(600_000);
        let reply = echo.say(say).await.unwrap().into_inner();
        assert_eq!(reply.auth_method, "device");
        assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}
