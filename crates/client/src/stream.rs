//! The connection's byte stream as hyper sees it: the Verdict is stripped off the front.
//!
//! The first reads take exactly one Verdict frame (7-byte header, then exactly its body) and
//! never a byte more: what follows belongs to HTTP/2. An accepting Verdict stores its session
//! ticket and from then on reads pass through. A rejecting one is recorded in the channel's
//! connection log and every read and write returns an `io::Error` whose text is the REASON.
//!
//! **The Prefix rides with hyper's first bytes.** The connector does not write the Prefix: the
//! stream holds it and puts it in front of the first bytes hyper writes (the HTTP/2 preface),
//! in one vectored write. rustls seals a vectored write as one TLS record, and tokio-rustls
//! hands it to the socket in one system call, so the Prefix and the preface leave together in
//! one record (and, when they fit, one TCP segment). A stream that is read or flushed before
//! hyper wrote anything sends the Prefix on its own, so the Verdict always comes.
//!
//! **Invisible ticket fallback.** A connection that carried a session ticket keeps a copy of
//! every byte hyper writes until its Verdict is in (at most [`REPLAY_LIMIT`] bytes; beyond
//! that, writes wait for the Verdict). If the Verdict is MFA_REQUIRED, the stream drops the
//! ticket, opens a new TCP and TLS connection, sends a Prefix with a code from the code source
//! followed by the saved bytes (in one record with whatever hyper writes next), and carries on
//! over the new connection: hyper never notices. This is safe because a server never lets
//! bytes pipelined behind a rejected Prefix reach a service (PROTOCOL.md section 5).
//!
//! **A bounded wait.** From the moment the stream is made (hyper writes the preface, and with
//! it the Prefix, at once), and again when a replacement connection is open, the stream waits
//! at most the client's connect timeout for the Verdict; a server that completes TLS but never
//! answers fails the connection with `timeout: no Verdict from the server within N s`
//! (UNAVAILABLE).
//!
//! **No reused code.** A connection that proved itself with a code and is accepted remembers
//! that code in the client, for that server (TLS server name and address). If, after
//! MFA_REQUIRED, the code source gives that same code again (a fixed code, or a TOTP secret
//! still in the same time step), it is not sent: the server would refuse it and count the
//! attempt towards the user's lockout. The caller gets the MFA_REQUIRED refusal instead.
//!
//! A write that fails before the Verdict is in (a server that rejects and closes quickly) is
//! not reported at once: the stream first reads the Verdict, so the caller learns the reason,
//! or the replacement connection takes the bytes.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use portcullis_core::RejectCode;
use portcullis_core::codec::{FrameKind, FrameReader, Progress, Verdict};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::client::TlsStream;
use zeroize::{Zeroize, Zeroizing};

use crate::dial::{ConnGuard, Proof, Reopened, redial};
use crate::error::{Failure, Rejection};
use crate::log::ConnState;

/// How many bytes a ticket-carrying connection keeps for a replay before writes wait.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// The most slices one write hands to TLS (the unsent bytes, then hyper's).
const MAX_SLICES: usize = 64;

type Redial = Pin<Box<dyn Future<Output = Result<Reopened, Failure>> + Send>>;

enum Phase {
    /// Reading exactly the Verdict (header, then body).
    Verdict(FrameReader),
    /// Accepted: bytes pass through.
    Open,
    /// Refused or broken before the Verdict was accepted.
    Failed(Failure),
}

impl Phase {
    fn verdict() -> Self {
        Self::Verdict(FrameReader::new(FrameKind::Verdict))
    }

    fn awaiting_verdict(&self) -> bool {
        matches!(self, Self::Verdict(_))
    }
}

/// The bytes saved for a replay, and the ticket the connection carried.
struct Replay {
    sent: Zeroizing<Vec<u8>>,
    ticket: Zeroizing<Vec<u8>>,
}

/// Bytes that go to TLS ahead of anything hyper writes: the encoded Prefix (on a replacement
/// connection followed by the replayed bytes). Wiped and freed as soon as TLS has taken them.
struct Unsent {
    buf: Zeroizing<Vec<u8>>,
    taken: usize,
}

