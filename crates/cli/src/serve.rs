//! `portcullis serve`: the demo Echo service behind the gate, with gRPC server reflection and
//! health checking behind the gate too, and optionally health checks outside it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use portcullis::demo;
use portcullis_core::Registry;
use portcullis_server::limits::{self, RateLimit};
use portcullis_server::policy::Policy;
use portcullis_server::revocation::CrlStale;
use portcullis_server::{AuditFsync, JsonLinesFile, PortcullisServer, TrustedProxies};

use crate::dir::Layout;
use crate::registry::Location;
use crate::{CliResult, DirArg};

/// How long open connections may finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The name of the Echo service, whose health is reported with the server's.
const ECHO_SERVICE: &str =
    <demo::EchoServer<demo::EchoService> as tonic::server::NamedService>::NAME;

/// `portcullis serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// The address to listen on, e.g. 127.0.0.1:50051 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Lifetime of session tickets in seconds; 0 turns sessions off.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    session_ttl: u64,
    /// The largest allowed difference between client and server clocks, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    clock_skew: u64,
    /// Absolute deadline for TLS handshake, Prefix and decision of a connection, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    deadline: u64,
    /// Most connections being authenticated at once; beyond it, OVERLOADED.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_PENDING as u64,
          value_parser = clap::value_parser!(u64).range(1..=limits::MAX_CONNECTION_CAP as u64))]
    max_pending: u64,
    /// Refusals answered with a Verdict at once when over a limit; beyond it, connections are
    /// closed at accept.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_REFUSAL_BUDGET as u64,
          value_parser = clap::value_parser!(u64).range(0..=limits::MAX_CONNECTION_CAP as u64))]
    refusal_budget: u64,
    /// Connection attempts per second allowed from one source address (IPv6: per /64); 0
    /// turns the limit off. Over it: RATE_LIMITED.
    #[arg(long, value_name = "PER_SEC", default_value_t = limits::DEFAULT_RATE_LIMIT.per_second,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    rate_limit: u32,
    /// Attempts one source may make in a burst above the rate.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_RATE_LIMIT.burst,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate_burst: u32,
    /// Append the audit trail to FILE: one JSON line per connection attempt (created with
    /// mode 0600 when new). The records also go to the log on stderr.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// When the audit log is synced to disk: after `always` record, at an `interval` of 1 s,
    /// or `never` (the kernel writes it back). SIGHUP reopens the file (for logrotate).
    #[arg(long, value_name = "RULE", value_enum, default_value_t = AuditFsyncArg::Interval,
          requires = "audit_log")]
    audit_fsync: AuditFsyncArg,
    /// Refuse new connections with OVERLOADED while the audit log cannot be written (a full
    /// disk): no connection is let in without its record.
    #[arg(long, requires = "audit_log")]
    audit_required: bool,
    /// Rotate the audit log by size: a record that would take it past N bytes first moves it
    /// to FILE.<Unix ms> (never deleted) and starts a new FILE. At least 4096.
    #[arg(long, value_name = "N", requires = "audit_log",
          value_parser = clap::value_parser!(u64).range(4096..))]
    audit_max_bytes: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a bare PORT binds 127.0.0.1:PORT; port
    /// 0 picks a free one); when ready prints `metrics on HOST:PORT` after the `listening on`
    /// line. Bind it where only your monitoring reaches, and see --metrics-token.
    #[arg(long, value_name = "ADDR|PORT", value_parser = metrics_addr)]
    metrics_listen: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` on every scrape, TOKEN being the first line of
    /// FILE (16 to 256 visible ASCII characters; a file only its owner may read).
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    metrics_token: Option<PathBuf>,
    /// Answer health checks at ADDR, outside the gate: grpc.health.v1.Health over plaintext
    /// HTTP/2 and GET /healthz over HTTP/1.1 on the same port (port 0 picks a free port); when
    /// ready prints `health on HOST:PORT` after the `listening on` line. NOT_SERVING (503)
    /// while the registry cannot be read. No TLS, no authentication: it says only whether the
    /// server is serving; bind it where only your probes reach.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Refuse client certificates listed in the certificate revocation lists of FILE (PEM or
    /// DER), also on resumed TLS sessions; FILE is checked for changes every 250 ms and
    /// reloaded, and open connections of newly listed certificates are closed.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// What a CRL past its nextUpdate means: `refuse` new connections with OVERLOADED until
    /// the file holds a current one (fail closed), or `warn` and keep using it. Logged once per
    /// version of the file either way.
    #[arg(long, value_name = "RULE", value_enum, default_value_t = CrlStaleArg::Refuse)]
    crl_stale: CrlStaleArg,
    /// Also let in standard gRPC clients (ALPN h2, no Prefix: grpcio, grpc-go, grpcurl, ...)
    /// whose device certificate is bound and holds a live session, earned with a code by
    /// `portcullis login` or a Portcullis client from that device. Others get UNAUTHENTICATED
    /// naming cause and fix.
    #[arg(long)]
    standard_clients: bool,
    /// Apply the per-method policy of FILE (TOML, see docs/POLICY.md) to every call: fresh
    /// codes for sensitive methods (step-up), roles, allowed and denied users.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Close every live connection when the registry has not confirmed them for SECS seconds
    /// (its reads fail or hang): fail closed, so that a revocation this server cannot see does
    /// not keep a connection open. Off by default: live connections stay open while the
    /// registry is unreachable (new connections are refused with OVERLOADED either way).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    strict_revocation: Option<u64>,
    /// Behind an L4 load balancer: each connection must come from one of LIST (addresses and
    /// networks, comma-separated: 10.0.0.0/8,192.0.2.7) and start with a PROXY protocol v2
    /// header, whose client address then counts for the rate limit, the audit trail and the
    /// services. A connection from another peer, or without a header, is closed before TLS.
    #[arg(long, value_name = "LIST", value_parser = trusted_proxies)]
    proxy_protocol: Option<TrustedProxies>,
}

/// `--metrics-listen`: an address, or a port on loopback.
fn metrics_addr(value: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|_| format!("{value:?} is not an address (such as 127.0.0.1:9090) or a port"))
}

/// The metrics token of `--metrics-token FILE`: its first line, from a file only its owner
/// may read.
fn read_metrics_token(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, String> {
    use portcullis_core::layout::{PrivateFileError, read_private};
    let text = read_private(path, 4096).map_err(|e| match e {
        PrivateFileError::Exposed { mode } => format!(
            "{}: the metrics token file is open to other users (mode {mode:o}); run chmod 600 {}",
            path.display(),
            path.display()
        ),
        PrivateFileError::TooLarge { max } => {
            format!(
                "{}: more than {max} bytes; it holds one token",
                path.display()
            )
        }
        PrivateFileError::Io(e) => format!("{}: {e}", path.display()),
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if !(16..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the metrics token must be 16 to 256 visible ASCII characters",
            path.display()
        ));
    }
    Ok(zeroize::Zeroizing::new(token.to_owned()))
}

/// `--audit-fsync`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AuditFsyncArg {
    Always,
    Interval,
    Never,
}

/// `--crl-stale`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CrlStaleArg {
    Refuse,
    Warn,
}

/// `--proxy-protocol`: a list that trusts no one is a mistake, not a setting.
fn trusted_proxies(list: &str) -> Result<TrustedProxies, String> {
    let trusted: TrustedProxies = list.parse().map_err(|e| format!("{e}"))?;
    if trusted.networks().is_empty() {
        return Err("name at least one trusted proxy address or network".into());
    }
    Ok(trusted)
}

pub(crate) fn serve(args: &ServeArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let builder = PortcullisServer::builder()
        .identity_files(layout.server_cert(), layout.server_key(), layout.ca_cert())
        .map_err(|e| e.to_string())?;
    // On PostgreSQL, the registry's change feed wakes the revocation round: a revocation made
    // through another server of the fleet (or the command line) closes connections here at once.
    let (registry, feed): (Arc<dyn Registry>, _) = match args.registry.location()? {
        Location::Postgres(url) => {
            let pg = Arc::new(layout.open_postgres(&url, &args.registry)?);
            (pg.clone(), Some((pg, Arc::new(tokio::sync::Notify::new()))))
        }
        _ => (layout.open_registry(&args.registry)?, None),
    };
    let policy = match &args.policy {
        Some(path) => Policy::from_toml_file(path).map_err(|e| e.to_string())?,
        None => Policy::default(),
    };
    // Checked before the log is set up, so that a bad key file is one line on stderr.
    let has_ticket_key = layout.load_ticket_ring()?.is_some();

    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let mut builder = builder
        .registry(registry)
        .method_policy(policy)
        .clock_skew(Duration::from_secs(args.clock_skew))
        .session_ttl((args.session_ttl > 0).then(|| Duration::from_secs(args.session_ttl)))
        .deadline(Duration::from_secs(args.deadline))
        .max_pending(args.max_pending as usize)
        .refusal_budget(args.refusal_budget as usize)
        .rate_limit((args.rate_limit > 0).then(|| RateLimit::new(args.rate_limit, args.rate_burst)))
        .standard_clients(args.standard_clients)
        .health_service_name(ECHO_SERVICE);
    if has_ticket_key {
        builder = builder
            .ticket_keys_from(&layout.dir)
            .map_err(|e| e.to_string())?;
    }
    if let Some(secs) = args.strict_revocation {
        builder = builder.strict_revocation(Duration::from_secs(secs));
    }
    if let Some((_, wake)) = &feed {
        builder = builder.revocation_wake(wake.clone());
    }
    if let Some(trusted) = &args.proxy_protocol {
        builder = builder.proxy_protocol(trusted.clone());
    }
    if let Some(path) = &args.audit_log {
        let fsync = match args.audit_fsync {
            AuditFsyncArg::Always => AuditFsync::Always,
            AuditFsyncArg::Interval => portcullis_server::DEFAULT_AUDIT_FSYNC,
            AuditFsyncArg::Never => AuditFsync::Never,
        };
        let mut file = JsonLinesFile::create(path)
            .map_err(|e| e.to_string())?
            .fsync(fsync);
        if let Some(max) = args.audit_max_bytes {
            file = file.max_bytes(max);
        }
        builder = builder
            .audit_sink(Arc::new(file))
            .audit_required(args.audit_required);
    }
    if let Some(path) = &args.metrics_token {
        builder = builder.metrics_token(read_metrics_token(path)?.as_str());
    }
    if let Some(addr) = args.metrics_listen {
        builder = builder.metrics_listen(addr);
    }
    if let Some(path) = &args.crl {
        builder = builder.crl_file(path).crl_stale(match args.crl_stale {
            CrlStaleArg::Refuse => CrlStale::Refuse,
            CrlStaleArg::Warn => CrlStale::Warn,
        });
    }
    if let Some(addr) = args.health_listen {
        builder = builder.health_listen(addr);
    }
    let portcullis = builder.build().map_err(|e| e.to_string())?;
    // Behind the gate like the Echo service: reflection of the served services, and their
    // health (the same status as the health listener's).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(demo::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let health = portcullis.health_service();

    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let _feed = feed.map(|(pg, wake)| pg.listen_changes(wake));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("{}: cannot listen: {e}", args.listen))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("{}: {e}", args.listen))?;
        out!("listening on {local}");
        if let Some(metrics) = portcullis.metrics_addr() {
            out!("metrics on {metrics}");
        }
        if let Some(health) = portcullis.health_addr() {
            out!("health on {health}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SIGHUP: the audit log is opened again (logrotate moved it away).
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut hangup) = signal(SignalKind::hangup()) {
                let reopen = portcullis.clone();
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        reopen.reopen_audit();
                    }
                });
            }
        }
        // On a signal, stop accepting and let open connections finish, for at most
        // SHUTDOWN_GRACE: an idle or stuck connection must not keep the process alive.
        portcullis
            .serve_with_grace(
                |stop| {
                    portcullis
                        .server()
                        .add_service(demo::service())
                        .add_service(reflection)
                        .add_service(health)
                        .serve_with_incoming_shutdown(portcullis.incoming(listener), stop)
                },
                shutdown_signal(),
                SHUTDOWN_GRACE,
            )
            .await
            .map_err(|e| format!("server: {e}"))?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
