//! The outside-client proof of standard gRPC clients (PROTOCOL.md section 7): Python `grpcio`,
//! with mTLS and a device certificate and no Portcullis code at all, calls
//! `portcullis.demo.v1.Echo/Say` on `portcullis serve --standard-clients`. It is refused with
//! UNAUTHENTICATED naming cause and fix until the device earns a session with a code, then its
//! call succeeds as that session, and after `portcullis device revoke` it is refused again.
//!
//! Needs `python3` with `grpcio` (`python3 -m pip install grpcio`; PORTCULLIS_PYTHON names
//! another interpreter). Without it the test prints a SKIP line and passes, unless
//! PORTCULLIS_REQUIRE_GRPCIO is set (as in CI), where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long one Python call may take (interpreter start and grpcio import included).
const PYTHON_DEADLINE: Duration = Duration::from_secs(60);

/// The Python interpreter with `grpcio`, or `None` (after a SKIP line) when there is none and
/// it is not required.
fn python_with_grpcio() -> Option<String> {
    let python = std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .stdin(Stdio::null())
        .output();
    let why = match &probe {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            println!("using {python} with grpcio {version}");
            return Some(python);
        }
        Ok(out) => format!(
            "`{python} -c 'import grpc'` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("cannot run `{python}`: {e}"),
    };
    if std::env::var_os("PORTCULLIS_REQUIRE_GRPCIO").is_some() {
        panic!(
            "PORTCULLIS_REQUIRE_GRPCIO is set but {why}; install it with `{python} -m pip \
             install grpcio`"
        );
    }
    println!(
        "SKIP grpcio standard-client test: {why} (install with `python3 -m pip install grpcio`; \
         set PORTCULLIS_REQUIRE_GRPCIO=1 to make this a failure)"
    );
    eprintln!("SKIP grpcio standard-client test: {why}");
    None
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/echo_say.py")
}

/// One Echo/Say call from grpcio with the device's certificate; the script's JSON answer.
fn python_say(python: &str, dir: &Path, addr: &str, device: &str) -> serde_json::Value {
    python_run(
        python,
        &[
            "--target",
            addr,
            "--ca",
            s(&dir.join("ca.pem")),
            "--cert",
            s(&dir.join(format!("devices/{device}.pem"))),
            "--key",
            s(&dir.join(format!("devices/{device}-key.pem"))),
            "--server-name",
            "localhost",
            "--text",
            "from grpcio",
        ],
    )
}

/// echo_say.py with `args`; its JSON answer.
fn python_run(python: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(python);
    cmd.arg(script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn python"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = guard.child().try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            start.elapsed() < PYTHON_DEADLINE,
            "the grpcio call still runs after {PYTHON_DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    guard
        .child()
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .unwrap();
    guard
        .child()
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "echo_say.py failed ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    println!("grpcio: {line}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

/// Whether this build has `portcullis login`.
fn has_login() -> bool {
    command()
        .args(["login", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn grpcio_reaches_echo_on_a_live_session_and_is_refused_without_one() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    let fingerprint = issue_device(&dir, "laptop", "alice");
    let audit = tmp.path().join("audit.jsonl");
    let (server, addr) = serve(&dir, &["--standard-clients", "--audit-log", s(&audit)]);

    // No session yet: UNAUTHENTICATED, naming the cause and the fix.
    let refused = python_say(&python, &dir, &addr, "laptop");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["code"], "UNAUTHENTICATED", "{refused}");
    assert_eq!(
        refused["details"],
        format!(
            "mfa_required: no live session for device laptop ({fingerprint}); run portcullis login"
        ),
        "{refused}"
    );
    assert_eq!(refused["metadata"]["portcullis-reject"], "mfa_required");

    // The device earns a session with a code.
    let earn = if has_login() { "login" } else { "call" };
    run_ok(&[
        earn,
        "--dir",
        s(&dir),
        "--server",
        &addr,
        "--device",
        "laptop",
        "--user",
        "alice",
        "--secret",
        &secret,
    ]);

    let accepted = python_say(&python, &dir, &addr, "laptop");
    assert_eq!(accepted["ok"], true, "{accepted}");
    let reply = &accepted["reply"];
    assert_eq!(reply["text"], "from grpcio");
    assert_eq!(reply["user"], "alice");
    assert_eq!(reply["device"], fingerprint.as_str());
    assert_eq!(reply["auth_method"], "session");

    // The device is revoked: refused again.
    run_ok(&["device", "revoke", "laptop", "--dir", s(&dir)]);
    let revoked = python_say(&python, &dir, &addr, "laptop");
    assert_eq!(revoked["ok"], false, "{revoked}");
    assert_eq!(revoked["code"], "UNAUTHENTICATED", "{revoked}");
    let details = revoked["details"].as_str().unwrap();
    assert!(
        details.starts_with(&format!(
            "device_revoked: device laptop ({fingerprint}) was revoked"
        )),
        "{revoked}"
    );
    server.kill();

    // Each grpcio connection left one audit record with ALPN h2.
    let text = std::fs::read_to_string(&audit).unwrap();
    let h2: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["alpn"] == "h2")
        .collect();
    let outcomes: Vec<(String, String)> = h2
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["code"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("rejected".to_owned(), "mfa_required".to_owned()),
            ("accepted".to_owned(), "-".to_owned()),
            ("rejected".to_owned(), "device_revoked".to_owned()),
        ],
        "{text}"
    );
    assert!(h2.iter().all(|r| r["user"] == "alice"), "{text}");
}

#[test]
fn grpcio_without_tls_is_refused_at_once_and_the_audit_names_it() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let audit = tmp.path().join("audit.jsonl");
    let (server, addr) = serve(&dir, &["--standard-clients", "--audit-log", s(&audit)]);

    // A plaintext (h2c) channel, as `grpcurl -plaintext` opens, to the TLS port: the connection
    // is closed before any HTTP/2, so grpcio fails the call with UNAVAILABLE (it does not wait
    // out the 15 s deadline) and no portcullis metadata.
    let refused = python_run(
        &python,
        &["--target", &addr, "--plaintext", "--text", "plain"],
    );
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["code"], "UNAVAILABLE", "{refused}");
    assert!(
        refused["metadata"].get("portcullis-reject").is_none(),
        "{refused}"
    );
    server.kill();

    // The server's audit record names the cause: no TLS record came.
    let text = std::fs::read_to_string(&audit).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    assert!(!records.is_empty(), "an audit record per connection");
    assert!(
        records
            .iter()
            .all(|r| r["outcome"] == "closed" && r["cause"] == "not_tls"),
        "{text}"
    );
}