impl Unsent {
    fn new(buf: Zeroizing<Vec<u8>>) -> Self {
        Self { buf, taken: 0 }
    }

    fn rest(&self) -> &[u8] {
        self.buf.get(self.taken..).unwrap_or_default()
    }

    fn is_empty(&self) -> bool {
        self.taken >= self.buf.len()
    }

    /// Marks `n` more bytes as taken by TLS.
    fn advance(&mut self, n: usize) {
        self.taken += n;
        if self.is_empty() {
            self.clear();
        }
    }

    /// Wipes and frees what is left.
    fn clear(&mut self) {
        self.buf = Zeroizing::new(Vec::new());
        self.taken = 0;
    }
}

/// A PCS1 connection after TLS, with its Prefix about to go out; see the module docs.
pub(crate) struct PcsStream {
    io: TlsStream<TcpStream>,
    /// The Prefix (and replayed bytes) not yet handed to TLS.
    unsent: Unsent,
    /// The stream itself handed unsent bytes to TLS, which may wait in rustls until a flush.
    flush_due: bool,
    phase: Phase,
    /// Present while a ticket-carrying connection waits for its Verdict.
    replay: Option<Replay>,
    /// The replacement connection being opened after MFA_REQUIRED.
    redial: Option<Redial>,
    /// The code the current connection's Prefix carried, until its Verdict is in.
    code: Option<Zeroizing<String>>,
    /// When the wait for the current connection's Verdict ends; armed while waiting.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A write error seen before the Verdict, reported once the Verdict is known.
    write_error: Option<io::Error>,
    guard: ConnGuard,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl PcsStream {
    /// A stream over a fresh TLS connection whose encoded Prefix is `prefix` (not yet
    /// written); `proof` is the ticket or code it carries. The wait for the Verdict starts
    /// now.
    pub(crate) fn new(
        io: TlsStream<TcpStream>,
        prefix: Zeroizing<Vec<u8>>,
        guard: ConnGuard,
        proof: Proof,
    ) -> Self {
        let (replay, code) = match proof {
            Proof::Ticket(ticket) => (
                Some(Replay {
                    sent: Zeroizing::new(Vec::new()),
                    ticket,
                }),
                None,
            ),
            Proof::Code(code) => (None, Some(code)),
        };
        let mut stream = Self {
            io,
            unsent: Unsent::new(prefix),
            flush_due: false,
            phase: Phase::verdict(),
            replay,
            redial: None,
            code,
            deadline: None,
            write_error: None,
            guard,
            read_waker: None,
            write_waker: None,
        };
        stream.arm_deadline();
        stream
    }

    /// How long a connection waits for its Verdict.
    fn verdict_timeout(&self) -> Duration {
        self.guard.target.client.connect_timeout
    }

    /// Starts the wait for the current connection's Verdict.
    fn arm_deadline(&mut self) {
        self.deadline = Some(Box::pin(tokio::time::sleep(self.verdict_timeout())));
    }

    /// Whether the wait for the Verdict is over; registers `cx` for the deadline otherwise.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    fn fail(&mut self, failure: Failure) {
        tracing::debug!(conn = self.guard.id, error = %failure.io_message(), "PCS1 connection refused or broken");
        self.replay = None;
        self.code = None;
        self.deadline = None;
        self.unsent.clear();
        self.guard.settle(ConnState::Failed(failure.clone()));
        self.phase = Phase::Failed(failure);
        self.wake_all();
    }

    /// Drives a replacement connection, if one is being opened. Ready when there is none (any
    /// more).
    fn poll_redial(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(fut) = self.redial.as_mut() else {
            return Poll::Ready(());
        };
        let result = ready!(fut.as_mut().poll(cx));
        self.redial = None;
        match result {
            Ok(reopened) => {
                tracing::debug!(conn = self.guard.id, "PCS1 connection reopened with a code");
                self.io = reopened.tls;
                self.unsent = Unsent::new(reopened.frame);
                self.flush_due = false;
                self.code = Some(reopened.code);
                self.phase = Phase::verdict();
                self.write_error = None;
                self.arm_deadline();
                self.wake_all();
            }
            Err(failure) => self.fail(failure),
        }
        Poll::Ready(())
    }

