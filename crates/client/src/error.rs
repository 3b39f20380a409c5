//! The client's errors, and how a refused connection becomes a [`tonic::Status`].
//!
//! Inside the crate every way a connection can fail before HTTP/2 takes over is a [`Failure`]:
//! a rejecting Verdict, a TLS problem, a socket error, a server that breaks PCS1, a code source
//! that cannot give a code. A `Failure` turns into the `tonic::Status` an RPC reports
//! (PROTOCOL.md section 4), into the `io::Error` the connection's stream returns to hyper, and
//! into the [`ClientError`] of an eager [`Client::connect`](crate::Client::connect).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::RejectCode;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key of a rejected call: the reject name, e.g. `mfa_failed`.
pub const REJECT_METADATA: &str = "portcullis-reject";
/// Metadata key of a rejected call: the Verdict's REF in lower-case hex.
pub const REF_METADATA: &str = "portcullis-ref";
/// Metadata key of a rejected call: the Verdict's RETRY_AFTER in seconds, when it has one.
pub const RETRY_AFTER_METADATA: &str = "portcullis-retry-after";

/// Why the client could not be built or could not connect.
///
/// No variant ever holds a TOTP code, a TOTP secret or a session ticket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The builder or the address is incomplete or invalid.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The TCP connection failed, or the connection was lost before the server's Verdict.
    #[error("could not connect: {0}")]
    Connect(#[source] io::Error),
    /// The TLS handshake failed, or the server refused the client certificate.
    #[error("tls: {0}")]
    Tls(String),
    /// The server's Verdict rejected the connection; the status is the one an RPC would report.
    #[error("the server rejected the connection: {}", .0.message())]
    Rejected(Box<Status>),
    /// The code source could not give a code.
    #[error("the code source failed: {0}")]
    Code(String),
    /// The server broke the PCS1 protocol (for example a malformed Verdict).
    #[error("the server broke the PCS1 protocol: {0}")]
    Protocol(String),
    /// The server gave no Verdict within the connect timeout.
    #[error("no verdict from the server within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The HTTP/2 layer failed for another reason.
    #[error("transport: {0}")]
    Transport(String),
}

impl ClientError {
    /// The `tonic::Status` of a rejected connection, if this is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Rejected(status) => Some(status),
            _ => None,
        }
    }
}

/// A rejecting Verdict, as much of it as a caller may see (never a ticket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// The STATUS byte.
    pub(crate) status: u8,
    /// The REASON as the server sent it (may be absent).
    pub(crate) reason: Option<String>,
    /// The REF.
    pub(crate) reference: [u8; 16],
    /// RETRY_AFTER in seconds.
    pub(crate) retry_after_s: Option<u32>,
}

impl Rejection {
    /// The reject code, when this version knows it.
    pub(crate) fn code(&self) -> Option<RejectCode> {
        RejectCode::from_u8(self.status)
    }

    /// The reject name: `mfa_failed`, or `reject_<n>` for a code this version does not know.
    pub(crate) fn name(&self) -> String {
        match self.code() {
            Some(code) => code.name().to_owned(),
            None => format!("reject_{}", self.status),
        }
    }

    /// The message a caller sees: the REASON, which starts with the reject name. A REASON that
    /// is missing or does not start with the name gets it in front.
    pub(crate) fn message(&self) -> String {
        let name = self.name();
        match self.reason.as_deref() {
            Some(reason) if reason.starts_with(&format!("{name}:")) => reason.to_owned(),
            Some(reason) if !reason.is_empty() => format!("{name}: {reason}"),
            _ => format!("{name}: the server gave no reason"),
        }
    }

    /// The gRPC code of PROTOCOL.md section 4 (UNAUTHENTICATED for a code this version does
    /// not know).
    pub(crate) fn grpc_code(&self) -> Code {
        self.code()
            .map_or(Code::Unauthenticated, |c| Code::from_i32(c.grpc_code()))
    }

    /// The status an RPC reports for this rejection, with its metadata.
    pub(crate) fn to_status(&self) -> Status {
        let mut metadata = MetadataMap::new();
        if let Ok(v) = MetadataValue::try_from(self.name()) {
            metadata.insert(REJECT_METADATA, v);
        }
        if let Ok(v) = MetadataValue::try_from(hex::encode(self.reference)) {
            metadata.insert(REF_METADATA, v);
        }
        if let Some(secs) = self.retry_after_s
            && let Ok(v) = MetadataValue::try_from(secs.to_string())
        {
            metadata.insert(RETRY_AFTER_METADATA, v);
        }
        Status::with_metadata(self.grpc_code(), self.message(), metadata)
    }

