//! `portcullis doctor`: walks the path from this machine to a Portcullis server step by step on
//! one raw connection (TCP, TLS 1.3, ALPN, both certificates, the Prefix and the Verdict, then
//! one Echo call over the same stream) and says for every step what it saw and, when it fails,
//! what to do about it. With `--standard` it walks the path of a standard gRPC client instead:
//! ALPN `h2`, no Prefix, and one Echo call that only a live session of the device lets in.
//! `--plaintext` and `--tls12` meet the server as a plaintext (h2c) client and as a TLS
//! 1.2-only client would, and report what such a client gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use portcullis::demo::{EchoClient, SayReply, SayRequest};
use portcullis_core::RejectCode;
use portcullis_core::advice::advice;
use portcullis_core::codec::{
    ALPN_PCS1, Factor, FrameKind, FrameReader, Prefix, Progress, Verdict,
};
use portcullis_tls::{CaHintResolver, DeviceIdentity};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

use crate::CliResult;
use crate::connect::{ConnectArgs, check_code, runtime};
use crate::dir::Layout;

/// How long one TCP connect, the handshake or the Verdict may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The ALPN protocol of standard gRPC clients.
const ALPN_H2: &[u8] = b"h2";

/// `portcullis doctor`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("probe").args(["standard", "plaintext", "tls12"])))]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print one JSON object with every step instead of the report.
    #[arg(long)]
    json: bool,
    /// Walk the path of a standard gRPC client (ALPN h2, no Prefix, no code) to a server run
    /// with `--standard-clients`: the Echo call succeeds only while the device has a live session.
    #[arg(long)]
    standard: bool,
    /// Meet the server as a plaintext (h2c) gRPC client does (`grpcurl -plaintext`): send the
    /// HTTP/2 preface without TLS and report what the server answers.
    #[arg(long)]
    plaintext: bool,
    /// Meet the server as a client limited to TLS 1.2 does: offer only TLS 1.2 (with the device
    /// certificate, ALPN h2 and portcullis/1) and report what the server answers.
    #[arg(long)]
    tls12: bool,
    /// Testing aid: shift the TIME this doctor sends (and compares SERVER_TIME with) by SECS
    /// seconds, negative for behind, as if this machine's clock were off by that much.
    #[arg(long, value_name = "SECS", hide = true, allow_hyphen_values = true,
          default_value_t = 0,
          value_parser = clap::value_parser!(i64).range(-86_400..=86_400))]
    clock_offset_secs: i64,
}

/// The steps, in the order they are walked. A failure of step `i` (1-based) exits with `10 + i`.
const STEPS: [&str; 11] = [
    "connect",
    "tls_version",
    "alpn",
    "server_certificate",
    "client_certificate",
    "device",
    "clock",
    "code",
    "channel_binding",
    "session",
    "echo",
];

/// The steps of `--plaintext`: the answer to an HTTP/2 preface sent without TLS.
const PLAINTEXT_STEPS: [&str; 2] = ["connect", "plaintext"];

/// The steps of `--tls12`: the answer to a ClientHello that offers only TLS 1.2.
const TLS12_STEPS: [&str; 2] = ["connect", "tls_version"];

/// The steps of `--standard`: the Verdict's steps are replaced by one Echo call over h2.
const STANDARD_STEPS: [&str; 7] = [
    "connect",
    "tls_version",
    "alpn",
    "server_certificate",
    "client_certificate",
    "device",
    "live_session",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Pass,
    Fail,
    /// Not reached: an earlier failure (or the server's order of checks) stopped the walk.
    Skip,
}

#[derive(Debug, Clone)]
struct Step {
    mark: Mark,
    saw: String,
    fix: Option<String>,
}

/// The report being filled in, one entry per step of [`STEPS`].
struct Report {
    names: &'static [&'static str],
    steps: Vec<Step>,
}

