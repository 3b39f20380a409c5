//! The gate end to end, over real loopback TCP and real TLS: acceptance, every reject code a
//! connection can earn, session reconnects, refused standard clients, and pipelined HTTP/2
//! that never reaches a service.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::{ALPN_PCS1, Factor};
use portcullis::core::{Clock, OffsetClock, RejectCode, SystemClock};
use portcullis::demo::{EchoClient, SayReply, SayRequest};
use tokio::io::AsyncWriteExt;

async fn say(client: &Client, server: &TestServer, text: &str) -> Result<SayReply, tonic::Status> {
    let channel = client.connect_lazy(&server.addr_str()).unwrap();
    EchoClient::new(channel)
        .say(SayRequest { text: text.into() })
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
fn assert_reject(status: &tonic::Status, reject: RejectCode, code: tonic::Code) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("{}: ", reject.name())),
        "message {:?} should start with {}",
        status.message(),
        reject.name()
    );
    assert_eq!(
        status
            .metadata()
            .get("portcullis-reject")
            .unwrap()
            .to_str()
            .unwrap(),
        reject.name()
    );
    let reference = status
        .metadata()
        .get("portcullis-ref")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(reference.len(), 32, "REF is 16 bytes in hex");
    assert!(reference.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn totp_accept_then_session_reconnect_without_a_new_code() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let asked = Arc::new(AtomicUsize::new(0));
    let source = {
        let asked = asked.clone();
        let totp = alice.totp.clone();
        CodeSource::callback(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            Ok(current_code(&totp))
        })
    };
    let client = server.client(&alice, source);

    let reply = say(&client, &server, "hi").await.unwrap();
    assert_eq!(reply.user, "alice");
    assert_eq!(reply.device, alice.fingerprint.to_string());
    assert_eq!(reply.auth_method, "totp");
    // tonic's own accessors still work behind the gate.
    assert!(
        reply.text.starts_with("hi|peer=127.0.0.1:"),
        "{}",
        reply.text
    );
    assert!(reply.text.contains("|certs=1|"), "{}", reply.text);
    assert!(
        reply.text.ends_with("|device_name=laptop"),
        "{}",
        reply.text
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let session = client.session().expect("a session ticket was kept");
    assert!(session.expires_ms > SystemClock.now_ms() + 3_500_000);

    // A new connection uses the ticket: no code is asked for.
    let reply = say(&client, &server, "again").await.unwrap();
    assert_eq!(reply.auth_method, "session");
    assert_eq!(reply.user, "alice");
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[tokio::test]
async fn refusals_surface_as_grpc_statuses_and_reach_no_service() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "phone");

    // DEVICE_UNKNOWN: a certificate from the right CA that was never bound.
    let (stray, _) = server.issue("stray");
    let client = server.client_as(&stray, "alice", CodeSource::secret(alice.totp.clone()));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(
        &status,
        RejectCode::DeviceUnknown,
        tonic::Code::Unauthenticated,
    );

    // USER_MISMATCH: bob's phone claims to be alice.
    let client = server.client_as(&bob.device, "alice", CodeSource::secret(alice.totp.clone()));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(
        &status,
        RejectCode::UserMismatch,
        tonic::Code::Unauthenticated,
    );

    // MFA_FAILED: a wrong code.
    let client = server.client(&alice, CodeSource::fixed(wrong_code(&alice.totp)));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(&status, RejectCode::MfaFailed, tonic::Code::Unauthenticated);
    // The server's REASON, then the client's fix.
    assert!(
        status
            .message()
            .starts_with("mfa_failed: the one-time code was not accepted; "),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("enter the current code")
            && status.message().contains("wait for the next one"),
        "{}",
        status.message()
    );

    // MFA_FAILED: a code that was already used.
    let code = current_code(&bob.totp);
    let first = server.client(&bob, CodeSource::fixed(code.clone()));
    say(&first, &server, "x").await.unwrap();
    let second = server.client(&bob, CodeSource::fixed(code));
    let status = say(&second, &server, "x").await.unwrap_err();
    assert_reject(&status, RejectCode::MfaFailed, tonic::Code::Unauthenticated);
    assert!(
        status
            .message()
            .contains("this code was already used; wait for the next one"),
        "{}",
        status.message()
    );

    // CLOCK_SKEW: the client's clock is 94 s ahead; the reason says by how much.
    let skewed = server.client_with_clock(
        &alice,
        CodeSource::secret(alice.totp.clone()),
        Arc::new(OffsetClock::new(SystemClock, 94_000)),
    );
    let status = say(&skewed, &server, "x").await.unwrap_err();
    assert_reject(&status, RejectCode::ClockSkew, tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("94 s ahead"),
        "{}",
        status.message()
    );

    // DEVICE_REVOKED.
    server
        .registry
        .revoke_device("phone", SystemClock.now_ms())
        .unwrap();
    let client = server.client(&bob, CodeSource::secret(bob.totp.clone()));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(
        &status,
        RejectCode::DeviceRevoked,
        tonic::Code::Unauthenticated,
    );

    // Only the one accepted call reached the service.
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test]
async fn five_failed_codes_lock_the_user_out() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    for _ in 0..5 {
        let client = server.client(&alice, CodeSource::fixed(wrong_code(&alice.totp)));
        let status = say(&client, &server, "x").await.unwrap_err();
        assert_reject(&status, RejectCode::MfaFailed, tonic::Code::Unauthenticated);
    }
    // Even the right code is refused now, with the wait.
    let client = server.client(&alice, CodeSource::secret(alice.totp.clone()));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(&status, RejectCode::LockedOut, tonic::Code::Unauthenticated);
    let retry: u32 = status
        .metadata()
        .get("portcullis-retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry), "retry after {retry}");
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn wire_level_rejections() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");

    // MALFORMED: a Prefix whose TOTP field is not digits.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut frame = prefix(&tls, "alice", Factor::Totp("123456".into()))
        .encode()
        .unwrap();
    let at = frame.windows(6).position(|w| w == b"123456").unwrap();
    frame[at] = b'x';
    let verdict = send_raw(&mut tls, &frame).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed));
    assert!(verdict.reason.unwrap().starts_with("malformed: "));
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);

    // UNSUPPORTED: another protocol version.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let verdict = send_raw(&mut tls, b"PCS2\x01\x00\x00").await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Unsupported));

    // MALFORMED from the header alone: a length over 4096, with no body sent.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let verdict = send_raw(&mut tls, b"PCS1\x01\xff\xff").await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed));

    // BINDING_MISMATCH: a binding that is not this connection's exporter.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut p = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
    p.binding[0] ^= 1;
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::BindingMismatch));

    // MFA_REQUIRED: a session ticket the server did not seal.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Session(vec![7; 64]));
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::MfaRequired));

    // REPLAY: a nonce seen on an earlier connection.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let first = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
    let verdict = send_raw(&mut tls, &first.encode().unwrap()).await;
    assert!(verdict.is_accepted(), "{verdict:?}");
    drop(tls);
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut again = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
    again.nonce = first.nonce;
    let verdict = send_raw(&mut tls, &again.encode().unwrap()).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Replay));
    let reason = verdict.reason.unwrap();
    assert!(reason.starts_with("replay: "), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn a_silent_client_gets_timeout_at_the_deadline() {
    let options = Options {
        deadline: Duration::from_millis(300),
        ..Options::default()
    };
    let server =
        TestServer::start_with(options, Arc::new(portcullis::core::MemoryRegistry::new())).await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    // Half a Prefix, then nothing.
    tls.write_all(b"PCS1\x01\x00\x52\x01").await.unwrap();
    tls.flush().await.unwrap();
    let verdict = read_verdict(&mut tls).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Timeout));
    server.stop().await;
}

