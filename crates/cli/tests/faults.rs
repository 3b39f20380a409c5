//! Faults of the process and of its disk: `portcullis serve` killed with SIGKILL while 64
//! connections are being accepted, then started again on the same directory: every code the
//! killed server accepted stays spent (the SQLite commit came before the accepting Verdict), the
//! failures counted towards a lockout before the kill still count, and `PRAGMA integrity_check`
//! is ok. And the registry on a full file system (a small tmpfs, mounted when the test runs as
//! root): refusals are OVERLOADED, no code is lost or counted twice, and the server recovers
//! when space returns.

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

/// Users who sent wrong codes before the kill.
const GUESSERS: usize = 8;

/// Wrong codes each guesser sends before the kill: one short of the lockout (5).
const WRONG_BEFORE: usize = 4;

/// `PRAGMA integrity_check` of a registry file.
fn integrity(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

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
    let mut guessers = Vec::new();
    for i in 0..GUESSERS {
        let user = format!("g{i}");
        let secret = add_user(&dir, &user);
        issue_device(&dir, &format!("gd{i}"), &user);
        guessers.push(secret);
    }
    // All 64 come from 127.0.0.1: no rate limit.
    let server = Server::start_with(&dir, &[], &["--rate-limit", "0"]);
    let addr = server.addr.clone();

    // Each guesser is one wrong code short of the lockout before the kill.
    for (i, secret) in guessers.iter().enumerate() {
        let c = client(
            &dir,
            &format!("gd{i}"),
            &format!("g{i}"),
            &wrong_code(secret),
        );
        for _ in 0..WRONG_BEFORE {
            assert_eq!(call(&c, &addr).await, Err("mfa_failed".to_owned()));
        }
    }

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

    // The file after the kill, before anything opened it again.
    assert_eq!(integrity(&dir.join("portcullis.db")), "ok");

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
    // The failures counted before the kill still count: one more wrong code locks each
    // guesser out, and then even the right code is refused.
    for (i, secret) in guessers.iter().enumerate() {
        let (device, user) = (format!("gd{i}"), format!("g{i}"));
        let wrong = client(&dir, &device, &user, &wrong_code(secret));
        assert_eq!(
            call(&wrong, &server.addr).await,
            Err("mfa_failed".to_owned())
        );
        let right = client(&dir, &device, &user, &totp(secret).generate(unix_now()));
        assert_eq!(
            call(&right, &server.addr).await,
            Err("locked_out".to_owned()),
            "g{i}: its {WRONG_BEFORE} failures before the kill were lost"
        );
    }
    // And the registry still reads.
    let listed = run_ok(&["user", "list", "--dir", s(&dir)]);
    assert!(listed.contains("u0"), "{listed}");
    server.stop();
    assert_eq!(integrity(&dir.join("portcullis.db")), "ok");
}

/// Set by `.ci/run`: the full-disk test must run (as root, with `mount`), not skip.
const REQUIRE_TMPFS: &str = "PORTCULLIS_REQUIRE_TMPFS";

/// A tmpfs of `size` mounted at `path` for the test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts one, or says why not (not root, no `mount`, refused).
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        if run_quiet("id", &["-u"]).is_none_or(|uid| uid.trim() != "0") {
            return Err("not running as root (mounting a tmpfs needs it)".to_owned());
        }
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn run_quiet(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fills the file system of `path` until a write fails; the file that holds the space.
fn fill_up(path: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = path.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    for chunk in [64 * 1024, 4096, 512, 1] {
        let bytes = vec![0u8; chunk];
        while file.write_all(&bytes).and_then(|()| file.flush()).is_ok() {}
    }
    let _ = file.sync_all();
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_overloaded_loses_no_code_and_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    let _fs = match Tmpfs::mount(&mnt, "8m") {
        Ok(fs) => fs,
        Err(why) => {
            if std::env::var_os(REQUIRE_TMPFS).is_some() {
                panic!("{REQUIRE_TMPFS} is set but {why}");
            }
            println!("SKIP full disk: {why} (set {REQUIRE_TMPFS}=1 to make this a failure)");
            return;
        }
    };
    let dir = mnt.join("pc");
    run_ok(&["init", "--dir", s(&dir)]);
    let mut secrets = Vec::new();
    for i in 0..4 {
        secrets.push(add_user(&dir, &format!("u{i}")));
        issue_device(&dir, &format!("d{i}"), &format!("u{i}"));
    }
    // Every command so far has closed the registry: no write-ahead log is left to reuse.
    let audit = tmp.path().join("audit.jsonl");
    let mut server =
        Server::start_with(&dir, &[], &["--rate-limit", "0", "--audit-log", s(&audit)]);
    let filler = fill_up(&mnt);

    // Full: a right code and a wrong one are both refused with OVERLOADED, and neither
    // changes anything.
    let step = unix_now() / 30;
    let step_codes: Vec<String> = secrets
        .iter()
        .map(|secret| totp(secret).generate(unix_now()))
        .collect();
    let refused = client(&dir, "d0", "u0", &step_codes[0]);
    assert_eq!(
        call(&refused, &server.addr).await,
        Err("overloaded".to_owned())
    );
    let wrong = client(&dir, "d1", "u1", &wrong_code(&secrets[1]));
    for _ in 0..6 {
        assert_eq!(
            call(&wrong, &server.addr).await,
            Err("overloaded".to_owned())
        );
    }
    assert!(server.is_running(), "{}", server.stderr());
    // The audit trail (on another file system) names the cause.
    let records = std::fs::read_to_string(&audit).unwrap();
    let full: Vec<&str> = records
        .lines()
        .filter(|l| l.contains("\"registry_error\"") && l.contains("disk is full"))
        .collect();
    assert_eq!(full.len(), 7, "{records}");

    // Space again: the refused code was not spent, and is accepted once; the wrong codes
    // counted nothing (six of them would have locked u1 out).
    std::fs::remove_file(&filler).unwrap();
    let again = client(&dir, "d0", "u0", &step_codes[0]);
    let mut got = call(&again, &server.addr).await;
    if got.is_err() && unix_now() / 30 > step + 1 {
        // Two steps passed in between (a slow machine): the code of the new one.
        got = call(
            &client(&dir, "d0", "u0", &totp(&secrets[0]).generate(unix_now())),
            &server.addr,
        )
        .await;
    }
    assert_eq!(got, Ok(()), "the code refused on the full disk was lost");
    let twice = client(&dir, "d0", "u0", &step_codes[0]);
    assert_eq!(
        call(&twice, &server.addr).await,
        Err("mfa_failed".to_owned())
    );
    let right = client(&dir, "d1", "u1", &totp(&secrets[1]).generate(unix_now()));
    assert_eq!(call(&right, &server.addr).await, Ok(()), "u1 was charged");
    server.stop();
    assert_eq!(integrity(&dir.join("portcullis.db")), "ok");
}
