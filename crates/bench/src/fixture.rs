//! The servers and clients of the handshake benchmark: one of each scenario, on loopback, with
//! the same certificates and key types everywhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portcullis_client::{Client, CodeSource, PortcullisChannel};

use portcullis_core::codec::ALPN_PCS1;
use portcullis_core::{
    Admin, Clock, DeviceFingerprint, Registry, SystemClock, SystemRandom, TotpAlgorithm, TotpConfig,
};
use portcullis_server::PortcullisServer;
use portcullis_store::SqliteRegistry;
use portcullis_tls::devpki::{DevCa, Issued};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig};

use super::BenchError;
use portcullis::demo::{self, Echo, EchoClient, EchoServer, SayReply, SayRequest};

/// Users kept for session clients (one per address and resumption setting).
const SESSION_USERS: usize = 6;

/// A channel of any scenario: stock tonic or Portcullis.
#[derive(Clone)]
pub enum BenchChannel {
    /// A tonic channel (h2c, TLS, mTLS).
    Plain(Channel),
    /// A Portcullis channel.
    Portcullis(PortcullisChannel),
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for BenchChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self {
            Self::Plain(c) => c.poll_ready(cx).map_err(Into::into),
            Self::Portcullis(c) => c.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        match self {
            Self::Plain(c) => {
                let f = c.call(request);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Self::Portcullis(c) => Box::pin(c.call(request)),
        }
    }
}

/// A connection scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Plain tonic, no TLS: the floor.
    H2c,
    /// Stock tonic, server TLS only.
    Tls,
    /// Stock tonic, client certificates verified, an interceptor maps the certificate to a user.
    Mtls,
    /// `Mtls` on a resumed TLS session.
    MtlsResumed,
    /// Portcullis: full handshake and a Prefix with a TOTP code.
    PortcullisTotp,
    /// Portcullis: full handshake and a Prefix with a session ticket.
    PortcullisSession,
    /// `PortcullisSession` on a resumed TLS session.
    PortcullisSessionResumed,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 7] = [
        Self::H2c,
        Self::Tls,
        Self::Mtls,
        Self::MtlsResumed,
        Self::PortcullisTotp,
        Self::PortcullisSession,
        Self::PortcullisSessionResumed,
    ];

    /// The scenario's name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::H2c => "h2c",
            Self::Tls => "tls",
            Self::Mtls => "mtls",
            Self::MtlsResumed => "mtls-resumed",
            Self::PortcullisTotp => "portcullis-totp",
            Self::PortcullisSession => "portcullis-session",
            Self::PortcullisSessionResumed => "portcullis-session-resumed",
        }
    }
}

/// A user of the benchmark with its TOTP secret and its own device.
pub(super) struct BenchUser {
    pub(super) name: String,
    pub(super) totp: TotpConfig,
    pub(super) device: Issued,
}

/// Adds `count` users to each of `registries`, `user00000` on, each with a new TOTP secret and
/// a device certificate from `ca` bound to it (the same in every registry).
pub(super) fn enroll_users(
    ca: &DevCa,
    registries: &[&dyn Admin],
    count: usize,
) -> Result<Vec<BenchUser>, BenchError> {
    let rng = SystemRandom::new();
    let now = SystemClock.now_ms();
    let mut users = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("user{i:05}");
        let totp = TotpConfig::generate_secret(&rng, 6, TotpAlgorithm::Sha1, 30)
            .map_err(BenchError::setup)?;
        for registry in registries {
            registry
                .add_user(&name, totp.clone(), now)
                .map_err(BenchError::setup)?;
        }
        let device = ca
            .issue_device(&format!("device{i:05}"))
            .map_err(BenchError::setup)?;
        let fp =
            portcullis_tls::fingerprint(device.cert_der().as_ref()).map_err(BenchError::setup)?;
        for registry in registries {
            registry
                .bind_device(&format!("device{i:05}"), &name, &fp, now)
                .map_err(BenchError::setup)?;
        }
        users.push(BenchUser { name, totp, device });
    }
    Ok(users)
}

/// The interceptor of the `mtls` baseline: maps the client certificate to a user through the
/// registry, as a tonic user would without Portcullis, and counts the connections in `counted`.
pub(super) fn mtls_interceptor(
    lookup: Arc<SqliteRegistry>,
    counted: Arc<AtomicUsize>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>
+ Clone
+ Send
+ Sync
+ 'static {
    move |mut req: tonic::Request<()>| {
        let certs = req
            .peer_certs()
            .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        let fingerprint = portcullis_tls::fingerprint(leaf.as_ref())
            .map_err(|_| tonic::Status::unauthenticated("unreadable certificate"))?;
        let device = lookup
            .device_by_fingerprint(&fingerprint)
            .map_err(|_| tonic::Status::unavailable("registry"))?
            .filter(|d| !d.is_revoked())
            .ok_or_else(|| tonic::Status::unauthenticated("unknown device"))?;
        counted.fetch_add(1, Ordering::Relaxed);
        req.extensions_mut().insert(BaselineUser {
            user: device.user,
            fingerprint,
        });
        Ok(req)
    }
}

