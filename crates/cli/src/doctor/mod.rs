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

mod echo;
mod tls;
mod verdict;
mod walk;

use echo::*;
use tls::*;
use verdict::*;
use walk::*;

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
