//! Standard gRPC clients (PROTOCOL.md section 7) over real sockets: a tonic client that speaks
//! plain gRPC over mTLS with ALPN `h2` and no Prefix, against a server with
//! `Builder::standard_clients(true)`. It is refused with a gRPC status naming cause and fix
//! until its device holds a live session (earned here by a Portcullis client with a code), then
//! reaches the service as that session; revoking the device or the session closes it.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::CountingEcho;
use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{
    Admin, AuthMethod, Clock, DeviceFingerprint, MemoryRegistry, RejectCode, SessionStore,
    SystemClock, TotpAlgorithm, TotpConfig,
};
use portcullis::demo::{EchoClient, EchoServer, SayReply, SayRequest};
use portcullis::server::limits::RateLimit;
use portcullis::server::{AuditOutcome, AuditRecord, PortcullisServer};
use portcullis::tls::devpki::{DevCa, Issued};
use portcullis::tls::rustls;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

/// Generous bound for a live connection to be closed (the server checks every 250 ms).
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    registry: Arc<MemoryRegistry>,
    ca: DevCa,
    records: Arc<Mutex<Vec<AuditRecord>>>,
    echo: CountingEcho,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

struct Device {
    issued: Issued,
    fingerprint: DeviceFingerprint,
}

impl Server {
    async fn start(standard_clients: bool, rate_limit: Option<RateLimit>) -> Self {
        let ca = DevCa::generate("standard clients CA").unwrap();
        let server_cert = ca.issue_server(&["localhost".to_string()]).unwrap();
        let registry = Arc::new(MemoryRegistry::new());
        let records: Arc<Mutex<Vec<AuditRecord>>> = Arc::default();
        let keep = records.clone();
        let portcullis = PortcullisServer::builder()
            .identity(
                vec![server_cert.cert_der()],
                server_cert.key_der(),
                &[ca.cert_der()],
            )
            .unwrap()
            .registry(registry.clone())
            .rate_limit(rate_limit)
            .standard_clients(standard_clients)
            .audit_sink(Arc::new(move |r: &AuditRecord| {
                keep.lock().unwrap().push(r.clone())
            }))
            .build()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = CountingEcho::default();
        let service = EchoServer::new(echo.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let incoming = portcullis.incoming(listener);
        tokio::spawn(async move {
            let _ = portcullis
                .server()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            addr,
            registry,
            ca,
            records,
            echo,
            shutdown: Some(tx),
        }
    }

    fn totp() -> TotpConfig {
        TotpConfig::new(
            b"standard-client-secret".to_vec(),
            6,
            TotpAlgorithm::Sha1,
            30,
        )
        .unwrap()
    }

    /// A device certificate of the server's CA, bound to `user` (added when new) unless
    /// `bind` is false.
    fn device(&self, name: &str, user: &str, bind: bool) -> Device {
        let issued = self.ca.issue_device(name).unwrap();
        let fingerprint = portcullis::tls::fingerprint(issued.cert_der().as_ref()).unwrap();
        if bind {
            if self.registry.user(user).unwrap().is_none() {
                self.registry
                    .add_user(user, Self::totp(), SystemClock.now_ms())
                    .unwrap();
            }
            self.registry
                .bind_device(name, user, &fingerprint, SystemClock.now_ms())
                .unwrap();
        }
        Device {
            issued,
            fingerprint,
        }
    }

    fn tls(&self, device: &Device, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        portcullis::tls::client_config(
            &[self.ca.cert_der()],
            vec![device.issued.cert_der()],
            device.issued.key_der(),
            alpn,
        )
        .unwrap()
    }

    /// A standard gRPC channel: mTLS with ALPN `h2`, no Prefix, one connection.
    fn standard_channel(&self, device: &Device) -> Channel {
        let tls = self.tls(device, &[b"h2"]);
        let addr = self.addr;
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        Endpoint::from_static("http://localhost").connect_with_connector_lazy(connector)
    }

    /// A Portcullis client of the device that proves a code: earns a session.
    async fn earn_session(&self, device: &Device, user: &str) {
        let client = Client::builder()
            .tls_config(self.tls(device, &[ALPN_PCS1]))
            .server_name("localhost")
            .user(user)
            .code_source(CodeSource::secret(Self::totp()))
            .build()
            .unwrap();
        let mut echo = EchoClient::new(client.connect(&self.addr.to_string()).await.unwrap());
        let reply = echo
            .say(SayRequest {
                text: "earn".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.auth_method, "totp");
    }

    /// The audit records made so far with ALPN `h2`.
    fn h2_records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.alpn == Some("h2"))
            .cloned()
            .collect()
    }
}

async fn say(echo: &mut EchoClient<Channel>) -> Result<SayReply, tonic::Status> {
    echo.say(SayRequest {
        text: "hello".into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// One call on a new standard connection of `device`.
async fn standard_say(server: &Server, device: &Device) -> Result<SayReply, tonic::Status> {
    let mut echo = EchoClient::new(server.standard_channel(device));
    say(&mut echo).await
}

fn metadata(status: &tonic::Status, key: &str) -> String {
    status
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {status:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn without_a_live_session_the_standard_client_gets_mfa_required_naming_the_fix() {
    let server = Server::start(true, None).await;
    let laptop = server.device("laptop", "alice", true);

    let status = standard_say(&server, &laptop).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "mfa_required: no live session for device laptop ({}); run portcullis login",
            laptop.fingerprint
        )
    );
    assert_eq!(metadata(&status, "portcullis-reject"), "mfa_required");
    let reference = metadata(&status, "portcullis-ref");
    assert_eq!(
        server.echo.calls.load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // One audit record, like a Prefix refusal, with the same REF.
    let records = server.h2_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r.outcome, AuditOutcome::Rejected);
    assert_eq!(r.code, Some(RejectCode::MfaRequired));
    assert_eq!(r.cause, Some("no_live_session"));
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.fingerprint, Some(laptop.fingerprint));
    assert_eq!(r.reference.unwrap().to_string(), reference);
}

#[tokio::test]
async fn a_session_earned_with_a_code_lets_the_standard_client_in_as_that_session() {
    let server = Server::start(true, None).await;
    let laptop = server.device("laptop", "alice", true);
    // The Portcullis client still negotiates portcullis/1 on a server that also offers h2.
    server.earn_session(&laptop, "alice").await;

    let reply = standard_say(&server, &laptop).await.unwrap();
    assert_eq!(reply.user, "alice");
    assert_eq!(reply.device, laptop.fingerprint.to_string());
    assert_eq!(reply.auth_method, AuthMethod::Session.as_str());
    assert!(reply.text.contains("device_name=laptop"), "{}", reply.text);
    // tonic's own connection information works for standard clients too.
    assert!(reply.text.contains("certs=1"), "{}", reply.text);

    let session = server
        .registry
        .live_session_for_device(&laptop.fingerprint, SystemClock.now_ms())
        .unwrap()
        .expect("the TOTP accept recorded a session");
    let records = server.h2_records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, AuditOutcome::Accepted);
    assert_eq!(records[0].method, Some(AuthMethod::Session));
    assert_eq!(records[0].device.as_deref(), Some("laptop"));
    assert_eq!(records[0].user.as_deref(), Some(session.user.as_str()));

    // Another device of the same user holds no session of its own.
    let phone = server.device("phone", "alice", true);
    let status = standard_say(&server, &phone).await.unwrap_err();
    assert!(
        status
            .message()
            .starts_with("mfa_required: no live session for device phone"),
        "{status:?}"
    );
}

#[tokio::test]
async fn unknown_and_revoked_devices_are_refused_with_their_cause() {
    let server = Server::start(true, None).await;
    let stranger = server.device("stranger", "nobody", false);
    let status = standard_say(&server, &stranger).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().starts_with(&format!(
            "device_unknown: device {} is bound to no user",
            stranger.fingerprint
        )),
        "{status:?}"
    );

    let laptop = server.device("laptop", "alice", true);
    server.earn_session(&laptop, "alice").await;
    server
        .registry
        .revoke_device("laptop", SystemClock.now_ms())
        .unwrap();
    let status = standard_say(&server, &laptop).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status
            .message()
            .starts_with("device_revoked: device laptop"),
        "{status:?}"
    );
    assert_eq!(metadata(&status, "portcullis-reject"), "device_revoked");

