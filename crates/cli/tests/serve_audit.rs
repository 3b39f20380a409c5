//! `portcullis serve --audit-log FILE --metrics-listen ADDR`: the `metrics on` line, one JSON
//! record per call in the file, the endpoint's counters, and one-line errors for a bad file or
//! address.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    COMMAND_DEADLINE, ChildGuard, Output, add_user, assert_one_line_error, init_dir, issue_device,
    run, s, serve_printing, totp, unix_now, wrong_code,
};

/// A running `portcullis serve` with extra flags and the addresses it printed.
struct Serving {
    _child: ChildGuard,
    addr: String,
    metrics: String,
}

/// Starts `portcullis serve --dir DIR --listen 127.0.0.1:0 EXTRA...` and waits for its
/// `listening on` and `metrics on` lines.
fn serve(dir: &Path, extra: &[&str]) -> Serving {
    let (child, lines) = serve_printing(dir, extra, 2);
    let addr = lines[0]
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {lines:?}"))
        .to_owned();
    let metrics = lines[1]
        .strip_prefix("metrics on ")
        .unwrap_or_else(|| panic!("second line: {lines:?}"))
        .to_owned();
    Serving {
        _child: child,
        addr,
        metrics,
    }
}

fn call(dir: &Path, server: &Serving, code: &str) -> Output {
    call_at(dir, &server.addr, code)
}

/// `portcullis call` of alice's laptop to `addr`.
fn call_at(dir: &Path, addr: &str, code: &str) -> Output {
    run(&[
        "call",
        "--dir",
        s(dir),
        "--server",
        addr,
        "--server-name",
        "localhost",
        "--device",
        "laptop",
        "--user",
        "alice",
        "--code",
        code,
    ])
}

/// `GET path` with a bounded wait; the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    tcp.set_read_timeout(Some(COMMAND_DEADLINE)).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The file's JSON lines, once it holds `n` of them (or the deadline passed).
fn audit_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_writes_the_audit_log_and_answers_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    let fingerprint = issue_device(&dir, "laptop", "alice");
    let log = tmp.path().join("audit.jsonl");
    let server = serve(
        &dir,
        &["--audit-log", s(&log), "--metrics-listen", "127.0.0.1:0"],
    );
    assert!(
        server.metrics.starts_with("127.0.0.1:"),
        "{}",
        server.metrics
    );
    assert_ne!(server.metrics, server.addr);

    let code = totp(&secret).generate(unix_now());
    let ok = call(&dir, &server, &code);
    assert!(ok.status.success(), "{ok:?}");
    let wrong = wrong_code(&secret);
    // Without the session the first call stored, the wrong code is sent.
    std::fs::remove_dir_all(dir.join("sessions")).unwrap();
    let refused = call(&dir, &server, &wrong);
    assert_one_line_error(&refused, &["mfa_failed"]);

    let lines = audit_lines(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let accepted = lines.iter().find(|l| l["outcome"] == "accepted").unwrap();
    assert_eq!(accepted["user"], "alice");
    assert_eq!(accepted["device"], "laptop");
    assert_eq!(accepted["method"], "totp");
    assert_eq!(accepted["fingerprint"], fingerprint.as_str());
    assert_eq!(accepted["ref"].as_str().map(str::len), Some(32));
    assert!(accepted["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let rejected = lines.iter().find(|l| l["outcome"] == "rejected").unwrap();
    assert_eq!(rejected["code"], "mfa_failed");
    assert_eq!(rejected["cause"], "code_wrong");
    // The REF the client printed is the record's.
    let reference = rejected["ref"].as_str().unwrap();
    assert!(refused.stderr.contains(reference), "{refused:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    for needle in [code.as_str(), wrong.as_str(), secret.as_str()] {
        assert!(!text.contains(needle), "the audit log holds `{needle}`");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (status, body) = http_get(&server.metrics, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    for line in [
        r#"portcullis_connection_attempts_total{outcome="accepted",code="",cause=""} 1"#,
        r#"portcullis_connection_attempts_total{outcome="rejected",code="mfa_failed",cause="code_wrong"} 1"#,
        "portcullis_accept_duration_seconds_count 2",
        "portcullis_live_nonces 2",
        "portcullis_authenticating_connections ",
    ] {
        assert!(body.contains(line), "`{line}` not in\n{body}");
    }
}

#[test]
fn a_bad_audit_log_or_metrics_address_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let missing = tmp.path().join("no-such-dir/audit.jsonl");
    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--audit-log",
        s(&missing),
    ]);
    assert_one_line_error(&out, &["no-such-dir/audit.jsonl", "audit log"]);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &addr,
    ]);
    assert_one_line_error(&out, &[&addr, "metrics"]);

    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "not-an-address",
    ]);
    assert_one_line_error(&out, &["--metrics-listen"]);
}

