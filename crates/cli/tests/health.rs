//! `portcullis serve --health-listen ADDR`: the `health on` line, health checks outside the
//! gate (plaintext gRPC and `GET /healthz`, no certificate), and gRPC server reflection and
//! health behind the gate on the main port, for authenticated clients only.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use portcullis_client::{Client, CodeSource};
use portcullis_core::codec::ALPN_PCS1;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// A client of the device NAME of DIR as USER, with codes from `codes`.
fn client(dir: &Path, device: &str, user: &str, codes: CodeSource) -> Client {
    let roots = portcullis_tls::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = portcullis_tls::load_certs(&dir.join(format!("devices/{device}.pem"))).unwrap();
    let key = portcullis_tls::load_key(&dir.join(format!("devices/{device}-key.pem"))).unwrap();
    let tls = portcullis_tls::client_config(&roots, chain, key, &[ALPN_PCS1]).unwrap();
    Client::builder()
        .tls_config(tls)
        .server_name("localhost")
        .user(user)
        .code_source(codes)
        .build()
        .unwrap()
}

/// One health `Check` over plaintext HTTP/2 on a new connection: no TLS, no certificate.
async fn plaintext_check(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// `GET path` over HTTP/1.1 with a bounded wait: the status line and the body.
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect to the health endpoint");
    tcp.set_read_timeout(Some(COMMAND_DEADLINE)).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_health_checks_outside_and_reflection_behind_the_gate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let (_child, lines) = serve_printing(&dir, &["--health-listen", "127.0.0.1:0"], 2);
    let addr = lines[0]
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {lines:?}"))
        .to_owned();
    let health: SocketAddr = lines[1]
        .strip_prefix("health on ")
        .unwrap_or_else(|| panic!("second line: {lines:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("`{}` is not HOST:PORT: {e}", lines[1]));
    assert!(health.ip().is_loopback(), "{health}");
    assert_ne!(health.to_string(), addr);

    // Outside the gate: the first probe runs at start; wait for it, boundedly.
    let started = Instant::now();
    loop {
        match plaintext_check(health, "").await {
            Ok(ServingStatus::Serving) => break,
            other => assert!(
                started.elapsed() < COMMAND_DEADLINE,
                "no SERVING within {COMMAND_DEADLINE:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        plaintext_check(health, "portcullis.demo.v1.Echo")
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    let (status, body) = http_get(health, "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "serving\n");

    // Behind the gate: reflection lists the served services to a client with a code.
    let alice = client(&dir, "laptop", "alice", CodeSource::secret(totp(&secret)));
    let channel = alice.connect(&addr).await.unwrap();
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "portcullis.demo.v1.Echo".into(),
            )),
        },
    ]);
    let mut answers = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = answers
        .message()
        .await
        .unwrap()
        .expect("a ListServices answer");
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("not a service list: {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "portcullis.demo.v1.Echo",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let file = answers.message().await.unwrap().expect("a file answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("not a file: {file:?}");
    };
    // A serialized FileDescriptorProto holds its file name and package as plain strings.
    assert!(
        files.file_descriptor_proto.iter().any(|f| {
            let f = String::from_utf8_lossy(f);
            f.contains("portcullis/demo/v1/echo.proto") && f.contains("SayRequest")
        }),
        "{files:?}"
    );

    // And health behind the gate, with the same status.
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    // A client whose code is wrong reaches neither.
    let mallory = client(
        &dir,
        "laptop",
        "alice",
        CodeSource::fixed(wrong_code(&secret)),
    );
    let refused = match mallory.connect(&addr).await {
        Err(_) => true,
        Ok(channel) => match ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
        {
            Err(_) => true,
            Ok(answers) => answers.into_inner().message().await.is_err(),
        },
    };
    assert!(refused, "reflection answered a client with a wrong code");
}
