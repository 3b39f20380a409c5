//! Health checks outside the gate (`Builder::health_listen`): over real loopback TCP, without
//! TLS and without any client certificate, `grpc.health.v1.Health` over plaintext HTTP/2 and
//! `GET /healthz` over HTTP/1.1 on one port say SERVING while the registry answers, NOT_SERVING
//! while it fails or hangs, and SERVING again once it is back.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::store::{Slowed, Wait};
use portcullis::demo::{EchoClient, SayRequest};
use portcullis::server::tonic_health::pb::health_check_response::ServingStatus;
use portcullis::server::tonic_health::pb::health_client::HealthClient;
use portcullis::server::tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use portcullis::server::{HealthStatus, NotServingCause, PortcullisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// How long a status may take to show; generous for a loaded machine (the probe runs every
/// second).
const WITHIN: Duration = Duration::from_secs(30);

/// The Echo service's name, reported with the server's health.
const ECHO: &str = "portcullis.demo.v1.Echo";

/// A server on a [`Slowed`] store with a health listener on a free loopback port.
async fn start() -> (
    common::TestServer,
    PortcullisServer,
    Arc<Slowed>,
    SocketAddr,
) {
    let store = Arc::new(Slowed::new(Wait::Async));
    let ca = portcullis::tls::devpki::DevCa::generate("health CA").unwrap();
    let configure = |builder: portcullis::server::Builder| {
        builder
            .health_listen("127.0.0.1:0".parse().unwrap())
            .health_service_name(ECHO)
    };
    let (server, portcullis) = common::start_custom(ca, store.clone(), configure).await;
    let health = portcullis.health_addr().expect("a health address");
    (server, portcullis, store, health)
}

/// A plaintext HTTP/2 channel to `addr`: no TLS, no certificate, no Prefix.
async fn plaintext(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// One `Check` on a new connection, as a Kubernetes gRPC probe makes it.
async fn check(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(plaintext(addr).await);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// `GET /healthz` over HTTP/1.1 on a new connection: the status code and the body.
async fn healthz(addr: SocketAddr) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("the health endpoint answers and closes")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let code = head[9..12].parse().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; charset=utf-8"),
        "{head}"
    );
    (code, body.to_owned())
}

/// Waits until `Check("")` answers `want`, and returns how `/healthz` answers then.
async fn until(addr: SocketAddr, want: ServingStatus) -> (u16, String) {
    let started = Instant::now();
    loop {
        let got = check(addr, "").await.unwrap();
        if got == want {
            return healthz(addr).await;
        }
        assert!(
            started.elapsed() < WITHIN,
            "still {got:?} after {WITHIN:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next status a `Watch` stream sends.
async fn next(
    watch: &mut tonic::Streaming<HealthCheckResponse>,
) -> Result<ServingStatus, tonic::Status> {
    let message = tokio::time::timeout(WITHIN, watch.message())
        .await
        .expect("a Watch update in time")?
        .expect("the Watch stream stays open");
    Ok(message.status())
}

/// SERVING over gRPC and HTTP without any credential; NOT_SERVING and 503 while the registry
/// fails; SERVING again once it answers; and the same on a `Watch` stream opened at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_health_listener_follows_the_registry() {
    let (server, portcullis, store, addr) = start().await;
    assert_ne!(addr, server.addr, "health checks have a port of their own");

    let (code, body) = until(addr, ServingStatus::Serving).await;
    assert_eq!((code, body.as_str()), (200, "serving\n"));
    assert_eq!(check(addr, ECHO).await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        check(addr, "no.such.v1.Service").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(portcullis.health_status(), HealthStatus::Serving);

    let mut watch = HealthClient::new(plaintext(addr).await)
        .watch(HealthCheckRequest {
            service: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut watch).await.unwrap(), ServingStatus::Serving);

    store.snapshots_fail.store(true, Ordering::SeqCst);
    let (code, body) = until(addr, ServingStatus::NotServing).await;
    assert_eq!(code, 503);
    assert_eq!(body, "not serving: the registry failed a read\n");
    assert_eq!(check(addr, ECHO).await.unwrap(), ServingStatus::NotServing);
    assert_eq!(next(&mut watch).await.unwrap(), ServingStatus::NotServing);
    assert_eq!(
        portcullis.health_status(),
        HealthStatus::NotServing(NotServingCause::RegistryFailed)
    );
    // The error text stays in the server's log: the endpoint names only the kind of failure.
    assert!(!body.contains("the test registry is down"), "{body}");

    store.snapshots_fail.store(false, Ordering::SeqCst);
    let (code, body) = until(addr, ServingStatus::Serving).await;
    assert_eq!((code, body.as_str()), (200, "serving\n"));
    assert_eq!(check(addr, ECHO).await.unwrap(), ServingStatus::Serving);
    assert_eq!(next(&mut watch).await.unwrap(), ServingStatus::Serving);

    drop(watch);
    server.stop().await;
}

/// A registry that does not answer within the probe's timeout makes the server NOT_SERVING
/// too; once reads are quick again it is SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_that_hangs_is_not_serving() {
    let (server, portcullis, store, addr) = start().await;
    until(addr, ServingStatus::Serving).await;

    let hang = portcullis::server::health::PROBE_TIMEOUT * 3;
    store
        .snapshot_delay_ms
        .store(u64::try_from(hang.as_millis()).unwrap(), Ordering::SeqCst);
    let (code, body) = until(addr, ServingStatus::NotServing).await;
    assert_eq!(code, 503);
    assert_eq!(
        body,
        "not serving: the registry did not answer a read in time\n"
    );
    assert_eq!(
        portcullis.health_status(),
        HealthStatus::NotServing(NotServingCause::RegistryTimeout)
    );

    store.snapshot_delay_ms.store(0, Ordering::SeqCst);
    let (code, _) = until(addr, ServingStatus::Serving).await;
    assert_eq!(code, 200);
    server.stop().await;
}

/// The health port answers health checks and nothing else: the services behind the gate are
/// not reachable through it, and other paths get 404.
#[tokio::test]
async fn the_health_listener_serves_nothing_else() {
    let (server, _portcullis, _store, addr) = start().await;
    until(addr, ServingStatus::Serving).await;

    let status = EchoClient::new(plaintext(addr).await)
        .say(SayRequest {
            text: "hello".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404 "), "{raw}");

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /healthz HTTP/1.1\r\nHost: probe\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");
    server.stop().await;
}

/// Without `health_listen` and `health_service`, no probe runs: the status stays NotProbed.
#[tokio::test]
async fn without_health_checks_no_probe_runs() {
    let (server, portcullis) = common::start_configured(|builder| builder).await;
    assert_eq!(portcullis.health_addr(), None);
    tokio::time::sleep(portcullis::server::health::PROBE_INTERVAL * 2).await;
    assert_eq!(
        portcullis.health_status(),
        HealthStatus::NotServing(NotServingCause::NotProbed)
    );
    server.stop().await;
}

/// An address that cannot be bound fails the build, naming the address.
#[tokio::test]
async fn a_health_address_in_use_fails_the_build() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let ca = portcullis::tls::devpki::DevCa::generate("health CA").unwrap();
    let cert = ca.issue_server(&["localhost".to_string()]).unwrap();
    let error = PortcullisServer::builder()
        .identity(vec![cert.cert_der()], cert.key_der(), &[ca.cert_der()])
        .unwrap()
        .registry(Arc::new(portcullis::MemoryRegistry::new()))
        .health_listen(addr)
        .build()
        .unwrap_err();
    assert!(
        matches!(error, portcullis::server::ServerError::HealthListen { addr: a, .. } if a == addr),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("{addr}: cannot listen for health checks")),
        "{error}"
    );
}
