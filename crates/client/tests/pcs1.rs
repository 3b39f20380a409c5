//! Whole connections over loopback TCP against a test PCS1 server: pipelined Prefix, channel
//! binding, rejections as `tonic::Status`, session tickets and the invisible MFA_REQUIRED
//! fallback.

mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Answer, Pki, TestServer, now_ms};
use portcullis_client::{
    Client, ClientError, CodeSource, DEFAULT_AGENT, FIX_METADATA, REF_METADATA, REJECT_METADATA,
    RETRY_AFTER_METADATA,
};
use portcullis_core::codec::Factor;
use portcullis_core::{ManualClock, RejectCode, TotpAlgorithm};
use support::{check, client, client_builder, counting_client, counting_codes, start, totp};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Every test runs under this bound, so that a deadlock fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// Codes of the RFC 6238 Appendix B secret: SHA1 seed "12345678901234567890", 8 digits.
fn rfc6238_codes() -> CodeSource {
    CodeSource::base32(
        "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
        8,
        TotpAlgorithm::Sha1,
        30,
    )
    .unwrap()
}

#[tokio::test]
async fn an_accepted_call_carries_a_correct_pipelined_prefix() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let client = client(&pki, CodeSource::fixed("123456"));
        let channel = client.connect_lazy(&server.addr()).unwrap();
        let before = now_ms();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        let after = now_ms();

        let seen = server.state.seen();
        assert_eq!(seen.len(), 1);
        let s = &seen[0];
        assert_eq!(s.prefix.user, "alice");
        assert_eq!(totp(&s.prefix.factor), Some("123456"));
        assert_eq!(
            s.prefix.binding, s.exporter,
            "BINDING is this connection's exporter"
        );
        assert!(
            (before..=after).contains(&s.prefix.time_ms),
            "TIME {} is the client clock at the connection ({before}..={after})",
            s.prefix.time_ms
        );
        assert_ne!(s.prefix.nonce, [0u8; 16]);
        assert_eq!(s.prefix.agent.as_deref(), Some(DEFAULT_AGENT));
        assert!(
            s.preface_before_verdict,
            "the HTTP/2 preface follows the Prefix before the Verdict"
        );

        // The accepting Verdict's ticket is cached, and only its expiry is visible.
        let (ticket, expires) = s.verdict.session.clone().unwrap();
        let session = client.session().unwrap();
        assert_eq!(session.expires_ms, expires);
        assert_eq!(session.server, server.addr());
        let verdict = client.last_verdict().unwrap();
        assert!(verdict.is_accepted());
        assert_eq!(verdict.reference, hex::encode(s.verdict.reference));
        let ticket_text = String::from_utf8(ticket).unwrap();
        for text in [
            format!("{client:?}"),
            format!("{session:?}"),
            format!("{verdict:?}"),
            format!("{channel:?}"),
        ] {
            assert!(!text.contains(&ticket_text), "{text}");
            assert!(!text.contains("123456"), "{text}");
        }

        // Another call reuses the connection: no new Prefix.
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        assert_eq!(server.state.seen().len(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_and_the_http2_preface_leave_in_one_tls_record() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, calls) = counting_client(&pki);

        // A lazy channel's connection with a code, an eager one with the ticket it earned,
        // and a ticket refused (MFA_REQUIRED) whose replacement connection replays hyper's
        // bytes behind a Prefix with a code.
        let lazy = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&lazy).await.unwrap(), ServingStatus::Serving);
        let eager = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&eager).await.unwrap(), ServingStatus::Serving);
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let fallback = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&fallback).await.unwrap(), ServingStatus::Serving);

        let seen = server.state.seen();
        assert_eq!(seen.len(), 4);
        assert_eq!(totp(&seen[0].prefix.factor), Some("100001"));
        assert!(matches!(seen[1].prefix.factor, Factor::Session(_)));
        assert!(matches!(seen[2].prefix.factor, Factor::Session(_)));
        assert_eq!(seen[2].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_eq!(totp(&seen[3].prefix.factor), Some("100002"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        for (i, s) in seen.iter().enumerate() {
            // rustls decrypts each record into a chunk of its own: the server's first read of
            // application data holds the Prefix and the preface only if both were sealed in
            // one record, that is, written by the client in one go.
            assert!(
                s.preface_in_prefix_record,
                "connection {i}: the first TLS record holds the Prefix and the HTTP/2 preface"
            );
            assert!(s.preface_before_verdict, "connection {i}");
            assert_eq!(s.prefix.binding, s.exporter, "connection {i}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn later_connections_use_the_session_ticket_and_fresh_nonces() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, calls) = counting_client(&pki);

        let mut channels = Vec::new();
        for _ in 0..3 {
            let channel = client.connect(&server.addr()).await.unwrap();
            assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
            channels.push(channel);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "only the first connection asks for a code"
        );

        let seen = server.state.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(totp(&seen[0].prefix.factor), Some("100001"));
        let (ticket, _) = seen[0].verdict.session.clone().unwrap();
        for s in &seen[1..] {
            assert_eq!(s.prefix.factor, Factor::Session(ticket.clone()));
            assert_eq!(s.prefix.binding, s.exporter);
            assert!(s.preface_before_verdict);
        }
        let nonces: std::collections::HashSet<_> = seen.iter().map(|s| s.prefix.nonce).collect();
        assert_eq!(nonces.len(), 3, "a new NONCE for every connection");
        let bindings: std::collections::HashSet<_> =
            seen.iter().map(|s| s.prefix.binding).collect();
        assert_eq!(bindings.len(), 3, "each connection has its own exporter");

        // Without the ticket the next connection asks for a code again.
        client.forget_session();
        assert!(client.session().is_none());
        let channel = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(totp(&server.state.seen()[3].prefix.factor), Some("100002"));
    })
    .await
    .unwrap();
}

/// The client's fix for `mfa_failed`, added to a REASON that lacks it.
const MFA_FAILED_FIX: &str = "enter the current code of this user's authenticator (a code is \
     accepted once; wait for the next one); if every code fails, check the authenticator's clock";

fn assert_rejected(
    status: &tonic::Status,
    code: RejectCode,
    grpc: Code,
    retry: Option<u32>,
    reference: [u8; 16],
) {
    assert_eq!(status.code(), grpc, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{}: ", code.name())),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get(REJECT_METADATA).unwrap(), code.name());
    assert_eq!(
        status.metadata().get(REF_METADATA).unwrap(),
        hex::encode(reference).as_str()
    );
    match retry {
        Some(secs) => assert_eq!(
            status.metadata().get(RETRY_AFTER_METADATA).unwrap(),
            secs.to_string().as_str()
        ),
        None => assert!(status.metadata().get(RETRY_AFTER_METADATA).is_none()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_surface_as_statuses_with_code_reason_and_metadata() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let cases = [
            (
                RejectCode::MfaFailed,
                "the one-time code was not accepted",
                None,
                Code::Unauthenticated,
            ),
            (
                RejectCode::Overloaded,
                "too many connections",
                Some(3),
                Code::Unavailable,
            ),
            (
                RejectCode::RateLimited,
                "slow down",
                Some(7),
                Code::ResourceExhausted,
            ),
            (
                RejectCode::PolicyDenied,
                "not at this hour",
                None,
                Code::PermissionDenied,
            ),
            (
                RejectCode::LockedOut,
                "too many failed codes",
                Some(60),
                Code::Unauthenticated,
            ),
        ];
        for (i, (code, hint, retry, grpc)) in cases.into_iter().enumerate() {
            server.state.plan([Answer::Reject(code, hint, retry)]);
            let (client, _) = counting_client(&pki);
            let channel = client.connect_lazy(&server.addr()).unwrap();
            let status = check(&channel).await.unwrap_err();
            let seen = &server.state.seen()[i];
            assert_rejected(&status, code, grpc, retry, seen.verdict.reference);
            // The server's REASON, then the client's fix (none of these hints states it).
            let fix = status
                .metadata()
                .get(FIX_METADATA)
                .unwrap()
                .to_str()
                .unwrap();
            assert_eq!(status.message(), format!("{}: {hint}; {fix}", code.name()));
            assert!(seen.preface_before_verdict);

            let verdict = client.last_verdict().unwrap();
            assert_eq!(verdict.reject, Some(code));
            let reason = verdict.reason.as_deref().unwrap();
            assert_eq!(reason, format!("{}: {hint}", code.name()));
            assert!(status.message().starts_with(reason), "{}", status.message());
            assert_eq!(
                verdict.retry_after,
                retry.map(|s| Duration::from_secs(u64::from(s)))
            );
            assert!(client.session().is_none());
        }

        // An eager connect reports the same status as an error.
        server.state.plan([Answer::Reject(
            RejectCode::MfaFailed,
            "the one-time code was not accepted",
            None,
        )]);
        let (codes, _) = counting_codes();
        let err = client(&pki, codes)
            .connect(&server.addr())
            .await
            .unwrap_err();
        let seen = server.state.seen();
        assert_eq!(seen.len(), 6, "one connection, not retried by the channel");
        let reference = seen[5].verdict.reference;
        match &err {
            ClientError::Rejected(status) => {
                assert_rejected(
                    status,
                    RejectCode::MfaFailed,
                    Code::Unauthenticated,
                    None,
                    reference,
                );
                assert_eq!(
                    status.message(),
                    format!("mfa_failed: the one-time code was not accepted; {MFA_FAILED_FIX}")
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "the server rejected the connection: mfa_failed: the one-time code was not \
                 accepted; {MFA_FAILED_FIX}"
            )
        );
    })
    .await
    .unwrap();
}

// On the current-thread runtime hyper has closed a refused connection before the caller
// sees the error, so the next call always opens a new connection. (On a multi-threaded
// runtime the next call may still reach the dying connection; it then fails with that
// connection's rejection, which is also correct, but the server's script would not line up.)
#[tokio::test(flavor = "current_thread")]
async fn a_rejection_is_not_reported_for_a_later_connection() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        server.state.plan([
            Answer::Reject(
                RejectCode::MfaFailed,
                "the one-time code was not accepted",
                None,
            ),
            Answer::AcceptThenDrop,
            Answer::Normal,
        ]);
        let (client, _) = counting_client(&pki);
        let channel = client.connect_lazy(&server.addr()).unwrap();

        let first = check(&channel).await.unwrap_err();
        assert_eq!(first.code(), Code::Unauthenticated);
        assert_eq!(first.metadata().get(REJECT_METADATA).unwrap(), "mfa_failed");

        // The channel reconnects; this connection is accepted, then the server drops it. The
        // failure is not the earlier rejection.
        let second = check(&channel).await.unwrap_err();
        assert!(
            second.metadata().get(REJECT_METADATA).is_none(),
            "{second:?}"
        );
        assert!(!second.message().starts_with("mfa_failed"), "{second:?}");

        // And the next connection works (with the ticket the accepted one earned).
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        let seen = server.state.seen();
        assert_eq!(seen.len(), 3);
        assert!(matches!(seen[2].prefix.factor, Factor::Session(_)));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ticket_falls_back_to_a_code_without_the_caller_noticing() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, calls) = counting_client(&pki);
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
        let old_ticket = server.state.seen()[0].verdict.session.clone().unwrap().0;

        // The server refuses the next ticket once (MFA_REQUIRED).
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let lazy = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&lazy).await.unwrap(), ServingStatus::Serving);

        let seen = server.state.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[1].prefix.factor, Factor::Session(old_ticket.clone()));
        assert_eq!(seen[1].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_eq!(totp(&seen[2].prefix.factor), Some("100002"));
        assert!(seen[2].verdict.is_accepted());
        assert!(
            seen[2].preface_before_verdict,
            "the saved HTTP/2 bytes were replayed"
        );
        assert_ne!(seen[1].prefix.nonce, seen[2].prefix.nonce);
        assert_eq!(seen[2].prefix.binding, seen[2].exporter);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The new ticket replaced the refused one.
        let (new_ticket, new_expiry) = seen[2].verdict.session.clone().unwrap();
        assert_ne!(new_ticket, old_ticket);
        assert_eq!(client.session().unwrap().expires_ms, new_expiry);
        assert!(client.last_verdict().unwrap().is_accepted());

        // The same through an eager connect: it succeeds.
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let eager = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&eager).await.unwrap(), ServingStatus::Serving);
        let seen = server.state.seen();
        assert_eq!(seen.len(), 5);
        assert_eq!(seen[3].prefix.factor, Factor::Session(new_ticket));
        assert_eq!(seen[3].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_eq!(totp(&seen[4].prefix.factor), Some("100003"));

        // A ticket the server refuses when the code is wrong too: the caller sees mfa_failed.
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        server.state.plan([
            Answer::Normal,
            Answer::Reject(
                RejectCode::MfaFailed,
                "the one-time code was not accepted",
                None,
            ),
        ]);
        let failing = client.connect_lazy(&server.addr()).unwrap();
        let status = check(&failing).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(
            status.metadata().get(REJECT_METADATA).unwrap(),
            "mfa_failed"
        );
        assert!(client.session().is_none(), "the refused ticket was dropped");
        // Still usable: old channels keep their accepted connections.
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_replay_bound_work_with_and_without_fallback() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, calls) = counting_client(&pki);
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);

        // 200 KiB request: more than the 64 KiB a ticket-carrying connection keeps while it
        // waits for its Verdict. The health service answers NOT_FOUND for an unknown service,
        // which proves the whole request arrived intact.
        let big = HealthCheckRequest {
            service: "s".repeat(200 * 1024),
        };
        for refuse in [0, 1] {
            server.state.refuse_tickets.store(refuse, Ordering::SeqCst);
            let channel = client.connect_lazy(&server.addr()).unwrap();
            let status = HealthClient::new(channel.clone())
                .check(big.clone())
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert!(status.metadata().get(REJECT_METADATA).is_none());
            assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        }
        let seen = server.state.seen();
        assert_eq!(seen.len(), 4);
        assert!(
            matches!(seen[1].prefix.factor, Factor::Session(_)) && seen[1].verdict.is_accepted()
        );
        assert_eq!(seen[2].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_eq!(totp(&seen[3].prefix.factor), Some("100002"));
        assert!(seen[3].verdict.is_accepted() && seen[3].preface_before_verdict);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn secret_codes_follow_the_client_clock() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        // RFC 6238 Appendix B, T = 1111111109 s.
        let clock = Arc::new(ManualClock::new(1_111_111_109_000));
        let client = client_builder(pki.client_config(), rfc6238_codes())
            .clock(clock.clone())
            .agent("test-agent/1")
            .build()
            .unwrap();
        let channel = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        // Next step: 1111111111 s gives 14050471; a new connection needs a code (no ticket).
        client.forget_session();
        clock.set_ms(1_111_111_111_000);
        let channel = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);

        let seen = server.state.seen();
        assert_eq!(totp(&seen[0].prefix.factor), Some("07081804"));
        assert_eq!(
            seen[0].prefix.time_ms, 1_111_111_109_000,
            "TIME is the client clock"
        );
        assert_eq!(totp(&seen[1].prefix.factor), Some("14050471"));
        assert_eq!(seen[1].prefix.time_ms, 1_111_111_111_000);
        assert_eq!(seen[0].prefix.agent.as_deref(), Some("test-agent/1"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_unavailable_and_say_tls() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;

        // No client certificate: TLS 1.3 finishes on the client, the server's alert arrives on
        // the first read.
        let (codes, calls) = counting_codes();
        let no_cert = client_builder(pki.client_config_without_cert(), codes)
            .build()
            .unwrap();
        let status = check(&no_cert.connect_lazy(&server.addr()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().starts_with("tls: "), "{status:?}");
        assert!(
            status.message().contains("client certificate"),
            "{status:?}"
        );
        // The channel does not dial again by itself for the same call (which would ask for
        // another code).
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        match no_cert.connect(&server.addr()).await.unwrap_err() {
            ClientError::Tls(msg) => assert!(msg.contains("client certificate"), "{msg}"),
            other => panic!("expected a TLS error, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A server certificate from an unknown CA: the handshake itself fails.
        let other_pki = Pki::new();
        let stranger = client(&other_pki, CodeSource::fixed("123456"));
        let status = check(&stranger.connect_lazy(&server.addr()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().starts_with("tls: "), "{status:?}");
        assert!(status.message().contains("UnknownIssuer"), "{status:?}");
        assert!(matches!(
            stranger.connect(&server.addr()).await.unwrap_err(),
            ClientError::Tls(_)
        ));
        assert!(server.state.seen().is_empty(), "no Prefix was ever read");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn nothing_listening_is_unavailable() {
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let client = client(&pki, CodeSource::fixed("123456"));
    let status = check(&client.connect_lazy(&addr).unwrap())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("connect: "), "{status:?}");
    assert!(matches!(
        client.connect(&addr).await.unwrap_err(),
        ClientError::Connect(_)
    ));
}

#[test]
fn the_builder_checks_its_settings() {
    let pki = Pki::new();
    let config = |b: portcullis_client::ClientBuilder| match b.build() {
        Err(ClientError::Config(msg)) => msg,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert!(
        config(
            Client::builder()
                .user("a")
                .code_source(CodeSource::fixed("123456"))
        )
        .contains("TLS")
    );
    assert!(
        config(
            Client::builder()
                .tls_config(pki.client_config())
                .code_source(CodeSource::fixed("123456"))
        )
        .contains("user")
    );
    assert!(
        config(Client::builder().tls_config(pki.client_config()).user("a")).contains("code source")
    );
    assert!(
        config(
            Client::builder()
                .tls_config(pki.client_config())
                .user("a")
                .code_source(CodeSource::fixed("12345"))
        )
        .contains("6 to 8")
    );
    let mut h2 = (*pki.client_config()).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    assert!(
        config(
            Client::builder()
                .tls_config(Arc::new(h2))
                .user("a")
                .code_source(CodeSource::fixed("123456"))
        )
        .contains("ALPN")
    );
    assert!(
        config(
            Client::builder()
                .tls_config(pki.client_config())
                .user("a")
                .agent("x".repeat(65))
                .code_source(CodeSource::fixed("123456"))
        )
        .contains("agent")
    );

    let builder = Client::builder()
        .tls_config(pki.client_config())
        .user("alice")
        .code_source(CodeSource::fixed("654321"));
    assert!(!format!("{builder:?}").contains("654321"));
    let client = builder.build().unwrap();
    assert!(!format!("{client:?}").contains("654321"));
    // connect_lazy needs a runtime; a bad address is a config error.
    assert!(matches!(
        client.connect_lazy("localhost:1"),
        Err(ClientError::Config(_))
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(matches!(
            client.connect_lazy("no-port"),
            Err(ClientError::Config(_))
        ));
        assert!(client.connect_lazy("localhost:1").is_ok());
    });
}

/// Bounds a call that must end by itself, so that a hang fails the test instead of stalling it.
const BOUNDED: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_gives_a_verdict_times_out() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        server.state.plan([Answer::Silent]);
        let (codes, calls) = counting_codes();
        let client = client_builder(pki.client_config(), codes)
            .connect_timeout(Duration::from_millis(300))
            .build()
            .unwrap();

        // TCP, TLS and the Prefix go through; the Verdict never comes.
        let channel = client.connect_lazy(&server.addr()).unwrap();
        let status = tokio::time::timeout(BOUNDED, check(&channel))
            .await
            .expect("the wait for the Verdict is bounded by the connect timeout")
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "timeout: no Verdict from the server within 0.3 s"
        );
        assert!(status.metadata().get(REJECT_METADATA).is_none());
        assert_eq!(server.state.unanswered.load(Ordering::SeqCst), 1);
        assert!(server.state.seen().is_empty());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not dialed again");
        assert!(client.session().is_none());

        // An eager connect reports it as a timeout too.
        server.state.plan([Answer::Silent]);
        let err = tokio::time::timeout(BOUNDED, client.connect(&server.addr()))
            .await
            .expect("the eager connect is bounded")
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout(d) if d == Duration::from_millis(300)),
            "{err:?}"
        );

        // The next connection, answered, works.
        let channel = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ticket_does_not_resend_the_code_already_accepted() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let client = client(&pki, CodeSource::fixed("123456"));
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
        assert!(client.session().is_some());

        // The ticket is refused; the fixed code is the one the server accepted already.
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let lazy = client.connect_lazy(&server.addr()).unwrap();
        let status = check(&lazy).await.unwrap_err();
        let seen = server.state.seen();
        assert_eq!(seen.len(), 2, "no further Prefix: {:?}", seen.get(2));
        assert!(matches!(seen[1].prefix.factor, Factor::Session(_)));
        assert_eq!(seen[1].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_rejected(
            &status,
            RejectCode::MfaRequired,
            Code::Unauthenticated,
            None,
            seen[1].verdict.reference,
        );
        // The server's REASON, then the client's fix (the REASON's words are not one of its
        // phrases).
        assert_eq!(
            status.message(),
            "mfa_required: the session is no longer valid: enter a code; connect with a \
             one-time code (portcullis login) to start a new session"
        );
        assert!(client.session().is_none(), "the refused ticket was dropped");
        assert_eq!(
            client.last_verdict().unwrap().reject,
            Some(RejectCode::MfaRequired)
        );
        // The accepted connection is still in use.
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_session_does_not_resend_the_code_already_accepted() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let client = client(&pki, CodeSource::fixed("123456"));
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
        assert!(client.session().is_some());

        // Without its ticket the client would have to send the fixed code again, which the
        // server accepted already: it fails here instead, and no Prefix goes out.
        client.forget_session();
        let status = check(&client.connect_lazy(&server.addr()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().starts_with("code: ")
                && status.message().contains("already accepted")
                && status.message().contains("give the next code"),
            "{status:?}"
        );
        assert!(!status.message().contains("123456"));
        assert_eq!(server.state.seen().len(), 1, "no second Prefix");

        // Another server (another address) never saw the code: it goes out there.
        let other = TestServer::start(&pki).await;
        let channel = client.connect(&other.addr()).await.unwrap();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        assert_eq!(totp(&other.state.seen()[0].prefix.factor), Some("123456"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_source_waits_for_the_next_time_step_after_a_refused_ticket() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        // RFC 6238 Appendix B.
        let clock = Arc::new(ManualClock::new(1_111_111_109_000));
        let codes = rfc6238_codes();
        let client = client_builder(pki.client_config(), codes.clone())
            .clock(clock.clone())
            .build()
            .unwrap();
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);
        assert_eq!(
            totp(&server.state.seen()[0].prefix.factor),
            Some("07081804")
        );

        // Same time step: the secret gives the accepted code again, which is not sent.
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let status = check(&client.connect_lazy(&server.addr()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(
            status.metadata().get(REJECT_METADATA).unwrap(),
            "mfa_required"
        );
        assert_eq!(server.state.seen().len(), 2);

        // The next time step gives a new code, which earns a new ticket.
        clock.set_ms(1_111_111_111_000);
        let second = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&second).await.unwrap(), ServingStatus::Serving);
        assert_eq!(
            totp(&server.state.seen()[2].prefix.factor),
            Some("14050471")
        );

        // A ticket refused in a later step falls back to that step's code, unnoticed.
        clock.set_ms(1_111_111_141_000);
        let later = codes.code_at(1_111_111_141_000).unwrap();
        assert_ne!(later.as_str(), "14050471");
        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let third = client.connect_lazy(&server.addr()).unwrap();
        assert_eq!(check(&third).await.unwrap(), ServingStatus::Serving);
        let seen = server.state.seen();
        assert_eq!(seen.len(), 5);
        assert!(matches!(seen[3].prefix.factor, Factor::Session(_)));
        assert_eq!(seen[3].verdict.reject_code(), Some(RejectCode::MfaRequired));
        assert_eq!(totp(&seen[4].prefix.factor), Some(later.as_str()));
        assert!(seen[4].verdict.is_accepted());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_after_a_refused_ticket_is_bounded_too() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        // The second code (the one for the replacement connection) does not come until the
        // test lets it.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Mutex::new(wait);
        let calls = Arc::new(AtomicUsize::new(0));
        let asked = calls.clone();
        let codes = CodeSource::callback(move || {
            let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                let _ = wait.lock().unwrap().recv();
            }
            Ok(format!("{:06}", 100_000 + n))
        });
        let client = client_builder(pki.client_config(), codes)
            .connect_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let first = client.connect(&server.addr()).await.unwrap();
        assert_eq!(check(&first).await.unwrap(), ServingStatus::Serving);

        server.state.refuse_tickets.store(1, Ordering::SeqCst);
        let lazy = client.connect_lazy(&server.addr()).unwrap();
        let status = tokio::time::timeout(BOUNDED, check(&lazy))
            .await
            .expect("reopening the connection is bounded by the connect timeout")
            .unwrap_err();
        release.send(()).unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "connect: could not reopen the connection within 0.3 s"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let seen = server.state.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].verdict.reject_code(), Some(RejectCode::MfaRequired));
    })
    .await
    .unwrap();
}