    let causes: Vec<_> = server.h2_records().iter().map(|r| r.cause).collect();
    assert_eq!(causes, [Some("device_unknown"), Some("device_revoked")]);
}

/// Calls on `echo` until one fails (the connection was closed), within [`CLOSED_WITHIN`].
async fn until_closed(echo: &mut EchoClient<Channel>) -> tonic::Status {
    let start = Instant::now();
    loop {
        match say(echo).await {
            Ok(_) if start.elapsed() < CLOSED_WITHIN => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("the standard connection still works after {CLOSED_WITHIN:?}"),
            Err(status) => return status,
        }
    }
}

#[tokio::test]
async fn revoking_the_device_or_the_session_closes_a_live_standard_connection() {
    let server = Server::start(true, None).await;
    let laptop = server.device("laptop", "alice", true);
    server.earn_session(&laptop, "alice").await;

    // The session is revoked: the open standard connection is closed, new ones are refused.
    let mut echo = EchoClient::new(server.standard_channel(&laptop));
    say(&mut echo).await.unwrap();
    let session = server
        .registry
        .live_session_for_device(&laptop.fingerprint, SystemClock.now_ms())
        .unwrap()
        .unwrap();
    let _ = server
        .registry
        .revoke_session(&session.id, SystemClock.now_ms())
        .unwrap();
    until_closed(&mut echo).await;
    let status = standard_say(&server, &laptop).await.unwrap_err();
    assert!(status.message().starts_with("mfa_required: "), "{status:?}");

    // Another device with a session (another user: a code is accepted once per time step),
    // then the device is revoked: closed again.
    let desk = server.device("desk", "bob", true);
    server.earn_session(&desk, "bob").await;
    let mut echo = EchoClient::new(server.standard_channel(&desk));
    assert_eq!(say(&mut echo).await.unwrap().user, "bob");
    server
        .registry
        .revoke_device("desk", SystemClock.now_ms())
        .unwrap();
    until_closed(&mut echo).await;
    let status = standard_say(&server, &desk).await.unwrap_err();
    assert!(
        status.message().starts_with("device_revoked: "),
        "{status:?}"
    );
}

