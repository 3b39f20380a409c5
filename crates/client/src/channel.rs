//! [`PortcullisChannel`]: tonic's `Channel` over PCS1 connections, with refused connections
//! reported as the `tonic::Status` of PROTOCOL.md section 4, and step-up answered by itself.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{BoxError, ServiceExt};

use crate::ClientError;
use crate::connector::connect_with_code;
use crate::dial::ClientInner;
use crate::dial::{Target, fetch_code_for};
use crate::error::{REJECT_METADATA, find_connect_failure, io_messages};

/// The most request bytes a channel keeps to send a call again after `step_up_required`
/// (1 MiB). A call whose request is larger is not sent again: its caller gets the status.
pub const MAX_REPLAY_BYTES: usize = 1 << 20;

/// The reject name of a call that needs a fresher TOTP check.
const STEP_UP_REQUIRED: &str = "step_up_required";

/// A gRPC channel whose connections go through the PCS1 gate.
///
/// Use it wherever tonic takes a channel, for example `EchoClient::new(channel)`. It is cheap
/// to clone: clones share the connection. When an RPC fails because the server refused the
/// connection, the error is a `tonic::Status` with the gRPC code of PROTOCOL.md section 4, the
/// REASON as message (`mfa_failed: ...`) and the metadata `portcullis-reject` (the reject
/// name), `portcullis-ref` (the REF in hex) and, when the server sent one,
/// `portcullis-retry-after` (seconds). A TLS failure is UNAVAILABLE with a message that starts
/// with `tls: `. Other errors pass through as tonic reports them.
///
/// ## Step-up
///
/// A server's per-method policy may ask for a TOTP check more recent than the one the
/// connection (or the session it rides on) was earned with: the call fails with
/// UNAUTHENTICATED and `portcullis-reject: step_up_required`, before any service sees it. The
/// channel answers that by itself: it drops the client's session ticket, asks the code source
/// for a new code, opens a new connection with that code and sends the call again, once. The
/// caller sees the second answer. Later calls of the channel and its clones use the new
/// connection. The call is not sent again, and its caller gets the `step_up_required` status,
/// when the code source gives the code the server last accepted from this client (a fixed
/// code, or a TOTP secret within the same time step: the server would refuse it), or when the
/// request was larger than [`MAX_REPLAY_BYTES`]. When the new connection is refused, the
/// caller gets that refusal (for example `mfa_failed`).
#[derive(Clone)]
pub struct PortcullisChannel {
    inner: Channel,
    target: Arc<Target>,
    /// Which connection of `shared` `inner` is.
    generation: u64,
    shared: Arc<Shared>,
}

/// What the clones of a channel share: the connection made by the latest step-up.
struct Shared {
    current: Mutex<Current>,
    /// Held while a step-up connects, so that concurrent calls make one new connection.
    stepping_up: tokio::sync::Mutex<()>,
}

struct Current {
    channel: Channel,
    target: Arc<Target>,
    generation: u64,
}

impl Shared {
    fn current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PortcullisChannel {
    pub(crate) fn new(inner: Channel, target: Arc<Target>) -> Self {
        let shared = Arc::new(Shared {
            current: Mutex::new(Current {
                channel: inner.clone(),
                target: target.clone(),
                generation: 0,
            }),
            stepping_up: tokio::sync::Mutex::new(()),
        });
        Self {
            inner,
            target,
            generation: 0,
            shared,
        }
    }

    /// Switches to the connection of the latest step-up, if there was one since.
    fn refresh(&mut self) {
        let current = self.shared.current();
        if current.generation != self.generation {
            self.inner = current.channel.clone();
            self.target = current.target.clone();
            self.generation = current.generation;
        }
    }

    /// The address (`host:port`) this channel connects to.
    pub fn addr(&self) -> &str {
        &self.target.addr
    }
}

impl fmt::Debug for PortcullisChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortcullisChannel")
            .field("addr", &self.target.addr)
            .finish_non_exhaustive()
    }
}

/// Replaces an error caused by a refused connection with its `tonic::Status` (boxed, so that
/// tonic's `Status::from_error` finds it by downcast).
fn map_error(target: &Target, since: u64, err: BoxError) -> BoxError {
    if let Some(failure) = find_connect_failure(&*err) {
        return Box::new(failure.to_status());
    }
    match target.log.attribute(since, &io_messages(&*err)) {
        Some(failure) => Box::new(failure.to_status()),
        None => err,
    }
}

impl tower::Service<http::Request<Body>> for PortcullisChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.refresh();
        let since = self.target.log.latest_id();
        tower::Service::poll_ready(&mut self.inner, cx)
            .map_err(|e| map_error(&self.target, since, Box::new(e)))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Snapshot before the request is queued: the connection that carries it is this one
        // or a newer one.
        let since = self.target.log.latest_id();
        self.target.calls.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = request.into_parts();
        let head = Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
        };
        let tape = Tape::new(body);
        let request = http::Request::from_parts(parts, Body::new(tape.body()));
        let sent = tower::Service::call(&mut self.inner, request);
        let target = self.target.clone();
        let shared = self.shared.clone();
        let generation = self.generation;
        ResponseFuture {
            inner: Box::pin(async move {
                let response = sent
                    .await
                    .map_err(|e| map_error(&target, since, Box::new(e)))?;
                if !needs_step_up(&response) {
                    tape.stop();
                    return Ok(response);
                }
                let Some(body) = tape.replay() else {
                    tracing::debug!("step-up required, but the request is too large to resend");
                    return Ok(response);
                };
                match step_up(&shared, &target, generation).await {
                    Ok((channel, target)) => resend(channel, target, head.request(body)).await,
                    Err(StepUpFailed::GiveUp) => Ok(response),
                    Err(StepUpFailed::Error(e)) => Err(e),
                }
            }),
        }
    }
}

