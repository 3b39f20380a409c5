//! Metrics of the accept path, in the OpenMetrics text format that Prometheus scrapes.
//!
//! Made with [`prometheus_client`], the Prometheus project's Rust client. Every server keeps
//! its own registry (no global state), fed by the same events as the audit trail
//! ([`crate::audit`]):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `portcullis_connection_attempts_total{outcome,code,cause}` | counter | attempts by outcome (`accepted`, `rejected`, `closed`), reject code name and precise cause (both empty on accept) |
//! | `portcullis_live_connections_closed_total{cause}` | counter | live connections the server closed (`ended` audit records), by cause (`device_revoked`, `cert_expired`, `server_stopping`, ...) |
//! | `portcullis_audit_write_failures_total` | counter | audit records a sink could not keep (a full disk, a failed sync) |
//! | `portcullis_accept_duration_seconds` | histogram | from TCP accept to the decision, for every attempt that got a Verdict |
//! | `portcullis_decision_duration_seconds` | histogram | the decision alone (registry, nonce, code or ticket), for the same attempts |
//! | `portcullis_authenticating_connections` | gauge | connections being authenticated now ([`crate::PortcullisServer::pending`]) |
//! | `portcullis_refusing_connections` | gauge | early refusals in their TLS handshake now ([`crate::PortcullisServer::refusing`]) |
//! | `portcullis_live_nonces` | gauge | nonces the gate remembers now |
//! | `portcullis_nonce_capacity` | gauge | the most nonces it remembers before OVERLOADED |
//! | `portcullis_crl_stale` | gauge | 1 while the CRLs in force are past their nextUpdate ([`crate::Builder::crl_stale`]) |
//! | `portcullis_rate_limited_sources` | gauge | source addresses the rate limiter tracks now ([`crate::PortcullisServer::rate_limited_sources`]) |
//!
//! The labels take a bounded set of values: reject code names and the causes of
//! [`portcullis_core::Cause::as_str`] and of the accept path, never a user or an address.
//!
//! Three ways to read them:
//!
//! - [`crate::Builder::metrics_listen`]: the server answers `GET /metrics` on an address of
//!   its own while its [`crate::Incoming`] runs;
//! - [`crate::PortcullisServer::serve_metrics`]: the same on a listener you bound;
//! - [`crate::PortcullisServer::metrics_handler`], a `tower::Service` to mount in an HTTP server
//!   you already run, or [`crate::PortcullisServer::metrics_text`] for the text itself.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

