//! `portcullis doctor` against a running `portcullis serve`: a healthy path passes every step
//! (text and `--json`), and a wrong code, a revoked device and a wrong CA each fail at their own
//! step, with that step's exit code and the cause named.

mod common;

use common::*;
use serde_json::Value;

/// `portcullis doctor` with the connection flags and `extra`.
fn doctor(dir: &std::path::Path, server: &str, device: &str, user: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "doctor",
        "--dir",
        s(dir),
        "--server",
        server,
        "--device",
        device,
        "--user",
        user,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The line of step `name` in the text report.
fn step_line<'a>(out: &'a Output, name: &str) -> &'a str {
    let needle = format!(". {name}: ");
    out.stdout
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no line for step {name}: {}", out.stdout))
}

#[test]
fn a_healthy_server_passes_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let bob = add_user(&dir, "bob");
    let laptop = issue_device(&dir, "laptop", "alice");
    issue_device(&dir, "desk", "bob");
    let server = Server::start(&dir);

    let out = doctor(&dir, &server.addr, "laptop", "alice", &["--secret", &alice]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("all 11 steps passed"), "{}", out.stdout);
    assert_eq!(out.stdout.matches('✓').count(), 11, "{}", out.stdout);
    assert!(!out.stdout.contains('✗'), "{}", out.stdout);
    assert!(
        step_line(&out, "device").contains(&laptop),
        "{}",
        out.stdout
    );
    assert!(step_line(&out, "session").contains("valid until"));
    assert!(
        step_line(&out, "echo").contains("user alice"),
        "{}",
        out.stdout
    );
    // No secret in the report.
    assert!(!out.stdout.contains(&alice));

    // A second user and device: a code is accepted once, so the JSON run uses bob's.
    let out = doctor(
        &dir,
        &server.addr,
        "desk",
        "bob",
        &["--secret", &bob, "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["first_failure"], Value::Null);
    let steps = json["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "connect",
            "tls_version",
            "alpn",
            "server_certificate",
            "client_certificate",
            "device",
            "clock",
            "code",
            "channel_binding",
            "session",
            "echo"
        ]
    );
    for step in steps {
        assert_eq!(step["ok"], true, "{step}");
        assert_eq!(step["fix"], Value::Null, "{step}");
        assert!(!step["saw"].as_str().unwrap().is_empty());
    }
    server.stop();
}

#[test]
fn a_wrong_code_fails_the_code_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let server = Server::start(&dir);

    let code = wrong_code(&alice);
    let out = doctor(&dir, &server.addr, "laptop", "alice", &["--code", &code]);
    assert_eq!(out.status.code(), Some(18), "{out:?}");
    let line = step_line(&out, "code");
    assert!(
        line.starts_with('✗') && line.contains("mfa_failed"),
        "{}",
        out.stdout
    );
    // The steps the server checks first passed; the later ones were not reached.
    assert!(step_line(&out, "device").starts_with('✓'), "{}", out.stdout);
    assert!(step_line(&out, "echo").starts_with('-'), "{}", out.stdout);
    assert!(!out.stdout.contains(&code), "the code is not echoed");

    let json: Value = serde_json::from_str(
        doctor(
            &dir,
            &server.addr,
            "laptop",
            "alice",
            &["--code", &code, "--json"],
        )
        .stdout
        .trim(),
    )
    .expect("JSON");
    assert_eq!(json["ok"], false);
    assert_eq!(json["first_failure"], "code");
    server.stop();
}

#[test]
fn a_revoked_device_fails_the_device_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    run_ok(&["device", "revoke", "laptop", "--dir", s(&dir)]);
    let server = Server::start(&dir);

    let out = doctor(&dir, &server.addr, "laptop", "alice", &["--secret", &alice]);
    assert_eq!(out.status.code(), Some(16), "{out:?}");
    let line = step_line(&out, "device");
    assert!(
        line.starts_with('✗') && line.contains("device_revoked"),
        "{}",
        out.stdout
    );
    server.stop();
}

#[test]
fn a_wrong_ca_fails_the_server_certificate_step_and_lists_the_sans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let server = Server::start(&dir);

    // Another directory with its own CA, holding alice's device files.
    let other = tmp.path().join("other");
    run_ok(&["init", "--dir", s(&other)]);
    for file in ["laptop.pem", "laptop-key.pem"] {
        std::fs::copy(
            dir.join("devices").join(file),
            other.join("devices").join(file),
        )
        .unwrap();
    }

    let out = doctor(
        &other,
        &server.addr,
        "laptop",
        "alice",
        &["--secret", &alice],
    );
    assert_eq!(out.status.code(), Some(14), "{out:?}");
    let line = step_line(&out, "server_certificate");
    assert!(line.starts_with('✗'), "{}", out.stdout);
    assert!(line.contains("does not chain to the CA"), "{line}");
    assert!(
        line.contains("SANs: ") && line.contains("127.0.0.1"),
        "{line}"
    );
    assert!(step_line(&out, "connect").starts_with('✓'));
    server.stop();
}
