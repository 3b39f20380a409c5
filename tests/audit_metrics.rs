//! The audit trail and the metrics over real connections: each way an attempt can end makes
//! exactly one record with the right fields and no secret, in the sink and in the JSON-lines
//! file, and the Prometheus endpoint counts the same attempts.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis::core::MemoryRegistry;
use portcullis::core::codec::{ALPN_PCS1, Factor};
use portcullis::server::{AuditOutcome, AuditRecord, RateLimit};
use portcullis::tls::devpki::DevCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A generous bound on waits that should end long before it; reaching it fails the test.
const GUARD: Duration = Duration::from_secs(30);

fn by_ref<'a>(records: &'a [AuditRecord], reference: &[u8; 16]) -> &'a AuditRecord {
    let hex = hex::encode(reference);
    let found: Vec<_> = records
        .iter()
        .filter(|r| r.reference.map(|x| x.to_string()) == Some(hex.clone()))
        .collect();
    assert_eq!(found.len(), 1, "records with REF {hex}: {records:#?}");
    found[0]
}

/// `GET path` over HTTP/1.1; the status line, the headers (lower-case names) and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, HashMap<String, String>, String) {
    tokio::time::timeout(GUARD, async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines.next().unwrap().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    })
    .await
    .expect("the metrics endpoint answers")
}

/// The samples of an OpenMetrics text: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn attempts_key(outcome: &str, code: &str, cause: &str) -> String {
    format!(
        "portcullis_connection_attempts_total{{outcome=\"{outcome}\",code=\"{code}\",cause=\"{cause}\"}}"
    )
}

fn is_rfc3339_utc_ms(time: &str) -> bool {
    let b = time.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && time.starts_with("20")
}

fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn each_outcome_makes_one_record_and_the_metrics_count_the_same_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("audit.jsonl");
    let (seen, sink) = collector();
    let log_path = log.clone();
    let (server, portcullis) = start_custom(
        DevCa::generate("audit test CA").unwrap(),
        Arc::new(MemoryRegistry::new()),
        move |b| {
            b.deadline(Duration::from_secs(2))
                .audit_sink(sink)
                .audit_log(&log_path)
                .unwrap()
                .metrics_listen("127.0.0.1:0".parse().unwrap())
        },
    )
    .await;
    let metrics_addr = portcullis.metrics_addr().expect("metrics address bound");
    let alice = server.enroll("alice", "laptop");
    let (stranger, stranger_fp) = server.issue("stranger");
    let code = current_code(&alice.totp);
    let wrong = wrong_code(&alice.totp);

    // Accepted with the current code.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let accepted_peer = tls.get_ref().0.local_addr().unwrap();
    let p = prefix(&tls, "alice", Factor::Totp(code.clone()));
    let accepted = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(accepted.status, 0, "{accepted:?}");
    let ticket = accepted.session.clone().expect("a session ticket").0;
    drop(tls);

    // The same code again: MFA_FAILED, caused by code_reused.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Totp(code.clone()));
    let reused = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(reused.status, 6, "{reused:?}");

    // A wrong code: MFA_FAILED, caused by code_wrong.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Totp(wrong.clone()));
    let wrong_verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(wrong_verdict.status, 6, "{wrong_verdict:?}");

    // A certificate bound to nobody.
    let mut tls = server.raw_tls(&stranger, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Totp(code.clone()));
    let unknown = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(unknown.status, 3, "{unknown:?}");

    // No ALPN: closed after the handshake, without a Verdict.
    let mut tls = server.raw_tls(&alice.device, &[]).await;
    let no_alpn_peer = tls.get_ref().0.local_addr().unwrap();
    let _ = read_to_close(&mut tls).await;

    // Silent until the deadline: TIMEOUT.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let timeout = tokio::time::timeout(GUARD, read_verdict(&mut tls))
        .await
        .expect("a TIMEOUT verdict");
    assert_eq!(timeout.status, 14, "{timeout:?}");

    let all = records(&seen, 6).await;

    let r = by_ref(&all, &accepted.reference);
    assert_eq!(r.outcome, AuditOutcome::Accepted);
    assert_eq!(r.peer, accepted_peer);
    assert_eq!(r.fingerprint, Some(alice.fingerprint));
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.agent.as_deref(), Some("portcullis-tests"));
    assert_eq!(r.device.as_deref(), Some("laptop"));
    assert_eq!(r.method.map(|m| m.as_str()), Some("totp"));
    assert_eq!((r.code, r.cause), (None, None));
    let decision_us = r.decision_us.expect("a decision time");
    assert!(r.accept_us >= decision_us, "{r:?}");

    let r = by_ref(&all, &reused.reference);
    assert_eq!(r.outcome, AuditOutcome::Rejected);
    assert_eq!(r.code.map(|c| c.name()), Some("mfa_failed"));
    assert_eq!(r.cause, Some("code_reused"));
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.fingerprint, Some(alice.fingerprint));
    assert_eq!((r.device.as_deref(), r.method), (None, None));

    let r = by_ref(&all, &wrong_verdict.reference);
    assert_eq!(r.code.map(|c| c.name()), Some("mfa_failed"));
    assert_eq!(r.cause, Some("code_wrong"));

    let r = by_ref(&all, &unknown.reference);
    assert_eq!(r.outcome, AuditOutcome::Rejected);
    assert_eq!(r.code.map(|c| c.name()), Some("device_unknown"));
    assert_eq!(r.cause, Some("device_unknown"));
    assert_eq!(r.fingerprint, Some(stranger_fp));

    let r = by_ref(&all, &timeout.reference);
    assert_eq!(r.code.map(|c| c.name()), Some("timeout"));
    assert_eq!(r.cause, Some("prefix_timeout"));
    assert_eq!((r.user.as_deref(), r.agent.as_deref()), (None, None));
    assert!(r.decision_us.is_some());

    let closed: Vec<_> = all.iter().filter(|r| r.reference.is_none()).collect();
    assert_eq!(closed.len(), 1, "{all:#?}");
    let r = closed[0];
    assert_eq!(r.outcome, AuditOutcome::Closed);
    assert_eq!(r.cause, Some("alpn_refused"));
    assert_eq!(r.code, None);
    assert_eq!(r.peer, no_alpn_peer);
    assert_eq!(
        r.fingerprint,
        Some(alice.fingerprint),
        "the handshake finished"
    );
    assert_eq!(r.decision_us, None);

    // The file holds the same records, one JSON line each, in the documented form.
    let lines = read_json_lines(&log);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let mut from_file: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut from_sink: Vec<String> = all
        .iter()
        .map(|r| serde_json::to_value(r).unwrap().to_string())
        .collect();
    from_file.sort();
    from_sink.sort();
    assert_eq!(from_file, from_sink);
    for line in &lines {
        assert!(is_rfc3339_utc_ms(line["time"].as_str().unwrap()), "{line}");
        for key in [
            "ref",
            "peer",
            "fingerprint",
            "user",
            "agent",
            "device",
            "method",
            "outcome",
            "code",
            "cause",
            "detail",
            "decision_us",
            "accept_us",
        ] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
    let accepted_line = lines.iter().find(|l| l["outcome"] == "accepted").unwrap();
    assert_eq!(accepted_line["ref"], hex::encode(accepted.reference));
    assert_eq!(accepted_line["fingerprint"], alice.fingerprint.to_string());
    assert_eq!(accepted_line["peer"], accepted_peer.to_string());
    assert!(lines.iter().any(|l| l["cause"] == "code_reused"));
    assert!(
        lines
            .iter()
            .any(|l| l["outcome"] == "closed" && l["ref"].is_null())
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // No code, secret or ticket anywhere in the trail.
    let text = std::fs::read_to_string(&log).unwrap();
    let secret = alice.totp.secret();
    for needle in [
        code.clone(),
        wrong.clone(),
        hex::encode(&ticket),
        hex::encode(secret),
        String::from_utf8_lossy(secret).into_owned(),
        alice.totp.secret_base32(),
    ] {
        assert!(!text.contains(&needle), "the audit log holds `{needle}`");
    }

    // The metrics count the same attempts.
    let (status, headers, body) = http_get(metrics_addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers["content-type"].starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    let m = samples(&body);
    for (key, want) in [
        (attempts_key("accepted", "", ""), 1.0),
        (attempts_key("rejected", "mfa_failed", "code_reused"), 1.0),
        (attempts_key("rejected", "mfa_failed", "code_wrong"), 1.0),
        (
            attempts_key("rejected", "device_unknown", "device_unknown"),
            1.0,
        ),
        (attempts_key("rejected", "timeout", "prefix_timeout"), 1.0),
        (attempts_key("closed", "", "alpn_refused"), 1.0),
    ] {
        assert_eq!(m.get(&key), Some(&want), "{key} in\n{body}");
    }
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("portcullis_connection_attempts_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 6.0, "{body}");
    // Five attempts got a Verdict.
    assert_eq!(m["portcullis_accept_duration_seconds_count"], 5.0, "{body}");
    assert_eq!(
        m["portcullis_decision_duration_seconds_count"], 5.0,
        "{body}"
    );
    // Three Prefixes got as far as the nonce step (accepted, reused, wrong code).
    assert_eq!(m["portcullis_live_nonces"], 3.0, "{body}");
    for gauge in [
        "portcullis_authenticating_connections",
        "portcullis_refusing_connections",
        "portcullis_nonce_capacity",
        "portcullis_rate_limited_sources",
    ] {
        assert!(m.contains_key(gauge), "{gauge} in\n{body}");
    }
    assert!(m["portcullis_nonce_capacity"] > 0.0);
    assert!(body.ends_with("# EOF\n"), "{body}");

    // Only /metrics is served; the handler and the text say the same.
    let (status, _, _) = http_get(metrics_addr, "/").await;
    assert!(status.contains(" 404 "), "{status}");
    let text = portcullis.metrics_text();
    assert_eq!(
        samples(&text)[&attempts_key("accepted", "", "")],
        1.0,
        "{text}"
    );
    use tower::ServiceExt;
    let response = portcullis
        .metrics_handler()
        .oneshot(http::Request::get("/anywhere").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.body().contains("portcullis_live_nonces 3"));
    let response = portcullis
        .metrics_handler()
        .oneshot(http::Request::post("/metrics").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 405);

    // Scrapes made no records; still exactly one per attempt.
    assert_eq!(seen.lock().unwrap().len(), 6);
    server.stop().await;
}

#[tokio::test]
async fn refusals_at_accept_are_recorded_with_and_without_a_verdict() {
    // A rate limit of one attempt a second: the attempts after the first are refused before
    // their Prefix. With a refusal budget, they get a RATE_LIMITED Verdict.
    let (seen, sink) = collector();
    let (server, portcullis) = start_custom(
        DevCa::generate("audit test CA").unwrap(),
        Arc::new(MemoryRegistry::new()),
        move |b| b.rate_limit(Some(RateLimit::new(1, 1))).audit_sink(sink),
    )
    .await;
    let alice = server.enroll("alice", "laptop");
    let mut attempts = 0;
    let limited = loop {
        assert!(attempts < 20, "never rate limited");
        attempts += 1;
        let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
        let p = prefix(&tls, "alice", Factor::Totp(wrong_code(&alice.totp)));
        let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
        if verdict.status == 12 {
            break verdict;
        }
        assert_eq!(verdict.status, 6, "{verdict:?}");
    };
    let all = records(&seen, attempts).await;
    assert_eq!(all.len(), attempts);
    let r = by_ref(&all, &limited.reference);
    assert_eq!(r.outcome, AuditOutcome::Rejected);
    assert_eq!(r.code.map(|c| c.name()), Some("rate_limited"));
    assert_eq!(r.cause, Some("rate_limited"));
    assert_eq!(r.fingerprint, Some(alice.fingerprint));
    assert_eq!(r.user, None, "the Prefix was never read");
    // The limiter forgets a quiet source at its next sweep: compare the gauge with the
    // server's own count when that did not change around the scrape.
    let before = portcullis.rate_limited_sources();
    let m = samples(&portcullis.metrics_text());
    let after = portcullis.rate_limited_sources();
    assert_eq!(
        m[&attempts_key("rejected", "rate_limited", "rate_limited")],
        1.0
    );
    if before == after {
        assert_eq!(m["portcullis_rate_limited_sources"], before as f64);
    }
    assert!(m["portcullis_rate_limited_sources"] <= 1.0);
    server.stop().await;

    // Without a refusal budget, they are closed at accept: no handshake, no Verdict, no
    // fingerprint; a connection that goes away before its Prefix is closed too.
    let (seen, sink) = collector();
    let (server, portcullis) = start_custom(
        DevCa::generate("audit test CA").unwrap(),
        Arc::new(MemoryRegistry::new()),
        move |b| {
            b.rate_limit(Some(RateLimit::new(1, 1)))
                .refusal_budget(0)
                .audit_sink(sink)
        },
    )
    .await;
    let alice = server.enroll("alice", "laptop");
    let mut attempts = 0;
    loop {
        assert!(attempts < 20, "never closed at accept");
        attempts += 1;
        match server.try_raw_tls(&alice.device, &[ALPN_PCS1]).await {
            // Permitted: the client leaves without a Prefix, and cleanly.
            Ok(mut tls) => {
                tls.shutdown().await.unwrap();
                let _ = read_to_close(&mut tls).await;
            }
            Err(_) => break,
        }
    }
    let all = records(&seen, attempts).await;
    assert_eq!(all.len(), attempts);
    let at_accept: Vec<_> = all
        .iter()
        .filter(|r| r.code.map(|c| c.name()) == Some("rate_limited"))
        .collect();
    assert_eq!(at_accept.len(), 1, "{all:#?}");
    let r = at_accept[0];
    assert_eq!(r.outcome, AuditOutcome::Closed);
    assert_eq!(r.cause, Some("rate_limited"));
    assert_eq!((r.reference, r.fingerprint), (None, None));
    for r in all.iter().filter(|r| r.code.is_none()) {
        assert_eq!(r.outcome, AuditOutcome::Closed);
        assert_eq!(r.cause, Some("prefix_read_failed"), "{r:?}");
        assert_eq!(r.fingerprint, Some(alice.fingerprint));
    }
    let m = samples(&portcullis.metrics_text());
    assert_eq!(
        m[&attempts_key("closed", "rate_limited", "rate_limited")],
        1.0
    );
    assert_eq!(
        m["portcullis_accept_duration_seconds_count"], 0.0,
        "no attempt got a Verdict"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_open_cannot_keep_a_scraper_out() {
    let (_server, portcullis) =
        start_configured(|b| b.metrics_listen("127.0.0.1:0".parse().unwrap())).await;
    let addr = portcullis.metrics_addr().expect("metrics address bound");
    // 24 connections held open: 12 that send nothing, 12 that send half a request and stop.
    let mut held = Vec::new();
    for i in 0..24 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(tcp);
    }
    // And one that scraped with keep-alive asked for: the server closes it after its answer.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(GUARD, kept.read_to_end(&mut raw))
        .await
        .expect("closed after one answer, not kept idle")
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));

    // Every scrape gets through while the others are held (well within their 5 s).
    let start = std::time::Instant::now();
    for i in 0..28 {
        let (status, _, body) = http_get(addr, "/metrics").await;
        assert!(status.contains(" 200 "), "scrape {i}: {status}");
        assert!(
            body.contains("portcullis_authenticating_connections"),
            "scrape {i}"
        );
    }
    println!(
        "28 scrapes past 24 held connections in {:?}",
        start.elapsed()
    );
    drop(held);
}

/// A sink that fails while `failing` is set, as a file on a full disk does.
struct FlakySink {
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl portcullis::server::AuditSink for FlakySink {
    fn record(&self, _record: &AuditRecord) {}

    fn healthy(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_audit_required_a_failing_sink_refuses_new_connections_until_it_works_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let failing = Arc::new(AtomicBool::new(false));
    let sink = Arc::new(FlakySink {
        failing: failing.clone(),
    });
    let (seen, collect) = collector();
    let (server, portcullis) = start_configured(move |b| {
        b.audit_sink(sink)
            .audit_sink(collect)
            .audit_required(true)
            .rate_limit(None)
    })
    .await;
    let users: Vec<_> = (0..3)
        .map(|i| server.enroll(&format!("u{i}"), &format!("d{i}")))
        .collect();
    let attempt = |u: &Enrolled| {
        let config = server.tls_config(&u.device, &[ALPN_PCS1]);
        let user = u.user.clone();
        let totp = u.totp.clone();
        let addr = server.addr;
        async move {
            let mut tls = tls_with(addr, config).await.unwrap();
            let p = prefix(&tls, &user, Factor::Totp(current_code(&totp)));
            tls.write_all(&p.encode().unwrap()).await.unwrap();
            try_read_verdict(&mut tls).await.expect("a Verdict")
        }
    };
    assert_eq!(attempt(&users[0]).await.status, 0);
    failing.store(true, Ordering::SeqCst);
    // The first record after the failure is not kept: counted; from then on, refused.
    let _ = attempt(&users[1]).await;
    let refused = attempt(&users[1]).await;
    assert_eq!(
        refused.reject_code(),
        Some(portcullis::core::RejectCode::Overloaded)
    );
    assert!(
        refused.reason.as_deref().unwrap().contains("audit trail"),
        "{refused:?}"
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|r| r.cause == Some("audit_unavailable")),
        "the refusal is recorded where it can be"
    );
    let failures = samples(&portcullis.metrics_text())["portcullis_audit_write_failures_total"];
    assert!(failures >= 1.0, "{failures}");
    failing.store(false, Ordering::SeqCst);
    assert_eq!(attempt(&users[2]).await.status, 0, "let in again");
    server.stop().await;
}
