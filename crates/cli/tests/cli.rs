//! The `portcullis` binary as a person types it: the walkthrough from `init` to a revoked
//! device, and the one-line error of every command on bad flags, missing files and broken PEM.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use common::{
    ChildGuard, Server, add_user, assert_one_line_error, command, init_dir, issue_device, run,
    run_json, run_ok, s, totp, unix_now, wrong_code,
};
use portcullis_tls::devpki::DevCa;
use serde_json::Value;

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The secret in an `otpauth://` URI.
fn secret_of(uri: &str) -> String {
    let query = uri.split_once('?').expect("otpauth URI has a query").1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("secret="))
        .expect("otpauth URI has a secret")
        .to_owned()
}

/// The longest run of consecutive lines made only of the terminal QR characters (full and half
/// blocks and spaces, with at least one block), all of the same width.
fn qr_block_height(text: &str) -> usize {
    let is_qr_line = |l: &str| {
        !l.is_empty()
            && l.chars().all(|c| matches!(c, '█' | '▀' | '▄' | ' '))
            && l.chars().any(|c| matches!(c, '▀' | '▄'))
    };
    let (mut best, mut run, mut width) = (0, 0, 0);
    for line in text.lines() {
        let w = line.chars().count();
        if is_qr_line(line) && (run == 0 || w == width) {
            run += 1;
            width = w;
        } else if is_qr_line(line) {
            run = 1;
            width = w;
        } else {
            run = 0;
        }
        best = best.max(run);
    }
    best
}

fn call_args<'a>(dir: &'a Path, server: &'a str, device: &'a str, user: &'a str) -> Vec<&'a str> {
    vec![
        "call",
        "--dir",
        s(dir),
        "--server",
        server,
        "--server-name",
        "localhost",
        "--device",
        device,
        "--user",
        user,
    ]
}

