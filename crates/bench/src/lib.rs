//! The handshake benchmark behind `portcullis bench handshake`: what multi-factor
//! authentication at the transport layer costs, measured against stock tonic mTLS in one
//! process, on loopback.
//!
//! Every round connects once in each [`Scenario`], in turn, so that drift of the machine hits
//! all scenarios alike; a scenario's cost is a new TCP connection, the handshake and the first
//! unary Echo call. The ratio of a Portcullis scenario to `mtls` is the median of the ratios
//! measured in the same round. Then: per-RPC latency on established connections, handshakes
//! per second under concurrency with the server's CPU time per connection, resident memory per
//! idle connection, and optionally round trips through a delay proxy. [`Report::scenarios`]
//! gathers the figures by scenario, with the ratios of each Portcullis scenario to its baseline.
//!
//! The instruction-count benchmark (`portcullis bench instructions`), which counts the server's
//! instructions per accepted connection under valgrind, is in [`instructions`].
//!
//! ```no_run
//! let options = portcullis_bench::Options { connections: 50, ..Default::default() };
//! let report = portcullis_bench::run(&options, &mut |_| {})?;
//! println!("{}", report.table());
//! # Ok::<(), portcullis_bench::BenchError>(())
//! ```

mod cpu;
mod fixture;
pub mod instructions;
mod proxy;
mod stats;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use fixture::{BenchChannel, Fixture, Scenario};
pub use stats::{Summary, median, median_ratio, quantile};

use portcullis::demo::SayRequest;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the PKI, registry or servers failed.
    #[error("bench setup: {0}")]
    Setup(String),
    /// A connection or call failed while measuring.
    #[error("bench: {0}")]
    Run(String),
    /// valgrind, which the instruction-count benchmark runs the server under, is not there.
    #[error(
        "valgrind not found ({0}): the instruction-count benchmark needs it (e.g. `apt-get install valgrind`)"
    )]
    ValgrindMissing(String),
}

impl BenchError {
    fn setup(e: impl std::fmt::Display) -> Self {
        Self::Setup(e.to_string())
    }

    fn run(e: impl std::fmt::Display) -> Self {
        Self::Run(e.to_string())
    }
}

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Rounds of connection setup (one connection per scenario per round).
    pub connections: usize,
    /// Unary calls per scenario on an established connection.
    pub rpcs: usize,
    /// Connecting tasks in the throughput phase; 0 skips it.
    pub concurrency: usize,
    /// Seconds of each throughput scenario.
    pub seconds: f64,
    /// Idle connections opened per scenario for the memory figure; 0 skips it.
    pub idle_connections: usize,
    /// Round trip added by a delay proxy for the round-trip phase; `None` skips it.
    pub rtt_ms: Option<u64>,
    /// Rounds in the round-trip phase.
    pub rtt_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connections: 200,
            rpcs: 1000,
            concurrency: 64,
            seconds: 3.0,
            idle_connections: 100,
            rtt_ms: None,
            rtt_connections: 20,
        }
    }
}

/// Where the benchmark is, for a progress indicator.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The phase: `setup`, `connections`, `rpcs`, `throughput`, `memory`, `rtt`.
    pub phase: &'static str,
    /// Steps done in this phase.
    pub done: usize,
    /// Steps in this phase.
    pub total: usize,
}

/// Per-RPC latency on established connections.
#[derive(Debug, Clone, Serialize)]
pub struct RpcReport {
    /// Stock tonic mTLS.
    pub mtls: Summary,
    /// Portcullis.
    pub portcullis: Summary,
    /// Median of pairwise ratios, Portcullis to mTLS.
    pub ratio: f64,
}

/// One scenario of the throughput phase.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputScenario {
    /// Connections set up (handshake + first call) per second.
    pub handshakes_per_sec: f64,
    /// Connections that failed.
    pub failures: usize,
    /// CPU time of the server threads per accepted connection, in µs (Linux only).
    pub server_cpu_us_per_conn: Option<f64>,
}

