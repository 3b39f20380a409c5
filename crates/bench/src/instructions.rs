//! The instruction-count benchmark behind `portcullis bench instructions`: the instructions the
//! **server** executes per accepted connection, counted by valgrind's callgrind, for stock tonic
//! mTLS and for Portcullis.
//!
//! Timings move with the machine's load and clock; instruction counts hardly move at all, so
//! they tell a small regression from noise and are the figures to compare between two versions
//! of the code.
//!
//! # Method
//!
//! - The parent process (the one calling [`run`]) makes a dev PKI and a SQLite registry, as the
//!   handshake benchmark does (ECDSA P-256 keys, one user and device per TOTP connection), and
//!   writes the server's files into a temporary directory.
//! - For each scenario it starts **one** server of that scenario in a child process under
//!   `valgrind --tool=callgrind` (the [`ServerCommand`], which ends in [`serve`]), on a fresh
//!   copy of the registry. The server runs on a current-thread tokio runtime, so that no work
//!   stealing between threads adds instructions that depend on timing.
//! - The parent, not under valgrind, then opens connections to it one after the other: a new TCP
//!   connection, the TLS 1.3 handshake, the Prefix for Portcullis, and one unary Echo call each.
//!   Two warm-up connections come first (the session scenario earns its ticket there). When the
//!   parent closes the child's stdin, the server stops and callgrind writes its totals.
//! - This is done twice per scenario, with `connections` and with `baseline_connections`
//!   connections; the figure is `(I(N) - I(N0)) / (N - N0)`, so that the start of the process,
//!   the loading of the certificates and the warm-up cancel out.
//!
//! The scenarios are those of the handshake benchmark: `mtls` (stock tonic verifying client
//! certificates, with an interceptor that maps the certificate to a user through the same
//! registry), `portcullis-totp` (each connection a different user, so each code is fresh) and
//! `portcullis-session` (a session ticket earned during the warm-up).
//!
//! ```no_run
//! use portcullis_bench::instructions::{Options, ServerCommand, run};
//! // A program that calls `portcullis_bench::instructions::serve` when given these arguments
//! // followed by `--dir DIR --scenario NAME`.
//! let server = ServerCommand {
//!     program: "target/release/portcullis".into(),
//!     args: vec!["bench".into(), "instructions-server".into()],
//! };
//! let report = run(&Options::default(), &server, &mut |_| {})?;
//! println!("{}", report.table());
//! # Ok::<(), portcullis_bench::BenchError>(())
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use portcullis_client::{Client, CodeSource};
use portcullis_core::codec::ALPN_PCS1;
use portcullis_core::{Clock, SystemClock};
use portcullis_store::SqliteRegistry;
use portcullis_tls::devpki::DevCa;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::fixture::{self, BaselineEcho, BenchUser};
use super::{BenchChannel, BenchError, Progress, Scenario};
use portcullis::demo::{self, EchoClient, EchoServer, SayRequest};

/// The scenarios counted, in report order.
pub const SCENARIOS: [Scenario; 3] = [
    Scenario::Mtls,
    Scenario::PortcullisTotp,
    Scenario::PortcullisSession,
];

/// The targets of the instruction count per accepted connection, as ratios to `mtls`.
pub const TARGETS: [(Scenario, f64); 2] = [
    (Scenario::PortcullisTotp, 1.10),
    (Scenario::PortcullisSession, 1.05),
];

/// Connections opened before the counted ones, in both runs of a scenario.
const WARM_UP: usize = 2;

/// How long the server under valgrind may take to start, and to stop and write its counts.
const CHILD_LIMIT: Duration = Duration::from_secs(180);

/// Files of the server's directory.
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server-key.pem";
const REGISTRY_FILE: &str = "registry.db";

/// What to count.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Connections of the long run (N).
    pub connections: usize,
    /// Connections of the short run (N0), whose count is subtracted; smaller than `connections`.
    pub baseline_connections: usize,
    /// The valgrind program.
    pub valgrind: PathBuf,
    /// Where to keep the callgrind output of each run (`<scenario>-<connections>/callgrind.out`,
    /// for `callgrind_annotate`) with the server's files and logs; a new or empty directory.
    /// `None`: a temporary directory, removed at the end.
    pub out_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connections: 100,
            baseline_connections: 10,
            valgrind: PathBuf::from("valgrind"),
            out_dir: None,
        }
    }
}