#[test]
fn walkthrough_from_init_to_a_revoked_device() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pc");
    let d = s(&dir);

    // init
    let out = run_ok(&["init", "--dir", d]);
    assert!(out.contains("initialised"), "{out}");
    for file in [
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "portcullis.db",
        "registry.key",
        "ticket.key",
    ] {
        assert!(dir.join(file).is_file(), "init made no {file}");
    }
    for key in ["ca-key.pem", "server-key.pem", "registry.key", "ticket.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key} is readable by others");
    }

    // user add --json
    let alice = run_json(&["user", "add", "alice", "--dir", d, "--json"]);
    assert_eq!(
        keys(&alice),
        set(&["user", "secret", "otpauth", "digits", "period", "algorithm"])
    );
    assert_eq!(alice["user"], "alice");
    assert_eq!(alice["digits"], 6);
    assert_eq!(alice["period"], 30);
    assert_eq!(alice["algorithm"], "SHA1");
    let alice_secret = alice["secret"].as_str().unwrap().to_owned();
    let alice_uri = alice["otpauth"].as_str().unwrap();
    assert!(alice_uri.starts_with("otpauth://totp/"), "{alice_uri}");
    assert_eq!(secret_of(alice_uri), alice_secret);
    totp(&alice_secret); // valid base32

    // user add, for a person: URI and QR code
    let bob_out = run_ok(&["user", "add", "bob", "--dir", d]);
    let bob_uri = bob_out
        .split_whitespace()
        .find(|w| w.starts_with("otpauth://totp/"))
        .unwrap_or_else(|| panic!("no otpauth URI in: {bob_out}"));
    assert!(bob_uri.contains("bob"), "{bob_uri}");
    let bob_secret = secret_of(bob_uri);
    assert_ne!(bob_secret, alice_secret);
    assert!(
        qr_block_height(&bob_out) >= 10,
        "no QR block of unicode half blocks in: {bob_out}"
    );

    // device issue --json
    let laptop = run_json(&[
        "device", "issue", "laptop", "--user", "alice", "--dir", d, "--json",
    ]);
    assert_eq!(
        keys(&laptop),
        set(&["device", "user", "fingerprint", "cert", "key"])
    );
    assert_eq!(laptop["device"], "laptop");
    assert_eq!(laptop["user"], "alice");
    let laptop_fp = laptop["fingerprint"].as_str().unwrap().to_owned();
    assert!(is_fingerprint(&laptop_fp), "{laptop_fp}");
    let cert = Path::new(laptop["cert"].as_str().unwrap());
    let key = Path::new(laptop["key"].as_str().unwrap());
    assert!(cert.is_file() && key.is_file());
    assert_eq!(mode(key), 0o600, "device key is readable by others");
    let der = &portcullis_tls::load_certs(cert).unwrap()[0];
    assert_eq!(
        portcullis_tls::fingerprint(der.as_ref())
            .unwrap()
            .to_string(),
        laptop_fp
    );

    // device bind: a certificate made by the dev CA outside the CLI
    let ca = DevCa::from_pem(
        &fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let tablet = ca.issue_device("tablet").unwrap();
    let tablet_fp = portcullis_tls::fingerprint(tablet.cert_der().as_ref())
        .unwrap()
        .to_string();
    let tablet_cert = dir.join("devices/tablet.pem");
    tablet
        .write(&tablet_cert, &dir.join("devices/tablet-key.pem"))
        .unwrap();
    let bound = run_json(&[
        "device",
        "bind",
        "tablet",
        "--user",
        "bob",
        "--cert",
        s(&tablet_cert),
        "--dir",
        d,
        "--json",
    ]);
    assert_eq!(bound["device"], "tablet");
    assert_eq!(bound["user"], "bob");
    assert_eq!(bound["fingerprint"], tablet_fp.as_str());

    // device list, for a person and as JSON
    let list = run_ok(&["device", "list", "--dir", d]);
    let laptop_row = list
        .lines()
        .find(|l| l.starts_with("laptop"))
        .unwrap_or_else(|| panic!("no laptop row in: {list}"));
    assert!(
        laptop_row.contains("alice") && laptop_row.contains(&laptop_fp),
        "{list}"
    );
    assert!(laptop_row.contains("active"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("tablet") && l.contains("bob"))
    );
    let listed = run_json(&["device", "list", "--dir", d, "--json"]);
    let listed = listed.as_array().expect("a JSON array");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let entry = listed.iter().find(|e| e["device"] == "laptop").unwrap();
    assert_eq!(entry["user"], "alice");
    assert_eq!(entry["fingerprint"], laptop_fp.as_str());
    assert!(entry["revoked"].is_null());

    // serve, in the background
    let mut server = Server::start(&dir);
    let addr = server.addr.clone();
    assert!(server.port() > 0);

    // login with --secret: the session is stored for the device
    let mut args = call_args(&dir, &addr, "laptop", "alice");
    args[0] = "login";
    args.extend(["--secret", &alice_secret, "--json"]);
    let login = run_json(&args);
    assert_eq!(login["user"], "alice");
    assert_eq!(login["device"], "laptop");

    // call on the stored session: no code
    let mut args = call_args(&dir, &addr, "laptop", "alice");
    args.push("--json");
    let reply = run_json(&args);
    assert_eq!(
        keys(&reply),
        set(&["text", "user", "device", "auth_method"])
    );
    assert_eq!(reply["text"], "hello");
    assert_eq!(reply["user"], "alice");
    assert_eq!(reply["device"], laptop_fp.as_str());
    assert_eq!(reply["auth_method"], "session");

    // call with --code computed here, through the bound device
    let code = totp(&bob_secret).generate(unix_now());
    let mut args = call_args(&dir, &addr, "tablet", "bob");
    args.extend(["--code", &code, "--text", "over the drawbridge", "--json"]);
    let reply = run_json(&args);
    assert_eq!(reply["text"], "over the drawbridge");
    assert_eq!(reply["user"], "bob");
    assert_eq!(reply["device"], tablet_fp.as_str());
    assert_eq!(reply["auth_method"], "totp");

    // logout drops the stored session; then a code is needed again
    let mut args = vec!["logout"];
    args.extend(
        call_args(&dir, &addr, "laptop", "alice")
            .into_iter()
            .skip(1),
    );
    let out = run_ok(&args);
    assert!(out.contains("logged out alice"), "{out}");
    let args = call_args(&dir, &addr, "laptop", "alice");
    assert_one_line_error(&run(&args), &["no stored session", "portcullis login"]);

    // a wrong code
    let wrong = wrong_code(&alice_secret);
    let mut args = call_args(&dir, &addr, "laptop", "alice");
    args.extend(["--code", &wrong, "--json"]);
    assert_one_line_error(&run(&args), &["Unauthenticated", "mfa_failed"]);

    // revoke in another process while the server runs; the very next call is refused
    let revoked = run_ok(&["device", "revoke", "laptop", "--dir", d]);
    assert!(revoked.contains("laptop"), "{revoked}");
    let mut args = call_args(&dir, &addr, "laptop", "alice");
    args.extend(["--secret", &alice_secret, "--json"]);
    assert_one_line_error(&run(&args), &["Unauthenticated", "device_revoked"]);

    let listed = run_json(&["device", "list", "--dir", d, "--json"]);
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["device"] == "laptop")
        .unwrap()
        .clone();
    assert!(entry["revoked"].is_string(), "{entry}");
    assert!(
        run_ok(&["device", "list", "--dir", d])
            .lines()
            .any(|l| l.starts_with("laptop") && l.contains("revoked"))
    );

    // a revoked device's certificate bound again under a new name works again
    let mut args = vec!["device", "bind", "laptop2", "--user", "alice", "--cert"];
    let laptop_cert = dir.join("devices/laptop.pem");
    args.extend([s(&laptop_cert), "--dir", d]);
    let out = run_ok(&args);
    assert!(out.contains("laptop2"), "{out}");

    assert!(
        server.is_running(),
        "the server died; stderr: {}",
        server.stderr()
    );
    server.stop();
}