#[tokio::test]
async fn standard_grpc_clients_and_clients_without_certificates_are_refused() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");

    // ALPN h2 (a standard gRPC client) and no ALPN at all: closed right after the handshake,
    // without a byte of application data.
    // (rustls refuses a client that offers only ids the server does not have during the
    // handshake; a client that offers none completes it and is closed by the gate.)
    for alpn in [&[b"h2".as_slice()][..], &[][..]] {
        match server.try_raw_tls(&alice.device, alpn).await {
            Ok(mut tls) => {
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let after = read_to_close(&mut tls).await.unwrap_or(0);
                assert_eq!(after, 0, "ALPN {alpn:?}");
            }
            Err(e) => assert!(
                e.to_string().contains("NoApplicationProtocol"),
                "ALPN {alpn:?}: {e}"
            ),
        }
    }

    // tonic's own TLS client with the device certificate cannot make a call.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            server.ca.cert_pem(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            &alice.device.cert_pem,
            &alice.device.key_pem,
        ))
        .domain_name("localhost");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let outcome = match endpoint.connect().await {
        Ok(channel) => EchoClient::new(channel)
            .say(SayRequest { text: "x".into() })
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(outcome.is_err(), "a stock tonic client got through");

    // A client without a certificate never gets a Verdict.
    let config =
        portcullis::tls::rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_protocol_versions(&[&portcullis::tls::rustls::version::TLS13])
            .unwrap()
            .with_root_certificates({
                let mut roots = portcullis::tls::rustls::RootCertStore::empty();
                roots.add(server.ca.cert_der()).unwrap();
                roots
            })
            .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![ALPN_PCS1.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = portcullis::tls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let p = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
        let _ = tls.write_all(&p.encode().unwrap()).await;
        let _ = tls.flush().await;
        assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);
    }
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn http2_pipelined_behind_a_rejected_prefix_reaches_no_service() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");

    // Through the client library: it pipelines the HTTP/2 preface and the request.
    let client = server.client(&alice, CodeSource::fixed(wrong_code(&alice.totp)));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(&status, RejectCode::MfaFailed, tonic::Code::Unauthenticated);

    // By hand: Prefix, HTTP/2 preface and SETTINGS in one write. The server answers with the
    // Verdict and closes: no HTTP/2 byte (not even its SETTINGS frame) comes back.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut bytes = prefix(&tls, "alice", Factor::Totp(wrong_code(&alice.totp)))
        .encode()
        .unwrap();
    bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS frame
    let verdict = send_raw(&mut tls, &bytes).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::MfaFailed));
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);

    assert_eq!(server.calls.load(Ordering::SeqCst), 0);

    // The same by hand with a good code: HTTP/2 starts right behind the Verdict.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut bytes = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)))
        .encode()
        .unwrap();
    bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let verdict = send_raw(&mut tls, &bytes).await;
    assert!(verdict.is_accepted(), "{verdict:?}");
    let mut frame_header = [0u8; 9];
    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut frame_header)
        .await
        .unwrap();
    assert_eq!(
        frame_header[3], 4,
        "the server's first HTTP/2 frame is SETTINGS"
    );
    drop(tls);
    server.stop().await;
}

