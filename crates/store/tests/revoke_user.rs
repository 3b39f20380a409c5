//! `Admin::revoke_user`: every active device of the user, and only those, run against
//! `MemoryRegistry` and `SqliteRegistry` (also from a second handle on the same file).

use portcullis_core::{
    DeviceFingerprint, MemoryRegistry, Registry, RegistryError, TotpAlgorithm, TotpConfig,
};
use portcullis_store::SqliteRegistry;

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn totp() -> TotpConfig {
    TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap()
}

/// `writer` revokes; `reader` (the same registry, or another handle on the same file) sees it.
fn revoke_user_contract(writer: &dyn Registry, reader: &dyn Registry) {
    writer.add_user("alice", totp(), 1).unwrap();
    writer.add_user("bob", totp(), 1).unwrap();
    writer.add_user("carol", totp(), 1).unwrap();
    writer.bind_device("phone", "alice", &fp(1), 10).unwrap();
    writer.bind_device("laptop", "alice", &fp(2), 11).unwrap();
    writer.bind_device("old", "alice", &fp(3), 12).unwrap();
    writer.revoke_device("old", 13).unwrap();
    writer.bind_device("desk", "bob", &fp(4), 14).unwrap();

    // Only alice's active devices, sorted by name, revoked at the given time.
    let revoked = writer.revoke_user("alice", 500).unwrap();
    let names: Vec<&str> = revoked.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["laptop", "phone"]);
    assert!(revoked.iter().all(|d| d.revoked_ms == Some(500)));
    assert!(revoked.iter().all(|d| d.user == "alice"));

    for f in [1, 2] {
        let device = reader.device_by_fingerprint(&fp(f)).unwrap().unwrap();
        assert_eq!(
            device.revoked_ms,
            Some(500),
            "device {} revoked",
            device.name
        );
    }
    // The device revoked before keeps its own time; bob's device is untouched.
    assert_eq!(
        reader.device_by_name("old").unwrap().unwrap().revoked_ms,
        Some(13)
    );
    assert_eq!(
        reader.device_by_name("desk").unwrap().unwrap().revoked_ms,
        None
    );

    // Again: nothing left to revoke, not an error.
    assert!(writer.revoke_user("alice", 600).unwrap().is_empty());
    // A user without devices: nothing to revoke.
    assert!(writer.revoke_user("carol", 600).unwrap().is_empty());
    // No such user.
    assert_eq!(
        writer.revoke_user("mallory", 600),
        Err(RegistryError::NotFound("user mallory".into()))
    );

    // The user stays enrolled, and a device bound afterwards is active.
    assert!(reader.user("alice").unwrap().is_some());
    writer
        .bind_device("new-phone", "alice", &fp(5), 700)
        .unwrap();
    assert_eq!(
        reader
            .device_by_fingerprint(&fp(5))
            .unwrap()
            .unwrap()
            .revoked_ms,
        None
    );
}

#[test]
fn memory_registry_revokes_every_active_device_of_a_user() {
    let r = MemoryRegistry::new();
    revoke_user_contract(&r, &r);
}

#[test]
fn sqlite_registry_revokes_every_active_device_of_a_user_seen_by_another_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let writer = SqliteRegistry::create(&path).unwrap();
    let reader = SqliteRegistry::open(&path).unwrap();
    revoke_user_contract(&writer, &reader);
}
