//! PROXY protocol v2 behind an L4 balancer, over real loopback TCP and TLS: a balancer in the
//! test (listening on 127.0.0.1, connecting to the server from 127.0.0.2, writing its header in
//! the same segment as the client's ClientHello) forwards clients; the address its header names
//! is the one the service, the audit trail and the rate limit see. A peer that is not trusted,
//! or sends no valid header, is closed before TLS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use portcullis::client::CodeSource;
use portcullis::core::RejectCode;
use portcullis::core::codec::ALPN_PCS1;
use portcullis::server::{AuditOutcome, RateLimit, TrustedProxies};
use proxy_header::{ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A generous bound on waits that should end long before it; reaching it fails the test.
const GUARD: Duration = Duration::from_secs(30);

/// The balancer's source address towards the server.
const BALANCER_IP: &str = "127.0.0.2";

/// A TCP connection to `server` from `source` (a second loopback address).
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let tcp = socket.connect(server).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// The v2 header a balancer writes for `client` (`None`: a LOCAL header, its own connection).
fn header_for(client: Option<SocketAddr>, server: SocketAddr) -> Vec<u8> {
    let header = match client {
        Some(client) => ProxyHeader::with_address(ProxiedAddress::stream(client, server)),
        None => ProxyHeader::with_local(),
    };
    let mut bytes = Vec::new();
    header.encode_v2(&mut bytes).unwrap();
    bytes
}

/// An L4 balancer on 127.0.0.1 that forwards each connection to `server` from
/// [`BALANCER_IP`], its PROXY header naming `client`, written in one segment with the client's
/// first bytes (so the server must read the header and not one byte more). Returns its address.
async fn balancer(server: SocketAddr, client: Option<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut outbound = connect_from(BALANCER_IP, server).await;
                let mut first = vec![0u8; 16 * 1024];
                let Ok(n) = inbound.read(&mut first).await else {
                    return;
                };
                let mut bytes = header_for(client, server);
                bytes.extend_from_slice(&first[..n]);
                if outbound.write_all(&bytes).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// One Echo call of `client` through the balancer at `front`.
async fn say_via(
    client: &portcullis::client::Client,
    front: SocketAddr,
) -> Result<portcullis::demo::SayReply, tonic::Status> {
    let channel = client.connect_lazy(&front.to_string()).unwrap();
    portcullis::demo::EchoClient::new(channel)
        .say(portcullis::demo::SayRequest {
            text: "hello".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A test server trusting `trusted` for PROXY headers, with a test-sized rate limit and an
/// audit collector.
async fn proxied_server(trusted: &str, rate: RateLimit) -> (TestServer, Seen) {
    let (seen, sink) = collector();
    let trusted: TrustedProxies = trusted.parse().unwrap();
    let (server, _) = start_configured(move |b| {
        b.proxy_protocol(trusted)
            .rate_limit(Some(rate))
            .audit_sink(sink)
    })
    .await;
    (server, seen)
}

/// Whether the server closed a raw connection without a single byte: what a refusal before
/// TLS looks like from the client.
async fn closed_without_a_byte(mut tcp: TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(GUARD, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the server sent {n} bytes"),
        Err(_) => panic!("still open after {} s", GUARD.as_secs()),
    }
}

#[tokio::test]
async fn the_client_named_by_the_header_reaches_the_service_and_the_audit_trail() {
    let (server, seen) = proxied_server(BALANCER_IP, RateLimit::new(20, 40)).await;
    let alice = server.enroll("alice", "laptop");
    let named: SocketAddr = "203.0.113.7:4444".parse().unwrap();
    let front = balancer(server.addr, Some(named)).await;

    let client = server
        .client_builder(
            &alice.device,
            "alice",
            CodeSource::secret(alice.totp.clone()),
        )
        .build()
        .unwrap();
    let reply = tokio::time::timeout(GUARD, say_via(&client, front))
        .await
        .unwrap()
        .unwrap();
    // What tonic tells the handler (`request.remote_addr()`) and what the AuthContext says.
    assert!(
        reply.text.contains("|peer=203.0.113.7:4444|"),
        "{}",
        reply.text
    );
    assert!(
        reply.text.contains("|auth_peer=203.0.113.7:4444|"),
        "{}",
        reply.text
    );

    let got = records(&seen, 1).await;
    let record = &got[0];
    assert_eq!(record.outcome, AuditOutcome::Accepted, "{record:?}");
    assert_eq!(record.peer, named);
    let proxy = record.proxy.expect("the balancer is recorded");
    assert_eq!(proxy.ip().to_string(), BALANCER_IP);
    let json: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
    assert_eq!(json["peer"], "203.0.113.7:4444");
    assert_eq!(json["proxy"], proxy.to_string());
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limit_counts_the_client_of_the_header_not_the_balancer() {
    // Three attempts at once per source, then one a second.
    let (server, seen) = proxied_server(BALANCER_IP, RateLimit::new(1, 3)).await;
    let enrolled = server.enroll("alice", "laptop");
    let busy = balancer(server.addr, Some("203.0.113.7:4444".parse().unwrap())).await;
    let other = balancer(server.addr, Some("198.51.100.1:5555".parse().unwrap())).await;
    let config = server.tls_config(&enrolled.device, &[ALPN_PCS1]);

    // A frame header of an unknown kind: refused MALFORMED, after the limits let it in.
    let probe = |front: SocketAddr| {
        let config = config.clone();
        async move {
            let mut tls = tls_with(front, config).await.unwrap();
            tls.write_all(&[0xee; 7]).await.unwrap();
            tls.flush().await.unwrap();
            tokio::time::timeout(GUARD, try_read_verdict(&mut tls))
                .await
                .unwrap()
                .expect("a Verdict")
        }
    };
    for i in 0..3 {
        let verdict = probe(busy).await;
        assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed), "{i}");
    }
    let limited = probe(busy).await;
    assert_eq!(limited.reject_code(), Some(RejectCode::RateLimited));
    // Same balancer address on the server's side, another client: not limited.
    let verdict = probe(other).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed));

    let got = records(&seen, 5).await;
    let limited: Vec<_> = got
        .iter()
        .filter(|r| r.cause == Some("rate_limited"))
        .collect();
    assert_eq!(limited.len(), 1, "{got:#?}");
    assert_eq!(limited[0].peer, "203.0.113.7:4444".parse().unwrap());
    server.stop().await;
}

#[tokio::test]
async fn a_local_header_keeps_the_balancer_address() {
    let (server, seen) = proxied_server("127.0.0.0/8", RateLimit::new(20, 40)).await;
    let alice = server.enroll("alice", "laptop");
    let front = balancer(server.addr, None).await;
    let client = server
        .client_builder(
            &alice.device,
            "alice",
            CodeSource::secret(alice.totp.clone()),
        )
        .build()
        .unwrap();
    let reply = tokio::time::timeout(GUARD, say_via(&client, front))
        .await
        .unwrap()
        .unwrap();
    assert!(
        reply.text.contains(&format!("|peer={BALANCER_IP}:")),
        "{}",
        reply.text
    );
    let got = records(&seen, 1).await;
    assert_eq!(got[0].peer.ip().to_string(), BALANCER_IP);
    assert_eq!(got[0].proxy, None);
    server.stop().await;
}

#[tokio::test]
async fn a_connection_without_a_header_is_closed_before_tls() {
    // The test's own address is trusted: what is refused is the missing header.
    let (server, seen) = proxied_server("127.0.0.1", RateLimit::new(20, 40)).await;
    let enrolled = server.enroll("alice", "laptop");
    let config = server.tls_config(&enrolled.device, &[ALPN_PCS1]);
    // A client that goes past the balancer: its ClientHello is not a header.
    assert!(tls_with(server.addr, config).await.is_err());
    // A version 1 (text) header.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 443\r\n")
        .await
        .unwrap();
    closed_without_a_byte(tcp).await;

    let got = records(&seen, 2).await;
    for record in &got {
        assert_eq!(record.outcome, AuditOutcome::Closed, "{record:?}");
        assert_eq!(record.cause, Some("proxy_header_refused"), "{record:?}");
        assert_eq!(record.fingerprint, None, "no TLS handshake: {record:?}");
        assert_eq!(record.peer.ip().to_string(), "127.0.0.1");
    }
    let details: Vec<_> = got.iter().filter_map(|r| r.detail.clone()).collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("no PROXY protocol v2 header")),
        "{details:?}"
    );
    assert!(details.iter().any(|d| d.contains("v1")), "{details:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_header_from_an_untrusted_peer_is_closed_before_tls() {
    let (server, seen) = proxied_server("127.0.0.3, 10.0.0.0/8", RateLimit::new(20, 40)).await;
    let enrolled = server.enroll("alice", "laptop");
    let front = balancer(server.addr, Some("203.0.113.7:4444".parse().unwrap())).await;
    let config = server.tls_config(&enrolled.device, &[ALPN_PCS1]);
    assert!(tls_with(front, config).await.is_err());
    let got = records(&seen, 1).await;
    assert_eq!(got[0].cause, Some("proxy_untrusted"), "{got:?}");
    // The address the header claimed is not believed.
    assert_eq!(got[0].peer.ip().to_string(), BALANCER_IP);
    assert_eq!(got[0].proxy, None);
    assert_eq!(server.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_or_oversized_header_is_closed_within_its_limits() {
    let (server, seen) = proxied_server("127.0.0.1", RateLimit::new(20, 40)).await;

    // Ten bytes of the signature, then nothing: closed at the header deadline, long before
    // the connection's own 10 s.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(&portcullis_proxy::SIGNATURE[..10])
        .await
        .unwrap();
    // A fixed part announcing 2,000 bytes: closed at once, the rest never read.
    let mut oversized = TcpStream::connect(server.addr).await.unwrap();
    let mut fixed = portcullis_proxy::SIGNATURE.to_vec();
    fixed.extend_from_slice(&[0x21, 0x11]);
    fixed.extend_from_slice(&2000u16.to_be_bytes());
    oversized.write_all(&fixed).await.unwrap();
    closed_without_a_byte(oversized).await;
    closed_without_a_byte(stalled).await;

    let got = records(&seen, 2).await;
    let too_long = got
        .iter()
        .find(|r| r.cause == Some("proxy_header_refused"))
        .expect("the oversized header is refused");
    assert!(
        too_long.detail.as_deref().unwrap().contains("2016 bytes"),
        "{too_long:?}"
    );
    let timed_out = got
        .iter()
        .find(|r| r.cause == Some("proxy_header_timeout"))
        .expect("the stalled header times out");
    assert!(
        timed_out.detail.as_deref().unwrap().contains("10 bytes"),
        "{timed_out:?}"
    );
    // Closed at the header's own deadline (2 s), not at the connection's (10 s).
    assert!(
        timed_out.accept_us < 9_000_000,
        "closed after {} µs",
        timed_out.accept_us
    );
    server.stop().await;
}
