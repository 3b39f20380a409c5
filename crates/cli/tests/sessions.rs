//! `portcullis login` and `portcullis session list|revoke` against a running `portcullis serve`:
//! a login earns a session that the registry records, the list shows it, and revoking it (or
//! its device) marks it revoked.

mod common;

use common::*;
use serde_json::Value;

/// The sessions `session list --json` shows.
fn sessions(dir: &std::path::Path) -> Vec<Value> {
    run_json(&["session", "list", "--dir", s(dir), "--json"])
        .as_array()
        .expect("a JSON array")
        .clone()
}

fn login_json(
    dir: &std::path::Path,
    server: &str,
    device: &str,
    user: &str,
    secret: &str,
) -> Value {
    run_json(&[
        "login",
        "--dir",
        s(dir),
        "--server",
        server,
        "--device",
        device,
        "--user",
        user,
        "--secret",
        secret,
        "--json",
    ])
}

#[test]
fn login_earns_a_session_that_can_be_listed_and_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let bob = add_user(&dir, "bob");
    let laptop_fp = issue_device(&dir, "laptop", "alice");
    let desk_fp = issue_device(&dir, "desk", "bob");
    assert_eq!(
        run_ok(&["session", "list", "--dir", s(&dir)]).trim(),
        "no sessions"
    );
    let server = Server::start(&dir);

    // Alice logs in from her laptop.
    let login = login_json(&dir, &server.addr, "laptop", "alice", &alice);
    assert_eq!(login["user"], "alice");
    assert_eq!(login["device"], "laptop");
    let expires = login["session_expires"].as_str().expect("session_expires");
    let listed = sessions(&dir);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let session = &listed[0];
    assert_eq!(session["user"], "alice");
    assert_eq!(session["device"], "laptop");
    assert_eq!(session["fingerprint"], laptop_fp.as_str());
    assert_eq!(session["expires"], expires);
    assert_eq!(session["revoked"], Value::Null);
    assert_eq!(session["live"], true);
    let id = session["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // The table shows the same.
    let table = run_ok(&["session", "list", "--dir", s(&dir)]);
    let row = table.lines().find(|l| l.starts_with(&id)).expect("a row");
    assert!(
        row.contains("alice") && row.contains("laptop") && row.ends_with("live"),
        "{row}"
    );

    // Bob logs in with the plain output.
    let out = run_ok(&[
        "login",
        "--dir",
        s(&dir),
        "--server",
        &server.addr,
        "--device",
        "desk",
        "--user",
        "bob",
        "--secret",
        &bob,
    ]);
    assert!(
        out.starts_with(
            "logged in as bob from device desk: the device now holds a live session until "
        ),
        "{out}"
    );
    let listed = sessions(&dir);
    assert_eq!(listed.len(), 2);
    let bob_session = listed
        .iter()
        .find(|s| s["user"] == "bob")
        .expect("bob's session");
    assert_eq!(bob_session["fingerprint"], desk_fp.as_str());

    // Revoking Alice's session marks it, and only it.
    let out = run_ok(&["session", "revoke", &id, "--dir", s(&dir)]);
    assert!(
        out.starts_with(&format!("revoked session {id} of alice on device laptop (")),
        "{out}"
    );
    let listed = sessions(&dir);
    let alice_session = listed.iter().find(|s| s["id"] == id.as_str()).unwrap();
    assert!(alice_session["revoked"].is_string(), "{alice_session}");
    assert_eq!(alice_session["live"], false);
    let bob_session = listed.iter().find(|s| s["user"] == "bob").unwrap();
    assert_eq!(bob_session["live"], true);
    let table = run_ok(&["session", "list", "--dir", s(&dir)]);
    let row = table.lines().find(|l| l.starts_with(&id)).expect("a row");
    assert!(row.contains("revoked 20"), "{row}");
    // Revoking it again keeps it revoked.
    run_ok(&["session", "revoke", &id, "--dir", s(&dir)]);

    // Revoking Bob's device revokes Bob's session.
    run_ok(&["device", "revoke", "desk", "--dir", s(&dir)]);
    let listed = sessions(&dir);
    let bob_session = listed.iter().find(|s| s["user"] == "bob").unwrap();
    assert!(bob_session["revoked"].is_string(), "{bob_session}");
    assert_eq!(bob_session["live"], false);
    server.stop();
}

#[test]
fn login_without_a_code_or_a_terminal_fails_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    // stdin is not a terminal here; nothing listens on the port, but nothing connects either.
    let out = run(&[
        "login",
        "--dir",
        s(&dir),
        "--server",
        "127.0.0.1:9",
        "--device",
        "laptop",
        "--user",
        "alice",
    ]);
    assert_one_line_error(
        &out,
        &[
            "--code, --secret-file or --secret",
            "PORTCULLIS_TOTP_SECRET",
            "not a terminal",
        ],
    );
    // A code of the wrong shape is refused before connecting.
    let out = run(&[
        "login",
        "--dir",
        s(&dir),
        "--server",
        "127.0.0.1:9",
        "--device",
        "laptop",
        "--user",
        "alice",
        "--code",
        "12ab56",
    ]);
    assert_one_line_error(&out, &["--code", "6 to 8 digits"]);
}

#[test]
fn a_wrong_code_is_a_one_line_login_failure_and_records_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let server = Server::start(&dir);
    let code = wrong_code(&secret);
    let out = run(&[
        "login",
        "--dir",
        s(&dir),
        "--server",
        &server.addr,
        "--device",
        "laptop",
        "--user",
        "alice",
        "--code",
        &code,
    ]);
    assert_one_line_error(&out, &["login failed", "mfa_failed", "ref "]);
    assert!(sessions(&dir).is_empty());
    server.stop();
}

#[test]
fn session_revoke_refuses_a_bad_or_unknown_id_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let out = run(&["session", "revoke", "xyz", "--dir", s(&dir)]);
    assert_one_line_error(&out, &["32 hex digits"]);
    let unknown = "00112233445566778899aabbccddeeff";
    let out = run(&["session", "revoke", unknown, "--dir", s(&dir)]);
    assert_one_line_error(&out, &[&format!("no session {unknown}")]);
}
