//! # portcullis-client
//!
//! The client side of PCS1 (PROTOCOL.md): a tonic channel whose every connection is TCP, TLS 1.3
//! with the device's client certificate and ALPN `portcullis/1`, then a Prefix that names the
//! user and proves the second factor, bound to the TLS connection.
//!
//! ```text
//! Client::connect ──► connector: TCP ─► TLS 1.3 (mTLS) ─► Prefix encoded ─► stream to hyper
//!                                                                 │
//!                     PcsStream: hyper's first write ─► [Prefix | HTTP/2 preface]
//!                                (one TLS record, one system call: pipelining)
//!                     PcsStream: first reads take exactly the Verdict, then HTTP/2 flows
//! ```
//!
//! - **Pipelining.** The connector hands the stream to hyper without waiting for the Verdict,
//!   so a connection costs no extra round trip. The stream puts the Prefix in front of
//!   hyper's first bytes, the HTTP/2 preface, so that both leave in one TLS record and one
//!   write to the socket (a stream read or flushed first sends the Prefix alone). The
//!   stream's first reads consume exactly one Verdict frame, never a byte of HTTP/2.
//! - **Channel binding.** The Prefix carries the RFC 9266 `tls-exporter` value of its own
//!   connection, so a Prefix cannot be replayed through another TLS connection.
//! - **Codes and sessions.** The first connection uses a code from the [`CodeSource`]; an
//!   accepting Verdict may carry a session ticket, which later connections send instead of a
//!   code until it expires. A ticket is only sent to the address and the TLS server name it
//!   was issued under. When the server answers MFA_REQUIRED to a ticket, the connection is
//!   reopened with a code and the bytes already written are replayed: the caller sees no
//!   error. If the code source gives the code that server already accepted from this client
//!   (a fixed code, or a TOTP secret within the same time step), that code is not sent again
//!   (the server would refuse it and count the attempt towards the user's lockout): the call
//!   fails with the MFA_REQUIRED status instead. The same holds for a new connection without
//!   a ticket (it expired, or [`Client::forget_session`] dropped it) whose code earned a
//!   session there already: the call fails at once, UNAUTHENTICATED `code: ...`, saying to
//!   give the next code.
//! - **Bounded waits.** Every connection waits at most the connect timeout for TCP and TLS,
//!   and again for the Verdict; a server that never answers makes the call fail with
//!   UNAVAILABLE, `timeout: no Verdict from the server within N s`.
//! - **Errors a program can act on.** A refused connection surfaces as a `tonic::Status` with
//!   the gRPC code of PROTOCOL.md section 4, the REASON as message (`mfa_failed: ...`) and the
//!   metadata `portcullis-reject` and `portcullis-ref` — never as "transport error".
//! - **Secrets stay secret.** Codes, TOTP secrets and tickets appear in no `Debug` output,
//!   error or log line, and are wiped from memory when dropped.
//!
//! Start with [`Client::builder`].

mod channel;
mod client;
mod code;
mod connector;
mod dial;
mod error;
mod log;
mod session;
mod stream;
/// The test-only PCS1 server of the integration tests, for the unit tests of the stream.
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_server;

pub use channel::{MAX_REPLAY_BYTES, PortcullisChannel, ResponseFuture};
pub use client::{Client, ClientBuilder, DEFAULT_AGENT, DEFAULT_CONNECT_TIMEOUT, SECRET_ENV};
pub use code::{CodeCallback, CodeSource};
pub use error::{ClientError, FIX_METADATA, REF_METADATA, REJECT_METADATA, RETRY_AFTER_METADATA};
pub use session::{SessionFiles, SessionInfo, VerdictInfo};
