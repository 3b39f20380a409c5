//! Health checks outside the gate, for Kubernetes probes and load balancers.
//!
//! A probe cannot pass the gate: it has no device certificate and no second factor. With
//! [`crate::Builder::health_listen`] the server answers health checks on an address of its own,
//! in plaintext and without any authentication, and says there only whether it is serving:
//!
//! - `grpc.health.v1.Health` (`Check` and `Watch`, from the [`tonic_health`] crate) over
//!   HTTP/2 without TLS (h2c with prior knowledge), as Kubernetes `grpc` probes and
//!   `grpc-health-probe` speak it;
//! - `GET /healthz` over HTTP/1.1 (or HTTP/2), as `httpGet` probes speak it: `200 serving` or
//!   `503 not serving: <cause>`, one line of text.
//!
//! Both are told the same thing, by one probe: every [`PROBE_INTERVAL`] the server reads its
//! registry the way the gate reads it to decide a connection ([`portcullis_core::GateStore::snapshot`],
//! for a device fingerprint no certificate has), on tokio's blocking pool, and waits at most
//! [`PROBE_TIMEOUT`] for the answer. While the reads succeed the server is `SERVING`; a read
//! that fails, or does not answer in time, makes it `NOT_SERVING` (the cause is a
//! [`NotServingCause`]) until a read succeeds again. A read that never returns is not started
//! again while it hangs: the probe keeps one read in flight at most, and says `NOT_SERVING`
//! meanwhile. The status applies to the service `""` (the whole server) and to every name given
//! to [`crate::Builder::health_service_name`]; other names are `NOT_FOUND`, as the gRPC health
//! protocol asks. Changes are logged (target `portcullis_server::health`), with the store's
//! error; the endpoint itself names only the kind of failure, never the error text.
//!
//! `portcullis serve --health-listen ADDR` turns this on, and prints `health on HOST:PORT` after
//! its `listening on` line. Kubernetes probes then point at that port:
//!
//! ```yaml
//! readinessProbe:
//!   grpc: { port: 8081 }            # service "" by default; or set `service:`
//! livenessProbe:
//!   httpGet: { path: /healthz, port: 8081 }
//! ```
//!
//! The same `grpc.health.v1.Health` service can also be served behind the gate, to
//! authenticated clients, with [`crate::PortcullisServer::health_service`]; and
//! [`crate::PortcullisServer::health_status`] reads the status for an endpoint of your own.
//!
//! The probe and the endpoint run from the first call of [`crate::PortcullisServer::incoming`]
//! for as long as that [`crate::Incoming`] lives: when tonic stops, the health address stops
//! answering, and probes fail.
//!
//! The endpoint is bounded like the metrics endpoint: at most 64 connections at once (further
//! ones are closed at accept); a connection must send its first request within 5 s, is closed
//! when no request has been open on it for 30 s, and after 10 minutes in any case (a `Watch`
//! stream then ends and the client watches again); HTTP/1.1 request heads and HTTP/2 header
//! lists of at most 16 KiB, at most 16 streams at once per HTTP/2 connection, gRPC requests of
//! at most 4 KiB.
//!
//! ```no_run
//! # async fn run(registry: std::sync::Arc<dyn portcullis_core::Registry>,
//! #              tls: std::sync::Arc<rustls::ServerConfig>) -> Result<(), Box<dyn std::error::Error>> {
//! # let my_service = tonic_health::server::health_reporter().1;
//! use portcullis_server::PortcullisServer;
//!
//! let portcullis = PortcullisServer::builder()
//!     .tls_config(tls)
//!     .registry(registry)
//!     .health_listen("0.0.0.0:8081".parse()?)   // only the probes should reach it
//!     .health_service_name("my.package.v1.MyService")
//!     .build()?;
//! println!("health on {}", portcullis.health_addr().expect("set above"));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:50051").await?;
//! portcullis
//!     .server()
//!     .add_service(my_service)
//!     .serve_with_incoming(portcullis.incoming(listener))
//!     .await?;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming as RequestBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_core::{DeviceFingerprint, Gate, Need, SessionNeed};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::ServiceExt;

/// The path of the HTTP health check.
pub const HEALTHZ_PATH: &str = "/healthz";

