//! Session records (recorded by the commit that accepts a step, `GateStore::commit`, and read
//! and revoked through `SessionStore`), run against `MemoryRegistry` (the reference) and
//! `SqliteRegistry`; what only SQLite does (the bounded purge, the migration from schema
//! version 2) at the end.

use std::path::Path;
use std::sync::Arc;

use portcullis_core::{
    Admin, Committed, DeviceFingerprint, ManualClock, MemoryRegistry, Registry, RegistryError,
    SessionId, SessionRecord, SessionStore, TotpAlgorithm, TotpConfig,
};
use portcullis_store::{SCHEMA_VERSION, SecretKey, SqliteRegistry};
use rusqlite::Connection;

mod common;

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn totp() -> TotpConfig {
    TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap()
}

fn record(id: u8, user: &str, f: u8, totp_time_ms: u64, expires_ms: u64) -> SessionRecord {
    SessionRecord {
        id: SessionId([id; 16]),
        user: user.into(),
        fingerprint: fp(f),
        totp_time_ms,
        expires_ms,
        revoked_ms: None,
    }
}

/// Alice with the laptop (fp 1) and the phone (fp 2), Bob with the desk (fp 3), bound at 100.
fn enroll(r: &dyn Registry) {
    r.add_user("alice", totp(), 0).unwrap();
    r.add_user("bob", totp(), 0).unwrap();
    r.bind_device("laptop", "alice", &fp(1), 100).unwrap();
    r.bind_device("phone", "alice", &fp(2), 100).unwrap();
    r.bind_device("desk", "bob", &fp(3), 100).unwrap();
}

/// Recording, reading, listing and finding the live session of a device.
fn records_contract(r: &dyn Registry) {
    enroll(r);
    assert!(r.list_sessions(0).unwrap().is_empty());
    assert_eq!(r.live_session_for_device(&fp(1), 1_000).unwrap(), None);

    let first = record(1, "alice", 1, 1_000, 5_000);
    let second = record(2, "alice", 1, 2_000, 6_000);
    let phone = record(3, "alice", 2, 1_500, 9_000);
    let bob = record(4, "bob", 3, 1_200, 9_000);
    for s in [&first, &second, &phone, &bob] {
        common::record(r, s);
    }
    assert_eq!(r.session(&first.id).unwrap(), Some(first.clone()));
    assert_eq!(r.session(&SessionId([9; 16])).unwrap(), None);
    // An id is recorded once: a second record never replaces the first.
    assert_eq!(
        common::commit(r, &common::recording(&record(1, "bob", 3, 2_500, 9_000))),
        Err(RegistryError::AlreadyExists(format!(
            "session {}",
            first.id
        )))
    );
    assert_eq!(r.session(&first.id).unwrap(), Some(first.clone()));

    // Newest first; those that expired by `now` are left out.
    assert_eq!(
        r.list_sessions(2_000).unwrap(),
        vec![second.clone(), phone.clone(), bob.clone(), first.clone()]
    );
    assert_eq!(
        r.list_sessions(5_000).unwrap(),
        vec![second.clone(), phone.clone(), bob.clone()]
    );

    // The newest live session of the device.
    assert_eq!(
        r.live_session_for_device(&fp(1), 2_000).unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        r.live_session_for_device(&fp(2), 2_000).unwrap(),
        Some(phone.clone())
    );
    assert_eq!(r.live_session_for_device(&fp(4), 2_000).unwrap(), None);
    // Expired: the older one is still live until it expires.
    r.revoke_session(&second.id, 3_000).unwrap();
    assert_eq!(
        r.live_session_for_device(&fp(1), 3_000).unwrap(),
        Some(first.clone())
    );
    assert_eq!(r.live_session_for_device(&fp(1), 5_000).unwrap(), None);
    // Revoked ones are listed with their revocation time.
    let listed = r.list_sessions(3_000).unwrap();
    assert_eq!(listed[0].id, second.id);
    assert_eq!(listed[0].revoked_ms, Some(3_000));
    assert!(!listed[0].is_live(3_000));
    assert!(listed[1].is_live(3_000));
}

