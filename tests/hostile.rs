//! The gate against hostile and broken clients, over real loopback sockets: slow and odd
//! Prefixes, garbage, HTTP/2 without a Prefix, TLS 1.2, no ALPN, bad certificates, a server
//! clock that steps back, idle connections, the limits on the accept path (deadline, cap on
//! connections being authenticated, rate limit per source), lockout and single use across a
//! restart, and a mixed flood of valid and invalid attempts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use portcullis::core::codec::{ALPN_PCS1, Factor, Prefix, Verdict};
use portcullis::core::{Clock, ManualClock, Registry, RejectCode, SystemClock, TotpConfig};
use portcullis::server::RateLimit;
use portcullis::store::SqliteRegistry;
use portcullis::tls::devpki::{CertProfile, DevCa, Issued};
use portcullis::tls::rustls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A generous bound on waits that should end long before it; reaching it fails the test.
const GUARD: Duration = Duration::from_secs(30);

async fn guarded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still waiting after {} s", GUARD.as_secs()),
    }
}

/// Waits until `cond` holds (the server has caught up with connections the test opened).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    guarded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// One attempt on a raw connection: TLS with `config`, a Prefix for `user` with `factor`
/// (changed by `tamper`), and the Verdict (`None` when the connection ended without one).
async fn attempt(
    server: &TestServer,
    config: &Arc<rustls::ClientConfig>,
    user: &str,
    factor: Factor,
    tamper: impl FnOnce(&mut Prefix),
) -> Option<Verdict> {
    let mut tls = tls_with(server.addr, config.clone()).await.ok()?;
    let mut p = prefix(&tls, user, factor);
    tamper(&mut p);
    tls.write_all(&p.encode().unwrap()).await.ok()?;
    tls.flush().await.ok()?;
    try_read_verdict(&mut tls).await
}

/// One attempt of an enrolled user with the current code, untampered.
async fn attempt_now(
    server: &TestServer,
    config: &Arc<rustls::ClientConfig>,
    who: &Enrolled,
) -> Option<Verdict> {
    let code = Factor::Totp(current_code(&who.totp));
    attempt(server, config, &who.user, code, |_| {}).await
}

fn pcs1(server: &TestServer, device: &Issued) -> Arc<rustls::ClientConfig> {
    server.tls_config(device, &[ALPN_PCS1])
}

fn failures(server: &TestServer, user: &str) -> u32 {
    server.registry.lock_state(user).unwrap().failures
}

fn code_at(totp: &TotpConfig, ms: u64) -> String {
    totp.generate(ms / 1000)
}

#[track_caller]
fn assert_code(verdict: &Option<Verdict>, code: RejectCode) {
    let got = verdict.as_ref().and_then(Verdict::reject_code);
    assert_eq!(got, Some(code), "{verdict:?}");
}

#[tokio::test]
async fn a_prefix_sent_one_byte_at_a_time_is_accepted_within_the_deadline() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let frame = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)))
        .encode()
        .unwrap();
    for byte in &frame {
        // One TLS record per byte.
        tls.write_all(std::slice::from_ref(byte)).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let verdict = guarded("verdict", read_verdict(&mut tls)).await;
    assert!(verdict.is_accepted(), "{verdict:?}");
    drop(tls);
    server.stop().await;
}

#[tokio::test]
async fn a_length_of_65535_is_malformed_from_the_header_alone() {
    // A deadline far beyond the test's guard: a server waiting for the announced body would
    // answer TIMEOUT only after the guard has failed the test.
    let (server, _) = start_configured(|b| b.deadline(Duration::from_secs(300))).await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    tls.write_all(b"PCS1\x01\xff\xff").await.unwrap();
    tls.flush().await.unwrap();
    let verdict = guarded("verdict", read_verdict(&mut tls)).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed));
    let reason = verdict.reason.unwrap();
    assert!(reason.contains("65535"), "{reason}");
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);
    server.stop().await;
}

#[tokio::test]
async fn ten_kilobytes_of_garbage_are_malformed() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let garbage: Vec<u8> = (0..10 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    let verdict = guarded("verdict", send_raw(&mut tls, &garbage)).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Malformed));
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    assert_eq!(failures(&server, "alice"), 0);
    server.stop().await;
}

