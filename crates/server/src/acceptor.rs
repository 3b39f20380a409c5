//! The accept path: TCP accept and the limits of [`crate::limits`] (rate limit per source,
//! cap on connections being authenticated), then in one task per connection and under one
//! absolute deadline the TLS 1.3 handshake, the ALPN check, exactly one Prefix frame and the
//! gate's decision; accepted connections are yielded to tonic. With standard clients on, a
//! connection that negotiated ALPN `h2` skips the Prefix and is decided by
//! [`crate::standard`]. With [`crate::Builder::proxy_protocol`], a PROXY protocol v2 header
//! from a trusted balancer comes before all of this, and names the client the limits count.

use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use portcullis_core::codec::{ALPN_PCS1, FrameKind, FrameReader, Progress as FrameProgress};
use portcullis_core::{
    Cause, Committed, ConnectionFacts, Decision, Gate, Plan, Planned, RegistryError, RejectCode,
    ServerCause, Snapshot,
};
use portcullis_proxy::{Progress, TrustedProxies};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use zeroize::Zeroizing;

use crate::audit::{Attempt, Auditor};
use crate::context::AuthContext;
use crate::limits::{
    Limited, OVERLOADED_RETRY_AFTER_S, PROXY_HEADER_DEADLINE, REFUSAL_DEADLINE, SourceLimiter,
};
use crate::standard::{self, ALPN_H2, GrpcRefusal};
use crate::stream::AuthenticatedStream;

/// Time allowed to write a Verdict once the decision is made, or the TIMEOUT Verdict once the
/// deadline has passed.
const VERDICT_WRITE_LIMIT: Duration = Duration::from_secs(2);
/// How long a refused connection is drained after its Verdict.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);
/// The most bytes drained from a refused connection.
const DRAIN_MAX_BYTES: usize = 256 * 1024;
/// How often expired nonces and quiet rate-limit sources are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(10);
/// RETRY_AFTER, in seconds, of the OVERLOADED Verdict sent while the CRLs are out of date.
const CRL_STALE_RETRY_AFTER_S: u32 = 60;
/// How many authenticated connections wait for tonic to take them.
const HANDOFF_QUEUE: usize = 128;

pub(crate) struct AcceptState {
    pub(crate) gate: Arc<Gate>,
    /// The ticket key files reloaded when they change, when the keys came from a directory.
    pub(crate) tickets: Option<Arc<crate::tickets::TicketFiles>>,
    pub(crate) tls: TlsAcceptor,
    pub(crate) deadline: Duration,
    pub(crate) blocking_registry: bool,
    /// One permit per connection being authenticated ([`crate::Builder::max_pending`]).
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) max_pending: usize,
    /// One permit per early refusal in its TLS handshake ([`crate::Builder::refusal_budget`]).
    pub(crate) refusing: Arc<Semaphore>,
    pub(crate) refusal_budget: usize,
    /// `None` when the rate limit is off.
    pub(crate) limiter: Option<SourceLimiter>,
    /// The audit trail and the metrics: one record per attempt.
    pub(crate) auditor: Arc<Auditor>,
    /// Live connections, and the CRLs checked after each handshake.
    pub(crate) revocation: Arc<crate::revocation::Revocation>,
    /// Whether connections that negotiated ALPN `h2` are decided ([`crate::standard`]).
    pub(crate) standard_clients: bool,
    /// The peers whose PROXY protocol header is read ([`crate::Builder::proxy_protocol`]);
    /// `None` when it is off.
    pub(crate) proxy: Option<Arc<TrustedProxies>>,
    /// Whether a purge of expired nonces and quiet sources is under way.
    pub(crate) purging: AtomicBool,
    /// Connections being authenticated, by source, and how many one source may have.
    pub(crate) sources: Arc<crate::limits::SourceSlots>,
    pub(crate) max_pending_per_source: usize,
    /// How long a new connection has to send its first TLS byte.
    pub(crate) hello_deadline: Duration,
    /// Whether new connections are refused while an audit sink fails
    /// ([`crate::Builder::audit_required`]).
    pub(crate) audit_required: bool,
    /// Connections in their TLS handshake, oldest first, each with the sender that sheds it.
    pub(crate) pre_tls: PreTlsMap,
    pub(crate) next_pre_tls: std::sync::atomic::AtomicU64,
    /// The bearer token the metrics need ([`crate::Builder::metrics_token`]).
    pub(crate) metrics_token: Option<zeroize::Zeroizing<String>>,
}

/// The application protocol a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `portcullis/1`: a Prefix comes first.
    Pcs1,
    /// `h2`: a standard gRPC client, no Prefix.
    H2,
}

impl Protocol {
    /// The ALPN id as text.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pcs1 => "portcullis/1",
            Self::H2 => "h2",
        }
    }
}

