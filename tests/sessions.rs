//! Server-side session records over real loopback TCP and TLS, on a SQLite registry: a TOTP
//! accept records the session its ticket names, the ticket works while the record is live, and
//! revoking the record through a second registry handle on the same file (as
//! `portcullis session revoke` does from another process) refuses the ticket with MFA_REQUIRED.

mod common;

use std::sync::Arc;

use common::*;
use portcullis::core::codec::{ALPN_PCS1, Factor};
use portcullis::core::{Admin, Clock, RejectCode, SessionStore, SystemClock};
use portcullis::store::SqliteRegistry;

#[tokio::test]
async fn a_revoked_session_record_refuses_its_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = Arc::new(SqliteRegistry::create(&path).unwrap());
    let server = TestServer::start_with(Options::default(), registry).await;
    let alice = server.enroll("alice", "laptop");
    let phone = server.enroll("alice", "phone");
    // The command line's handle on the same file.
    let cli = SqliteRegistry::open(&path).unwrap();
    assert!(cli.list_sessions(SystemClock.now_ms()).unwrap().is_empty());

    // A code earns a ticket, and the registry records its session.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Totp(current_code(&alice.totp)));
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    let (ticket, expires_ms) = verdict.session.expect("a session ticket");
    // Accepted connections stay open until dropped, and the server waits for them to stop.
    drop(tls);
    let now = SystemClock.now_ms();
    let sessions = cli.list_sessions(now).unwrap();
    assert_eq!(sessions.len(), 1);
    let record = sessions[0].clone();
    assert_eq!(record.user, "alice");
    assert_eq!(record.fingerprint, alice.fingerprint);
    assert_eq!(record.expires_ms, expires_ms);
    assert_eq!(record.revoked_ms, None);
    assert_eq!(
        cli.live_session_for_device(&alice.fingerprint, now)
            .unwrap(),
        Some(record.clone())
    );
    assert_eq!(
        cli.live_session_for_device(&phone.fingerprint, now)
            .unwrap(),
        None
    );

    // The ticket works on a new connection, and records nothing new.
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Session(ticket.clone()));
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    drop(tls);
    assert_eq!(cli.list_sessions(SystemClock.now_ms()).unwrap().len(), 1);

    // Revoked through the other handle: MFA_REQUIRED on the next connection.
    let revoked = cli
        .revoke_session(&record.id, SystemClock.now_ms())
        .unwrap();
    assert!(revoked.revoked_ms.is_some());
    let mut tls = server.raw_tls(&alice.device, &[ALPN_PCS1]).await;
    let p = prefix(&tls, "alice", Factor::Session(ticket));
    let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
    assert_eq!(verdict.reject_code(), Some(RejectCode::MfaRequired));
    assert!(verdict.session.is_none());
    assert_eq!(
        cli.live_session_for_device(&alice.fingerprint, SystemClock.now_ms())
            .unwrap(),
        None
    );
    server.stop().await;
}

#[tokio::test]
async fn revoking_the_device_revokes_its_session_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = Arc::new(SqliteRegistry::create(&path).unwrap());
    let server = TestServer::start_with(Options::default(), registry).await;
    let alice = server.enroll("alice", "laptop");
    let bob = server.enroll("bob", "desk");
    for who in [&alice, &bob] {
        let mut tls = server.raw_tls(&who.device, &[ALPN_PCS1]).await;
        let p = prefix(&tls, &who.user, Factor::Totp(current_code(&who.totp)));
        let verdict = send_raw(&mut tls, &p.encode().unwrap()).await;
        assert_eq!(verdict.status, 0, "{:?}", verdict.reason);
    }
    let cli = SqliteRegistry::open(&path).unwrap();
    cli.revoke_device("laptop", SystemClock.now_ms()).unwrap();
    let now = SystemClock.now_ms();
    let sessions = cli.list_sessions(now).unwrap();
    assert_eq!(sessions.len(), 2);
    for s in &sessions {
        assert_eq!(s.revoked_ms.is_some(), s.user == "alice", "{s:?}");
    }
    assert_eq!(
        cli.live_session_for_device(&alice.fingerprint, now)
            .unwrap(),
        None
    );
    assert_eq!(
        cli.live_session_for_device(&bob.fingerprint, now)
            .unwrap()
            .map(|s| s.user),
        Some("bob".to_owned())
    );
    server.stop().await;
}
