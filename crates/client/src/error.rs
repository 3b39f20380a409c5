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
use portcullis_core::advice::{Advice, advice};
use portcullis_tls::CaHintResolver;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key of a rejected call: the reject name, e.g. `mfa_failed`.
pub const REJECT_METADATA: &str = "portcullis-reject";
/// Metadata key of a rejected call: the Verdict's REF in lower-case hex.
pub const REF_METADATA: &str = "portcullis-ref";
/// Metadata key of a rejected call: the Verdict's RETRY_AFTER in seconds, when it has one.
pub const RETRY_AFTER_METADATA: &str = "portcullis-retry-after";
/// Metadata key of a rejected call: what to do about it, in one line (the client's advice for
/// the reject code, e.g. `sync this machine's clock (NTP)` for `clock_skew`).
pub const FIX_METADATA: &str = "portcullis-fix";

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
    ///
    /// The server's REASON names the cause and often the fix. When it lacks the fix the client
    /// knows for the code (see [`advice`]), the fix is added after `; `, whatever the code. A
    /// missing REASON is replaced by the client's own cause and fix.
    pub(crate) fn message(&self) -> String {
        let name = self.name();
        let advice = self.code().map(advice);
        let base = match self.reason.as_deref() {
            Some(reason) if reason.starts_with(&format!("{name}:")) => reason.to_owned(),
            Some(reason) if !reason.is_empty() => format!("{name}: {reason}"),
            _ => {
                return match advice {
                    Some(a) => format!("{name}: {}; {}", a.cause, self.fix_text(&a)),
                    None => format!("{name}: the server gave no reason"),
                };
            }
        };
        match advice {
            Some(a) if !a.stated_in(&base) => {
                format!("{base}; {}", self.fix_text(&a))
            }
            _ => base,
        }
    }

    /// The client's fix for this rejection, with the RETRY_AFTER when the Verdict has one.
    pub(crate) fn fix(&self) -> Option<String> {
        self.code().map(|code| self.fix_text(&advice(code)))
    }

    fn fix_text(&self, advice: &Advice) -> String {
        match self.retry_after_s {
            Some(secs) if advice.retry => format!("{} (retry after {secs} s)", advice.fix),
            _ => advice.fix.to_owned(),
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
        if let Some(fix) = self.fix()
            && let Ok(v) = MetadataValue::try_from(fix)
        {
            metadata.insert(FIX_METADATA, v);
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

    /// A failed TLS handshake with the server at `addr`. A server certificate from an unknown
    /// CA is looked at once more (a second handshake that records it) to name its subject.
    pub(crate) async fn from_handshake(
        err: &io::Error,
        addr: &str,
        name: rustls::pki_types::ServerName<'static>,
        timeout: Duration,
    ) -> Self {
        let tls = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
            )) => Self::Tls(unknown_ca(
                server_subject(addr, name, timeout).await.as_deref(),
            )),
            Some(_) => Self::from_tls_io(err, "the handshake failed"),
            None if matches!(
                err.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
            {
                Self::Tls(
                    "the server closed the connection during the TLS handshake: is it a TLS \
                     server, does it speak TLS 1.3, and does it expect this address (a server \
                     behind a load balancer with PROXY protocol closes direct connections)?"
                        .into(),
                )
            }
            None => Self::from_tls_io(err, "the handshake failed"),
        }
    }

    /// A read error while waiting for the Verdict. A device certificate the server refused
    /// (TLS 1.3 tells the client on its first read) is explained with the CAs the server named
    /// in its certificate request, as `hints` recorded them.
    pub(crate) fn from_read_error(err: &io::Error, hints: &CaHintResolver) -> Self {
        if let Some(tls) = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            let mut message = describe_tls(tls);
            if client_cert_refused(tls)
                && let Some(hint) = hints.refusal_hint()
            {
                message.push_str(&format!(" ({hint})"));
            }
            return Self::Tls(message);
        }
        Self::Io {
            kind: err.kind(),
            detail: format!("the connection failed before the server's verdict: {err}"),
        }
    }
}

/// The fix for a device certificate the server refused.
pub(crate) const CLIENT_CERT_FIX: &str = "the server does not accept this device certificate: is \
     it issued by the CA the server trusts, still valid, with clientAuth?";

/// The message of a server that does not speak TLS.
pub(crate) const NOT_TLS: &str =
    "the server did not answer TLS: is it a plaintext (h2c) server? use its TLS port";

