//! `PortcullisServer::serve_with_grace`: on the shutdown signal a call in flight may finish
//! within the grace period; a call that does not finish by then has its connection closed, and
//! the server stops instead of waiting for it.

use std::sync::Arc;
use std::time::Duration;

use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{Admin, Clock, MemoryRegistry, SystemClock, TotpAlgorithm, TotpConfig};
use portcullis::demo::{Echo, EchoClient, EchoServer, SayReply, SayRequest};
use portcullis::server::PortcullisServer;
use portcullis::tls::devpki::DevCa;
use tokio::sync::oneshot;

/// An Echo whose answer takes `delay` (forever when `None`).
struct Slow {
    delay: Option<Duration>,
}

#[tonic::async_trait]
impl Echo for Slow {
    async fn say(
        &self,
        request: tonic::Request<SayRequest>,
    ) -> Result<tonic::Response<SayReply>, tonic::Status> {
        match self.delay {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending::<()>().await,
        }
        Ok(tonic::Response::new(SayReply {
            text: request.into_inner().text,
            ..SayReply::default()
        }))
    }
}

/// A server answering with `slow`, served with `grace`, and a client of alice's laptop; the
/// sender that stops the server, the server's task (its result) and the handle.
async fn start(
    slow: Slow,
    grace: Duration,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    PortcullisServer,
    Client,
    String,
) {
    let ca = DevCa::generate("shutdown CA").unwrap();
    let cert = ca.issue_server(&["localhost".to_owned()]).unwrap();
    let registry = Arc::new(MemoryRegistry::new());
    let totp =
        TotpConfig::new(b"shutdown-secret-1234".to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap();
    registry
        .add_user("alice", totp.clone(), SystemClock.now_ms())
        .unwrap();
    let laptop = ca.issue_device("laptop").unwrap();
    let fp = portcullis::tls::fingerprint(laptop.cert_der().as_ref()).unwrap();
    registry
        .bind_device("laptop", "alice", &fp, SystemClock.now_ms())
        .unwrap();
    let portcullis = PortcullisServer::builder()
        .identity(vec![cert.cert_der()], cert.key_der(), &[ca.cert_der()])
        .unwrap()
        .registry(registry)
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = portcullis.clone();
    let task = tokio::spawn(async move {
        serving
            .serve_with_grace(
                |signal| {
                    serving
                        .server()
                        .add_service(EchoServer::new(slow))
                        .serve_with_incoming_shutdown(serving.incoming(listener), signal)
                },
                async {
                    let _ = stopped.await;
                },
                grace,
            )
            .await
    });
    let tls = portcullis::tls::client_config(
        &[ca.cert_der()],
        vec![laptop.cert_der()],
        laptop.key_der(),
        &[ALPN_PCS1],
    )
    .unwrap();
    let client = Client::builder()
        .tls_config(tls)
        .server_name("localhost")
        .user("alice")
        .code_source(CodeSource::secret(totp))
        .build()
        .unwrap();
    (stop, task, portcullis, client, addr)
}

/// Starts one call on its own task once its connection is authenticated.
async fn call_in_flight(
    client: &Client,
    addr: &str,
    portcullis: &PortcullisServer,
) -> tokio::task::JoinHandle<Result<tonic::Response<SayReply>, tonic::Status>> {
    let channel = client.connect_lazy(addr).unwrap();
    let call = tokio::spawn(async move {
        EchoClient::new(channel)
            .say(SayRequest {
                text: "in flight".into(),
            })
            .await
    });
    while portcullis.live_connections() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call
}

/// A bound on waiting in these tests, far above any expected time.
const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_call_that_never_ends_is_cut_after_the_grace_period_and_the_server_stops() {
    let (stop, task, portcullis, client, addr) =
        start(Slow { delay: None }, Duration::from_millis(200)).await;
    let call = call_in_flight(&client, &addr, &portcullis).await;
    stop.send(()).unwrap();

    // tonic alone would wait for the call forever; the grace period ends it.
    let served = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the server stops after the grace period")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    let status = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the stuck call ends when its connection is closed")
        .unwrap()
        .expect_err("the call cannot succeed");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert_eq!(portcullis.live_connections(), 0);
}

#[tokio::test]
async fn a_call_in_flight_finishes_within_the_grace_period() {
    let (stop, task, portcullis, client, addr) = start(
        Slow {
            delay: Some(Duration::from_millis(300)),
        },
        PATIENCE,
    )
    .await;
    let call = call_in_flight(&client, &addr, &portcullis).await;
    stop.send(()).unwrap();

    let reply = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the call ends")
        .unwrap()
        .expect("a call in flight at the signal completes");
    assert_eq!(reply.into_inner().text, "in flight");
    let served = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the server stops once the call is done")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(portcullis.close_connections(), 0, "nothing left to close");
}