/// The program that runs one scenario's server: [`run`] starts it under valgrind with `args`
/// followed by `--dir DIR --scenario NAME`, and it must then call [`serve`] with them.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The program (for the `portcullis` binary: itself).
    pub program: PathBuf,
    /// Its first arguments (for the `portcullis` binary: `bench instructions-server`).
    pub args: Vec<OsString>,
}

/// The counts of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioCount {
    /// Server instructions per accepted connection: `(instructions - baseline_instructions) /
    /// (connections - baseline_connections)`.
    pub instructions_per_conn: f64,
    /// Instructions of the server process over the run with `connections` connections.
    pub instructions: u64,
    /// Instructions of the server process over the run with `baseline_connections`.
    pub baseline_instructions: u64,
}

/// Everything the instruction-count benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct InstructionReport {
    /// The options of the run.
    pub options: Options,
    /// The valgrind that counted (`valgrind --version`).
    pub valgrind_version: String,
    /// `release` or `debug`: how the measuring program was built (only release figures mean
    /// anything).
    pub build: &'static str,
    /// By scenario name.
    pub scenarios: BTreeMap<String, ScenarioCount>,
    /// Instructions per connection of each Portcullis scenario divided by `mtls`'s.
    pub ratios_to_mtls: BTreeMap<String, f64>,
    /// The target of each ratio.
    pub targets: BTreeMap<String, f64>,
}

/// The scenario of this name among [`SCENARIOS`].
pub fn scenario_named(name: &str) -> Option<Scenario> {
    SCENARIOS.into_iter().find(|s| s.name() == name)
}

