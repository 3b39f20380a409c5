//! Sessions that persist between commands: `portcullis login` stores the session ticket under
//! `DIR/sessions/DEVICE/` (mode 0600), `call` and `doctor` use it without a code, `logout`
//! drops it. And codes that were already accepted: refused with their own hint, never counted
//! towards the lockout, while wrong codes still lock the user out.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Writes the user's TOTP secret to a file of mode 0600, as `--secret-file` wants it.
fn secret_file(dir: &Path, user: &str, secret: &str) -> PathBuf {
    let path = dir.join(format!("{user}.totp"));
    fs::write(&path, secret).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

fn connect_args<'a>(dir: &'a Path, server: &'a Server) -> Vec<&'a str> {
    vec![
        "--dir",
        s(dir),
        "--server",
        &server.addr,
        "--device",
        "laptop",
        "--user",
        "alice",
    ]
}

/// `COMMAND` with the connection flags and `more`.
fn cmd<'a>(command: &'a str, base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![command];
    args.extend_from_slice(base);
    args.extend_from_slice(more);
    args
}

/// Waits until at least `secs` seconds are left in the current 30 s TOTP step, so that what
/// follows runs within one step.
fn at_least_left_in_step(secs: u64) {
    let into = unix_now() % 30;
    if 30 - into < secs {
        std::thread::sleep(Duration::from_secs(30 - into) + Duration::from_millis(200));
    }
}

#[test]
fn ten_calls_after_one_login_use_the_stored_session_until_logout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let secret_path = secret_file(tmp.path(), "alice", &secret);
    let server = Server::start(&dir);
    let base = connect_args(&dir, &server);

    // Without a stored session and without a factor, `call` says what to do, at once.
    let none = run(&cmd("call", &base, &[]));
    assert_one_line_error(&none, &["no stored session", "portcullis login"]);

    let login = run_ok(&cmd("login", &base, &["--secret-file", s(&secret_path)]));
    assert!(login.contains("logged in as alice"), "{login}");
    let stored: Vec<_> = fs::read_dir(dir.join("sessions/laptop"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&stored[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", stored[0].display());
        let dir_mode = fs::metadata(dir.join("sessions/laptop"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    // `call` ten times: no code, the session.
    for i in 0..10 {
        let args = cmd("call", &base, &["--json", "--text", "again"]);
        let reply: Value = serde_json::from_str(run_ok(&args).trim()).unwrap();
        assert_eq!(reply["auth_method"], "session", "call {i}: {reply}");
        assert_eq!(reply["user"], "alice");
    }
    // doctor walks the path on the stored session too.
    let doctor = run(&cmd("doctor", &base, &[]));
    assert!(doctor.status.success(), "{doctor:?}");
    assert!(doctor.stdout.contains("stored"), "{}", doctor.stdout);

    // One session in the registry: the calls earned none of their own.
    let sessions = run_json(&["session", "list", "--dir", s(&dir), "--json"]);
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");

    let args = cmd("logout", &base, &[]);
    let out = run_ok(&args);
    assert!(out.contains("logged out alice"), "{out}");
    assert!(!stored[0].exists());
    let again = run_ok(&args);
    assert!(again.contains("nothing to do"), "{again}");
    let after = run(&cmd("call", &base, &[]));
    assert_one_line_error(&after, &["no stored session", "portcullis login"]);

    // A revoked session is refused, and the call says to log in again (bob: alice's code of
    // this step is spent).
    let bob_secret = add_user(&dir, "bob");
    issue_device(&dir, "desk", "bob");
    let bob_path = secret_file(tmp.path(), "bob", &bob_secret);
    let bob = [
        "--dir",
        s(&dir),
        "--server",
        &server.addr,
        "--device",
        "desk",
        "--user",
        "bob",
    ];
    run_ok(&cmd("login", &bob, &["--secret-file", s(&bob_path)]));
    let listed = run_json(&["session", "list", "--dir", s(&dir), "--json"]);
    let id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["user"] == "bob")
        .expect("bob's session")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    run_ok(&cmd("call", &bob, &[]));
    run_ok(&["session", "revoke", &id, "--dir", s(&dir)]);
    let revoked = run(&cmd("call", &bob, &[]));
    assert_one_line_error(&revoked, &["stored session ended", "portcullis login"]);
    server.stop();
}

#[test]
fn reused_codes_never_lock_the_user_out_and_five_wrong_codes_still_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let secret_path = secret_file(tmp.path(), "alice", &secret);
    let server = Server::start(&dir);
    let base = connect_args(&dir, &server);
    let sessions = dir.join("sessions");

    at_least_left_in_step(20);
    // Ten runs with the secret in one step: the first earns a session, the others use it.
    for i in 0..10 {
        let reply: Value = serde_json::from_str(
            run_ok(&cmd(
                "call",
                &base,
                &["--secret-file", s(&secret_path), "--json"],
            ))
            .trim(),
        )
        .unwrap();
        let want = if i == 0 { "totp" } else { "session" };
        assert_eq!(reply["auth_method"], want, "run {i}: {reply}");
    }
    // Ten more without the stored session (another machine's view of the same step): each
    // sends the code already accepted, and is told so; none is a failure.
    for i in 0..10 {
        let _ = fs::remove_dir_all(&sessions);
        let out = run(&cmd("call", &base, &["--secret-file", s(&secret_path)]));
        assert_one_line_error(
            &out,
            &[
                "mfa_failed",
                "this code was already used; wait for the next one",
            ],
        );
        assert!(!out.stderr.contains("locked_out"), "reuse {i}: {out:?}");
    }
    // Five wrong codes: failures, and the fifth sets off the lockout that even the right code
    // meets afterwards.
    let wrong = wrong_code(&secret);
    for i in 0..5 {
        let out = run(&cmd("call", &base, &["--code", &wrong]));
        assert_one_line_error(&out, &["mfa_failed", "the one-time code was not accepted"]);
        assert!(
            !out.stderr.contains("locked_out"),
            "wrong code {i}: {out:?}"
        );
    }
    let _ = fs::remove_dir_all(&sessions);
    let locked = run(&cmd("call", &base, &["--secret-file", s(&secret_path)]));
    assert_one_line_error(&locked, &["locked_out", "too many failed codes for alice"]);
    server.stop();
}