#[test]
fn help_exits_zero_and_names_the_contract_flags() {
    let top = run_ok(&["--help"]);
    for word in ["init", "user", "device", "serve", "call"] {
        assert!(top.contains(word), "--help does not list {word}: {top}");
    }
    let device = run_ok(&["device", "--help"]);
    for word in ["issue", "bind", "list", "revoke"] {
        assert!(
            device.contains(word),
            "device --help lacks {word}: {device}"
        );
    }
    let cases: &[(&[&str], &[&str])] = &[
        (&["init"], &["--dir", "--server-name", "--force"]),
        (
            &["user", "add"],
            &["--dir", "--digits", "--algorithm", "--json"],
        ),
        (&["device", "issue"], &["--user", "--dir", "--json"]),
        (
            &["device", "bind"],
            &["--user", "--cert", "--dir", "--json"],
        ),
        (&["device", "list"], &["--dir", "--json"]),
        (&["device", "revoke"], &["--dir"]),
        (
            &["serve"],
            &["--dir", "--listen", "--session-ttl", "--clock-skew"],
        ),
        (
            &["call"],
            &[
                "--dir",
                "--server",
                "--device",
                "--user",
                "--code",
                "--secret",
                "--server-name",
                "--text",
                "--json",
            ],
        ),
    ];
    for (cmd, flags) in cases {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = run_ok(&args);
        for flag in *flags {
            assert!(help.contains(flag), "{cmd:?} --help lacks {flag}: {help}");
        }
    }
}

