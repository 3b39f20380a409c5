//! The greeter side by side, built and run over loopback: a directory made by `portcullis
//! init` (the CLI binary of this workspace), the stock tonic mTLS server and client, then the
//! Portcullis ones (`PortcullisServer::from_dir`, `Client::from_dir`): a device certificate alone
//! gets into the stock server but not into the Portcullis one; with a code (or the session
//! `portcullis login` stored) it does, and the handler sees the user and the device.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// The `portcullis` binary, built beside this package's binaries by `cargo test --workspace`.
fn portcullis() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_server"))
        .with_file_name(format!("portcullis{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{}: not built; run `cargo test --workspace` (or `cargo build -p portcullis-cli`) first",
        bin.display()
    );
    bin
}

/// Runs `program ARGS` with `env` to the end, within [`DEADLINE`].
fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!(
                "{} {args:?} still runs after {DEADLINE:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A server binary on `addr`, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin DIR ADDR` (its stderr to `stderr`) and waits until it accepts TCP connections.
fn start(bin: &str, dir: &Path, addr: &str, stderr: &Path) -> Running {
    let child = Command::new(bin)
        .args([dir.to_str().unwrap(), addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            running.0.try_wait().unwrap().is_none(),
            "{bin} ended before listening"
        );
        assert!(
            start.elapsed() < DEADLINE,
            "{bin} is not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// A loopback address with a port that is free now.
fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn the_greeter_stock_and_behind_portcullis() {
    let cli = portcullis();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pc");
    let d = dir.to_str().unwrap();
    ok(run(&cli, &["init", "--dir", d], &[]), "init");
    let user: serde_json::Value = serde_json::from_str(&ok(
        run(&cli, &["user", "add", "alice", "--dir", d, "--json"], &[]),
        "user add",
    ))
    .unwrap();
    let secret = user["secret"].as_str().unwrap().to_owned();
    ok(
        run(
            &cli,
            &["device", "issue", "laptop", "--user", "alice", "--dir", d],
            &[],
        ),
        "device issue",
    );

    // Stock tonic mTLS: the device certificate is all it takes.
    let addr = free_addr();
    let url = format!("https://{addr}");
    let stock = start(
        env!("CARGO_BIN_EXE_stock-server"),
        &dir,
        &addr,
        &tmp.path().join("stock.log"),
    );
    let reply = ok(
        run(
            Path::new(env!("CARGO_BIN_EXE_stock-client")),
            &[d, &url],
            &[],
        ),
        "stock client",
    );
    assert_eq!(reply.trim(), "Hello Tonic!");
    drop(stock);

    // Behind Portcullis, from the same directory in one line each.
    let addr = free_addr();
    let url = format!("https://{addr}");
    let log = tmp.path().join("server.log");
    let _server = start(env!("CARGO_BIN_EXE_server"), &dir, &addr, &log);
    let client = Path::new(env!("CARGO_BIN_EXE_client"));
    // The stock client's certificate alone: refused at the gate (no Prefix, ALPN h2).
    let refused = run(
        Path::new(env!("CARGO_BIN_EXE_stock-client")),
        &[d, &url],
        &[],
    );
    assert!(!refused.status.success(), "{refused:?}");
    // The Portcullis client without a session or a code: refused before any byte is sent,
    // saying what to do.
    let no_factor = run(client, &[d, &url], &[]);
    assert!(!no_factor.status.success(), "{no_factor:?}");
    let stderr = String::from_utf8_lossy(&no_factor.stderr);
    assert!(stderr.contains("portcullis login"), "{stderr}");
    // A wrong code (another user's secret): refused with a REF, which the server, with no
    // tracing subscriber and no audit sink, still writes to its stderr.
    let other = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
    let wrong = run(client, &[d, &url], &[("PORTCULLIS_TOTP_SECRET", other)]);
    assert!(!wrong.status.success(), "{wrong:?}");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("mfa_failed"), "{stderr}");
    let start = Instant::now();
    let logged = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("code=mfa_failed") || start.elapsed() > DEADLINE {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = logged
        .lines()
        .find(|l| l.contains("code=mfa_failed"))
        .unwrap_or_else(|| panic!("no refusal in the server's stderr: {logged}"));
    assert!(
        line.starts_with("INFO portcullis::audit: connection refused ref=")
            && line.contains("user=alice"),
        "{line}"
    );
    assert!(
        logged.contains("connection closed"),
        "the stock client's close: {logged}"
    );
    // With the user's TOTP secret in the environment.
    let reply = ok(
        run(client, &[d, &url], &[("PORTCULLIS_TOTP_SECRET", &secret)]),
        "client with a code",
    );
    assert_eq!(reply.trim(), "Hello Tonic! (user alice, device laptop)");
    // That connection stored its session: the next run needs no code.
    let reply = ok(run(client, &[d, &url], &[]), "client on the stored session");
    assert_eq!(reply.trim(), "Hello Tonic! (user alice, device laptop)");
}

/// The lines the README shows as the diff: at most 5 changed in the server and 5 in the
/// client, counted without comments, blank lines and the first doc line.
#[test]
fn the_diff_is_small() {
    fn code(path: &str) -> Vec<String> {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .map(str::to_owned)
            .collect()
    }
    for (stock, ours, max) in [
        ("src/bin/stock_server.rs", "src/bin/server.rs", 5),
        ("src/bin/stock_client.rs", "src/bin/client.rs", 5),
    ] {
        let (a, b) = (code(stock), code(ours));
        let added = b.iter().filter(|l| !a.contains(l)).count();
        assert!(
            added <= max,
            "{ours}: {added} lines that {stock} does not have"
        );
    }
}