/// The message of a server certificate from a CA the client does not trust; `subject` is the
/// common name of the certificate the server presented, when it could be read.
pub(crate) fn unknown_ca(subject: Option<&str>) -> String {
    let seen = match subject {
        Some(cn) => format!("the server presented a certificate for CN={cn}"),
        None => "the server presented a certificate".to_owned(),
    };
    format!(
        "unknown CA (UnknownIssuer): {seen}, issued by a CA this client does not trust: use the CA bundle of \
         the server's CA (--ca, or the --dir holding it)"
    )
}

/// The message of a server that chose another ALPN protocol than `portcullis/1`.
pub(crate) fn wrong_alpn(chosen: Option<&[u8]>) -> String {
    let chose = match chosen {
        None => "chose no ALPN protocol".to_owned(),
        Some(p) => format!("chose ALPN {}", printable(&String::from_utf8_lossy(p))),
    };
    format!(
        "the server {chose}: the server is not a Portcullis server, or does not speak \
         portcullis/1 (for a standard gRPC client use ALPN h2 and a session)"
    )
}

/// The message of a server that negotiated another TLS version than 1.3.
pub(crate) fn wrong_version(version: Option<rustls::ProtocolVersion>) -> String {
    let version = version.map_or_else(|| "no version".to_owned(), |v| format!("{v:?}"));
    format!(
        "protocol version: the server negotiated {version}, PCS1 needs TLS 1.3: enable TLS \
         1.3 on the server (and on any TLS terminator in front of it)"
    )
}

/// Text from a peer, made safe for one line: printable ASCII only, at most 128 characters.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(128)
        .collect()
}

/// Whether a rustls error is the server's refusal of the client certificate.
fn client_cert_refused(err: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        err,
        rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::UnknownCA
                | A::CertificateRequired
                | A::AccessDenied
        )
    )
}

/// One line for a rustls error: the cause and the fix.
pub(crate) fn describe_tls(err: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    use rustls::CertificateError as C;
    match err {
        rustls::Error::AlertReceived(A::CertificateExpired) => format!(
            "the server refused the client certificate: it has expired (alert \
             certificate_expired): issue a new device certificate (and bind it), or check this \
             machine's clock; {CLIENT_CERT_FIX}"
        ),
        rustls::Error::AlertReceived(A::CertificateRevoked) => {
            "the server refused the client certificate: it is revoked (alert \
             certificate_revoked): issue a new device certificate and bind it"
                .to_owned()
        }
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied),
        ) => format!(
            "the server refused the client certificate (alert {}): {CLIENT_CERT_FIX}",
            portcullis_tls::alert_name(*alert)
        ),
        rustls::Error::AlertReceived(A::ProtocolVersion)
        | rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13
            | rustls::PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
        ) => {
            "protocol version: the server and this client share no TLS version (protocol_version): \
              PCS1 needs TLS 1.3 on both sides: enable TLS 1.3 in the client's TLS config and on \
              the server (a TLS 1.2-only peer cannot speak PCS1)"
                .to_owned()
        }
        rustls::Error::AlertReceived(A::NoApplicationProtocol) => wrong_alpn(None),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => NOT_TLS.to_owned(),
        rustls::Error::InvalidCertificate(cause) => match cause {
            C::UnknownIssuer | C::BadSignature => unknown_ca(None),
            C::NotValidForNameContext {
                expected,
                presented,
            } => {
                let names: Vec<String> = presented.iter().map(|n| printable(n)).collect();
                format!(
                    "name mismatch: the server's certificate is not valid for {}; its names \
                     (SANs) are: {}: connect with one of these names (server name), or give \
                     the server a certificate for this name",
                    expected.to_str(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            }
            C::NotValidForName => "name mismatch: the server's certificate is not valid for \
                 the name connected to: connect with a name the certificate lists"
                .to_owned(),
            C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired: \
                 renew the server certificate, or check this machine's clock"
                .to_owned(),
            C::NotValidYet | C::NotValidYetContext { .. } => "the server's certificate is not \
                 valid yet: check this machine's clock"
                .to_owned(),
            C::Revoked => "the server's certificate is revoked: give the server a new \
                 certificate"
                .to_owned(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "the server's certificate \
                 is not for server authentication (no serverAuth extended key usage): reissue it"
                .to_owned(),
            other => format!(
                "the server's certificate was not accepted ({other:?}): check the CA bundle \
                 and the server's certificate"
            ),
        },
        other => other.to_string(),
    }
}

/// The common name of the certificate a server at `addr` presents, read with a verifier that
/// accepts nothing (the handshake always fails): the subject an "unknown CA" message names.
pub(crate) async fn server_subject(
    addr: &str,
    name: rustls::pki_types::ServerName<'static>,
    timeout: Duration,
) -> Option<String> {
    let capture = Arc::new(Capture::default());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        // The handshake fails by design once the certificate is captured.
        let _ = connector.connect(name, tcp).await;
        Some(())
    };
    tokio::time::timeout(timeout, attempt).await.ok()??;
    let der = capture
        .end_entity
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()?;
    common_name(&der)
}

