//! Device certificates over time, over real loopback TCP and TLS: a resumed TLS session (which
//! rustls does not verify again) of a certificate that expired since is refused; a live
//! connection is closed when its certificate's notAfter passes; every live connection the
//! server closes leaves an `ended` audit record and counts in the metrics.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use portcullis::client::CodeSource;
use portcullis::core::codec::{ALPN_PCS1, Factor};
use portcullis::core::{Clock, MemoryRegistry, RejectCode, SystemClock};
use portcullis::demo::{EchoClient, SayRequest};
use portcullis::server::AuditOutcome;
use portcullis::tls::devpki::{CertProfile, DevCa, Issued};
use portcullis::tls::rustls::HandshakeKind;
use tokio::io::AsyncWriteExt;

/// A generous bound on waits that should end long before it.
const GUARD: Duration = Duration::from_secs(30);

async fn until<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(start.elapsed() < GUARD, "{what}: not after {GUARD:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device certificate of `server`'s CA valid until `secs` from now, bound to a new user
/// `user`; the certificate and the user's TOTP configuration.
fn short_lived(
    server: &TestServer,
    user: &str,
    device: &str,
    secs: i64,
) -> (Issued, portcullis::core::TotpConfig) {
    let totp = server.add_user(user);
    let mut profile = CertProfile::device(device);
    let now = i64::try_from(SystemClock.now_ms() / 1000).unwrap();
    profile.not_after_unix = now + secs;
    let issued = server.ca.issue(&profile).unwrap();
    let fingerprint = portcullis::tls::fingerprint(issued.cert_der().as_ref()).unwrap();
    server
        .registry
        .bind_device(device, user, &fingerprint, SystemClock.now_ms())
        .unwrap();
    (issued, totp)
}

/// Sleeps until the certificate valid through second `not_after` is past, by the system clock.
async fn sleep_past(not_after_unix: i64) {
    let expires_ms = u64::try_from(not_after_unix + 1).unwrap() * 1000;
    let now = SystemClock.now_ms();
    tokio::time::sleep(Duration::from_millis(expires_ms.saturating_sub(now) + 100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_tls_session_of_a_certificate_that_expired_since_is_refused() {
    let (server, _) = start_configured(|b| b).await;
    let (device, totp) = short_lived(&server, "alice", "laptop", 2);
    let not_after = portcullis::tls::LeafFacts::from_der(device.cert_der().as_ref())
        .unwrap()
        .not_after_unix;
    // One client configuration for both connections: rustls resumes its TLS session.
    let config = server.tls_config(&device, &[ALPN_PCS1]);
    let mut first = tls_with(server.addr, config.clone()).await.unwrap();
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    let p = prefix(&first, "alice", Factor::Totp(current_code(&totp)));
    let verdict = send_raw(&mut first, &p.encode().unwrap()).await;
    assert_eq!(verdict.status, 0, "{verdict:?}");
    let (ticket, _) = verdict.session.unwrap();
    drop(first);

    sleep_past(not_after).await;
    let mut resumed = tls_with(server.addr, config.clone()).await.unwrap();
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "rustls restores the session without verifying the certificate again"
    );
    let p = prefix(&resumed, "alice", Factor::Session(ticket));
    let _ = resumed.write_all(&p.encode().unwrap()).await;
    let verdict = try_read_verdict(&mut resumed).await.expect("a Verdict");
    assert_eq!(verdict.reject_code(), Some(RejectCode::DeviceRevoked));
    let reason = verdict.reason.unwrap();
    assert!(reason.contains("validity period"), "{reason}");

    // A full handshake with the expired certificate fails in TLS.
    let fresh = server.tls_config(&device, &[ALPN_PCS1]);
    if let Ok(mut tls) = tls_with(server.addr, fresh).await {
        assert!(try_read_verdict(&mut tls).await.is_none());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_closed_by_the_server_are_audited_and_counted() {
    let (seen, sink) = collector();
    let ca = DevCa::generate("test CA").unwrap();
    let (server, portcullis) = start_custom(ca, Arc::new(MemoryRegistry::new()), move |b| {
        b.audit_sink(sink)
    })
    .await;
    let (device, totp) = short_lived(&server, "alice", "laptop", 3);
    let not_after = portcullis::tls::LeafFacts::from_der(device.cert_der().as_ref())
        .unwrap()
        .not_after_unix;
    let client = server.client_as(&device, "alice", CodeSource::secret(totp));
    let channel = client.connect(&server.addr_str()).await.unwrap();
    let mut echo = EchoClient::new(channel);
    let say = SayRequest {
        text: "hello".into(),
    };
    echo.say(say.clone()).await.unwrap();
    let accepted = until("the accept record", || {
        seen.lock()
            .unwrap()
            .iter()
            .find(|r| r.outcome == AuditOutcome::Accepted)
            .cloned()
    })
    .await;

    // A second user's connection, closed by a revocation.
    let bob = server.enroll("bob", "desk");
    let bob_client = server.secret_client(&bob);
    let mut bob_echo = EchoClient::new(bob_client.connect(&server.addr_str()).await.unwrap());
    bob_echo.say(say.clone()).await.unwrap();
    server
        .registry
        .revoke_device("desk", SystemClock.now_ms())
        .unwrap();

    sleep_past(not_after).await;
    let ended = until("two ended records", || {
        let got: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.outcome == AuditOutcome::Ended)
            .cloned()
            .collect();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let expired = ended
        .iter()
        .find(|r| r.cause == Some("cert_expired"))
        .unwrap_or_else(|| panic!("{ended:#?}"));
    assert_eq!(
        expired.reference, accepted.reference,
        "the connection's REF"
    );
    assert_eq!(expired.user.as_deref(), Some("alice"));
    assert_eq!(expired.device.as_deref(), Some("laptop"));
    assert!(
        expired.accept_us >= 1_000_000,
        "its age: {}",
        expired.accept_us
    );
    let revoked = ended
        .iter()
        .find(|r| r.cause == Some("device_revoked"))
        .unwrap_or_else(|| panic!("{ended:#?}"));
    assert_eq!(revoked.user.as_deref(), Some("bob"));
    let json: serde_json::Value = serde_json::from_str(&expired.to_json()).unwrap();
    assert_eq!(json["outcome"], "ended");
    assert_eq!(json["cause"], "cert_expired");

    // The expired connection's next call fails: it was closed.
    assert!(echo.say(say).await.is_err());
    let metrics = portcullis.metrics_text();
    for line in [
        r#"portcullis_live_connections_closed_total{cause="cert_expired"} 1"#,
        r#"portcullis_live_connections_closed_total{cause="device_revoked"} 1"#,
    ] {
        assert!(metrics.contains(line), "`{line}` not in\n{metrics}");
    }
    // Closures are not connection attempts.
    assert!(!metrics.contains(r#"outcome="ended""#), "{metrics}");

    // Stopping the server closes the live connections left, each with its record.
    let carol = server.enroll("carol", "phone");
    let carol_client = server.secret_client(&carol);
    let mut carol_echo = EchoClient::new(carol_client.connect(&server.addr_str()).await.unwrap());
    carol_echo
        .say(SayRequest { text: "hi".into() })
        .await
        .unwrap();
    assert_eq!(portcullis.close_connections(), 1);
    until("the server_stopping record", || {
        seen.lock()
            .unwrap()
            .iter()
            .find(|r| r.cause == Some("server_stopping"))
            .cloned()
    })
    .await;
    server.stop().await;
}

/// Writes a CRL of `ca` listing `revoked`, with its nextUpdate `next_update_in` seconds from
/// now (negative: already past).
fn write_crl(path: &std::path::Path, ca: &DevCa, revoked: &[&Issued], next_update_in: i64) {
    let now = i64::try_from(SystemClock.now_ms() / 1000).unwrap();
    let ders: Vec<_> = revoked.iter().map(|i| i.cert_der()).collect();
    let pem = ca.crl_pem_until(&ders, now + next_update_in).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One Prefix with the current code on a new raw connection: the Verdict.
async fn try_code(server: &TestServer, enrolled: &Enrolled) -> portcullis::core::codec::Verdict {
    let mut tls = server.raw_tls(&enrolled.device, &[ALPN_PCS1]).await;
    let p = prefix(
        &tls,
        &enrolled.user,
        Factor::Totp(current_code(&enrolled.totp)),
    );
    let _ = tls.write_all(&p.encode().unwrap()).await;
    try_read_verdict(&mut tls).await.expect("a Verdict")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_past_its_next_update_refuses_new_connections_until_a_current_one_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("clients.crl");
    let ca = DevCa::generate("test CA").unwrap();
    let issuer = same_ca(&ca);
    let spare = issuer.issue_device("spare").unwrap();
    write_crl(&crl, &issuer, &[&spare], -60);
    let (seen, sink) = collector();
    let path = crl.clone();
    let (server, portcullis) = start_custom(ca, Arc::new(MemoryRegistry::new()), move |b| {
        b.crl_file(path).audit_sink(sink)
    })
    .await;
    let alice = server.enroll("alice", "laptop");
    let verdict = try_code(&server, &alice).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::Overloaded));
    let reason = verdict.reason.clone().unwrap();
    assert!(
        reason.contains("revocation list is out of date"),
        "{reason}"
    );
    assert!(verdict.retry_after_s.is_some(), "{verdict:?}");
    let refused = until("the crl_stale record", || {
        seen.lock()
            .unwrap()
            .iter()
            .find(|r| r.cause == Some("crl_stale"))
            .cloned()
    })
    .await;
    assert_eq!(refused.outcome, AuditOutcome::Rejected);
    assert!(portcullis.metrics_text().contains("portcullis_crl_stale 1"));

    // A current list in the file: let in again.
    write_crl(&crl, &issuer, &[&spare], 3600);
    let verifier = portcullis.client_verifier().unwrap().clone();
    until("the CRL reloaded", || {
        (verifier.generation() >= 1).then_some(())
    })
    .await;
    let verdict = try_code(&server, &alice).await;
    assert_eq!(verdict.status, 0, "{verdict:?}");
    assert!(portcullis.metrics_text().contains("portcullis_crl_stale 0"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_crl_stale_warn_an_out_of_date_crl_stays_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("clients.crl");
    let ca = DevCa::generate("test CA").unwrap();
    let issuer = same_ca(&ca);
    let lost = issuer.issue_device("lost").unwrap();
    write_crl(&crl, &issuer, &[&lost], -60);
    let path = crl.clone();
    let (server, portcullis) = start_custom(ca, Arc::new(MemoryRegistry::new()), move |b| {
        b.crl_file(path)
            .crl_stale(portcullis::server::revocation::CrlStale::Warn)
    })
    .await;
    let alice = server.enroll("alice", "laptop");
    let verdict = try_code(&server, &alice).await;
    assert_eq!(verdict.status, 0, "{verdict:?}");
    assert!(portcullis.metrics_text().contains("portcullis_crl_stale 1"));
    // What it lists is still refused (in the TLS handshake).
    let config = server.tls_config(&lost, &[ALPN_PCS1]);
    if let Ok(mut tls) = tls_with(server.addr, config).await {
        assert!(try_read_verdict(&mut tls).await.is_none());
    }
    server.stop().await;
}
