//! The TCP and TLS steps: connecting, the handshake and what a failed one means, both
//! certificates.

use super::*;

/// A server certificate verifier that checks like the client library does and records the
/// certificate the server presented, so that a failure can list its names.
#[derive(Debug)]
pub(super) struct Recording {
    pub(super) inner: Arc<WebPkiServerVerifier>,
    pub(super) seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(end_entity.clone().into_owned());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A verifier that accepts any server certificate: used only by the probe handshake that
/// finds out which TLS version the server speaks, never for data.
#[derive(Debug)]
pub(super) struct AcceptAny(Vec<SignatureScheme>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if there is one.
pub(super) fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

pub(super) async fn connect_tcp(env: &Env, report: &mut Report) -> Option<TcpStream> {
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::lookup_host(env.server.as_str()),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            report.fail(
                "connect",
                format!("could not resolve {}: {e}", env.server),
                "check the host name in --server and this machine's DNS",
            );
            return None;
        }
        Err(_) => {
            report.fail(
                "connect",
                format!("resolving {} took over {STEP_TIMEOUT:?}", env.server),
                "check this machine's DNS",
            );
            return None;
        }
    };
    let mut tried = Vec::new();
    for addr in &addrs {
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                let mut saw = format!("{} resolved to {}", env.server, list(&addrs));
                if !tried.is_empty() {
                    saw.push_str(&format!("; failed first: {}", tried.join(", ")));
                }
                saw.push_str(&format!("; connected to {addr}"));
                report.pass("connect", saw);
                return Some(tcp);
            }
            Ok(Err(e)) => tried.push(format!("{addr} ({e})")),
            Err(_) => tried.push(format!("{addr} (no answer in {STEP_TIMEOUT:?})")),
        }
    }
    report.fail(
        "connect",
        format!(
            "{} resolved to {}; no address took the connection: {}",
            env.server,
            if addrs.is_empty() {
                "nothing".to_owned()
            } else {
                list(&addrs)
            },
            tried.join(", ")
        ),
        "start the server (`portcullis serve`), check the port in --server, and that no \
         firewall drops the connection",
    );
    None
}

pub(super) fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A client configuration for the probes that only learn which TLS version a server speaks:
/// `versions` offered, any server certificate accepted, no client certificate. Never used for
/// data.
pub(super) fn probe_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = portcullis_tls::provider();
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(schemes)))
        .with_no_client_auth())
}

/// Connects once more with a configuration that speaks TLS 1.2 and 1.3 and accepts any server
/// certificate, only to learn which version the server picks.
pub(super) async fn probe_version(env: &Env) -> Option<String> {
    let config = probe_config(&[&rustls::version::TLS12, &rustls::version::TLS13]).ok()?;
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(env.server.as_str()))
        .await
        .ok()?
        .ok()?;
    let name = ServerName::try_from(env.name.clone()).ok()?;
    let tls = tokio::time::timeout(
        STEP_TIMEOUT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"))
}

/// Passes the server certificate step, listing the presented certificate's SANs.
pub(super) fn pass_server_certificate(
    env: &Env,
    presented: Option<CertificateDer<'static>>,
    report: &mut Report,
) {
    let sans = presented
        .as_ref()
        .and_then(|der| DeviceIdentity::from_der(der).ok())
        .map(|id| id.sans.join(", "))
        .unwrap_or_default();
    report.pass(
        "server_certificate",
        format!(
            "chains to {} and names `{}` (SANs: {sans})",
            env.ca_file, env.name
        ),
    );
}