/// The subject common name of a DER certificate, made printable.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(printable(cn))
}

/// A server certificate verifier that records the end-entity certificate and refuses it.
#[derive(Debug, Default)]
struct Capture {
    end_entity: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.end_entity.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(end_entity.as_ref().to_vec());
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("certificate capture only".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("certificate capture only".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
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
            assert_eq!(
                status.message(),
                format!("{}: hint; {}", code.name(), advice(code).fix)
            );
            assert_eq!(status.metadata().get(REJECT_METADATA).unwrap(), code.name());
            assert_eq!(
                status.metadata().get(REF_METADATA).unwrap(),
                &"22".repeat(16)
            );
            assert!(status.metadata().get(RETRY_AFTER_METADATA).is_none());
            assert_eq!(
                status.metadata().get(FIX_METADATA).unwrap(),
                advice(code).fix
            );
        }
    }

    #[test]
    fn message_always_starts_with_the_name() {
        assert_eq!(
            rejection(99, None, None).message(),
            "reject_99: the server gave no reason"
        );
        let none = rejection(6, None, None).message();
        assert!(
            none.starts_with("mfa_failed: the one-time code was wrong") && none.contains("; "),
            "{none}"
        );
        assert_eq!(
            rejection(6, Some("try again"), None).message(),
            format!(
                "mfa_failed: try again; {}",
                advice(RejectCode::MfaFailed).fix
            )
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
        assert_eq!(
            e.to_string(),
            "overloaded: busy; retry shortly (retry after 2 s)"
        );
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
    #[test]
    fn every_reject_code_has_a_cause_and_a_fix_and_appends_it_when_missing() {
        for code in RejectCode::ALL {
            let a = advice(code);
            assert!(!a.cause.is_empty() && !a.fix.is_empty(), "{code}");
            assert!(
                a.markers.iter().any(|m| a.fix.contains(m)),
                "{code}: a message with the fix must count as having it"
            );
            // A REASON without the fix gets it, whatever the code.
            let bare = rejection(code.as_u8(), Some("something"), Some(4)).message();
            let wait = if a.retry { " (retry after 4 s)" } else { "" };
            assert_eq!(
                bare,
                format!("{}: something; {}{wait}", code.name(), a.fix),
                "{code}"
            );
            // A REASON that already states the fix is kept as it is.
            let stated = format!("{}: x {}", code.name(), a.markers[0]);
            assert_eq!(
                rejection(code.as_u8(), Some(&stated), None).message(),
                stated
            );
            // The fix metadata has the wait of the codes worth retrying.
            let status = rejection(code.as_u8(), Some("x"), Some(4)).to_status();
            let fix = status
                .metadata()
                .get(FIX_METADATA)
                .unwrap()
                .to_str()
                .unwrap();
            assert_eq!(fix.contains("retry after 4 s"), a.retry, "{code}: {fix}");
        }
    }

    #[test]
    fn rejections_that_teach() {
        // CLOCK_SKEW keeps the server's reason (how much, which side) and has the NTP fix.
        let skew = rejection(
            8,
            Some("clock_skew: your clock is 120 s ahead of the server's (allowed: 60 s)"),
            None,
        )
        .message();
        assert!(
            skew.starts_with("clock_skew: your clock is 120 s ahead"),
            "{skew}"
        );
        assert!(skew.contains("NTP"), "{skew}");
        let server_said = "clock_skew: your clock is 120 s behind the server's (allowed: 60 s); \
                           set it right, e.g. with NTP";
        assert_eq!(rejection(8, Some(server_said), None).message(), server_said);
        // BINDING_MISMATCH explains the proxy, even without a REASON.
        let binding = rejection(10, None, None).message();
        assert!(binding.starts_with("binding_mismatch: "), "{binding}");
        assert!(
            binding.contains("TLS-terminating proxy or load balancer"),
            "{binding}"
        );
        assert!(binding.contains("directly"), "{binding}");
        // DEVICE_REVOKED gets what to do.
        let revoked = rejection(
            4,
            Some("device_revoked: device laptop (ab) was revoked"),
            None,
        );
        assert!(revoked.message().contains("bind this device again"));
        // OVERLOADED keeps the server's text and gets the fix, with the wait.
        let busy = rejection(13, Some("overloaded: busy"), Some(2)).to_status();
        assert_eq!(
            busy.message(),
            "overloaded: busy; retry shortly (retry after 2 s)"
        );
        // The server's own "retry shortly" already is the fix.
        let said = "overloaded: the server is at its limit; retry shortly";
        assert_eq!(rejection(13, Some(said), Some(1)).message(), said);
        // LOCKED_OUT gets the fix after the server's wait.
        let locked = rejection(
            11,
            Some("locked_out: too many failed codes for carol; retry in 30 s"),
            Some(30),
        )
        .message();
        assert_eq!(
            locked,
            "locked_out: too many failed codes for carol; retry in 30 s; wait for the lockout \
             to end, then enter a correct code (retry after 30 s)"
        );
        assert_eq!(
            busy.metadata().get(FIX_METADATA).unwrap(),
            "retry shortly (retry after 2 s)"
        );
    }

    #[test]
    fn tls_failures_name_the_cause_and_the_fix() {
        use rustls::AlertDescription as A;
        use rustls::CertificateError as C;
        const FIX: &str = "is it issued by the CA the server trusts, still valid, with clientAuth?";
        let cases: Vec<(rustls::Error, &[&str])> = vec![
            (
                rustls::Error::InvalidCertificate(C::UnknownIssuer),
                &["unknown CA", "does not trust", "--ca", "--dir"],
            ),
            (
                rustls::Error::InvalidCertificate(C::NotValidForNameContext {
                    expected: rustls::pki_types::ServerName::try_from("wrong.example")
                        .unwrap()
                        .to_owned(),
                    presented: vec![
                        "DnsName(\"localhost\")".into(),
                        "IpAddress(127.0.0.1)".into(),
                    ],
                }),
                &[
                    "name mismatch",
                    "wrong.example",
                    "DnsName(\"localhost\"), IpAddress(127.0.0.1)",
                ],
            ),
            (
                rustls::Error::InvalidCertificate(C::Expired),
                &["server's certificate has expired", "renew"],
            ),
            (
                rustls::Error::AlertReceived(A::CertificateExpired),
                &["device certificate", "expired", "certificate_expired", FIX],
            ),
            (
                rustls::Error::AlertReceived(A::BadCertificate),
                &["alert bad_certificate", FIX],
            ),
            (
                rustls::Error::AlertReceived(A::UnknownCA),
                &["alert unknown_ca", FIX],
            ),
            (
                rustls::Error::AlertReceived(A::CertificateRequired),
                &["alert certificate_required", FIX],
            ),
            (
                rustls::Error::AlertReceived(A::CertificateRevoked),
                &["revoked", "certificate_revoked"],
            ),
            (
                rustls::Error::AlertReceived(A::ProtocolVersion),
                &["protocol_version", "TLS 1.3"],
            ),
            (
                rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13,
                ),
                &["protocol_version", "TLS 1.3"],
            ),
            (
                rustls::Error::AlertReceived(A::NoApplicationProtocol),
                &["not a Portcullis server", "portcullis/1"],
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                &["did not answer TLS", "plaintext (h2c)"],
            ),
        ];
        for (err, words) in cases {
            let text = Failure::Tls(describe_tls(&err)).to_status();
            let message = text.message();
            assert!(message.starts_with("tls: "), "{message}");
            for word in words {
                assert!(
                    message.contains(word),
                    "{err:?}: {message:?} lacks {word:?}"
                );
            }
        }
        assert!(wrong_alpn(Some(b"h2")).contains("chose ALPN h2: the server is not a Portcullis"));
        assert!(wrong_alpn(None).contains("chose no ALPN protocol"));
        assert!(
            wrong_version(Some(rustls::ProtocolVersion::TLSv1_2))
                .contains("TLSv1_2, PCS1 needs TLS 1.3")
        );
        assert!(unknown_ca(Some("evil")).contains("certificate for CN=evil"));
        assert_eq!(portcullis_tls::alert_name(A::UnknownCA), "unknown_ca");
        assert_eq!(
            portcullis_tls::alert_name(A::CertificateExpired),
            "certificate_expired"
        );
        assert_eq!(printable("a\nb\u{1b}c"), "a?b?c");
    }

    #[test]
    fn common_name_is_read_from_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "server.example");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("server.example"));
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
