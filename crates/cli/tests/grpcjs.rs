//! A second outside-client proof of standard gRPC clients (PROTOCOL.md section 7), next to the
//! Python grpcio one: Node.js `@grpc/grpc-js`, with the demo's `echo.proto` loaded by
//! `@grpc/proto-loader`, mTLS and a device certificate and no Portcullis code at all, calls
//! `portcullis.demo.v1.Echo/Say` on `portcullis serve --standard-clients`. It is refused with
//! UNAUTHENTICATED naming cause and fix until the device earns a session with a code, then its
//! call succeeds as that session, and after `portcullis device revoke` it is refused again.
//! A second, independent HTTP/2 and TLS stack is what makes the claim "standard clients work"
//! more than "grpcio works".
//!
//! Needs `node` (PORTCULLIS_NODE names another) and the modules pinned in
//! `crates/cli/tests/node/package-lock.json`, installed with
//! `npm ci --no-audit --no-fund --ignore-scripts` in that directory. Without them the test
//! prints a SKIP line and passes, unless PORTCULLIS_REQUIRE_GRPCJS is set (as in CI), where it
//! fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long one Node call may take (node start and module loading included).
const NODE_DEADLINE: Duration = Duration::from_secs(60);

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

fn script() -> PathBuf {
    node_dir().join("echo_say.js")
}

/// The command that installs the modules the test needs.
fn install_hint() -> String {
    format!(
        "cd {} && npm ci --no-audit --no-fund --ignore-scripts",
        node_dir().display()
    )
}

