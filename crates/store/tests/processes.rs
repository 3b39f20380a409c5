//! Several processes on one registry file. The test binary runs copies of itself as the other
//! processes: the `child_*` functions below are ignored by a normal run and do their work only
//! when started by a parent test with the file in `PORTCULLIS_STORE_CHILD_DB`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use portcullis_core::{Admin, Committed, DeviceFingerprint, Effects, TotpAlgorithm, TotpConfig};
use portcullis_store::SqliteRegistry;

mod common;

const CHILD_DB: &str = "PORTCULLIS_STORE_CHILD_DB";
const STEPS: u64 = 100;
const THREADS_PER_CHILD: usize = 4;

fn child_db() -> Option<PathBuf> {
    std::env::var_os(CHILD_DB).map(PathBuf::from)
}

fn spawn_child(test: &str, db: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(output: Output) -> String {
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Tells the parent this child is ready, and waits for the parent's go, so that the children
/// run at the same time.
fn start_together(db: &Path) {
    let dir = db.parent().unwrap();
    std::fs::write(dir.join(format!("ready-{}", std::process::id())), b"").unwrap();
    while !dir.join("go").exists() {
        thread::sleep(Duration::from_millis(1));
    }
}

/// A code of alice's that matched `step`. The lockout policy never locks: the many commits
/// that lose the race are each charged a failure, and must not lock alice out of the steps
/// that follow.
fn accept(step: u64) -> Effects {
    Effects::AcceptStep {
        user: "alice".into(),
        step,
        now_ms: 0,
        lockout: common::NEVER_LOCK,
        session: None,
    }
}

/// Every thread commits every step in order; prints the steps this process won (the commits
/// that were applied).
#[test]
#[ignore = "run by advancing_from_several_processes_accepts_each_step_at_most_once"]
fn child_advance_steps() {
    let Some(db) = child_db() else { return };
    let registry = Arc::new(SqliteRegistry::open(&db).unwrap());
    start_together(&db);
    let barrier = Arc::new(Barrier::new(THREADS_PER_CHILD));
    let handles: Vec<_> = (0..THREADS_PER_CHILD)
        .map(|_| {
            let registry = Arc::clone(&registry);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                (1..=STEPS)
                    .filter(|&step| {
                        registry.commit_now(&accept(step)).unwrap() == Committed::Applied
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let won: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .map(|s| s.to_string())
        .collect();
    println!("WON:{}", won.join(","));
}

#[test]
fn advancing_from_several_processes_accepts_each_step_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    {
        let registry = SqliteRegistry::create(&db).unwrap();
        let totp = TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
        registry.add_user("alice", totp, 0).unwrap();
    }
    const CHILDREN: usize = 3;
    let mut children: Vec<_> = (0..CHILDREN)
        .map(|_| spawn_child("child_advance_steps", &db))
        .collect();
    let ready = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ready-")
            })
            .count()
    };
    while ready() < CHILDREN {
        for child in &mut children {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("a child ended before it was ready ({status})");
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let mut won: Vec<u64> = Vec::new();
    for child in children {
        let stdout = finished(child.wait_with_output().unwrap());
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("WON:").map(|(_, won)| won))
            .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
        won.extend(
            line.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u64>().unwrap()),
        );
    }
    let mut unique = won.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        won.len(),
        "a step was accepted twice: {won:?}"
    );
    // Every thread ends on the last step, and nobody goes past it: it was accepted exactly once.
    assert_eq!(won.iter().filter(|&&s| s == STEPS).count(), 1);
    let registry = SqliteRegistry::open(&db).unwrap();
    assert!(matches!(
        registry.commit_now(&accept(STEPS)).unwrap(),
        Committed::StepTaken(_)
    ));
}

/// Revokes the device `laptop`.
#[test]
#[ignore = "run by a_revocation_in_another_process_is_seen_by_a_running_registry"]
fn child_revoke_laptop() {
    let Some(db) = child_db() else { return };
    let registry = SqliteRegistry::open(&db).unwrap();
    let revoked = registry.revoke_device("laptop", 500).unwrap();
    println!("REVOKED:{}", revoked.name);
}

#[test]
fn a_revocation_in_another_process_is_seen_by_a_running_registry() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    let running = SqliteRegistry::create(&db).unwrap();
    let totp = TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
    running.add_user("alice", totp, 0).unwrap();
    let fingerprint = DeviceFingerprint::from_bytes([4; 32]);
    running
        .bind_device("laptop", "alice", &fingerprint, 100)
        .unwrap();
    assert!(
        !running
            .device_by_fingerprint(&fingerprint)
            .unwrap()
            .unwrap()
            .is_revoked()
    );

    let stdout = finished(
        spawn_child("child_revoke_laptop", &db)
            .wait_with_output()
            .unwrap(),
    );
    assert!(stdout.contains("REVOKED:laptop"), "{stdout}");
    let seen = running
        .device_by_fingerprint(&fingerprint)
        .unwrap()
        .unwrap();
    assert_eq!(seen.revoked_ms, Some(500));
}
