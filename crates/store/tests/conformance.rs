//! The backend conformance suite of `portcullis-core` (`portcullis_core::conformance`) against
//! `SqliteRegistry`: one test per check, on a registry without a key (`plain::`) and on one that
//! seals its TOTP secrets (`sealed::`); then, what the suite cannot see on one handle, that every
//! check's end state survives closing and reopening the file, and is the reference's
//! (`MemoryRegistry`'s) after the same check.

use std::ops::Deref;

use portcullis_core::conformance::{CHECKS, Check, ReadyRunner, Runner};
use portcullis_core::{
    DeviceFingerprint, DeviceRecord, LockState, MemoryRegistry, Need, Registry, SessionNeed,
    SessionRecord, TotpAlgorithm,
};
use portcullis_store::{SecretKey, SqliteRegistry};
use tempfile::TempDir;

/// A registry in a temporary directory that lives as long as it.
struct Fixture {
    registry: SqliteRegistry,
    dir: TempDir,
}

impl Deref for Fixture {
    type Target = SqliteRegistry;

    fn deref(&self) -> &SqliteRegistry {
        &self.registry
    }
}

fn db(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("registry.db")
}

fn key_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("registry.key")
}

fn plain_registry() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let registry = SqliteRegistry::create(&db(&dir)).unwrap();
    Fixture { registry, dir }
}

fn sealed_registry() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::create(&key_path(&dir)).unwrap();
    let registry = SqliteRegistry::create_with_key(&db(&dir), key).unwrap();
    assert!(registry.is_sealed());
    Fixture { registry, dir }
}

mod plain {
    use super::*;
    portcullis_core::conformance_tests!(plain_registry, ReadyRunner);
}

mod sealed {
    use super::*;
    portcullis_core::conformance_tests!(sealed_registry, ReadyRunner);
}

/// Everything a registry holds, read through the traits, in a form that compares.
#[derive(Debug, PartialEq)]
struct Dump {
    users: Vec<UserDump>,
    devices: Vec<DeviceRecord>,
    /// The sessions that never expire during a check (no backend may have forgotten them).
    sessions: Vec<SessionRecord>,
    /// The user of each bound fingerprint, and that user's last accepted step.
    steps: Vec<(DeviceFingerprint, Option<String>, Option<u64>)>,
}

/// A user's record (the TOTP as secret, digits, algorithm, period), lockout state and roles.
#[derive(Debug, PartialEq)]
struct UserDump {
    name: String,
    created_ms: u64,
    service: bool,
    totp: Option<(Vec<u8>, u8, TotpAlgorithm, u64)>,
    lock: LockState,
    roles: Vec<String>,
}

fn dump(r: &dyn Registry) -> Dump {
    let runner: &dyn Runner = &ReadyRunner;
    let users = r
        .list_users()
        .unwrap()
        .into_iter()
        .map(|u| {
            let totp = u
                .totp
                .as_ref()
                .map(|t| (t.secret().to_vec(), t.digits(), t.algorithm(), t.period()));
            UserDump {
                lock: r.lock_state(&u.name).unwrap(),
                roles: r.user_roles(&u.name).unwrap(),
                name: u.name,
                created_ms: u.created_ms,
                service: u.service,
                totp,
            }
        })
        .collect();
    let devices = r.list_devices().unwrap();
    let mut fingerprints: Vec<DeviceFingerprint> = devices.iter().map(|d| d.fingerprint).collect();
    fingerprints.sort();
    fingerprints.dedup();
    let steps = fingerprints
        .into_iter()
        .map(|fingerprint| {
            let need = Need {
                fingerprint,
                secret: false,
                session: SessionNeed::None,
                now_ms: 0,
            };
            let user = runner.block_on(r.snapshot(&need)).unwrap().user;
            (
                fingerprint,
                user.as_ref().map(|u| u.name.clone()),
                user.and_then(|u| u.last_step),
            )
        })
        .collect();
    Dump {
        users,
        devices,
        sessions: r.list_sessions(1 << 59).unwrap(),
        steps,
    }
}

/// The checks whose end state is the same on every run (the concurrent ones pick a winner).
fn deterministic() -> impl Iterator<Item = &'static Check> {
    CHECKS.iter().filter(|c| !c.name.starts_with("concurrent_"))
}

fn survives_reopening(make: fn() -> Fixture, reopen: fn(&TempDir) -> SqliteRegistry) {
    for check in deterministic() {
        let reference = MemoryRegistry::new();
        (check.run)(&reference, &ReadyRunner);
        let Fixture { registry, dir } = make();
        (check.run)(&registry, &ReadyRunner);
        let before = dump(&registry);
        drop(registry);
        let reopened = reopen(&dir);
        assert_eq!(
            dump(&reopened),
            before,
            "{}: the state after reopening",
            check.name
        );
        assert_eq!(
            before,
            dump(&reference),
            "{}: the reference's state",
            check.name
        );
    }
}

#[test]
fn every_checks_state_survives_reopening_and_is_the_references() {
    survives_reopening(plain_registry, |dir| {
        SqliteRegistry::open(&db(dir)).unwrap()
    });
}

#[test]
fn every_checks_state_survives_reopening_with_the_key_and_is_the_references() {
    survives_reopening(sealed_registry, |dir| {
        let key = SecretKey::load(&key_path(dir)).unwrap();
        let registry = SqliteRegistry::open_with_key(&db(dir), key).unwrap();
        assert!(registry.is_sealed());
        registry
    });
}
