//! Secrets at rest and in output: the registry key `init` makes, the key file checks of every
//! command that opens the registry, a wrong key refused when the registry is opened, and no
//! secret, code, key or ticket in any log line or error text.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{
    Output, Server, add_user, assert_one_line_error, init_dir, issue_device, run, run_json, run_ok,
    s, totp, unix_now,
};
use portcullis_core::{TotpAlgorithm, TotpConfig};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The registry file and its SQLite companions, byte for byte.
fn registry_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for name in ["portcullis.db", "portcullis.db-wal", "portcullis.db-shm"] {
        if let Ok(bytes) = fs::read(dir.join(name)) {
            all.extend(bytes);
        }
    }
    all
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The server's log once it holds `count` lines with `needle` (or the deadline passed).
fn server_log_with(server: &Server, needle: &str, count: usize) -> String {
    let deadline = std::time::Instant::now() + common::COMMAND_DEADLINE;
    loop {
        let log = server.stderr();
        if log.matches(needle).count() >= count || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `portcullis call` through the running server, as `user` on `device`, with `factor` flags.
fn call(dir: &Path, server: &Server, device: &str, user: &str, factor: &[&str]) -> Output {
    let mut args = vec![
        "call",
        "--dir",
        s(dir),
        "--server",
        &server.addr,
        "--server-name",
        "localhost",
        "--device",
        device,
        "--user",
        user,
    ];
    args.extend_from_slice(factor);
    run(&args)
}

#[test]
fn init_makes_a_private_registry_key_and_the_registry_holds_no_plain_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let key_path = dir.join("registry.key");
    assert!(key_path.is_file(), "init made no registry.key");
    assert_eq!(mode(&key_path), 0o600);
    let key = fs::read(&key_path).unwrap();
    assert_eq!(key.len(), 32);

    let secret = add_user(&dir, "alice");
    let raw = totp(&secret).secret().to_vec();
    let bytes = registry_bytes(&dir);
    assert!(contains(&bytes, b"alice"), "the registry holds the user");
    assert!(
        !contains(&bytes, &raw),
        "the raw TOTP secret is in the registry"
    );
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the base32 TOTP secret is in the registry"
    );
    assert!(
        !contains(&bytes, &key),
        "the registry key is in the registry"
    );

    // The secret still works: the registry opens it with the key.
    issue_device(&dir, "laptop", "alice");
    let server = Server::start(&dir);
    let out = call(&dir, &server, "laptop", "alice", &["--secret", &secret]);
    assert!(out.status.success(), "{out:?}");
    server.stop();

    // init --force makes a new key, private too.
    run_ok(&["init", "--dir", s(&dir), "--force"]);
    assert_eq!(mode(&key_path), 0o600);
    assert_ne!(fs::read(&key_path).unwrap(), key);
    assert_eq!(
        run_json(&["device", "list", "--dir", s(&dir), "--json"]),
        serde_json::json!([])
    );
}

#[test]
fn a_key_file_others_may_read_is_refused_by_every_command_that_opens_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let key_path = dir.join("registry.key");
    let k = s(&key_path);
    let expected =
        format!("{k}: the key file is readable by others (mode 0644); run chmod 600 {k}");

    chmod(&key_path, 0o644);
    let line = assert_one_line_error(&run(&["device", "list", "--dir", d]), &[&expected]);
    assert_eq!(line, format!("portcullis: {expected}"));
    for args in [
        vec!["device", "list", "--dir", d, "--json"],
        vec!["user", "add", "bob", "--dir", d],
        vec!["device", "issue", "tablet", "--user", "alice", "--dir", d],
        vec!["device", "revoke", "laptop", "--dir", d],
        vec!["serve", "--dir", d, "--listen", "127.0.0.1:0"],
    ] {
        assert_one_line_error(&run(&args), &[&expected]);
    }
    chmod(&key_path, 0o620);
    assert_one_line_error(
        &run(&["device", "list", "--dir", d]),
        &[k, "writable by others (mode 0620)", "chmod 600"],
    );

    // Nothing was changed by the refused commands, and the fixed mode lets them work.
    chmod(&key_path, 0o600);
    let listed = run_json(&["device", "list", "--dir", d, "--json"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0]["revoked"].is_null(), "{listed:?}");
    assert_one_line_error(
        &run(&["user", "add", "alice", "--dir", d]),
        &["alice", "exists"],
    );
    add_user(&dir, "bob");
}