/// A device revoked and bound again: the sessions of the old binding stay dead.
fn rebinding_contract(r: &dyn Registry) {
    enroll(r);
    common::record(r, &record(1, "alice", 1, 1_000, 50_000));
    common::record(r, &record(2, "bob", 3, 1_000, 50_000));
    let revoked = r.revoke_device("laptop", 2_000).unwrap();
    assert_eq!(revoked.revoked_ms, Some(2_000));
    // The device's sessions, and no other.
    assert!(common::is_revoked(r, &SessionId([1; 16])));
    assert!(!common::is_revoked(r, &SessionId([2; 16])));
    assert_eq!(
        r.session(&SessionId([1; 16])).unwrap().unwrap().revoked_ms,
        Some(2_000)
    );
    assert_eq!(r.live_session_for_device(&fp(1), 3_000).unwrap(), None);

    // The same key bound again, to Bob: neither Alice's old session nor a session of Alice's
    // made before the new binding counts for it.
    r.bind_device("laptop-2", "bob", &fp(1), 4_000).unwrap();
    common::record(r, &record(3, "alice", 1, 3_500, 50_000));
    common::record(r, &record(4, "bob", 1, 3_900, 50_000));
    assert_eq!(r.live_session_for_device(&fp(1), 5_000).unwrap(), None);
    let fresh = record(5, "bob", 1, 4_500, 50_000);
    common::record(r, &fresh);
    assert_eq!(
        r.live_session_for_device(&fp(1), 5_000).unwrap(),
        Some(fresh)
    );

    // Revoking a user revokes the sessions of all the user's devices, in the same change.
    common::record(r, &record(6, "alice", 2, 5_000, 50_000));
    let devices = r.revoke_user("alice", 6_000).unwrap();
    assert_eq!(
        devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["phone"]
    );
    for id in [1, 3, 6] {
        assert!(common::is_revoked(r, &SessionId([id; 16])), "{id}");
    }
    // Alice's session 1 keeps the time of its first revocation.
    assert_eq!(
        r.session(&SessionId([1; 16])).unwrap().unwrap().revoked_ms,
        Some(2_000)
    );
    for id in [2, 4, 5] {
        assert!(!common::is_revoked(r, &SessionId([id; 16])), "{id}");
    }
    assert_eq!(r.live_session_for_device(&fp(2), 6_000).unwrap(), None);
    assert_eq!(
        r.live_session_for_device(&fp(3), 6_000)
            .unwrap()
            .unwrap()
            .id,
        SessionId([2; 16])
    );
}