impl AcceptState {
    /// How many connections are being authenticated.
    pub(crate) fn pending(&self) -> usize {
        self.max_pending
            .saturating_sub(self.pending.available_permits())
    }

    /// How many early refusals are in their TLS handshake or Verdict.
    pub(crate) fn refusing(&self) -> usize {
        self.refusal_budget
            .saturating_sub(self.refusing.available_permits())
    }

    /// The limits checked at TCP accept: the rate limit of the source, then the cap on
    /// connections being authenticated. No registry work is done here.
    fn admit(&self, peer: SocketAddr) -> Result<Admitted, Refused> {
        if let Some(limiter) = &self.limiter {
            match limiter.check(peer.ip()) {
                Ok(()) => {}
                Err(Limited::Source { retry_after_s }) => {
                    return Err(Refused::Early(EarlyRefusal {
                        code: RejectCode::RateLimited,
                        cause: ServerCause::RateLimited,
                        hint: format!(
                            "too many connection attempts from {}; retry in {retry_after_s} s",
                            peer.ip()
                        ),
                        retry_after_s,
                    }));
                }
                Err(Limited::Full) => {
                    return Err(Refused::Early(EarlyRefusal {
                        code: RejectCode::Overloaded,
                        cause: ServerCause::RateLimiterFull,
                        hint: "the server is tracking too many sources of connections; retry \
                               shortly"
                            .into(),
                        retry_after_s: OVERLOADED_RETRY_AFTER_S,
                    }));
                }
            }
        }
        if self.audit_required && !self.auditor.healthy() {
            return Err(Refused::Early(EarlyRefusal {
                code: RejectCode::Overloaded,
                cause: ServerCause::AuditUnavailable,
                hint: "the server cannot write its audit trail; retry shortly".into(),
                retry_after_s: OVERLOADED_RETRY_AFTER_S,
            }));
        }
        let Some(slot) = self.sources.take(peer.ip(), self.max_pending_per_source) else {
            return Err(Refused::Early(EarlyRefusal {
                code: RejectCode::Overloaded,
                cause: ServerCause::TooManyPendingFromSource,
                hint: format!(
                    "{} connections from {} are being authenticated already, the most one \
                     source may have; retry shortly",
                    self.max_pending_per_source,
                    peer.ip()
                ),
                retry_after_s: OVERLOADED_RETRY_AFTER_S,
            }));
        };
        match self.pending.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admitted {
                _permit: permit,
                _slot: slot,
            }),
            // Full: the oldest connection that has not finished TLS makes room, if there is one.
            Err(_) if self.shed_oldest() => Err(Refused::Shed(slot)),
            Err(_) => Err(Refused::Early(self.full())),
        }
    }

    /// The refusal of a connection over [`crate::Builder::max_pending`].
    fn full(&self) -> EarlyRefusal {
        EarlyRefusal {
            code: RejectCode::Overloaded,
            cause: ServerCause::TooManyPending,
            hint: format!(
                "the server is at its limit of {} connections being authenticated; retry \
                 shortly",
                self.max_pending
            ),
            retry_after_s: OVERLOADED_RETRY_AFTER_S,
        }
    }

    /// Signals the oldest connection that has not finished its TLS handshake to close; whether
    /// there was one.
    fn shed_oldest(&self) -> bool {
        let mut pre_tls = lock_pre_tls(&self.pre_tls);
        while let Some((_, shed)) = pre_tls.pop_first() {
            if shed.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// Registers a connection in its TLS handshake: the receiver fires when it is shed.
    fn enter_pre_tls(self: &Arc<Self>) -> PreTls {
        let id = self.next_pre_tls.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock_pre_tls(&self.pre_tls).insert(id, tx);
        PreTls {
            state: self.clone(),
            id,
            shed: rx,
        }
    }
}

/// A connection's places in the caps on connections being authenticated, held until tonic has
/// taken it (or it is refused).
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _slot: crate::limits::SourceSlot,
}

/// Why [`AcceptState::admit`] did not admit a connection.
enum Refused {
    /// Refused before its Prefix.
    Early(EarlyRefusal),
    /// The cap was full and the oldest connection in its TLS handshake was told to make room:
    /// the connection may wait briefly for its place, holding its source's.
    Shed(crate::limits::SourceSlot),
}

/// A connection in its TLS handshake, shed by [`AcceptState::shed_oldest`] when the cap on
/// connections being authenticated is full; unregistered when dropped.
struct PreTls {
    state: Arc<AcceptState>,
    id: u64,
    shed: tokio::sync::oneshot::Receiver<()>,
}

impl Drop for PreTls {
    fn drop(&mut self) {
        lock_pre_tls(&self.state.pre_tls).remove(&self.id);
    }
}

