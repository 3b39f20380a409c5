//! The rows of docs/TROUBLESHOOTING.md, created for real against a running `portcullis serve`:
//! `portcullis doctor --json` fails at the step the situation belongs to, and what it saw and
//! the fix it gives name the cause.

mod common;

use std::path::Path;
use std::thread;
use std::time::Duration;

use common::*;
use portcullis_core::codec::ALPN_PCS1;
use portcullis_tls::devpki::{CertProfile, DevCa};
use serde_json::Value;

/// `portcullis doctor --json` with the connection flags and `extra`: its exit code and report.
fn doctor(dir: &Path, server: &str, device: &str, user: &str, extra: &[&str]) -> (i32, Value) {
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
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let json: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("doctor {args:?}: not JSON ({e}): {out:?}"));
    (out.status.code().expect("an exit code"), json)
}

/// The step `name` of a report.
fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {report}"))
}

/// The exit code of a failure of step `name`: 10 + its number.
fn exit_of(name: &str) -> i32 {
    const STEPS: [&str; 11] = [
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
        "echo",
    ];
    11 + i32::try_from(STEPS.iter().position(|s| *s == name).unwrap()).unwrap()
}

/// The report failed first at `name` (with that exit code), and that step's `saw` contains every
/// word of `saw` and its `fix` every word of `fix`.
#[track_caller]
fn assert_fails_at(result: &(i32, Value), name: &str, saw: &[&str], fix: &[&str]) {
    let (code, report) = result;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_failure"], name, "{report}");
    assert_eq!(*code, exit_of(name), "{report}");
    let step = step(report, name);
    assert_eq!(step["ok"], false, "{step}");
    assert_eq!(step["skipped"], false, "{step}");
    let seen = step["saw"].as_str().expect("saw");
    for word in saw {
        assert!(seen.contains(word), "saw of {name} lacks {word:?}: {seen}");
    }
    let given = step["fix"].as_str().expect("a fix on a failed step");
    for word in fix {
        assert!(
            given.contains(word),
            "fix of {name} lacks {word:?}: {given}"
        );
    }
}

/// A directory with user alice and her device `laptop`, served by `portcullis serve EXTRA...`.
struct Served {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    /// Alice's TOTP secret.
    alice: String,
    _server: ChildGuard,
    addr: String,
}

fn served(extra: &[&str]) -> Served {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let (server, addr) = serve(&dir, extra);
    Served {
        _tmp: tmp,
        dir,
        alice,
        _server: server,
        addr,
    }
}

/// The CA of an initialized directory, able to issue.
fn dir_ca(dir: &Path) -> DevCa {
    DevCa::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap()
}

/// Writes a certificate of `profile` from `ca` as device `name` of `dir`.
fn write_device(dir: &Path, ca: &DevCa, name: &str, profile: &CertProfile) {
    ca.issue(profile)
        .unwrap()
        .write(
            &dir.join("devices").join(format!("{name}.pem")),
            &dir.join("devices").join(format!("{name}-key.pem")),
        )
        .unwrap();
}

#[test]
fn devices_users_and_codes_fail_at_their_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let bob = add_user(&dir, "bob");
    let carol = add_user(&dir, "carol");
    issue_device(&dir, "laptop", "alice");
    issue_device(&dir, "desk", "bob");
    issue_device(&dir, "tablet", "carol");
    // A device certificate of this CA that is bound to no user.
    write_device(&dir, &dir_ca(&dir), "loose", &CertProfile::device("loose"));
    let (_server, addr) = serve(&dir, &["--rate-limit", "0"]);

    // Unbound device.
    let r = doctor(&dir, &addr, "loose", "alice", &["--secret", &alice]);
    assert_fails_at(&r, "device", &["device_unknown"], &["device bind", "alice"]);
    assert_eq!(step(&r.1, "channel_binding")["ok"], true);
    assert_eq!(step(&r.1, "code")["skipped"], true);

    // User mismatch: bob's device, alice named.
    let r = doctor(&dir, &addr, "desk", "alice", &["--secret", &alice]);
    assert_fails_at(&r, "device", &["user_mismatch"], &["bound to"]);

    // Wrong code.
    let wrong = wrong_code(&alice);
    let r = doctor(&dir, &addr, "laptop", "alice", &["--code", &wrong]);
    assert_fails_at(&r, "code", &["mfa_failed"], &["current code"]);
    assert_eq!(step(&r.1, "device")["ok"], true);
    assert!(!r.1.to_string().contains(&wrong), "the code is not echoed");

    // Reused code: accepted once, refused the second time.
    let code = totp(&bob).generate(unix_now());
    let r = doctor(&dir, &addr, "desk", "bob", &["--code", &code]);
    assert_eq!(r.0, 0, "{}", r.1);
    let r = doctor(&dir, &addr, "desk", "bob", &["--code", &code]);
    assert_fails_at(&r, "code", &["mfa_failed"], &["once"]);

    // Locked out: five wrong codes, then even the right one is refused with a wait.
    let wrong = wrong_code(&carol);
    for _ in 0..5 {
        let r = doctor(&dir, &addr, "tablet", "carol", &["--code", &wrong]);
        assert_fails_at(&r, "code", &["mfa_failed"], &[]);
    }
    let r = doctor(&dir, &addr, "tablet", "carol", &["--secret", &carol]);
    assert_fails_at(&r, "code", &["locked_out", "wait"], &["wait", " s, then"]);

    // Revoked device.
    run_ok(&["device", "revoke", "laptop", "--dir", s(&dir)]);
    let r = doctor(&dir, &addr, "laptop", "alice", &["--secret", &alice]);
    assert_fails_at(&r, "device", &["device_revoked"], &["revoked"]);
}