/// The `Content-Type` of the metrics text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The most scrapes served at once by a metrics endpoint; further connections are closed.
const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// How long a scraper may take to send its request headers.
const SCRAPE_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection to a metrics endpoint may stay open.
const SCRAPE_CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// Upper bounds of the accept latency buckets, in seconds: 100 µs to 10 s.
const ACCEPT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Upper bounds of the decision time buckets, in seconds: 1 µs to 1 s.
const DECISION_BUCKETS: [f64; 13] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.01,
    0.1,
    1.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    outcome: &'static str,
    code: &'static str,
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    attempts: Family<AttemptLabels, Counter>,
    live_closed: Family<CauseLabel, Counter>,
    audit_failures: Counter,
    accept_seconds: Histogram,
    decision_seconds: Histogram,
    authenticating: Gauge,
    refusing: Gauge,
    nonces: Gauge,
    nonce_capacity: Gauge,
    sources: Gauge,
    crl_stale: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "connection_attempts",
            "Connection attempts by outcome, reject code and cause",
            attempts.clone(),
        );
        let live_closed = Family::<CauseLabel, Counter>::default();
        registry.register(
            "live_connections_closed",
            "Live connections closed by the server, by cause",
            live_closed.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit records a sink could not keep (its write or sync failed)",
            audit_failures.clone(),
        );
        let accept_seconds = Histogram::new(ACCEPT_BUCKETS);
        registry.register_with_unit(
            "accept_duration",
            "Time from TCP accept to the decision, for attempts that got a Verdict",
            Unit::Seconds,
            accept_seconds.clone(),
        );
        let decision_seconds = Histogram::new(DECISION_BUCKETS);
        registry.register_with_unit(
            "decision_duration",
            "Time the decision itself took, for attempts that got a Verdict",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let authenticating = gauge(
            &mut registry,
            "authenticating_connections",
            "Connections being authenticated now",
        );
        let refusing = gauge(
            &mut registry,
            "refusing_connections",
            "Connections refused at accept that are in their TLS handshake or Verdict now",
        );
        let nonces = gauge(&mut registry, "live_nonces", "Nonces remembered now");
        let nonce_capacity = gauge(
            &mut registry,
            "nonce_capacity",
            "The most nonces remembered at once",
        );
        let sources = gauge(
            &mut registry,
            "rate_limited_sources",
            "Source addresses the rate limiter tracks now",
        );
        let crl_stale = gauge(
            &mut registry,
            "crl_stale",
            "1 while the certificate revocation lists in force are past their nextUpdate",
        );
        Self {
            registry,
            attempts,
            live_closed,
            audit_failures,
            accept_seconds,
            decision_seconds,
            authenticating,
            refusing,
            nonces,
            nonce_capacity,
            sources,
            crl_stale,
        }
    }

    /// Counts a record a sink could not keep.
    pub(crate) fn audit_write_failed(&self) {
        self.audit_failures.inc();
    }

    /// Counts one live connection the server closed, by cause.
    pub(crate) fn observe_closed(&self, cause: &'static str) {
        self.live_closed.get_or_create(&CauseLabel { cause }).inc();
    }

    /// Counts one attempt.
    pub(crate) fn observe_attempt(&self, attempt: &Attempt) {
        let labels = AttemptLabels {
            outcome: attempt.outcome,
            code: attempt.code,
            cause: attempt.cause,
        };
        self.attempts.get_or_create(&labels).inc();
        if let Some(accept_us) = attempt.accept_us {
            self.accept_seconds.observe(accept_us as f64 / 1_000_000.0);
            if let Some(us) = attempt.decision_us {
                self.decision_seconds.observe(us as f64 / 1_000_000.0);
            }
        }
    }

    /// The metrics as OpenMetrics text, with `gauges` read just now.
    pub(crate) fn encode(&self, gauges: &Gauges) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.authenticating.set(gauge(gauges.authenticating));
        self.crl_stale.set(i64::from(gauges.crl_stale));
        self.refusing.set(gauge(gauges.refusing));
        self.nonces.set(gauge(gauges.nonces));
        self.nonce_capacity.set(gauge(gauges.nonce_capacity));
        self.sources.set(gauge(gauges.sources));
        let mut text = String::new();
        // Writing into a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// One connection attempt as the metrics count it (the audit trail makes it from its record).
pub(crate) struct Attempt {
    /// `accepted` or `rejected`.
    pub(crate) outcome: &'static str,
    /// The reject code's name, or empty.
    pub(crate) code: &'static str,
    /// The refusal's cause, or empty.
    pub(crate) cause: &'static str,
    /// The time to the Verdict, for attempts that got one.
    pub(crate) accept_us: Option<u64>,
    /// The time of the decision, when there was one.
    pub(crate) decision_us: Option<u64>,
}

/// The gauges, read at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gauges {
    /// Connections being authenticated.
    pub(crate) authenticating: usize,
    /// Whether the CRLs in force are past their nextUpdate.
    pub(crate) crl_stale: bool,
    /// Connections being refused in their TLS handshake.
    pub(crate) refusing: usize,
    /// Nonces remembered, and how many may be.
    pub(crate) nonces: usize,
    /// The nonce store's capacity.
    pub(crate) nonce_capacity: usize,
    /// Sources the rate limiter tracks.
    pub(crate) sources: usize,
}

/// What the metrics endpoint reads: the counters, the gauges now, and the token it asks for.
pub(crate) trait MetricsSource: Send + Sync {
    /// The counters.
    fn metrics(&self) -> &Metrics;
    /// The gauges, now.
    fn gauges(&self) -> Gauges;
    /// The bearer token scrapes must send, if any.
    fn metrics_token(&self) -> Option<&str>;
}