/// The version line of `valgrind`, or [`BenchError::ValgrindMissing`].
pub fn valgrind_version(valgrind: &Path) -> Result<String, BenchError> {
    let missing =
        |why: String| BenchError::ValgrindMissing(format!("{}: {why}", valgrind.display()));
    let output = Command::new(valgrind)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| missing(e.to_string()))?;
    if !output.status.success() {
        return Err(missing(format!(
            "`--version` exited with {}",
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The total instruction count of a callgrind output file: its `totals:` line, else its
/// `summary:` line (the first event, `Ir`, is the instruction count).
pub fn callgrind_total(text: &str) -> Option<u64> {
    let field = |prefix: &str| {
        text.lines()
            .rev()
            .filter_map(|l| l.strip_prefix(prefix))
            .find_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    field("totals:").or_else(|| field("summary:"))
}

/// Counts the server's instructions per accepted connection for every scenario of
/// [`SCENARIOS`]. `progress` is called as it goes.
pub fn run(
    options: &Options,
    server: &ServerCommand,
    progress: &mut dyn FnMut(Progress),
) -> Result<InstructionReport, BenchError> {
    if options.baseline_connections == 0 || options.connections <= options.baseline_connections {
        return Err(BenchError::Setup(format!(
            "the connections ({}) must be more than the baseline connections ({}), which must be at least 1",
            options.connections, options.baseline_connections
        )));
    }
    let valgrind_version = valgrind_version(&options.valgrind)?;
    progress(Progress {
        phase: "setup",
        done: 0,
        total: 1,
    });
    let material = Material::make(options.connections + WARM_UP, options.out_dir.as_deref())?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pc-bench-client")
        .enable_all()
        .build()
        .map_err(BenchError::setup)?;

    let mut scenarios = BTreeMap::new();
    for scenario in SCENARIOS {
        let mut totals = [0u64; 2];
        for (i, n) in [options.baseline_connections, options.connections]
            .into_iter()
            .enumerate()
        {
            progress(Progress {
                phase: scenario.name(),
                done: i,
                total: 2,
            });
            totals[i] = count_run(&material, options, server, scenario, n, &client_rt)?;
        }
        let [baseline, long] = totals;
        let per_conn = (long as f64 - baseline as f64)
            / (options.connections - options.baseline_connections) as f64;
        scenarios.insert(
            scenario.name().to_owned(),
            ScenarioCount {
                instructions_per_conn: per_conn,
                instructions: long,
                baseline_instructions: baseline,
            },
        );
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));

    let mtls = scenarios[Scenario::Mtls.name()].instructions_per_conn;
    let mut ratios_to_mtls = BTreeMap::new();
    let mut targets = BTreeMap::new();
    for (scenario, target) in TARGETS {
        let ratio = scenarios[scenario.name()].instructions_per_conn / mtls.max(f64::MIN_POSITIVE);
        ratios_to_mtls.insert(scenario.name().to_owned(), ratio);
        targets.insert(scenario.name().to_owned(), target);
    }
    Ok(InstructionReport {
        options: options.clone(),
        valgrind_version,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        scenarios,
        ratios_to_mtls,
        targets,
    })
}

/// The PKI, the users and the server's files of one benchmark run.
struct Material {
    dir: PathBuf,
    /// The directory when it is a temporary one.
    _temp: Option<tempfile::TempDir>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    /// TOTP users first (`totp_users` of them), then the `mtls` user, then the session user.
    users: Vec<BenchUser>,
    totp_users: usize,
}

impl Material {
    fn make(totp_users: usize, out_dir: Option<&Path>) -> Result<Self, BenchError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (dir, temp) = match out_dir {
            Some(dir) => {
                let in_dir =
                    |e: std::io::Error| BenchError::Setup(format!("{}: {e}", dir.display()));
                std::fs::create_dir_all(dir).map_err(in_dir)?;
                if std::fs::read_dir(dir).map_err(in_dir)?.next().is_some() {
                    return Err(BenchError::Setup(format!(
                        "{} is not empty: give a new or empty directory",
                        dir.display()
                    )));
                }
                (dir.to_owned(), None)
            }
            None => {
                let temp = tempfile::tempdir().map_err(BenchError::setup)?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let at = |file: &str| dir.join(file);
        let ca = DevCa::generate("Portcullis bench CA").map_err(BenchError::setup)?;
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .map_err(BenchError::setup)?;
        server
            .write(&at(CERT_FILE), &at(KEY_FILE))
            .map_err(BenchError::setup)?;
        std::fs::write(at(CA_FILE), ca.cert_pem()).map_err(BenchError::setup)?;
        let users = {
            let registry = SqliteRegistry::create(&at(REGISTRY_FILE)).map_err(BenchError::setup)?;
            fixture::enroll_users(&ca, &[&registry], totp_users + 2)?
            // The registry is closed here, so that its file can be copied whole.
        };
        Ok(Self {
            dir,
            _temp: temp,
            ca_der: ca.cert_der(),
            users,
            totp_users,
        })
    }

    /// A directory for one server: the server's files and a fresh copy of the registry.
    fn server_dir(&self, name: &str) -> Result<PathBuf, BenchError> {
        let to = self.dir.join(name);
        std::fs::create_dir(&to).map_err(BenchError::setup)?;
        for file in [CA_FILE, CERT_FILE, KEY_FILE, REGISTRY_FILE] {
            std::fs::copy(self.dir.join(file), to.join(file)).map_err(BenchError::setup)?;
        }
        let wal = format!("{REGISTRY_FILE}-wal");
        if self.dir.join(&wal).exists() {
            std::fs::copy(self.dir.join(&wal), to.join(&wal)).map_err(BenchError::setup)?;
        }
        Ok(to)
    }
}

/// The server child; killed if it is still running when dropped (an error on the way).
struct ServerChild(Child);

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last non-empty line of a log file, for an error message.
fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no output".into())
}

/// One run: the scenario's server under callgrind, `n` counted connections; the server's
/// instruction total.
fn count_run(
    material: &Material,
    options: &Options,
    server: &ServerCommand,
    scenario: Scenario,
    n: usize,
    client_rt: &tokio::runtime::Runtime,
) -> Result<u64, BenchError> {
    let dir = material.server_dir(&format!("{}-{n}", scenario.name()))?;
    let out_file = dir.join("callgrind.out");
    let valgrind_log = dir.join("valgrind.log");
    let server_log = dir.join("server.log");
    let mut out_arg = OsString::from("--callgrind-out-file=");
    out_arg.push(&out_file);
    let mut log_arg = OsString::from("--log-file=");
    log_arg.push(&valgrind_log);
    let stderr = std::fs::File::create(&server_log).map_err(BenchError::setup)?;
    let child = Command::new(&options.valgrind)
        .arg("--tool=callgrind")
        .arg(out_arg)
        .arg(log_arg)
        .arg(&server.program)
        .args(&server.args)
        .arg("--dir")
        .arg(&dir)
        .arg("--scenario")
        .arg(scenario.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| BenchError::ValgrindMissing(format!("{}: {e}", options.valgrind.display())))?;
    let mut child = ServerChild(child);
    let failed = |what: &str| {
        BenchError::Run(format!(
            "{} server under valgrind {what}: {} (valgrind: {})",
            scenario.name(),
            last_line(&server_log),
            last_line(&valgrind_log)
        ))
    };

    // The server's first line on stdout: `listening on ADDR`.
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| BenchError::Setup("no stdout of the server".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        // Drain the rest, so that the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(CHILD_LIMIT) {
        Ok(Some(line)) => line,
        Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            return Err(failed("did not start"));
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(failed("did not start in time"));
        }
    };
    let addr: SocketAddr = line
        .strip_prefix("listening on ")
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| BenchError::Run(format!("unexpected first line of the server: {line}")))?;

    client_rt.block_on(connect_all(material, scenario, addr, WARM_UP + n))?;
    // Let the server finish with the last connection before it is told to stop.
    std::thread::sleep(Duration::from_millis(500));
    drop(child.0.stdin.take());
    let started = Instant::now();
    let status = loop {
        match child.0.try_wait().map_err(BenchError::run)? {
            Some(status) => break status,
            None if started.elapsed() > CHILD_LIMIT => return Err(failed("did not stop")),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if !status.success() {
        return Err(failed(&format!("exited with {status}")));
    }
    let text = std::fs::read_to_string(&out_file)
        .map_err(|e| BenchError::Run(format!("callgrind output {}: {e}", out_file.display())))?;
    callgrind_total(&text).ok_or_else(|| {
        BenchError::Run(format!(
            "no totals line in callgrind output {}",
            out_file.display()
        ))
    })
}

/// `count` connections to the scenario's server at `addr`, one after the other, each a new
/// TCP connection, the handshake and one unary Echo call.
async fn connect_all(
    material: &Material,
    scenario: Scenario,
    addr: SocketAddr,
    count: usize,
) -> Result<(), BenchError> {
    let mtls_user = &material.users[material.totp_users];
    let session_user = &material.users[material.totp_users + 1];
    let mtls_config =
        fixture::tls_client_config(&material.ca_der, Some(&mtls_user.device), b"h2", false)?;
    let session_client = Client::builder()
        .tls_config(fixture::tls_client_config(
            &material.ca_der,
            Some(&session_user.device),
            ALPN_PCS1,
            false,
        )?)
        .server_name("localhost")
        .user(session_user.name.clone())
        .code_source(CodeSource::secret(session_user.totp.clone()))
        .build()
        .map_err(BenchError::setup)?;
    let target = addr.to_string();
    for i in 0..count {
        let channel = match scenario {
            Scenario::Mtls => BenchChannel::Plain(fixture::tls_channel(addr, mtls_config.clone())),
            Scenario::PortcullisTotp => {
                let user = material
                    .users
                    .get(i)
                    .filter(|_| i < material.totp_users)
                    .ok_or_else(|| BenchError::Run("no TOTP user left".into()))?;
                let code = user.totp.generate(SystemClock.now_ms() / 1000);
                let client = Client::builder()
                    .tls_config(fixture::tls_client_config(
                        &material.ca_der,
                        Some(&user.device),
                        ALPN_PCS1,
                        false,
                    )?)
                    .server_name("localhost")
                    .user(user.name.clone())
                    .code_source(CodeSource::fixed(code))
                    .build()
                    .map_err(BenchError::run)?;
                BenchChannel::Portcullis(client.connect_lazy(&target).map_err(BenchError::run)?)
            }
            Scenario::PortcullisSession => BenchChannel::Portcullis(
                session_client
                    .connect_lazy(&target)
                    .map_err(BenchError::run)?,
            ),
            other => {
                return Err(BenchError::Setup(format!(
                    "{} is not counted by the instruction-count benchmark",
                    other.name()
                )));
            }
        };
        EchoClient::new(channel)
            .say(SayRequest { text: "x".into() })
            .await
            .map_err(|s| BenchError::Run(format!("{}: {}", scenario.name(), s.message())))?;
    }
    Ok(())
}

/// The server side of one run: serves `scenario` from the files in `dir` (written by [`run`])
/// on 127.0.0.1, calls `ready` with its address, and returns when its stdin is closed.
///
/// This is what the [`ServerCommand`] runs under valgrind.
pub fn serve(
    dir: &Path,
    scenario: Scenario,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), BenchError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.join(file).display())))
    };
    let (ca_pem, cert_pem, key_pem) = (read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?);
    let chain =
        portcullis_tls::parse_certs(cert_pem.as_bytes(), CERT_FILE).map_err(BenchError::setup)?;
    let key = portcullis_tls::parse_key(key_pem.as_bytes(), KEY_FILE).map_err(BenchError::setup)?;
    let ca_der = portcullis_tls::parse_certs(ca_pem.as_bytes(), CA_FILE)
        .map_err(BenchError::setup)?
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Setup(format!("{CA_FILE}: no certificate")))?;
    let registry =
        Arc::new(SqliteRegistry::open(&dir.join(REGISTRY_FILE)).map_err(BenchError::setup)?);

    // One thread: no work stealing, whose instructions would depend on timing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::setup)?;
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(BenchError::setup)?;
        let addr = listener.local_addr().map_err(BenchError::setup)?;
        // Kept until the end: dropping the gate would stop its background tasks.
        let mut _gate = None;
        match scenario {
            Scenario::Mtls => {
                let mut server = tonic::transport::Server::builder()
                    .tls_config(
                        ServerTlsConfig::new()
                            .identity(Identity::from_pem(&cert_pem, &key_pem))
                            .client_ca_root(Certificate::from_pem(&ca_pem)),
                    )
                    .map_err(BenchError::setup)?;
                let interceptor =
                    fixture::mtls_interceptor(registry, Arc::new(AtomicUsize::new(0)));
                tokio::spawn(
                    server
                        .add_service(EchoServer::with_interceptor(BaselineEcho, interceptor))
                        .serve_with_incoming(fixture::nodelay_incoming(listener)),
                );
            }
            Scenario::PortcullisTotp | Scenario::PortcullisSession => {
                let gate = fixture::portcullis_gate(chain, key, &ca_der, registry)?;
                let incoming = gate.incoming(listener);
                tokio::spawn(
                    gate.server()
                        .add_service(demo::service())
                        .serve_with_incoming(incoming),
                );
                _gate = Some(gate);
            }
            other => {
                return Err(BenchError::Setup(format!(
                    "{} is not counted by the instruction-count benchmark",
                    other.name()
                )));
            }
        }
        ready(addr);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        });
        let _ = rx.await;
        Ok(())
    })
}

