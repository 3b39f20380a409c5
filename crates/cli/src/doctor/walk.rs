//! The walks: a Portcullis client's (Prefix and Verdict), a plaintext client's and a TLS
//! 1.2-only client's, step by step on one connection.

use super::*;

pub(super) async fn walk(env: &Env, factor: Factor, report: &mut Report) {
    let Some(tcp) = connect_tcp(env, report).await else {
        return;
    };

    // The configuration the client library uses, with a recording verifier.
    let provider = portcullis_tls::provider();
    let mut store = rustls::RootCertStore::empty();
    for root in &env.roots {
        if let Err(e) = store.add(root.clone()) {
            report.fail(
                "server_certificate",
                format!("{}: not a usable CA certificate: {e}", env.ca_file),
                "copy the server's CA certificate (DIR/ca.pem of its `portcullis init`) here",
            );
            return;
        }
    }
    let inner = match WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
    {
        Ok(v) => v,
        Err(e) => {
            report.fail(
                "server_certificate",
                format!("{}: {e}", env.ca_file),
                "copy the server's CA certificate (DIR/ca.pem of its `portcullis init`) here",
            );
            return;
        }
    };
    let seen = Arc::new(Mutex::new(None));
    let resolver = match CaHintResolver::new(env.chain.clone(), env.key.clone_key()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            report.fail(
                "client_certificate",
                format!("the device certificate and key do not make a TLS identity: {e}"),
                "issue the device again with `portcullis device issue`",
            );
            return;
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(Recording {
                    inner,
                    seen: Arc::clone(&seen),
                }))
                .with_client_cert_resolver(resolver.clone())
        });
    let mut config = match config {
        Ok(config) => config,
        Err(e) => {
            report.fail(
                "tls_version",
                format!("this machine's TLS library refused TLS 1.3: {e}"),
                "this is a TLS library problem; report it",
            );
            return;
        }
    };
    config.alpn_protocols = if env.standard {
        vec![ALPN_H2.to_vec()]
    } else {
        vec![ALPN_PCS1.to_vec()]
    };
    config.enable_early_data = false;

    let Some(handshake) = handshake(env, config, tcp, "server_certificate", report).await else {
        return;
    };
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let presented = seen.lock().ok().and_then(|s| s.clone());
            handshake_failed(env, &e, presented, report).await;
            return;
        }
        Err(_) => {
            report.fail(
                "tls_version",
                format!("no TLS handshake within {STEP_TIMEOUT:?}"),
                "check that --server names the Portcullis TLS port, not another service",
            );
            return;
        }
    };

    let (_, conn) = tls.get_ref();
    report.pass("tls_version", "TLS 1.3 negotiated");
    if env.standard {
        if conn.alpn_protocol() != Some(ALPN_H2) {
            report.fail(
                "alpn",
                match conn.alpn_protocol() {
                    Some(p) => format!(
                        "the server selected `{}`, not h2",
                        String::from_utf8_lossy(p)
                    ),
                    None => "the server selected no ALPN protocol, not h2".to_owned(),
                },
                "start the server with --standard-clients",
            );
            return;
        }
        report.pass("alpn", "h2 negotiated (standard gRPC client, no Prefix)");
        let presented = seen.lock().ok().and_then(|s| s.clone());
        pass_server_certificate(env, presented, report);
        live_session(env, tls, resolver.expected_issuers(), report).await;
        return;
    }
    match conn.alpn_protocol() {
        Some(ALPN_PCS1) => report.pass("alpn", "portcullis/1 negotiated"),
        other => {
            report.fail(
                "alpn",
                match other {
                    Some(p) => format!(
                        "the server selected `{}`, not portcullis/1",
                        String::from_utf8_lossy(p)
                    ),
                    None => "the server selected no ALPN protocol".to_owned(),
                },
                "point --server at a Portcullis server (`portcullis serve`); a plain gRPC \
                 server or a proxy answers h2",
            );
            return;
        }
    }
    let presented = seen.lock().ok().and_then(|s| s.clone());
    pass_server_certificate(env, presented, report);

    let binding = match portcullis_tls::exporter(conn) {
        Ok(b) => b,
        Err(e) => {
            report.fail(
                "channel_binding",
                format!("could not compute the channel binding: {e}"),
                "this is a TLS library problem; report it",
            );
            return;
        }
    };
    let mut nonce = [0u8; 16];
    if portcullis_tls::provider()
        .secure_random
        .fill(&mut nonce)
        .is_err()
    {
        report.fail(
            "code",
            "no random bytes for the nonce",
            "check the system's random source",
        );
        return;
    }
    let sent_ms = env.clock_ms();
    let prefix = Prefix {
        user: env.user.clone(),
        factor,
        nonce,
        time_ms: sent_ms,
        binding,
        agent: Some(format!("portcullis-doctor/{}", env!("CARGO_PKG_VERSION"))),
    };
    // The code in `prefix` is wiped when it is dropped here.
    let encoded = prefix.encode().map(Zeroizing::new);
    drop(prefix);
    let encoded = match encoded {
        Ok(e) => e,
        Err(e) => {
            report.fail(
                "code",
                format!("could not encode the Prefix: {e}"),
                "check --user (1 to 128 bytes)",
            );
            return;
        }
    };
    let verdict = tokio::time::timeout(STEP_TIMEOUT, async {
        tls.write_all(&encoded).await?;
        tls.flush().await?;
        // The header first: a refused client certificate shows up on this read.
        let mut reader = FrameReader::new(FrameKind::Verdict);
        tls.read_exact(reader.unfilled()).await?;
        Ok::<_, std::io::Error>(reader)
    })
    .await;
    let reader = match verdict {
        Ok(Ok(reader)) => reader,
        Ok(Err(e)) => {
            client_cert_refused(env, &e, resolver.expected_issuers(), report);
            return;
        }
        Err(_) => {
            report.fail(
                "client_certificate",
                format!("no Verdict within {STEP_TIMEOUT:?} after the Prefix"),
                "the server is stuck or is not a Portcullis server; check its log",
            );
            return;
        }
    };
    let received_ms = env.clock_ms();
    let verdict = match read_verdict(&mut tls, reader).await {
        Ok(v) => v,
        Err(e) => {
            report.fail(
                "client_certificate",
                format!("the server's answer is not a PCS1 Verdict: {e}"),
                "point --server at a Portcullis server",
            );
            return;
        }
    };
    report.pass("client_certificate", client_accepted(env));
    let accepted = interpret(env, &verdict, sent_ms, received_ms, report);
    if !accepted {
        return;
    }
    echo(tls, report).await;
}

