//! The behaviour every `Registry` must have, run against `MemoryRegistry` (the reference) and
//! `SqliteRegistry`.

use portcullis_core::{
    DeviceFingerprint, DeviceRecord, LockState, MemoryRegistry, Registry, RegistryError, SessionId,
    SessionRecord, TotpAlgorithm, TotpConfig,
};
use portcullis_store::SqliteRegistry;

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn totp(seed: u8, digits: u8, algorithm: TotpAlgorithm, period: u64) -> TotpConfig {
    let secret: Vec<u8> = (0..20).map(|i| seed.wrapping_add(i)).collect();
    TotpConfig::new(secret, digits, algorithm, period).unwrap()
}

fn device(name: &str, user: &str, f: u8, created: u64, revoked: Option<u64>) -> DeviceRecord {
    DeviceRecord {
        name: name.into(),
        user: user.into(),
        fingerprint: fp(f),
        created_ms: created,
        revoked_ms: revoked,
    }
}

/// Exercises every method of `Registry` on an empty registry.
fn registry_contract(r: &dyn Registry) {
    // Empty.
    assert!(r.list_users().unwrap().is_empty());
    assert!(r.list_devices().unwrap().is_empty());
    assert!(r.user("alice").unwrap().is_none());
    assert!(r.device_by_name("laptop").unwrap().is_none());
    assert!(r.device_by_fingerprint(&fp(1)).unwrap().is_none());

    // Users.
    r.add_user("alice", totp(1, 6, TotpAlgorithm::Sha1, 30), 100)
        .unwrap();
    assert_eq!(
        r.add_user("alice", totp(2, 8, TotpAlgorithm::Sha256, 60), 101),
        Err(RegistryError::AlreadyExists("user alice".into()))
    );
    r.add_user("bob", totp(3, 8, TotpAlgorithm::Sha512, 60), 102)
        .unwrap();
    for bad in ["", "a\nb", "tab\there", &"x".repeat(129)] {
        assert!(
            matches!(
                r.add_user(bad, totp(4, 6, TotpAlgorithm::Sha1, 30), 0),
                Err(RegistryError::Invalid(_))
            ),
            "user name {bad:?} must be refused"
        );
    }
    r.add_user(&"x".repeat(128), totp(4, 6, TotpAlgorithm::Sha1, 30), 0)
        .unwrap();

    let alice = r.user("alice").unwrap().unwrap();
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.created_ms, 100);
    let alice_totp = alice.totp.unwrap();
    let expected = totp(1, 6, TotpAlgorithm::Sha1, 30);
    assert_eq!(alice_totp.secret(), expected.secret());
    assert_eq!(alice_totp.digits(), 6);
    assert_eq!(alice_totp.algorithm(), TotpAlgorithm::Sha1);
    assert_eq!(alice_totp.period(), 30);
    assert_eq!(
        alice_totp.generate(1_700_000_000),
        expected.generate(1_700_000_000)
    );
    let bob_totp = r.user("bob").unwrap().unwrap().totp.unwrap();
    assert_eq!(
        bob_totp.secret(),
        totp(3, 8, TotpAlgorithm::Sha512, 60).secret()
    );
    assert_eq!(
        (bob_totp.digits(), bob_totp.algorithm(), bob_totp.period()),
        (8, TotpAlgorithm::Sha512, 60)
    );
    assert!(r.user("nobody").unwrap().is_none());

    // Binding.
    let laptop = r.bind_device("laptop", "alice", &fp(1), 200).unwrap();
    assert_eq!(laptop, device("laptop", "alice", 1, 200, None));
    assert_eq!(
        r.bind_device("laptop", "bob", &fp(2), 201),
        Err(RegistryError::AlreadyExists("device laptop".into()))
    );
    assert_eq!(
        r.bind_device("other", "bob", &fp(1), 201),
        Err(RegistryError::AlreadyExists(format!(
            "a device with fingerprint {} (bound as laptop)",
            fp(1)
        )))
    );
    assert_eq!(
        r.bind_device("phone", "carol", &fp(3), 201),
        Err(RegistryError::NotFound("user carol".into()))
    );
    assert!(matches!(
        r.bind_device("", "alice", &fp(3), 201),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        r.bind_device("bad\u{7f}name", "alice", &fp(3), 201),
        Err(RegistryError::Invalid(_))
    ));
    assert_eq!(
        r.device_by_fingerprint(&fp(1)).unwrap(),
        Some(laptop.clone())
    );
    assert_eq!(r.device_by_name("laptop").unwrap(), Some(laptop.clone()));
    assert!(r.device_by_fingerprint(&fp(2)).unwrap().is_none());
    assert!(r.device_by_name("other").unwrap().is_none());

    // Revoking, then binding the name (and the fingerprint) again.
    let revoked = r.revoke_device("laptop", 300).unwrap();
    assert_eq!(revoked, device("laptop", "alice", 1, 200, Some(300)));
    assert!(revoked.is_revoked());
    assert_eq!(
        r.revoke_device("laptop", 301),
        Err(RegistryError::NotFound("active device laptop".into()))
    );
    assert_eq!(
        r.revoke_device("nothing", 301),
        Err(RegistryError::NotFound("active device nothing".into()))
    );
    assert_eq!(r.device_by_name("laptop").unwrap(), Some(revoked.clone()));
    assert_eq!(
        r.device_by_fingerprint(&fp(1)).unwrap(),
        Some(revoked.clone())
    );

    let laptop2 = r.bind_device("laptop", "bob", &fp(2), 400).unwrap();
    assert_eq!(r.device_by_name("laptop").unwrap(), Some(laptop2.clone()));
    assert_eq!(
        r.device_by_fingerprint(&fp(2)).unwrap(),
        Some(laptop2.clone())
    );
    assert_eq!(
        r.device_by_fingerprint(&fp(1)).unwrap(),
        Some(revoked.clone())
    );
    let old = r.bind_device("old-laptop", "alice", &fp(1), 500).unwrap();
    assert_eq!(r.device_by_fingerprint(&fp(1)).unwrap(), Some(old.clone()));
    assert_eq!(
        r.bind_device("laptop", "alice", &fp(9), 501),
        Err(RegistryError::AlreadyExists("device laptop".into()))
    );

    // The active binding wins even when a revoked one was made later (a clock moved back).
    r.bind_device("tablet", "alice", &fp(5), 1000).unwrap();
    r.revoke_device("tablet", 1001).unwrap();
    let tablet = r.bind_device("tablet", "alice", &fp(6), 900).unwrap();
    assert_eq!(r.device_by_name("tablet").unwrap(), Some(tablet));
    r.bind_device("spare", "bob", &fp(5), 800).unwrap();
    assert_eq!(
        r.device_by_fingerprint(&fp(5)).unwrap(),
        Some(device("spare", "bob", 5, 800, None))
    );

    // Among revoked bindings, the latest one.
    r.bind_device("watch", "bob", &fp(7), 10).unwrap();
    r.revoke_device("watch", 11).unwrap();
    r.bind_device("watch", "bob", &fp(8), 20).unwrap();
    r.revoke_device("watch", 21).unwrap();
    assert_eq!(
        r.device_by_name("watch").unwrap(),
        Some(device("watch", "bob", 8, 20, Some(21)))
    );
    r.bind_device("watch2", "bob", &fp(7), 30).unwrap();
    r.revoke_device("watch2", 31).unwrap();
    assert_eq!(
        r.device_by_fingerprint(&fp(7)).unwrap(),
        Some(device("watch2", "bob", 7, 30, Some(31)))
    );

    // TOTP steps: single use, never backwards, per user.
    assert!(r.advance_totp_step("alice", 10).unwrap());
    assert!(!r.advance_totp_step("alice", 10).unwrap());
    assert!(!r.advance_totp_step("alice", 9).unwrap());
    assert!(r.advance_totp_step("alice", 11).unwrap());
    assert!(r.advance_totp_step("alice", 1_000_000).unwrap());
    assert!(!r.advance_totp_step("alice", 11).unwrap());
    assert!(r.advance_totp_step("bob", 0).unwrap());
    assert!(!r.advance_totp_step("bob", 0).unwrap());
    assert!(r.advance_totp_step("bob", 5).unwrap());
    assert_eq!(
        r.advance_totp_step("nobody", 1),
        Err(RegistryError::NotFound("user nobody".into()))
    );

    // Lockout state.
    assert_eq!(r.lock_state("alice").unwrap(), LockState::default());
    assert_eq!(r.lock_state("nobody").unwrap(), LockState::default());
    let locked = LockState {
        failures: 5,
        locked_until_ms: 30_000,
    };
    let mut seen = Vec::new();
    let mut set = |s: LockState| {
        seen.push(s);
        locked
    };
    assert_eq!(r.update_lock_state("alice", &mut set).unwrap(), locked);
    assert_eq!(seen, vec![LockState::default()]);
    assert_eq!(r.lock_state("alice").unwrap(), locked);
    assert_eq!(r.lock_state("bob").unwrap(), LockState::default());
    let mut bump = |s: LockState| LockState {
        failures: s.failures + 1,
        locked_until_ms: s.locked_until_ms * 2,
    };
    let bumped = r.update_lock_state("alice", &mut bump).unwrap();
    assert_eq!(
        bumped,
        LockState {
            failures: 6,
            locked_until_ms: 60_000
        }
    );
    assert_eq!(r.lock_state("alice").unwrap(), bumped);
    let mut clear = |_: LockState| LockState::default();
    assert_eq!(
        r.update_lock_state("nobody", &mut clear),
        Err(RegistryError::NotFound("user nobody".into()))
    );
    assert_eq!(r.lock_state("alice").unwrap(), bumped);
    assert_eq!(
        r.update_lock_state("alice", &mut clear).unwrap(),
        LockState::default()
    );
    assert_eq!(r.lock_state("alice").unwrap(), LockState::default());

    // Sessions. Expiry far ahead, so that no implementation may forget them yet (the
    // session-specific behaviour is in tests/sessions.rs).
    let far = 1 << 60;
    let s1 = SessionId([1; 16]);
    let s2 = SessionId([2; 16]);
    for (id, time) in [(s1, 10), (s2, 20)] {
        r.record_session(&SessionRecord {
            id,
            user: "alice".into(),
            fingerprint: fp(1),
            totp_time_ms: time,
            expires_ms: far,
            revoked_ms: None,
        })
        .unwrap();
    }
    assert!(!r.is_session_revoked(&s1).unwrap());
    assert_eq!(r.revoke_session(&s1, 500).unwrap().revoked_ms, Some(500));
    assert!(r.is_session_revoked(&s1).unwrap());
    assert!(!r.is_session_revoked(&s2).unwrap());
    // Revoking again keeps the first time.
    assert_eq!(r.revoke_session(&s1, 600).unwrap().revoked_ms, Some(500));
    assert!(r.is_session_revoked(&s1).unwrap());
    r.revoke_session(&s2, 700).unwrap();
    assert!(r.is_session_revoked(&s1).unwrap());
    assert!(r.is_session_revoked(&s2).unwrap());
    assert!(matches!(
        r.revoke_session(&SessionId([3; 16]), 700),
        Err(RegistryError::NotFound(_))
    ));

    // Listing order: users by name (bytewise), devices by name then binding time.
    r.add_user("zed", totp(5, 7, TotpAlgorithm::Sha256, 45), 5)
        .unwrap();
    r.add_user("Adam", totp(6, 6, TotpAlgorithm::Sha1, 30), 6)
        .unwrap();
    r.add_user("émile", totp(7, 6, TotpAlgorithm::Sha1, 30), 7)
        .unwrap();
    let names: Vec<String> = r
        .list_users()
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    let x128 = "x".repeat(128);
    assert_eq!(names, vec!["Adam", "alice", "bob", &x128, "zed", "émile"]);
    let zed = r
        .list_users()
        .unwrap()
        .into_iter()
        .find(|u| u.name == "zed")
        .unwrap();
    assert_eq!(zed.created_ms, 5);
    assert_eq!(zed.totp.unwrap().digits(), 7);

    assert_eq!(
        r.list_devices().unwrap(),
        vec![
            device("laptop", "alice", 1, 200, Some(300)),
            device("laptop", "bob", 2, 400, None),
            device("old-laptop", "alice", 1, 500, None),
            device("spare", "bob", 5, 800, None),
            device("tablet", "alice", 6, 900, None),
            device("tablet", "alice", 5, 1000, Some(1001)),
            device("watch", "bob", 7, 10, Some(11)),
            device("watch", "bob", 8, 20, Some(21)),
            device("watch2", "bob", 7, 30, Some(31)),
        ]
    );

    // accept_totp_step: a later step is recorded and clears the lockout state in one go; an
    // earlier or equal step changes nothing.
    r.add_user("carol", totp(9, 6, TotpAlgorithm::Sha1, 30), 0)
        .unwrap();
    let locked = LockState {
        failures: 4,
        locked_until_ms: 99,
    };
    r.update_lock_state("carol", &mut |_| locked).unwrap();
    assert!(r.accept_totp_step("carol", 50).unwrap());
    assert_eq!(r.lock_state("carol").unwrap(), LockState::default());
    r.update_lock_state("carol", &mut |_| locked).unwrap();
    assert!(!r.accept_totp_step("carol", 50).unwrap());
    assert!(!r.accept_totp_step("carol", 49).unwrap());
    assert_eq!(r.lock_state("carol").unwrap(), locked);
    assert!(!r.advance_totp_step("carol", 50).unwrap());
    assert!(matches!(
        r.accept_totp_step("nobody", 1),
        Err(RegistryError::NotFound(_))
    ));
}

