//! Three gate instances on one PostgreSQL database (a throwaway cluster started by the test),
//! each with a registry (and a connection pool) of its own, over real loopback TCP and TLS: a
//! code is accepted once across the fleet, a lockout earned on several instances holds on all,
//! a session earned on one works on the others until it is revoked, a revocation made through
//! one instance's registry closes a live connection held on another, a database that is down
//! refuses new connections with OVERLOADED at once, and the fleet serves again when it comes
//! back; stopped and restarted while 12 clients connect, it lets no code in twice. The round
//! trips per accept are counted in the server's statement log.
//!
//! Skipped, with the reason printed, where PostgreSQL is not installed; a failure instead with
//! `PORTCULLIS_REQUIRE_POSTGRES=1` (as in CI). Latencies are printed (`--nocapture`), and bounded
//! only loosely.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use portcullis::core::codec::{ALPN_PCS1, Factor, Verdict};
use portcullis::core::{Clock, RejectCode, SessionId, SystemClock, TicketKey};
use portcullis::tls::devpki::{DevCa, Issued};
use portcullis_postgres::PgRegistry;
use portcullis_postgres::testkit::PgCluster;
use portcullis_store::SecretKey;

/// The bound on "closed" and "refused at once": generous, so that a loaded machine does not
/// fail the test. The measured figures are printed.
const WITHIN: Duration = Duration::from_secs(3);

struct Fleet {
    cluster: PgCluster,
    db: String,
    url: String,
    servers: Vec<TestServer>,
    /// The change feeds of [`notified_fleet`]'s servers.
    _feeds: Vec<portcullis_postgres::ChangeListener>,
}

fn registry_key() -> SecretKey {
    SecretKey::from_bytes([0x42; SecretKey::LEN])
}

/// Three servers on one new database, sharing the CA, the registry key and the ticket key (what
/// the members of a fleet share), without a per-source rate limit (every client is 127.0.0.1).
async fn fleet(test: &str) -> Option<Fleet> {
    start_fleet(test, false, None).await
}

/// [`fleet`], with each server's revocation round woken by its registry's change feed (LISTEN)
/// and otherwise run only once a minute: a revocation that closes a connection within seconds
/// was carried by a notification, or by the feed's resync.
async fn notified_fleet(test: &str) -> Option<Fleet> {
    start_fleet(test, true, None).await
}

/// [`fleet`] whose first server closes its live connections once the registry has not
/// confirmed them for `strict` (`--strict-revocation`); the others keep them open.
async fn strict_fleet(test: &str, strict: Duration) -> Option<Fleet> {
    start_fleet(test, false, Some(strict)).await
}

async fn start_fleet(test: &str, notified: bool, strict_first: Option<Duration>) -> Option<Fleet> {
    let cluster = PgCluster::start(test)?;
    let url = cluster.database().await;
    let db = PgCluster::database_name(&url).to_owned();
    let ca = DevCa::generate("fleet CA").unwrap();
    let mut servers = Vec::new();
    let mut feeds = Vec::new();
    for i in 0..3 {
        let registry = Arc::new(PgRegistry::open(&url, registry_key(), &[]).await.unwrap());
        let wake = Arc::new(tokio::sync::Notify::new());
        if notified {
            feeds.push(registry.listen_changes(wake.clone()));
        }
        let (server, _) = start_custom(same_ca(&ca), registry, |builder| {
            let builder = builder
                .rate_limit(None)
                .deadline(Duration::from_secs(10))
                .ticket_key(TicketKey::from_bytes(&[0x17; 32]).unwrap());
            let builder = match strict_first {
                Some(after) if i == 0 => builder.strict_revocation(after),
                _ => builder,
            };
            if notified {
                builder
                    .revocation_wake(wake)
                    .revocation_interval(Duration::from_secs(60))
            } else {
                builder
            }
        })
        .await;
        servers.push(server);
    }
    Some(Fleet {
        cluster,
        db,
        url,
        servers,
        _feeds: feeds,
    })
}

/// Connects to `server` with `device` and sends a Prefix with `factor`; the Verdict and the
/// connection (open when accepted).
async fn attempt(
    server: &TestServer,
    device: &Issued,
    user: &str,
    factor: impl FnOnce() -> Factor,
) -> (
    Verdict,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut tls = server.raw_tls(device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, user, factor());
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    (verdict, tls)
}