/// How often the probe reads the registry.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long one read of the probe may take; a read still running then makes the server
/// `NOT_SERVING` ([`NotServingCause::RegistryTimeout`]).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most connections to the health endpoint at once; further ones are closed at accept.
const MAX_HEALTH_CONNECTIONS: usize = 64;
/// How long a new connection may take to send its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open with no request in flight.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay open at all.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// How long a connection told to shut down gracefully may take to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often a connection's timeouts are checked.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);
/// The largest HTTP/1.1 request head and HTTP/2 header list.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The most header fields in an HTTP/1.1 request.
const MAX_HEADERS: usize = 64;
/// The most HTTP/2 streams open at once on one connection.
const MAX_STREAMS: u32 = 16;
/// The largest gRPC request message (a health check request holds a service name).
const MAX_MESSAGE_BYTES: usize = 4096;

/// The paths of `grpc.health.v1.Health`.
const GRPC_HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The fingerprint the probe reads: all zeros, which no certificate's SHA-256 is known to have.
/// The read finds no device, and costs what the gate's read costs for an unknown device.
const PROBE_FINGERPRINT: DeviceFingerprint = DeviceFingerprint::from_bytes([0; 32]);

/// Whether the server can decide connections, as the last read of its registry found: what
/// the health endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// The registry answered the last read: `SERVING`, `200 serving`.
    Serving,
    /// The server cannot decide connections now: `NOT_SERVING`, `503 not serving: <cause>`.
    NotServing(NotServingCause),
}

impl HealthStatus {
    /// Whether this is [`HealthStatus::Serving`].
    pub fn is_serving(&self) -> bool {
        matches!(self, Self::Serving)
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serving => f.write_str("serving"),
            Self::NotServing(cause) => write!(f, "not serving: {cause}"),
        }
    }
}

/// Why the server reports `NOT_SERVING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotServingCause {
    /// The probe has not read the registry yet.
    NotProbed,
    /// The last read of the registry failed (the store returned an error, or panicked).
    RegistryFailed,
    /// The last read of the registry did not answer within [`PROBE_TIMEOUT`] (or has still not
    /// answered).
    RegistryTimeout,
}

impl NotServingCause {
    /// A stable name for logs and alerts: `not_probed`, `registry_failed`, `registry_timeout`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotProbed => "not_probed",
            Self::RegistryFailed => "registry_failed",
            Self::RegistryTimeout => "registry_timeout",
        }
    }
}

impl std::fmt::Display for NotServingCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotProbed => "the registry has not been read yet",
            Self::RegistryFailed => "the registry failed a read",
            Self::RegistryTimeout => "the registry did not answer a read in time",
        })
    }
}

/// The health of one server: the last status, the tonic-health reporter that serves it, and
/// the listener of [`crate::Builder::health_listen`] until it is served.
pub(crate) struct HealthState {
    reporter: HealthReporter,
    /// Service names reported besides `""`.
    services: Vec<String>,
    status: Mutex<HealthStatus>,
    /// Whether [`crate::PortcullisServer::health_service`] was called.
    probe_wanted: AtomicBool,
    probe_started: AtomicBool,
    listener: Mutex<Option<std::net::TcpListener>>,
    addr: Option<SocketAddr>,
}

impl HealthState {
    pub(crate) fn new(
        services: Vec<String>,
        listener: Option<(std::net::TcpListener, SocketAddr)>,
    ) -> Self {
        let addr = listener.as_ref().map(|(_, addr)| *addr);
        Self {
            reporter: HealthReporter::new(),
            services,
            status: Mutex::new(HealthStatus::NotServing(NotServingCause::NotProbed)),
            probe_wanted: AtomicBool::new(false),
            probe_started: AtomicBool::new(false),
            listener: Mutex::new(listener.map(|(l, _)| l)),
            addr,
        }
    }

    /// The address of the health listener, when one was bound.
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The last status.
    pub(crate) fn status(&self) -> HealthStatus {
        *lock(&self.status)
    }

    /// The `grpc.health.v1.Health` service of this server; the probe runs from the next call
    /// of [`HealthState::start`].
    pub(crate) fn wanted_service(&self) -> HealthServer<HealthService> {
        self.probe_wanted.store(true, Ordering::Release);
        self.grpc()
    }