#[test]
fn memory_registry_meets_the_contract() {
    registry_contract(&MemoryRegistry::new());
}

#[test]
fn sqlite_registry_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let registry = SqliteRegistry::create(&dir.path().join("registry.db")).unwrap();
    registry_contract(&registry);
}

#[test]
fn sqlite_registry_keeps_everything_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let memory = MemoryRegistry::new();
    {
        let registry = SqliteRegistry::create(&path).unwrap();
        registry_contract(&registry);
        registry_contract(&memory);
    }
    let reopened = SqliteRegistry::open(&path).unwrap();
    assert_eq!(
        reopened.list_devices().unwrap(),
        memory.list_devices().unwrap()
    );
    let users = reopened.list_users().unwrap();
    let expected = memory.list_users().unwrap();
    assert_eq!(users.len(), expected.len());
    for (got, want) in users.iter().zip(&expected) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.created_ms, want.created_ms);
        let (g, w) = (got.totp.as_ref().unwrap(), want.totp.as_ref().unwrap());
        assert_eq!(g.secret(), w.secret());
        assert_eq!(
            (g.digits(), g.algorithm(), g.period()),
            (w.digits(), w.algorithm(), w.period())
        );
    }
    // The last accepted step survived: only later steps are accepted.
    assert!(!reopened.advance_totp_step("alice", 1_000_000).unwrap());
    assert!(reopened.advance_totp_step("alice", 1_000_001).unwrap());
    assert!(reopened.is_session_revoked(&SessionId([2; 16])).unwrap());
    assert!(!reopened.is_session_revoked(&SessionId([3; 16])).unwrap());
}
