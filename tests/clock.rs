//! The server's clock stepping back and forward by an hour while clients connect (a SQLite
//! registry, real TLS on loopback): no code is accepted twice, whatever the clock does, and
//! sessions end by the server's clock: a step forward past their expiry ends them for good, and
//! a step back does not lengthen them (a ticket earned "later" than the clock is refused,
//! `ticket_from_the_future`, until the clock is past its TOTP time again).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use portcullis::core::codec::{ALPN_PCS1, Factor, Prefix, Verdict};
use portcullis::core::{Clock, ManualClock, Registry, RejectCode, SystemClock, TotpConfig};
use portcullis::store::SqliteRegistry;
use tokio::io::AsyncWriteExt;

const HOUR_MS: u64 = 3_600_000;

/// Users connecting all the time while the clock steps.
const BUSY_USERS: usize = 8;

/// One raw attempt with `factor`, its Prefix TIME at `time_ms`.
async fn attempt(
    server: &TestServer,
    config: &Arc<portcullis::tls::rustls::ClientConfig>,
    user: &str,
    factor: Factor,
    time_ms: u64,
) -> Option<Verdict> {
    let mut tls = tls_with(server.addr, config.clone()).await.ok()?;
    let mut p: Prefix = prefix(&tls, user, factor);
    p.time_ms = time_ms;
    tls.write_all(&p.encode().unwrap()).await.ok()?;
    tls.flush().await.ok()?;
    try_read_verdict(&mut tls).await
}

fn code_at(totp: &TotpConfig, ms: u64) -> Factor {
    Factor::Totp(totp.generate(ms / 1000))
}

#[track_caller]
fn refused(verdict: &Option<Verdict>, code: RejectCode, reason: &str) {
    let got = verdict.as_ref().and_then(Verdict::reject_code);
    assert_eq!(got, Some(code), "{verdict:?}");
    let text = verdict
        .as_ref()
        .and_then(|v| v.reason.clone())
        .unwrap_or_default();
    assert!(text.contains(reason), "{text}");
}

#[track_caller]
fn ticket_of(verdict: &Option<Verdict>) -> Vec<u8> {
    let v = verdict.as_ref().expect("a verdict");
    assert!(v.is_accepted(), "{v:?}");
    v.session.clone().expect("a session ticket").0
}

