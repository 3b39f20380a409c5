//! The soak test: a server on a SQLite registry under mixed load for a long while, restarted
//! and revoking all the time, flooded from another loopback address. It counts every decision
//! and every wrong one (which must be none), and prints the accept time and the memory.
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture        # 10 minutes
//! PORTCULLIS_SOAK_SECS=60 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! 64 client tasks, each with a user of its own:
//! - 32 `good`: a Portcullis client with its TOTP secret and its session ticket (a TOTP accept,
//!   then sessions): every call must be let in, or fail for a reason outside the gate (the
//!   server restarting); a refusal that names the client (revoked, unknown, locked out, bad
//!   binding, replay, skew) is a wrong decision;
//! - 8 `once`: a new connection every 20 ms with the code of the current step: at most one
//!   accept per user and step, ever, across restarts;
//! - 8 `guesser`: wrong codes: never let in (and soon locked out);
//! - 8 `revoked`: their device is revoked every few seconds and a new one bound; no connection
//!   that started after the revocation was committed is let in on the old device;
//! - 8 `standard`: a standard gRPC client (ALPN h2, no Prefix) on a session earned first: let in
//!   while the session lives, as `good`.
//!
//! Meanwhile the server is restarted every 7 s (same registry file, same port, same ticket key),
//! a device is revoked every 1.5 s, and 127.0.0.2 opens idle TCP connections (one every 25 ms at
//! most, up to 400 held open; the server closes each after its 2 s first-byte deadline).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{Admin, Clock, Registry, SystemClock, TicketKey, TotpConfig};
use portcullis::demo::{EchoClient, SayRequest};
use portcullis::server::{PortcullisServer, RateLimit};
use portcullis::store::SqliteRegistry;
use portcullis::tls::devpki::{DevCa, Issued};
use portcullis::tls::rustls;

use tokio::sync::oneshot;
use tonic::transport::Endpoint;

const TICKET_KEY: [u8; 32] = [0x5a; 32];

/// What one task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Good,
    Once,
    Guesser,
    Revoked,
    Standard,
}

