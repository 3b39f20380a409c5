//! [`PortcullisChannel`]: tonic's `Channel` over PCS1 connections, with refused connections
//! reported as the `tonic::Status` of PROTOCOL.md section 4.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::Channel;
use tower::BoxError;

use crate::connector::Target;
use crate::error::{find_connect_failure, io_messages};

/// A gRPC channel whose connections go through the PCS1 gate.
///
/// Use it wherever tonic takes a channel, for example `EchoClient::new(channel)`. It is cheap
/// to clone: clones share the connection. When an RPC fails because the server refused the
/// connection, the error is a `tonic::Status` with the gRPC code of PROTOCOL.md section 4, the
/// REASON as message (`mfa_failed: ...`) and the metadata `portcullis-reject` (the reject
/// name), `portcullis-ref` (the REF in hex) and, when the server sent one,
/// `portcullis-retry-after` (seconds). A TLS failure is UNAVAILABLE with a message that starts
/// with `tls: `. Other errors pass through as tonic reports them.
#[derive(Clone)]
pub struct PortcullisChannel {
    inner: Channel,
    target: Arc<Target>,
}

impl PortcullisChannel {
    pub(crate) fn new(inner: Channel, target: Arc<Target>) -> Self {
        Self { inner, target }
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
        let since = self.target.log.latest_id();
        tower::Service::poll_ready(&mut self.inner, cx)
            .map_err(|e| map_error(&self.target, since, Box::new(e)))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Snapshot before the request is queued: the connection that carries it is this one
        // or a newer one.
        let since = self.target.log.latest_id();
        self.target.calls.fetch_add(1, Ordering::SeqCst);
        ResponseFuture {
            inner: tower::Service::call(&mut self.inner, request),
            target: self.target.clone(),
            since,
        }
    }
}

/// The response future of [`PortcullisChannel`].
pub struct ResponseFuture {
    inner: tonic::transport::channel::ResponseFuture,
    target: Arc<Target>,
    since: u64,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        Pin::new(&mut this.inner)
            .poll(cx)
            .map_err(|e| map_error(&this.target, this.since, Box::new(e)))
    }
}