/// Enrols device `i`, holds a connection of it open on C, revokes it through A's registry; how
/// long C took to close the connection (bounded by [`WITHIN`]).
async fn revoke_on_a_closed_on_c(fleet: &Fleet, i: usize) -> Duration {
    let (a, c) = (&fleet.servers[0], &fleet.servers[2]);
    let device = format!("laptop{i}");
    let carol = a.enroll(&format!("carol{i}"), &device);
    let (verdict, mut tls) = attempt(c, &carol.device, &carol.user, || {
        Factor::Totp(current_code(&carol.totp))
    })
    .await;
    assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    let start = Instant::now();
    a.registry
        .revoke_device(&device, SystemClock.now_ms())
        .unwrap();
    let closed = tokio::time::timeout(WITHIN, read_to_close(&mut tls)).await;
    assert!(closed.is_ok(), "device {i}: the connection on C is closed");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_sent_to_three_instances_at_once_is_accepted_once() {
    let Some(fleet) = fleet("fleet single use").await else {
        return;
    };
    const USERS: usize = 50;
    let a = &fleet.servers[0];
    let enrolled: Vec<Enrolled> = (0..USERS)
        .map(|i| a.enroll(&format!("user{i}"), &format!("device{i}")))
        .collect();
    // Every TLS connection first, then all Prefixes at once.
    let mut connections = Vec::new();
    for e in &enrolled {
        let code = current_code(&e.totp);
        for server in &fleet.servers {
            let tls = server.raw_tls(&e.device, &[ALPN_PCS1]).await;
            connections.push((e.user.clone(), code.clone(), tls));
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(connections.len()));
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|(user, code, mut tls)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let p = prefix(&tls, &user, Factor::Totp(code));
                let bytes = p.encode().unwrap();
                barrier.wait().await;
                let verdict = send_raw(&mut tls, &bytes).await;
                (user, verdict)
            })
        })
        .collect();
    let mut accepted = std::collections::HashMap::<String, usize>::new();
    let mut timed_out = std::collections::HashSet::<String>::new();
    for task in tasks {
        let (user, verdict) = task.await.unwrap();
        if verdict.status == 0 {
            *accepted.entry(user).or_default() += 1;
        } else if verdict.reject_code() == Some(RejectCode::Timeout) {
            // A machine too loaded to decide within the deadline: refused, nothing spent.
            timed_out.insert(user);
        } else {
            assert_eq!(
                verdict.reject_code(),
                Some(RejectCode::MfaFailed),
                "a refusal is the reused code's, not an overload: {:?}",
                verdict.reason
            );
        }
    }
    if !timed_out.is_empty() {
        println!(
            "{} users had a connection refused with TIMEOUT",
            timed_out.len()
        );
    }
    for e in &enrolled {
        let n = accepted.get(&e.user).copied().unwrap_or(0);
        if timed_out.contains(&e.user) {
            assert!(n <= 1, "{}: the code accepted {n} times", e.user);
        } else {
            assert_eq!(
                n, 1,
                "{}: the code accepted exactly once across the three instances",
                e.user
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_spread_over_the_instances_lock_the_user_out_on_all() {
    let Some(fleet) = fleet("fleet lockout").await else {
        return;
    };
    let bob = fleet.servers[0].enroll("bob", "laptop");
    for i in 0..5 {
        let server = &fleet.servers[i % 3];
        let (verdict, _) = attempt(server, &bob.device, "bob", || {
            Factor::Totp(wrong_code(&bob.totp))
        })
        .await;
        assert_eq!(
            verdict.reject_code(),
            Some(RejectCode::MfaFailed),
            "failure {i}"
        );
    }
    for (i, server) in fleet.servers.iter().enumerate() {
        let (verdict, _) = attempt(server, &bob.device, "bob", || {
            Factor::Totp(current_code(&bob.totp))
        })
        .await;
        assert_eq!(
            verdict.reject_code(),
            Some(RejectCode::LockedOut),
            "instance {i}: {:?}",
            verdict.reason
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_earned_on_one_instance_works_on_the_others_until_revoked() {
    let Some(fleet) = fleet("fleet sessions").await else {
        return;
    };
    let [a, b, c] = &fleet.servers[..] else {
        unreachable!()
    };
    let alice = a.enroll("alice", "laptop");
    let (verdict, _) = attempt(a, &alice.device, "alice", || {
        Factor::Totp(current_code(&alice.totp))
    })
    .await;
    assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    let (ticket, _) = verdict.session.expect("a session ticket");
    for server in [b, c] {
        let (verdict, _) = attempt(server, &alice.device, "alice", || {
            Factor::Session(ticket.clone())
        })
        .await;
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    }
    let sessions = a.registry.list_sessions(SystemClock.now_ms()).unwrap();
    assert_eq!(sessions.len(), 1, "one session, recorded once");
    let id: SessionId = sessions[0].id;
    a.registry
        .revoke_session(&id, SystemClock.now_ms())
        .unwrap();
    for server in [a, b, c] {
        let (verdict, _) = attempt(server, &alice.device, "alice", || {
            Factor::Session(ticket.clone())
        })
        .await;
        assert_eq!(verdict.reject_code(), Some(RejectCode::MfaRequired));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_through_one_instance_is_closed_on_another() {
    let Some(fleet) = fleet("fleet revocation").await else {
        return;
    };
    let mut latencies = Vec::new();
    for i in 0..5 {
        latencies.push(revoke_on_a_closed_on_c(&fleet, i).await);
    }
    latencies.sort();
    println!(
        "revocation through A, connection closed on C: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_another_instance_by_notify_and_after_its_listener_is_killed() {
    let Some(fleet) = notified_fleet("fleet notify").await else {
        return;
    };
    let mut by_notify = Vec::new();
    for i in 0..5 {
        by_notify.push(revoke_on_a_closed_on_c(&fleet, 10 + i).await);
    }
    by_notify.sort();
    println!(
        "revocation by NOTIFY: median {:?}, max {:?}",
        by_notify[2], by_notify[4]
    );

    // The listening connections are killed by the database: each feed listens again, and its
    // resync carries what a lost notification would have said.
    let (admin, connection) = tokio_postgres::connect(&fleet.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1",
            &[&portcullis_postgres::LISTENER_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 3, "one listening connection per instance");
    let after_kill = revoke_on_a_closed_on_c(&fleet, 20).await;
    println!("revocation right after the listener was killed: {after_kill:?}");
    // The feeds listen again.
    let start = Instant::now();
    loop {
        let listening: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&portcullis_postgres::LISTENER_APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get(0);
        if listening == 3 {
            break;
        }
        assert!(start.elapsed() < WITHIN, "the feeds listen again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = revoke_on_a_closed_on_c(&fleet, 21).await;
    println!("revocation by NOTIFY after the feeds listen again: {again:?}");
    drop(admin);
    let _ = driver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_down_refuses_with_overloaded_and_the_fleet_recovers() {
    let Some(fleet) = strict_fleet("fleet database down", Duration::from_secs(1)).await else {
        return;
    };
    let users: Vec<Enrolled> = (0..3)
        .map(|i| fleet.servers[0].enroll(&format!("dave{i}"), &format!("phone{i}")))
        .collect();
    // A live connection on each instance; the first one runs with --strict-revocation 1.
    let holders: Vec<Enrolled> = (0..3)
        .map(|i| fleet.servers[0].enroll(&format!("hal{i}"), &format!("desk{i}")))
        .collect();
    let mut live = Vec::new();
    for (server, hal) in fleet.servers.iter().zip(&holders) {
        let (verdict, tls) = attempt(server, &hal.device, &hal.user, || {
            Factor::Totp(current_code(&hal.totp))
        })
        .await;
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
        live.push(tls);
    }
    fleet.cluster.stop();
    let stopped = Instant::now();
    for (server, dave) in fleet.servers.iter().zip(&users) {
        let start = Instant::now();
        let (verdict, _) = attempt(server, &dave.device, &dave.user, || {
            Factor::Totp(current_code(&dave.totp))
        })
        .await;
        let took = start.elapsed();
        assert_eq!(
            verdict.reject_code(),
            Some(RejectCode::Overloaded),
            "{:?}",
            verdict.reason
        );
        assert!(
            took < WITHIN,
            "refused at once, not at the deadline: {took:?}"
        );
        assert!(
            verdict.retry_after_s.is_some(),
            "the client is told when to retry"
        );
        println!("database down: OVERLOADED after {took:?}");
    }
    // Strict: closed once the registry has not answered for 1 s; the others stay open.
    let mut live = live.into_iter();
    let mut strict = live.next().unwrap();
    let closed = tokio::time::timeout(WITHIN, read_to_close(&mut strict)).await;
    assert!(
        closed.is_ok(),
        "the strict instance closes its live connection"
    );
    println!(
        "strict revocation: closed {:?} after the stop",
        stopped.elapsed()
    );
    for (i, mut tls) in live.enumerate() {
        let read = tokio::time::timeout(Duration::from_millis(1500), read_to_close(&mut tls)).await;
        assert!(
            read.is_err(),
            "instance {}: without strict revocation the connection stays open",
            i + 1
        );
    }
    fleet.cluster.restart();
    // Each instance serves again by itself (its pool reconnects).
    for (server, dave) in fleet.servers.iter().zip(&users) {
        let start = Instant::now();
        loop {
            let (verdict, _) = attempt(server, &dave.device, &dave.user, || {
                Factor::Totp(current_code(&dave.totp))
            })
            .await;
            if verdict.status == 0 {
                break;
            }
            assert_eq!(verdict.reject_code(), Some(RejectCode::Overloaded));
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "serving again after the restart: {:?}",
                verdict.reason
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("database back: accepted after {:?}", start.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_takes_two_statements_with_a_code_and_one_with_a_ticket() {
    let Some(fleet) = fleet("fleet round trips").await else {
        return;
    };
    let a = &fleet.servers[0];
    let b = &fleet.servers[1];
    // The pooled connection prepares its statements once: warmed up first.
    let frank = a.enroll("frank", "laptop");
    let (verdict, _) = attempt(b, &frank.device, "frank", || {
        Factor::Totp(current_code(&frank.totp))
    })
    .await;
    let (warm_ticket, _) = verdict.session.unwrap();
    attempt(b, &frank.device, "frank", || Factor::Session(warm_ticket)).await;
    let (verdict, _) = attempt(b, &frank.device, "frank", || {
        Factor::Totp(wrong_code(&frank.totp))
    })
    .await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::MfaFailed));

    // The statements the database ran for one accept. The server's revocation round reads
    // the registry for live connections every 250 ms: a round that falls into the window adds
    // a statement, hence the fewest of three tries (with a user of its own each: a code is
    // accepted once).
    let statements = |run: &mut Vec<usize>, before: usize| {
        run.push(fleet.cluster.statements(&fleet.db).len() - before);
    };
    let (mut code, mut ticket, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        let erin = a.enroll(&format!("erin{i}"), &format!("phone{i}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = fleet.cluster.statements(&fleet.db).len();
        let (verdict, tls) = attempt(b, &erin.device, &erin.user, || {
            Factor::Totp(current_code(&erin.totp))
        })
        .await;
        statements(&mut code, before);
        drop(tls);
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
        let (session, _) = verdict.session.unwrap();

        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = fleet.cluster.statements(&fleet.db).len();
        let (verdict, tls) =
            attempt(b, &erin.device, &erin.user, || Factor::Session(session)).await;
        statements(&mut ticket, before);
        drop(tls);
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);

        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = fleet.cluster.statements(&fleet.db).len();
        let (verdict, _) = attempt(b, &erin.device, &erin.user, || {
            Factor::Totp(wrong_code(&erin.totp))
        })
        .await;
        statements(&mut wrong, before);
        assert_eq!(verdict.reject_code(), Some(RejectCode::MfaFailed));
    }
    println!("statements per accept: code {code:?}, ticket {ticket:?}, wrong code {wrong:?}");
    assert_eq!(
        code.iter().min(),
        Some(&2),
        "a TOTP code: snapshot and commit"
    );
    assert_eq!(
        ticket.iter().min(),
        Some(&1),
        "a session ticket: the snapshot alone"
    );
    assert_eq!(
        wrong.iter().min(),
        Some(&2),
        "a wrong code: snapshot and charge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_round_tails_the_change_log_instead_of_reading_every_connection() {
    let Some(fleet) = fleet("fleet round cost").await else {
        return;
    };
    let (a, b) = (&fleet.servers[0], &fleet.servers[1]);
    const LIVE: usize = 12;
    let mut held = Vec::new();
    let mut users = Vec::new();
    for i in 0..LIVE {
        let dana = a.enroll(&format!("dana{i}"), &format!("tablet{i}"));
        let (verdict, tls) = attempt(b, &dana.device, &dana.user, || {
            Factor::Totp(current_code(&dana.totp))
        })
        .await;
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
        held.push(tls);
        users.push(dana);
    }
    // B's first rounds read every new connection once; from then on, one statement a round.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let window = Duration::from_secs(2);
    let before = fleet.cluster.statements(&fleet.db).len();
    tokio::time::sleep(window).await;
    let during = fleet.cluster.statements(&fleet.db)[before..].to_vec();
    let rounds = window.as_millis() / 250;
    println!(
        "{} statements in {} ms ({rounds} rounds) with {LIVE} live connections",
        during.len(),
        window.as_millis()
    );
    // Reading every connection would take LIVE statements a round.
    assert!(
        during.len() < LIVE,
        "{} statements for {rounds} rounds: {during:#?}",
        during.len()
    );

    // A revocation is in the log: B reads that one device, and closes its connection.
    let start = Instant::now();
    a.registry
        .revoke_device("tablet5", SystemClock.now_ms())
        .unwrap();
    let closed = tokio::time::timeout(WITHIN, read_to_close(&mut held[5])).await;
    assert!(
        closed.is_ok(),
        "the revoked device's connection on B is closed"
    );
    println!("closed on B after {:?}", start.elapsed());
    // The others stay open: each still answers (a read that does not end).
    for (i, tls) in held.iter_mut().enumerate().filter(|(i, _)| *i != 5) {
        let still = tokio::time::timeout(Duration::from_millis(50), read_to_close(tls)).await;
        assert!(still.is_err(), "connection {i} was closed");
    }
}

/// Outcomes of the load in [`the_database_restarted_and_stopped_under_load_lets_no_code_in_twice`].
#[derive(Default)]
struct LoadTally {
    /// (user, step) of every accept.
    accepted: Vec<(String, u64)>,
    /// Refusals by reject code.
    refused: std::collections::BTreeMap<String, u64>,
    /// Attempts that got no Verdict (the connection cut).
    no_verdict: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_and_stopped_under_load_lets_no_code_in_twice() {
    let Some(fleet) = fleet("fleet database restarted under load").await else {
        return;
    };
    let fleet = Arc::new(fleet);
    let tally = Arc::new(std::sync::Mutex::new(LoadTally::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let who = fleet.servers[0].enroll(&format!("load{i}"), &format!("load{i}"));
        let (fleet, tally, stop) = (fleet.clone(), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // Round robin over the three members, the current step's code every time.
                let server = &fleet.servers[n % 3];
                n += 1;
                let now = SystemClock.now_ms();
                let code = who.totp.generate(now / 1000);
                let got = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut tls = server.try_raw_tls(&who.device, &[ALPN_PCS1]).await.ok()?;
                    let p = prefix(&tls, &who.user, Factor::Totp(code));
                    tokio::io::AsyncWriteExt::write_all(&mut tls, &p.encode().unwrap())
                        .await
                        .ok()?;
                    try_read_verdict(&mut tls).await
                })
                .await
                .ok()
                .flatten();
                {
                    let mut t = tally.lock().unwrap();
                    match got {
                        Some(v) if v.status == 0 => {
                            t.accepted.push((who.user.clone(), now / 30_000))
                        }
                        Some(v) => {
                            let code = v.reject_code().map_or("?".into(), |c| format!("{c:?}"));
                            let reason = v.reason.unwrap_or_default();
                            // A right code is never called wrong: only "already used" may say so.
                            let key = if code == "MfaFailed" && !reason.contains("already used") {
                                format!("MfaFailed (not accepted): {reason}")
                            } else {
                                code
                            };
                            *t.refused.entry(key).or_default() += 1;
                        }
                        None => t.no_verdict += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let began = Instant::now();
    let phase = |what: &str| println!("{:.1} s: {what}", began.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase("stop (immediate)");
    fleet.cluster.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase("start");
    fleet.cluster.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase("restart (immediate stop, start at once)");
    fleet.cluster.stop();
    fleet.cluster.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let accepted_before_end = tally.lock().unwrap().accepted.len();
    // After the last restart every user gets in again within its next step.
    let deadline = Instant::now() + Duration::from_secs(35);
    loop {
        let users_in = {
            let t = tally.lock().unwrap();
            let users: std::collections::HashSet<&String> = t.accepted
                [accepted_before_end.min(t.accepted.len())..]
                .iter()
                .map(|(u, _)| u)
                .collect();
            users.len()
        };
        if users_in == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every user got in again after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let t = tally.lock().unwrap();
    println!(
        "{} accepted, refused {:?}, {} without a Verdict",
        t.accepted.len(),
        t.refused,
        t.no_verdict
    );
    let distinct: std::collections::HashSet<&(String, u64)> = t.accepted.iter().collect();
    assert_eq!(
        distinct.len(),
        t.accepted.len(),
        "a code accepted twice: {:?}",
        t.accepted
    );
    assert!(
        t.refused
            .keys()
            .all(|k| !k.starts_with("MfaFailed (not accepted)")),
        "a right code was refused as wrong: {:?}",
        t.refused
    );
    assert!(
        t.refused.get("Overloaded").copied().unwrap_or(0) > 0,
        "the outage was seen: {:?}",
        t.refused
    );
}