async fn start(clock: &Arc<ManualClock>) -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let registry: Arc<dyn Registry> = Arc::new(
        SqliteRegistry::open_or_create(&tmp.path().join("registry.db"))
            .unwrap()
            .with_clock(clock.clone()),
    );
    let ca = portcullis::tls::devpki::DevCa::generate("clock CA").unwrap();
    let (server, _) = start_custom(ca, registry, {
        let clock = clock.clone();
        move |b| {
            b.clock(clock)
                .session_ttl(Some(Duration::from_secs(600)))
                .rate_limit(None)
        }
    })
    .await;
    (server, tmp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_back_or_forward_reopens_no_code_and_lengthens_no_session() {
    // A little ahead of the system clock, which dates the device bindings: tickets earned at
    // t0 come after them.
    let t0 = SystemClock.now_ms() + 2_000;
    let clock = Arc::new(ManualClock::new(t0));
    let (server, _tmp) = start(&clock).await;
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "desk");
    let a = server.tls_config(&alice.device, &[ALPN_PCS1]);
    let b = server.tls_config(&bob.device, &[ALPN_PCS1]);

    let v = attempt(&server, &a, "alice", code_at(&alice.totp, t0), t0).await;
    let ticket = ticket_of(&v);

    // An hour back.
    let back = t0 - HOUR_MS;
    clock.set_ms(back);
    // alice's code of t0 is refused (it matches no step near the clock), and so is a code of
    // the steps the clock went back to: none is later than her last accepted step.
    let v = attempt(&server, &a, "alice", code_at(&alice.totp, t0), back).await;
    refused(&v, RejectCode::MfaFailed, "not accepted");
    let v = attempt(&server, &a, "alice", code_at(&alice.totp, back), back).await;
    refused(&v, RejectCode::MfaFailed, "already used");
    // Her ticket was earned an hour "later": its age cannot be told, it is refused.
    let v = attempt(&server, &a, "alice", Factor::Session(ticket.clone()), back).await;
    refused(&v, RejectCode::MfaRequired, "session");
    // bob, who never logged in, is let in by a code of the clock's time.
    let v = attempt(&server, &b, "bob", code_at(&bob.totp, back), back).await;
    assert!(v.unwrap().is_accepted());

    // The clock right again: alice's ticket works (10 minutes from t0), her code of t0 not.
    let now = t0 + 5_000;
    clock.set_ms(now);
    let v = attempt(&server, &a, "alice", Factor::Session(ticket.clone()), now).await;
    assert!(v.as_ref().unwrap().is_accepted(), "{v:?}");
    let v = attempt(&server, &a, "alice", code_at(&alice.totp, t0), now).await;
    refused(&v, RejectCode::MfaFailed, "already used");

    // An hour forward: the ticket (10 minutes) has expired by the server's clock; a code of
    // the clock's time is accepted, once.
    let ahead = t0 + HOUR_MS;
    clock.set_ms(ahead);
    let v = attempt(&server, &a, "alice", Factor::Session(ticket.clone()), ahead).await;
    refused(&v, RejectCode::MfaRequired, "session");
    let code = code_at(&alice.totp, ahead);
    let v = attempt(&server, &a, "alice", code.clone(), ahead).await;
    let later_ticket = ticket_of(&v);
    let v = attempt(&server, &a, "alice", code, ahead).await;
    refused(&v, RejectCode::MfaFailed, "already used");

    // Back to the right time: the ticket earned at t0 + 1 h is refused until the clock gets
    // there, and the one earned at t0 stays ended: once the clock passed its expiry, the
    // registry forgot its record (the next session purged it), and a clock set back does not
    // bring it back.
    let now = t0 + 10_000;
    clock.set_ms(now);
    let v = attempt(
        &server,
        &a,
        "alice",
        Factor::Session(later_ticket.clone()),
        now,
    )
    .await;
    refused(&v, RejectCode::MfaRequired, "session");
    let v = attempt(&server, &a, "alice", Factor::Session(ticket), now).await;
    refused(&v, RejectCode::MfaRequired, "session");
    // The later ticket works once the clock is past its TOTP time, until its own expiry.
    let there = ahead + 1_000;
    clock.set_ms(there);
    let v = attempt(
        &server,
        &a,
        "alice",
        Factor::Session(later_ticket.clone()),
        there,
    )
    .await;
    assert!(v.as_ref().unwrap().is_accepted(), "{v:?}");
    let end = ahead + 600_000;
    clock.set_ms(end);
    let v = attempt(&server, &a, "alice", Factor::Session(later_ticket), end).await;
    refused(&v, RejectCode::MfaRequired, "session");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_while_the_clock_steps_get_no_code_accepted_twice() {
    let t0 = SystemClock.now_ms();
    let clock = Arc::new(ManualClock::new(t0));
    let (server, _tmp) = start(&clock).await;
    let server = Arc::new(server);
    let accepted: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..BUSY_USERS {
        let who = server.enroll(&format!("u{i}"), &format!("d{i}"));
        let config = server.tls_config(&who.device, &[ALPN_PCS1]);
        let (server, clock, accepted, stop) = (
            server.clone(),
            clock.clone(),
            accepted.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let now = clock.now_ms();
                let step = now / 30_000;
                let v = attempt(&server, &config, &who.user, code_at(&who.totp, now), now).await;
                if v.as_ref().is_some_and(Verdict::is_accepted) {
                    accepted.lock().unwrap().push((who.user.clone(), step));
                }
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            attempts
        }));
    }
    // Back an hour, right, forward an hour, right, each for a while, stepping 30 s (one TOTP
    // step) every 100 ms so that new codes keep coming.
    for base in [t0 - HOUR_MS, t0, t0 + HOUR_MS, t0 + 60_000] {
        for k in 0..8u64 {
            clock.set_ms(base + k * 30_000);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut attempts = 0;
    for task in tasks {
        attempts += task.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let distinct: HashSet<&(String, u64)> = accepted.iter().collect();
    println!(
        "{attempts} attempts, {} accepted, {} distinct (user, step)",
        accepted.len(),
        distinct.len()
    );
    assert_eq!(
        distinct.len(),
        accepted.len(),
        "a code accepted twice: {accepted:?}"
    );
    // Per user, the accepted steps only go up: a step back reopens none.
    for i in 0..BUSY_USERS {
        let user = format!("u{i}");
        let steps: Vec<u64> = accepted
            .iter()
            .filter(|(u, _)| *u == user)
            .map(|(_, s)| *s)
            .collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{user}: {steps:?}");
        assert!(!steps.is_empty(), "{user} was never let in");
    }
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}
