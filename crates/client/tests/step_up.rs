//! Step-up over loopback TCP against the test PCS1 server: a call refused with
//! `step_up_required` is sent again on a new connection with a new code, without the caller
//! doing anything; and the cases where it is not.

mod common;
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Pki, TestServer};
use portcullis_client::{CodeSource, MAX_REPLAY_BYTES, REJECT_METADATA};
use support::{check, check_service, client, counting_client, totp};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Every test runs under this bound, so that a deadlock fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(120);

/// A service name the test server reports as serving: a reply for it proves the request
/// reached the server intact (any other name is NOT_FOUND).
const SERVICE: &str = "portcullis.test.Sensitive";

/// A new PKI and a test server on it that reports [`SERVICE`] as serving.
async fn start() -> (Pki, TestServer) {
    let (pki, server) = support::start().await;
    server
        .reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    (pki, server)
}

fn codes_sent(server: &TestServer) -> Vec<Option<String>> {
    server
        .state
        .seen()
        .iter()
        .map(|s| totp(&s.prefix.factor).map(str::to_owned))
        .collect()
}

#[track_caller]
fn assert_step_up(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().starts_with("step_up_required: "),
        "{status:?}"
    );
    assert_eq!(
        status.metadata().get(REJECT_METADATA).unwrap(),
        "step_up_required"
    );
}

#[tokio::test]
async fn a_step_up_is_answered_with_a_new_code_and_the_call_is_sent_again() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, asked) = counting_client(&pki);
        let channel = client.connect_lazy(&server.addr()).unwrap();
        let clone = channel.clone();
        assert_eq!(
            check_service(&channel, SERVICE).await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(client.session().is_some());

        // The server's policy now wants a fresher code for the next call.
        server.state.step_up.store(1, Ordering::SeqCst);
        assert_eq!(
            check_service(&channel, SERVICE).await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(server.state.stepped_up.load(Ordering::SeqCst), 1);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "the code source was asked once more"
        );
        // The second connection carried the new code, not the session ticket.
        assert_eq!(
            codes_sent(&server),
            vec![Some("100001".to_owned()), Some("100002".to_owned())]
        );
        // A new ticket was earned by the new code.
        assert!(client.session().is_some());

        // Later calls, on the channel and on a clone made before, ride the new connection.
        assert_eq!(
            check_service(&clone, SERVICE).await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        assert_eq!(server.state.seen().len(), 2);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_call_is_sent_again_only_once() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, asked) = counting_client(&pki);
        let channel = client.connect(&server.addr()).await.unwrap();
        server.state.step_up.store(2, Ordering::SeqCst);
        let status = check_service(&channel, SERVICE).await.unwrap_err();
        assert_step_up(&status);
        assert_eq!(server.state.stepped_up.load(Ordering::SeqCst), 2);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert_eq!(server.state.seen().len(), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_code_already_accepted_is_not_sent_again() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let client = client(&pki, CodeSource::fixed("123456"));
        let channel = client.connect(&server.addr()).await.unwrap();
        server.state.step_up.store(1, Ordering::SeqCst);
        let status = check_service(&channel, SERVICE).await.unwrap_err();
        assert_step_up(&status);
        assert_eq!(server.state.seen().len(), 1, "no new connection was made");
        assert_eq!(server.state.stepped_up.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_request_over_the_replay_bound_is_not_sent_again() {
    tokio::time::timeout(LIMIT, async {
        let (pki, server) = start().await;
        let (client, asked) = counting_client(&pki);
        let channel = client.connect(&server.addr()).await.unwrap();
        server.state.step_up.store(1, Ordering::SeqCst);
        let big = "x".repeat(MAX_REPLAY_BYTES + 1);
        let status = check_service(&channel, &big).await.unwrap_err();
        assert_step_up(&status);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert_eq!(server.state.seen().len(), 1);
        // A request within the bound is still sent again.
        server.state.step_up.store(1, Ordering::SeqCst);
        let near = "y".repeat(MAX_REPLAY_BYTES - 64);
        let status = check_service(&channel, &near).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert_eq!(server.state.seen().len(), 2);
    })
    .await
    .unwrap();
}