type PreTlsMap =
    std::sync::Mutex<std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>>;

fn lock_pre_tls(
    map: &PreTlsMap,
) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>> {
    // Every change under the lock is one insert or removal.
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a newcomer waits for the place of a connection shed for it.
const SHED_WAIT: Duration = Duration::from_millis(250);

/// A refusal decided at TCP accept, before the Prefix.
struct EarlyRefusal {
    code: RejectCode,
    cause: ServerCause,
    hint: String,
    retry_after_s: u32,
}

/// The stream of authenticated connections for tonic's `serve_with_incoming`.
///
/// Made by [`crate::PortcullisServer::incoming`]. Dropping it (tonic does on shutdown) stops
/// the accept loop and closes the listener.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<AuthenticatedStream>,
    local_addr: Option<SocketAddr>,
    accept_loop: tokio::task::AbortHandle,
    /// The endpoint of [`crate::Builder::metrics_listen`], served as long as this stream.
    pub(crate) metrics: Option<crate::metrics::MetricsEndpoint>,
    /// The health probe and the endpoint of [`crate::Builder::health_listen`], run as long as
    /// this stream.
    pub(crate) health: Option<crate::health::HealthTasks>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Stop accepting and close the listener now, not at the loop's next wake-up.
        self.accept_loop.abort();
    }
}

impl Incoming {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Stream for Incoming {
    type Item = Result<AuthenticatedStream, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|s| s.map(Ok))
    }
}

pub(crate) fn spawn_accept_loop(state: Arc<AcceptState>, listener: TcpListener) -> Incoming {
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    let local_addr = listener.local_addr().ok();
    let accept_loop = tokio::spawn(async move {
        let mut purge_tick = tokio::time::interval(PURGE_INTERVAL);
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                _ = purge_tick.tick() => {
                    // Detached, and one at a time: accepting never waits for a purge.
                    purge(&state);
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let attempt = Attempt::new(&state.auditor, peer);
                        match &state.proxy {
                            None => dispatch(&state, &tx, tcp, attempt),
                            Some(trusted) => {
                                if trusted.contains(peer.ip()) {
                                    behind_proxy(&state, &tx, tcp, attempt);
                                } else {
                                    attempt.closed(
                                        None,
                                        ServerCause::ProxyUntrusted,
                                        Some(format!("{} is not a trusted proxy", peer.ip())),
                                    );
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors or a transient error: wait a little so the
                        // loop does not spin, then go on accepting.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        tracing::debug!("accept loop stopped");
    });
    Incoming {
        rx,
        local_addr,
        accept_loop: accept_loop.abort_handle(),
        metrics: None,
        health: None,
    }
}

/// The limits at accept for a connection whose client is known (its TCP peer, or the client
/// its PROXY header names), then its authentication or its early refusal, each in a task of
/// its own.
fn dispatch(
    state: &Arc<AcceptState>,
    tx: &mpsc::Sender<AuthenticatedStream>,
    tcp: TcpStream,
    attempt: Attempt,
) {
    match state.admit(attempt.peer()) {
        Ok(admitted) => {
            tokio::spawn(serve_admitted(
                state.clone(),
                tx.clone(),
                tcp,
                attempt,
                admitted,
            ));
        }
        Err(Refused::Shed(slot)) => {
            // The connection shed for this one gives its place back at once.
            let state = state.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let waited =
                    tokio::time::timeout(SHED_WAIT, state.pending.clone().acquire_owned()).await;
                match waited {
                    Ok(Ok(permit)) => {
                        let admitted = Admitted {
                            _permit: permit,
                            _slot: slot,
                        };
                        serve_admitted(state, tx, tcp, attempt, admitted).await;
                    }
                    _ => {
                        drop(slot);
                        let refusal = state.full();
                        refuse_or_close(&state, tcp, attempt, refusal);
                    }
                }
            });
        }
        Err(Refused::Early(refusal)) => {
            if refusal.cause == ServerCause::RateLimiterFull {
                purge(state);
            }
            refuse_or_close(state, tcp, attempt, refusal);
        }
    }
}

/// Authenticates an admitted connection and hands it to tonic; its places in the caps are
/// held until tonic has taken it, so that a server that cannot keep up answers OVERLOADED.
async fn serve_admitted(
    state: Arc<AcceptState>,
    tx: mpsc::Sender<AuthenticatedStream>,
    tcp: TcpStream,
    attempt: Attempt,
    admitted: Admitted,
) {
    if let Some(stream) = authenticate(&state, tcp, attempt).await {
        // The receiver is gone only when the server shuts down.
        let _ = tx.send(stream).await;
    }
    drop(admitted);
}

/// Answers `refusal` with a Verdict, in a task of its own, when the refusal budget allows it;
/// otherwise closes the connection at once.
fn refuse_or_close(
    state: &Arc<AcceptState>,
    tcp: TcpStream,
    attempt: Attempt,
    refusal: EarlyRefusal,
) {
    match state.refusing.clone().try_acquire_owned() {
        Ok(permit) => {
            let state = state.clone();
            tokio::spawn(async move {
                refuse_early(&state, tcp, attempt, refusal).await;
                drop(permit);
            });
        }
        Err(_) => {
            // Not even a handshake can be afforded: closed at once.
            attempt.closed(
                Some(refusal.code),
                refusal.cause,
                Some("closed at accept, without a TLS handshake".into()),
            );
            drop(tcp);
        }
    }
}

/// A connection from a trusted proxy ([`crate::Builder::proxy_protocol`]): its PROXY header is
/// read in a task of its own, under a permit of the cap on connections being authenticated
/// (or, when that is full, of the refusal budget, so that the refusal can still be sent), and
/// then it goes on as the client the header names.
fn behind_proxy(
    state: &Arc<AcceptState>,
    tx: &mpsc::Sender<AuthenticatedStream>,
    mut tcp: TcpStream,
    mut attempt: Attempt,
) {
    let permit = match state.pending.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => match state.refusing.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                attempt.closed(
                    Some(RejectCode::Overloaded),
                    ServerCause::TooManyPending,
                    Some("closed at accept, before its PROXY header".into()),
                );
                return;
            }
        },
    };
    let state = state.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let limit = PROXY_HEADER_DEADLINE.min(state.deadline);
        let deadline = tokio::time::Instant::from_std(attempt.started() + limit);
        match read_proxy_header(&mut tcp, deadline, limit).await {
            Ok(client) => {
                if let Some(client) = client {
                    attempt.forwarded(client);
                }
                // The connection now counts as its client's: the limits at accept decide it
                // like any other.
                drop(permit);
                dispatch(&state, &tx, tcp, attempt);
            }
            Err(closed) => attempt.closed(None, closed.cause, closed.detail),
        }
    });
}