    fn grpc(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Starts the probe and the endpoint, once, when either is wanted. Must be called within a
    /// tokio runtime.
    pub(crate) fn start(self: &Arc<Self>, gate: &Arc<Gate>) -> Option<HealthTasks> {
        let wanted = self.addr.is_some() || self.probe_wanted.load(Ordering::Acquire);
        if !wanted || self.probe_started.swap(true, Ordering::AcqRel) {
            return None;
        }
        let probe = tokio::spawn(probe(self.clone(), gate.clone())).abort_handle();
        let endpoint =
            lock(&self.listener).take().and_then(|listener| {
                match TcpListener::from_std(listener) {
                    Ok(listener) => Some(spawn_endpoint(self.clone(), listener)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve the health endpoint");
                        None
                    }
                }
            });
        Some(HealthTasks { probe, endpoint })
    }

    /// Records `status`, and tells the reporter when it changed (or when `always`).
    async fn publish(&self, status: HealthStatus, detail: Option<String>, always: bool) {
        let previous = std::mem::replace(&mut *lock(&self.status), status);
        if previous == status && !always {
            return;
        }
        match status {
            HealthStatus::Serving => tracing::info!("health: serving"),
            HealthStatus::NotServing(cause) => tracing::warn!(
                cause = cause.as_str(),
                error = detail.as_deref().unwrap_or(""),
                "health: not serving: {cause}"
            ),
        }
        let serving = if status.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", serving).await;
        for name in &self.services {
            self.reporter.set_service_status(name, serving).await;
        }
    }
}

/// The probe and the endpoint of one server; both stop when this is dropped.
#[derive(Debug)]
pub(crate) struct HealthTasks {
    probe: AbortHandle,
    endpoint: Option<AbortHandle>,
}

impl Drop for HealthTasks {
    fn drop(&mut self) {
        self.probe.abort();
        if let Some(endpoint) = &self.endpoint {
            endpoint.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One registry read at a time, every [`PROBE_INTERVAL`], each waited for at most
/// [`PROBE_TIMEOUT`].
async fn probe(health: Arc<HealthState>, gate: Arc<Gate>) {
    health
        .publish(
            HealthStatus::NotServing(NotServingCause::NotProbed),
            None,
            true,
        )
        .await;
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A read that outlived its timeout: no other is started until it has returned.
    let mut hanging: Option<JoinHandle<Result<(), String>>> = None;
    loop {
        tick.tick().await;
        let (status, detail) = match hanging.take() {
            Some(read) if !read.is_finished() => {
                hanging = Some(read);
                (
                    HealthStatus::NotServing(NotServingCause::RegistryTimeout),
                    Some("an earlier read has not returned".to_owned()),
                )
            }
            _ => read_registry(&gate, &mut hanging).await,
        };
        health.publish(status, detail, false).await;
    }
}

/// Reads the registry once, as the gate does for an unknown device.
async fn read_registry(
    gate: &Arc<Gate>,
    hanging: &mut Option<JoinHandle<Result<(), String>>>,
) -> (HealthStatus, Option<String>) {
    let store = gate.store().clone();
    let need = Need {
        fingerprint: PROBE_FINGERPRINT,
        secret: false,
        session: SessionNeed::None,
        now_ms: gate.clock().now_ms(),
    };
    let handle = tokio::runtime::Handle::current();
    // On the blocking pool: an embedded store does its work when the future is made, and a
    // store that blocks must not hold up a runtime thread.
    let mut read = tokio::task::spawn_blocking(move || {
        handle
            .block_on(store.snapshot(&need))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    match tokio::time::timeout(PROBE_TIMEOUT, &mut read).await {
        Ok(Ok(Ok(()))) => (HealthStatus::Serving, None),
        Ok(Ok(Err(error))) => (
            HealthStatus::NotServing(NotServingCause::RegistryFailed),
            Some(error),
        ),
        Ok(Err(join)) => (
            HealthStatus::NotServing(NotServingCause::RegistryFailed),
            Some(format!("the read panicked: {join}")),
        ),
        Err(_) => {
            *hanging = Some(read);
            (
                HealthStatus::NotServing(NotServingCause::RegistryTimeout),
                Some(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
            )
        }
    }
}

/// Serves the health checks on `listener`; the connections end when the task is aborted.
fn spawn_endpoint(health: Arc<HealthState>, listener: TcpListener) -> AbortHandle {
    crate::limits::spawn_bounded_endpoint(
        listener,
        MAX_HEALTH_CONNECTIONS,
        crate::limits::WhenFull::CloseNew,
        "health",
        move |tcp| serve_connection(health.clone(), tcp),
    )
}

/// One connection, HTTP/1.1 or HTTP/2 (told apart by the HTTP/2 preface), until the client
/// closes it or one of its timeouts ends it.
async fn serve_connection(health: Arc<HealthState>, tcp: TcpStream) {
    let activity = Arc::new(Activity::new());
    let grpc = health.grpc();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: http::Request<RequestBody>| {
            let busy = Busy::new(&activity);
            let health = health.clone();
            let grpc = grpc.clone();
            async move {
                let response = answer(&health, grpc, request).await;
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _busy: busy }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(FIRST_REQUEST_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(connection);
    let opened = Instant::now();
    let mut check = tokio::time::interval(CONNECTION_CHECK);
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = check.tick() => match closing {
                None if activity.is_done(opened) => {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                Some(since) if since.elapsed() >= CLOSE_WAIT => return,
                _ => {}
            },
        }
    }
}

/// The answer to one request: `/healthz`, `grpc.health.v1.Health` over HTTP/2, UNIMPLEMENTED
/// for other gRPC calls, 404 for anything else.
async fn answer(
    health: &HealthState,
    grpc: HealthServer<HealthService>,
    request: http::Request<RequestBody>,
) -> http::Response<tonic::body::Body> {
    let path = request.uri().path();
    if path == HEALTHZ_PATH {
        return healthz(health.status(), request.method());
    }
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    if request.version() == http::Version::HTTP_2 && path.starts_with(GRPC_HEALTH_PREFIX) {
        return match grpc.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    if is_grpc {
        return tonic::Status::unimplemented(
            "this address serves only grpc.health.v1.Health; other services are behind the gate",
        )
        .into_http();
    }
    text(
        http::StatusCode::NOT_FOUND,
        "health checks: GET /healthz, or grpc.health.v1.Health over HTTP/2\n".to_owned(),
    )
}

/// `/healthz`: 200 `serving` or 503 `not serving: <cause>`, for `GET` and `HEAD`.
fn healthz(status: HealthStatus, method: &http::Method) -> http::Response<tonic::body::Body> {
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut response = text(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are answered\n".to_owned(),
        );
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let code = if status.is_serving() {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if method == http::Method::HEAD {
        String::new()
    } else {
        format!("{status}\n")
    };
    text(code, body)
}

fn text(status: http::StatusCode, body: String) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// What one connection is doing: the requests open on it (until their response bodies are
/// done) and when the last one ended.
struct Activity {
    open: AtomicUsize,
    served: AtomicBool,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Whether the connection opened at `opened` should be closed now: too old, or idle for
    /// too long.
    fn is_done(&self, opened: Instant) -> bool {
        if opened.elapsed() >= CONNECTION_LIFETIME {
            return true;
        }
        if self.open.load(Ordering::Acquire) > 0 {
            return false;
        }
        let limit = if self.served.load(Ordering::Acquire) {
            IDLE_TIMEOUT
        } else {
            FIRST_REQUEST_TIMEOUT
        };
        lock(&self.last).elapsed() >= limit
    }
}

/// One open request on a connection, from its head until its response body is dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.served.store(true, Ordering::Release);
        activity.open.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *lock(&self.0.last) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as open.
struct TrackedBody {
    body: tonic::body::Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_one_line() {
        assert_eq!(HealthStatus::Serving.to_string(), "serving");
        for cause in [
            NotServingCause::NotProbed,
            NotServingCause::RegistryFailed,
            NotServingCause::RegistryTimeout,
        ] {
            let line = HealthStatus::NotServing(cause).to_string();
            assert!(line.starts_with("not serving: "), "{line}");
            assert!(!line.contains('\n'), "{line}");
            assert!(!HealthStatus::NotServing(cause).is_serving());
        }
    }

    #[test]
    fn healthz_answers_get_and_head_only() {
        let ok = healthz(HealthStatus::Serving, &http::Method::GET);
        assert_eq!(ok.status(), http::StatusCode::OK);
        let down = healthz(
            HealthStatus::NotServing(NotServingCause::RegistryFailed),
            &http::Method::HEAD,
        );
        assert_eq!(down.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let post = healthz(HealthStatus::Serving, &http::Method::POST);
        assert_eq!(post.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[http::header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn a_connection_is_done_when_idle_or_old() {
        // Instants before the machine's boot do not exist: shift "now" instead of the past.
        let Some(long_ago) = Instant::now().checked_sub(CONNECTION_LIFETIME) else {
            return;
        };
        let activity = Arc::new(Activity::new());
        assert!(!activity.is_done(Instant::now()));
        let busy = Busy::new(&activity);
        // An open request keeps the connection however long its idle clock reads.
        *lock(&activity.last) = long_ago;
        assert!(!activity.is_done(Instant::now()));
        drop(busy);
        assert!(!activity.is_done(Instant::now()));
        *lock(&activity.last) = long_ago;
        assert!(activity.is_done(Instant::now()));
        let _busy = Busy::new(&activity);
        assert!(activity.is_done(long_ago));
    }
}
