//! Every row of docs/TROUBLESHOOTING.md, created for real over loopback: what the Portcullis
//! client library reports (gRPC code, message, metadata) names the cause and the fix.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis::client::{Client, CodeSource, FIX_METADATA};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{Clock, OffsetClock, RejectCode, SystemClock};
use portcullis::demo::{EchoClient, SayReply, SayRequest};
use portcullis::tls::devpki::{CertProfile, DevCa, Issued};
use portcullis::tls::rustls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The fix every refused device certificate names.
const CLIENT_CERT_FIX: &str = "the server does not accept this device certificate: is it issued \
                               by the CA the server trusts, still valid, with clientAuth?";

/// One call to the Echo service over a new channel of `client` to `addr`.
async fn say(client: &Client, addr: &str) -> Result<SayReply, tonic::Status> {
    let channel = client.connect_lazy(addr).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        EchoClient::new(channel).say(SayRequest { text: "x".into() }),
    )
    .await
    .expect("a call ends within 10 s")
    .map(|r| r.into_inner())
}

/// The status of one call to `addr` that must fail.
async fn refused(client: &Client, addr: &str) -> tonic::Status {
    say(client, addr).await.unwrap_err()
}

fn client_with(
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    user: &str,
    source: CodeSource,
) -> Client {
    Client::builder()
        .tls_config(tls)
        .server_name(server_name)
        .user(user)
        .code_source(source)
        .build()
        .unwrap()
}

fn config_for(ca: &DevCa, device: &Issued) -> Arc<rustls::ClientConfig> {
    portcullis::tls::client_config(
        &[ca.cert_der()],
        vec![device.cert_der()],
        device.key_der(),
        &[ALPN_PCS1],
    )
    .unwrap()
}

/// The status of one call that must fail, by alice with `device`, trusting `ca` and connecting
/// to `server_name` at `addr`.
async fn refused_device(
    ca: &DevCa,
    device: &Issued,
    server_name: &str,
    addr: &str,
) -> tonic::Status {
    let client = client_with(
        config_for(ca, device),
        server_name,
        "alice",
        CodeSource::fixed("000000"),
    );
    refused(&client, addr).await
}

fn meta<'a>(status: &'a tonic::Status, key: &str) -> &'a str {
    status
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {status:?}"))
        .to_str()
        .unwrap()
}

/// The status is the rejection `reject`, with its gRPC code, its name in front of the message,
/// the REF and a fix; and the message contains every word of `words`.
#[track_caller]
fn assert_rejected(status: &tonic::Status, reject: RejectCode, code: tonic::Code, words: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with(&format!("{}: ", reject.name())),
        "{message:?} should start with {}",
        reject.name()
    );
    for word in words {
        assert!(message.contains(word), "{message:?} lacks {word:?}");
    }
    assert_eq!(meta(status, "portcullis-reject"), reject.name());
    assert_eq!(meta(status, "portcullis-ref").len(), 32, "{status:?}");
    assert!(!meta(status, FIX_METADATA).is_empty());
}