#[tokio::test]
async fn an_http2_preface_without_a_prefix_never_reaches_tonic() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    // A HEADERS frame for a Say call, as a stock client would send next.
    bytes.extend_from_slice(&[0, 0, 1, 1, 4, 0, 0, 0, 1, 0x83]);
    let verdict = guarded("verdict", send_raw(&mut tls, &bytes)).await;
    let code = verdict.reject_code();
    assert!(
        matches!(code, Some(RejectCode::Malformed | RejectCode::Unsupported)),
        "{verdict:?}"
    );
    // Not one byte of HTTP/2 (the server's SETTINGS) follows the Verdict.
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_tls12_client_fails_the_handshake() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let outcome = guarded(
        "handshake",
        tls_with(server.addr, server.tls12_config(&alice.device)),
    )
    .await;
    let Err(error) = outcome else {
        panic!("a TLS 1.2 handshake succeeded");
    };
    assert!(
        error.to_string().to_lowercase().contains("version"),
        "{error}"
    );
    // The same device over TLS 1.3 gets in.
    let verdict = attempt_now(&server, &pcs1(&server, &alice.device), &alice).await;
    assert!(verdict.unwrap().is_accepted());
    server.stop().await;
}

#[tokio::test]
async fn a_client_without_alpn_is_closed_without_a_byte() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let mut tls = server.raw_tls(&alice.device, &[]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let p = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
    let _ = tls.write_all(&p.encode().unwrap()).await;
    let _ = tls.flush().await;
    assert_eq!(read_to_close(&mut tls).await.unwrap_or(0), 0);
    assert_eq!(failures(&server, "alice"), 0);
    // The code was never checked, so it still works with ALPN.
    let verdict = attempt_now(&server, &pcs1(&server, &alice.device), &alice).await;
    assert!(verdict.unwrap().is_accepted());
    server.stop().await;
}