/// `12345678` as `12,345,678`.
fn grouped(n: f64) -> String {
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 { format!("-{out}") } else { out }
}

impl InstructionReport {
    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Server instructions per accepted connection (callgrind; runs of {} and {} connections; {}, {} build)",
            self.options.connections,
            self.options.baseline_connections,
            self.valgrind_version,
            self.build
        );
        let _ = writeln!(
            out,
            "{:<22} {:>16} {:>10} {:>8}",
            "scenario", "instructions", "vs mtls", "target"
        );
        for scenario in SCENARIOS {
            let Some(s) = self.scenarios.get(scenario.name()) else {
                continue;
            };
            let ratio = self
                .ratios_to_mtls
                .get(scenario.name())
                .map(|r| format!("{r:.3}"))
                .unwrap_or_default();
            let target = self
                .targets
                .get(scenario.name())
                .map(|t| format!("≤ {t:.2}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<22} {:>16} {:>10} {:>8}",
                scenario.name(),
                grouped(s.instructions_per_conn),
                ratio,
                target
            );
        }
        if self.build == "debug" {
            let _ = writeln!(
                out,
                "(a debug build: build with --release for figures that mean anything)"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_line_wins_over_summary() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 1234\n\nfn=main\n1 5\ntotals: 1240\n";
        assert_eq!(callgrind_total(text), Some(1240));
        assert_eq!(callgrind_total("events: Ir\nsummary: 99 3\n"), Some(99));
        assert_eq!(callgrind_total("events: Ir\n"), None);
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(12_345_678.0), "12,345,678");
        assert_eq!(grouped(-1234.0), "-1,234");
    }

    #[test]
    fn a_missing_valgrind_is_named() {
        let err = valgrind_version(Path::new("/nonexistent/valgrind")).unwrap_err();
        assert!(matches!(err, BenchError::ValgrindMissing(_)), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn too_few_connections_are_refused() {
        let options = Options {
            connections: 5,
            baseline_connections: 5,
            ..Options::default()
        };
        let server = ServerCommand {
            program: PathBuf::from("/nonexistent"),
            args: Vec::new(),
        };
        let err = run(&options, &server, &mut |_| {}).unwrap_err();
        assert!(matches!(err, BenchError::Setup(_)), "{err}");
    }
}