/// The throughput phase.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    /// Connecting tasks.
    pub concurrency: usize,
    /// Seconds per scenario.
    pub seconds: f64,
    /// By scenario name.
    pub scenarios: BTreeMap<String, ThroughputScenario>,
    /// Handshakes per second of each Portcullis scenario divided by `mtls`'s.
    pub ratios_to_mtls: BTreeMap<String, f64>,
    /// Server CPU per accepted connection of each Portcullis scenario divided by `mtls`'s
    /// (Linux only).
    pub server_cpu_ratios_to_mtls: BTreeMap<String, f64>,
}

/// One scenario's figures side by side.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioSummary {
    /// Median connection setup (connect + handshake + first call), in µs.
    pub setup_median_us: Option<f64>,
    /// Connections set up per second in the throughput phase.
    pub handshakes_per_sec: Option<f64>,
    /// CPU time of the server threads per accepted connection in the throughput phase, in µs
    /// (Linux only).
    pub server_cpu_us_per_conn: Option<f64>,
    /// For a Portcullis scenario: its ratios to the stock tonic scenario it replaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratios: Option<Ratios>,
}

/// A Portcullis scenario's figures divided by those of its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// The scenario compared with: `mtls`, or `mtls-resumed` for `portcullis-session-resumed`.
    pub baseline: &'static str,
    /// Connection setup: the median of the per-round ratios.
    pub setup: Option<f64>,
    /// Handshakes per second in the throughput phase (higher is better).
    pub handshakes_per_sec: Option<f64>,
    /// Server CPU per accepted connection in the throughput phase (lower is better).
    pub server_cpu_per_conn: Option<f64>,
}

/// The round-trip phase: setup times through a delay proxy.
#[derive(Debug, Clone, Serialize)]
pub struct RttReport {
    /// The round trip the proxy adds, in ms.
    pub rtt_ms: u64,
    /// Setup time by scenario.
    pub setup: BTreeMap<String, Summary>,
    /// Median setup time in round trips, by scenario.
    pub round_trips: BTreeMap<String, f64>,
    /// Median of (scenario - mtls) per round, as a fraction of one round trip.
    pub extra_rtt_vs_mtls: BTreeMap<String, f64>,
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The options of the run.
    pub options: Options,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// Connect + handshake + first unary call, by scenario.
    pub setup: BTreeMap<String, Summary>,
    /// Median of pairwise ratios to `mtls` (to `mtls-resumed` for the resumed scenario).
    pub setup_ratios_to_mtls: BTreeMap<String, f64>,
    /// Per-RPC latency on established connections.
    pub rpc: Option<RpcReport>,
    /// Handshakes per second under concurrency.
    pub throughput: Option<ThroughputReport>,
    /// Resident memory per idle connection (client and server in this process), by scenario.
    pub rss_bytes_per_idle_connection: BTreeMap<String, f64>,
    /// Round trips through a delay proxy.
    pub rtt: Option<RttReport>,
    /// Setup, throughput and server CPU per connection by scenario, with the ratios of each
    /// Portcullis scenario to its baseline.
    pub scenarios: BTreeMap<String, ScenarioSummary>,
}

/// The scenario a Portcullis scenario is compared with, or `None` for a stock one.
fn baseline_of(scenario: Scenario) -> Option<Scenario> {
    match scenario {
        Scenario::PortcullisTotp | Scenario::PortcullisSession => Some(Scenario::Mtls),
        Scenario::PortcullisSessionResumed => Some(Scenario::MtlsResumed),
        _ => None,
    }
}