impl Report {
    fn new(names: &'static [&'static str]) -> Self {
        Self {
            names,
            steps: names
                .iter()
                .map(|_| Step {
                    mark: Mark::Skip,
                    saw: "not checked: an earlier step failed".into(),
                    fix: None,
                })
                .collect(),
        }
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|s| *s == name).unwrap_or(0)
    }

    fn pass(&mut self, name: &str, saw: impl Into<String>) {
        let i = self.index(name);
        self.steps[i] = Step {
            mark: Mark::Pass,
            saw: saw.into(),
            fix: None,
        };
    }

    fn fail(&mut self, name: &str, saw: impl Into<String>, fix: impl Into<String>) {
        let i = self.index(name);
        self.steps[i] = Step {
            mark: Mark::Fail,
            saw: saw.into(),
            fix: Some(fix.into()),
        };
    }

    fn skip(&mut self, name: &str, saw: impl Into<String>) {
        let i = self.index(name);
        self.steps[i] = Step {
            mark: Mark::Skip,
            saw: saw.into(),
            fix: None,
        };
    }

    /// The 0-based index of the first failed step.
    fn first_failure(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.mark == Mark::Fail)
    }
}

pub(crate) fn doctor(args: &DoctorArgs) -> CliResult<u8> {
    let c = &args.connect;
    let probe = args.standard || args.plaintext || args.tls12;
    // The second factor: a code, or else the session `portcullis login` stored.
    let mut stored_until = None;
    let factor = match (&c.code, probe) {
        (Some(code), false) => {
            check_code("--code", code)?;
            Factor::Totp(code.clone())
        }
        (None, false) => match c.totp_config()? {
            Some(config) => Factor::Totp(config.generate(now_ms() / 1000)),
            None => {
                let stored = c.stored_sessions();
                let name = c.server_name()?;
                match stored.ticket(&name, &c.server, now_ms()) {
                    Some((info, ticket)) => {
                        stored_until = Some(info.expires_ms);
                        Factor::Session(ticket.to_vec())
                    }
                    None => {
                        // A usage error, as clap's own: exit 2.
                        eprintln!(
                            "portcullis: give one of --code, --secret-file, --secret, --standard, \
                             --plaintext and --tls12 (or set PORTCULLIS_TOTP_SECRET, or run \
                             `portcullis login` to store a session) (see --help)"
                        );
                        return Ok(2);
                    }
                }
            }
        },
        (None, true) if c.secret.is_none() && c.secret_file.is_none() => {
            Factor::Totp(String::new())
        }
        _ => {
            return Err(
                "give only one of --code, --secret-file, --secret, --standard, --plaintext and \
                 --tls12"
                    .into(),
            );
        }
    };
    c.check_files()?;
    let layout = Layout::existing(&c.dir.dir)?;
    let roots = portcullis_tls::load_certs(&layout.ca_cert()).map_err(|e| e.to_string())?;
    let chain =
        portcullis_tls::load_certs(&layout.device_cert(&c.device)).map_err(|e| e.to_string())?;
    let key = portcullis_tls::load_key(&layout.device_key(&c.device)).map_err(|e| e.to_string())?;
    let ours = chain
        .first()
        .ok_or_else(|| {
            format!(
                "{}: no certificate",
                layout.device_cert(&c.device).display()
            )
        })
        .and_then(|der| {
            DeviceIdentity::from_der(der)
                .map_err(|e| format!("{}: {e}", layout.device_cert(&c.device).display()))
        })?;
    let host = c
        .server
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .unwrap_or_default();
    let name = c.server_name.clone().unwrap_or(host);
    let env = Env {
        server: c.server.clone(),
        name,
        user: c.user.clone(),
        ca_file: layout.ca_cert().display().to_string(),
        roots,
        chain,
        key,
        ours,
        clock_offset_ms: args.clock_offset_secs.saturating_mul(1000),
        standard: args.standard,
        stored_until,
    };

    let names: &'static [&'static str] = if args.standard {
        &STANDARD_STEPS
    } else if args.plaintext {
        &PLAINTEXT_STEPS
    } else if args.tls12 {
        &TLS12_STEPS
    } else {
        &STEPS
    };
    let mut report = Report::new(names);
    let rt = runtime()?;
    if args.plaintext {
        rt.block_on(walk_plaintext(&env, &mut report));
    } else if args.tls12 {
        rt.block_on(walk_tls12(&env, &mut report));
    } else {
        rt.block_on(walk(&env, factor, &mut report));
    }

    let first = report.first_failure();
    if args.json {
        let steps: Vec<_> = names
            .iter()
            .zip(&report.steps)
            .map(|(name, step)| {
                json!({
                    "name": name,
                    "ok": step.mark == Mark::Pass,
                    "skipped": step.mark == Mark::Skip,
                    "saw": step.saw,
                    "fix": step.fix,
                })
            })
            .collect();
        let out = json!({
            "ok": first.is_none(),
            "steps": steps,
            "first_failure": first.map(|i| names[i]),
        });
        out!("{out}");
    } else {
        for (i, (name, step)) in names.iter().zip(&report.steps).enumerate() {
            let mark = match step.mark {
                Mark::Pass => "✓",
                Mark::Fail => "✗",
                Mark::Skip => "-",
            };
            out!("{mark} {:>2}. {name}: {}", i + 1, step.saw);
            if let Some(fix) = &step.fix {
                out!("       fix: {fix}");
            }
        }
        match first {
            None => out!("all {} steps passed", names.len()),
            Some(i) => out!(
                "step {} ({}) failed: exit code {}",
                i + 1,
                names[i],
                exit_code(i)
            ),
        }
    }
    Ok(first.map_or(0, exit_code))
}