#[tokio::test]
async fn without_standard_clients_h2_is_refused_in_the_handshake() {
    let server = Server::start(false, None).await;
    let laptop = server.device("laptop", "alice", true);
    server.earn_session(&laptop, "alice").await;
    let status = standard_say(&server, &laptop).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        server.echo.calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The server offers portcullis/1 only: rustls ends the handshake (no_application_protocol).
    let records = server.records.lock().unwrap().clone();
    assert!(
        records
            .iter()
            .any(|r| r.cause == Some("tls_handshake_failed")
                && r.detail.as_deref().is_some_and(|d| d.contains("protocol"))),
        "{records:?}"
    );
    assert!(records.iter().all(|r| r.alpn != Some("h2")), "{records:?}");
}

#[tokio::test]
async fn the_rate_limit_applies_to_standard_clients_with_a_grpc_status() {
    let server = Server::start(true, Some(RateLimit::new(1, 1))).await;
    let laptop = server.device("laptop", "alice", true);
    let mut limited = None;
    for _ in 0..6 {
        if let Err(status) = standard_say(&server, &laptop).await
            && status.code() == tonic::Code::ResourceExhausted
        {
            limited = Some(status);
            break;
        }
    }
    let status = limited.expect("one of six quick connections is rate limited");
    assert!(
        status
            .message()
            .starts_with("rate_limited: too many connection attempts from 127.0.0.1"),
        "{status:?}"
    );
    assert_eq!(metadata(&status, "portcullis-reject"), "rate_limited");
    let retry: u32 = metadata(&status, "portcullis-retry-after").parse().unwrap();
    assert!(retry >= 1);
    assert!(
        server
            .h2_records()
            .iter()
            .any(|r| r.code == Some(RejectCode::RateLimited)
                && r.outcome == AuditOutcome::Rejected),
        "{:?}",
        server.h2_records()
    );
}

#[tokio::test]
async fn a_service_account_device_gets_in_without_a_session_until_it_is_revoked() {
    let server = Server::start(true, None).await;
    server
        .registry
        .add_service_user("deploy-bot", SystemClock.now_ms())
        .unwrap();
    let bot_box = server.device("bot-box", "deploy-bot", true);

    // No session was ever earned: the device key alone lets the service account in.
    assert!(
        server
            .registry
            .live_session_for_device(&bot_box.fingerprint, SystemClock.now_ms())
            .unwrap()
            .is_none()
    );
    let reply = standard_say(&server, &bot_box).await.unwrap();
    assert_eq!(reply.user, "deploy-bot");
    assert_eq!(reply.device, bot_box.fingerprint.to_string());
    assert_eq!(reply.auth_method, "device");
    assert_eq!(reply.auth_method, AuthMethod::Device.as_str());
    assert!(reply.text.contains("device_name=bot-box"), "{}", reply.text);
    assert_eq!(
        server.echo.calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let records = server.h2_records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, AuditOutcome::Accepted);
    assert_eq!(records[0].method, Some(AuthMethod::Device));
    assert_eq!(records[0].user.as_deref(), Some("deploy-bot"));

    // Once the device is revoked, it is refused like any other revoked device.
    server
        .registry
        .revoke_device("bot-box", SystemClock.now_ms())
        .unwrap();
    let status = standard_say(&server, &bot_box).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("device_revoked: device bot-box"),
        "{status:?}"
    );
    assert_eq!(metadata(&status, "portcullis-reject"), "device_revoked");
    assert_eq!(
        server.echo.calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let causes: Vec<_> = server.h2_records().iter().map(|r| r.cause).collect();
    assert_eq!(causes, [None, Some("device_revoked")]);
}
