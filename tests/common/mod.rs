//! A Portcullis server on loopback with a dev PKI, and clients for it: real TCP, real TLS.
#![allow(dead_code)]

pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use portcullis::AuthContext;
use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::{
    ALPN_PCS1, Factor, FrameKind, FrameReader, Prefix, Progress, Verdict,
};
use portcullis::core::{
    Clock, DeviceFingerprint, MemoryRegistry, Registry, SystemClock, TotpAlgorithm, TotpConfig,
};
use portcullis::demo::{Echo, EchoClient, EchoServer, SayReply, SayRequest};
use portcullis::server::PortcullisServer;
use portcullis::server::policy::{Policy, PolicyLayer};
use portcullis::tls::devpki::{DevCa, Issued};
use portcullis::tls::rustls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

/// The Echo service of the tests: counts the calls that reach it and reports what tonic tells
/// a handler about the connection.
#[derive(Clone, Default)]
pub struct CountingEcho {
    pub calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Echo for CountingEcho {
    async fn say(
        &self,
        request: tonic::Request<SayRequest>,
    ) -> Result<tonic::Response<SayReply>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let auth = AuthContext::of(&request)?.clone();
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into());
        let certs = request.peer_certs().map(|c| c.len()).unwrap_or(0);
        let text = format!(
            "{}|peer={peer}|certs={certs}|auth_peer={}|device_name={}",
            request.get_ref().text,
            auth.peer_addr,
            auth.device_name
        );
        Ok(tonic::Response::new(SayReply {
            text,
            user: auth.user,
            device: auth.fingerprint.to_string(),
            auth_method: auth.method.as_str().to_owned(),
        }))
    }
}

/// The records an audit sink made by [`collector`] has kept.
pub type Seen = Arc<std::sync::Mutex<Vec<portcullis::server::AuditRecord>>>;

/// An audit sink that keeps every record, and the records it kept.
pub fn collector() -> (Seen, Arc<dyn portcullis::server::AuditSink>) {
    let seen: Seen = Arc::default();
    let keep = seen.clone();
    let sink = Arc::new(move |record: &portcullis::server::AuditRecord| {
        keep.lock().unwrap().push(record.clone())
    });
    (seen, sink)
}

/// Waits (at most 30 s) until `n` records have come, and returns them.
pub async fn records(seen: &Seen, n: usize) -> Vec<portcullis::server::AuditRecord> {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while seen.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let got = seen.lock().unwrap().clone();
    assert!(
        waited.is_ok(),
        "expected {n} records, got {}: {got:#?}",
        got.len()
    );
    got
}

/// Settings of a test server.
pub struct Options {
    pub deadline: Duration,
    pub session_ttl: Option<Duration>,
    pub clock_skew: Duration,
    pub policy: Option<Arc<dyn portcullis::core::ConnectionPolicy>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            session_ttl: Some(Duration::from_secs(3600)),
            clock_skew: Duration::from_secs(60),
            policy: None,
        }
    }
}

