//! # portcullis-server
//!
//! Puts the Portcullis gate in front of a tonic server. Every connection must complete a TLS 1.3
//! handshake with a client certificate, negotiate ALPN `portcullis/1`, and send a Prefix that
//! passes the ordered checks of PROTOCOL.md section 5 (channel binding, clock skew, device
//! binding, lockout, nonce, TOTP code or session ticket). Connections that fail get a Verdict
//! with a stable reason and are closed before one byte of HTTP/2 is parsed; the others are
//! handed to tonic at the first byte after the Prefix, and every request on them carries an
//! [`AuthContext`].
//!
//! A tonic server changes a few lines, not its services:
//!
//! ```no_run
//! # async fn run(registry: std::sync::Arc<dyn portcullis_core::Registry>,
//! #              tls: std::sync::Arc<rustls::ServerConfig>) -> Result<(), Box<dyn std::error::Error>> {
//! # use tonic_health::server::health_reporter;
//! # let (_, my_service) = health_reporter();
//! use portcullis_server::PortcullisServer;
//!
//! let portcullis = PortcullisServer::builder()
//!     .tls_config(tls)          // portcullis_tls::server_config(..), ALPN portcullis/1
//!     .registry(registry)       // e.g. portcullis_store::SqliteRegistry
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! portcullis
//!     .server()                 // tonic's Server::builder() with the Portcullis layer
//!     .add_service(my_service)
//!     .serve_with_incoming(portcullis.incoming(listener))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! ## Standard gRPC clients
//!
//! With [`Builder::standard_clients`] the server also offers ALPN `h2` on the same port, for
//! gRPC clients that cannot send a Prefix (grpcio, grpc-go, grpcurl, ...): such a connection is
//! let through only when its device certificate is bound and the device holds a live session
//! that a Portcullis client earned with a code; otherwise every request on it is answered with
//! a gRPC status naming cause and fix. See the [`standard`] module.
//!
//! ## Limits
//!
//! The accept path is bounded: an absolute deadline per connection
//! ([`Builder::deadline`], 10 s), a cap on connections being authenticated at once
//! ([`Builder::max_pending`], 1024; beyond it OVERLOADED), a rate limit per source address
//! ([`Builder::rate_limit`], 20 a second with bursts of 40; beyond it RATE_LIMITED), a small
//! budget of TLS handshakes for those early refusals ([`Builder::refusal_budget`], 64; beyond
//! it the connection is closed at TCP accept), and a Prefix of at most 4096 bytes. The
//! [`limits`] module explains each.
//!
//! ## Audit trail and metrics
//!
//! Every connection attempt ends in exactly one [`AuditRecord`] (a `tracing` event on the
//! target `portcullis::audit`, and each [`AuditSink`] of [`Builder::audit_sink`], such as the
//! JSON-lines file of [`Builder::audit_log`]); see the [`audit`] module. The same events feed
//! Prometheus metrics ([`Builder::metrics_listen`], [`PortcullisServer::metrics_handler`]); see
//! the [`metrics`] module.
//!
//! ## Health checks
//!
//! Probes have no device certificate, so they cannot pass the gate. With
//! [`Builder::health_listen`] the server answers `grpc.health.v1.Health` (plaintext HTTP/2)
//! and `GET /healthz` (HTTP/1.1) on an address of its own, without TLS or authentication, and
//! says there only whether it is serving: `NOT_SERVING` (503) while its registry does not
//! answer reads. [`PortcullisServer::health_service`] serves the same status behind the gate.
//! See the [`health`] module.

mod acceptor;
pub mod audit;
mod context;
mod dir;
pub mod health;
mod layer;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod revocation;
mod stamp;
pub mod standard;
mod stream;
mod tickets;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::codec::ALPN_PCS1;
use portcullis_core::{
    Clock, ConnectionPolicy, Gate, GateConfig, Random, Registry, SystemClock, SystemRandom,
    TicketKey, TicketRing,
};
use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};

pub use acceptor::Incoming;
pub use audit::{
    AuditFsync, AuditLogError, AuditOutcome, AuditRecord, AuditSink, DEFAULT_AUDIT_FSYNC,
    JsonLinesFile,
};
pub use context::{AuthContext, PortcullisConnectInfo};
pub use health::{HealthStatus, NotServingCause};
pub use layer::{AuthLayer, AuthService};
pub use limits::{DEFAULT_MAX_PENDING, DEFAULT_RATE_LIMIT, DEFAULT_REFUSAL_BUDGET, RateLimit};
pub use metrics::{MetricsEndpoint, MetricsService};
pub use portcullis_proxy::TrustedProxies;
pub use stream::AuthenticatedStream;
pub use tickets::TICKET_KEYS_CHECK_INTERVAL;
/// The `tonic-health` crate, whose service [`PortcullisServer::health_service`] returns: use it
/// for the client and the status types at the same version.
pub use tonic_health;

/// The layers [`PortcullisServer::server`] puts in front of every service: the Portcullis
/// layer, then the per-method policy when there is one.
pub type ServerLayers =
    Stack<tower::util::Either<policy::PolicyLayer, Identity>, Stack<AuthLayer, Identity>>;

