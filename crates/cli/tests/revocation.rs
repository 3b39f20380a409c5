//! Revocation across processes: `portcullis serve` holds live connections of in-process
//! clients while `portcullis device revoke`, `portcullis user revoke` or a new `--crl` file
//! changes what is allowed. Latencies are printed (`--nocapture`), bounded generously.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use portcullis::demo::{EchoClient, SayReply, SayRequest};
use portcullis_client::{Client, CodeSource, PortcullisChannel};
use portcullis_core::codec::ALPN_PCS1;
use portcullis_tls::devpki::DevCa;

type Echo = EchoClient<PortcullisChannel>;

/// The bound on "closed": generous for a loaded machine; the target is under one second.
const CLOSED_WITHIN: Duration = Duration::from_secs(3);

/// A client of the device NAME of DIR as USER, with the user's base32 secret.
fn client(dir: &Path, device: &str, user: &str, secret: &str) -> Client {
    let roots = portcullis_tls::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = portcullis_tls::load_certs(&dir.join(format!("devices/{device}.pem"))).unwrap();
    let key = portcullis_tls::load_key(&dir.join(format!("devices/{device}-key.pem"))).unwrap();
    let tls = portcullis_tls::client_config(&roots, chain, key, &[ALPN_PCS1]).unwrap();
    Client::builder()
        .tls_config(tls)
        .server_name("localhost")
        .user(user)
        .code_source(CodeSource::secret(totp(secret)))
        .build()
        .unwrap()
}