pub(super) async fn handshake_failed(
    env: &Env,
    e: &std::io::Error,
    presented: Option<CertificateDer<'static>>,
    report: &mut Report,
) {
    match tls_error(e) {
        Some(rustls::Error::InvalidCertificate(cert_error)) => {
            report.pass("tls_version", "TLS 1.3 negotiated");
            report.skip(
                "alpn",
                "not checked: the handshake stopped at the server certificate",
            );
            let identity = presented
                .as_ref()
                .and_then(|der| DeviceIdentity::from_der(der).ok());
            let sans = identity
                .as_ref()
                .map(|id| {
                    if id.sans.is_empty() {
                        "none".to_owned()
                    } else {
                        id.sans.join(", ")
                    }
                })
                .unwrap_or_else(|| "unknown".to_owned());
            let subject = identity.map(|id| id.subject).unwrap_or_default();
            use rustls::CertificateError as C;
            let (what, fix) = match cert_error {
                C::UnknownIssuer | C::BadSignature => (
                    format!("does not chain to the CA in {}", env.ca_file),
                    format!(
                        "copy the CA certificate the server's certificate was issued by (DIR/ca.pem \
                         of the server's `portcullis init`) to {}",
                        env.ca_file
                    ),
                ),
                C::NotValidForName | C::NotValidForNameContext { .. } => (
                    format!("does not name `{}`", env.name),
                    "connect with one of the names listed, or give it with --server-name".into(),
                ),
                C::Expired | C::ExpiredContext { .. } => (
                    "has expired".to_owned(),
                    "issue the server a new certificate".to_owned(),
                ),
                other => (
                    format!("was refused: {other:?}"),
                    "issue the server a certificate from the CA this client trusts".to_owned(),
                ),
            };
            report.fail(
                "server_certificate",
                format!("the server's certificate ({subject}) {what}; its SANs: {sans}"),
                fix,
            );
        }
        Some(rustls::Error::AlertReceived(alert))
            if *alert == rustls::AlertDescription::NoApplicationProtocol =>
        {
            report.pass("tls_version", "TLS 1.3 negotiated");
            if env.standard {
                report.fail(
                    "alpn",
                    "the server refused ALPN h2 (no_application_protocol): it does not let \
                     standard gRPC clients in",
                    "start the server with --standard-clients",
                );
            } else {
                report.fail(
                    "alpn",
                    "the server refused ALPN portcullis/1 (no_application_protocol)",
                    "point --server at a Portcullis server (`portcullis serve`)",
                );
            }
        }
        Some(rustls::Error::InvalidMessage(invalid)) => report.fail(
            "tls_version",
            format!(
                "the server did not answer TLS ({invalid:?}): is it a plaintext (h2c) server \
                 or another service?"
            ),
            "point --server at the Portcullis server's TLS port",
        ),
        other => {
            let detail = other.map_or_else(|| e.to_string(), |t| t.to_string());
            match probe_version(env).await {
                Some(version) if version != "TLSv1_3" => report.fail(
                    "tls_version",
                    format!("the server offered {version}, not TLS 1.3 ({detail})"),
                    "Portcullis needs TLS 1.3 end to end: point --server at the Portcullis \
                     server, not at a TLS 1.2 proxy",
                ),
                _ => report.fail(
                    "tls_version",
                    format!("the TLS handshake failed: {detail}"),
                    "check that --server names the Portcullis TLS port (a plaintext or other \
                     service there cannot do TLS 1.3)",
                ),
            }
        }
    }
}

pub(super) fn client_cert_refused(
    env: &Env,
    e: &std::io::Error,
    expected: Option<Vec<String>>,
    report: &mut Report,
) {
    let now = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
    let mut problems = Vec::new();
    if !env.ours.is_valid_at(now) {
        problems.push(format!(
            "our certificate is outside its validity ({} to {})",
            format_unix_s(env.ours.not_before_unix),
            format_unix_s(env.ours.not_after_unix)
        ));
    }
    if !env.ours.client_auth {
        problems.push("our certificate lacks the clientAuth extended key usage".to_owned());
    }
    // The CAs the server named in its certificate request, against our certificate's issuer.
    let expected = expected.unwrap_or_default();
    let foreign = !expected.is_empty() && !chain_named(env, &expected);
    let cas = if expected.is_empty() {
        "the server named no CA it accepts client certificates from".to_owned()
    } else {
        format!(
            "the server accepts client certificates issued by {}",
            expected.join(" or ")
        )
    };
    if foreign {
        problems.push(format!(
            "our certificate is issued by {}, which the server does not name",
            env.ours.issuer
        ));
    }
    let how = match tls_error(e) {
        Some(rustls::Error::AlertReceived(alert)) => {
            format!(
                "the server sent the alert {}",
                portcullis_tls::alert_name(*alert)
            )
        }
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the server closed the connection right after the handshake".to_owned()
        }
        _ => format!("the connection failed after the handshake: {e}"),
    };
    let fix = if foreign {
        format!(
            "issue this device from the CA the server trusts ({}: `portcullis device issue` in \
             the server's directory), or add {} to the server's client CAs",
            expected.join(" or "),
            env.ours.issuer
        )
    } else if problems.is_empty() {
        "the server does not trust the CA that issued this device: issue it from the server's \
         CA (`portcullis device issue` in the server's directory), or add our CA to the server's"
            .to_owned()
    } else {
        "issue the device a new certificate with `portcullis device issue`".to_owned()
    };
    let saw = if problems.is_empty() {
        let same_name = if chain_named(env, &expected) {
            " (another CA of that same name, such as one of another `portcullis init`, is \
             refused too)"
        } else {
            ""
        };
        format!(
            "{how}; {cas}; our certificate ({}, issued by {}) is valid and has \
             clientAuth{same_name}",
            env.ours.subject, env.ours.issuer
        )
    } else {
        format!("{how}; {cas}; {}", problems.join("; "))
    };
    report.fail("client_certificate", saw, fix);
}

/// Whether a CA the server named in its certificate request issued a certificate of our chain
/// (the leaf, or an intermediate sent with it).
pub(super) fn chain_named(env: &Env, expected: &[String]) -> bool {
    env.chain
        .iter()
        .any(|der| DeviceIdentity::from_der(der).is_ok_and(|cert| expected.contains(&cert.issuer)))
}