#[tokio::test]
async fn expired_not_yet_valid_wrong_ca_and_server_only_certificates_are_refused() {
    let server = TestServer::start().await;
    let now = (SystemClock.now_ms() / 1000) as i64;
    let day = 86_400;
    let profile = |name: &str| CertProfile::device(name);
    let other_ca = DevCa::generate("another CA").unwrap();
    let cases: Vec<(&str, Issued)> = vec![
        (
            "expired",
            server
                .ca
                .issue(&CertProfile {
                    not_before_unix: now - 2 * day,
                    not_after_unix: now - day,
                    ..profile("expired")
                })
                .unwrap(),
        ),
        (
            "not-yet-valid",
            server
                .ca
                .issue(&CertProfile {
                    not_before_unix: now + day,
                    not_after_unix: now + 2 * day,
                    ..profile("not-yet-valid")
                })
                .unwrap(),
        ),
        ("wrong-ca", other_ca.issue_device("wrong-ca").unwrap()),
        (
            "no-client-auth",
            server
                .ca
                .issue(&CertProfile {
                    client_auth: false,
                    server_auth: true,
                    ..profile("no-client-auth")
                })
                .unwrap(),
        ),
    ];
    for (name, cert) in &cases {
        // Bound to a user of its own, so that only TLS stands in the way.
        let user = format!("user-{name}");
        let totp = server.add_user(&user);
        let fp = portcullis::tls::fingerprint(cert.cert_der().as_ref()).unwrap();
        server
            .registry
            .bind_device(name, &user, &fp, SystemClock.now_ms())
            .unwrap();
        let verdict = guarded(
            name,
            attempt(
                &server,
                &pcs1(&server, cert),
                &user,
                Factor::Totp(current_code(&totp)),
                |_| {},
            ),
        )
        .await;
        assert!(verdict.is_none(), "{name}: got a Verdict {verdict:?}");
        assert_eq!(failures(&server, &user), 0, "{name}");
    }
    // A good certificate gets in on the same server.
    let alice = server.enroll("alice", "laptop");
    let verdict = attempt_now(&server, &pcs1(&server, &alice.device), &alice).await;
    assert!(verdict.unwrap().is_accepted());
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_server_clock_that_steps_back_reopens_no_code() {
    let t = SystemClock.now_ms();
    let clock = Arc::new(ManualClock::new(t));
    let (server, _) = start_configured({
        let clock = clock.clone();
        move |b| b.clock(clock)
    })
    .await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    let at = |ms: u64| move |p: &mut Prefix| p.time_ms = ms;

    let used = code_at(&alice.totp, t);
    let v = attempt(&server, &config, "alice", Factor::Totp(used.clone()), at(t)).await;
    assert!(v.unwrap().is_accepted());

    let back = t - 5 * 60_000;
    clock.set_ms(back);
    // TIME is checked against the new clock: the old time is now 5 minutes ahead.
    let fresh = code_at(&alice.totp, back);
    let v = attempt(
        &server,
        &config,
        "alice",
        Factor::Totp(fresh.clone()),
        at(t),
    )
    .await;
    assert_code(&v, RejectCode::ClockSkew);
    assert_eq!(v.unwrap().server_time_ms, back);
    // The code accepted before is not accepted again.
    let v = attempt(&server, &config, "alice", Factor::Totp(used), at(back)).await;
    assert_code(&v, RejectCode::MfaFailed);
    // Nor is a code of the earlier steps the clock went back to: its step is not later than
    // the last accepted one.
    let v = attempt(&server, &config, "alice", Factor::Totp(fresh), at(back)).await;
    assert_code(&v, RejectCode::MfaFailed);
    // The old code matches no step near the new clock: a failure. The fresh one is a reused
    // code (its step is not later than the last accepted one): no failure.
    assert_eq!(failures(&server, "alice"), 1);

    // Once the clock is past the accepted step again, new codes work.
    let later = t + 60_000;
    clock.set_ms(later);
    let v = attempt(
        &server,
        &config,
        "alice",
        Factor::Totp(code_at(&alice.totp, later)),
        at(later),
    )
    .await;
    assert!(v.unwrap().is_accepted());
    assert_eq!(failures(&server, "alice"), 0);
    server.stop().await;
}

/// Calls Say through the client library; returns the user the service saw.
async fn say(server: &TestServer, enrolled: &Enrolled) -> Result<String, tonic::Status> {
    let reply = server.say(&server.secret_client(enrolled)).await;
    reply.map(|r| r.user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_idle_connections_do_not_keep_valid_clients_out() {
    // The deadline outlasts the test: the idle connections stay open until they are dropped.
    // Every connection comes from 127.0.0.1, and the idle ones stay silent: the caps per
    // source and on the first TLS byte are lifted, so that it is the cap alone that is tried.
    let (server, portcullis) = start_configured(|b| {
        b.deadline(Duration::from_secs(120))
            .hello_deadline(Duration::from_secs(120))
            .max_pending_per_source(1024)
            .rate_limit(None)
    })
    .await;
    let users: Vec<Enrolled> = (0..8)
        .map(|i| server.enroll(&format!("user{i}"), &format!("device{i}")))
        .collect();
    let mut idle_tcp = Vec::new();
    for _ in 0..500 {
        idle_tcp.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Some idle after the TLS handshake, without a Prefix.
    let mut idle_tls = Vec::new();
    for u in users.iter().take(4) {
        for _ in 0..5 {
            idle_tls.push(server.raw_tls(&u.device, &[ALPN_PCS1]).await);
        }
    }
    wait_until("the server holds the idle connections", || {
        portcullis.pending() == 520
    })
    .await;

    let mut calls = tokio::task::JoinSet::new();
    let server = Arc::new(server);
    for u in users {
        let server = server.clone();
        calls.spawn(async move { (u.user.clone(), say(&server, &u).await) });
    }
    while let Some(done) = calls.join_next().await {
        let (user, reply) = done.unwrap();
        assert_eq!(reply.unwrap(), user);
    }
    // The idle ones were held open all along.
    wait_until("the idle connections are still held", || {
        portcullis.pending() == 520
    })
    .await;
    assert_eq!(server.calls.load(Ordering::SeqCst), 8);
    drop(idle_tcp);
    drop(idle_tls);
    wait_until("idle connections released", || portcullis.pending() == 0).await;
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_a_second_and_an_unfinished_handshake_are_cut_at_the_deadline() {
    let (server, portcullis) =
        start_configured(|b| b.deadline(Duration::from_secs(2)).rate_limit(None)).await;
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "phone");

    // A TLS handshake that never completes: the start of a ClientHello record, then nothing.
    let mut stuck = TcpStream::connect(server.addr).await.unwrap();
    stuck.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();

    // A Prefix at one byte a second: it would take about 90 s.
    let tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let frame = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)))
        .encode()
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let dripping = tokio::spawn(async move {
        for byte in frame {
            if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    wait_until("both slow clients are being authenticated", || {
        portcullis.pending() == 2
    })
    .await;

    // Meanwhile a valid client gets in.
    assert_eq!(say(&server, &bob).await.unwrap(), "bob");

    // The drip gets TIMEOUT; the stuck handshake is closed.
    let verdict = guarded("the drip's verdict", read_verdict(&mut reader)).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Timeout));
    let mut rest = Vec::new();
    let closed = guarded(
        "the stuck handshake is closed",
        stuck.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_err() || rest.is_empty(), "{closed:?} {rest:?}");
    dripping.abort();
    wait_until("slow clients released", || portcullis.pending() == 0).await;
    assert_eq!(failures(&server, "alice"), 0);
    server.stop().await;
}

#[tokio::test]
async fn over_the_rate_limit_is_rate_limited_before_any_registry_work() {
    let (server, portcullis) = start_configured(|b| b.rate_limit(Some(RateLimit::new(1, 2)))).await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    // Wrong codes, until the source is over its limit (a burst of 2, then 1 a second: the
    // third attempt in quick succession at the latest, unless the machine stalls for seconds).
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let code = wrong_code(&alice.totp);
        let v = attempt(&server, &config, "alice", Factor::Totp(code), |_| {})
            .await
            .expect("a Verdict");
        let limited = v.reject_code() == Some(RejectCode::RateLimited);
        outcomes.push(v);
        if limited {
            break;
        }
    }
    let limited = outcomes.pop().unwrap();
    assert_eq!(
        limited.reject_code(),
        Some(RejectCode::RateLimited),
        "{limited:?}"
    );
    assert_eq!(limited.retry_after_s, Some(1));
    assert!(limited.reason.unwrap().starts_with("rate_limited: "));
    assert!(
        outcomes
            .iter()
            .all(|v| v.reject_code() == Some(RejectCode::MfaFailed)),
        "{outcomes:?}"
    );
    // The refused attempt spent no registry work: no failure counted, no nonce kept.
    let checked = outcomes.len();
    assert!(checked >= 2);
    assert_eq!(failures(&server, "alice") as usize, checked);
    assert_eq!(portcullis.gate().nonces().len(), checked);
    assert!(portcullis.rate_limited_sources() <= 1);
    server.stop().await;
}

#[tokio::test]
async fn over_max_pending_is_overloaded_and_beyond_the_refusal_budget_closed() {
    let (server, portcullis) = start_configured(|b| b.max_pending(2).rate_limit(None)).await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    // Two connections past their TLS handshake, waiting to send a Prefix: not shed.
    let idle = vec![
        server.raw_tls(&alice.device, &[ALPN_PCS1]).await,
        server.raw_tls(&alice.device, &[ALPN_PCS1]).await,
    ];
    wait_until("two pending", || portcullis.pending() == 2).await;
    let code = current_code(&alice.totp);
    let v = attempt(
        &server,
        &config,
        "alice",
        Factor::Totp(code.clone()),
        |_| {},
    )
    .await;
    assert_code(&v, RejectCode::Overloaded);
    let v = v.unwrap();
    assert_eq!(v.retry_after_s, Some(1));
    assert!(v.reason.unwrap().starts_with("overloaded: "));
    // Nothing was decided: no nonce, and the code is still good.
    assert_eq!(portcullis.gate().nonces().len(), 0);
    drop(idle);
    wait_until("slots free", || portcullis.pending() == 0).await;
    let v = attempt(&server, &config, "alice", Factor::Totp(code), |_| {}).await;
    assert!(v.unwrap().is_accepted());
    server.stop().await;

    // With no budget for refusals, a connection over the cap is closed at TCP accept: no
    // TLS handshake, no Verdict.
    let (server, portcullis) =
        start_configured(|b| b.max_pending(1).refusal_budget(0).rate_limit(None)).await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    let idle = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    wait_until("one pending", || portcullis.pending() == 1).await;
    let v = guarded("closed at accept", attempt_now(&server, &config, &alice)).await;
    assert!(v.is_none(), "{v:?}");
    assert_eq!(portcullis.refusing(), 0);
    drop(idle);
    wait_until("slot free", || portcullis.pending() == 0).await;
    let v = attempt_now(&server, &config, &alice).await;
    assert!(v.unwrap().is_accepted());
    server.stop().await;

    // Connections still in their TLS handshake (silent after TCP) are shed for a newcomer
    // when the cap is full: the oldest is closed, the newcomer let in.
    let (server, portcullis) = start_configured(|b| b.max_pending(2).rate_limit(None)).await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    let mut oldest = TcpStream::connect(server.addr).await.unwrap();
    wait_until("one pending", || portcullis.pending() == 1).await;
    let newer = TcpStream::connect(server.addr).await.unwrap();
    wait_until("two pending", || portcullis.pending() == 2).await;
    let v = attempt_now(&server, &config, &alice).await;
    assert!(v.unwrap().is_accepted(), "the newcomer is let in");
    let mut buf = [0u8; 1];
    let closed = guarded("the oldest is shed", oldest.read(&mut buf)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    drop(newer);
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limited_status_reaches_the_client_library() {
    let (server, _) = start_configured(|b| b.rate_limit(Some(RateLimit::new(1, 1)))).await;
    let alice = server.enroll("alice", "laptop");
    let config = pcs1(&server, &alice.device);
    // Spend the source's burst of 1, then call at once; a second round only if the machine
    // stalled for a second in between.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let _ = attempt(
            &server,
            &config,
            "alice",
            Factor::Session(vec![1; 32]),
            |_| {},
        )
        .await;
        match say(&server, &alice).await {
            Err(status) if status.message().starts_with("rate_limited: ") => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert_eq!(
                    status.metadata().get("portcullis-retry-after").unwrap(),
                    "1"
                );
                assert_eq!(
                    status.metadata().get("portcullis-reject").unwrap(),
                    "rate_limited"
                );
                server.stop().await;
                return;
            }
            other => statuses.push(format!("{other:?}")),
        }
    }
    panic!("never rate limited: {statuses:?}");
}