/// Reads a PROXY protocol v2 header, exactly its bytes and no byte of the TLS handshake after
/// it, by `deadline`. The client it names; `None` for a LOCAL header.
async fn read_proxy_header(
    tcp: &mut TcpStream,
    deadline: tokio::time::Instant,
    limit: Duration,
) -> Result<Option<SocketAddr>, Closed> {
    let mut buf = Vec::with_capacity(64);
    loop {
        let need = match portcullis_proxy::decode(&buf) {
            Ok(Progress::Done(header)) => return Ok(header.client),
            Ok(Progress::Need(need)) => need,
            Err(e) => {
                return Err(Closed::new(
                    ServerCause::ProxyHeaderRefused,
                    Some(e.to_string()),
                ));
            }
        };
        let start = buf.len();
        buf.resize(start + need, 0);
        match timeout_at(deadline, tcp.read(&mut buf[start..])).await {
            Ok(Ok(0)) => {
                return Err(Closed::new(
                    ServerCause::ProxyHeaderRefused,
                    Some(format!(
                        "the connection ended after {start} bytes of the PROXY header"
                    )),
                ));
            }
            Ok(Ok(read)) => buf.truncate(start + read),
            Ok(Err(e)) => {
                return Err(Closed::new(
                    ServerCause::ProxyHeaderRefused,
                    Some(format!("reading the PROXY header: {e}")),
                ));
            }
            Err(_) => {
                return Err(Closed::new(
                    ServerCause::ProxyHeaderTimeout,
                    Some(format!(
                        "{start} bytes of the PROXY header within {} ms",
                        limit.as_millis()
                    )),
                ));
            }
        }
    }
}

/// Drops expired nonces and quiet rate-limit sources, detached and one at a time: accepting
/// never waits for a purge.
fn purge(state: &Arc<AcceptState>) {
    if !state.purging.swap(true, Ordering::AcqRel) {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            state.gate.purge_expired();
            if let Some(limiter) = &state.limiter {
                limiter.sweep();
            }
            state.purging.store(false, Ordering::Release);
        });
    }
}

/// Why a connection was closed before a Verdict could be written to it.
struct Closed {
    cause: ServerCause,
    detail: Option<String>,
}

impl Closed {
    fn new(cause: ServerCause, detail: Option<String>) -> Self {
        Self { cause, detail }
    }

    fn describe(&self) -> String {
        match &self.detail {
            Some(detail) => format!("{}: {detail}", self.cause),
            None => self.cause.as_str().to_owned(),
        }
    }
}