/// What the tasks saw.
#[derive(Default)]
struct Tally {
    /// Decisions (a Verdict or a Status naming a reject code, or a reply), by kind.
    decisions: HashMap<Kind, u64>,
    /// Accepted, by kind and method.
    accepted: HashMap<(Kind, String), u64>,
    /// Refused, by kind and reject code.
    refused: HashMap<(Kind, String), u64>,
    /// Calls that ended without a decision (the server restarting), by kind.
    no_decision: HashMap<Kind, u64>,
    /// Every wrong decision, described.
    wrong: Vec<String>,
    /// Time from the start of a new connection to its first reply, of `good` calls let in.
    accept_ms: Vec<f64>,
    /// `once`: the (user, step) pairs let in.
    once_steps: HashMap<(String, u64), u32>,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The reject code a Status carries, if the gate refused.
fn reject_of(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get("portcullis-reject")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The codes a refusal of a client in good standing must never carry.
fn names_the_client(code: &str) -> bool {
    matches!(
        code,
        "device_unknown"
            | "device_revoked"
            | "user_mismatch"
            | "binding_mismatch"
            | "replay"
            | "clock_skew"
            | "locked_out"
            | "policy_denied"
            | "malformed"
            | "unsupported"
    )
}

/// The server, restartable on the same files and port.
struct World {
    ca: DevCa,
    db: PathBuf,
    addr: SocketAddr,
    server_cert: Issued,
    admin: Arc<SqliteRegistry>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl World {
    async fn start(&self) -> Running {
        let registry: Arc<dyn Registry> = Arc::new(SqliteRegistry::open(&self.db).unwrap());
        let portcullis = PortcullisServer::builder()
            .identity(
                vec![self.server_cert.cert_der()],
                self.server_cert.key_der(),
                &[self.ca.cert_der()],
            )
            .unwrap()
            .registry(registry)
            .ticket_key(TicketKey::from_bytes(&TICKET_KEY).unwrap())
            .session_ttl(Some(Duration::from_secs(3600)))
            .standard_clients(true)
            .rate_limit(Some(RateLimit::new(5_000, 5_000)))
            .build()
            .unwrap();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (stop, rx) = oneshot::channel::<()>();
        let incoming = portcullis.incoming(listener);
        let task = tokio::spawn(async move {
            let _ = portcullis
                .server()
                .add_service(portcullis::demo::service())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Running { stop, task }
    }

    fn tls(&self, device: &Issued, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        portcullis::tls::client_config(
            &[self.ca.cert_der()],
            vec![device.cert_der()],
            device.key_der(),
            alpn,
        )
        .unwrap()
    }

    fn client(&self, device: &Issued, user: &str, source: CodeSource) -> Client {
        Client::builder()
            .tls_config(self.tls(device, &[ALPN_PCS1]))
            .server_name("localhost")
            .user(user)
            .code_source(source)
            .build()
            .unwrap()
    }

    /// A user and a device bound to it.
    fn enroll(&self, user: &str, device: &str) -> (TotpConfig, Issued) {
        let totp = totp_of(user);
        self.admin
            .add_user(user, totp.clone(), SystemClock.now_ms())
            .unwrap();
        (totp, self.bind(user, device))
    }

    fn bind(&self, user: &str, device: &str) -> Issued {
        let issued = self.ca.issue_device(device).unwrap();
        let fp = portcullis::tls::fingerprint(issued.cert_der().as_ref()).unwrap();
        self.admin
            .bind_device(device, user, &fp, SystemClock.now_ms())
            .unwrap();
        issued
    }
}

/// One call on a new connection of `client`: the reply's method, or the Status.
async fn say(client: &Client, addr: &str) -> Result<String, tonic::Status> {
    let channel = client
        .connect_lazy(addr)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        EchoClient::new(channel).say(SayRequest {
            text: "soak".into(),
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("no answer in 20 s"))??;
    Ok(reply.into_inner().auth_method)
}

/// One call on a new standard (h2, no Prefix) connection.
async fn standard_say(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<String, tonic::Status> {
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(connector);
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        EchoClient::new(channel).say(SayRequest {
            text: "soak".into(),
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("no answer in 20 s"))??;
    Ok(reply.into_inner().auth_method)
}

impl Tally {
    /// Counts one outcome; `wrong_if_accepted`/`_refused` say what this task must never see.
    fn count(
        &mut self,
        kind: Kind,
        who: &str,
        got: &Result<String, tonic::Status>,
        must_refuse: Option<&str>,
    ) {
        match got {
            Ok(method) => {
                *self.decisions.entry(kind).or_default() += 1;
                *self.accepted.entry((kind, method.clone())).or_default() += 1;
                if let Some(why) = must_refuse {
                    self.wrong.push(format!("{kind:?} {who} let in: {why}"));
                }
            }
            Err(status) => match reject_of(status) {
                Some(code) => {
                    *self.decisions.entry(kind).or_default() += 1;
                    if matches!(kind, Kind::Good | Kind::Standard) && names_the_client(&code) {
                        self.wrong.push(format!(
                            "{kind:?} {who} refused with {code}: {}",
                            status.message()
                        ));
                    }
                    *self.refused.entry((kind, code)).or_default() += 1;
                }
                None => *self.no_decision.entry(kind).or_default() += 1,
            },
        }
    }
}

fn p99(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[((values.len() as f64 * 0.99) as usize).min(values.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for 10 minutes (PORTCULLIS_SOAK_SECS); `cargo test --release --test soak -- --ignored`"]
async fn soak() {
    let secs: u64 = std::env::var("PORTCULLIS_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("registry.db");
    drop(SqliteRegistry::create(&db).unwrap());
    let ca = DevCa::generate("soak CA").unwrap();
    let server_cert = ca
        .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let world = Arc::new(World {
        ca,
        db: db.clone(),
        addr,
        server_cert,
        admin: Arc::new(SqliteRegistry::open(&db).unwrap()),
    });
    let addr_s = addr.to_string();
    let running = Arc::new(tokio::sync::Mutex::new(Some(world.start().await)));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // good: sessions after a TOTP accept.
    for i in 0..32 {
        let (totp, device) = world.enroll(&format!("good{i}"), &format!("good{i}"));
        let client = world.client(&device, &format!("good{i}"), CodeSource::secret(totp));
        let (tally, stop, addr) = (tally.clone(), stop.clone(), addr_s.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let got = say(&client, &addr).await;
                {
                    let mut t = tally.lock().unwrap();
                    if got.is_ok() {
                        t.accept_ms.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                    t.count(Kind::Good, &format!("good{i}"), &got, None);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // once: the current step's code on every new connection.
    for i in 0..8 {
        let user = format!("once{i}");
        let (totp, device) = world.enroll(&user, &user);
        let world = world.clone();
        let (tally, stop, addr) = (tally.clone(), stop.clone(), addr_s.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let now = SystemClock.now_ms();
                let code = totp.generate(now / 1000);
                let client = world.client(&device, &user, CodeSource::fixed(code));
                let got = say(&client, &addr).await;
                {
                    let mut t = tally.lock().unwrap();
                    if got.is_ok() {
                        let step = now / 30_000;
                        let seen = t.once_steps.entry((user.clone(), step)).or_default();
                        *seen += 1;
                        if *seen > 1 {
                            t.wrong
                                .push(format!("{user}: a code of step {step} accepted twice"));
                        }
                    }
                    t.count(Kind::Once, &user, &got, None);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // guessers: wrong codes only.
    for i in 0..8 {
        let user = format!("guess{i}");
        let (totp, device) = world.enroll(&user, &user);
        let world = world.clone();
        let (tally, stop, addr) = (tally.clone(), stop.clone(), addr_s.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let client = world.client(&device, &user, CodeSource::fixed(wrong_code(&totp)));
                let got = say(&client, &addr).await;
                tally
                    .lock()
                    .unwrap()
                    .count(Kind::Guesser, &user, &got, Some("a wrong code"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // revoked: the device of the moment, swapped by the revoker.
    struct Victim {
        client: Client,
        /// Set once the device's revocation has been committed.
        revoked: Arc<AtomicBool>,
        device: String,
    }
    let mut victims = Vec::new();
    for i in 0..8 {
        let user = format!("victim{i}");
        let device_name = format!("victim{i}-0");
        let (totp, device) = world.enroll(&user, &device_name);
        let victim = Arc::new(Mutex::new(Victim {
            client: world.client(&device, &user, CodeSource::secret(totp.clone())),
            revoked: Arc::new(AtomicBool::new(false)),
            device: device_name,
        }));
        victims.push((user.clone(), totp, victim.clone()));
        let (tally, stop, addr) = (tally.clone(), stop.clone(), addr_s.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (client, revoked, device) = {
                    let v = victim.lock().unwrap();
                    (v.client.clone(), v.revoked.clone(), v.device.clone())
                };
                let was_revoked = revoked.load(Ordering::SeqCst);
                let got = say(&client, &addr).await;
                let why = format!("device {device} revoked before the connection started");
                tally.lock().unwrap().count(
                    Kind::Revoked,
                    &user,
                    &got,
                    was_revoked.then_some(why.as_str()),
                );
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    // standard: sessions earned first, then plain h2.
    for i in 0..8 {
        let user = format!("std{i}");
        let (totp, device) = world.enroll(&user, &user);
        let earner = world.client(&device, &user, CodeSource::secret(totp));
        assert_eq!(say(&earner, &addr_s).await.unwrap(), "totp");
        let tls = world.tls(&device, &[b"h2"]);
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let got = standard_say(tls.clone(), addr).await;
                tally
                    .lock()
                    .unwrap()
                    .count(Kind::Standard, &user, &got, None);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // The flood: idle TCP connections from 127.0.0.2, one every 25 ms at most, 400 held.
    let flood_opened = Arc::new(AtomicU64::new(0));
    {
        let (stop, opened) = (stop.clone(), flood_opened.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::SeqCst) {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                // A refused or reset connect (the server restarting) is tried again.
                if let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(1), socket.connect(addr)).await
                {
                    opened.fetch_add(1, Ordering::Relaxed);
                    held.push_back(conn);
                    if held.len() > 400 {
                        held.pop_front();
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    // Revocations: one victim's device every 1.5 s, a new device bound after it.
    let revocations = Arc::new(AtomicU64::new(0));
    {
        let (world, stop, revocations) = (world.clone(), stop.clone(), revocations.clone());
        tasks.push(tokio::spawn(async move {
            let mut generation = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                generation += 1;
                let (user, totp, victim) = &victims[(generation as usize) % victims.len()];
                let (device, revoked) = {
                    let v = victim.lock().unwrap();
                    (v.device.clone(), v.revoked.clone())
                };
                let admin = world.admin.clone();
                let done = tokio::task::spawn_blocking(move || {
                    admin.revoke_device(&device, SystemClock.now_ms())
                })
                .await
                .unwrap();
                if done.is_ok() {
                    revoked.store(true, Ordering::SeqCst);
                    revocations.fetch_add(1, Ordering::Relaxed);
                }
                // The victim keeps trying the revoked device for a while, then gets a new one.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let name = format!("{user}-{generation}");
                let (world2, user2, name2) = (world.clone(), user.clone(), name.clone());
                let issued = tokio::task::spawn_blocking(move || world2.bind(&user2, &name2))
                    .await
                    .unwrap();
                let mut v = victim.lock().unwrap();
                v.client = world.client(&issued, user, CodeSource::secret(totp.clone()));
                v.revoked = Arc::new(AtomicBool::new(false));
                v.device = name;
            }
        }));
    }
    // Restarts every 7 s.
    let restarts = Arc::new(AtomicU64::new(0));
    {
        let (world, stop, running, restarts) = (
            world.clone(),
            stop.clone(),
            running.clone(),
            restarts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(7)).await;
                let mut slot = running.lock().await;
                if let Some(r) = slot.take() {
                    let _ = r.stop.send(());
                    let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
                }
                *slot = Some(world.start().await);
                restarts.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Warmed up: memory from here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start = rss_kib();
    let started = Instant::now();
    let mut next_report = 60;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if started.elapsed().as_secs() >= next_report {
            let t = tally.lock().unwrap();
            println!(
                "{:>4} s: {} decisions, {} wrong, RSS {} MiB",
                started.elapsed().as_secs(),
                t.decisions.values().sum::<u64>(),
                t.wrong.len(),
                rss_kib() / 1024
            );
            next_report += 60;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    let rss_end = rss_kib();
    if let Some(r) = running.lock().await.take() {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
    }

    let mut t = tally.lock().unwrap();
    let decisions: u64 = t.decisions.values().sum();
    let p99_ms = p99(&mut t.accept_ms);
    let mut lines: Vec<String> = Vec::new();
    let mut accepted: Vec<_> = t.accepted.iter().collect();
    accepted.sort();
    for ((kind, method), n) in accepted {
        lines.push(format!("  accepted {kind:?} by {method}: {n}"));
    }
    let mut refused: Vec<_> = t.refused.iter().collect();
    refused.sort();
    for ((kind, code), n) in refused {
        lines.push(format!("  refused {kind:?} with {code}: {n}"));
    }
    let mut none: Vec<_> = t.no_decision.iter().collect();
    none.sort();
    for (kind, n) in none {
        lines.push(format!("  no decision (restarting) {kind:?}: {n}"));
    }
    println!(
        "soak {secs} s: {decisions} decisions, {} wrong; {} restarts, {} revocations, {} flood connections from 127.0.0.2; RSS {} MiB at the start, {} MiB at the end; good accept p99 {p99_ms:.1} ms ({} accepts)\n{}",
        t.wrong.len(),
        restarts.load(Ordering::Relaxed),
        revocations.load(Ordering::Relaxed),
        flood_opened.load(Ordering::Relaxed),
        rss_start / 1024,
        rss_end / 1024,
        t.accept_ms.len(),
        lines.join("\n")
    );
    assert!(t.wrong.is_empty(), "wrong decisions: {:#?}", t.wrong);
    for kind in [
        Kind::Good,
        Kind::Once,
        Kind::Guesser,
        Kind::Revoked,
        Kind::Standard,
    ] {
        assert!(
            t.decisions.get(&kind).copied().unwrap_or(0) > 0,
            "{kind:?}: no decision at all"
        );
    }
    assert!(
        t.accepted
            .keys()
            .any(|(k, m)| *k == Kind::Good && m == "session"),
        "no session accept"
    );
    assert!(
        t.accepted.keys().any(|(k, _)| *k == Kind::Standard),
        "no standard client let in"
    );
}
