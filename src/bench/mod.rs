//! The handshake benchmark behind `portcullis bench handshake`: what multi-factor
//! authentication at the transport layer costs, measured against stock tonic mTLS in one
//! process, on loopback.
//!
//! Every round connects once in each [`Scenario`], in turn, so that drift of the machine hits
//! all scenarios alike; a scenario's cost is a new TCP connection, the handshake and the first
//! unary Echo call. The ratio of a Portcullis scenario to `mtls` is the median of the ratios
//! measured in the same round. Then: per-RPC latency on established connections, handshakes
//! per second under concurrency with the server's CPU time per connection, resident memory per
//! idle connection, and optionally round trips through a delay proxy.
//!
//! ```no_run
//! let options = portcullis::bench::Options { connections: 50, ..Default::default() };
//! let report = portcullis::bench::run(&options, &mut |_| {})?;
//! println!("{}", report.table());
//! # Ok::<(), portcullis::bench::BenchError>(())
//! ```

mod cpu;
mod fixture;
mod proxy;
mod stats;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use fixture::{BenchChannel, Fixture, Scenario};
pub use stats::{Summary, median, median_ratio, quantile};

use crate::demo::SayRequest;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the PKI, registry or servers failed.
    #[error("bench setup: {0}")]
    Setup(String),
    /// A connection or call failed while measuring.
    #[error("bench: {0}")]
    Run(String),
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
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs the benchmark. `progress` is called as it goes (for a progress indicator).
pub fn run(options: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report, BenchError> {
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
    let fixture = Arc::new(Fixture::start(&server_rt, totp_users)?);
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
    Ok(Report {
        options: options.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        setup,
        setup_ratios_to_mtls,
        rpc,
        throughput,
        rss_bytes_per_idle_connection,
        rtt,
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
    let mtls = report.scenarios["mtls"].handshakes_per_sec;
    for s in [Scenario::PortcullisTotp, Scenario::PortcullisSession] {
        let rate = report.scenarios[s.name()].handshakes_per_sec;
        report
            .ratios_to_mtls
            .insert(s.name().to_owned(), rate / mtls.max(f64::MIN_POSITIVE));
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
            for (name, s) in &t.scenarios {
                let cpu = s
                    .server_cpu_us_per_conn
                    .map(|c| format!("{c:.0}µs server CPU/conn"))
                    .unwrap_or_else(|| "server CPU n/a".into());
                let ratio = t
                    .ratios_to_mtls
                    .get(name)
                    .map(|r| format!(", {r:.3} of mtls"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<20} {:>8.0} handshakes/s, {cpu}, {} failed{ratio}",
                    name, s.handshakes_per_sec, s.failures
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