/// The TLS handshake and the checks of PROTOCOL.md section 1 (TLS 1.3, ALPN `portcullis/1` or,
/// with standard clients on, `h2`, a usable client certificate), under `deadline`. An error
/// when the connection was closed: no Verdict can be written to it. The client certificate's
/// fingerprint goes to `attempt` as soon as it is known.
async fn handshake(
    state: &AcceptState,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
    attempt: &mut Attempt,
) -> Result<Up, Closed> {
    let _ = tcp.set_nodelay(true);
    // The first TLS byte has a deadline of its own: a client sends its ClientHello as soon as
    // it is connected, so a silent connection gives its place back early.
    let hello_by = deadline.min(tokio::time::Instant::now() + state.hello_deadline);
    if timeout_at(hello_by, tcp.peek(&mut [0u8; 1])).await.is_err() {
        return Err(Closed::new(
            ServerCause::HelloTimeout,
            Some(format!(
                "no TLS byte within {} ms of the connection",
                state.hello_deadline.as_millis()
            )),
        ));
    }
    let mut tls = match timeout_at(deadline, state.tls.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // A peer whose first bytes are no TLS record (a plaintext HTTP/2 client, `grpcurl
            // -plaintext`, an HTTP/1 request) is named as such in the audit record.
            let not_tls = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|t| {
                    matches!(
                        t,
                        rustls::Error::InvalidMessage(
                            rustls::InvalidMessage::InvalidContentType
                                | rustls::InvalidMessage::UnknownProtocolVersion
                        )
                    )
                });
            let cause = if not_tls {
                ServerCause::NotTls
            } else {
                ServerCause::TlsHandshakeFailed
            };
            return Err(Closed::new(cause, Some(e.to_string())));
        }
        Err(_) => return Err(Closed::new(ServerCause::TlsHandshakeTimeout, None)),
    };

    let (facts, protocol, alpn_ok) = {
        let (_, conn) = tls.get_ref();
        // Section 1: TLS 1.3 only (the exporter is a sound binding only there), and ALPN
        // portcullis/1 (or h2, section 7, when standard clients are on). Both are checked here
        // whatever the configuration says.
        let protocol = match conn.alpn_protocol() {
            Some(p) if p == ALPN_PCS1 => Some(Protocol::Pcs1),
            Some(p) if p == ALPN_H2 && state.standard_clients => Some(Protocol::H2),
            _ => None,
        };
        let alpn_ok =
            protocol.is_some() && conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        // One parse of the leaf: its fingerprint and its validity period.
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| portcullis_tls::LeafFacts::from_der(leaf.as_ref()).ok());
        let exporter = portcullis_tls::exporter(conn).ok();
        (leaf.zip(exporter), protocol, alpn_ok)
    };
    if let Some((leaf, _)) = &facts {
        attempt.device(leaf.fingerprint);
    }
    if let Some(protocol) = protocol {
        attempt.alpn(protocol.as_str());
    }
    if !alpn_ok {
        // Section 1: no ALPN or another id is closed right after the handshake, without a
        // byte of application data.
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let version = tls.get_ref().1.protocol_version();
        let cause = if protocol.is_none() {
            ServerCause::AlpnRefused
        } else {
            ServerCause::TlsVersionRefused
        };
        let _ = timeout_at(deadline, tls.shutdown()).await;
        return Err(Closed::new(
            cause,
            Some(format!("ALPN {alpn:?}, version {version:?}")),
        ));
    }
    let (Some((leaf, exporter)), Some(protocol)) = (facts, protocol) else {
        let _ = timeout_at(deadline, tls.shutdown()).await;
        return Err(Closed::new(ServerCause::NoUsableClientCertificate, None));
    };
    Ok(Up {
        tls,
        facts: ConnectionFacts {
            exporter,
            fingerprint: leaf.fingerprint,
        },
        protocol,
        leaf,
    })
}

/// A connection whose TLS handshake passed the checks of PROTOCOL.md section 1.
struct Up {
    tls: TlsStream<TcpStream>,
    facts: ConnectionFacts,
    protocol: Protocol,
    /// The client's leaf certificate: fingerprint and validity period.
    leaf: portcullis_tls::LeafFacts,
}

/// Answers a connection refused at accept (RATE_LIMITED, OVERLOADED) with its Verdict after
/// the TLS handshake, without reading its Prefix.
async fn refuse_early(
    state: &AcceptState,
    tcp: TcpStream,
    mut attempt: Attempt,
    early: EarlyRefusal,
) {
    let deadline =
        tokio::time::Instant::from_std(attempt.started() + state.deadline.min(REFUSAL_DEADLINE));
    let (tls, protocol) = match handshake(state, tcp, deadline, &mut attempt).await {
        Ok(up) => (up.tls, up.protocol),
        Err(closed) => {
            // The refusal could not be sent: recorded under its own cause.
            attempt.closed(Some(early.code), early.cause, Some(closed.describe()));
            return;
        }
    };
    let deciding = Instant::now();
    let decision = state.gate.refuse(
        early.code,
        Cause::Server(early.cause),
        &early.hint,
        Some(early.retry_after_s),
    );
    attempt.decided(&decision, deciding.elapsed());
    refuse(tls, protocol, &decision, deadline).await;
}