#[test]
fn a_skewed_client_clock_says_which_side_is_ahead() {
    let sv = served(&[]);
    let (dir, alice, addr) = (sv.dir.as_path(), sv.alice.as_str(), sv.addr.as_str());

    // Client 2 minutes ahead: the server clock is behind ours.
    let r = doctor(
        dir,
        addr,
        "laptop",
        "alice",
        &["--secret", alice, "--clock-offset-secs", "120"],
    );
    assert_fails_at(
        &r,
        "clock",
        &["clock_skew", "ahead", "behind ours"],
        &["clock"],
    );
    assert_eq!(step(&r.1, "channel_binding")["ok"], true);

    // Client 2 minutes behind: the server clock is ahead of ours.
    let r = doctor(
        dir,
        addr,
        "laptop",
        "alice",
        &["--secret", alice, "--clock-offset-secs", "-120"],
    );
    assert_fails_at(
        &r,
        "clock",
        &["clock_skew", "behind", "ahead of ours"],
        &["clock"],
    );

    // The code was never reached, so it is still good without an offset.
    let r = doctor(dir, addr, "laptop", "alice", &["--secret", alice]);
    assert_eq!(r.0, 0, "{}", r.1);
    assert!(
        step(&r.1, "clock")["saw"]
            .as_str()
            .unwrap()
            .contains("within the allowed skew")
    );
}

#[test]
fn refused_device_certificates_fail_the_client_certificate_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let ca = dir_ca(&dir);
    let now = i64::try_from(unix_now()).unwrap();

    // Expired. (`device bind` refuses expired certificates and those without clientAuth; the
    // server refuses them in the handshake before any binding is looked up.)
    let mut expired = CertProfile::device("old");
    expired.not_before_unix = now - 10 * 86_400;
    expired.not_after_unix = now - 86_400;
    write_device(&dir, &ca, "old", &expired);

    // Without clientAuth.
    let mut server_ish = CertProfile::device("serverish");
    server_ish.client_auth = false;
    server_ish.server_auth = true;
    write_device(&dir, &ca, "serverish", &server_ish);

    // Wrong CA on the server side: a device of another directory's CA, bound here.
    let other = tmp.path().join("other");
    run_ok(&["init", "--dir", s(&other)]);
    add_user(&other, "alice");
    issue_device(&other, "stranger", "alice");
    for file in ["stranger.pem", "stranger-key.pem"] {
        std::fs::copy(
            other.join("devices").join(file),
            dir.join("devices").join(file),
        )
        .unwrap();
    }
    run_ok(&[
        "device",
        "bind",
        "stranger",
        "--user",
        "alice",
        "--cert",
        s(&dir.join("devices").join("stranger.pem")),
        "--dir",
        s(&dir),
    ]);
    let (_server, addr) = serve(&dir, &[]);

    let r = doctor(&dir, &addr, "old", "alice", &["--secret", &alice]);
    assert_fails_at(
        &r,
        "client_certificate",
        &["outside its validity"],
        &["device issue"],
    );
    assert_eq!(step(&r.1, "server_certificate")["ok"], true);

    let r = doctor(&dir, &addr, "serverish", "alice", &["--secret", &alice]);
    assert_fails_at(
        &r,
        "client_certificate",
        &["lacks the clientAuth"],
        &["device issue"],
    );

    // The doctor names the CA the server expects and the one that issued ours.
    let ours = ca_name(&other);
    let theirs = ca_name(&dir);
    assert_ne!(ours, theirs, "every directory's CA has a name of its own");
    let r = doctor(&dir, &addr, "stranger", "alice", &["--secret", &alice]);
    assert_fails_at(
        &r,
        "client_certificate",
        &[
            &format!("the server accepts client certificates issued by {theirs}"),
            &format!("our certificate is issued by {ours}, which the server does not name"),
        ],
        &["issue this device from the CA the server trusts", &theirs],
    );
}