fn sqlite(path: &std::path::Path, clock: &Arc<ManualClock>) -> Arc<dyn Registry> {
    Arc::new(
        SqliteRegistry::open_or_create(path)
            .unwrap()
            .with_clock(clock.clone()),
    )
}

#[tokio::test]
async fn lockout_and_single_use_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("portcullis.db");
    // The server's clock stands still, so that only the restart changes anything.
    let t = SystemClock.now_ms();
    let clock = Arc::new(ManualClock::new(t));
    let ca = DevCa::generate("restart CA").unwrap();
    let shaped = |clock: Arc<ManualClock>| move |b: portcullis::server::Builder| b.clock(clock);
    let (server, _) = start_custom(same_ca(&ca), sqlite(&db, &clock), shaped(clock.clone())).await;
    let alice = server.enroll("alice", "laptop");
    let carol = server.enroll("carol", "tablet");
    let alice_tls = pcs1(&server, &alice.device);
    let carol_tls = pcs1(&server, &carol.device);
    let at_t = |p: &mut Prefix| p.time_ms = t;

    let used = code_at(&alice.totp, t);
    let v = attempt(
        &server,
        &alice_tls,
        "alice",
        Factor::Totp(used.clone()),
        at_t,
    )
    .await;
    assert!(v.unwrap().is_accepted());
    let wrong = wrong_code_at(&carol.totp, t);
    for _ in 0..5 {
        let v = attempt(
            &server,
            &carol_tls,
            "carol",
            Factor::Totp(wrong.clone()),
            at_t,
        )
        .await;
        assert_code(&v, RejectCode::MfaFailed);
    }
    let right = code_at(&carol.totp, t);
    let v = attempt(
        &server,
        &carol_tls,
        "carol",
        Factor::Totp(right.clone()),
        at_t,
    )
    .await;
    assert_code(&v, RejectCode::LockedOut);
    server.stop().await;

    // A new server on the same file (and the same PKI).
    let (server, _) = start_custom(same_ca(&ca), sqlite(&db, &clock), shaped(clock.clone())).await;
    let v = attempt(&server, &carol_tls, "carol", Factor::Totp(right), at_t).await;
    assert_code(&v, RejectCode::LockedOut);
    assert_eq!(v.unwrap().retry_after_s, Some(30));
    assert_eq!(failures(&server, "carol"), 5);
    let v = attempt(&server, &alice_tls, "alice", Factor::Totp(used), at_t).await;
    assert_code(&v, RejectCode::MfaFailed);
    // The next step's code is good: single use did not lock alice out of new codes.
    let next = t + 30_000;
    clock.set_ms(next);
    let v = attempt(
        &server,
        &alice_tls,
        "alice",
        Factor::Totp(code_at(&alice.totp, next)),
        |p| p.time_ms = next,
    )
    .await;
    assert!(v.unwrap().is_accepted());
    server.stop().await;
}