/// Answers a refused connection in its protocol: the Verdict for `portcullis/1`, a gRPC status
/// for `h2` (no later than `deadline`, or shortly after a deadline already passed), then
/// closes it.
async fn refuse(
    tls: TlsStream<TcpStream>,
    protocol: Protocol,
    decision: &portcullis_core::Decision,
    deadline: tokio::time::Instant,
) {
    match protocol {
        Protocol::Pcs1 => {
            if let Ok(verdict) = decision.verdict.encode() {
                write_refusal(tls, &verdict).await;
            }
        }
        Protocol::H2 => {
            let Some(refusal) = GrpcRefusal::of(decision) else {
                return;
            };
            let mut tls = tls;
            let deadline = deadline.max(tokio::time::Instant::now() + VERDICT_WRITE_LIMIT);
            standard::respond_refused(&mut tls, &refusal, deadline).await;
            let limit = tokio::time::Instant::now() + DRAIN_LIMIT;
            let _ = timeout_at(limit, tls.shutdown()).await;
        }
    }
}

/// Runs steps 2 to 5 of PROTOCOL.md section 5 for one connection (section 7 for a standard
/// client).
async fn authenticate(
    state: &Arc<AcceptState>,
    tcp: TcpStream,
    mut attempt: Attempt,
) -> Option<AuthenticatedStream> {
    let peer = attempt.peer();
    let deadline = tokio::time::Instant::from_std(attempt.started() + state.deadline);
    let Up {
        mut tls,
        facts,
        protocol,
        leaf,
    } = match {
        // Until its handshake is done, the connection may be shed for a newer one when the
        // server is full.
        let mut pre_tls = state.enter_pre_tls();
        tokio::select! {
            up = handshake(state, tcp, deadline, &mut attempt) => up,
            Ok(()) = &mut pre_tls.shed => Err(Closed::new(
                ServerCause::Shed,
                Some("closed in its TLS handshake to make room for a newer connection".into()),
            )),
        }
    } {
        Ok(up) => up,
        Err(closed) => {
            attempt.closed(None, closed.cause, closed.detail);
            return None;
        }
    };
    if let Some((code, cause, hint, retry_after_s)) =
        certificate_refusal(state, tls.get_ref().1, &leaf)
    {
        let (decision, took) = timed(|| {
            state
                .gate
                .refuse(code, Cause::Server(cause), &hint, retry_after_s)
        });
        attempt.decided(&decision, took);
        refuse(tls, protocol, &decision, deadline).await;
        return None;
    }
    let expires_ms = leaf.expires_at_ms();
    if protocol == Protocol::H2 {
        return standard_client(state, tls, facts, peer, expires_ms, attempt, deadline).await;
    }

    let (decision, took) = match timeout_at(deadline, read_frame(&mut tls)).await {
        Err(_) => timed(|| {
            state.gate.refuse(
                RejectCode::Timeout,
                Cause::Server(ServerCause::PrefixTimeout),
                &format!(
                    "no complete Prefix within {} ms of the connection",
                    state.deadline.as_millis()
                ),
                None,
            )
        }),
        Ok(Err(ReadError::Io(e))) => {
            attempt.closed(None, ServerCause::PrefixReadFailed, Some(e.to_string()));
            return None;
        }
        Ok(Err(ReadError::Decode(e))) => timed(|| state.gate.refuse_decode(e)),
        Ok(Ok(frame)) => {
            let start = Instant::now();
            let decision = match state.gate.plan(&frame, &facts) {
                Planned::Decided(decision) => decision,
                Planned::Fetch(plan) => decide_within(state, plan, deadline).await,
            };
            (decision, start.elapsed())
        }
    };
    attempt.decided(&decision, took);

    let verdict = match decision.verdict.encode() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "verdict could not be encoded");
            return None;
        }
    };
    match decision.outcome {
        Ok(identity) => {
            // The accepting Verdict goes into rustls's buffer without a write of its own: it
            // leaves with HTTP/2's first frames (the server's SETTINGS, which hyper writes at
            // once), in one write instead of two.
            if std::io::Write::write_all(&mut tls.get_mut().1.writer(), &verdict).is_err() {
                return None;
            }
            let session = identity.session.as_ref().map(|(id, _)| *id);
            Some(
                AuthenticatedStream::new(
                    tls,
                    AuthContext::new(identity, peer, decision.reference)
                        .certificate_expiry(expires_ms),
                )
                .watched(&state.revocation, session),
            )
        }
        Err(_) => {
            write_refusal(tls, &verdict).await;
            None
        }
    }
}

