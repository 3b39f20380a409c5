//! Roles and service accounts (`Admin::user_roles`, `set_user_roles`, `add_service_user`),
//! run against `MemoryRegistry` (the reference) and `SqliteRegistry`; the migration from schema
//! version 3 at the end.

use std::path::Path;

use portcullis_core::{
    Admin, Committed, MemoryRegistry, Registry, RegistryError, TotpAlgorithm, TotpConfig,
};
use portcullis_store::{SCHEMA_VERSION, SqliteRegistry};
use rusqlite::Connection;

mod common;

fn totp() -> TotpConfig {
    TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap()
}

fn roles(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| (*r).to_owned()).collect()
}

fn each_registry(test: impl Fn(&dyn Registry)) {
    test(&MemoryRegistry::new());
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteRegistry::create(&dir.path().join("registry.db")).unwrap();
    test(&sqlite);
}

#[test]
fn roles_are_set_replaced_and_cleared() {
    each_registry(|r| {
        r.add_user("alice", totp(), 0).unwrap();
        r.add_user("bob", totp(), 0).unwrap();
        assert!(r.user_roles("alice").unwrap().is_empty());
        r.set_user_roles("alice", &roles(&["ops", "admin", "ops"]))
            .unwrap();
        assert_eq!(r.user_roles("alice").unwrap(), roles(&["admin", "ops"]));
        // Another user's roles are their own.
        assert!(r.user_roles("bob").unwrap().is_empty());
        r.set_user_roles("alice", &roles(&["audit"])).unwrap();
        assert_eq!(r.user_roles("alice").unwrap(), roles(&["audit"]));
        r.set_user_roles("alice", &[]).unwrap();
        assert!(r.user_roles("alice").unwrap().is_empty());
    });
}

#[test]
fn bad_roles_and_unknown_users_are_refused() {
    each_registry(|r| {
        r.add_user("alice", totp(), 0).unwrap();
        r.set_user_roles("alice", &roles(&["admin"])).unwrap();
        for bad in ["", "has space", "new\nline", &"x".repeat(65)] {
            assert!(matches!(
                r.set_user_roles("alice", &roles(&["ok", bad])),
                Err(RegistryError::Invalid(_))
            ));
        }
        // A refused change leaves the roles as they were.
        assert_eq!(r.user_roles("alice").unwrap(), roles(&["admin"]));
        assert!(matches!(
            r.set_user_roles("nobody", &roles(&["admin"])),
            Err(RegistryError::NotFound(_))
        ));
    });
}

#[test]
fn service_accounts_have_no_totp_and_are_flagged() {
    each_registry(|r| {
        r.add_user("alice", totp(), 5).unwrap();
        r.add_service_user("backup-bot", 7).unwrap();
        let bot = r.user("backup-bot").unwrap().unwrap();
        assert!(bot.service);
        assert!(bot.totp.is_none());
        assert_eq!(bot.created_ms, 7);
        let alice = r.user("alice").unwrap().unwrap();
        assert!(!alice.service);
        assert!(alice.totp.is_some());
        assert!(matches!(
            r.add_service_user("alice", 9),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            r.add_user("backup-bot", totp(), 9),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            r.add_service_user("", 9),
            Err(RegistryError::Invalid(_))
        ));
        r.set_user_roles("backup-bot", &roles(&["backup"])).unwrap();
        assert_eq!(r.user_roles("backup-bot").unwrap(), roles(&["backup"]));
        let listed: Vec<_> = r
            .list_users()
            .unwrap()
            .into_iter()
            .map(|u| (u.name, u.service))
            .collect();
        assert_eq!(
            listed,
            [("alice".to_owned(), false), ("backup-bot".to_owned(), true)]
        );
    });
}

#[test]
fn roles_and_service_flags_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    {
        let r = SqliteRegistry::create(&path).unwrap();
        r.add_user("alice", totp(), 0).unwrap();
        r.add_service_user("bot", 0).unwrap();
        r.set_user_roles("alice", &roles(&["admin"])).unwrap();
        r.set_user_roles("bot", &roles(&["deploy"])).unwrap();
    }
    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(r.user_roles("alice").unwrap(), roles(&["admin"]));
    assert_eq!(r.user_roles("bot").unwrap(), roles(&["deploy"]));
    assert!(r.user("bot").unwrap().unwrap().service);
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_version_3_registry_is_migrated_to_roles_and_service_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    {
        let r = SqliteRegistry::create(&path).unwrap();
        r.add_user("alice", totp(), 0).unwrap();
        assert_eq!(
            r.commit_now(&common::accept("alice", 42, 0)),
            Ok(Committed::Applied)
        );
    }
    // Back to version 3: no service flag, no roles table.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP TABLE user_roles;
             ALTER TABLE users DROP COLUMN service;
             PRAGMA user_version = 3;",
        )
        .unwrap();
    assert_eq!(user_version(&path), 3);

    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 5);
    let alice = r.user("alice").unwrap().unwrap();
    assert!(!alice.service);
    assert_eq!(alice.totp.unwrap().secret(), &[9; 20]);
    // The step accepted before the migration is still taken.
    assert!(matches!(
        r.commit_now(&common::accept("alice", 42, 0)),
        Ok(Committed::StepTaken(_))
    ));
    assert!(r.user_roles("alice").unwrap().is_empty());
    r.set_user_roles("alice", &roles(&["admin"])).unwrap();
    r.add_service_user("bot", 1).unwrap();
    drop(r);
    // Opening again changes nothing.
    let r = SqliteRegistry::open(&path).unwrap();
    assert_eq!(r.user_roles("alice").unwrap(), roles(&["admin"]));
    assert!(r.user("bot").unwrap().unwrap().service);
}