/// A device enrolled for a user.
pub struct Enrolled {
    pub user: String,
    pub totp: TotpConfig,
    pub device: Issued,
    pub fingerprint: DeviceFingerprint,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Arc<dyn Registry>,
    pub ca: DevCa,
    pub calls: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Options::default(), Arc::new(MemoryRegistry::new())).await
    }

    pub async fn start_with(options: Options, registry: Arc<dyn Registry>) -> Self {
        let ca = DevCa::generate("test CA").unwrap();
        let configure = |builder: portcullis::server::Builder| {
            let builder = builder
                .deadline(options.deadline)
                .session_ttl(options.session_ttl)
                .clock_skew(options.clock_skew);
            match options.policy {
                Some(policy) => builder.policy(policy),
                None => builder,
            }
        };
        start_custom(ca, registry, configure).await.0
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .unwrap();
        }
    }

    pub fn add_user(&self, user: &str) -> TotpConfig {
        let totp = totp_of(user);
        self.registry
            .add_user(user, totp.clone(), SystemClock.now_ms())
            .unwrap();
        totp
    }

    /// Issues a device certificate from the server's CA without binding it.
    pub fn issue(&self, device: &str) -> (Issued, DeviceFingerprint) {
        let issued = self.ca.issue_device(device).unwrap();
        let fp = portcullis::tls::fingerprint(issued.cert_der().as_ref()).unwrap();
        (issued, fp)
    }

    /// Adds `user` (when new) and binds a new device to it.
    pub fn enroll(&self, user: &str, device: &str) -> Enrolled {
        let totp = match self.registry.user(user).unwrap() {
            Some(u) => u.totp.unwrap(),
            None => self.add_user(user),
        };
        let (issued, fingerprint) = self.issue(device);
        self.registry
            .bind_device(device, user, &fingerprint, SystemClock.now_ms())
            .unwrap();
        Enrolled {
            user: user.to_owned(),
            totp,
            device: issued,
            fingerprint,
        }
    }

    pub fn tls_config(&self, device: &Issued, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        portcullis::tls::client_config(
            &[self.ca.cert_der()],
            vec![device.cert_der()],
            device.key_der(),
            alpn,
        )
        .unwrap()
    }

    /// A client builder for the device, as `user`, for a test that sets more (a clock).
    pub fn client_builder(
        &self,
        device: &Issued,
        user: &str,
        source: CodeSource,
    ) -> portcullis::client::ClientBuilder {
        Client::builder()
            .tls_config(self.tls_config(device, &[ALPN_PCS1]))
            .server_name("localhost")
            .user(user)
            .code_source(source)
    }

    /// A Portcullis client for the device, as `user`.
    pub fn client_as(&self, device: &Issued, user: &str, source: CodeSource) -> Client {
        self.client_builder(device, user, source).build().unwrap()
    }

    /// A Portcullis client of an enrolled device whose clock is `clock`.
    pub fn client_with_clock(
        &self,
        enrolled: &Enrolled,
        source: CodeSource,
        clock: Arc<dyn Clock>,
    ) -> Client {
        self.client_builder(&enrolled.device, &enrolled.user, source)
            .clock(clock)
            .build()
            .unwrap()
    }

    pub fn client(&self, enrolled: &Enrolled, source: CodeSource) -> Client {
        self.client_as(&enrolled.device, &enrolled.user, source)
    }

    /// A Portcullis client of an enrolled device whose codes come from the user's secret.
    pub fn secret_client(&self, enrolled: &Enrolled) -> Client {
        self.client(enrolled, CodeSource::secret(enrolled.totp.clone()))
    }

    /// A TLS 1.2-only client config with the device certificate, trusting the server's CA and
    /// offering ALPN `portcullis/1` (the server must refuse it).
    pub fn tls12_config(&self, device: &Issued) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![device.cert_der()], device.key_der())
            .unwrap();
        config.alpn_protocols = vec![ALPN_PCS1.to_vec()];
        Arc::new(config)
    }

    /// A server config of the server's CA for localhost, asking for a client certificate of
    /// that CA and offering the ALPN ids `alpn` (for stand-ins: proxies, other servers).
    pub fn server_tls(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let cert = self
            .ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        portcullis::tls::server_config(
            vec![cert.cert_der()],
            cert.key_der(),
            &[self.ca.cert_der()],
            alpn,
        )
        .unwrap()
    }

    /// A raw TLS connection with the device certificate and the given ALPN ids.
    pub async fn raw_tls(&self, device: &Issued, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.try_raw_tls(device, alpn).await.unwrap()
    }

    /// The same, returning a failed handshake.
    pub async fn try_raw_tls(
        &self,
        device: &Issued,
        alpn: &[&[u8]],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(self.tls_config(device, alpn));
        let tcp = TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    /// One Say call with the text `hello` over a new lazy channel of `client`.
    pub async fn say(&self, client: &Client) -> Result<SayReply, tonic::Status> {
        let channel = client.connect_lazy(&self.addr_str()).unwrap();
        EchoClient::new(channel)
            .say(SayRequest {
                text: "hello".into(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// The TOTP config the tests give `user`: a secret derived from the name, 6 digits, SHA1, 30 s.
pub fn totp_of(user: &str) -> TotpConfig {
    TotpConfig::new(
        format!("secret-of-{user:0>12}").into_bytes(),
        6,
        TotpAlgorithm::Sha1,
        30,
    )
    .unwrap()
}

/// A code source that answers `code()` and counts how often it was asked.
pub fn counting_codes(
    code: impl Fn() -> String + Send + Sync + 'static,
) -> (CodeSource, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let source = CodeSource::callback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(code())
    });
    (source, asked)
}

/// The current code of a TOTP config.
pub fn current_code(totp: &TotpConfig) -> String {
    totp.generate(SystemClock.now_ms() / 1000)
}

/// A code that is certainly not accepted now: the current code's digits shifted by one.
pub fn wrong_code(totp: &TotpConfig) -> String {
    wrong_code_at(totp, SystemClock.now_ms())
}

/// A code that is certainly not accepted at `now_ms`: none of the codes of the step of
/// `now_ms` and the steps either side of it.
pub fn wrong_code_at(totp: &TotpConfig, now_ms: u64) -> String {
    let now = now_ms / 1000;
    let valid: Vec<String> = (0..3).map(|i| totp.generate(now - 30 + i * 30)).collect();
    (0u32..)
        .map(|n| format!("{:06}", (n * 7919) % 1_000_000))
        .find(|c| !valid.contains(c))
        .unwrap()
}

/// The exporter of a client connection.
pub fn exporter(tls: &TlsStream<TcpStream>) -> [u8; 32] {
    portcullis::tls::exporter(tls.get_ref().1).unwrap()
}

/// A Prefix for a raw connection, with a fresh nonce and the connection's binding.
pub fn prefix(tls: &TlsStream<TcpStream>, user: &str, factor: Factor) -> Prefix {
    let mut nonce = [0u8; 16];
    portcullis::core::Random::fill(&portcullis::core::SystemRandom::new(), &mut nonce).unwrap();
    Prefix {
        user: user.to_owned(),
        factor,
        nonce,
        time_ms: SystemClock.now_ms(),
        binding: exporter(tls),
        agent: Some("portcullis-tests".into()),
    }
}

/// Reads exactly one Verdict (from a connection or its read half).
pub async fn read_verdict(tls: &mut (impl AsyncRead + Unpin)) -> Verdict {
    try_read_verdict(tls).await.expect("a whole Verdict")
}

/// Sends raw bytes and returns the Verdict the server answers.
pub async fn send_raw(tls: &mut TlsStream<TcpStream>, bytes: &[u8]) -> Verdict {
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    read_verdict(tls).await
}

/// Reads until the server closes; returns how many bytes came (Ok) or the error.
pub async fn read_to_close(tls: &mut TlsStream<TcpStream>) -> Result<usize, std::io::Error> {
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => Ok(rest.len()),
        Ok(Err(e)) => {
            if rest.is_empty() {
                Err(e)
            } else {
                Ok(rest.len())
            }
        }
        Err(_) => panic!("the server did not close the connection within 5 s"),
    }
}

/// A test server on a given CA and registry, whose builder the test shapes (limits, clock);
/// also returns the server handle, for its gauges.
pub async fn start_custom(
    ca: DevCa,
    registry: Arc<dyn Registry>,
    configure: impl FnOnce(portcullis::server::Builder) -> portcullis::server::Builder,
) -> (TestServer, PortcullisServer) {
    start_layered(ca, registry, configure, None).await
}

/// A test server on a new CA and an empty memory registry, whose builder the test shapes;
/// also returns the server handle, for its gauges.
pub async fn start_configured(
    configure: impl FnOnce(portcullis::server::Builder) -> portcullis::server::Builder,
) -> (TestServer, PortcullisServer) {
    let ca = DevCa::generate("test CA").unwrap();
    start_custom(ca, Arc::new(MemoryRegistry::new()), configure).await
}

/// A test server on a given CA and registry whose Echo service sits behind a [`PolicyLayer`]
/// applying `policy` (TOML); the gate and the layer share `clock`.
pub async fn start_with_policy(
    ca: DevCa,
    registry: Arc<dyn Registry>,
    policy: &str,
    clock: Arc<dyn Clock>,
) -> TestServer {
    let policy = Policy::from_toml_str(policy).unwrap();
    let layer = PolicyLayer::new(policy, clock.clone());
    let configure = |builder: portcullis::server::Builder| builder.clock(clock);
    start_layered(ca, registry, configure, Some(layer)).await.0
}

/// [`start_custom`], with `policy` (when given) between the Portcullis layer and the service.
async fn start_layered(
    ca: DevCa,
    registry: Arc<dyn Registry>,
    configure: impl FnOnce(portcullis::server::Builder) -> portcullis::server::Builder,
    policy: Option<PolicyLayer>,
) -> (TestServer, PortcullisServer) {
    let server_cert = ca
        .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let builder = PortcullisServer::builder()
        .identity(
            vec![server_cert.cert_der()],
            server_cert.key_der(),
            &[ca.cert_der()],
        )
        .unwrap()
        .registry(registry.clone());
    let portcullis = configure(builder).build().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = CountingEcho::default();
    let calls = echo.calls.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = portcullis.incoming(listener);
    let serving = portcullis.clone();
    let task = tokio::spawn(async move {
        serving
            .server()
            .layer(tower::util::option_layer(policy))
            .add_service(EchoServer::new(echo))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let server = TestServer {
        addr,
        registry,
        ca,
        calls,
        shutdown: Some(tx),
        task: Some(task),
    };
    (server, portcullis)
}

/// A copy of a CA (same certificate, same key), for a server restarted on the same PKI.
pub fn same_ca(ca: &DevCa) -> DevCa {
    DevCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap()
}

/// A TLS connection to `addr` with any client configuration (TLS 1.2 peers, odd certificates).
pub async fn tls_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Reads one Verdict, or `None` when the connection ends (or fails) before a whole one came.
pub async fn try_read_verdict(tls: &mut (impl AsyncRead + Unpin)) -> Option<Verdict> {
    let mut reader = FrameReader::new(FrameKind::Verdict);
    loop {
        let want = reader.unfilled().len();
        tls.read_exact(reader.unfilled()).await.ok()?;
        if reader.filled(want).ok()? == Progress::Done {
            return Verdict::decode_body(reader.body()).ok();
        }
    }
}