/// The TLS handshake over `tcp` with `config` for the server name of `env`, within
/// [`STEP_TIMEOUT`]; `None` (with `step` failed) when that name is not a valid server name.
pub(super) async fn handshake(
    env: &Env,
    config: rustls::ClientConfig,
    tcp: TcpStream,
    step: &str,
    report: &mut Report,
) -> Option<Result<std::io::Result<TlsStream<TcpStream>>, tokio::time::error::Elapsed>> {
    let Ok(name) = ServerName::try_from(env.name.clone()) else {
        report.fail(
            step,
            format!("`{}` is not a valid server name", env.name),
            "give a DNS name or IP address with --server-name",
        );
        return None;
    };
    Some(
        tokio::time::timeout(
            STEP_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await,
    )
}

/// The HTTP/2 client connection preface and an empty SETTINGS frame: what a plaintext (h2c)
/// gRPC client sends first.
pub(super) const H2C_OPENING: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// What to do when a client cannot reach the server without TLS 1.3.
pub(super) const USE_TLS13: &str = "connect with TLS 1.3 and the device certificate: the Portcullis client \
     (`portcullis call`, the client library), or a standard gRPC client with TLS (grpcurl \
     without -plaintext, with -cacert/-cert/-key) once the server runs with --standard-clients \
     and the device has a session (`portcullis login`)";

/// `--plaintext`: the HTTP/2 preface without TLS, as `grpcurl -plaintext` opens, and what the
/// server answers to it.
pub(super) async fn walk_plaintext(env: &Env, report: &mut Report) {
    let Some(mut tcp) = connect_tcp(env, report).await else {
        return;
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, async {
        tcp.write_all(H2C_OPENING).await?;
        let mut buf = vec![0u8; 64];
        let mut got = 0;
        // Up to one frame header or TLS record header; stop early at the end of the stream.
        while got < 9 {
            match tcp.read(&mut buf[got..]).await? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok::<_, std::io::Error>(buf)
    })
    .await;
    let closed = "the server closed the connection at the plaintext HTTP/2 preface";
    let tls_only = "this port speaks TLS only, so a plaintext (h2c) client cannot use it";
    match answer {
        Err(_) => report.fail(
            "plaintext",
            format!("no answer to the plaintext HTTP/2 preface within {STEP_TIMEOUT:?}"),
            "check that --server names the right port; a Portcullis port speaks TLS only",
        ),
        Ok(Err(e)) => report.fail(
            "plaintext",
            format!("{closed} ({e}): {tls_only}"),
            USE_TLS13,
        ),
        Ok(Ok(bytes)) => match bytes.first() {
            None => report.fail("plaintext", format!("{closed}: {tls_only}"), USE_TLS13),
            Some(0x15) => report.fail(
                "plaintext",
                format!(
                    "the server answered the plaintext HTTP/2 preface with a TLS alert record \
                     and closed the connection: {tls_only}"
                ),
                USE_TLS13,
            ),
            Some(0x16..=0x17) => report.fail(
                "plaintext",
                format!("the server answered with a TLS record: {tls_only}"),
                USE_TLS13,
            ),
            Some(_) if bytes.len() >= 9 && bytes[3] == 0x04 => report.pass(
                "plaintext",
                "the server answered with an HTTP/2 SETTINGS frame: it speaks plaintext HTTP/2 \
                 (h2c) here, so this is not a Portcullis port",
            ),
            Some(_) if bytes.starts_with(b"HTTP/1.") => report.fail(
                "plaintext",
                "the server answered in HTTP/1: it is a plain HTTP server, not a gRPC or \
                 Portcullis port",
                "point --server at the Portcullis server's port",
            ),
            Some(_) => report.fail(
                "plaintext",
                format!(
                    "the server answered {} bytes that are neither HTTP/2 nor TLS",
                    bytes.len()
                ),
                "point --server at the Portcullis server's port",
            ),
        },
    }
}

/// `--tls12`: a ClientHello that offers only TLS 1.2, as a client limited to it sends, and what
/// the server answers. Only the version is in question: the server certificate is not judged.
pub(super) async fn walk_tls12(env: &Env, report: &mut Report) {
    let Some(tcp) = connect_tcp(env, report).await else {
        return;
    };
    // No client certificate: under TLS 1.2 it would go out in the clear, to a server this
    // probe does not verify. The version is all it asks about.
    let mut config = match probe_config(&[&rustls::version::TLS12]) {
        Ok(config) => config,
        Err(e) => {
            report.fail(
                "tls_version",
                format!("this machine's TLS library cannot offer TLS 1.2: {e}"),
                "this is a TLS library problem; report it",
            );
            return;
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_PCS1.to_vec()];
    let Some(handshake) = handshake(env, config, tcp, "tls_version", report).await else {
        return;
    };
    let no_tls13 = "enable TLS 1.3 in the client (its TLS library and settings; e.g. OpenSSL \
                    1.1.1 or later): Portcullis speaks TLS 1.3 only, because PCS1 binds to the \
                    TLS 1.3 exporter";
    match handshake {
        Err(_) => report.fail(
            "tls_version",
            format!("no answer to a TLS 1.2 ClientHello within {STEP_TIMEOUT:?}"),
            "check that --server names the Portcullis TLS port",
        ),
        Ok(Ok(_)) => report.pass(
            "tls_version",
            "the server accepted a TLS 1.2-only client: it is not a Portcullis port (Portcullis \
             speaks TLS 1.3 only); a TLS terminator in front of the server?",
        ),
        Ok(Err(e)) => match tls_error(&e) {
            Some(rustls::Error::AlertReceived(alert)) => report.fail(
                "tls_version",
                format!(
                    "the server refused a ClientHello offering only TLS 1.2 (alert {}): it \
                     speaks TLS 1.3 only, so a client limited to TLS 1.2 cannot connect",
                    portcullis_tls::alert_name(*alert)
                ),
                no_tls13,
            ),
            Some(rustls::Error::InvalidMessage(_)) => report.fail(
                "tls_version",
                "the server did not answer TLS: is it a plaintext server?",
                "point --server at the Portcullis server's TLS port",
            ),
            other => report.fail(
                "tls_version",
                format!(
                    "the server ended a TLS 1.2 handshake: {}",
                    other.map_or_else(|| e.to_string(), ToString::to_string)
                ),
                no_tls13,
            ),
        },
    }
}

/// The rest of a Verdict whose header `reader` holds, unchecked yet.
pub(super) async fn read_verdict(
    tls: &mut TlsStream<TcpStream>,
    mut reader: FrameReader,
) -> Result<Verdict, String> {
    let mut got = reader.unfilled().len();
    while reader.filled(got).map_err(|e| e.to_string())? == Progress::More {
        got = reader.unfilled().len();
        tokio::time::timeout(STEP_TIMEOUT, tls.read_exact(reader.unfilled()))
            .await
            .map_err(|_| "the Verdict was cut short".to_owned())?
            .map_err(|e| e.to_string())?;
    }
    Verdict::decode_body(reader.body()).map_err(|e| e.to_string())
}
