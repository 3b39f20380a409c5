//! Faults of the process itself: `portcullis serve` killed with SIGKILL while 64 connections
//! are being accepted, then started again on the same directory. Every code the killed server
//! accepted stays spent (the SQLite commit came before the accepting Verdict), and the
//! registry opens and serves as before.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use portcullis::demo::{EchoClient, SayRequest};
use portcullis_client::{Client, CodeSource};
use portcullis_core::codec::ALPN_PCS1;

const USERS: usize = 64;

/// A client of `device` as `user` that sends exactly `code`.
fn client(dir: &Path, device: &str, user: &str, code: &str) -> Client {
    let roots = portcullis_tls::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = portcullis_tls::load_certs(&dir.join(format!("devices/{device}.pem"))).unwrap();
    let key = portcullis_tls::load_key(&dir.join(format!("devices/{device}-key.pem"))).unwrap();
    let tls = portcullis_tls::client_config(&roots, chain, key, &[ALPN_PCS1]).unwrap();
    Client::builder()
        .tls_config(tls)
        .server_name("localhost")
        .user(user)
        .code_source(CodeSource::fixed(code))
        .build()
        .unwrap()
}

/// One call with a fresh connection: Ok, or the `portcullis-reject` name of the refusal.
async fn call(client: &Client, addr: &str) -> Result<(), String> {
    let channel = client.connect_lazy(addr).map_err(|e| e.to_string())?;
    let said = tokio::time::timeout(
        Duration::from_secs(15),
        EchoClient::new(channel).say(SayRequest {
            text: "hello".into(),
        }),
    )
    .await
    .map_err(|_| "no answer".to_owned())?;
    said.map(|_| ()).map_err(|status| {
        status
            .metadata()
            .get("portcullis-reject")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("transport")
            .to_owned()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_accepted_before_a_kill_stay_spent_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let mut codes = Vec::new();
    for i in 0..USERS {
        let user = format!("u{i}");
        let secret = add_user(&dir, &user);
        issue_device(&dir, &format!("d{i}"), &user);
        codes.push(totp(&secret).generate(unix_now()));
    }
    // All 64 come from 127.0.0.1: no rate limit.
    let server = Server::start_with(&dir, &[], &["--rate-limit", "0"]);
    let addr = server.addr.clone();

    // 64 accepts at once; the server is killed once a third of them got in.
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        let c = client(&dir, &format!("d{i}"), &format!("u{i}"), code);
        let (addr, accepted) = (addr.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            let got = call(&c, &addr).await;
            if got.is_ok() {
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            got
        }));
    }
    let start = std::time::Instant::now();
    while accepted.load(Ordering::SeqCst) < USERS / 3 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.stop();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let ok: Vec<usize> = (0..USERS).filter(|&i| outcomes[i].is_ok()).collect();
    println!(
        "{} of {USERS} accepted before the kill; the others: {:?}",
        ok.len(),
        outcomes
            .iter()
            .filter_map(|o| o.as_ref().err())
            .collect::<Vec<_>>()
    );
    assert!(ok.len() >= USERS / 3, "{outcomes:?}");

    // Started again on the same files: every code the killed server accepted is spent.
    let server = Server::start_with(&dir, &[], &["--rate-limit", "0"]);
    for &i in &ok {
        let c = client(&dir, &format!("d{i}"), &format!("u{i}"), &codes[i]);
        // No stored session: the client sends the code.
        let got = call(&c, &server.addr).await;
        assert_eq!(
            got,
            Err("mfa_failed".to_owned()),
            "u{i}: its code was accepted before the kill"
        );
    }
    // And the registry still reads.
    let listed = run_ok(&["user", "list", "--dir", s(&dir)]);
    assert!(listed.contains("u0"), "{listed}");
    server.stop();
}
