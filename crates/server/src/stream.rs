//! The stream of an authenticated connection, handed to tonic at the first byte after the
//! Prefix.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::context::{AuthContext, PortcullisConnectInfo};
use crate::revocation::{Revocation, Side, Watch};

/// A TLS connection that passed the gate. Reads start at the first byte after the Prefix.
///
/// Once the server closes it (its device or certificate was revoked: see the
/// [`revocation`](crate::revocation) module), every read and write fails with
/// `ConnectionAborted`, and hyper drops the connection.
#[derive(Debug)]
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    info: PortcullisConnectInfo,
    watch: Option<Watch>,
}

impl AuthenticatedStream {
    pub(crate) fn new(inner: TlsStream<TcpStream>, auth: AuthContext) -> Self {
        let mut tls = inner.connect_info();
        // The client's address, which behind a balancer with PROXY protocol is not the TCP
        // peer's: `request.remote_addr()` says the same as the audit record.
        tls.get_mut().remote_addr = Some(auth.peer_addr);
        Self {
            inner,
            info: PortcullisConnectInfo {
                tls,
                auth: Arc::new(auth),
            },
            watch: None,
        }
    }

    /// Registers the connection with the server's live connections, which may close it: when
    /// its device or certificate is revoked, and when `session` (the session it holds or
    /// earned) is revoked.
    pub(crate) fn watched(
        self,
        revocation: &Arc<Revocation>,
        session: Option<portcullis_core::SessionId>,
    ) -> Self {
        self.register(revocation, session, false)
    }

    /// Like [`AuthenticatedStream::watched`], for a connection let in on `session` alone (a
    /// standard client): it is also closed when that session expires.
    pub(crate) fn watched_session(
        self,
        revocation: &Arc<Revocation>,
        session: Option<portcullis_core::SessionId>,
    ) -> Self {
        self.register(revocation, session, true)
    }

    fn register(
        mut self,
        revocation: &Arc<Revocation>,
        session: Option<portcullis_core::SessionId>,
        lives_with_session: bool,
    ) -> Self {
        self.watch = Some(revocation.register(
            self.info.auth.clone(),
            self.info.tls.peer_certs(),
            session,
            lives_with_session,
        ));
        self
    }

    /// `Err` once the server closed the connection.
    fn check(&self) -> io::Result<()> {
        self.watch.as_ref().map_or(Ok(()), Watch::check)
    }

    /// After the inner stream returned `Pending`: wake this side when the connection is closed.
    fn park<T>(
        &self,
        side: Side,
        cx: &Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match (&self.watch, polled.is_pending()) {
            (Some(watch), true) => match watch.park(side, cx.waker()) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            _ => polled,
        }
    }

    /// The authenticated identity.
    pub fn auth(&self) -> &AuthContext {
        &self.info.auth
    }
}

impl Connected for AuthenticatedStream {
    type ConnectInfo = PortcullisConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.park(Side::Read, cx, polled)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.park(Side::Write, cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.park(Side::Write, cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.park(Side::Write, cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