/// A `tower::Service` that answers every `GET` or `HEAD` request with the server's metrics
/// (and anything else with 405), whatever the path: mount it where you want it. Made by
/// [`crate::PortcullisServer::metrics_handler`]; cheap to clone.
#[derive(Clone)]
pub struct MetricsService {
    source: Arc<dyn MetricsSource>,
}

impl std::fmt::Debug for MetricsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsService").finish_non_exhaustive()
    }
}

impl MetricsService {
    pub(crate) fn new(source: Arc<dyn MetricsSource>) -> Self {
        Self { source }
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> String {
        self.source.metrics().encode(&self.source.gauges())
    }

    /// The answer to one request. With [`crate::Builder::metrics_token`], a request without
    /// `Authorization: Bearer TOKEN` (compared in constant time) gets 401.
    pub fn respond<B>(&self, request: &http::Request<B>) -> http::Response<String> {
        if let Some(token) = self.source.metrics_token()
            && !bearer_matches(request, token.as_bytes())
        {
            let mut response = plain(
                http::StatusCode::UNAUTHORIZED,
                "the metrics need Authorization: Bearer with the server's metrics token\n",
            );
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"portcullis metrics\""),
            );
            return response;
        }
        let method = request.method();
        if method != http::Method::GET && method != http::Method::HEAD {
            return plain(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are answered\n",
            );
        }
        let body = if method == http::Method::HEAD {
            String::new()
        } else {
            self.render()
        };
        let mut response = http::Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(METRICS_CONTENT_TYPE),
        );
        response
    }
}

/// Whether the request carries `Authorization: Bearer <token>`; the token is compared in
/// constant time.
fn bearer_matches<B>(request: &http::Request<B>, token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.len() && bool::from(given.ct_eq(token))
}

fn plain(status: http::StatusCode, text: &'static str) -> http::Response<String> {
    let mut response = http::Response::new(text.to_owned());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl<B> tower::Service<http::Request<B>> for MetricsService {
    type Response = http::Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(self.respond(&request)))
    }
}

/// An HTTP/1.1 endpoint that answers `GET /metrics` (404 for other paths). Made by
/// [`crate::PortcullisServer::serve_metrics`] or [`crate::Builder::metrics_listen`]; it stops,
/// and closes its listener and connections, when dropped.
///
/// One scrape per connection (no keep-alive); at most 16 connections at once, and when 16 are
/// open a new one closes the oldest, so that connections held open (idle, or sending nothing)
/// cannot keep a scraper out; each must send its request headers within 5 s and is closed after
/// 60 s.
#[derive(Debug)]
pub struct MetricsEndpoint {
    local_addr: SocketAddr,
    task: tokio::task::AbortHandle,
}

impl MetricsEndpoint {
    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `service` at `/metrics` on `listener`. Must be called within a tokio runtime.
pub(crate) fn spawn_endpoint(
    service: MetricsService,
    listener: TcpListener,
) -> io::Result<MetricsEndpoint> {
    let local_addr = listener.local_addr()?;
    let task = crate::limits::spawn_bounded_endpoint(
        listener,
        MAX_SCRAPE_CONNECTIONS,
        crate::limits::WhenFull::ShedOldest,
        "metrics",
        move |tcp| {
            let service = service.clone();
            async move {
                let answer = hyper::service::service_fn(move |request: http::Request<_>| {
                    let response = if request.uri().path() == "/metrics" {
                        service.respond(&request)
                    } else {
                        plain(http::StatusCode::NOT_FOUND, "the metrics are at /metrics\n")
                    };
                    std::future::ready(Ok::<_, Infallible>(response))
                });
                // One scrape per connection: none is kept open idle between scrapes.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(SCRAPE_HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), answer);
                let _ = tokio::time::timeout(SCRAPE_CONNECTION_LIMIT, connection).await;
            }
        },
    );
    Ok(MetricsEndpoint { local_addr, task })
}