#[test]
fn a_missing_or_broken_key_file_is_one_line_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let key_path = dir.join("registry.key");
    let k = s(&key_path);
    let key = fs::read(&key_path).unwrap();

    fs::remove_file(&key_path).unwrap();
    for args in [
        vec!["device", "list", "--dir", d],
        vec!["user", "add", "bob", "--dir", d],
        vec!["serve", "--dir", d, "--listen", "127.0.0.1:0"],
    ] {
        assert_one_line_error(&run(&args), &[k, "no registry key file", "--add-key"]);
    }

    fs::write(&key_path, &key[..31]).unwrap();
    chmod(&key_path, 0o600);
    assert_one_line_error(
        &run(&["device", "list", "--dir", d]),
        &[k, "exactly 32 bytes", "31"],
    );
    fs::write(&key_path, &key).unwrap();
    assert_eq!(run_ok(&["device", "list", "--dir", d]).trim(), "no devices");
}

#[test]
fn a_wrong_registry_key_is_refused_by_every_command_that_opens_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let key_path = dir.join("registry.key");
    let right = fs::read(&key_path).unwrap();
    let before = registry_bytes(&dir);

    // Another key of the right form: the registry refuses it when it is opened.
    let other: Vec<u8> = right.iter().map(|b| b ^ 0x5a).collect();
    fs::write(&key_path, &other).unwrap();
    assert_eq!(mode(&key_path), 0o600);
    let expected = format!(
        "{}: the registry key {} does not open the TOTP secrets sealed in this registry; restore the registry.key it was sealed with",
        s(&dir.join("portcullis.db")),
        s(&key_path)
    );
    let line = assert_one_line_error(&run(&["device", "list", "--dir", d]), &[&expected]);
    assert_eq!(line, format!("portcullis: {expected}"));
    for args in [
        vec!["device", "list", "--dir", d, "--json"],
        vec!["user", "list", "--dir", d],
        vec!["user", "add", "bob", "--dir", d],
        vec!["device", "issue", "tablet", "--user", "alice", "--dir", d],
        vec!["device", "revoke", "laptop", "--dir", d],
        vec!["user", "revoke", "alice", "--dir", d],
        vec!["session", "list", "--dir", d],
        vec!["serve", "--dir", d, "--listen", "127.0.0.1:0"],
    ] {
        let out = run(&args);
        let line = assert_one_line_error(&out, &[&expected]);
        for key in [&right, &other] {
            assert!(!line.to_lowercase().contains(&hex(key)), "{line}");
        }
        assert!(!line.contains(&secret), "{line}");
        assert!(!out.stdout.contains(&secret), "{out:?}");
    }
    // The refused commands wrote nothing (no device revoked, no user added): the registry is
    // as it was, byte for byte.
    assert!(!dir.join("devices").join("tablet.pem").exists());
    assert_eq!(
        registry_bytes(&dir),
        before,
        "a refused command changed the registry"
    );

    // With the right key back, everything works as before.
    fs::write(&key_path, &right).unwrap();
    let listed = run_json(&["device", "list", "--dir", d, "--json"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0]["revoked"].is_null(), "{listed:?}");
    let server = Server::start(&dir);
    let out = call(&dir, &server, "laptop", "alice", &["--secret", &secret]);
    assert!(out.status.success(), "{out:?}");
    server.stop();
}

#[test]
fn add_key_gives_an_old_directory_a_key_and_never_a_wrong_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let key_path = dir.join("registry.key");
    let k = s(&key_path);

    assert_one_line_error(
        &run(&["init", "--dir", d, "--add-key", "--force"]),
        &["--add-key", "--force"],
    );
    assert_one_line_error(
        &run(&["init", "--dir", d, "--add-key"]),
        &[k, "already exists"],
    );

    // A registry whose secrets are sealed under a key that is lost: no new key is left behind.
    add_user(&dir, "alice");
    let lost = fs::read(&key_path).unwrap();
    fs::remove_file(&key_path).unwrap();
    let line = assert_one_line_error(&run(&["init", "--dir", d, "--add-key"]), &[]);
    assert_eq!(
        line,
        format!(
            "portcullis: {}: the registry's TOTP secrets are sealed under another key: restore its registry.key",
            s(&dir.join("portcullis.db"))
        )
    );
    assert!(!line.to_lowercase().contains(&hex(&lost)), "{line}");
    assert!(
        !key_path.exists(),
        "a key that opens nothing was left behind"
    );
    fs::write(&key_path, &lost).unwrap();
    chmod(&key_path, 0o600);
    issue_device(&dir, "laptop", "alice");

    // A registry without secrets takes a new key.
    let empty = tmp.path().join("empty");
    run_ok(&["init", "--dir", s(&empty)]);
    fs::remove_file(empty.join("registry.key")).unwrap();
    let out = run_ok(&["init", "--dir", s(&empty), "--add-key"]);
    assert!(out.contains("registry.key"), "{out}");
    assert_eq!(mode(&empty.join("registry.key")), 0o600);
    add_user(&empty, "bob");
}