/// A balancer on 127.0.0.1 forwarding every connection to `server` with a PROXY protocol v2
/// header that names 203.0.113.7:4444 as the client. Its address.
fn balancer(server: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = server.to_owned();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let server = server.clone();
            thread::spawn(move || {
                let Ok(mut outbound) = TcpStream::connect(&server) else {
                    return;
                };
                // Signature, PROXY over TCP/IPv4, 12 bytes of addresses and ports.
                let mut header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
                header.extend_from_slice(&[203, 0, 113, 7, 127, 0, 0, 1]);
                header.extend_from_slice(&4444u16.to_be_bytes());
                header.extend_from_slice(&443u16.to_be_bytes());
                if outbound.write_all(&header).is_err() {
                    return;
                }
                let (Ok(mut in_read), Ok(mut out_write)) =
                    (inbound.try_clone(), outbound.try_clone())
                else {
                    return;
                };
                let up = thread::spawn(move || {
                    let _ = std::io::copy(&mut in_read, &mut out_write);
                    let _ = out_write.shutdown(std::net::Shutdown::Write);
                });
                let mut inbound = inbound;
                let _ = std::io::copy(&mut outbound, &mut inbound);
                let _ = inbound.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    addr
}

#[test]
fn behind_a_balancer_the_audit_log_names_the_client_of_the_proxy_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let log = tmp.path().join("audit.jsonl");
    let server = serve(
        &dir,
        &[
            "--audit-log",
            s(&log),
            "--metrics-listen",
            "127.0.0.1:0",
            "--proxy-protocol",
            "127.0.0.1, 10.0.0.0/8",
        ],
    );
    let front = balancer(&server.addr);
    let code = totp(&secret).generate(unix_now());
    let ok = call_at(&dir, &front, &code);
    assert!(ok.status.success(), "{ok:?}");
    // Past the balancer, without a header: closed before TLS.
    std::fs::remove_dir_all(dir.join("sessions")).unwrap();
    let direct = call(&dir, &server, &code);
    // One line that names the likely cause.
    assert_one_line_error(
        &direct,
        &[
            "closed the connection during the TLS handshake",
            "PROXY protocol",
        ],
    );

    let lines = audit_lines(&log, 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let accepted = lines.iter().find(|l| l["outcome"] == "accepted").unwrap();
    assert_eq!(accepted["peer"], "203.0.113.7:4444");
    assert!(
        accepted["proxy"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let closed = lines.iter().find(|l| l["outcome"] == "closed").unwrap();
    assert_eq!(closed["cause"], "proxy_header_refused");
    assert!(closed["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(closed["proxy"], serde_json::Value::Null);
}

#[test]
fn a_bad_trusted_proxy_list_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    for (list, needle) in [
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("127.0.0.1,lb.example", "lb.example"),
        (" , ", "at least one"),
    ] {
        let out = run(&[
            "serve",
            "--dir",
            s(&dir),
            "--listen",
            "127.0.0.1:0",
            "--proxy-protocol",
            list,
        ]);
        assert_one_line_error(&out, &["--proxy-protocol", needle]);
    }
}

/// `GET /metrics` with an `Authorization` header (or none): the status line.
fn scrape_with(addr: &str, authorization: Option<&str>) -> String {
    let mut tcp = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    tcp.set_read_timeout(Some(COMMAND_DEADLINE)).unwrap();
    let header = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{header}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text.lines().next().unwrap_or("").to_owned()
}

#[test]
fn metrics_on_a_bare_port_bind_loopback_and_a_token_file_guards_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let token_file = tmp.path().join("metrics.token");
    let token = "s3cr3t-scrape-token-0123456789";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = serve(
        &dir,
        &["--metrics-listen", "0", "--metrics-token", s(&token_file)],
    );
    assert!(
        server.metrics.starts_with("127.0.0.1:"),
        "a bare port binds loopback: {}",
        server.metrics
    );
    assert!(scrape_with(&server.metrics, None).contains(" 401 "));
    assert!(scrape_with(&server.metrics, Some("Bearer wrong-token-wrong-token")).contains(" 401 "));
    assert!(scrape_with(&server.metrics, Some(&format!("Bearer {token}"))).contains(" 200 "));

    // A token file others may read, and a token too short: one line each, never the token.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = |file: &Path| {
        run(&[
            "serve",
            "--dir",
            s(&dir),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "0",
            "--metrics-token",
            s(file),
        ])
    };
    let line = assert_one_line_error(&args(&token_file), &["metrics.token", "chmod 600"]);
    assert!(!line.contains(token), "{line}");
    let short = tmp.path().join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_one_line_error(&args(&short), &["short.token", "16 to 256"]);
}

#[test]
fn sighup_reopens_the_audit_log_after_logrotate_moved_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let secret = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let log = tmp.path().join("audit.jsonl");
    let mut server = serve(
        &dir,
        &[
            "--audit-log",
            s(&log),
            "--audit-fsync",
            "always",
            "--audit-required",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let ok = call(&dir, &server, &totp(&secret).generate(unix_now()));
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(audit_lines(&log, 1).len(), 1);

    // logrotate: the file is moved away, then the server is told.
    let rotated = tmp.path().join("audit.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    let pid = server._child.child().id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    // The next record goes to a new file at the path, mode 0600.
    std::fs::remove_dir_all(dir.join("sessions")).unwrap();
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        let wrong = call(&dir, &server, &wrong_code(&secret));
        assert!(!wrong.status.success());
        if log.exists() || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let fresh = audit_lines(&log, 1);
    assert!(!fresh.is_empty(), "a record in the reopened file");
    assert_eq!(fresh[0]["outcome"], "rejected");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        audit_lines(&rotated, 1).len(),
        1,
        "the old file kept its record"
    );
}