/// The Portcullis server of the benchmark, on `registry`, without a per-source rate limit.
pub(super) fn portcullis_gate(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    ca_der: &rustls::pki_types::CertificateDer<'static>,
    registry: Arc<dyn Registry>,
) -> Result<PortcullisServer, BenchError> {
    PortcullisServer::builder()
        .identity(chain, key, std::slice::from_ref(ca_der))
        .map_err(BenchError::setup)?
        .registry(registry)
        // Every client of the benchmark is 127.0.0.1, opening thousands of connections a
        // second; the per-source limits would refuse them (stock tonic has none).
        .rate_limit(None)
        .max_pending_per_source(portcullis_server::limits::MAX_CONNECTION_CAP)
        .build()
        .map_err(BenchError::setup)
}

/// The user of the stock-tonic baseline, put into request extensions by its interceptor.
#[derive(Debug, Clone)]
struct BaselineUser {
    user: String,
    fingerprint: DeviceFingerprint,
}

/// The Echo service of the baselines: the same reply as the demo service, with the identity
/// the interceptor found.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BaselineEcho;

#[tonic::async_trait]
impl Echo for BaselineEcho {
    async fn say(
        &self,
        request: tonic::Request<SayRequest>,
    ) -> Result<tonic::Response<SayReply>, tonic::Status> {
        let who = request.extensions().get::<BaselineUser>().cloned();
        Ok(tonic::Response::new(SayReply {
            text: request.into_inner().text,
            user: who.as_ref().map(|w| w.user.clone()).unwrap_or_default(),
            device: who.map(|w| w.fingerprint.to_string()).unwrap_or_default(),
            auth_method: "mtls".into(),
        }))
    }
}

/// Everything the benchmark connects to, and the clients it connects with.
pub struct Fixture {
    _dir: tempfile::TempDir,
    users: Vec<BenchUser>,
    next_user: AtomicUsize,
    totp_users: usize,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    /// The servers' addresses.
    pub h2c: SocketAddr,
    /// Stock tonic, server TLS.
    pub tls: SocketAddr,
    /// Stock tonic, mutual TLS.
    pub mtls: SocketAddr,
    /// Portcullis.
    pub portcullis: SocketAddr,
    server_only_config: Arc<rustls::ClientConfig>,
    mtls_config: Arc<rustls::ClientConfig>,
    mtls_resumed_config: Arc<rustls::ClientConfig>,
    /// Session clients by (address, resumption): each holds the ticket of its own user, for
    /// the address it earned it at (a ticket only goes back where it came from).
    session_clients: std::sync::Mutex<std::collections::HashMap<(SocketAddr, bool), Client>>,
    /// Connections accepted by the Portcullis server's gate and by the baselines.
    pub accepted: Arc<AtomicUsize>,
}

/// Accepted sockets with TCP_NODELAY, as Portcullis sets it: tonic's `serve_with_incoming`
/// leaves the incoming sockets as they are, and without it delayed ACKs stall small writes.
pub(super) fn nodelay_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let tcp = accepted?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    })
}

pub(super) fn tls_client_config(
    ca: &rustls::pki_types::CertificateDer<'static>,
    device: Option<&Issued>,
    alpn: &[u8],
    resume: bool,
) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(BenchError::setup)?;
    let builder = rustls::ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(BenchError::setup)?
        .with_root_certificates(roots);
    let mut config = match device {
        Some(d) => builder
            .with_client_auth_cert(vec![d.cert_der()], d.key_der())
            .map_err(BenchError::setup)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// A tonic channel over TLS with a rustls client configuration of the benchmark's choosing
/// (with or without session resumption), to a stock tonic TLS server.
pub(super) fn tls_channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = tokio_rustls::TlsConnector::from(config);
    let service = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://localhost")
        .tcp_nodelay(true)
        .connect_with_connector_lazy(service)
}