/// What a finished node run left behind.
struct NodeOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// `NODE echo_say.js ARGS...` to the end, killed after [`NODE_DEADLINE`].
fn node_exec(node: &str, args: &[&str]) -> std::io::Result<NodeOutput> {
    let mut cmd = Command::new(node);
    cmd.arg(script())
        .args(args)
        .current_dir(node_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::new(cmd.spawn()?);
    let mut out_pipe = guard.child().stdout.take().expect("stdout");
    let mut err_pipe = guard.child().stderr.take().expect("stderr");
    let stdout = thread::spawn(move || {
        let mut text = String::new();
        let _ = out_pipe.read_to_string(&mut text);
        text
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = guard.child().try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > NODE_DEADLINE {
            drop(guard);
            panic!("the @grpc/grpc-js call still runs after {NODE_DEADLINE:?} (args {args:?})");
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(guard);
    Ok(NodeOutput {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
}

/// The node binary with `@grpc/grpc-js` and `@grpc/proto-loader` installed, or `None` (after
/// a SKIP line) when either is missing and they are not required.
fn node_with_grpcjs() -> Option<String> {
    let node = std::env::var("PORTCULLIS_NODE").unwrap_or_else(|_| "node".into());
    let why = match node_exec(&node, &["--probe"]) {
        Ok(out) if out.status.success() => {
            let line = out.stdout.lines().last().unwrap_or_default();
            let probe: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("probe not JSON ({e}): {}\n{}", out.stdout, out.stderr));
            println!(
                "using {node} with @grpc/grpc-js {} and @grpc/proto-loader {}",
                probe["grpc-js"], probe["proto-loader"]
            );
            return Some(node);
        }
        Ok(out) => {
            let answer: Option<serde_json::Value> = out
                .stdout
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok());
            let detail = match &answer {
                Some(a) => a["details"].as_str().unwrap_or_default().to_owned(),
                None => out.stderr.trim().to_owned(),
            };
            let first = detail.lines().next().unwrap_or_default();
            format!(
                "`{node} echo_say.js --probe` failed ({}): {first}",
                out.status
            )
        }
        Err(e) => format!("cannot run `{node}`: {e}"),
    };
    let hint = install_hint();
    if std::env::var_os("PORTCULLIS_REQUIRE_GRPCJS").is_some() {
        panic!(
            "PORTCULLIS_REQUIRE_GRPCJS is set but {why}; install Node.js 20 or later and the \
             modules with `{hint}`"
        );
    }
    println!(
        "SKIP @grpc/grpc-js standard-client test: {why} (install with `{hint}`; set \
         PORTCULLIS_REQUIRE_GRPCJS=1 to make this a failure)"
    );
    eprintln!("SKIP @grpc/grpc-js standard-client test: {why}");
    None
}

/// One Echo/Say call from @grpc/grpc-js with the device's certificate; the script's JSON answer.
fn node_say(node: &str, dir: &Path, addr: &str, device: &str) -> serde_json::Value {
    node_run(
        node,
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
            "from grpc-js",
        ],
    )
}

/// echo_say.js with `args`; its JSON answer.
fn node_run(node: &str, args: &[&str]) -> serde_json::Value {
    let out = node_exec(node, args).unwrap_or_else(|e| panic!("spawn {node}: {e}"));
    let NodeOutput {
        status,
        stdout,
        stderr,
    } = out;
    assert!(
        status.success(),
        "echo_say.js failed ({status}):\nstdout: {stdout}\nstderr: {stderr}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    println!("grpc-js: {line}");
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

/// The audit records with ALPN h2, as (outcome, code or "-").
fn h2_outcomes(text: &str) -> (Vec<serde_json::Value>, Vec<(String, String)>) {
    let h2: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["alpn"] == "h2")
        .collect();
    let outcomes = h2
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["code"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    (h2, outcomes)
}

#[test]
fn grpcjs_reaches_echo_on_a_live_session_and_is_refused_without_one() {
    let Some(node) = node_with_grpcjs() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    let fingerprint = issue_device(&dir, "laptop", "alice");
    let audit = tmp.path().join("audit.jsonl");
    let (server, addr) = serve(&dir, &["--standard-clients", "--audit-log", s(&audit)]);

    // No session yet: UNAUTHENTICATED, naming the cause and the fix.
    let refused = node_say(&node, &dir, &addr, "laptop");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["code"], "UNAUTHENTICATED", "{refused}");
    assert_eq!(
        refused["details"],
        format!(
            "mfa_required: no live session for device laptop ({fingerprint}); run portcullis login"
        ),
        "{refused}"
    );
    assert_eq!(
        refused["metadata"]["portcullis-reject"], "mfa_required",
        "{refused}"
    );
    assert!(
        refused["metadata"]["portcullis-ref"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "a reference to find the refusal in the audit log: {refused}"
    );

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

    let accepted = node_say(&node, &dir, &addr, "laptop");
    assert_eq!(accepted["ok"], true, "{accepted}");
    let reply = &accepted["reply"];
    assert_eq!(reply["text"], "from grpc-js", "{accepted}");
    assert_eq!(reply["user"], "alice", "{accepted}");
    assert_eq!(reply["device"], fingerprint.as_str(), "{accepted}");
    assert_eq!(reply["auth_method"], "session", "{accepted}");

    // The device is revoked: refused again.
    run_ok(&["device", "revoke", "laptop", "--dir", s(&dir)]);
    let revoked = node_say(&node, &dir, &addr, "laptop");
    assert_eq!(revoked["ok"], false, "{revoked}");
    assert_eq!(revoked["code"], "UNAUTHENTICATED", "{revoked}");
    let details = revoked["details"].as_str().unwrap();
    assert!(
        details.starts_with(&format!(
            "device_revoked: device laptop ({fingerprint}) was revoked"
        )),
        "{revoked}"
    );
    assert_eq!(
        revoked["metadata"]["portcullis-reject"], "device_revoked",
        "{revoked}"
    );
    server.kill();

    // Each grpc-js connection left one audit record with ALPN h2.
    let text = std::fs::read_to_string(&audit).unwrap();
    let (h2, outcomes) = h2_outcomes(&text);
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
fn grpcjs_without_tls_is_refused_at_once_and_the_audit_names_it() {
    let Some(node) = node_with_grpcjs() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let audit = tmp.path().join("audit.jsonl");
    let (server, addr) = serve(&dir, &["--standard-clients", "--audit-log", s(&audit)]);

    // A plaintext (h2c) channel to the TLS port: the connection is closed before any HTTP/2,
    // so grpc-js fails the call with UNAVAILABLE well before its 15 s deadline, and with no
    // portcullis metadata.
    let start = Instant::now();
    let refused = node_run(
        &node,
        &["--target", &addr, "--plaintext", "--text", "plain"],
    );
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["code"], "UNAVAILABLE", "{refused}");
    assert!(
        refused["metadata"].get("portcullis-reject").is_none(),
        "{refused}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(14),
        "refused only after {:?}: {refused}",
        start.elapsed()
    );
    server.kill();

    // The server's audit records name the cause: no TLS record came.
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