#[tokio::test]
async fn the_same_code_on_20_connections_at_once_is_accepted_exactly_once() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let code = current_code(&alice.totp);
    let mut tasks = tokio::task::JoinSet::new();
    let addr = server.addr_str();
    for _ in 0..20 {
        let client = server.client(&alice, CodeSource::fixed(code.clone()));
        let addr = addr.clone();
        tasks.spawn(async move {
            let channel = client.connect_lazy(&addr).unwrap();
            EchoClient::new(channel)
                .say(SayRequest { text: "x".into() })
                .await
        });
    }
    let mut accepted = 0;
    let mut refused = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(_) => accepted += 1,
            Err(status) => {
                // A reused code is not charged: no loser finds alice locked out, and each is
                // told to wait for the next code.
                assert_reject(&status, RejectCode::MfaFailed, tonic::Code::Unauthenticated);
                assert!(
                    status
                        .message()
                        .contains("this code was already used; wait for the next one"),
                    "{status:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (1, 19));
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_stops_accepting() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let client = server.client(&alice, CodeSource::secret(alice.totp.clone()));
    say(&client, &server, "x").await.unwrap();
    let addr = server.addr;
    server.stop().await;
    // The listener is closed after shutdown (the accept task is aborted when tonic drops the
    // incoming stream; give the runtime a moment to run the abort).
    let mut closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the listener still accepts after shutdown");
}

#[tokio::test]
async fn a_connection_policy_refuses_with_policy_denied() {
    let options = Options {
        policy: Some(Arc::new(|id: &portcullis::core::Identity| {
            if id.user == "mallory" {
                Err(format!("user {} is suspended", id.user))
            } else {
                Ok(())
            }
        })),
        ..Options::default()
    };
    let server =
        TestServer::start_with(options, Arc::new(portcullis::core::MemoryRegistry::new())).await;
    let mallory = server.enroll("mallory", "tablet");
    let client = server.client(&mallory, CodeSource::secret(mallory.totp.clone()));
    let status = say(&client, &server, "x").await.unwrap_err();
    assert_reject(
        &status,
        RejectCode::PolicyDenied,
        tonic::Code::PermissionDenied,
    );
    assert_eq!(
        status.message(),
        "policy_denied: user mallory is suspended; ask an administrator about the policy"
    );

    let alice = server.enroll("alice", "laptop");
    let client = server.client(&alice, CodeSource::secret(alice.totp.clone()));
    assert_eq!(say(&client, &server, "x").await.unwrap().user, "alice");
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_refused_session_ticket_falls_back_to_a_code_without_the_caller_noticing() {
    let options = Options {
        session_ttl: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    let server =
        TestServer::start_with(options, Arc::new(portcullis::core::MemoryRegistry::new())).await;
    let alice = server.enroll("alice", "laptop");
    // Each code comes from a later time step than the one before, so none is a reuse.
    let asked = Arc::new(AtomicUsize::new(0));
    let source = {
        let asked = asked.clone();
        let totp = alice.totp.clone();
        CodeSource::callback(move || {
            let n = asked.fetch_add(1, Ordering::SeqCst) as u64;
            Ok(totp.generate(SystemClock.now_ms() / 1000 + 30 * n))
        })
    };
    // The client's clock is 30 s behind (within the allowed skew), so it still believes the
    // ticket valid after the server has let it expire.
    let client = server.client_with_clock(
        &alice,
        source,
        Arc::new(OffsetClock::new(SystemClock, -30_000)),
    );
    assert_eq!(
        say(&client, &server, "x").await.unwrap().auth_method,
        "totp"
    );
    assert!(client.session().is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The next connection sends the expired ticket, gets MFA_REQUIRED, and the client retries
    // with a code on its own: the call succeeds.
    let reply = say(&client, &server, "y").await.unwrap();
    assert_eq!(reply.auth_method, "totp");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    server.stop().await;
}