/// The per-scenario view of what the phases measured.
fn summarize(
    setup: &BTreeMap<String, Summary>,
    setup_ratios_to_mtls: &BTreeMap<String, f64>,
    throughput: Option<&ThroughputReport>,
) -> BTreeMap<String, ScenarioSummary> {
    let measured = |name: &str| throughput.and_then(|t| t.scenarios.get(name));
    let mut out = BTreeMap::new();
    for scenario in Scenario::ALL {
        let name = scenario.name();
        let setup_median_us = setup.get(name).map(|s| s.median_us);
        let handshakes_per_sec = measured(name).map(|t| t.handshakes_per_sec);
        let server_cpu_us_per_conn = measured(name).and_then(|t| t.server_cpu_us_per_conn);
        if setup_median_us.is_none() && handshakes_per_sec.is_none() {
            continue;
        }
        let ratios = baseline_of(scenario).map(|baseline| Ratios {
            baseline: baseline.name(),
            setup: setup_ratios_to_mtls.get(name).copied(),
            handshakes_per_sec: throughput.and_then(|t| t.ratios_to_mtls.get(name).copied()),
            server_cpu_per_conn: throughput
                .and_then(|t| t.server_cpu_ratios_to_mtls.get(name).copied()),
        });
        out.insert(
            name.to_owned(),
            ScenarioSummary {
                setup_median_us,
                handshakes_per_sec,
                server_cpu_us_per_conn,
                ratios,
            },
        );
    }
    out
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs the benchmark. `progress` is called as it goes (for a progress indicator).
pub fn run(options: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report, BenchError> {
    run_on(options, None, progress)
}

/// [`run`], with Portcullis on `gate_registry` (an empty registry: a PostgreSQL one, say; the
/// benchmark adds its users to it) instead of a temporary SQLite file. The stock baselines are
/// unchanged (the mTLS one maps certificates through SQLite), so the ratios say what the
/// registry costs the gate.
pub fn run_on(
    options: &Options,
    gate_registry: Option<Arc<dyn portcullis_core::Registry>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, BenchError> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(cpu::SERVER_THREAD_NAME)
        .enable_all()
        .build()
        .map_err(BenchError::setup)?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pc-bench-client")
        .enable_all()
        .build()
        .map_err(BenchError::setup)?;

    progress(Progress {
        phase: "setup",
        done: 0,
        total: 1,
    });
    // Each TOTP connection needs a user whose code was not used in this time step.
    let throughput_users = if options.concurrency > 0 {
        (options.seconds * 4000.0) as usize
    } else {
        0
    };
    let totp_users = options.connections + options.rtt_connections + throughput_users + 8;
    let fixture = Arc::new(Fixture::start(&server_rt, totp_users, gate_registry)?);
    let result = client_rt.block_on(measure(options, fixture.clone(), progress));
    drop(fixture);
    client_rt.shutdown_timeout(Duration::from_secs(2));
    server_rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn measure(
    options: &Options,
    fixture: Arc<Fixture>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, BenchError> {
    fixture.warm_up().await?;

    // Connection setup, round-robin.
    let mut samples: BTreeMap<Scenario, Vec<f64>> = BTreeMap::new();
    for round in 0..options.connections {
        for scenario in Scenario::ALL {
            let took = fixture.connect_and_call(scenario).await?;
            samples.entry(scenario).or_default().push(us(took));
        }
        if round % 10 == 0 || round + 1 == options.connections {
            progress(Progress {
                phase: "connections",
                done: round + 1,
                total: options.connections,
            });
        }
    }
    let setup = samples
        .iter()
        .map(|(s, v)| (s.name().to_owned(), Summary::of(v)))
        .collect();
    let ratio = |a: Scenario, b: Scenario| median_ratio(&samples[&a], &samples[&b]);
    let mut setup_ratios_to_mtls = BTreeMap::new();
    if options.connections > 0 {
        for s in [Scenario::PortcullisTotp, Scenario::PortcullisSession] {
            setup_ratios_to_mtls.insert(s.name().to_owned(), ratio(s, Scenario::Mtls));
        }
        setup_ratios_to_mtls.insert(
            Scenario::PortcullisSessionResumed.name().to_owned(),
            ratio(Scenario::PortcullisSessionResumed, Scenario::MtlsResumed),
        );
    }

    let rpc = if options.rpcs > 0 {
        Some(rpc_latency(options, &fixture, progress).await?)
    } else {
        None
    };
    let throughput = if options.concurrency > 0 {
        Some(throughput(options, &fixture, progress).await?)
    } else {
        None
    };
    let mut rss_bytes_per_idle_connection = BTreeMap::new();
    if options.idle_connections > 0 {
        for scenario in [Scenario::Mtls, Scenario::PortcullisSession] {
            progress(Progress {
                phase: "memory",
                done: 0,
                total: options.idle_connections,
            });
            if let Some(bytes) = idle_memory(options.idle_connections, &fixture, scenario).await? {
                rss_bytes_per_idle_connection.insert(scenario.name().to_owned(), bytes);
            }
        }
    }
    let rtt = match options.rtt_ms {
        Some(ms) => Some(round_trips(options, ms, &fixture, progress).await?),
        None => None,
    };
    let scenarios = summarize(&setup, &setup_ratios_to_mtls, throughput.as_ref());
    Ok(Report {
        options: options.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        setup,
        setup_ratios_to_mtls,
        rpc,
        throughput,
        rss_bytes_per_idle_connection,
        rtt,
        scenarios,
    })
}

async fn rpc_latency(
    options: &Options,
    fixture: &Fixture,
    progress: &mut dyn FnMut(Progress),
) -> Result<RpcReport, BenchError> {
    let (_, mut mtls) = fixture
        .connect_and_call_via(Scenario::Mtls, fixture.mtls)
        .await?;
    let (_, mut pc) = fixture
        .connect_and_call_via(Scenario::PortcullisSession, fixture.portcullis)
        .await?;
    let request = || SayRequest { text: "x".into() };
    for _ in 0..50 {
        mtls.say(request()).await.map_err(BenchError::run)?;
        pc.say(request()).await.map_err(BenchError::run)?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..options.rpcs {
        let t = Instant::now();
        mtls.say(request()).await.map_err(BenchError::run)?;
        a.push(us(t.elapsed()));
        let t = Instant::now();
        pc.say(request()).await.map_err(BenchError::run)?;
        b.push(us(t.elapsed()));
        if i % 100 == 0 {
            progress(Progress {
                phase: "rpcs",
                done: i + 1,
                total: options.rpcs,
            });
        }
    }
    Ok(RpcReport {
        mtls: Summary::of(&a),
        portcullis: Summary::of(&b),
        ratio: median_ratio(&b, &a),
    })
}

async fn throughput(
    options: &Options,
    fixture: &Arc<Fixture>,
    progress: &mut dyn FnMut(Progress),
) -> Result<ThroughputReport, BenchError> {
    let scenarios = [
        Scenario::Mtls,
        Scenario::PortcullisTotp,
        Scenario::PortcullisSession,
    ];
    let mut report = ThroughputReport {
        concurrency: options.concurrency,
        seconds: options.seconds,
        scenarios: BTreeMap::new(),
        ratios_to_mtls: BTreeMap::new(),
        server_cpu_ratios_to_mtls: BTreeMap::new(),
    };
    for (i, scenario) in scenarios.into_iter().enumerate() {
        progress(Progress {
            phase: "throughput",
            done: i,
            total: scenarios.len(),
        });
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let cpu_before = cpu::server_cpu_time();
        let started = Instant::now();
        let until = started + Duration::from_secs_f64(options.seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..options.concurrency {
            let fixture = fixture.clone();
            let (ok, failed) = (ok.clone(), failed.clone());
            tasks.spawn(async move {
                while Instant::now() < until {
                    if scenario == Scenario::PortcullisTotp && fixture.totp_users_left() == 0 {
                        break;
                    }
                    match fixture.connect_and_call(scenario).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let elapsed = started.elapsed().as_secs_f64();
        let done = ok.load(Ordering::Relaxed);
        let cpu = cpu::server_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| us(after.saturating_sub(before)) / done.max(1) as f64);
        report.scenarios.insert(
            scenario.name().to_owned(),
            ThroughputScenario {
                handshakes_per_sec: done as f64 / elapsed,
                failures: failed.load(Ordering::Relaxed),
                server_cpu_us_per_conn: cpu,
            },
        );
        // Let the sockets of this scenario close before the next one starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mtls = &report.scenarios["mtls"];
    let (mtls_rate, mtls_cpu) = (mtls.handshakes_per_sec, mtls.server_cpu_us_per_conn);
    for s in [Scenario::PortcullisTotp, Scenario::PortcullisSession] {
        let measured = &report.scenarios[s.name()];
        let rate = measured.handshakes_per_sec / mtls_rate.max(f64::MIN_POSITIVE);
        let cpu = measured
            .server_cpu_us_per_conn
            .zip(mtls_cpu)
            .map(|(cpu, base)| cpu / base.max(f64::MIN_POSITIVE));
        report.ratios_to_mtls.insert(s.name().to_owned(), rate);
        if let Some(cpu) = cpu {
            report
                .server_cpu_ratios_to_mtls
                .insert(s.name().to_owned(), cpu);
        }
    }
    Ok(report)
}

async fn idle_memory(
    n: usize,
    fixture: &Fixture,
    scenario: Scenario,
) -> Result<Option<f64>, BenchError> {
    // One connection first, so that one-time allocations are not counted.
    let (_, first) = fixture
        .connect_and_call_via(scenario, fixture.addr(scenario))
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Some(before) = cpu::resident_bytes() else {
        return Ok(None);
    };
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, client) = fixture
            .connect_and_call_via(scenario, fixture.addr(scenario))
            .await?;
        open.push(client);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = cpu::resident_bytes().unwrap_or(before);
    drop(open);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Some(after.saturating_sub(before) as f64 / n as f64))
}

async fn round_trips(
    options: &Options,
    rtt_ms: u64,
    fixture: &Fixture,
    progress: &mut dyn FnMut(Progress),
) -> Result<RttReport, BenchError> {
    let rtt = Duration::from_millis(rtt_ms);
    let to_mtls = proxy::start(fixture.mtls, rtt)
        .await
        .map_err(BenchError::setup)?;
    let to_portcullis = proxy::start(fixture.portcullis, rtt)
        .await
        .map_err(BenchError::setup)?;
    let scenarios = [
        Scenario::Mtls,
        Scenario::PortcullisTotp,
        Scenario::PortcullisSession,
    ];
    fixture
        .warm_up_via(Scenario::PortcullisSession, to_portcullis)
        .await?;
    let mut samples: BTreeMap<Scenario, Vec<f64>> = BTreeMap::new();
    for round in 0..options.rtt_connections {
        for scenario in scenarios {
            let via = if scenario == Scenario::Mtls {
                to_mtls
            } else {
                to_portcullis
            };
            let (took, _) = fixture.connect_and_call_via(scenario, via).await?;
            samples.entry(scenario).or_default().push(us(took));
        }
        progress(Progress {
            phase: "rtt",
            done: round + 1,
            total: options.rtt_connections,
        });
    }
    let rtt_us = us(rtt);
    let mut report = RttReport {
        rtt_ms,
        setup: BTreeMap::new(),
        round_trips: BTreeMap::new(),
        extra_rtt_vs_mtls: BTreeMap::new(),
    };
    for (scenario, v) in &samples {
        let summary = Summary::of(v);
        report
            .round_trips
            .insert(scenario.name().to_owned(), summary.median_us / rtt_us);
        report.setup.insert(scenario.name().to_owned(), summary);
        if *scenario != Scenario::Mtls {
            let diffs: Vec<f64> = v
                .iter()
                .zip(&samples[&Scenario::Mtls])
                .map(|(x, m)| (x - m) / rtt_us)
                .collect();
            report
                .extra_rtt_vs_mtls
                .insert(scenario.name().to_owned(), median(&diffs));
        }
    }
    Ok(report)
}

impl Report {
    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Connection setup: new TCP connection + handshake + first unary call, loopback, {} rounds, {} CPUs",
            self.options.connections, self.cpus
        );
        let _ = writeln!(
            out,
            "{:<28} {:>10} {:>10} {:>10} {:>10}",
            "scenario", "median", "p90", "p99", "vs mtls"
        );
        for scenario in Scenario::ALL {
            let Some(s) = self.setup.get(scenario.name()) else {
                continue;
            };
            let ratio = self
                .setup_ratios_to_mtls
                .get(scenario.name())
                .map(|r| format!("{r:.3}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<28} {:>8.0}µs {:>8.0}µs {:>8.0}µs {:>10}",
                scenario.name(),
                s.median_us,
                s.p90_us,
                s.p99_us,
                ratio
            );
        }
        let _ = writeln!(
            out,
            "(ratios: median of per-round ratios; the resumed scenario is compared with mtls-resumed)"
        );
        if let Some(rpc) = &self.rpc {
            let _ = writeln!(
                out,
                "\nUnary call on an established connection ({} calls): mtls {:.0}µs, portcullis {:.0}µs median; ratio {:.3}",
                rpc.mtls.n, rpc.mtls.median_us, rpc.portcullis.median_us, rpc.ratio
            );
        }
        if let Some(t) = &self.throughput {
            let _ = writeln!(
                out,
                "\nThroughput: {} tasks opening connections for {} s each",
                t.concurrency, t.seconds
            );
            let of_mtls = |ratios: &BTreeMap<String, f64>, name: &str| {
                ratios
                    .get(name)
                    .map(|r| format!(" ({r:.3} of mtls)"))
                    .unwrap_or_default()
            };
            for (name, s) in &t.scenarios {
                let cpu = s
                    .server_cpu_us_per_conn
                    .map(|c| {
                        let ratio = of_mtls(&t.server_cpu_ratios_to_mtls, name);
                        format!("{c:.0}µs server CPU/conn{ratio}")
                    })
                    .unwrap_or_else(|| "server CPU n/a".into());
                let ratio = of_mtls(&t.ratios_to_mtls, name);
                let _ = writeln!(
                    out,
                    "  {:<20} {:>8.0} handshakes/s{ratio}, {cpu}, {} failed",
                    name, s.handshakes_per_sec, s.failures
                );
            }
        }
        let compared: Vec<_> = Scenario::ALL
            .iter()
            .filter_map(|s| {
                let ratios = self.scenarios.get(s.name())?.ratios.as_ref()?;
                Some((s.name(), ratios))
            })
            .collect();
        if !compared.is_empty() {
            let _ = writeln!(
                out,
                "\nRatios to stock tonic (mtls; mtls-resumed for the resumed scenario):"
            );
            let _ = writeln!(
                out,
                "  {:<28} {:>8} {:>14} {:>16}",
                "scenario", "setup", "handshakes/s", "server CPU/conn"
            );
            let cell = |r: Option<f64>| r.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into());
            for (name, r) in compared {
                let _ = writeln!(
                    out,
                    "  {:<28} {:>8} {:>14} {:>16}",
                    name,
                    cell(r.setup),
                    cell(r.handshakes_per_sec),
                    cell(r.server_cpu_per_conn)
                );
            }
        }
        if !self.rss_bytes_per_idle_connection.is_empty() {
            let _ = writeln!(
                out,
                "\nResident memory per idle connection (client + server in this process):"
            );
            for (name, bytes) in &self.rss_bytes_per_idle_connection {
                let _ = writeln!(out, "  {:<20} {:>8.1} KiB", name, bytes / 1024.0);
            }
        }
        if let Some(r) = &self.rtt {
            let _ = writeln!(
                out,
                "\nRound trips through a proxy adding {} ms per round trip ({} rounds):",
                r.rtt_ms, self.options.rtt_connections
            );
            for (name, s) in &r.setup {
                let extra = r
                    .extra_rtt_vs_mtls
                    .get(name)
                    .map(|x| format!(", {x:+.3} RTT vs mtls"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<20} {:>8.1} ms = {:.2} RTT{extra}",
                    name,
                    s.median_us / 1000.0,
                    r.round_trips[name]
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(median_us: f64) -> Summary {
        Summary::of(&[median_us])
    }

    #[test]
    fn each_portcullis_scenario_carries_its_ratios() {
        let setup: BTreeMap<String, Summary> = Scenario::ALL
            .iter()
            .map(|s| (s.name().to_owned(), summary(1000.0)))
            .collect();
        let setup_ratios = BTreeMap::from([
            ("portcullis-totp".to_owned(), 1.2),
            ("portcullis-session".to_owned(), 1.1),
            ("portcullis-session-resumed".to_owned(), 1.05),
        ]);
        let measured = |rate: f64, cpu: f64| ThroughputScenario {
            handshakes_per_sec: rate,
            failures: 0,
            server_cpu_us_per_conn: Some(cpu),
        };
        let throughput = ThroughputReport {
            concurrency: 2,
            seconds: 1.0,
            scenarios: BTreeMap::from([
                ("mtls".to_owned(), measured(1000.0, 400.0)),
                ("portcullis-totp".to_owned(), measured(800.0, 500.0)),
                ("portcullis-session".to_owned(), measured(950.0, 420.0)),
            ]),
            ratios_to_mtls: BTreeMap::from([
                ("portcullis-totp".to_owned(), 0.8),
                ("portcullis-session".to_owned(), 0.95),
            ]),
            server_cpu_ratios_to_mtls: BTreeMap::from([
                ("portcullis-totp".to_owned(), 1.25),
                ("portcullis-session".to_owned(), 1.05),
            ]),
        };
        let by_name = summarize(&setup, &setup_ratios, Some(&throughput));
        assert_eq!(by_name.len(), Scenario::ALL.len());
        let mtls = &by_name["mtls"];
        assert_eq!(mtls.server_cpu_us_per_conn, Some(400.0));
        assert!(mtls.ratios.is_none());
        let totp = by_name["portcullis-totp"].ratios.as_ref().unwrap();
        assert_eq!(totp.baseline, "mtls");
        assert_eq!(
            (
                totp.setup,
                totp.handshakes_per_sec,
                totp.server_cpu_per_conn
            ),
            (Some(1.2), Some(0.8), Some(1.25))
        );
        let resumed = by_name["portcullis-session-resumed"]
            .ratios
            .as_ref()
            .unwrap();
        assert_eq!(resumed.baseline, "mtls-resumed");
        assert_eq!(resumed.setup, Some(1.05));
        assert_eq!(resumed.server_cpu_per_conn, None);
        let json = serde_json::to_value(&by_name).unwrap();
        assert!(json["mtls"].get("ratios").is_none());
        assert_eq!(json["portcullis-session"]["server_cpu_us_per_conn"], 420.0);
        assert_eq!(
            json["portcullis-session"]["ratios"]["server_cpu_per_conn"],
            1.05
        );
        let table = Report {
            options: Options::default(),
            cpus: 2,
            setup,
            setup_ratios_to_mtls: setup_ratios,
            rpc: None,
            throughput: Some(throughput),
            rss_bytes_per_idle_connection: BTreeMap::new(),
            rtt: None,
            scenarios: by_name,
        }
        .table();
        assert!(
            table.contains("500µs server CPU/conn (1.250 of mtls)"),
            "{table}"
        );
        assert!(table.contains("Ratios to stock tonic"), "{table}");
    }
}