/// Recording a session forgets records that expired by its time.
fn purge_contract(r: &dyn Registry) {
    enroll(r);
    let old = record(1, "alice", 1, 1_000, 2_000);
    let live = record(2, "alice", 1, 1_500, 9_000);
    common::record(r, &old);
    common::record(r, &live);
    r.revoke_session(&old.id, 1_800).unwrap();
    // Reading never forgets.
    assert!(r.session(&old.id).unwrap().is_some());
    assert_eq!(r.list_sessions(3_000).unwrap().len(), 1);
    common::record(r, &record(3, "alice", 2, 3_000, 9_000));
    assert_eq!(r.session(&old.id).unwrap(), None);
    assert!(!common::is_revoked(r, &old.id));
    assert!(matches!(
        r.revoke_session(&old.id, 3_000),
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(r.session(&live.id).unwrap(), Some(live));
}

fn sqlite(dir: &Path, clock_ms: u64) -> SqliteRegistry {
    SqliteRegistry::create(&dir.join("registry.db"))
        .unwrap()
        .with_clock(Arc::new(ManualClock::new(clock_ms)))
}

#[test]
fn memory_registry_keeps_session_records() {
    records_contract(&MemoryRegistry::new());
    rebinding_contract(&MemoryRegistry::new());
    purge_contract(&MemoryRegistry::new());
}

#[test]
fn sqlite_registry_keeps_session_records() {
    for contract in [records_contract, rebinding_contract, purge_contract] {
        let dir = tempfile::tempdir().unwrap();
        contract(&sqlite(dir.path(), 1_000_000));
    }
}

#[test]
fn session_records_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let s = record(7, "alice", 1, 1_000, 1 << 60);
    {
        let r = SqliteRegistry::create(&path).unwrap();
        enroll(&r);
        common::record(&r, &s);
        r.revoke_session(&s.id, 2_000).unwrap();
    }
    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(
        r.session(&s.id).unwrap(),
        Some(SessionRecord {
            revoked_ms: Some(2_000),
            ..s
        })
    );
}

fn session_rows(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn sqlite_forgets_a_bounded_number_of_expired_records_per_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let r = sqlite(dir.path(), 1_000_000);
    enroll(&r);
    for i in 0..100u8 {
        common::record(&r, &record(i, "alice", 1, 1_000, 2_000 + u64::from(i)));
    }
    assert_eq!(session_rows(&path), 100);
    common::record(&r, &record(200, "alice", 1, 5_000, 9_000));
    assert_eq!(session_rows(&path), 101 - 64);
    // At most one purge per second of the sessions' time.
    common::record(&r, &record(201, "alice", 1, 5_500, 9_000));
    assert_eq!(session_rows(&path), 102 - 64);
    common::record(&r, &record(202, "alice", 1, 6_000, 9_000));
    assert_eq!(session_rows(&path), 3);
}

#[test]
fn sqlite_forgets_nothing_its_own_clock_still_finds_live() {
    // The session's time says the old record expired; the registry's clock does not.
    let dir = tempfile::tempdir().unwrap();
    let r = sqlite(dir.path(), 1_500);
    enroll(&r);
    let old = record(1, "alice", 1, 1_000, 2_000);
    common::record(&r, &old);
    common::record(&r, &record(2, "alice", 1, 3_000, 9_000));
    assert_eq!(r.session(&old.id).unwrap(), Some(old));
}

/// Turns a registry written by this build back into schema version 2: `revoked_sessions`
/// instead of `sessions`, and no service flag or roles.
fn downgrade_to_v2(path: &Path) {
    let raw = Connection::open(path).unwrap();
    raw.execute_batch(
        "DROP TABLE user_roles;
         ALTER TABLE users DROP COLUMN service;
         DROP TABLE sessions;
         CREATE TABLE revoked_sessions (
             id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
             expires_ms INTEGER NOT NULL
         ) STRICT, WITHOUT ROWID;
         CREATE INDEX revoked_sessions_by_expiry ON revoked_sessions (expires_ms);
         INSERT INTO revoked_sessions VALUES (zeroblob(16), 99);
         PRAGMA user_version = 2;",
    )
    .unwrap();
}

fn tables(path: &Path) -> Vec<String> {
    Connection::open(path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_version_2_registry_is_migrated_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    {
        let r = SqliteRegistry::create(&path).unwrap();
        enroll(&r);
        assert_eq!(
            r.commit_now(&common::accept("alice", 77, 0)),
            Ok(Committed::Applied)
        );
    }
    downgrade_to_v2(&path);
    assert_eq!(user_version(&path), 2);
    assert_eq!(tables(&path), ["devices", "revoked_sessions", "users"]);

    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(SCHEMA_VERSION, 5);
    assert_eq!(user_version(&path), 5);
    assert_eq!(
        tables(&path),
        ["devices", "sessions", "user_roles", "users"]
    );
    // Users, devices and gate state are as they were.
    assert_eq!(r.list_devices().unwrap().len(), 3);
    assert_eq!(
        r.user("alice").unwrap().unwrap().totp.unwrap().secret(),
        &[9; 20]
    );
    assert!(matches!(
        r.commit_now(&common::accept("alice", 77, 0)),
        Ok(Committed::StepTaken(_))
    ));
    // The revoked ids of version 2 had no records: there is nothing to list.
    assert!(r.list_sessions(0).unwrap().is_empty());
    let s = record(1, "alice", 1, 1_000, 9_000);
    common::record(&r, &s);
    assert_eq!(r.live_session_for_device(&fp(1), 2_000).unwrap(), Some(s));
    drop(r);
    // Opening again changes nothing.
    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(r.list_sessions(0).unwrap().len(), 1);
}

#[test]
fn a_sealed_version_2_registry_is_migrated_and_its_secrets_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let key_path = dir.path().join("registry.key");
    {
        let key = SecretKey::create(&key_path).unwrap();
        let r = SqliteRegistry::create_with_key(&path, key).unwrap();
        enroll(&r);
    }
    downgrade_to_v2(&path);
    let r = SqliteRegistry::open_with_key(&path, SecretKey::load(&key_path).unwrap()).unwrap();
    assert_eq!(user_version(&path), 5);
    assert!(r.is_sealed());
    assert_eq!(
        r.user("bob").unwrap().unwrap().totp.unwrap().secret(),
        &[9; 20]
    );
    assert_eq!(
        tables(&path),
        ["devices", "sessions", "user_roles", "users"]
    );
}

/// The indexes of the `sessions` table, by name.
fn session_indexes(path: &Path) -> Vec<String> {
    Connection::open(path)
        .unwrap()
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'sessions'
             AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_version_4_registry_loses_the_session_index_by_user_and_keeps_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let s = record(1, "alice", 1, 1_000, 9_000);
    {
        let r = SqliteRegistry::create(&path).unwrap();
        enroll(&r);
        common::record(&r, &s);
    }
    let kept = ["sessions_by_expiry", "sessions_by_fingerprint"];
    assert_eq!(session_indexes(&path), kept);
    // Version 4 as it was written: one more index on the sessions.
    {
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "CREATE INDEX sessions_by_user ON sessions (user);
             PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    assert_eq!(session_indexes(&path).len(), 3);

    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(user_version(&path), 5);
    assert_eq!(session_indexes(&path), kept);
    assert_eq!(r.session(&s.id).unwrap(), Some(s.clone()));
    assert_eq!(r.live_session_for_device(&fp(1), 2_000).unwrap(), Some(s));
    // What the dropped index served still works, by a scan.
    assert_eq!(r.list_sessions(2_000).unwrap().len(), 1);
    assert_eq!(r.revoke_user("alice", 3_000).unwrap().len(), 2);
    assert!(r.list_sessions(2_000).unwrap()[0].revoked_ms.is_some());
}
