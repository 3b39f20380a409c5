//! The deadline covers the decision up to its commit (PROTOCOL.md section 5, step 1): a
//! decision that outlives the deadline commits nothing, so a client told TIMEOUT keeps its
//! code usable and its failure count unchanged; a commit that has started finishes and its
//! result stands. Over real loopback TCP and real TLS, with a store whose reads or writes are
//! slowed down on purpose.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::store::{Slowed, Wait};
use common::{Options, TestServer};
use portcullis::client::CodeSource;
use portcullis::core::{Admin, Clock, LockState, SystemClock};

/// Every test runs under this bound, so that a hang fails instead.
const LIMIT: Duration = Duration::from_secs(60);

/// The server's deadline in these tests.
const DEADLINE: Duration = Duration::from_millis(400);

/// A server with the [`DEADLINE`] on a [`Slowed`] store; blocking stores go to the blocking
/// pool (`blocking_registry(true)`), as a server with a slow synchronous store would be set up.
async fn start(wait: Wait) -> (TestServer, Arc<Slowed>) {
    let store = Arc::new(Slowed::new(wait));
    let options = Options {
        deadline: DEADLINE,
        ..Options::default()
    };
    let ca = portcullis::tls::devpki::DevCa::generate("deadline CA").unwrap();
    let configure = move |builder: portcullis::server::Builder| {
        builder
            .deadline(options.deadline)
            .blocking_registry(wait == Wait::Blocking)
    };
    let (server, _) = common::start_custom(ca, store.clone(), configure).await;
    (server, store)
}

/// A decision whose read outlives the deadline: the client is told TIMEOUT, and once the slow
/// read has finished in the background nothing was written: no step taken, no failure charged,
/// and the same code is accepted on the next connection.
async fn a_decision_past_its_deadline_commits_nothing(wait: Wait) {
    let (server, store) = start(wait).await;
    let alice = server.enroll("alice", "laptop");
    // Far enough from the end of its step that the code is still good for the second try.
    let code = loop {
        let now_s = SystemClock.now_ms() / 1000;
        if now_s % 30 < 20 {
            break alice.totp.generate(now_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    store.snapshot_delay_ms.store(1_200, Ordering::SeqCst);
    let client = server.client(&alice, CodeSource::fixed(code.clone()));
    let status = server.say(&client).await.unwrap_err();
    assert_eq!(
        status
            .metadata()
            .get("portcullis-reject")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("timeout".to_owned()),
        "{status:?}"
    );
    // The slow read ends in the background; nothing may follow it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(store.commits.load(Ordering::SeqCst), 0);
    assert_eq!(store.lock_state("alice").unwrap(), LockState::default());

    store.snapshot_delay_ms.store(0, Ordering::SeqCst);
    let client = server.client(&alice, CodeSource::fixed(code));
    let reply = server.say(&client).await.unwrap();
    assert_eq!(reply.user, "alice");
    assert_eq!(reply.auth_method, "totp");
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_store_past_the_deadline_commits_nothing_and_the_code_stays_usable() {
    tokio::time::timeout(
        LIMIT,
        a_decision_past_its_deadline_commits_nothing(Wait::Blocking),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_store_past_the_deadline_commits_nothing_and_the_code_stays_usable() {
    tokio::time::timeout(
        LIMIT,
        a_decision_past_its_deadline_commits_nothing(Wait::Async),
    )
    .await
    .unwrap();
}

/// A commit that started before the deadline is not cut off: it finishes, and the client gets
/// the decision it made (here an accept), not a TIMEOUT over a code that was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_started_in_time_finishes_and_its_decision_stands() {
    tokio::time::timeout(LIMIT, async {
        for wait in [Wait::Blocking, Wait::Async] {
            let (server, store) = start(wait).await;
            let alice = server.enroll("alice", "laptop");
            store.commit_delay_ms.store(800, Ordering::SeqCst);
            let client = server.secret_client(&alice);
            let reply = server.say(&client).await.unwrap();
            assert_eq!(reply.auth_method, "totp");
            assert_eq!(store.commits.load(Ordering::SeqCst), 1);
            server.stop().await;
        }
    })
    .await
    .unwrap();
}