/// The status is a TLS failure (UNAVAILABLE, `tls: `) whose message contains every word.
#[track_caller]
fn assert_tls(status: &tonic::Status, words: &[&str]) {
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(message.starts_with("tls: "), "{message:?}");
    for word in words {
        assert!(message.contains(word), "{message:?} lacks {word:?}");
    }
    assert!(status.metadata().get("portcullis-reject").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_name_the_certificate_and_the_fix() {
    let server = TestServer::start().await;
    let addr = server.addr_str();
    let alice = server.enroll("alice", "laptop");

    // Wrong CA on the client side: the client trusts another CA than the server's.
    let other = DevCa::generate("other CA").unwrap();
    let status = refused_device(&other, &alice.device, "localhost", &addr).await;
    assert_tls(
        &status,
        &[
            "unknown CA",
            "certificate for CN=localhost",
            "does not trust",
            "--ca",
            "--dir",
        ],
    );

    // Wrong CA on the server side: the device certificate comes from a CA the server does not
    // trust. The server's alert arrives after the client's side of the handshake.
    let stranger = other.issue_device("stranger").unwrap();
    let status = refused_device(&server.ca, &stranger, "localhost", &addr).await;
    assert_tls(
        &status,
        &[
            "the server refused the client certificate (alert unknown_ca)",
            CLIENT_CERT_FIX,
            // The CA the server named in its certificate request, and ours.
            "the server accepts client certificates issued by CN=test CA; this one is issued \
             by CN=other CA",
        ],
    );

    // An expired device certificate.
    let mut expired = CertProfile::device("old-laptop");
    let now = i64::try_from(SystemClock.now_ms() / 1000).unwrap();
    expired.not_before_unix = now - 10 * 86_400;
    expired.not_after_unix = now - 86_400;
    let expired = server.ca.issue(&expired).unwrap();
    let status = refused_device(&server.ca, &expired, "localhost", &addr).await;
    assert_tls(
        &status,
        &["certificate_expired", "issue a new device certificate"],
    );

    // A device certificate without clientAuth in its extended key usage.
    let mut no_client_auth = CertProfile::device("server-ish");
    no_client_auth.client_auth = false;
    no_client_auth.server_auth = true;
    let no_client_auth = server.ca.issue(&no_client_auth).unwrap();
    let status = refused_device(&server.ca, &no_client_auth, "localhost", &addr).await;
    assert_tls(
        &status,
        &["the server refused the client certificate", CLIENT_CERT_FIX],
    );

    // The name connected to is not in the server certificate: its SANs are listed.
    let status = refused_device(&server.ca, &alice.device, "portcullis.example", &addr).await;
    assert_tls(
        &status,
        &[
            "name mismatch",
            "not valid for portcullis.example",
            "localhost",
            "127.0.0.1",
        ],
    );
    assert_eq!(server.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_users_and_codes_name_the_cause_and_the_fix() {
    let server = TestServer::start().await;
    let addr = server.addr_str();
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "desktop");

    // A device certificate from the right CA, bound to nobody.
    let (unbound, _) = server.issue("new-laptop");
    let status = refused(
        &server.client_as(&unbound, "alice", CodeSource::fixed("000000")),
        &addr,
    )
    .await;
    assert_rejected(
        &status,
        RejectCode::DeviceUnknown,
        tonic::Code::Unauthenticated,
        &["is bound to no user", "portcullis device bind"],
    );

    // A device of bob's, used as alice.
    let status = refused(
        &server.client_as(&bob.device, "alice", CodeSource::fixed("000000")),
        &addr,
    )
    .await;
    assert_rejected(
        &status,
        RejectCode::UserMismatch,
        tonic::Code::Unauthenticated,
        &[
            "is not bound to user alice",
            "use the user it was issued for",
        ],
    );

    // A wrong code.
    let status = refused(
        &server.client(&alice, CodeSource::fixed(wrong_code(&alice.totp))),
        &addr,
    )
    .await;
    assert_rejected(
        &status,
        RejectCode::MfaFailed,
        tonic::Code::Unauthenticated,
        &["the one-time code was not accepted"],
    );
    assert!(meta(&status, FIX_METADATA).contains("current code"));

    // A code used twice: accepted once, refused the second time.
    let code = current_code(&bob.totp);
    say(&server.client(&bob, CodeSource::fixed(code.clone())), &addr)
        .await
        .unwrap();
    let status = refused(&server.client(&bob, CodeSource::fixed(code)), &addr).await;
    assert_rejected(
        &status,
        RejectCode::MfaFailed,
        tonic::Code::Unauthenticated,
        &["this code was already used; wait for the next one"],
    );
    // The REASON states the fix already: the client does not append the wrong code's advice.
    assert!(!status.message().contains("current code"), "{status:?}");
    assert!(meta(&status, FIX_METADATA).contains("accepted once"));

    // Locked out: five wrong codes, then even the right one is refused, with the wait.
    let carol = server.enroll("carol", "tablet");
    for _ in 0..5 {
        let status = refused(
            &server.client(&carol, CodeSource::fixed(wrong_code(&carol.totp))),
            &addr,
        )
        .await;
        assert_eq!(
            meta(&status, "portcullis-reject"),
            "mfa_failed",
            "{status:?}"
        );
    }
    let status = refused(&server.secret_client(&carol), &addr).await;
    assert_rejected(
        &status,
        RejectCode::LockedOut,
        tonic::Code::Unauthenticated,
        &["too many failed codes for carol", "retry in"],
    );
    let retry: u32 = meta(&status, "portcullis-retry-after").parse().unwrap();
    assert!(retry > 0);
    assert!(meta(&status, FIX_METADATA).contains(&format!("retry after {retry} s")));

    // A revoked device.
    server
        .registry
        .revoke_device("laptop", SystemClock.now_ms())
        .unwrap();
    let status = refused(&server.secret_client(&alice), &addr).await;
    assert_rejected(
        &status,
        RejectCode::DeviceRevoked,
        tonic::Code::Unauthenticated,
        &["device laptop", "was revoked", "bind this device again"],
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_client_clock_says_by_how_much_and_which_side() {
    let server = TestServer::start().await;
    let addr = server.addr_str();
    let alice = server.enroll("alice", "laptop");
    // The server rounds up: a clock 120 s behind can read 121 s by the time it is checked.
    for (offset_ms, side) in [(120_000, " s ahead of"), (-120_000, " s behind")] {
        let client = server.client_with_clock(
            &alice,
            CodeSource::secret(alice.totp.clone()),
            Arc::new(OffsetClock::new(SystemClock, offset_ms)),
        );
        let status = refused(&client, &addr).await;
        assert_rejected(
            &status,
            RejectCode::ClockSkew,
            tonic::Code::Unauthenticated,
            &[
                "clock_skew: your clock is 12",
                side,
                "(allowed: 60 s)",
                "NTP",
            ],
        );
    }
    server.stop().await;
}

/// A TLS-terminating proxy: accepts TLS with a server certificate of the same CA (requiring a
/// client certificate) and opens its own TLS connection to `upstream` with its own device
/// certificate, copying the bytes between the two.
async fn terminating_proxy(server: &TestServer, upstream: std::net::SocketAddr) -> String {
    let accept = server.server_tls(&[ALPN_PCS1]);
    let (proxy_device, _) = server.issue("proxy");
    let connect = config_for(&server.ca, &proxy_device);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(accept);
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let connect = connect.clone();
            tokio::spawn(async move {
                let Ok(mut down) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tls_with(upstream, connect).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_terminating_proxy_is_named_as_the_cause() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let proxy = terminating_proxy(&server, server.addr).await;
    let status = refused(&server.secret_client(&alice), &proxy).await;
    assert_rejected(
        &status,
        RejectCode::BindingMismatch,
        tonic::Code::Unauthenticated,
        &[
            "terminates TLS",
            "proxy or load balancer",
            "connect directly",
        ],
    );
    assert!(meta(&status, FIX_METADATA).contains("TLS passthrough"));
    // Directly, the same client is accepted.
    say(&server.secret_client(&alice), &server.addr_str())
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_mismatches_name_the_other_side() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");

    // A TLS 1.2-only client: the server answers protocol_version.
    let client = client_with(
        server.tls12_config(&alice.device),
        "localhost",
        "alice",
        CodeSource::secret(alice.totp.clone()),
    );
    let status = refused(&client, &server.addr_str()).await;
    assert_tls(
        &status,
        &[
            "protocol version",
            "protocol_version",
            "TLS 1.3 on both sides",
        ],
    );

    // A plaintext (h2c) server on the address the client dials: it answers the ClientHello
    // with HTTP/2 bytes.
    let h2c = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2c_addr = h2c.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = h2c.accept().await {
            let mut buf = [0u8; 512];
            let _ = tcp.read(&mut buf).await;
            // An empty SETTINGS frame, then a GOAWAY (PROTOCOL_ERROR), as an h2c server sends.
            let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let _ = tcp
                .write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
                .await;
        }
    });
    let client = server.secret_client(&alice);
    let status = refused(&client, &h2c_addr).await;
    assert_tls(&status, &["did not answer TLS", "plaintext (h2c) server"]);

    // A TLS server that does not speak portcullis/1 (a standard gRPC server: ALPN h2 only).
    let h2_only = server.server_tls(&[b"h2"]);
    let h2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2_addr = h2.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(h2_only);
        while let Ok((tcp, _)) = h2.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let status = refused(&client, &h2_addr).await;
    assert_tls(&status, &["not a Portcullis server", "portcullis/1"]);

    // A plaintext client (an HTTP/2 preface, as `grpcurl -plaintext` sends) on the TLS port:
    // the server never answers HTTP/2; it closes the connection (possibly after a TLS alert
    // record), so the plaintext client sees the connection end.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut seen))
        .await
        .expect("the server closes a plaintext connection");
    assert!(
        read.is_err() || !seen.starts_with(&[0, 0]),
        "no HTTP/2 frame comes back: {seen:?}"
    );
    assert!(
        seen.is_empty() || seen[0] == 0x15,
        "at most a TLS alert record: {seen:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_capacity_says_when_to_retry() {
    let (server, portcullis) = start_configured(|b| b.max_pending(1).rate_limit(None)).await;
    let alice = server.enroll("alice", "laptop");
    // A connection past its TLS handshake, waiting to send its Prefix, holds the slot (one
    // still in its handshake would be shed for the newcomer).
    let idle = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while portcullis.pending() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the idle connection holds the slot");
    let status = refused(&server.secret_client(&alice), &server.addr_str()).await;
    assert_rejected(
        &status,
        RejectCode::Overloaded,
        tonic::Code::Unavailable,
        &[],
    );
    let retry: u32 = meta(&status, "portcullis-retry-after").parse().unwrap();
    assert_eq!(
        meta(&status, FIX_METADATA),
        format!("retry shortly (retry after {retry} s)")
    );
    drop(idle);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_client_without_a_session_is_told_to_log_in() {
    let (server, _portcullis) = start_configured(|b| {
        b.standard_clients(true)
            .session_ttl(Some(Duration::from_secs(600)))
    })
    .await;
    let alice = server.enroll("alice", "laptop");
    let tls = server.tls_config(&alice.device, &[b"h2"]);
    let addr = server.addr;
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let stream = tls_with(addr, tls).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector_lazy(connector);
    let status = EchoClient::new(channel)
        .say(SayRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("mfa_required: no live session for device laptop"),
        "{status:?}"
    );
    assert!(
        status.message().contains("run portcullis login"),
        "{status:?}"
    );
    assert_eq!(meta(&status, "portcullis-reject"), "mfa_required");
    server.stop().await;
}