async fn say(echo: &mut Echo) -> Result<SayReply, tonic::Status> {
    echo.say(SayRequest {
        text: "hello".into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Connects and makes a first call (with a TOTP code).
async fn connected(client: &Client, addr: &str) -> Echo {
    let mut echo = EchoClient::new(client.connect(addr).await.unwrap());
    let reply = say(&mut echo).await.unwrap();
    assert_eq!(reply.auth_method, "totp");
    echo
}

/// Calls every 10 ms until one fails; how many went through, and when the failure came.
fn call_until_failure(mut echo: Echo) -> tokio::task::JoinHandle<(usize, Instant)> {
    tokio::spawn(async move {
        let mut ok = 0;
        while say(&mut echo).await.is_ok() {
            ok += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, Instant::now())
    })
}

async fn closed_after(
    caller: tokio::task::JoinHandle<(usize, Instant)>,
    since: Instant,
    what: &str,
) {
    let (ok, failed_at) = tokio::time::timeout(CLOSED_WITHIN, caller)
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: the live connection still works {CLOSED_WITHIN:?} later")
        })
        .unwrap();
    assert!(ok > 0, "{what}: calls went through before");
    eprintln!(
        "{what}: first failed call {:?} after the command started ({ok} calls before)",
        failed_at.saturating_duration_since(since)
    );
}

/// The reject name of the next refused call (a call in flight when the connection closed may
/// fail with a transport error first).
async fn reject_of(echo: &mut Echo) -> String {
    for _ in 0..5 {
        if let Err(status) = say(echo).await
            && let Some(reject) = status.metadata().get("portcullis-reject")
        {
            return reject.to_str().unwrap().to_owned();
        }
    }
    panic!("no call was refused with a reject code");
}

/// Runs a `portcullis` command off the async runtime.
async fn run_ok_async(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&args)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_revoke_in_another_process_closes_the_live_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice_secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let bob_secret = add_user(&dir, "bob");
    issue_device(&dir, "desk", "bob");
    let (_server, addr) = serve(&dir, &[]);

    let alice = client(&dir, "laptop", "alice", &alice_secret);
    let alice_echo = connected(&alice, &addr).await;
    let mut bob_echo = connected(&client(&dir, "desk", "bob", &bob_secret), &addr).await;

    let caller = call_until_failure(alice_echo.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let out = run_ok_async(args(&["device", "revoke", "laptop", "--dir", s(&dir)])).await;
    assert!(
        out.contains("close its connections within a second"),
        "{out}"
    );
    closed_after(caller, started, "portcullis device revoke").await;

    // The reconnect presents the session ticket and is refused.
    let mut alice_echo = alice_echo;
    assert_eq!(reject_of(&mut alice_echo).await, "device_revoked");
    // Bob's connection is the one authenticated with his code: not closed, not replaced.
    assert_eq!(say(&mut bob_echo).await.unwrap().auth_method, "totp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_revoke_closes_the_users_connections_and_names_its_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice_secret = add_user(&dir, "alice");
    let laptop_fp = issue_device(&dir, "laptop", "alice");
    let bob_secret = add_user(&dir, "bob");
    issue_device(&dir, "desk", "bob");
    let (_server, addr) = serve(&dir, &[]);

    let alice_echo = connected(&client(&dir, "laptop", "alice", &alice_secret), &addr).await;
    let mut bob_echo = connected(&client(&dir, "desk", "bob", &bob_secret), &addr).await;

    let caller = call_until_failure(alice_echo.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let out = run_ok_async(args(&["user", "revoke", "alice", "--dir", s(&dir)])).await;
    assert!(
        out.contains(&format!("revoked user alice: devices laptop ({laptop_fp})")),
        "{out}"
    );
    closed_after(caller, started, "portcullis user revoke").await;
    let mut alice_echo = alice_echo;
    assert_eq!(reject_of(&mut alice_echo).await, "device_revoked");
    assert_eq!(say(&mut bob_echo).await.unwrap().auth_method, "totp");

    // The registry agrees, and a second revocation has nothing left to do.
    let listed = run_json(&["device", "list", "--dir", s(&dir), "--json"]);
    let revoked = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == name)
            .map(|d| !d["revoked"].is_null())
            .unwrap()
    };
    assert!(revoked("laptop"), "{listed}");
    assert!(!revoked("desk"), "{listed}");
    let out = run_ok(&["user", "revoke", "alice", "--dir", s(&dir)]);
    assert!(out.contains("user alice has no active device"), "{out}");
    let err = run(&["user", "revoke", "ghost", "--dir", s(&dir)]);
    assert_one_line_error(&err, &["user ghost not found"]);
}

/// Writes a CRL of DIR's CA listing the devices, atomically.
fn publish_crl(dir: &Path, path: &Path, devices: &[&str]) {
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let certs: Vec<_> = devices
        .iter()
        .map(|d| {
            portcullis_tls::load_certs(&dir.join(format!("devices/{d}.pem")))
                .unwrap()
                .remove(0)
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, ca.crl_pem(&certs).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn call_as(dir: &Path, addr: &str, device: &str, user: &str, secret: &str) -> Output {
    run(&[
        "call",
        "--dir",
        s(dir),
        "--server",
        addr,
        "--device",
        device,
        "--user",
        user,
        "--secret",
        secret,
        "--server-name",
        "localhost",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_crl_refuses_listed_certificates_and_follows_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice_secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let bob_secret = add_user(&dir, "bob");
    issue_device(&dir, "desk", "bob");
    let crl: PathBuf = tmp.path().join("clients.crl");
    publish_crl(&dir, &crl, &["desk"]);

    // A CRL file that is missing is one line naming it.
    let missing = tmp.path().join("missing.crl");
    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--crl",
        s(&missing),
    ]);
    assert_one_line_error(&out, &["missing.crl", "cannot read"]);

    let (_server, addr) = serve(&dir, &["--crl", s(&crl)]);
    // Bob's certificate is listed: refused.
    let out = call_as(&dir, &addr, "desk", "bob", &bob_secret);
    assert!(!out.status.success(), "{out:?}");
    // Alice's is not: a live connection.
    let alice_echo = connected(&client(&dir, "laptop", "alice", &alice_secret), &addr).await;

    // The file now lists the laptop instead: alice's connection is closed, bob gets in, all
    // without a restart.
    let caller = call_until_failure(alice_echo);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let published = Instant::now();
    publish_crl(&dir, &crl, &["laptop"]);
    closed_after(caller, published, "new --crl file").await;
    let out = call_as(&dir, &addr, "desk", "bob", &bob_secret);
    assert!(out.status.success(), "{out:?}");
    let out = call_as(&dir, &addr, "laptop", "alice", &alice_secret);
    assert!(!out.status.success(), "{out:?}");
}

/// `portcullis user add USER --json` against `env`'s registry: the user's secret.
fn add_user_with(dir: &str, user: &str, env: &[(&str, &str)]) -> String {
    let out = run_with_env(&["user", "add", user, "--dir", dir, "--json"], env);
    assert!(out.status.success(), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    json["secret"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_revoke_against_the_database_closes_a_live_connection_on_another_fleet_member() {
    let Some(cluster) = portcullis_postgres::testkit::PgCluster::start("cli fleet revocation")
    else {
        return;
    };
    let url = cluster.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pc");
    let d = s(&dir);
    let env = [("PORTCULLIS_REGISTRY", url.as_str())];
    let out = run_with_env(&["init", "--dir", d], &env);
    assert!(out.status.success(), "{}", out.stderr);
    let alice_secret = add_user_with(d, "alice", &env);
    let bob_secret = add_user_with(d, "bob", &env);
    for (device, user) in [("laptop", "alice"), ("desk", "bob")] {
        let out = run_with_env(
            &["device", "issue", device, "--user", user, "--dir", d],
            &env,
        );
        assert!(out.status.success(), "{}", out.stderr);
    }
    // Three members of a fleet; the live connections are held on the third.
    let members: Vec<_> = (0..3).map(|_| serve(&dir, &["--registry", &url])).collect();
    let c = &members[2].1;

    let alice = connected(&client(&dir, "laptop", "alice", &alice_secret), c).await;
    let caller = call_until_failure(alice);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    run_ok_async(args(&[
        "device",
        "revoke",
        "laptop",
        "--dir",
        d,
        "--registry",
        &url,
    ]))
    .await;
    closed_after(
        caller,
        started,
        "device revoke against the database, held on C",
    )
    .await;

    // The members' listening connections killed by the database: the next revocation still
    // closes the connection on C (the round tails the change log, and the feeds listen again).
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
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
    assert_eq!(killed, 3, "one listening connection per member");
    let bob = connected(&client(&dir, "desk", "bob", &bob_secret), c).await;
    let caller = call_until_failure(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    run_ok_async(args(&[
        "device",
        "revoke",
        "desk",
        "--dir",
        d,
        "--registry",
        &url,
    ]))
    .await;
    closed_after(
        caller,
        started,
        "device revoke after the listeners were killed",
    )
    .await;
    drop(admin);
    let _ = driver.await;
}

#[test]
fn serve_names_a_crl_file_past_its_next_update_and_refuses_until_it_is_current() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    issue_device(&dir, "spare", "alice");
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let spare = portcullis_tls::load_certs(&dir.join("devices/spare.pem"))
        .unwrap()
        .remove(0);
    let crl = tmp.path().join("stale.crl");
    let past = i64::try_from(unix_now()).unwrap() - 60;
    std::fs::write(&crl, ca.crl_pem_until(&[spare], past).unwrap()).unwrap();

    let server = Server::start_with(&dir, &[], &["--crl", s(&crl)]);
    let refused = call_as(&dir, &server.addr, "laptop", "alice", &secret);
    assert_one_line_error(&refused, &["overloaded", "revocation list is out of date"]);
    let deadline = Instant::now() + CLOSED_WITHIN;
    while !server.stderr().contains("past its nextUpdate") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("past its nextUpdate"))
        .unwrap_or_else(|| panic!("no log line about the CRL: {log}"));
    assert!(line.contains("stale.crl"), "{line}");
    server.stop();

    // --crl-stale warn: the same file is used, with the same log line.
    let server = Server::start_with(&dir, &[], &["--crl", s(&crl), "--crl-stale", "warn"]);
    let ok = call_as(&dir, &server.addr, "laptop", "alice", &secret);
    assert!(ok.status.success(), "{}", ok.stderr);
    server.stop();
}