impl Fixture {
    /// Makes a dev PKI, a SQLite registry with `totp_users` users (each with its own device,
    /// for single-use codes), and starts the four servers on `server_rt`. Portcullis runs on
    /// `gate_registry` when given (an empty registry: the same users are added to it), else on
    /// the SQLite one; the mTLS baseline always maps certificates through SQLite.
    pub fn start(
        server_rt: &tokio::runtime::Runtime,
        totp_users: usize,
        gate_registry: Option<Arc<dyn Registry>>,
    ) -> Result<Self, BenchError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().map_err(BenchError::setup)?;
        let ca = DevCa::generate("Portcullis bench CA").map_err(BenchError::setup)?;
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .map_err(BenchError::setup)?;
        let registry = Arc::new(
            SqliteRegistry::create(&dir.path().join("bench.db")).map_err(BenchError::setup)?,
        );
        let count = totp_users + 1 + SESSION_USERS;
        let (gate_registry, users): (Arc<dyn Registry>, _) = match gate_registry {
            None => (registry.clone(), enroll_users(&ca, &[&*registry], count)?),
            Some(gate) => {
                let users = enroll_users(&ca, &[&*registry, &*gate], count)?;
                (gate, users)
            }
        };
        let ca_der = ca.cert_der();
        let accepted = Arc::new(AtomicUsize::new(0));

        let (h2c, tls, mtls, portcullis) = server_rt
            .block_on(async {
                let h2c = TcpListener::bind("127.0.0.1:0").await?;
                let tls = TcpListener::bind("127.0.0.1:0").await?;
                let mtls = TcpListener::bind("127.0.0.1:0").await?;
                let pc = TcpListener::bind("127.0.0.1:0").await?;
                Ok::<_, std::io::Error>((h2c, tls, mtls, pc))
            })
            .map_err(BenchError::setup)?;
        let addrs = [
            h2c.local_addr(),
            tls.local_addr(),
            mtls.local_addr(),
            portcullis.local_addr(),
        ];
        let [h2c_addr, tls_addr, mtls_addr, pc_addr] = addrs.map(|a| a.map_err(BenchError::setup));
        let (h2c_addr, tls_addr, mtls_addr, pc_addr) = (h2c_addr?, tls_addr?, mtls_addr?, pc_addr?);