/// A code for `secret` (8 digits) that no step near now accepts.
fn wrong_code_8(config: &TotpConfig) -> String {
    let now = unix_now();
    let near: Vec<String> = (0..=12)
        .map(|i| config.generate((now + 90).saturating_sub(i * 15)))
        .collect();
    (0..10)
        .map(|d| d.to_string().repeat(8))
        .find(|c| !near.contains(c))
        .unwrap()
}

/// The longest run of characters that hex, base64 or base64url text is made of.
fn longest_encoded_run(text: &str) -> usize {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '-')))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[test]
fn no_secret_code_key_or_ticket_appears_in_logs_or_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    // Codes of 8 digits: nothing else in a log (times, ports, counters) is an 8-digit number
    // that could match one by chance.
    let user = run_json(&[
        "user", "add", "alice", "--dir", d, "--digits", "8", "--json",
    ]);
    let secret = user["secret"].as_str().unwrap().to_owned();
    let config = TotpConfig::from_base32(&secret, 8, TotpAlgorithm::Sha1, 30).unwrap();
    let raw_secret_hex = hex(config.secret());
    issue_device(&dir, "laptop", "alice");
    let registry_key = fs::read(dir.join("registry.key")).unwrap();
    let key_hex = hex(&registry_key);

    let server = Server::start_with_env(&dir, &[("RUST_LOG", "debug")]);
    let right = config.generate(unix_now());
    let wrong = wrong_code_8(&config);

    let accepted = call(
        &dir,
        &server,
        "laptop",
        "alice",
        &["--code", &right, "--json"],
    );
    assert!(accepted.status.success(), "{accepted:?}");
    // The first call stored its session; without it, a code is sent again.
    fs::remove_dir_all(dir.join("sessions")).unwrap();
    let refused_wrong = call(&dir, &server, "laptop", "alice", &["--code", &wrong]);
    assert_one_line_error(&refused_wrong, &["Unauthenticated", "mfa_failed"]);
    // The same code again is a reuse.
    let refused_reused = call(&dir, &server, "laptop", "alice", &["--code", &right]);
    assert_one_line_error(
        &refused_reused,
        &[
            "Unauthenticated",
            "mfa_failed",
            "this code was already used; wait for the next one",
        ],
    );
    let with_secret = call(
        &dir,
        &server,
        "laptop",
        "alice",
        &["--secret", &secret, "--digits", "8"],
    );
    // Within the same 30 s step as `right` the computed code is a reuse; either way the
    // output is checked below.
    let other_user = call(&dir, &server, "laptop", "mallory", &["--code", &right]);
    assert_one_line_error(&other_user, &["user_mismatch"]);
    let duplicate = run(&["user", "add", "alice", "--dir", d, "--json"]);
    assert_one_line_error(&duplicate, &["alice"]);

    // Every decision is in the log before it is read.
    server_log_with(&server, "connection accepted", 1);
    let log = server_log_with(&server, "connection refused", 3);
    server.stop();
    assert!(
        log.contains("DEBUG"),
        "the server did not log at debug: {log}"
    );
    assert!(log.contains("code_wrong"), "no wrong-code decision: {log}");
    assert!(
        log.contains("code_reused"),
        "no reused-code decision: {log}"
    );

    let outputs = [
        ("serve stderr", log.clone()),
        ("accepted call stdout", accepted.stdout.clone()),
        ("accepted call stderr", accepted.stderr.clone()),
        ("wrong-code call", refused_wrong.stderr.clone()),
        ("reused-code call", refused_reused.stderr.clone()),
        ("--secret call stdout", with_secret.stdout.clone()),
        ("--secret call stderr", with_secret.stderr.clone()),
        ("other user's call", other_user.stderr.clone()),
        ("duplicate user add", duplicate.stderr.clone()),
    ];
    for (what, text) in &outputs {
        let lower = text.to_lowercase();
        assert!(
            !text.contains(&secret),
            "{what} shows the base32 secret: {text}"
        );
        assert!(
            !lower.contains(&raw_secret_hex),
            "{what} shows the secret in hex: {text}"
        );
        assert!(
            !text.contains(&right),
            "{what} shows the accepted code: {text}"
        );
        assert!(
            !text.contains(&wrong),
            "{what} shows the wrong code: {text}"
        );
        assert!(
            !lower.contains(&key_hex),
            "{what} shows the registry key: {text}"
        );
        // A session ticket (more than a hundred bytes sealed) would be a long run of hex or
        // base64; the longest legitimate run is a 64-digit fingerprint.
        let longest = longest_encoded_run(text);
        assert!(
            longest <= 72,
            "{what} holds an encoded blob of {longest} characters: {text}"
        );
    }
}
