//! Helpers for driving the `portcullis` binary: running a command with a bounded wait, checking
//! the one-line error contract, and a background `portcullis serve` that is always killed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis_core::{TotpAlgorithm, TotpConfig};

/// How long any one command may run before the test gives up on it.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(20);

/// The binary under test, with an environment that would make a panic loud.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "warn")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

/// A child process that is killed and reaped when dropped, so that no test leaves one behind,
/// also when it fails half-way.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }

    /// Kills the process (if it still runs) and waits for it.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.0.take().expect("child already reaped");
        let _ = child.kill();
        child.wait().expect("wait for child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn read_all_in_thread<R: Read + Send + 'static>(mut reader: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `portcullis ARGS...` to the end (at most [`COMMAND_DEADLINE`]).
pub fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

/// [`run`] with more environment variables.
pub fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.envs(env.iter().copied());
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn portcullis"));
    let stdout = read_all_in_thread(guard.child().stdout.take().expect("stdout"));
    let stderr = read_all_in_thread(guard.child().stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = guard.child().try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > COMMAND_DEADLINE {
            drop(guard);
            panic!("portcullis {args:?} still runs after {COMMAND_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    drop(guard);
    Output {
        args: args.iter().map(|s| s.to_string()).collect(),
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "portcullis {:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.args,
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Runs a command that must succeed with `--json` output; returns the parsed JSON.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let stdout = run_ok(args);
    assert_eq!(
        stdout.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "--json prints one JSON line, got: {stdout}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("portcullis {args:?}: not JSON ({e}): {stdout}"))
}

/// Checks the error contract: a non-zero exit (not a signal), nothing on stdout, exactly one
/// non-empty line on stderr that starts with `portcullis: ` (besides warnings, lines that start
/// with `portcullis: warning: `, such as the one `--secret` prints), contains every needle, and
/// shows no panic and no backtrace. Returns the line.
#[track_caller]
pub fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let context = format!(
        "portcullis {:?} ({})\nstdout: {}\nstderr: {}",
        out.args, out.status, out.stdout, out.stderr
    );
    assert!(!out.status.success(), "expected failure: {context}");
    assert!(
        out.status.code().is_some(),
        "expected an exit code, not a signal: {context}"
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("portcullis: warning: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr: {context}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("portcullis: "),
        "the error line starts with `portcullis: `: {context}"
    );
    for forbidden in [
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "internal error",
    ] {
        assert!(
            !out.stderr.contains(forbidden),
            "stderr mentions `{forbidden}`: {context}"
        );
    }
    for needle in needles {
        assert!(
            line.contains(needle),
            "the error line should mention `{needle}`: {context}"
        );
    }
    assert!(
        out.stdout.trim().is_empty(),
        "a failed command prints nothing on stdout: {context}"
    );
    line.to_owned()
}

/// A path as the `&str` the command line takes (temp dirs are UTF-8 here).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A fresh `portcullis init` directory inside `tmp`.
pub fn init_dir(tmp: &tempfile::TempDir) -> PathBuf {
    let dir = tmp.path().join("pc");
    run_ok(&["init", "--dir", s(&dir)]);
    dir
}

/// Adds a user with `--json` and returns its base32 secret.
pub fn add_user(dir: &Path, user: &str) -> String {
    let json = run_json(&["user", "add", user, "--dir", s(dir), "--json"]);
    json["secret"].as_str().expect("secret").to_owned()
}

/// Issues a device with `--json` and returns its fingerprint.
pub fn issue_device(dir: &Path, name: &str, user: &str) -> String {
    let json = run_json(&[
        "device",
        "issue",
        name,
        "--user",
        user,
        "--dir",
        s(dir),
        "--json",
    ]);
    json["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The default TOTP (6 digits, SHA1, 30 s) of a base32 secret.
pub fn totp(secret: &str) -> TotpConfig {
    TotpConfig::from_base32(secret, 6, TotpAlgorithm::Sha1, 30).expect("base32 secret")
}

/// A 6-digit code that no step within three either side of now accepts.
pub fn wrong_code(secret: &str) -> String {
    let config = totp(secret);
    let now = unix_now();
    let near: Vec<String> = (0..=12)
        .map(|i| config.generate((now + 90).saturating_sub(i * 15)))
        .collect();
    (0..10)
        .map(|d| d.to_string().repeat(6))
        .find(|c| !near.contains(c))
        .expect("some repeated-digit code is not near")
}

/// `portcullis serve --dir DIR --listen 127.0.0.1:0 EXTRA...`, killed on drop (its stderr
/// discarded); the guard and the first `lines` lines it printed on stdout.
pub fn serve_printing(dir: &Path, extra: &[&str], lines: usize) -> (ChildGuard, Vec<String>) {
    let mut cmd = command();
    cmd.args(["serve", "--dir", s(dir), "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = ChildGuard::new(cmd.spawn().expect("spawn portcullis serve"));
    let out = BufReader::new(child.child().stdout.take().expect("stdout"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + COMMAND_DEADLINE;
    let mut printed = Vec::new();
    while printed.len() < lines {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(e) => panic!("portcullis serve printed {printed:?}, then {e:?}"),
        }
    }
    (child, printed)
}

/// `portcullis serve --dir DIR --listen 127.0.0.1:0 EXTRA...`, killed on drop; the guard and
/// the address of its first line, `listening on ADDR`.
pub fn serve(dir: &Path, extra: &[&str]) -> (ChildGuard, String) {
    let (child, lines) = serve_printing(dir, extra, 1);
    let addr = lines[0]
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line of portcullis serve: {lines:?}"))
        .trim()
        .to_owned();
    (child, addr)
}

/// `portcullis serve --dir DIR --listen 127.0.0.1:0` in the background; killed on drop.
pub struct Server {
    child: ChildGuard,
    /// `127.0.0.1:PORT` as printed by the server.
    pub addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with_env(dir, &[])
    }

    /// Like [`Server::start`], with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with(dir, env, &[])
    }

    /// Like [`Server::start`], with extra environment variables and `serve` flags.
    pub fn start_with(dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Self {
        let mut cmd = command();
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--dir", s(dir), "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(cmd.spawn().expect("spawn portcullis serve"));

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = BufReader::new(child.child().stderr.take().expect("stderr"));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut line = String::new();
            while matches!(err_pipe.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });

        let out_pipe = BufReader::new(child.child().stdout.take().expect("stdout"));
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in out_pipe.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let deadline = Instant::now() + COMMAND_DEADLINE;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        break addr.trim().to_owned();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let err = stderr.lock().unwrap().clone();
                    drop(child);
                    panic!(
                        "portcullis serve printed no `listening on` line in {COMMAND_DEADLINE:?}; stderr: {err}"
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.kill();
                    let err = stderr.lock().unwrap().clone();
                    panic!("portcullis serve ended ({status}) before listening; stderr: {err}");
                }
            }
        };
        Self {
            child,
            addr,
            stderr,
        }
    }

    /// The port the kernel picked.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("`{}` is not HOST:PORT", self.addr))
    }

    /// Whether the server still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.child().try_wait().expect("try_wait").is_none()
    }

    /// What the server logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Kills the server and reaps it.
    pub fn stop(self) {
        self.child.kill();
    }
}