    /// Hands the unsent bytes to TLS on their own and flushes them. Used when the stream is
    /// read or flushed before hyper wrote anything, so that the Prefix goes out regardless.
    /// A failure wipes the unsent bytes: the connection cannot carry them any more.
    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.unsent.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, self.unsent.rest())) {
                Ok(0) => {
                    self.unsent.clear();
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    self.unsent.advance(n);
                    self.flush_due = true;
                }
                Err(e) => {
                    self.unsent.clear();
                    return Poll::Ready(Err(e));
                }
            }
        }
        if self.flush_due {
            let flushed = ready!(Pin::new(&mut self.io).poll_flush(cx));
            self.flush_due = false;
            flushed?;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bufs` behind the unsent bytes in one vectored write: rustls seals it as one
    /// TLS record and sends it in one system call. Returns how many bytes of `bufs` TLS took.
    fn poll_write_behind_unsent(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.unsent.is_empty() {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            let ahead = self.unsent.rest().len();
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(self.unsent.rest());
            let mut count = 1;
            for buf in bufs.iter().filter(|b| !b.is_empty()).take(MAX_SLICES - 1) {
                slices[count] = *buf;
                count += 1;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            self.unsent.advance(n.min(ahead));
            if n > ahead {
                return Poll::Ready(Ok(n - ahead));
            }
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            // TLS took all or part of the unsent bytes and none of `bufs` (its buffer was
            // full): go on with what is left.
            if self.unsent.is_empty() {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
        }
    }

    /// Reads the Verdict (and drives a replacement connection) until the connection is open or
    /// failed.
    fn poll_verdict(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_redial(cx));
            if self.phase.awaiting_verdict() && self.deadline_passed(cx) {
                let timeout = self.verdict_timeout();
                self.fail(Failure::Timeout(timeout));
                continue;
            }
            // No Verdict comes before the Prefix: send it now if hyper has not written yet. A
            // write that cannot go on at once registers `cx`; the read below goes on anyway.
            if self.phase.awaiting_verdict()
                && self.write_error.is_none()
                && let Poll::Ready(Err(e)) = self.poll_send_unsent(cx)
            {
                self.write_error = Some(e);
            }
            let Self { io, phase, .. } = self;
            let reader = match phase {
                Phase::Open => return Poll::Ready(Ok(())),
                Phase::Failed(f) => return Poll::Ready(Err(f.io_error())),
                Phase::Verdict(reader) => reader,
            };
            let mut rb = ReadBuf::new(reader.unfilled());
            let read = ready!(Pin::new(io).poll_read(cx, &mut rb)).map(|()| rb.filled().len());
            match read {
                Err(e) => {
                    let failure = Failure::from_read_error(&e, &self.guard.target.client.ca_hints);
                    self.fail(failure);
                }
                Ok(0) => self.fail(Failure::Io {
                    kind: io::ErrorKind::UnexpectedEof,
                    detail: "the server closed the connection before its verdict".into(),
                }),
                Ok(n) => match reader.filled(n) {
                    Ok(Progress::More) => {}
                    Ok(Progress::Done) => {
                        if let Phase::Verdict(reader) =
                            std::mem::replace(&mut self.phase, Phase::Open)
                        {
                            self.on_verdict(reader.body());
                        }
                    }
                    Err(e) => self.fail(Failure::Protocol(format!(
                        "the server's verdict is malformed: {e}"
                    ))),
                },
            }
        }
    }

    /// Acts on a complete Verdict body.
    fn on_verdict(&mut self, body: &[u8]) {
        let mut verdict = match Verdict::decode_body(body) {
            Ok(v) => v,
            Err(e) => {
                return self.fail(Failure::Protocol(format!(
                    "the server's verdict is malformed: {e}"
                )));
            }
        };
        let target = self.guard.target.clone();
        let client = &target.client;
        client.record_verdict(&verdict);
        if verdict.is_accepted() {
            let code = self.code.take();
            let earned_session = verdict.session.is_some();
            if let Some((mut ticket, expires_ms)) = verdict.session.take() {
                client.tickets.store(
                    &target.server_name_text(),
                    &target.addr,
                    ticket.clone(),
                    expires_ms,
                );
                ticket.zeroize();
            }
            if let Some(code) = code {
                client.remember_spent_code(
                    &target.server_name_text(),
                    &target.addr,
                    code,
                    earned_session,
                );
            }
            tracing::debug!(conn = self.guard.id, "PCS1 connection accepted");
            self.replay = None;
            self.deadline = None;
            self.phase = Phase::Open;
            self.guard.settle(ConnState::Accepted);
            self.wake_all();
            return;
        }
        let rejection = Arc::new(Rejection {
            status: verdict.status,
            reason: verdict.reason.take(),
            reference: verdict.reference,
            retry_after_s: verdict.retry_after_s,
        });
        if verdict.reject_code() == Some(RejectCode::MfaRequired)
            && let Some(replay) = self.replay.take()
        {
            client.tickets.discard(&replay.ticket);
            tracing::debug!(
                conn = self.guard.id,
                "session ticket refused (mfa_required); reopening the connection with a code"
            );
            // The replacement is bounded on its own; its Verdict gets a fresh deadline.
            self.deadline = None;
            self.unsent.clear();
            self.redial = Some(Box::pin(redial(target.clone(), replay.sent, rejection)));
            self.phase = Phase::verdict();
            return;
        }
        self.fail(Failure::Rejected(rejection));
    }

    /// Waits for the Verdict on behalf of a writer; Ready(Ok) once the connection is open.
    fn writer_waits(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_verdict(cx) {
            Poll::Pending => {
                self.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// Every write: straight through once the connection is open, else behind the unsent
    /// Prefix, kept for a replay while a ticket waits for its Verdict.
    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.poll_redial(cx).is_pending() {
                self.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match &self.phase {
                Phase::Failed(f) => return Poll::Ready(Err(f.io_error())),
                Phase::Open => {
                    if let Some(e) = self.write_error.take() {
                        return Poll::Ready(Err(e));
                    }
                    return self.poll_write_behind_unsent(cx, bufs);
                }
                Phase::Verdict(_) => {}
            }
            let full = self
                .replay
                .as_ref()
                .is_some_and(|r| r.sent.len() >= REPLAY_LIMIT);
            if self.write_error.is_some() || full {
                ready!(self.writer_waits(cx))?;
                continue;
            }
            // A ticket-carrying connection writes no more than it can replay.
            let mut room = self
                .replay
                .as_ref()
                .map_or(usize::MAX, |r| REPLAY_LIMIT - r.sent.len());
            let mut limited = [IoSlice::new(&[]); MAX_SLICES - 1];
            let mut count = 0;
            for buf in bufs.iter().filter(|b| !b.is_empty()) {
                if room == 0 || count == limited.len() {
                    break;
                }
                let take = buf.len().min(room);
                limited[count] = IoSlice::new(&buf[..take]);
                room -= take;
                count += 1;
            }
            let limited = &limited[..count];
            match ready!(self.poll_write_behind_unsent(cx, limited)) {
                Ok(n) => {
                    if let Some(replay) = self.replay.as_mut() {
                        let mut left = n;
                        for buf in limited {
                            let take = buf.len().min(left);
                            replay.sent.extend_from_slice(&buf[..take]);
                            left -= take;
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => {
                    self.unsent.clear();
                    self.write_error = Some(e);
                }
            }
        }
    }
}

impl AsyncRead for PcsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_verdict(cx) {
            Poll::Pending => {
                this.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PcsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Open)
            && this.unsent.is_empty()
            && this.write_error.is_none()
            && this.redial.is_none()
        {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.poll_write_slices(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.poll_redial(cx).is_pending() {
                this.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match &this.phase {
                Phase::Failed(f) => return Poll::Ready(Err(f.io_error())),
                Phase::Open => {
                    if let Some(e) = this.write_error.take() {
                        return Poll::Ready(Err(e));
                    }
                    ready!(this.poll_send_unsent(cx))?;
                    return Pin::new(&mut this.io).poll_flush(cx);
                }
                Phase::Verdict(_) => {}
            }
            if this.write_error.is_some() {
                ready!(this.writer_waits(cx))?;
                continue;
            }
            let flushed = match ready!(this.poll_send_unsent(cx)) {
                Ok(()) => ready!(Pin::new(&mut this.io).poll_flush(cx)),
                Err(e) => Err(e),
            };
            match flushed {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) => this.write_error = Some(e),
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.redial = None;
        if this.phase.awaiting_verdict() {
            // Closing before the Verdict: nothing will read it any more.
            this.replay = None;
            this.unsent.clear();
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::Service;

    use super::*;
    use crate::connector::PcsConnector;
    use crate::test_server::{H2_PREFACE, Pki, TestServer};
    use crate::{Client, CodeSource};

    /// A stream as the connector hands it to hyper, before hyper wrote anything.
    async fn fresh_stream(pki: &Pki, server: &TestServer) -> (PcsStream, ConnGuardProbe) {
        let client = Client::builder()
            .tls_config(pki.client_config())
            .server_name("localhost")
            .user("alice")
            .code_source(CodeSource::fixed("123456"))
            .build()
            .unwrap();
        let (target, _) = client.target(&server.addr()).unwrap();
        let io: TokioIo<PcsStream> = PcsConnector {
            target: target.clone(),
        }
        .call(http::Uri::from_static("http://localhost"))
        .await
        .unwrap();
        (io.into_inner(), ConnGuardProbe(target))
    }

    /// Reads the state of the channel's first connection.
    struct ConnGuardProbe(Arc<crate::dial::Target>);

    impl ConnGuardProbe {
        fn first(&self) -> Option<ConnState> {
            self.0.log.state(1)
        }
    }

    /// Reads the server's first HTTP/2 frame header (its SETTINGS) through the stream.
    async fn first_frame_type(reader: &mut (impl AsyncRead + Unpin)) -> u8 {
        let mut head = [0u8; 9];
        reader.read_exact(&mut head).await.unwrap();
        head[3]
    }

    const SETTINGS: u8 = 0x4;

    #[tokio::test]
    async fn a_read_before_any_write_sends_the_prefix() {
        tokio::time::timeout(Duration::from_secs(120), async {
            let pki = Pki::new();
            let server = TestServer::start(&pki).await;
            let (stream, probe) = fresh_stream(&pki, &server).await;
            let (mut reader, mut writer) = tokio::io::split(stream);
            // The read is all that runs: it must send the Prefix, or no Verdict ever comes.
            let read = tokio::spawn(async move { first_frame_type(&mut reader).await });
            server.state.prefix_read.notified().await;
            assert_eq!(probe.first(), Some(ConnState::Pending));
            // The test server answers once the preface is behind the Prefix.
            writer.write_all(H2_PREFACE).await.unwrap();
            writer.flush().await.unwrap();
            assert_eq!(read.await.unwrap(), SETTINGS, "the Verdict was stripped");
            assert_eq!(probe.first(), Some(ConnState::Accepted));
            let seen = server.state.seen();
            assert_eq!(seen.len(), 1);
            assert!(
                !seen[0].preface_in_prefix_record,
                "the Prefix went out on its own"
            );
            assert!(seen[0].verdict.is_accepted());
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_flush_before_any_write_sends_the_prefix() {
        tokio::time::timeout(Duration::from_secs(120), async {
            let pki = Pki::new();
            let server = TestServer::start(&pki).await;
            let (mut stream, probe) = fresh_stream(&pki, &server).await;
            stream.flush().await.unwrap();
            server.state.prefix_read.notified().await;
            stream.write_all(H2_PREFACE).await.unwrap();
            stream.flush().await.unwrap();
            assert_eq!(first_frame_type(&mut stream).await, SETTINGS);
            assert_eq!(probe.first(), Some(ConnState::Accepted));
            assert!(!server.state.seen()[0].preface_in_prefix_record);
        })
        .await
        .unwrap();
    }
}