#[test]
fn init_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pc");
    let d = s(&dir);

    assert_one_line_error(&run(&["init", "--dir", d, "--bogus"]), &["--bogus"]);
    assert!(!dir.exists(), "a refused init made the directory");
    assert_one_line_error(&run(&["init"]), &["--dir"]);
    assert_one_line_error(&run(&["init", "--dir"]), &["--dir"]);
    assert_one_line_error(
        &run(&["init", "--dir", d, "--server-name", "two words"]),
        &["--server-name"],
    );

    // a directory that cannot be made (its parent is a file)
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let below = file.join("pc");
    assert_one_line_error(&run(&["init", "--dir", s(&below)]), &[s(&file)]);

    // an existing directory, without and with --force
    run_ok(&["init", "--dir", d]);
    let ca_before = fs::read(dir.join("ca.pem")).unwrap();
    assert_one_line_error(&run(&["init", "--dir", d]), &[d, "--force"]);
    assert_eq!(
        fs::read(dir.join("ca.pem")).unwrap(),
        ca_before,
        "a refused init changed the CA"
    );
    fs::set_permissions(dir.join("ca-key.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    add_user(&dir, "olduser");
    issue_device(&dir, "old-laptop", "olduser");
    let out = run_ok(&["init", "--dir", d, "--force"]);
    assert_ne!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);
    // Nothing is lost: the previous files and devices are moved aside, and the output says where.
    let aside: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("replaced-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let aside = &aside[0];
    assert!(out.contains(&aside.display().to_string()), "{out}");
    assert_eq!(fs::read(aside.join("ca.pem")).unwrap(), ca_before);
    assert!(aside.join("portcullis.db").is_file());
    assert!(aside.join("registry.key").is_file());
    assert!(aside.join("devices/old-laptop.pem").is_file());
    assert!(!dir.join("devices/old-laptop.pem").exists());
    assert_eq!(mode(aside), 0o700);
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.join("ticket.key")), 0o600);
    assert_eq!(mode(&dir.join("registry.key")), 0o600);
}

#[test]
fn user_add_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");

    assert_one_line_error(
        &run(&["user", "add", "carol", "--dir", d, "--bogus"]),
        &["--bogus"],
    );
    assert_one_line_error(&run(&["user", "add", "carol"]), &["--dir"]);
    assert_one_line_error(&run(&["user", "add", "--dir", d]), &["USER"]);
    assert_one_line_error(
        &run(&["user", "add", "carol", "--dir", s(&missing)]),
        &[s(&missing)],
    );
    // a directory that is not a Portcullis directory
    assert_one_line_error(
        &run(&["user", "add", "carol", "--dir", s(tmp.path())]),
        &["portcullis.db"],
    );
    assert_one_line_error(
        &run(&["user", "add", "carol", "--dir", d, "--digits", "9"]),
        &["--digits", "9"],
    );
    assert_one_line_error(
        &run(&["user", "add", "carol", "--dir", d, "--algorithm", "MD5"]),
        &["--algorithm", "MD5"],
    );
    add_user(&dir, "alice");
    assert_one_line_error(
        &run(&["user", "add", "alice", "--dir", d]),
        &["alice", "exists"],
    );
    // none of the refused commands added carol
    let json = run_json(&[
        "user",
        "add",
        "carol",
        "--dir",
        d,
        "--digits",
        "8",
        "--algorithm",
        "SHA256",
        "--json",
    ]);
    assert_eq!(json["digits"], 8);
    assert_eq!(json["algorithm"], "SHA256");
}