        // h2c: plain tonic.
        server_rt.spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(BaselineEcho))
                .serve_with_incoming(nodelay_incoming(h2c)),
        );
        // tls: stock tonic with its own ServerTlsConfig, server certificate only.
        let identity = Identity::from_pem(&server.cert_pem, &server.key_pem);
        let tls_server = tonic::transport::Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity.clone()))
            .map_err(BenchError::setup)?;
        server_rt.spawn(
            tls_server
                .clone()
                .add_service(EchoServer::new(BaselineEcho))
                .serve_with_incoming(nodelay_incoming(tls)),
        );
        // mtls: stock tonic verifying client certificates, and an interceptor that maps the
        // certificate to a user through the same registry Portcullis uses.
        let mut mtls_server = tonic::transport::Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(identity)
                    .client_ca_root(Certificate::from_pem(ca.cert_pem())),
            )
            .map_err(BenchError::setup)?;
        let interceptor = mtls_interceptor(registry.clone(), accepted.clone());
        server_rt.spawn(
            mtls_server
                .add_service(EchoServer::with_interceptor(BaselineEcho, interceptor))
                .serve_with_incoming(nodelay_incoming(mtls)),
        );
        // Portcullis, on the same registry, with the demo service.
        let gate = portcullis_gate(
            vec![server.cert_der()],
            server.key_der(),
            &ca_der,
            gate_registry,
        )?;
        let incoming = {
            let _guard = server_rt.enter();
            gate.incoming(portcullis)
        };
        server_rt.spawn(
            gate.server()
                .add_service(demo::service())
                .serve_with_incoming(incoming),
        );

        let baseline_device = &users[totp_users].device;
        Ok(Self {
            server_only_config: tls_client_config(&ca_der, None, b"h2", false)?,
            mtls_config: tls_client_config(&ca_der, Some(baseline_device), b"h2", false)?,
            mtls_resumed_config: tls_client_config(&ca_der, Some(baseline_device), b"h2", true)?,
            session_clients: Default::default(),
            totp_users,
            _dir: dir,
            users,
            next_user: AtomicUsize::new(0),
            ca_der,
            h2c: h2c_addr,
            tls: tls_addr,
            mtls: mtls_addr,
            portcullis: pc_addr,
            accepted,
        })
    }

    /// How many distinct TOTP users are left for `PortcullisTotp` connections.
    pub fn totp_users_left(&self) -> usize {
        let total = self.totp_users;
        total.saturating_sub(self.next_user.load(Ordering::Relaxed))
    }

    /// A channel for `scenario`, to `addr` (the scenario's server, or a proxy in front of it).
    pub fn channel(
        &self,
        scenario: Scenario,
        addr: SocketAddr,
    ) -> Result<BenchChannel, BenchError> {
        let pc = |client: &Client| {
            client
                .connect_lazy(&addr.to_string())
                .map(BenchChannel::Portcullis)
                .map_err(BenchError::run)
        };
        let plain = |c| Ok(BenchChannel::Plain(c));
        match scenario {
            Scenario::H2c => plain(
                Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(BenchError::run)?
                    .tcp_nodelay(true)
                    .connect_lazy(),
            ),
            Scenario::Tls => plain(tls_channel(addr, self.server_only_config.clone())),
            Scenario::Mtls => plain(tls_channel(addr, self.mtls_config.clone())),
            Scenario::MtlsResumed => plain(tls_channel(addr, self.mtls_resumed_config.clone())),
            Scenario::PortcullisTotp => {
                let i = self.next_user.fetch_add(1, Ordering::Relaxed);
                let total = self.totp_users;
                if i >= total {
                    return Err(BenchError::Run(format!(
                        "all {total} TOTP users were used (each code is good once per 30 s step)"
                    )));
                }
                let user = &self.users[i];
                let code = user.totp.generate(SystemClock.now_ms() / 1000);
                let client = Client::builder()
                    .tls_config(tls_client_config(
                        &self.ca_der,
                        Some(&user.device),
                        ALPN_PCS1,
                        false,
                    )?)
                    .server_name("localhost")
                    .user(user.name.clone())
                    .code_source(CodeSource::fixed(code))
                    .build()
                    .map_err(BenchError::run)?;
                pc(&client)
            }
            Scenario::PortcullisSession => pc(&self.session_client(addr, false)?),
            Scenario::PortcullisSessionResumed => pc(&self.session_client(addr, true)?),
        }
    }

    /// The session client for `addr`; a new one (with its own user) earns its ticket with a
    /// TOTP code on its first connection.
    fn session_client(&self, addr: SocketAddr, resume: bool) -> Result<Client, BenchError> {
        let mut clients = self
            .session_clients
            .lock()
            .map_err(|_| BenchError::Run("session clients lock poisoned".into()))?;
        if let Some(client) = clients.get(&(addr, resume)) {
            return Ok(client.clone());
        }
        let user = self
            .users
            .get(self.totp_users + 1 + clients.len())
            .ok_or_else(|| BenchError::Run("no session user left".into()))?;
        let config = tls_client_config(&self.ca_der, Some(&user.device), ALPN_PCS1, resume)?;
        let client = Client::builder()
            .tls_config(config)
            .server_name("localhost")
            .user(user.name.clone())
            .code_source(CodeSource::secret(user.totp.clone()))
            .build()
            .map_err(BenchError::setup)?;
        clients.insert((addr, resume), client.clone());
        Ok(client)
    }

    /// The server address of a scenario.
    pub fn addr(&self, scenario: Scenario) -> SocketAddr {
        match scenario {
            Scenario::H2c => self.h2c,
            Scenario::Tls => self.tls,
            Scenario::Mtls | Scenario::MtlsResumed => self.mtls,
            _ => self.portcullis,
        }
    }

    /// Connect, handshake and the first unary Echo call on a new connection, through `addr`.
    pub async fn connect_and_call_via(
        &self,
        scenario: Scenario,
        addr: SocketAddr,
    ) -> Result<(Duration, EchoClient<BenchChannel>), BenchError> {
        // The client is made before the clock starts (a real client is made once and connects
        // many times); a lazy channel does no I/O until the first call.
        let mut client = EchoClient::new(self.channel(scenario, addr)?);
        let started = Instant::now();
        client
            .say(SayRequest { text: "x".into() })
            .await
            .map_err(|s| BenchError::Run(format!("{}: {}", scenario.name(), s.message())))?;
        Ok((started.elapsed(), client))
    }

    /// Connect, handshake and the first unary Echo call on a new connection.
    pub async fn connect_and_call(&self, scenario: Scenario) -> Result<Duration, BenchError> {
        self.connect_and_call_via(scenario, self.addr(scenario))
            .await
            .map(|(d, _)| d)
    }

    /// Gives the session scenarios their tickets and the resumed ones their TLS sessions, for
    /// connections to their servers.
    pub async fn warm_up(&self) -> Result<(), BenchError> {
        for scenario in [
            Scenario::MtlsResumed,
            Scenario::PortcullisSession,
            Scenario::PortcullisSessionResumed,
        ] {
            self.warm_up_via(scenario, self.addr(scenario)).await?;
        }
        Ok(())
    }

    /// The same for connections through `addr` (a proxy).
    pub async fn warm_up_via(
        &self,
        scenario: Scenario,
        addr: SocketAddr,
    ) -> Result<(), BenchError> {
        for _ in 0..3 {
            self.connect_and_call_via(scenario, addr).await?;
        }
        Ok(())
    }
}