    /// The kind of the `io::Error` the stream returns: refused for the codes worth retrying
    /// later, permission denied for the others.
    fn io_kind(&self) -> io::ErrorKind {
        match self.code() {
            Some(RejectCode::RateLimited | RejectCode::Overloaded | RejectCode::LockedOut) => {
                io::ErrorKind::ConnectionRefused
            }
            _ => io::ErrorKind::PermissionDenied,
        }
    }
}

/// Every way a connection fails before HTTP/2 takes over. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The Verdict rejected the connection.
    Rejected(Arc<Rejection>),
    /// A TLS problem; the text says which, without the `tls: ` in front.
    Tls(String),
    /// A socket error: connecting, or the connection lost before the Verdict.
    Io {
        /// The error's kind.
        kind: io::ErrorKind,
        /// What happened, in one line.
        detail: String,
    },
    /// The server broke PCS1.
    Protocol(String),
    /// The code source failed.
    Code(String),
    /// The connection completed TLS and sent its Prefix, but no Verdict arrived within the
    /// connect timeout.
    Timeout(Duration),
    /// The system random source failed.
    Random,
}

impl Failure {
    /// The status an RPC reports for this failure.
    pub(crate) fn to_status(&self) -> Status {
        match self {
            Self::Rejected(r) => r.to_status(),
            Self::Tls(detail) => Status::unavailable(format!("tls: {detail}")),
            Self::Io { detail, .. } => Status::unavailable(format!("connect: {detail}")),
            Self::Protocol(detail) => Status::internal(format!("pcs1: {detail}")),
            Self::Code(detail) => {
                Status::unauthenticated(format!("code: the code source failed: {detail}"))
            }
            Self::Timeout(after) => Status::unavailable(format!(
                "timeout: no Verdict from the server within {} s",
                after.as_secs_f64()
            )),
            Self::Random => Status::internal("the system random source failed"),
        }
    }

    /// The error the connection's stream returns to hyper. Its message is what hyper keeps
    /// (h2 keeps only the kind and the text), so the text alone identifies the failure.
    pub(crate) fn io_error(&self) -> io::Error {
        let kind = match self {
            Self::Rejected(r) => r.io_kind(),
            Self::Tls(_) | Self::Protocol(_) => io::ErrorKind::InvalidData,
            Self::Io { kind, .. } => *kind,
            Self::Code(_) => io::ErrorKind::PermissionDenied,
            Self::Timeout(_) => io::ErrorKind::TimedOut,
            Self::Random => io::ErrorKind::Other,
        };
        io::Error::new(kind, self.io_message())
    }

    /// The text of [`Failure::io_error`].
    pub(crate) fn io_message(&self) -> String {
        match self {
            Self::Rejected(r) => r.message(),
            _ => self.to_status().message().to_owned(),
        }
    }

    /// The error of an eager connect.
    pub(crate) fn into_client_error(self) -> ClientError {
        match self {
            Self::Rejected(r) => ClientError::Rejected(Box::new(r.to_status())),
            Self::Tls(detail) => ClientError::Tls(detail),
            Self::Io { kind, detail } => ClientError::Connect(io::Error::new(kind, detail)),
            Self::Protocol(detail) => ClientError::Protocol(detail),
            Self::Code(detail) => ClientError::Code(detail),
            Self::Timeout(after) => ClientError::Timeout(after),
            Self::Random => ClientError::Protocol("the system random source failed".into()),
        }
    }

    /// A failure of the TLS layer, from the `io::Error` tokio-rustls returned.
    pub(crate) fn from_tls_io(err: &io::Error, during: &str) -> Self {
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Self::Tls(describe_tls(tls)),
            None => Self::Tls(format!("{during}: {err}")),
        }
    }

    /// A read error while waiting for the Verdict.
    pub(crate) fn from_read_error(err: &io::Error) -> Self {
        if err
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return Self::from_tls_io(err, "reading the verdict");
        }
        Self::Io {
            kind: err.kind(),
            detail: format!("the connection failed before the server's verdict: {err}"),
        }
    }
}

/// One line for a rustls error, naming the likely cause of the common ones.
pub(crate) fn describe_tls(err: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match err {
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied),
        ) => format!("the server refused the client certificate (received fatal alert {alert:?})"),
        rustls::Error::InvalidCertificate(cause) => {
            format!("the server's certificate was not accepted: {cause:?}")
        }
        other => other.to_string(),
    }
}