#[test]
fn device_issue_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");
    add_user(&dir, "alice");

    assert_one_line_error(
        &run(&[
            "device", "issue", "laptop", "--user", "alice", "--dir", d, "--bogus",
        ]),
        &["--bogus"],
    );
    assert_one_line_error(
        &run(&["device", "issue", "laptop", "--dir", d]),
        &["--user"],
    );
    assert_one_line_error(
        &run(&["device", "issue", "laptop", "--user", "alice"]),
        &["--dir"],
    );
    assert_one_line_error(
        &run(&[
            "device",
            "issue",
            "laptop",
            "--user",
            "alice",
            "--dir",
            s(&missing),
        ]),
        &[s(&missing)],
    );
    assert_one_line_error(
        &run(&["device", "issue", "laptop", "--user", "nobody", "--dir", d]),
        &["nobody"],
    );
    assert_one_line_error(
        &run(&[
            "device",
            "issue",
            "../escape",
            "--user",
            "alice",
            "--dir",
            d,
        ]),
        &["device name", "path separator"],
    );
    assert!(!dir.join("escape.pem").exists());
    issue_device(&dir, "laptop", "alice");
    let laptop_pem = fs::read(dir.join("devices/laptop.pem")).unwrap();
    assert_one_line_error(
        &run(&["device", "issue", "laptop", "--user", "alice", "--dir", d]),
        &["laptop", "exists"],
    );
    assert_eq!(
        fs::read(dir.join("devices/laptop.pem")).unwrap(),
        laptop_pem,
        "a refused issue overwrote the device certificate"
    );
}

#[test]
fn device_bind_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");
    add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let good = dir.join("devices/laptop.pem");
    let g = s(&good);

    let bind = |name: &str, user: &str, cert: &str, dir: &str| {
        run(&[
            "device", "bind", name, "--user", user, "--cert", cert, "--dir", dir,
        ])
    };

    assert_one_line_error(
        &run(&[
            "device", "bind", "pc", "--user", "alice", "--cert", g, "--dir", d, "--bogus",
        ]),
        &["--bogus"],
    );
    assert_one_line_error(
        &run(&["device", "bind", "pc", "--user", "alice", "--dir", d]),
        &["--cert"],
    );
    assert_one_line_error(
        &run(&["device", "bind", "pc", "--cert", g, "--dir", d]),
        &["--user"],
    );
    assert_one_line_error(&bind("pc", "alice", g, s(&missing)), &[s(&missing)]);
    assert_one_line_error(&bind("pc", "nobody", g, d), &["nobody"]);

    let no_file = tmp.path().join("absent.pem");
    assert_one_line_error(&bind("pc", "alice", s(&no_file), d), &[s(&no_file)]);
    let empty = tmp.path().join("empty.pem");
    fs::write(&empty, "").unwrap();
    assert_one_line_error(&bind("pc", "alice", s(&empty), d), &[s(&empty), "empty"]);
    let garbage = tmp.path().join("garbage.pem");
    fs::write(&garbage, "this is not a certificate\n").unwrap();
    assert_one_line_error(&bind("pc", "alice", s(&garbage), d), &[s(&garbage)]);
    let broken = tmp.path().join("broken.pem");
    fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert_one_line_error(&bind("pc", "alice", s(&broken), d), &[s(&broken)]);
    let key = dir.join("devices/laptop-key.pem");
    assert_one_line_error(&bind("pc", "alice", s(&key), d), &[s(&key), "CERTIFICATE"]);
    // the server certificate is not a client certificate
    let server_pem = dir.join("server.pem");
    assert_one_line_error(
        &bind("pc", "alice", s(&server_pem), d),
        &[s(&server_pem), "clientAuth"],
    );
    // the same certificate twice
    assert_one_line_error(&bind("pc", "alice", g, d), &["laptop"]);

    let listed = run_json(&["device", "list", "--dir", d, "--json"]);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "a refused bind left a binding: {listed}"
    );
}

#[test]
fn device_list_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");

    assert_eq!(run_ok(&["device", "list", "--dir", d]).trim(), "no devices");
    assert_eq!(
        run_json(&["device", "list", "--dir", d, "--json"]),
        Value::Array(vec![])
    );
    assert_one_line_error(
        &run(&["device", "list", "--dir", d, "--bogus"]),
        &["--bogus"],
    );
    assert_one_line_error(&run(&["device", "list"]), &["--dir"]);
    assert_one_line_error(
        &run(&["device", "list", "--dir", s(&missing)]),
        &[s(&missing)],
    );

    let db = dir.join("portcullis.db");
    fs::write(&db, "this is not a registry, just some text\n".repeat(200)).unwrap();
    assert_one_line_error(&run(&["device", "list", "--dir", d]), &["portcullis.db"]);
    let mut sqlite_like = b"SQLite format 3\0".to_vec();
    sqlite_like.extend(std::iter::repeat_n(0xA5u8, 8192));
    fs::write(&db, &sqlite_like).unwrap();
    assert_one_line_error(&run(&["device", "list", "--dir", d]), &["portcullis.db"]);
    fs::write(&db, "").unwrap();
    assert_one_line_error(&run(&["device", "list", "--dir", d]), &["portcullis.db"]);
    assert_eq!(
        fs::metadata(&db).unwrap().len(),
        0,
        "an empty registry file was turned into a new registry"
    );
}