/// Writes a rejecting Verdict, then closes the connection.
async fn write_refusal(mut tls: TlsStream<TcpStream>, verdict: &[u8]) {
    let write_deadline = tokio::time::Instant::now() + VERDICT_WRITE_LIMIT;
    let written = timeout_at(write_deadline, async {
        tls.write_all(verdict).await?;
        tls.flush().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        close_refused(tls).await;
    }
}

/// Closes a refused connection so that the Verdict arrives: close_notify, then whatever the
/// client pipelined is read and thrown away (never parsed) for a short bounded time, so that
/// unread bytes do not make the kernel reset the connection ahead of the Verdict.
async fn close_refused(mut tls: TlsStream<TcpStream>) {
    let limit = tokio::time::Instant::now() + DRAIN_LIMIT;
    let _ = timeout_at(limit, tls.shutdown()).await;
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while drained < DRAIN_MAX_BYTES {
        match timeout_at(limit, tls.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

enum ReadError {
    Io(io::Error),
    Decode(portcullis_core::codec::DecodeError),
}

/// Reads exactly one Prefix frame: the header, then exactly the body it announces. A length
/// over the limit is refused from the header alone, so the buffer is never larger than
/// [`crate::limits::MAX_PREFIX_FRAME`]. The frame holds the code or the ticket: wiped when
/// dropped.
async fn read_frame(tls: &mut TlsStream<TcpStream>) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let mut reader = FrameReader::new(FrameKind::Prefix);
    loop {
        let want = reader.unfilled().len();
        tls.read_exact(reader.unfilled())
            .await
            .map_err(ReadError::Io)?;
        if reader.filled(want).map_err(ReadError::Decode)? == FrameProgress::Done {
            return Ok(reader.into_frame());
        }
    }
}

/// Phases 2 to 4 of the gate for a plan, under the connection's deadline: one fetch, the
/// decision, one commit (PROTOCOL.md section 5, step 1: the decision is part of the deadline).
///
/// Nothing is committed once the deadline has passed: a fetch that outlives it is abandoned
/// (its read may finish in the background, but nothing is decided on it), a commit that has not
/// started by then is not started (on the blocking pool it is checked again on the thread that
/// would run it), and the connection is refused with TIMEOUT, so that a client told TIMEOUT
/// keeps its code unspent and its failure count unchanged (its nonce may be spent: nonces are
/// single use anyway). A commit that has started is awaited to its end and its result stands:
/// cancelling it could leave a code spent behind a TIMEOUT.
///
/// With [`crate::Builder::blocking_registry`], the fetch and the commit each run on tokio's
/// blocking pool; otherwise in this task (an embedded store answers in microseconds, an
/// asynchronous one waits without blocking). A panic in a check, in a connection policy or in
/// the work an embedded store does refuses with OVERLOADED (fail closed).
async fn decide_within(
    state: &Arc<AcceptState>,
    plan: Plan,
    deadline: tokio::time::Instant,
) -> Decision {
    let gate = &state.gate;
    let timed_out = || {
        gate.refuse(
            RejectCode::Timeout,
            Cause::Server(ServerCause::DecisionTimeout),
            "the server did not decide within the deadline; retry",
            None,
        )
    };
    let failed = || {
        gate.refuse(
            RejectCode::Overloaded,
            Cause::Server(ServerCause::GateFailed),
            "the server could not check credentials; retry shortly",
            Some(5),
        )
    };
    let need = *plan.need();
    let snapshot: Result<Snapshot, RegistryError> = if state.blocking_registry {
        let store = gate.store().clone();
        let handle = tokio::runtime::Handle::current();
        let fetch = tokio::task::spawn_blocking(move || handle.block_on(store.snapshot(&need)));
        match timeout_at(deadline, fetch).await {
            Err(_) => return timed_out(),
            Ok(Err(_)) => return failed(),
            Ok(Ok(snapshot)) => snapshot,
        }
    } else {
        // An embedded store does its work when the future is made.
        let Ok(fetch) = catch_unwind(AssertUnwindSafe(|| gate.store().snapshot(&need))) else {
            return failed();
        };
        match timeout_at(deadline, fetch).await {
            Err(_) => return timed_out(),
            Ok(snapshot) => snapshot,
        }
    };
    if tokio::time::Instant::now() >= deadline {
        return timed_out();
    }
    let Ok(outcome) = catch_unwind(AssertUnwindSafe(|| gate.decide(plan, snapshot))) else {
        return failed();
    };
    if outcome.effects().is_none() {
        return gate.finish(outcome, Ok(Committed::Applied));
    }
    // The last point at which the decision may still be dropped.
    if tokio::time::Instant::now() >= deadline {
        return timed_out();
    }
    let committed = if state.blocking_registry {
        let store = gate.store().clone();
        let effects = outcome.effects().clone();
        let handle = tokio::runtime::Handle::current();
        let latest = deadline.into_std();
        let commit = tokio::task::spawn_blocking(move || {
            // The pool may have been busy: a commit that would start late does not start.
            (Instant::now() < latest).then(|| handle.block_on(store.commit(&effects)))
        });
        match commit.await {
            Ok(Some(committed)) => committed,
            Ok(None) => return timed_out(),
            Err(_) => return failed(),
        }
    } else {
        let Ok(commit) = catch_unwind(AssertUnwindSafe(|| gate.store().commit(outcome.effects())))
        else {
            return failed();
        };
        commit.await
    };
    gate.finish(outcome, committed)
}

/// Runs `f` and measures how long it took.
/// The checks of the client certificate that the TLS handshake does not make on a resumed
/// session (rustls does not verify it again), made on every connection: the current CRLs,
/// whether they are up to date (with `CrlStale::Refuse`: nobody's revocation status is known
/// otherwise), and the leaf's validity period on the gate's clock. The refusal, if any: its
/// code, cause, hint and RETRY_AFTER.
fn certificate_refusal(
    state: &AcceptState,
    conn: &rustls::ServerConnection,
    leaf: &portcullis_tls::LeafFacts,
) -> Option<(RejectCode, ServerCause, String, Option<u32>)> {
    if state.revocation.certificate_revoked(conn) {
        return Some((
            RejectCode::DeviceRevoked,
            ServerCause::CertificateRevoked,
            "the client certificate is listed in the server's certificate revocation list"
                .to_owned(),
            None,
        ));
    }
    let now_ms = state.gate.clock().now_ms();
    if let Some(next_update) = state.revocation.refuses_for_stale_crl(now_ms) {
        return Some((
            RejectCode::Overloaded,
            ServerCause::CrlStale,
            format!(
                "the server's certificate revocation list is out of date (its nextUpdate was \
                 {}); retry once the server has a current one",
                crate::audit::format_time_s(next_update)
            ),
            Some(CRL_STALE_RETRY_AFTER_S),
        ));
    }
    if !leaf.is_valid_at_ms(now_ms) {
        return Some((
            RejectCode::DeviceRevoked,
            ServerCause::CertificateExpired,
            format!(
                "the client certificate is outside its validity period (valid from {} to {}); \
                 issue the device a new certificate",
                crate::audit::format_time_s(leaf.not_before_unix),
                crate::audit::format_time_s(leaf.not_after_unix),
            ),
            None,
        ));
    }
    None
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

/// Decides a standard gRPC client (ALPN `h2`, no Prefix: PROTOCOL.md section 7) under the
/// connection's deadline: accepted, it goes to tonic; refused, it gets its gRPC status.
async fn standard_client(
    state: &Arc<AcceptState>,
    tls: TlsStream<TcpStream>,
    facts: ConnectionFacts,
    peer: SocketAddr,
    certificate_expires_ms: u64,
    attempt: Attempt,
    deadline: tokio::time::Instant,
) -> Option<AuthenticatedStream> {
    let start = Instant::now();
    let plan = state.gate.plan_standard(&facts.fingerprint);
    let decision = decide_within(state, plan, deadline).await;
    let took = start.elapsed();
    attempt.decided(&decision, took);
    match decision.outcome {
        Ok(identity) => {
            let session = identity.session.as_ref().map(|(id, _)| *id);
            let auth = AuthContext::new(identity, peer, decision.reference)
                .certificate_expiry(certificate_expires_ms);
            Some(AuthenticatedStream::new(tls, auth).watched_session(&state.revocation, session))
        }
        Err(_) => {
            refuse(tls, Protocol::H2, &decision, deadline).await;
            None
        }
    }
}

impl crate::metrics::MetricsSource for AcceptState {
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.auditor.metrics
    }

    fn gauges(&self) -> crate::metrics::Gauges {
        crate::metrics::Gauges {
            authenticating: self.pending(),
            crl_stale: self
                .revocation
                .stale_crl(self.gate.clock().now_ms())
                .is_some(),
            refusing: self.refusing(),
            nonces: self.gate.nonces().len(),
            nonce_capacity: self.gate.nonces().capacity(),
            sources: self.limiter.as_ref().map_or(0, |l| l.len()),
        }
    }

    fn metrics_token(&self) -> Option<&str> {
        self.metrics_token.as_ref().map(|t| t.as_str())
    }
}