/// The error the connector hands to tonic when it cannot produce a connection. The client
/// finds it in the error's source chain and reports the `Status` of its failure.
#[derive(Debug, Clone)]
pub(crate) struct ConnectFailure(pub(crate) Failure);

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.to_status().message())
    }
}

impl StdError for ConnectFailure {}

/// The [`ConnectFailure`] in an error's source chain, if there is one.
pub(crate) fn find_connect_failure<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Failure> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(cf) = e.downcast_ref::<ConnectFailure>() {
            return Some(&cf.0);
        }
        cur = e.source();
    }
    None
}

/// The texts of every `io::Error` in an error's source chain.
pub(crate) fn io_messages(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            out.push(io.to_string());
        }
        cur = e.source();
    }
    out
}

/// One line for an error and its sources: `a: b: c`.
pub(crate) fn chain_text(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cur = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(status: u8, reason: Option<&str>, retry: Option<u32>) -> Rejection {
        Rejection {
            status,
            reason: reason.map(str::to_owned),
            reference: [0x22; 16],
            retry_after_s: retry,
        }
    }

    #[test]
    fn rejections_map_to_the_table_of_section_4() {
        let cases = [
            (RejectCode::MfaFailed, Code::Unauthenticated),
            (RejectCode::MfaRequired, Code::Unauthenticated),
            (RejectCode::LockedOut, Code::Unauthenticated),
            (RejectCode::RateLimited, Code::ResourceExhausted),
            (RejectCode::Overloaded, Code::Unavailable),
            (RejectCode::PolicyDenied, Code::PermissionDenied),
        ];
        for (code, grpc) in cases {
            let r = rejection(code.as_u8(), Some(&format!("{}: hint", code.name())), None);
            let status = r.to_status();
            assert_eq!(status.code(), grpc, "{code}");
            assert_eq!(status.message(), format!("{}: hint", code.name()));
            assert_eq!(status.metadata().get(REJECT_METADATA).unwrap(), code.name());
            assert_eq!(
                status.metadata().get(REF_METADATA).unwrap(),
                &"22".repeat(16)
            );
            assert!(status.metadata().get(RETRY_AFTER_METADATA).is_none());
        }
    }

    #[test]
    fn message_always_starts_with_the_name() {
        assert_eq!(
            rejection(6, None, None).message(),
            "mfa_failed: the server gave no reason"
        );
        assert_eq!(
            rejection(6, Some("try again"), None).message(),
            "mfa_failed: try again"
        );
        let unknown = rejection(99, None, Some(5)).to_status();
        assert_eq!(unknown.code(), Code::Unauthenticated);
        assert_eq!(
            unknown.metadata().get(REJECT_METADATA).unwrap(),
            "reject_99"
        );
        assert_eq!(unknown.metadata().get(RETRY_AFTER_METADATA).unwrap(), "5");
    }

    #[test]
    fn io_errors_carry_the_reason_and_a_fitting_kind() {
        let f = Failure::Rejected(Arc::new(rejection(13, Some("overloaded: busy"), Some(2))));
        let e = f.io_error();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(e.to_string(), "overloaded: busy");
        let f = Failure::Rejected(Arc::new(rejection(6, Some("mfa_failed: no"), None)));
        assert_eq!(f.io_error().kind(), io::ErrorKind::PermissionDenied);
        let tls = Failure::Tls("bad".into());
        assert_eq!(tls.to_status().code(), Code::Unavailable);
        assert_eq!(tls.io_message(), "tls: bad");
        let timeout = Failure::Timeout(Duration::from_millis(300));
        assert_eq!(timeout.io_error().kind(), io::ErrorKind::TimedOut);
        assert_eq!(timeout.to_status().code(), Code::Unavailable);
        assert_eq!(
            timeout.io_message(),
            "timeout: no Verdict from the server within 0.3 s"
        );
        assert!(matches!(
            timeout.into_client_error(),
            ClientError::Timeout(d) if d == Duration::from_millis(300)
        ));
    }

    #[test]
    fn connect_failure_is_found_in_a_chain() {
        #[derive(Debug)]
        struct Outer(ConnectFailure);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(ConnectFailure(Failure::Tls("x".into())));
        assert_eq!(find_connect_failure(&err), Some(&Failure::Tls("x".into())));
        assert_eq!(chain_text(&err), "outer: tls: x");
    }
}
