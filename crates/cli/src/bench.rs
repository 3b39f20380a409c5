//! `portcullis bench handshake` and `portcullis bench instructions`: what Portcullis costs
//! against stock tonic mTLS, measured here, in time and in server instructions.

use std::io::{IsTerminal, Write};

use clap::Args;
use portcullis_bench::instructions::{self, ServerCommand};
use portcullis_bench::{Options, Progress};

use crate::CliResult;

/// `portcullis bench handshake`.
#[derive(Debug, Args)]
pub(crate) struct HandshakeArgs {
    /// Rounds of connection setup: each round opens one new connection per scenario.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: u64,
    /// Unary calls per scenario on an established connection (0 skips them).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    rpcs: u64,
    /// Tasks opening connections at once in the throughput phase (0 skips it).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=4096))]
    concurrency: u64,
    /// Seconds of each throughput scenario.
    #[arg(long, default_value_t = 3.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Idle connections opened per scenario to measure memory (0 skips it).
    #[arg(long = "idle", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    idle_connections: u64,
    /// Also measure round trips through an in-process proxy adding this many ms per round trip.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=1000))]
    rtt_ms: Option<u64>,
    /// Rounds of the round-trip measurement.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rtt_connections: u64,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    json: bool,
    /// Run Portcullis on this PostgreSQL registry (`postgres://…`, an empty database: the
    /// benchmark adds its users to it) instead of a temporary SQLite file; the stock baselines
    /// are unchanged.
    #[arg(long, value_name = "URL")]
    registry: Option<String>,
}

/// A progress indicator on stderr: one updated line on a terminal, else a line per phase.
fn progress_indicator(terminal: bool) -> impl FnMut(Progress) {
    let mut last_phase = "";
    move |p: Progress| {
        let mut err = std::io::stderr().lock();
        if terminal {
            let _ = write!(err, "\r\x1b[2K{} {}/{}", p.phase, p.done, p.total);
        } else if p.phase != last_phase {
            let _ = writeln!(err, "bench: {} ({} steps)", p.phase, p.total);
        }
        last_phase = p.phase;
        let _ = err.flush();
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=600.0).contains(&v) => Ok(v),
        _ => Err("a number of seconds from 0.1 to 600".into()),
    }
}

pub(crate) fn handshake(args: &HandshakeArgs) -> CliResult {
    let options = Options {
        connections: args.connections as usize,
        rpcs: args.rpcs as usize,
        concurrency: args.concurrency as usize,
        seconds: args.seconds,
        idle_connections: args.idle_connections as usize,
        rtt_ms: args.rtt_ms,
        rtt_connections: args.rtt_connections as usize,
    };
    let gate_registry = match &args.registry {
        None => None,
        Some(url) => Some(bench_registry(url)?),
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let terminal = std::io::stderr().is_terminal();
    let report =
        portcullis_bench::run_on(&options, gate_registry, &mut progress_indicator(terminal))
            .map_err(|e| e.to_string())?;
    if terminal {
        eprint!("\r\x1b[2K");
    }
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| format!("json: {e}"))?;
        out!("{json}");
    } else {
        out!("{}", report.table());
    }
    Ok(())
}

/// The PostgreSQL registry of `bench handshake --registry`: a fresh key of the run's own (the
/// benchmark's users are its own too), and an empty database.
fn bench_registry(url: &str) -> CliResult<std::sync::Arc<dyn portcullis_core::Registry>> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("--registry: use postgres://USER:PASSWORD@HOST:PORT/DB".to_owned());
    }
    let key = portcullis_store::SecretKey::generate()
        .map_err(|_| "the system random generator failed".to_owned())?;
    let registry =
        portcullis_postgres::PgRegistry::open_blocking(url, key, &[]).map_err(|e| e.to_string())?;
    if !registry.is_empty().map_err(|e| e.to_string())? {
        return Err(format!(
            "PostgreSQL at {}: the database holds a registry; the benchmark adds users of its own, so give it an empty database",
            registry.host()
        ));
    }
    Ok(std::sync::Arc::new(registry))
}

/// `portcullis bench instructions`.
#[derive(Debug, Args)]
pub(crate) struct InstructionsArgs {
    /// Connections of the long run; the short run's count is subtracted from its count.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    connections: u64,
    /// Connections of the short run, whose count is subtracted (start-up cost cancels out).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    baseline: u64,
    /// The valgrind program to run the server under.
    #[arg(long, value_name = "PATH", default_value = "valgrind")]
    valgrind: std::path::PathBuf,
    /// Keep the callgrind output of each run in DIR (a new or empty directory), one
    /// `<scenario>-<connections>/callgrind.out` per run, for callgrind_annotate.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<std::path::PathBuf>,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn instructions(args: &InstructionsArgs) -> CliResult {
    if args.connections <= args.baseline {
        return Err(format!(
            "--connections ({}) must be more than --baseline ({})",
            args.connections, args.baseline
        ));
    }
    let options = instructions::Options {
        connections: args.connections as usize,
        baseline_connections: args.baseline as usize,
        valgrind: args.valgrind.clone(),
        out_dir: args.out_dir.clone(),
    };
    let program =
        std::env::current_exe().map_err(|e| format!("cannot find this program's file: {e}"))?;
    let server = ServerCommand {
        program,
        args: vec!["bench".into(), "instructions-server".into()],
    };
    let terminal = std::io::stderr().is_terminal();
    let report = instructions::run(&options, &server, &mut progress_indicator(terminal))
        .map_err(|e| e.to_string())?;
    if terminal {
        eprint!("\r\x1b[2K");
    }
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| format!("json: {e}"))?;
        out!("{json}");
    } else {
        out!("{}", report.table());
    }
    Ok(())
}

/// `portcullis bench instructions-server`: one scenario's server, run under valgrind by
/// `portcullis bench instructions`.
#[derive(Debug, Args)]
pub(crate) struct InstructionsServerArgs {
    /// The directory of the server's files, written by `portcullis bench instructions`.
    #[arg(long, value_name = "DIR")]
    dir: std::path::PathBuf,
    /// The scenario: mtls, portcullis-totp or portcullis-session.
    #[arg(long, value_name = "NAME")]
    scenario: String,
}

pub(crate) fn instructions_server(args: &InstructionsServerArgs) -> CliResult {
    let scenario = instructions::scenario_named(&args.scenario).ok_or_else(|| {
        format!(
            "unknown scenario {:?} (mtls, portcullis-totp or portcullis-session)",
            args.scenario
        )
    })?;
    instructions::serve(&args.dir, scenario, |addr| out!("listening on {addr}"))
        .map_err(|e| e.to_string())
}