/// The RFC 4514 name of the CA of an initialized directory.
fn ca_name(dir: &Path) -> String {
    let der = portcullis_tls::load_certs(&dir.join("ca.pem"))
        .unwrap()
        .remove(0);
    let id = portcullis_tls::DeviceIdentity::from_der(&der).unwrap();
    format!("CN={}", id.subject)
}

/// A TLS-terminating proxy on its own thread: accepts TLS with a server certificate of `ca`
/// (requiring a client certificate of it) and opens its own TLS connection to `upstream` with
/// its own device certificate, copying the bytes between the two. Returns its address.
fn terminating_proxy(ca: &DevCa, upstream: String) -> String {
    let cert = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    let accept = portcullis_tls::server_config(
        vec![cert.cert_der()],
        cert.key_der(),
        &[ca.cert_der()],
        &[ALPN_PCS1],
    )
    .unwrap();
    let device = ca.issue_device("proxy").unwrap();
    let connect = portcullis_tls::client_config(
        &[ca.cert_der()],
        vec![device.cert_der()],
        device.key_der(),
        &[ALPN_PCS1],
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(accept);
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let connector = tokio_rustls::TlsConnector::from(connect.clone());
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut down) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(tcp) = tokio::net::TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                    let Ok(mut up) = connector.connect(name, tcp).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
            }
        });
    });
    addr
}

#[test]
fn a_tls_terminating_proxy_fails_the_channel_binding_step() {
    let sv = served(&[]);
    let (dir, alice, addr) = (sv.dir.as_path(), sv.alice.as_str(), sv.addr.as_str());
    let proxy = terminating_proxy(&dir_ca(dir), addr.to_owned());

    let r = doctor(dir, &proxy, "laptop", "alice", &["--secret", alice]);
    assert_fails_at(
        &r,
        "channel_binding",
        &["binding_mismatch"],
        &["TLS-terminating proxy or load balancer", "pass TLS through"],
    );
    // Everything up to the Prefix passed: the proxy looks like the server.
    for name in ["tls_version", "alpn", "server_certificate"] {
        assert_eq!(step(&r.1, name)["ok"], true, "{}", r.1);
    }
    // Directly, the same device and user pass (the code was not used up).
    let r = doctor(dir, addr, "laptop", "alice", &["--secret", alice]);
    assert_eq!(r.0, 0, "{}", r.1);
}

#[test]
fn a_server_at_capacity_says_it_is_busy() {
    let sv = served(&["--max-pending", "1", "--rate-limit", "0"]);
    let (dir, alice, addr) = (sv.dir.as_path(), sv.alice.as_str(), sv.addr.as_str());

    // A connection past its TLS handshake that sends no Prefix holds the one slot until the
    // deadline (10 s); one still in its handshake would be shed for the newcomer.
    let idle = tls_without_prefix(dir, addr);
    // The server counts it once it accepted it; the first doctor may come before that.
    let mut r = doctor(dir, addr, "laptop", "alice", &["--secret", alice]);
    for _ in 0..3 {
        if r.1["first_failure"] == "device" {
            break;
        }
        thread::sleep(Duration::from_millis(200));
        r = doctor(dir, addr, "laptop", "alice", &["--secret", alice]);
    }
    assert_fails_at(&r, "device", &["overloaded"], &["busy", "try again in"]);
    drop(idle);
}

/// A TLS connection of the laptop to `addr`, handshake done, nothing sent after it.
fn tls_without_prefix(
    dir: &Path,
    addr: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let roots = portcullis_tls::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = portcullis_tls::load_certs(&dir.join("devices/laptop.pem")).unwrap();
    let key = portcullis_tls::load_key(&dir.join("devices/laptop-key.pem")).unwrap();
    let config =
        portcullis_tls::client_config(&roots, chain, key, &[portcullis_core::codec::ALPN_PCS1])
            .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// The report of a probe (`--plaintext`, `--tls12`): two steps, `connect` passed.
#[track_caller]
fn assert_probe(result: &(i32, Value), second: &str) -> Value {
    let (_, report) = result;
    let names: Vec<_> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["connect", second], "{report}");
    assert_eq!(step(report, "connect")["ok"], true, "{report}");
    step(report, second).clone()
}

/// Binds a loopback port and runs `serve` on it on a thread and runtime of its own; the address.
fn serve_on_thread<F, Fut>(serve: F) -> String
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            serve(tokio::net::TcpListener::from_std(listener).unwrap()).await;
        });
    });
    addr
}

/// A plaintext (h2c) gRPC server with the Echo service; its address.
fn h2c_server() -> String {
    serve_on_thread(|listener| async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(portcullis::demo::service())
            .serve_with_incoming(incoming)
            .await;
    })
}

/// A TLS server that speaks TLS 1.2 only, with a server certificate of `ca`; its address.
fn tls12_server(ca: &DevCa) -> String {
    let cert = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der()], cert.key_der())
        .unwrap();
    tls_server(std::sync::Arc::new(config))
}