/// The exit code for a failure of the step at 0-based `index`: 11 for the first step.
fn exit_code(index: usize) -> u8 {
    u8::try_from(11 + index).unwrap_or(u8::MAX)
}

/// What the walk needs, read from the directory and the flags.
struct Env {
    server: String,
    name: String,
    user: String,
    ca_file: String,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    ours: DeviceIdentity,
    /// Added to this machine's clock for the TIME sent and the clock comparison (testing aid).
    clock_offset_ms: i64,
    /// `--standard`: ALPN h2, no Prefix, and the live-session step.
    standard: bool,
    /// The Prefix carries the session ticket `login` stored, valid until then (Unix ms).
    stored_until: Option<u64>,
}

impl Env {
    /// This machine's clock in ms, shifted by `clock_offset_ms`.
    fn clock_ms(&self) -> u64 {
        now_ms().saturating_add_signed(self.clock_offset_ms)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A server certificate verifier that checks like the client library does and records the
/// certificate the server presented, so that a failure can list its names.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
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
struct AcceptAny(Vec<SignatureScheme>);

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
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

async fn connect_tcp(env: &Env, report: &mut Report) -> Option<TcpStream> {
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

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A client configuration for the probes that only learn which TLS version a server speaks:
/// `versions` offered, any server certificate accepted, no client certificate. Never used for
/// data.
fn probe_config(
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
async fn probe_version(env: &Env) -> Option<String> {
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

async fn walk(env: &Env, factor: Factor, report: &mut Report) {
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
async fn handshake(
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
const H2C_OPENING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// What to do when a client cannot reach the server without TLS 1.3.
const USE_TLS13: &str = "connect with TLS 1.3 and the device certificate: the Portcullis client \
     (`portcullis call`, the client library), or a standard gRPC client with TLS (grpcurl \
     without -plaintext, with -cacert/-cert/-key) once the server runs with --standard-clients \
     and the device has a session (`portcullis login`)";

/// `--plaintext`: the HTTP/2 preface without TLS, as `grpcurl -plaintext` opens, and what the
/// server answers to it.
async fn walk_plaintext(env: &Env, report: &mut Report) {
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
async fn walk_tls12(env: &Env, report: &mut Report) {
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

/// Passes the server certificate step, listing the presented certificate's SANs.
fn pass_server_certificate(
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

/// The rest of a Verdict whose header `reader` holds, unchecked yet.
async fn read_verdict(
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

async fn handshake_failed(
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

fn client_cert_refused(
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
fn chain_named(env: &Env, expected: &[String]) -> bool {
    env.chain
        .iter()
        .any(|der| DeviceIdentity::from_der(der).is_ok_and(|cert| expected.contains(&cert.issuer)))
}

/// Fills in the steps the Verdict answers; whether it accepted.
fn interpret(
    env: &Env,
    verdict: &Verdict,
    sent_ms: u64,
    received_ms: u64,
    report: &mut Report,
) -> bool {
    let reason = verdict.reason.clone().unwrap_or_default();
    let reference = hex(&verdict.reference);
    let fingerprint = env.ours.fingerprint.to_string();
    // The server's clock against the middle of the round trip.
    let midpoint = sent_ms / 2 + received_ms / 2;
    let diff = i128::from(verdict.server_time_ms) - i128::from(midpoint);
    let clock = if diff >= 0 {
        format!("the server clock is {} ms ahead of ours", diff)
    } else {
        format!("the server clock is {} ms behind ours", -diff)
    };
    let not_reached = "not checked: the server stops at the first failed check";
    let Some(reject) = verdict.reject_code() else {
        if verdict.status != 0 {
            report.fail(
                "device",
                format!(
                    "unknown Verdict status {} ({reason}, ref {reference})",
                    verdict.status
                ),
                "update this client to the server's version",
            );
            return false;
        }
        report.pass(
            "device",
            format!(
                "fingerprint {fingerprint}: known to the server and bound to {}",
                env.user
            ),
        );
        report.pass("clock", format!("{clock}: within the allowed skew"));
        report.pass("channel_binding", "the server saw the same TLS connection");
        if let Some(until) = env.stored_until {
            report.pass(
                "code",
                "no code needed: the session ticket `portcullis login` stored was accepted",
            );
            report.pass(
                "session",
                format!(
                    "the stored session is live, valid until {}",
                    crate::text::format_time(until)
                ),
            );
            return true;
        }
        report.pass("code", "the code was accepted");
        match &verdict.session {
            Some((_, expires)) => report.pass(
                "session",
                format!(
                    "session ticket issued, valid until {}",
                    crate::text::format_time(*expires)
                ),
            ),
            None => report.fail(
                "session",
                "the server accepted the code but issued no session ticket",
                "turn sessions on at the server (sessions are off there), or reconnect with a \
                 code each time",
            ),
        }
        return true;
    };
    let saw = format!("{} ({reason}, ref {reference})", reject.name());
    let binding_ok = "the server saw the same TLS connection";
    match reject {
        RejectCode::BindingMismatch => {
            for step in ["device", "clock", "code"] {
                report.skip(step, not_reached);
            }
            report.fail(
                "channel_binding",
                saw,
                format!(
                    "a TLS-terminating proxy or load balancer sits between client and server: {}",
                    advice(reject).fix
                ),
            );
        }
        RejectCode::ClockSkew => {
            report.pass("channel_binding", binding_ok);
            report.skip("device", not_reached);
            report.skip("code", not_reached);
            report.fail(
                "clock",
                format!("{saw}; {clock}"),
                "set the clock right on the machine that is off (run NTP on both)",
            );
        }
        RejectCode::DeviceUnknown | RejectCode::DeviceRevoked | RejectCode::UserMismatch => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.skip("code", not_reached);
            let fix = match reject {
                RejectCode::DeviceUnknown => format!(
                    "bind this device on the server: `portcullis device bind --user {}` (or \
                     `device issue` there)",
                    env.user
                ),
                RejectCode::DeviceRevoked => {
                    "the device was revoked: issue and bind a new device certificate".to_owned()
                }
                _ => "use the user this device is bound to (see `portcullis device list`), or \
                      bind a device of your own"
                    .to_owned(),
            };
            report.fail("device", format!("fingerprint {fingerprint}: {saw}"), fix);
        }
        RejectCode::LockedOut
        | RejectCode::Replay
        | RejectCode::MfaFailed
        | RejectCode::MfaRequired => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.pass(
                "device",
                format!(
                    "fingerprint {fingerprint}: known to the server and bound to {}",
                    env.user
                ),
            );
            let fix = match reject {
                RejectCode::LockedOut => format!(
                    "wait {} s, then try again with a correct code",
                    verdict.retry_after_s.unwrap_or(0)
                ),
                RejectCode::Replay => "run doctor again (the nonce was seen before)".to_owned(),
                RejectCode::MfaFailed if reason.contains("already used") => {
                    "wait for the next code, or run `portcullis login` once and let `call` and \
                     `doctor` use the stored session"
                        .to_owned()
                }
                RejectCode::MfaFailed => "use the current code of the user's authenticator, \
                                          once: a code is accepted one time only"
                    .to_owned(),
                RejectCode::MfaRequired if env.stored_until.is_some() => {
                    "the stored session ended (expired, revoked or refused): run `portcullis \
                     login` again, or give a code with --code or --secret-file"
                        .to_owned()
                }
                _ => "give a code with --code or --secret".to_owned(),
            };
            let saw = match (reject, verdict.retry_after_s) {
                (RejectCode::LockedOut, Some(s)) => format!("{saw}; wait {s} s"),
                (RejectCode::MfaFailed, _) if reason.contains("already used") => format!(
                    "{saw}; the code is right but was already accepted once (it does not count \
                     towards the lockout)"
                ),
                (RejectCode::MfaFailed, _) => format!(
                    "{saw}; the code is wrong (or the user has no TOTP factor: the audit record \
                     of ref {reference} says code_wrong or no_factor)"
                ),
                _ => saw,
            };
            report.fail("code", saw, fix);
        }
        RejectCode::PolicyDenied => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.pass("device", format!("fingerprint {fingerprint}: known"));
            report.pass("code", "the code was accepted");
            report.skip("session", not_reached);
            report.fail(
                "echo",
                saw,
                format!("{}: {}", advice(reject).cause, advice(reject).fix),
            );
        }
        _ => {
            let fix = match reject {
                RejectCode::Overloaded | RejectCode::RateLimited => {
                    format!(
                        "the server is busy: try again in {} s",
                        verdict.retry_after_s.unwrap_or(1)
                    )
                }
                other => advice(other).fix.to_owned(),
            };
            report.fail("device", format!("the server answered {saw}"), fix);
        }
    }
    false
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How one Echo call over a stream went.
enum EchoOutcome {
    Reply(SayReply),
    /// The server answered with a gRPC status.
    Status(tonic::Status),
    /// HTTP/2 did not start, or no answer came in time.
    Failed(String),
}

/// HTTP/2 over `tls` (from its first byte) and one Echo call on it.
async fn call_echo(tls: TlsStream<TcpStream>) -> EchoOutcome {
    let slot = Arc::new(Mutex::new(Some(tls)));
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let stream = slot.lock().ok().and_then(|mut s| s.take());
        async move {
            stream.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the accepted connection was already used",
                )
            })
        }
    });
    let endpoint = match tonic::transport::Endpoint::from_shared("http://portcullis.doctor") {
        Ok(e) => e,
        Err(e) => return EchoOutcome::Failed(format!("endpoint: {e}")),
    };
    let result = tokio::time::timeout(STEP_TIMEOUT, async {
        let channel = match endpoint.connect_with_connector(connector).await {
            Ok(c) => c,
            Err(e) => return EchoOutcome::Failed(format!("HTTP/2 did not start: {e}")),
        };
        match EchoClient::new(channel)
            .say(SayRequest {
                text: "doctor".into(),
            })
            .await
        {
            Ok(r) => EchoOutcome::Reply(r.into_inner()),
            Err(s) => EchoOutcome::Status(s),
        }
    })
    .await;
    result.unwrap_or_else(|_| EchoOutcome::Failed(format!("no Echo reply within {STEP_TIMEOUT:?}")))
}

/// One Echo call over the accepted connection: HTTP/2 from the first byte after the Verdict.
async fn echo(tls: TlsStream<TcpStream>, report: &mut Report) {
    match call_echo(tls).await {
        EchoOutcome::Reply(reply) => report.pass(
            "echo",
            format!(
                "Echo answered `{}` (user {}, device {}, via {})",
                reply.text, reply.user, reply.device, reply.auth_method
            ),
        ),
        EchoOutcome::Status(s) => report.fail(
            "echo",
            crate::connect::describe_status("Echo", &s),
            "the gate let the connection in but the service failed: check the server's log",
        ),
        EchoOutcome::Failed(e) => report.fail("echo", e, "check the server's log"),
    }
}

/// `--standard`: one Echo call over h2 without a Prefix; the server lets it in only while the
/// device has a live session, and otherwise answers UNAUTHENTICATED naming the cause.
async fn live_session(
    env: &Env,
    tls: TlsStream<TcpStream>,
    expected: Option<Vec<String>>,
    report: &mut Report,
) {
    let fingerprint = env.ours.fingerprint.to_string();
    let known = format!("fingerprint {fingerprint}: known to the server");
    let status = match call_echo(tls).await {
        EchoOutcome::Reply(reply) => {
            report.pass("client_certificate", client_accepted(env));
            report.pass("device", format!("{known} and bound to {}", reply.user));
            report.pass(
                "live_session",
                format!(
                    "Echo answered over h2 via {} (user {}, device {})",
                    reply.auth_method, reply.user, reply.device
                ),
            );
            return;
        }
        EchoOutcome::Failed(e) => {
            let expected = expected.unwrap_or_default();
            let issuer = if !expected.is_empty() && !chain_named(env, &expected) {
                format!(
                    "; the server accepts client certificates issued by {}, ours is issued by {}",
                    expected.join(" or "),
                    env.ours.issuer
                )
            } else {
                String::new()
            };
            report.fail(
                "client_certificate",
                format!(
                    "{e}; the server may have refused our certificate ({}){issuer}",
                    env.ours.subject
                ),
                "check that the server trusts the CA that issued this device and that the \
                 certificate is valid with clientAuth (`portcullis device issue`)",
            );
            return;
        }
        EchoOutcome::Status(s) => s,
    };
    let message = status.message().replace('\n', " ");
    let reject = message
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if status.code() != tonic::Code::Unauthenticated {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ) && status.metadata().get("portcullis-reject").is_none()
        {
            report.fail(
                "client_certificate",
                crate::connect::describe_status("Echo", &status),
                "check that the server trusts the CA that issued this device and that the \
                 certificate is valid with clientAuth (`portcullis device issue`)",
            );
            return;
        }
        report.pass("client_certificate", client_accepted(env));
        report.pass("device", known);
        report.fail(
            "live_session",
            crate::connect::describe_status("Echo", &status),
            "the gate let the connection in but the service failed: check the server's log",
        );
        return;
    }
    report.pass("client_certificate", client_accepted(env));
    match reject.as_str() {
        "device_unknown" | "device_revoked" => {
            let fix = if reject == "device_unknown" {
                format!(
                    "bind this device on the server: `portcullis device bind --user {}` (or \
                     `device issue` there)",
                    env.user
                )
            } else {
                "the device was revoked: issue and bind a new device certificate".to_owned()
            };
            report.fail(
                "device",
                format!("fingerprint {fingerprint}: {message}"),
                fix,
            );
        }
        "mfa_required" => {
            report.pass("device", known);
            report.fail(
                "live_session",
                message,
                "run portcullis login from this device",
            );
        }
        _ => {
            report.pass("device", known);
            report.fail(
                "live_session",
                crate::connect::describe_status("Echo", &status),
                "see the message; the row of docs/TROUBLESHOOTING.md for its reject names the fix",
            );
        }
    }
}

/// What the client certificate step says once the server answered over the connection.
fn client_accepted(env: &Env) -> String {
    format!(
        "accepted ({}, valid until {})",
        env.ours.subject,
        format_unix_s(env.ours.not_after_unix)
    )
}

/// A certificate time (Unix seconds) as RFC 3339; times before 1970 as the epoch.
fn format_unix_s(secs: i64) -> String {
    crate::text::format_time(u64::try_from(secs).unwrap_or(0).saturating_mul(1000))
}