#[test]
fn device_revoke_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");
    add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");

    assert_one_line_error(
        &run(&["device", "revoke", "laptop", "--dir", d, "--bogus"]),
        &["--bogus"],
    );
    assert_one_line_error(&run(&["device", "revoke", "--dir", d]), &["NAME"]);
    assert_one_line_error(&run(&["device", "revoke", "laptop"]), &["--dir"]);
    assert_one_line_error(
        &run(&["device", "revoke", "laptop", "--dir", s(&missing)]),
        &[s(&missing)],
    );
    assert_one_line_error(&run(&["device", "revoke", "nope", "--dir", d]), &["nope"]);
    run_ok(&["device", "revoke", "laptop", "--dir", d]);
    assert_one_line_error(
        &run(&["device", "revoke", "laptop", "--dir", d]),
        &["laptop"],
    );
}

#[test]
fn serve_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");

    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", "127.0.0.1:0", "--bogus"]),
        &["--bogus"],
    );
    assert_one_line_error(&run(&["serve", "--dir", d]), &["--listen"]);
    assert_one_line_error(&run(&["serve", "--listen", "127.0.0.1:0"]), &["--dir"]);
    assert_one_line_error(
        &run(&["serve", "--dir", s(&missing), "--listen", "127.0.0.1:0"]),
        &[s(&missing)],
    );
    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", "nohostport"]),
        &["--listen"],
    );
    assert_one_line_error(
        &run(&[
            "serve",
            "--dir",
            d,
            "--listen",
            "127.0.0.1:0",
            "--clock-skew",
            "0",
        ]),
        &["--clock-skew"],
    );

    // a port already in use
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", &taken_addr]),
        &[&taken_addr],
    );
    drop(taken);

    // broken PEM files
    let server_pem = dir.join("server.pem");
    let good_pem = fs::read(&server_pem).unwrap();
    fs::write(&server_pem, "garbage, not a certificate\n").unwrap();
    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]),
        &["server.pem"],
    );
    fs::write(&server_pem, &good_pem).unwrap();
    let server_key = dir.join("server-key.pem");
    fs::write(&server_key, "").unwrap();
    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]),
        &["server-key.pem"],
    );
    // a key that does not belong to the certificate
    fs::copy(dir.join("ca-key.pem"), &server_key).unwrap();
    assert_one_line_error(&run(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]), &[]);
    let ca_pem = dir.join("ca.pem");
    fs::remove_file(&ca_pem).unwrap();
    assert_one_line_error(
        &run(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]),
        &["ca.pem"],
    );
}