#[tokio::test]
async fn a_device_of_another_user_cannot_lock_a_user_out() {
    let server = TestServer::start().await;
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "phone");
    let bob_tls = pcs1(&server, &bob.device);
    for _ in 0..8 {
        let v = attempt(
            &server,
            &bob_tls,
            "alice",
            Factor::Totp(wrong_code(&alice.totp)),
            |_| {},
        )
        .await;
        assert_code(&v, RejectCode::UserMismatch);
    }
    assert_eq!(failures(&server, "alice"), 0);
    assert_eq!(failures(&server, "bob"), 0);
    assert_eq!(say(&server, &alice).await.unwrap(), "alice");
    server.stop().await;
}

/// What one attempt of the flood sends, and the answer it must get.
#[derive(Clone)]
enum Kind {
    /// A user's current code, once per user: accepted.
    Totp(usize),
    /// A session ticket: accepted.
    Session(usize),
    /// A wrong code, at most 4 per user (under the lockout threshold): MFA_FAILED.
    WrongCode(usize),
    /// A certificate bound to no one: DEVICE_UNKNOWN.
    UnknownDevice,
    /// A wrong channel binding: BINDING_MISMATCH.
    BadBinding(usize),
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_mixed_attempts_from_64_tasks_decide_right() {
    const NONCE_CAP: usize = 4096;
    // All 64 tasks connect from 127.0.0.1: no cap per source.
    let (server, portcullis) = start_configured(|b| {
        b.rate_limit(None)
            .nonce_capacity(NONCE_CAP)
            .max_pending_per_source(1024)
    })
    .await;
    let totp_users: Vec<Enrolled> = (0..200)
        .map(|i| server.enroll(&format!("t{i}"), &format!("t{i}-dev")))
        .collect();
    let session_users: Vec<Enrolled> = (0..8)
        .map(|i| server.enroll(&format!("s{i}"), &format!("s{i}-dev")))
        .collect();
    let wrong_users: Vec<Enrolled> = (0..100)
        .map(|i| server.enroll(&format!("w{i}"), &format!("w{i}-dev")))
        .collect();
    let (stray, _) = server.issue("stray");

    let configs = |users: &[Enrolled]| -> Vec<Arc<rustls::ClientConfig>> {
        users.iter().map(|u| pcs1(&server, &u.device)).collect()
    };
    let totp_tls = configs(&totp_users);
    let session_tls = configs(&session_users);
    let wrong_tls = configs(&wrong_users);
    let stray_tls = pcs1(&server, &stray);

    let mut tickets = Vec::new();
    for (u, config) in session_users.iter().zip(&session_tls) {
        let v = attempt_now(&server, config, u).await.unwrap();
        tickets.push(v.session.expect("a session ticket").0);
    }

    let mut work: Vec<Kind> = Vec::new();
    work.extend((0..200).map(Kind::Totp));
    work.extend((0..1000).map(|i| Kind::Session(i % 8)));
    work.extend((0..400).map(|i| Kind::WrongCode(i % 100)));
    work.extend((0..200).map(|_| Kind::UnknownDevice));
    work.extend((0..200).map(|i| Kind::BadBinding(i % 8)));
    assert_eq!(work.len(), 2000);
    // A fixed shuffle, so that the kinds interleave.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in (1..work.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        work.swap(i, (seed % (i as u64 + 1)) as usize);
    }

