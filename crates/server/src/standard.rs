//! Standard gRPC clients (PROTOCOL.md section 7): connections that negotiated ALPN `h2`
//! instead of `portcullis/1`, when [`crate::Builder::standard_clients`] is on.
//!
//! Such a client sends no Prefix, so it cannot prove a second factor on the connection. It is
//! let in on the strength of its device alone: the client certificate's fingerprint must be
//! bound to a user, not revoked, the user not locked out, and the device must hold a **live
//! session** in the registry ([`portcullis_core::SessionStore::live_session_for_device`]; the
//! decision is [`portcullis_core::Gate::plan_standard`]): one
//! that a Portcullis client (or `portcullis login`) earned from the same device with a TOTP
//! code, not expired and not revoked. The connection policy
//! ([`crate::Builder::policy`]) applies as for any connection. The connection is then handed to
//! tonic like an authenticated Portcullis connection: its [`crate::AuthContext`] has method
//! `session`, the session's TOTP time and expiry, and a REF of its own.
//!
//! Otherwise no service is reached: a minimal HTTP/2 responder answers every request on the
//! connection with a trailers-only gRPC response (HTTP 200, `content-type: application/grpc`,
//! `grpc-status` the reject code's gRPC status, `grpc-message` the reject name, `: ` and a hint
//! naming cause and fix, percent-encoded as the gRPC spec says), with the metadata
//! `portcullis-reject`, `portcullis-ref` and, when there is one, `portcullis-retry-after`,
//! then closes the connection (GOAWAY) after the first response, or when the connection's
//! deadline passes without a request.

use std::time::Duration;

use portcullis_core::{Decision, Ref, RejectCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, timeout_at};

/// The ALPN id of standard gRPC clients (HTTP/2 over TLS).
pub const ALPN_H2: &[u8] = b"h2";

/// How long a refused connection stays open after its first response, for requests the client
/// had already sent.
const AFTER_RESPONSE_LIMIT: Duration = Duration::from_millis(500);

/// The most header bytes a refused connection's requests may carry.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A refusal sent as a gRPC status.
#[derive(Debug, Clone)]
pub(crate) struct GrpcRefusal {
    /// The reject code (its gRPC status, its name in `portcullis-reject`).
    pub(crate) code: RejectCode,
    /// The whole `grpc-message` before encoding: `name: hint`.
    pub(crate) message: String,
    /// The REF of the audit record.
    pub(crate) reference: Ref,
    /// Seconds to wait, for the codes that carry it.
    pub(crate) retry_after_s: Option<u32>,
}

impl GrpcRefusal {
    /// The refusal of a decision that was not an accept (`None` for an accept).
    pub(crate) fn of(decision: &Decision) -> Option<Self> {
        let rejection = decision.outcome.as_ref().err()?;
        let message = decision
            .verdict
            .reason
            .clone()
            .unwrap_or_else(|| rejection.code.name().to_owned());
        Some(Self {
            code: rejection.code,
            message,
            reference: decision.reference,
            retry_after_s: decision.verdict.retry_after_s,
        })
    }
}

/// Encodes a `grpc-message` value as the gRPC spec says: bytes from space to `~` stand for
/// themselves except `%`; every other byte of the UTF-8 text is `%XX` (upper-case hex).
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The trailers-only gRPC response of a refusal.
fn response(refusal: &GrpcRefusal) -> http::Response<()> {
    let mut builder = http::Response::builder()
        .status(http::StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", refusal.code.grpc_code().to_string())
        .header("grpc-message", percent_encode(&refusal.message))
        .header("portcullis-reject", refusal.code.name())
        .header("portcullis-ref", refusal.reference.to_string());
    if let Some(secs) = refusal.retry_after_s {
        builder = builder.header("portcullis-retry-after", secs.to_string());
    }
    // Every value above is visible ASCII: the builder cannot fail.
    builder.body(()).unwrap_or_default()
}

/// Speaks just enough HTTP/2 on `io` to answer every request with `refusal` as a gRPC status,
/// then closes: GOAWAY after the first response (requests already sent are answered the same
/// way for a short while), or at `deadline` when no request came.
pub(crate) async fn respond_refused<IO>(io: IO, refusal: &GrpcRefusal, deadline: Instant)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(8)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_window_size(16 * 1024);
    let mut conn = match timeout_at(deadline, builder.handshake::<IO, bytes::Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        _ => return,
    };
    let answer = response(refusal);
    let first = timeout_at(deadline, conn.accept()).await;
    if let Ok(Some(Ok((_request, mut respond)))) = first {
        let _ = respond.send_response(answer.clone(), true);
    }
    conn.graceful_shutdown();
    let limit = Instant::now() + AFTER_RESPONSE_LIMIT;
    while let Ok(Some(Ok((_request, mut respond)))) = timeout_at(limit, conn.accept()).await {
        let _ = respond.send_response(answer.clone(), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded_as_the_spec_says() {
        assert_eq!(percent_encode("plain text: ok (1)"), "plain text: ok (1)");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
        assert_eq!(percent_encode("…"), "%E2%80%A6");
        assert_eq!(percent_encode("~ "), "~ ");
    }

    #[test]
    fn the_response_is_trailers_only_with_the_status_and_portcullis_metadata() {
        let refusal = GrpcRefusal {
            code: RejectCode::RateLimited,
            message: "rate_limited: slow down — 3 s".into(),
            reference: Ref([0x11; 16]),
            retry_after_s: Some(3),
        };
        let r = response(&refusal);
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["grpc-message"], "rate_limited: slow down %E2%80%94 3 s");
        assert_eq!(h["portcullis-reject"], "rate_limited");
        assert_eq!(h["portcullis-ref"], "11".repeat(16));
        assert_eq!(h["portcullis-retry-after"], "3");
    }
}