/// A TLS server with `config` that completes handshakes and then sends nothing; its address.
fn tls_server(config: std::sync::Arc<rustls::ServerConfig>) -> String {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    serve_on_thread(|listener| async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    })
}

#[test]
fn plaintext_and_tls12_only_clients_learn_the_port_needs_tls13() {
    let sv = served(&[]);
    let (dir, addr) = (sv.dir.as_path(), sv.addr.as_str());

    // A plaintext (h2c) client, as `grpcurl -plaintext`, on the Portcullis TLS port.
    let r = doctor(dir, addr, "laptop", "alice", &["--plaintext"]);
    let plaintext = assert_probe(&r, "plaintext");
    assert_eq!(r.0, 12, "{}", r.1);
    assert_eq!(r.1["first_failure"], "plaintext");
    let saw = plaintext["saw"].as_str().unwrap();
    assert!(
        saw.contains("this port speaks TLS only")
            && saw.contains("a plaintext (h2c) client cannot use it"),
        "{saw}"
    );
    let fix = plaintext["fix"].as_str().unwrap();
    assert!(
        fix.contains("TLS 1.3") && fix.contains("without -plaintext"),
        "{fix}"
    );

    // A client limited to TLS 1.2.
    let r = doctor(dir, addr, "laptop", "alice", &["--tls12"]);
    let tls = assert_probe(&r, "tls_version");
    assert_eq!(r.0, 12, "{}", r.1);
    let saw = tls["saw"].as_str().unwrap();
    assert!(
        saw.contains("alert protocol_version") && saw.contains("speaks TLS 1.3 only"),
        "{saw}"
    );
    assert!(
        tls["fix"].as_str().unwrap().contains("enable TLS 1.3"),
        "{tls}"
    );

    // The same probes against servers that do take such clients pass, and say that those are
    // not Portcullis ports: a real h2c gRPC server, and a TLS 1.2-only server.
    let h2c = h2c_server();
    let r = doctor(dir, &h2c, "laptop", "alice", &["--plaintext"]);
    let plaintext = assert_probe(&r, "plaintext");
    assert_eq!(r.0, 0, "{}", r.1);
    assert!(
        plaintext["saw"]
            .as_str()
            .unwrap()
            .contains("speaks plaintext HTTP/2 (h2c) here, so this is not a Portcullis port"),
        "{plaintext}"
    );
    let old = tls12_server(&dir_ca(dir));
    let r = doctor(dir, &old, "laptop", "alice", &["--tls12"]);
    let tls = assert_probe(&r, "tls_version");
    assert_eq!(r.0, 0, "{}", r.1);
    assert!(
        tls["saw"]
            .as_str()
            .unwrap()
            .contains("accepted a TLS 1.2-only client"),
        "{tls}"
    );

    // The full walk against the TLS 1.2-only server names the version it offered.
    let r = doctor(dir, &old, "laptop", "alice", &["--code", "123456"]);
    assert_fails_at(&r, "tls_version", &["offered TLSv1_2"], &["TLS 1.3"]);
}

#[test]
fn a_wrong_name_a_plaintext_server_and_a_server_without_portcullis_1_fail_early() {
    let sv = served(&[]);
    let (dir, alice, addr) = (sv.dir.as_path(), sv.alice.as_str(), sv.addr.as_str());

    // A server name the server certificate does not hold: the SANs it has are listed.
    let r = doctor(
        dir,
        addr,
        "laptop",
        "alice",
        &["--secret", alice, "--server-name", "portcullis.example"],
    );
    assert_fails_at(
        &r,
        "server_certificate",
        &[
            "does not name `portcullis.example`",
            "SANs",
            "localhost",
            "127.0.0.1",
        ],
        &["one of the names listed", "--server-name"],
    );

    // A plaintext (h2c) gRPC server where the Portcullis server was expected.
    let h2c = h2c_server();
    let r = doctor(dir, &h2c, "laptop", "alice", &["--secret", alice]);
    assert_fails_at(
        &r,
        "tls_version",
        &["did not answer TLS", "plaintext (h2c) server"],
        &["TLS port"],
    );

    // A TLS server of the same CA that speaks only h2 (a standard gRPC server).
    let ca = dir_ca(dir);
    let cert = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    let config = portcullis_tls::server_config(
        vec![cert.cert_der()],
        cert.key_der(),
        &[ca.cert_der()],
        &[b"h2"],
    )
    .unwrap();
    let h2 = tls_server(config);
    let r = doctor(dir, &h2, "laptop", "alice", &["--secret", alice]);
    assert_fails_at(
        &r,
        "alpn",
        &["refused ALPN portcullis/1", "no_application_protocol"],
        &["Portcullis server"],
    );
}