/// Whether a response is the refusal of a call that needs a fresher TOTP check.
fn needs_step_up(response: &http::Response<Body>) -> bool {
    let headers = response.headers();
    headers
        .get(REJECT_METADATA)
        .is_some_and(|v| v.as_bytes() == STEP_UP_REQUIRED.as_bytes())
        && headers
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"16")
}

enum StepUpFailed {
    /// Return the `step_up_required` response as it is.
    GiveUp,
    /// Return this error instead.
    Error(BoxError),
}

/// A connection whose TOTP check is newer than the call sent on connection `generation`: the
/// one a concurrent step-up made since, or a new one with a new code.
async fn step_up(
    shared: &Shared,
    target: &Target,
    generation: u64,
) -> Result<(Channel, Arc<Target>), StepUpFailed> {
    let _one_at_a_time = shared.stepping_up.lock().await;
    {
        let current = shared.current();
        if current.generation != generation {
            return Ok((current.channel.clone(), current.target.clone()));
        }
    }
    let client: &Arc<ClientInner> = &target.client;
    client.tickets.forget();
    let (code, spent) = fetch_code_for(target)
        .await
        .map_err(|failure| StepUpFailed::Error(Box::new(failure.to_status())))?;
    if spent.is_some() {
        return Err(StepUpFailed::GiveUp);
    }
    tracing::debug!(addr = %target.addr, "step-up required; connecting with a new code");
    let (channel, new_target) = connect_with_code(client, &target.addr, code)
        .await
        .map_err(|e| StepUpFailed::Error(client_error_status(e)))?;
    let mut current = shared.current();
    current.generation += 1;
    current.channel = channel.clone();
    current.target = new_target.clone();
    Ok((channel, new_target))
}

/// The status a caller gets for a failed step-up connection.
fn client_error_status(error: ClientError) -> BoxError {
    match error {
        ClientError::Rejected(status) => status,
        other => Box::new(tonic::Status::unavailable(other.to_string())),
    }
}

/// Sends the call again on the step-up connection.
async fn resend(
    mut channel: Channel,
    target: Arc<Target>,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let since = target.log.latest_id();
    target.calls.fetch_add(1, Ordering::SeqCst);
    let ready = channel
        .ready()
        .await
        .map_err(|e| map_error(&target, since, Box::new(e)))?;
    tower::Service::call(ready, request)
        .await
        .map_err(|e| map_error(&target, since, Box::new(e)))
}

/// What a request is, without its body, kept to send it again.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl Head {
    fn request(self, body: Body) -> http::Request<Body> {
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        *request.extensions_mut() = self.extensions;
        request
    }
}

/// A request body, and a copy of the frames sent of it (up to [`MAX_REPLAY_BYTES`]), so that
/// the call can be sent again: the copy, then what was not sent yet.
struct Tape(Arc<Mutex<TapeState>>);

struct TapeState {
    /// The rest of the body, not sent yet.
    rest: Option<Body>,
    /// Copies of the frames sent.
    sent: Vec<Frame<Bytes>>,
    /// The bytes in `sent`.
    size: usize,
    /// Whether the copy is incomplete (too large, a body error, or no longer wanted).
    broken: bool,
}

impl Tape {
    fn new(body: Body) -> Self {
        Self(Arc::new(Mutex::new(TapeState {
            rest: Some(body),
            sent: Vec::new(),
            size: 0,
            broken: false,
        })))
    }

    fn state(&self) -> MutexGuard<'_, TapeState> {
        lock_tape(&self.0)
    }

    /// The body to send: the original, recorded as it goes.
    fn body(&self) -> TapeBody {
        TapeBody(self.0.clone())
    }

    /// No replay is coming: stop copying and free the copy.
    fn stop(&self) {
        let mut state = self.state();
        state.broken = true;
        state.sent = Vec::new();
    }

    /// The body to send again, unless the copy is incomplete.
    fn replay(&self) -> Option<Body> {
        let mut state = self.state();
        if state.broken {
            return None;
        }
        state.broken = true;
        let frames: VecDeque<_> = std::mem::take(&mut state.sent).into();
        Some(Body::new(ReplayBody {
            frames,
            rest: state.rest.take(),
        }))
    }
}

fn lock_tape(state: &Mutex<TapeState>) -> MutexGuard<'_, TapeState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

/// The body hyper sends on the first attempt.
struct TapeBody(Arc<Mutex<TapeState>>);

impl HttpBody for TapeBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut state = lock_tape(&self.0);
        let Some(rest) = state.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(rest).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if !state.broken => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                match copy_frame(frame) {
                    Some(copy) if state.size + len <= MAX_REPLAY_BYTES => {
                        state.size += len;
                        state.sent.push(copy);
                    }
                    _ => {
                        state.broken = true;
                        state.sent = Vec::new();
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                state.broken = true;
                state.sent = Vec::new();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        lock_tape(&self.0)
            .rest
            .as_ref()
            .is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        lock_tape(&self.0)
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

/// The body of the second attempt: the frames sent the first time, then the rest.
struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

/// The response future of [`PortcullisChannel`].
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