#[test]
fn call_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let missing = tmp.path().join("nowhere");
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    // nothing listens on this port any more
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let c = closed.as_str();
    let call = |extra: &[&str]| {
        let mut args = vec![
            "call", "--dir", d, "--server", c, "--device", "laptop", "--user", "alice",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };

    assert_one_line_error(&call(&["--code", "123456", "--bogus"]), &["--bogus"]);
    assert_one_line_error(
        &run(&[
            "call", "--dir", d, "--device", "laptop", "--user", "alice", "--code", "123456",
        ]),
        &["--server"],
    );
    assert_one_line_error(
        &run(&[
            "call", "--server", c, "--device", "laptop", "--user", "alice", "--code", "123456",
        ]),
        &["--dir"],
    );
    assert_one_line_error(
        &run(&[
            "call",
            "--dir",
            s(&missing),
            "--server",
            c,
            "--device",
            "laptop",
            "--user",
            "alice",
            "--code",
            "123456",
        ]),
        &[s(&missing)],
    );
    assert_one_line_error(
        &run(&[
            "call", "--dir", d, "--server", c, "--device", "nodev", "--user", "alice", "--code",
            "123456",
        ]),
        &["nodev.pem"],
    );
    assert_one_line_error(
        &run(&[
            "call",
            "--dir",
            d,
            "--server",
            "nohostport",
            "--device",
            "laptop",
            "--user",
            "alice",
            "--code",
            "123456",
        ]),
        &["--server", "nohostport"],
    );
    assert_one_line_error(
        &call(&["--code", "123456", "--secret", &secret]),
        &["--code", "--secret"],
    );
    assert_one_line_error(&call(&[]), &["--code", "--secret"]);
    assert_one_line_error(&call(&["--secret", "not base32!"]), &["--secret"]);
    assert_one_line_error(&call(&["--code", "12ab56"]), &["--code"]);
    // nobody listens: the gRPC code, on one line
    assert_one_line_error(&call(&["--secret", &secret]), &["Unavailable"]);

    // a broken device key, then a broken device certificate
    issue_device(&dir, "broken", "alice");
    let key = dir.join("devices/broken-key.pem");
    fs::write(&key, "garbage\n").unwrap();
    let broken = |extra: &[&str]| {
        let mut args = vec![
            "call", "--dir", d, "--server", c, "--device", "broken", "--user", "alice",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_one_line_error(&broken(&["--code", "123456"]), &["broken-key.pem"]);
    fs::copy(dir.join("devices/broken.pem"), &key).unwrap();
    assert_one_line_error(&broken(&["--code", "123456"]), &["broken-key.pem"]);
    fs::write(dir.join("devices/broken.pem"), "").unwrap();
    assert_one_line_error(&broken(&["--code", "123456"]), &["broken.pem"]);
}

#[test]
fn a_closed_stdout_is_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let mut cmd = command();
    cmd.args(["user", "add", "alice", "--dir", s(&dir)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::new(cmd.spawn().unwrap());
    // Close the reading end before the command writes its QR code.
    drop(guard.child().stdout.take());
    let mut stderr = String::new();
    std::io::Read::read_to_string(guard.child().stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let status = guard.child().wait().unwrap();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(status.success(), "{status}: {stderr}");
    drop(guard);
    // the user was added all the same
    assert_one_line_error(
        &run(&["user", "add", "alice", "--dir", s(&dir)]),
        &["alice"],
    );
}

#[test]
fn names_that_spoof_listings_or_paths_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    add_user(&dir, "alice");
    for (verb, name, needle) in [
        ("user", "alice\u{202e}gpj.exe", "bidirectional"),
        ("user", "zero\u{200b}width", "invisible"),
        ("user", "ops/root", "path separator"),
        ("device", ".", "'.' and '..' are not names"),
        ("device", "../../etc/passwd", "path separator"),
        ("device", "lap\u{2067}top", "bidirectional"),
    ] {
        let out = match verb {
            "user" => run(&["user", "add", name, "--dir", d]),
            _ => run(&["device", "issue", name, "--user", "alice", "--dir", d]),
        };
        let line = assert_one_line_error(&out, &[needle]);
        // The error does not repeat the name: its formatting characters would act on the
        // terminal showing it.
        assert!(
            !line.chars().any(portcullis_core::is_hidden_format),
            "{line:?}"
        );
    }
    // Nothing was written: no such user, no device file outside or inside the directory.
    let users = run_ok(&["user", "list", "--dir", d]);
    assert!(!users.contains("gpj") && !users.contains("ops"), "{users}");
    assert!(!dir.join("devices/...pem").exists());
    assert!(!tmp.path().join("etc").exists());
}
