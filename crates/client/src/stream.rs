//! The connection's byte stream as hyper sees it: the Verdict is stripped off the front.
//!
//! The first reads take exactly one Verdict frame (7-byte header, then exactly its body) and
//! never a byte more: what follows belongs to HTTP/2. An accepting Verdict stores its session
//! ticket and from then on reads pass through. A rejecting one is recorded in the channel's
//! connection log and every read and write returns an `io::Error` whose text is the REASON.
//!
//! **Invisible ticket fallback.** A connection that carried a session ticket keeps a copy of
//! every byte hyper writes until its Verdict is in (at most [`REPLAY_LIMIT`] bytes; beyond
//! that, writes wait for the Verdict). If the Verdict is MFA_REQUIRED, the stream drops the
//! ticket, opens a new TCP and TLS connection, sends a Prefix with a code from the code source
//! followed by the saved bytes, and carries on over the new connection: hyper never notices.
//! This is safe because a server never lets bytes pipelined behind a rejected Prefix reach a
//! service (PROTOCOL.md section 5).
//!
//! **A bounded wait.** From the moment the Prefix is sent (and again when a replacement
//! connection has sent its own), the stream waits at most the client's connect timeout for the
//! Verdict; a server that completes TLS but never answers fails the connection with
//! `timeout: no Verdict from the server within N s` (UNAVAILABLE).
//!
//! **No reused code.** A connection that proved itself with a code and is accepted remembers
//! that code in the client. If, after MFA_REQUIRED, the code source gives that same code again
//! (a fixed code, or a TOTP secret still in the same time step), it is not sent: the server
//! would refuse it and count the attempt towards the user's lockout. The caller gets the
//! MFA_REQUIRED refusal instead.
//!
//! A write that fails before the Verdict is in (a server that rejects and closes quickly) is
//! not reported at once: the stream first reads the Verdict, so the caller learns the reason,
//! or the replacement connection takes the bytes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use portcullis_core::RejectCode;
use portcullis_core::codec::{FrameHeader, FrameKind, HEADER_LEN, Verdict};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::client::TlsStream;
use zeroize::{Zeroize, Zeroizing};

use crate::connector::{ConnGuard, Proof, redial};
use crate::error::{Failure, Rejection};
use crate::log::ConnState;

/// How many bytes a ticket-carrying connection keeps for a replay before writes wait.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

type Redial = Pin<
    Box<dyn Future<Output = Result<(TlsStream<TcpStream>, Zeroizing<String>), Failure>> + Send>,
>;

enum Phase {
    /// Reading the Verdict's header.
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    /// Reading exactly the Verdict's body.
    Body { buf: Vec<u8>, filled: usize },
    /// Accepted: bytes pass through.
    Open,
    /// Refused or broken before the Verdict was accepted.
    Failed(Failure),
}

impl Phase {
    fn header() -> Self {
        Self::Header {
            buf: [0; HEADER_LEN],
            filled: 0,
        }
    }

    fn awaiting_verdict(&self) -> bool {
        matches!(self, Self::Header { .. } | Self::Body { .. })
    }
}

/// The bytes saved for a replay, and the ticket the connection carried.
struct Replay {
    sent: Zeroizing<Vec<u8>>,
    ticket: Zeroizing<Vec<u8>>,
}

/// A PCS1 connection after the Prefix was sent; see the module docs.
pub(crate) struct PcsStream {
    io: TlsStream<TcpStream>,
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
    /// A stream whose Prefix was just sent; `proof` is the ticket or code it carried. The
    /// wait for the Verdict starts now.
    pub(crate) fn new(io: TlsStream<TcpStream>, guard: ConnGuard, proof: Proof) -> Self {
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
            phase: Phase::header(),
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
            Ok((io, code)) => {
                tracing::debug!(conn = self.guard.id, "PCS1 connection reopened with a code");
                self.io = io;
                self.code = Some(code);
                self.phase = Phase::header();
                self.write_error = None;
                self.arm_deadline();
                self.wake_all();
            }
            Err(failure) => self.fail(failure),
        }
        Poll::Ready(())
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
            let Self { io, phase, .. } = self;
            let (buf, filled): (&mut [u8], &mut usize) = match phase {
                Phase::Open => return Poll::Ready(Ok(())),
                Phase::Failed(f) => return Poll::Ready(Err(f.io_error())),
                Phase::Header { buf, filled } => (buf, filled),
                Phase::Body { buf, filled } => (buf, filled),
            };
            if *filled < buf.len() {
                let mut rb = ReadBuf::new(&mut buf[*filled..]);
                match ready!(Pin::new(io).poll_read(cx, &mut rb)) {
                    Err(e) => {
                        self.fail(Failure::from_read_error(&e));
                        continue;
                    }
                    Ok(()) if rb.filled().is_empty() => {
                        self.fail(Failure::Io {
                            kind: io::ErrorKind::UnexpectedEof,
                            detail: "the server closed the connection before its verdict".into(),
                        });
                        continue;
                    }
                    Ok(()) => *filled += rb.filled().len(),
                }
            }
            if *filled < buf.len() {
                continue;
            }
            match std::mem::replace(&mut self.phase, Phase::Open) {
                Phase::Header { buf, .. } => match FrameHeader::parse(&buf, FrameKind::Verdict) {
                    Ok(header) => {
                        self.phase = Phase::Body {
                            buf: vec![0; header.body_len],
                            filled: 0,
                        }
                    }
                    Err(e) => self.fail(Failure::Protocol(format!(
                        "the server's verdict is malformed: {e}"
                    ))),
                },
                Phase::Body { buf, .. } => self.on_verdict(&buf),
                other => self.phase = other,
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
            if let Some((mut ticket, expires_ms)) = verdict.session.take() {
                client.tickets.store(
                    &target.server_name_text(),
                    &target.addr,
                    ticket.clone(),
                    expires_ms,
                );
                ticket.zeroize();
            }
            if let Some(code) = self.code.take() {
                client.remember_accepted_code(code);
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
            self.redial = Some(Box::pin(redial(target.clone(), replay.sent, rejection)));
            self.phase = Phase::header();
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
                    return Pin::new(&mut this.io).poll_write(cx, data);
                }
                Phase::Header { .. } | Phase::Body { .. } => {}
            }
            let full = this
                .replay
                .as_ref()
                .is_some_and(|r| r.sent.len() >= REPLAY_LIMIT);
            if this.write_error.is_some() || full {
                ready!(this.writer_waits(cx))?;
                continue;
            }
            let room = this
                .replay
                .as_ref()
                .map_or(data.len(), |r| REPLAY_LIMIT - r.sent.len());
            let chunk = &data[..data.len().min(room)];
            match ready!(Pin::new(&mut this.io).poll_write(cx, chunk)) {
                Ok(n) => {
                    if let Some(replay) = this.replay.as_mut() {
                        replay.sent.extend_from_slice(&chunk[..n]);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => this.write_error = Some(e),
            }
        }
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
                    return Pin::new(&mut this.io).poll_flush(cx);
                }
                Phase::Header { .. } | Phase::Body { .. } => {}
            }
            if this.write_error.is_some() {
                ready!(this.writer_waits(cx))?;
                continue;
            }
            match ready!(Pin::new(&mut this.io).poll_flush(cx)) {
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
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
