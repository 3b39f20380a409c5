//! `portcullis doctor --standard` against a running `portcullis serve`: the path of a standard
//! gRPC client (ALPN h2, no Prefix). Without a session the live-session step fails with
//! `mfa_required` and names `portcullis login`; after a login it passes; against a server
//! without `--standard-clients` the ALPN step fails and names the flag.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// `portcullis doctor --standard --json` as alice on `laptop`; the exit code and the JSON.
fn doctor_standard(dir: &Path, server: &str) -> (Option<i32>, Value) {
    let out = run(&[
        "doctor",
        "--dir",
        s(dir),
        "--server",
        server,
        "--device",
        "laptop",
        "--user",
        "alice",
        "--standard",
        "--json",
    ]);
    let json = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    (out.status.code(), json)
}

/// The step `name` of a doctor JSON report.
fn step<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {json}"))
}

#[test]
fn standard_doctor_needs_a_session_and_passes_after_login() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    let fingerprint = issue_device(&dir, "laptop", "alice");
    let (server, addr) = serve(&dir, &["--standard-clients"]);

    // No session yet: the live-session step fails with mfa_required and names login.
    let (code, json) = doctor_standard(&dir, &addr);
    assert_eq!(code, Some(17), "{json}");
    assert_eq!(json["ok"], false, "{json}");
    assert_eq!(json["first_failure"], "live_session", "{json}");
    let names: Vec<&str> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "connect",
            "tls_version",
            "alpn",
            "server_certificate",
            "client_certificate",
            "device",
            "live_session"
        ]
    );
    for name in &names[..6] {
        assert_eq!(step(&json, name)["ok"], true, "{json}");
    }
    assert!(
        step(&json, "alpn")["saw"].as_str().unwrap().contains("h2"),
        "{json}"
    );
    let live = step(&json, "live_session");
    assert_eq!(live["ok"], false, "{json}");
    assert!(
        live["saw"].as_str().unwrap().starts_with("mfa_required:"),
        "{json}"
    );
    assert_eq!(
        live["fix"], "run portcullis login from this device",
        "{json}"
    );

    // The device earns a session; the same doctor passes as that session.
    run_ok(&[
        "login",
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
    let (code, json) = doctor_standard(&dir, &addr);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["first_failure"], Value::Null, "{json}");
    let saw = step(&json, "live_session")["saw"].as_str().unwrap();
    assert!(saw.contains("via session"), "{saw}");
    assert!(saw.contains("user alice"), "{saw}");
    assert!(saw.contains(&fingerprint), "{saw}");
    // No secret in the report.
    assert!(!json.to_string().contains(&secret));

    // Revoked: the device step fails.
    run_ok(&["device", "revoke", "laptop", "--dir", s(&dir)]);
    let (code, json) = doctor_standard(&dir, &addr);
    assert_eq!(code, Some(16), "{json}");
    assert_eq!(json["first_failure"], "device", "{json}");
    assert!(
        step(&json, "device")["saw"]
            .as_str()
            .unwrap()
            .contains("device_revoked"),
        "{json}"
    );
    server.kill();
}

#[test]
fn standard_doctor_against_a_server_without_standard_clients_fails_alpn() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let (server, addr) = serve(&dir, &[]);

    let (code, json) = doctor_standard(&dir, &addr);
    assert_eq!(code, Some(13), "{json}");
    assert_eq!(json["first_failure"], "alpn", "{json}");
    let alpn = step(&json, "alpn");
    assert_eq!(alpn["ok"], false, "{json}");
    assert!(
        alpn["fix"].as_str().unwrap().contains("--standard-clients"),
        "{json}"
    );
    assert_eq!(step(&json, "connect")["ok"], true, "{json}");
    assert_eq!(step(&json, "live_session")["skipped"], true, "{json}");
    server.kill();
}

#[test]
fn doctor_without_a_code_needs_standard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let out = run(&[
        "doctor",
        "--dir",
        s(&dir),
        "--server",
        "127.0.0.1:1",
        "--device",
        "laptop",
        "--user",
        "alice",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--standard"), "{out:?}");
}