    let rss_before = rss_kib();
    let nonces_before = portcullis.gate().nonces().len();
    let server = Arc::new(server);
    let shared = Arc::new((
        work,
        AtomicUsize::new(0),
        totp_users,
        session_users,
        wrong_users,
        tickets,
        (totp_tls, session_tls, wrong_tls, stray_tls),
    ));
    let wrong_decisions = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let shared = shared.clone();
        let server = server.clone();
        let wrong_decisions = wrong_decisions.clone();
        tasks.spawn(async move {
            let (work, next, totp_users, session_users, wrong_users, tickets, tls) = &*shared;
            let (totp_tls, session_tls, wrong_tls, stray_tls) = tls;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(kind) = work.get(i) else { break };
                let (verdict, expected) = match kind.clone() {
                    Kind::Totp(n) => {
                        let u = &totp_users[n];
                        let f = Factor::Totp(current_code(&u.totp));
                        (
                            attempt(&server, &totp_tls[n], &u.user, f, |_| {}).await,
                            None,
                        )
                    }
                    Kind::Session(n) => {
                        let u = &session_users[n];
                        let f = Factor::Session(tickets[n].clone());
                        (
                            attempt(&server, &session_tls[n], &u.user, f, |_| {}).await,
                            None,
                        )
                    }
                    Kind::WrongCode(n) => {
                        let u = &wrong_users[n];
                        let f = Factor::Totp(wrong_code(&u.totp));
                        let v = attempt(&server, &wrong_tls[n], &u.user, f, |_| {}).await;
                        (v, Some(RejectCode::MfaFailed))
                    }
                    Kind::UnknownDevice => {
                        let f = Factor::Totp("123456".into());
                        let v = attempt(&server, stray_tls, "t0", f, |_| {}).await;
                        (v, Some(RejectCode::DeviceUnknown))
                    }
                    Kind::BadBinding(n) => {
                        let u = &session_users[n];
                        let f = Factor::Session(tickets[n].clone());
                        let v = attempt(&server, &session_tls[n], &u.user, f, |p| {
                            p.binding[7] ^= 0x40
                        })
                        .await;
                        (v, Some(RejectCode::BindingMismatch))
                    }
                };
                let got = verdict.as_ref().map(|v| v.reject_code());
                if got != Some(expected) {
                    wrong_decisions.lock().unwrap().push(format!(
                        "attempt {i}: expected {expected:?}, got {verdict:?}"
                    ));
                }
            }
        });
    }
    guarded("the flood", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    let wrong_decisions = std::mem::take(&mut *wrong_decisions.lock().unwrap());
    assert!(
        wrong_decisions.is_empty(),
        "{} wrong decisions, e.g. {:?}",
        wrong_decisions.len(),
        &wrong_decisions[..wrong_decisions.len().min(5)]
    );

    // Nonces are kept exactly for the attempts that reached the nonce check (accepted ones and
    // wrong codes), within the cap.
    let nonces = portcullis.gate().nonces().len();
    assert_eq!(nonces - nonces_before, 200 + 1000 + 400);
    assert!(nonces <= NONCE_CAP);
    for u in &shared.4 {
        assert_eq!(failures(&server, &u.user), 4, "{}", u.user);
    }
    if let (Some(before), Some(after)) = (rss_before, rss_kib()) {
        let grown_mib = after.saturating_sub(before) / 1024;
        assert!(grown_mib < 200, "RSS grew by {grown_mib} MiB");
    }
    wait_until("all connections released", || portcullis.pending() == 0).await;
    drop(shared);
    Arc::into_inner(server).unwrap().stop().await;
}