/// Why a server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A required setting is missing or a setting is out of range.
    #[error("server configuration: {0}")]
    Config(String),
    /// The TLS configuration could not be made.
    #[error(transparent)]
    Tls(#[from] portcullis_tls::TlsError),
    /// The audit log could not be opened.
    #[error(transparent)]
    AuditLog(#[from] AuditLogError),
    /// A directory made by `portcullis init` could not be used ([`Builder::dir`]); the
    /// message names the file and the cause.
    #[error("{0}")]
    Dir(String),
    /// A PEM file or text could not be read ([`Builder::identity_pem`]).
    #[error(transparent)]
    Pem(#[from] portcullis_tls::PemError),
    /// The metrics address could not be bound.
    #[error("{addr}: cannot listen for metrics: {source}")]
    MetricsListen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The health check address could not be bound.
    #[error("{addr}: cannot listen for health checks: {source}")]
    HealthListen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// The default absolute deadline for TLS handshake plus Prefix (PROTOCOL.md section 5).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The longest deadline the builder takes.
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);

/// How long [`PortcullisServer::serve_with_grace`] waits for tonic to end after it closed the
/// connections left at the end of the grace period.
pub const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Builds a [`PortcullisServer`].
pub struct Builder {
    tls: Option<Arc<rustls::ServerConfig>>,
    registry: Option<Arc<dyn Registry>>,
    config: GateConfig,
    deadline: Duration,
    ticket_key: Option<TicketRing>,
    ticket_files: Option<Arc<tickets::TicketFiles>>,
    clock: Arc<dyn Clock>,
    rng: Arc<dyn Random>,
    policy: Option<Arc<dyn ConnectionPolicy>>,
    method_policy: Option<policy::Policy>,
    blocking_registry: bool,
    max_pending: usize,
    refusal_budget: usize,
    rate_limit: Option<RateLimit>,
    audit_sinks: Vec<Arc<dyn AuditSink>>,
    metrics_listen: Option<SocketAddr>,
    health_listen: Option<SocketAddr>,
    health_services: Vec<String>,
    revocation: revocation::Settings,
    standard_clients: bool,
    proxy_protocol: Option<TrustedProxies>,
    metrics_token: Option<zeroize::Zeroizing<String>>,
    max_pending_per_source: usize,
    hello_deadline: Duration,
    audit_required: bool,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("deadline", &self.deadline)
            .field("max_pending", &self.max_pending)
            .field("refusal_budget", &self.refusal_budget)
            .field("rate_limit", &self.rate_limit)
            .field("audit_sinks", &self.audit_sinks.len())
            .field("metrics_listen", &self.metrics_listen)
            .field("health_listen", &self.health_listen)
            .field("health_services", &self.health_services)
            .field("revocation", &self.revocation)
            .field("standard_clients", &self.standard_clients)
            .field("proxy_protocol", &self.proxy_protocol)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn new() -> Self {
        Self {
            tls: None,
            registry: None,
            config: GateConfig::default(),
            deadline: DEFAULT_DEADLINE,
            ticket_key: None,
            ticket_files: None,
            clock: Arc::new(SystemClock),
            rng: Arc::new(SystemRandom::new()),
            policy: None,
            method_policy: None,
            blocking_registry: false,
            max_pending: DEFAULT_MAX_PENDING,
            refusal_budget: DEFAULT_REFUSAL_BUDGET,
            rate_limit: Some(DEFAULT_RATE_LIMIT),
            audit_sinks: Vec::new(),
            metrics_listen: None,
            health_listen: None,
            health_services: Vec::new(),
            revocation: revocation::Settings::default(),
            standard_clients: false,
            proxy_protocol: None,
            metrics_token: None,
            max_pending_per_source: limits::DEFAULT_MAX_PENDING_PER_SOURCE,
            hello_deadline: limits::DEFAULT_HELLO_DEADLINE,
            audit_required: false,
        }
    }

    /// The rustls server configuration: TLS 1.3, client certificates required, ALPN
    /// `portcullis/1` (as made by `portcullis_tls::server_config`). Required, or use
    /// [`Builder::identity`].
    pub fn tls_config(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self.revocation.identity = None;
        self
    }

    /// Makes the TLS configuration from the server's certificate chain and key and the CA
    /// certificates that device certificates must chain to.
    pub fn identity(
        mut self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        client_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Self, ServerError> {
        self.tls = Some(portcullis_tls::server_config(
            chain.clone(),
            key.clone_key(),
            client_roots,
            &[ALPN_PCS1],
        )?);
        self.revocation.identity = Some(revocation::IdentityParts {
            chain,
            key,
            roots: client_roots.to_vec(),
        });
        Ok(self)
    }

    /// Checks client certificates against the certificate revocation lists in the file at
    /// `path` (PEM `X509 CRL` blocks, or the DER of one CRL), and loads it again whenever it
    /// changes (checked every [`revocation::CRL_POLL_INTERVAL`]): new connections use the new
    /// lists at once, and live connections whose certificate they list are closed. A listed
    /// certificate is refused also on a resumed TLS session. See the [`revocation`] module.
    ///
    /// Needs [`Builder::identity`] (the server makes its TLS configuration with a
    /// [`portcullis_tls::ReloadableClientVerifier`]), or [`Builder::client_verifier`]. The file
    /// is read by [`Builder::build`], which fails naming it when it cannot be used.
    pub fn crl_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.revocation.crl_file = Some(path.into());
        self
    }

    /// What a CRL past its nextUpdate means (default [`revocation::CrlStale::Refuse`]: new
    /// connections are refused with OVERLOADED until a current list is in the file; with
    /// `Warn` the lists stay in use). Either way the server logs it once per version of the
    /// file, naming it, and the metric `portcullis_crl_stale` says 1.
    pub fn crl_stale(mut self, rule: revocation::CrlStale) -> Self {
        self.revocation.crl_stale = rule;
        self
    }

    /// The client certificate verifier of the TLS configuration, when it is a
    /// [`portcullis_tls::ReloadableClientVerifier`] (made with
    /// [`portcullis_tls::server_config_with_verifier`] for [`Builder::tls_config`]; with
    /// [`Builder::identity`] the server makes the configuration around it). The server then
    /// checks every connection's certificate against its current CRLs after the handshake
    /// (resumed sessions included), and closes live connections whose certificate the lists
    /// name after [`portcullis_tls::ReloadableClientVerifier::set_crls`].
    pub fn client_verifier(
        mut self,
        verifier: Arc<portcullis_tls::ReloadableClientVerifier>,
    ) -> Self {
        self.revocation.verifier = Some(verifier);
        self
    }

    /// Whether a live connection is closed when the session ticket it holds or was given
    /// expires (default `false`: an accepted connection stays open, and only reconnects need a
    /// valid ticket or a new code). Checked every [`revocation::REVOCATION_CHECK_INTERVAL`].
    pub fn close_on_session_expiry(mut self, close: bool) -> Self {
        self.revocation.close_on_session_expiry = close;
        self
    }

    /// Runs the checks of live connections (revoked devices, sessions, roles) also whenever
    /// `wake` is notified, besides every [`revocation::REVOCATION_CHECK_INTERVAL`]: give it a
    /// registry's change feed (`portcullis_postgres::PgRegistry::listen_changes`), so that a
    /// revocation made through another instance closes connections here at once.
    pub fn revocation_wake(mut self, wake: Arc<tokio::sync::Notify>) -> Self {
        self.revocation.wake = Some(wake);
        self
    }

    /// Strict revocation: when the registry has not confirmed the live connections for
    /// `after` (its reads fail or take longer than [`revocation::ROUND_READ_TIMEOUT`]), every
    /// live connection is closed (fail closed: a revocation the server cannot see must not
    /// keep a connection open indefinitely). Off by default: live connections stay open while
    /// the registry is unreachable (new ones are refused with OVERLOADED either way). The
    /// clients' reads and writes then fail naming the cause.
    pub fn strict_revocation(mut self, after: Duration) -> Self {
        self.revocation.strict = Some(after);
        self
    }

    /// How often the checks of live connections run when nothing wakes them (default
    /// [`revocation::REVOCATION_CHECK_INTERVAL`], 250 ms; at least 10 ms). Longer rounds read the
    /// registry less often; with [`Builder::revocation_wake`], revocations still arrive at once.
    pub fn revocation_interval(mut self, interval: Duration) -> Self {
        self.revocation.interval = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// Whether standard gRPC clients are let in (default `false`; PROTOCOL.md section 7). When
    /// on, the TLS configuration also offers ALPN `h2`, after `portcullis/1` (so a Portcullis
    /// client still gets `portcullis/1`). A connection that negotiates `h2` sends no Prefix: it
    /// reaches the services only when its client certificate's device is bound, not revoked,
    /// its user not locked out, and the device holds a live session in the registry
    /// ([`portcullis_core::SessionStore::live_session_for_device`], earned by a Portcullis client's
    /// code); the connection policy applies too. Any other such connection gets, on every
    /// request, a gRPC status naming the cause and the fix, and is closed. Each attempt is
    /// audited (with `alpn` `h2`), and the deadline, [`Builder::max_pending`] and the rate
    /// limit apply as to any connection. See the [`standard`] module.
    pub fn standard_clients(mut self, on: bool) -> Self {
        self.standard_clients = on;
        self
    }

    /// PROXY protocol version 2 on the listener, for a server behind an L4 load balancer
    /// (HAProxy `send-proxy-v2`, an AWS NLB target group with proxy protocol v2, Envoy's
    /// `proxy_protocol` transport socket). Each connection must then come from one of
    /// `trusted` and start with a v2 header, read under [`limits::PROXY_HEADER_DEADLINE`] and
    /// at most [`portcullis_proxy::MAX_HEADER_LEN`] bytes; a connection from any other peer,
    /// or without a valid header, is closed before its TLS handshake (audited as
    /// `proxy_untrusted`, `proxy_header_refused` or `proxy_header_timeout`). The client
    /// address the header names is the one the rate limit counts, the audit record's `peer`
    /// (the balancer is its `proxy`), [`AuthContext::peer_addr`] and `request.remote_addr()`.
    /// A LOCAL header (the balancer's own health check) keeps the balancer's address. Off by
    /// default: a header is then never looked for.
    ///
    /// ```
    /// # fn f(builder: portcullis_server::Builder) -> portcullis_server::Builder {
    /// builder.proxy_protocol("10.0.0.0/8".parse().unwrap())
    /// # }
    /// ```
    pub fn proxy_protocol(mut self, trusted: TrustedProxies) -> Self {
        self.proxy_protocol = Some(trusted);
        self
    }

    /// The registry of users and devices. Required.
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The largest allowed difference between client and server clocks (default 60 s).
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.config.clock_skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Lifetime of session tickets (default 1 hour); `None` turns sessions off.
    pub fn session_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.config.session_ttl_ms = ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The absolute deadline for TLS handshake, Prefix and decision, counted from TCP accept
    /// (default 10 s, at most [`MAX_DEADLINE`]). A client that has not sent a whole Prefix by
    /// then (silent, or a byte a second) gets TIMEOUT; one that has not finished its TLS
    /// handshake is closed (no Verdict can be written before TLS is up). Each connection runs
    /// in a task of its own, so a slow one never holds up another.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The most connections being authenticated at once, from TCP accept until the Verdict is
    /// written and tonic has taken the connection (default [`DEFAULT_MAX_PENDING`], 1024; at
    /// least 1, at most [`limits::MAX_CONNECTION_CAP`]). A connection beyond the cap is
    /// refused with OVERLOADED and RETRY_AFTER, without its Prefix being read; see
    /// [`Builder::refusal_budget`] and the [`limits`] module.
    pub fn max_pending(mut self, max: usize) -> Self {
        self.max_pending = max;
        self
    }

    /// The most connections from one source (an IPv4 address, an IPv6 /64) being
    /// authenticated at once (default [`limits::DEFAULT_MAX_PENDING_PER_SOURCE`], 64; at least
    /// 1). Beyond it a connection from that source is refused with OVERLOADED at accept, so
    /// that a few sources holding connections open cannot fill [`Builder::max_pending`] for
    /// everyone. Raise it for many clients behind one NAT connecting at the same moment.
    pub fn max_pending_per_source(mut self, max: usize) -> Self {
        self.max_pending_per_source = max;
        self
    }

    /// How long a new connection has to send its first TLS byte (default
    /// [`limits::DEFAULT_HELLO_DEADLINE`], 2 s; never more than [`Builder::deadline`]). A
    /// connection silent that long is closed (`client_hello_timeout`) and gives its place in
    /// the caps back.
    pub fn hello_deadline(mut self, deadline: Duration) -> Self {
        self.hello_deadline = deadline;
        self
    }

    /// How many connections refused at accept (RATE_LIMITED, OVERLOADED) may be in their TLS
    /// handshake at once to receive their Verdict (default [`DEFAULT_REFUSAL_BUDGET`], 64;
    /// each under at most [`limits::REFUSAL_DEADLINE`]). Beyond it, such a connection is
    /// closed at TCP accept without a handshake; `0` always closes them.
    pub fn refusal_budget(mut self, budget: usize) -> Self {
        self.refusal_budget = budget;
        self
    }

    /// The rate limit on connection attempts per source address (default
    /// [`DEFAULT_RATE_LIMIT`]: 20 a second, bursts of 40); `None` turns it off. An attempt
    /// over the limit is refused with RATE_LIMITED and RETRY_AFTER (the seconds until the next
    /// permitted attempt) before its Prefix is read, so it costs no registry work and does not
    /// count towards any user's lockout. Clients behind one NAT share a budget: raise it for
    /// such deployments.
    ///
    /// ```
    /// # fn f(builder: portcullis_server::Builder) -> portcullis_server::Builder {
    /// use portcullis_server::RateLimit;
    /// builder.rate_limit(Some(RateLimit::new(5, 10)))
    /// # }
    /// ```
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// The most nonces remembered at once (default 1,000,000); a full store refuses new
    /// connections with OVERLOADED.
    pub fn nonce_capacity(mut self, capacity: usize) -> Self {
        self.config.nonce_capacity = capacity;
        self
    }

    /// All gate settings at once.
    pub fn gate_config(mut self, config: GateConfig) -> Self {
        self.config = config;
        self
    }

    /// The key that seals session tickets. Default: a new random key, so tickets do not
    /// survive a restart.
    pub fn ticket_key(mut self, key: TicketKey) -> Self {
        self.ticket_key = Some(key.into());
        self.ticket_files = None;
        self
    }

    /// Session-ticket keys as a ring: the current key seals new tickets, the retired ones open
    /// the tickets they sealed until those can no longer be valid ([`TicketRing`]).
    pub fn ticket_ring(mut self, ring: TicketRing) -> Self {
        self.ticket_key = Some(ring);
        self.ticket_files = None;
        self
    }

    /// Session-ticket keys from the directory `dir` (`ticket.key` and `ticket-retired/`, as
    /// `portcullis init` and `portcullis keys rotate-ticket` write them), loaded now and again
    /// within [`TICKET_KEYS_CHECK_INTERVAL`] of every change: a rotated key is in force without
    /// a restart. A directory without `ticket.key` is an error naming it.
    pub fn ticket_keys_from(mut self, dir: impl AsRef<Path>) -> Result<Self, ServerError> {
        let layout = portcullis_core::layout::DirLayout::new(dir);
        // The files' versions are taken before they are read: a change in between is loaded
        // by the first check.
        let files = Arc::new(tickets::TicketFiles::new(layout.clone()));
        let ring = layout
            .load_ticket_ring()
            .map_err(|e| ServerError::Dir(e.to_string()))?
            .ok_or_else(|| {
                ServerError::Dir(format!(
                    "{}: no ticket key; `portcullis init` makes one",
                    layout.ticket_key().display()
                ))
            })?;
        self.ticket_key = Some(ring);
        self.ticket_files = Some(files);
        Ok(self)
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A rule checked for every authenticated connection after the second factor: a refusal
    /// answers POLICY_DENIED with the policy's hint.
    ///
    /// ```
    /// # fn f(builder: portcullis_server::Builder) -> portcullis_server::Builder {
    /// use std::sync::Arc;
    /// builder.policy(Arc::new(|id: &portcullis_core::Identity| {
    ///     if id.user == "mallory" { Err("user mallory is suspended".into()) } else { Ok(()) }
    /// }))
    /// # }
    /// ```
    pub fn policy(mut self, policy: Arc<dyn ConnectionPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// A per-method policy (docs/POLICY.md: step-up, roles, user lists), checked call by call
    /// on the gate's clock: [`PortcullisServer::server`] puts its layer after the Portcullis
    /// layer, so that no service is reachable without it.
    ///
    /// ```
    /// # fn f(builder: portcullis_server::Builder) -> Result<portcullis_server::Builder, Box<dyn std::error::Error>> {
    /// use portcullis_server::policy::Policy;
    /// let policy = Policy::from_toml_str(
    ///     "[[rule]]\nservice = \"*\"\ndeny_users = [\"mallory\"]\n",
    /// )?;
    /// Ok(builder.method_policy(policy))
    /// # }
    /// ```
    pub fn method_policy(mut self, policy: policy::Policy) -> Self {
        self.method_policy = Some(policy);
        self
    }

    /// Whether the store's snapshot and commit block their thread for long (a synchronous store
    /// on a slow disk or a network). When set, each of the two runs on tokio's blocking pool, at
    /// the cost of a thread hand-off each. Default `false`: they run in the connection's task;
    /// the in-memory and SQLite stores answer in microseconds, and an asynchronous store's
    /// futures wait without blocking. Either way the deadline covers the decision up to its
    /// commit: a decision that outlives it commits nothing, and the client is told TIMEOUT.
    pub fn blocking_registry(mut self, blocking: bool) -> Self {
        self.blocking_registry = blocking;
        self
    }

    /// Adds a sink for the audit trail: it gets one [`AuditRecord`] per connection attempt
    /// (see the [`audit`] module). Sinks add up; records also go to `tracing` (target
    /// `portcullis::audit`) whether or not a sink is set.
    ///
    /// ```
    /// # fn f(builder: portcullis_server::Builder) -> portcullis_server::Builder {
    /// use std::sync::Arc;
    /// use portcullis_server::AuditRecord;
    /// builder.audit_sink(Arc::new(|record: &AuditRecord| println!("{}", record.to_json())))
    /// # }
    /// ```
    pub fn audit_sink(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit_sinks.push(sink);
        self
    }

    /// Refuse new connections with OVERLOADED (cause `audit_unavailable`) while an audit sink
    /// cannot keep its records ([`AuditSink::healthy`]: a full disk, a failed sync), so that
    /// no connection is let in without its record. Off by default: the records that cannot be
    /// written are counted (`portcullis_audit_write_failures_total`) and the gate goes on. The
    /// refusals are audited too, so the first record that can be written again lets the next
    /// connections in.
    pub fn audit_required(mut self, required: bool) -> Self {
        self.audit_required = required;
        self
    }

    /// Appends the audit trail to the file at `path`, one JSON line per connection attempt
    /// (a [`JsonLinesFile`]: created with mode 0600 when new, each line written as soon as
    /// its attempt ends).
    pub fn audit_log(self, path: impl AsRef<Path>) -> Result<Self, ServerError> {
        let file = JsonLinesFile::create(path)?;
        Ok(self.audit_sink(Arc::new(file)))
    }

    /// Serves the metrics (see the [`metrics`] module) over HTTP at `http://ADDR/metrics`.
    /// The address is bound by [`Builder::build`] (port 0 picks a free port; read it with
    /// [`PortcullisServer::metrics_addr`]), and served from the first call of
    /// [`PortcullisServer::incoming`] for as long as that [`Incoming`] lives. Put it on an
    /// address only your monitoring reaches, and require a token with
    /// [`Builder::metrics_token`].
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// The bearer token the metrics need: every scrape of [`Builder::metrics_listen`]'s
    /// endpoint (and of [`PortcullisServer::metrics_handler`]) must send `Authorization:
    /// Bearer TOKEN`, or gets 401. The token is compared in constant time and never logged;
    /// it must be 16 to 256 visible ASCII characters ([`Builder::build`] refuses others).
    pub fn metrics_token(mut self, token: impl Into<String>) -> Self {
        self.metrics_token = Some(zeroize::Zeroizing::new(token.into()));
        self
    }

    /// Answers health checks at `ADDR`, outside the gate: `grpc.health.v1.Health` (`Check`,
    /// `Watch`) over plaintext HTTP/2 and `GET /healthz` over HTTP/1.1, on the same port, with
    /// no TLS and no authentication (see the [`health`] module). The status is `SERVING` (200)
    /// while the server's registry answers a read every [`health::PROBE_INTERVAL`], and
    /// `NOT_SERVING` (503) while it fails or does not answer within [`health::PROBE_TIMEOUT`].
    ///
    /// The address is bound by [`Builder::build`] (port 0 picks a free port; read it with
    /// [`PortcullisServer::health_addr`]), and served from the first call of
    /// [`PortcullisServer::incoming`] for as long as that [`Incoming`] lives. It tells anyone
    /// who reaches it only whether the server is serving; still, put it where only your probes
    /// reach.
    pub fn health_listen(mut self, addr: SocketAddr) -> Self {
        self.health_listen = Some(addr);
        self
    }

    /// A service name (as in `tonic::server::NamedService::NAME`, e.g. `my.package.v1.Greeter`)
    /// whose health is reported with the server's, besides the whole server (`""`). Names add
    /// up; a health check for a name not given gets `NOT_FOUND`.
    pub fn health_service_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !name.is_empty() && !self.health_services.contains(&name) {
            self.health_services.push(name);
        }
        self
    }

    /// Checks the settings and builds the server.
    pub fn build(self) -> Result<PortcullisServer, ServerError> {
        if let Some(token) = &self.metrics_token
            && (!(16..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ServerError::Config(
                "metrics token: use 16 to 256 visible ASCII characters".into(),
            ));
        }
        let tls = self
            .tls
            .ok_or_else(|| ServerError::Config("a TLS configuration is required".into()))?;
        let auditor = Arc::new(audit::Auditor::new(self.audit_sinks, self.clock.clone()));
        let (mut tls, revocation) = self.revocation.finish(tls, auditor.clone())?;
        if self.standard_clients && !tls.alpn_protocols.iter().any(|p| p == standard::ALPN_H2) {
            let mut config = (*tls).clone();
            config.alpn_protocols.push(standard::ALPN_H2.to_vec());
            tls = Arc::new(config);
        }
        if !tls.alpn_protocols.iter().any(|p| p == ALPN_PCS1) {
            return Err(ServerError::Config(
                "the TLS configuration must offer ALPN portcullis/1".into(),
            ));
        }
        if tls.max_early_data_size != 0 {
            return Err(ServerError::Config("0-RTT early data must be off".into()));
        }
        let registry = self
            .registry
            .ok_or_else(|| ServerError::Config("a registry is required".into()))?;
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(ServerError::Config(
                "the deadline must be above zero and at most 1 hour".into(),
            ));
        }
        if self.max_pending == 0 || self.max_pending > limits::MAX_CONNECTION_CAP {
            return Err(ServerError::Config(format!(
                "max_pending must be between 1 and {}",
                limits::MAX_CONNECTION_CAP
            )));
        }
        if self.refusal_budget > limits::MAX_CONNECTION_CAP {
            return Err(ServerError::Config(format!(
                "the refusal budget must be at most {}",
                limits::MAX_CONNECTION_CAP
            )));
        }
        let limiter = match self.rate_limit {
            None => None,
            Some(limit) => Some(limits::SourceLimiter::new(limit).ok_or_else(|| {
                ServerError::Config(
                    "the rate limit needs at least 1 attempt a second and a burst of at least 1"
                        .into(),
                )
            })?),
        };
        if self.config.nonce_capacity == 0 {
            return Err(ServerError::Config(
                "the nonce capacity must be above zero".into(),
            ));
        }
        let ticket_key = match self.ticket_key {
            Some(ring) => ring,
            None => TicketKey::generate(self.rng.as_ref())
                .map_err(|e| ServerError::Config(format!("ticket key: {e}")))?
                .into(),
        };
        let ticket_files = self.ticket_files;
        let metrics_listener = match self.metrics_listen {
            None => None,
            Some(addr) => {
                Some(bind_std(addr).map_err(|source| ServerError::MetricsListen { addr, source })?)
            }
        };
        let health_listener = match self.health_listen {
            None => None,
            Some(addr) => {
                Some(bind_std(addr).map_err(|source| ServerError::HealthListen { addr, source })?)
            }
        };
        let method_policy = self
            .method_policy
            .map(|p| policy::PolicyLayer::new(p, self.clock.clone()));
        let mut gate = Gate::new(self.config, registry, ticket_key, self.clock, self.rng);
        if let Some(policy) = self.policy {
            gate = gate.with_policy(policy);
        }
        Ok(PortcullisServer {
            method_policy,
            state: Arc::new(acceptor::AcceptState {
                gate: Arc::new(gate),
                tls: tokio_rustls::TlsAcceptor::from(tls),
                deadline: self.deadline,
                blocking_registry: self.blocking_registry,
                pending: Arc::new(tokio::sync::Semaphore::new(self.max_pending)),
                max_pending: self.max_pending,
                refusing: Arc::new(tokio::sync::Semaphore::new(self.refusal_budget)),
                refusal_budget: self.refusal_budget,
                limiter,
                auditor,
                revocation: Arc::new(revocation),
                standard_clients: self.standard_clients,
                proxy: self.proxy_protocol.map(Arc::new),
                purging: Default::default(),
                tickets: ticket_files,
                metrics_token: self.metrics_token,
                sources: Default::default(),
                max_pending_per_source: self.max_pending_per_source.max(1),
                hello_deadline: self.hello_deadline,
                audit_required: self.audit_required,
                pre_tls: Default::default(),
                next_pre_tls: Default::default(),
            }),
            metrics_addr: metrics_listener.as_ref().map(|(_, addr)| *addr),
            metrics_listener: Arc::new(Mutex::new(metrics_listener.map(|(l, _)| l))),
            health: Arc::new(health::HealthState::new(
                self.health_services,
                health_listener,
            )),
        })
    }
}

/// Binds `addr` for a listener that tokio will serve.
fn bind_std(addr: SocketAddr) -> std::io::Result<(std::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// The gate in front of a tonic server: makes the stream of authenticated connections and the
/// layer that gives requests their [`AuthContext`]. Cheap to clone.
#[derive(Clone)]
pub struct PortcullisServer {
    state: Arc<acceptor::AcceptState>,
    /// The layer of [`Builder::method_policy`], which [`PortcullisServer::server`] puts in.
    method_policy: Option<policy::PolicyLayer>,
    /// The address bound for [`Builder::metrics_listen`].
    metrics_addr: Option<SocketAddr>,
    /// Its listener, until [`PortcullisServer::incoming`] starts serving it.
    metrics_listener: Arc<Mutex<Option<std::net::TcpListener>>>,
    /// The health status, its probe and the listener of [`Builder::health_listen`].
    health: Arc<health::HealthState>,
}

impl std::fmt::Debug for PortcullisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortcullisServer")
            .field("gate", &self.state.gate)
            .field("deadline", &self.state.deadline)
            .field("max_pending", &self.state.max_pending)
            .field("pending", &self.state.pending())
            .finish_non_exhaustive()
    }
}

impl PortcullisServer {
    /// A builder.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The gate (registry, nonce store, settings).
    pub fn gate(&self) -> &Arc<Gate> {
        &self.state.gate
    }

    /// How many connections are being authenticated now (at most
    /// [`Builder::max_pending`]).
    pub fn pending(&self) -> usize {
        self.state.pending()
    }

    /// How many connections refused at accept are in their TLS handshake or Verdict now (at
    /// most [`Builder::refusal_budget`]).
    pub fn refusing(&self) -> usize {
        self.state.refusing()
    }

    /// How many source addresses the rate limiter tracks now (0 when it is off; at most
    /// [`limits::RATE_LIMIT_MAX_SOURCES`]).
    pub fn rate_limited_sources(&self) -> usize {
        self.state.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Starts accepting on `listener`: each connection is authenticated in a task of its own,
    /// and those that pass come out of the returned stream, ready for tonic's
    /// `serve_with_incoming` / `serve_with_incoming_shutdown`. Must be called within a tokio
    /// runtime.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        revocation::start(&self.state.revocation, &self.state.gate);
        if let Some(files) = &self.state.tickets {
            tickets::start(files, &self.state.gate);
        }
        let mut incoming = acceptor::spawn_accept_loop(self.state.clone(), listener);
        incoming.metrics = self.start_metrics_listen();
        incoming.health = self.health.start(&self.state.gate);
        incoming
    }

    /// Starts the endpoint of [`Builder::metrics_listen`], once.
    fn start_metrics_listen(&self) -> Option<MetricsEndpoint> {
        let listener = match self.metrics_listener.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }?;
        let started =
            TcpListener::from_std(listener).and_then(|listener| self.serve_metrics(listener));
        match started {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                tracing::error!(error = %e, "cannot serve the metrics endpoint");
                None
            }
        }
    }

    /// How many authenticated connections tonic holds now (each is closed when its device or
    /// certificate is revoked: see the [`revocation`] module).
    pub fn live_connections(&self) -> usize {
        self.state.revocation.live_count()
    }

    /// The verifier whose certificate revocation lists the server checks, when it has one
    /// ([`Builder::crl_file`], [`Builder::client_verifier`]).
    pub fn client_verifier(&self) -> Option<&Arc<portcullis_tls::ReloadableClientVerifier>> {
        self.state.revocation.verifier()
    }

    /// Asks every audit sink to open its file again ([`JsonLinesFile::reopen`]): call it on
    /// SIGHUP after logrotate moved the file away.
    pub fn reopen_audit(&self) {
        self.state.auditor.reopen();
    }

    /// The address of the metrics endpoint of [`Builder::metrics_listen`], when set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address of the health endpoint of [`Builder::health_listen`], when set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.addr()
    }

    /// What the health probe found last (see the [`health`] module):
    /// [`HealthStatus::NotServing`] with [`NotServingCause::NotProbed`] until the probe has
    /// run, and while it does not run (it runs only with [`Builder::health_listen`] or
    /// [`PortcullisServer::health_service`]).
    pub fn health_status(&self) -> HealthStatus {
        self.health.status()
    }

    /// The `grpc.health.v1.Health` service with the status of the health probe (for the
    /// service `""` and each [`Builder::health_service_name`]), to add to the tonic server
    /// behind the gate: authenticated clients can then check or watch the server's health on
    /// the main port. Calling this starts the probe from the next [`PortcullisServer::incoming`]
    /// even without [`Builder::health_listen`]: call it before that. Requests are limited to
    /// 4 KiB.
    ///
    /// ```no_run
    /// # async fn run(portcullis: portcullis_server::PortcullisServer,
    /// #     listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
    /// let health = portcullis.health_service();
    /// portcullis
    ///     .server()
    ///     .add_service(health)
    ///     .serve_with_incoming(portcullis.incoming(listener))
    ///     .await
    /// # }
    /// ```
    pub fn health_service(
        &self,
    ) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
        self.health.wanted_service()
    }

    /// The metrics (see the [`metrics`] module) as OpenMetrics text, with the gauges read now.
    pub fn metrics_text(&self) -> String {
        use metrics::MetricsSource;
        self.state.metrics().encode(&self.state.gauges())
    }

    /// A `tower::Service` answering `GET` requests with the metrics, to mount in an HTTP server
    /// of your own (content type [`metrics::METRICS_CONTENT_TYPE`]).
    pub fn metrics_handler(&self) -> MetricsService {
        MetricsService::new(self.state.clone())
    }

    /// Serves the metrics at `/metrics` on `listener` until the returned endpoint is dropped.
    /// Must be called within a tokio runtime.
    pub fn serve_metrics(&self, listener: TcpListener) -> std::io::Result<MetricsEndpoint> {
        metrics::spawn_endpoint(self.metrics_handler(), listener)
    }

    /// Closes every authenticated connection now: their reads and writes fail, so tonic drops
    /// them, also those in the middle of a call. Returns how many were open. This ends a
    /// graceful shutdown whose grace period is over; [`PortcullisServer::serve_with_grace`]
    /// calls it.
    pub fn close_connections(&self) -> usize {
        self.state.revocation.close_all()
    }

    /// Serves with a bounded graceful shutdown. `serve` receives the shutdown signal to hand to
    /// tonic's `serve_with_incoming_shutdown` and returns tonic's future. Once `signal`
    /// resolves, the server stops accepting and open connections may finish their calls for at
    /// most `grace`; those still open then are closed ([`PortcullisServer::close_connections`])
    /// so that an idle or stuck client cannot keep the server from stopping. Returns tonic's
    /// result (`Ok` when the connections were closed after the grace period and tonic did not
    /// end within [`SHUTDOWN_CLOSE_WAIT`] after that).
    ///
    /// ```no_run
    /// # async fn run(portcullis: portcullis_server::PortcullisServer,
    /// #     listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
    /// use std::time::Duration;
    /// # let service = tonic_health::server::health_reporter().1;
    /// portcullis
    ///     .serve_with_grace(
    ///         |stop| {
    ///             portcullis
    ///                 .server()
    ///                 .add_service(service)
    ///                 .serve_with_incoming_shutdown(portcullis.incoming(listener), stop)
    ///         },
    ///         async {
    ///             let _ = tokio::signal::ctrl_c().await;
    ///         },
    ///         Duration::from_secs(10),
    ///     )
    ///     .await
    /// # }
    /// ```
    pub async fn serve_with_grace<S, E>(
        &self,
        serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> S,
        signal: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Result<(), E>
    where
        S: Future<Output = Result<(), E>>,
    {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let stop = {
            let stopping = stopping.clone();
            Box::pin(async move {
                signal.await;
                tracing::info!("shutting down: no new connections");
                stopping.notify_one();
            })
        };
        let serving = serve(stop);
        tokio::pin!(serving);
        tokio::select! {
            served = &mut serving => return served,
            () = stopping.notified() => {}
        }
        if let Ok(served) = tokio::time::timeout(grace, &mut serving).await {
            return served;
        }
        let closed = self.close_connections();
        tracing::warn!(
            closed,
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "connections still open after the grace period: closed"
        );
        tokio::time::timeout(SHUTDOWN_CLOSE_WAIT, &mut serving)
            .await
            .unwrap_or(Ok(()))
    }

    /// The layer for tonic's `Server::layer` that gives every request its [`AuthContext`].
    pub fn layer(&self) -> AuthLayer {
        AuthLayer
    }

    /// `tonic::transport::Server::builder()` with [`PortcullisServer::layer`] in place, and
    /// after it the layer of [`Builder::method_policy`] when one was given: add services and
    /// serve with [`PortcullisServer::incoming`].
    pub fn server(&self) -> tonic::transport::Server<ServerLayers> {
        tonic::transport::Server::builder()
            .layer(AuthLayer)
            .layer(tower::util::option_layer(self.method_policy.clone()))
    }
}
