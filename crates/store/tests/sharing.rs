//! Several connections on one registry file: what one changes, the others see at once, and
//! every change is atomic across them.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;

use portcullis_core::{
    Admin, Committed, DeviceFingerprint, Effects, LockState, LockoutPolicy, ManualClock,
    RegistryError, SessionId, SessionRecord, SessionStore, TotpAlgorithm, TotpConfig,
};
use portcullis_store::SqliteRegistry;
use rusqlite::Connection;

mod common;

use common::{NEVER_LOCK, accept, charge, is_revoked};

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn with_alice(path: &Path) -> SqliteRegistry {
    let registry = SqliteRegistry::create(path).unwrap();
    let totp = TotpConfig::new(vec![9; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
    registry.add_user("alice", totp, 0).unwrap();
    registry
}

fn instances(path: &Path, n: usize) -> Vec<Arc<SqliteRegistry>> {
    (0..n)
        .map(|_| Arc::new(SqliteRegistry::open(path).unwrap()))
        .collect()
}

#[test]
fn a_revocation_by_another_connection_is_seen_by_the_next_query() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let a = with_alice(&path);
    let b = SqliteRegistry::open(&path).unwrap();

    a.bind_device("laptop", "alice", &fp(1), 10).unwrap();
    a.bind_device("phone", "alice", &fp(2), 10).unwrap();
    // B has read (and prepared its statements) while the bindings were active.
    assert!(
        !b.device_by_fingerprint(&fp(1))
            .unwrap()
            .unwrap()
            .is_revoked()
    );
    assert!(!b.device_by_name("phone").unwrap().unwrap().is_revoked());

    a.revoke_device("laptop", 20).unwrap();
    let seen = b.device_by_fingerprint(&fp(1)).unwrap().unwrap();
    assert_eq!(seen.revoked_ms, Some(20));

    // A change made outside any registry (another program on the file) is seen as well.
    let raw = Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE devices SET revoked_ms = 30 WHERE name = 'phone' AND revoked_ms IS NULL",
        [],
    )
    .unwrap();
    assert_eq!(
        b.device_by_name("phone").unwrap().unwrap().revoked_ms,
        Some(30)
    );
    assert_eq!(
        a.device_by_fingerprint(&fp(2)).unwrap().unwrap().revoked_ms,
        Some(30)
    );

    // And a binding made by B is seen by A.
    b.bind_device("laptop", "alice", &fp(3), 40).unwrap();
    assert_eq!(
        a.device_by_name("laptop").unwrap().unwrap().fingerprint,
        fp(3)
    );
}

#[test]
fn a_totp_step_is_accepted_once_among_twenty_threads_on_two_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(with_alice(&path));
    let registries = instances(&path, 2);
    const THREADS: usize = 20;
    const ROUNDS: u64 = 10;

    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let registry = Arc::clone(&registries[i % registries.len()]);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut won = Vec::new();
                for step in 1..=ROUNDS {
                    barrier.wait();
                    // The lockout policy never locks: the failures charged to the losers of
                    // one round must not lock alice out of the next.
                    let effects = Effects::AcceptStep {
                        user: "alice".into(),
                        step,
                        now_ms: 0,
                        lockout: NEVER_LOCK,
                        session: None,
                    };
                    let committed = registry.commit_now(&effects).unwrap();
                    assert!(
                        matches!(committed, Committed::Applied | Committed::StepTaken(_)),
                        "{committed:?}"
                    );
                    won.push(committed == Committed::Applied);
                }
                won
            })
        })
        .collect();
    let results: Vec<Vec<bool>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for round in 0..ROUNDS as usize {
        let winners = results.iter().filter(|won| won[round]).count();
        assert_eq!(winners, 1, "step {} accepted {winners} times", round + 1);
    }
    assert!(matches!(
        registries[0].commit_now(&accept("alice", ROUNDS, 0)),
        Ok(Committed::StepTaken(_))
    ));
}

#[test]
fn lock_state_updates_are_not_lost_between_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(with_alice(&path));
    let registries = instances(&path, 4);
    const THREADS: usize = 8;
    const UPDATES: u32 = 25;

    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let registry = Arc::clone(&registries[i % registries.len()]);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                for i in 0..UPDATES {
                    // A policy that never locks, so that every charge is written.
                    let committed = registry
                        .commit_now(&charge("alice", u64::from(i), NEVER_LOCK))
                        .unwrap();
                    assert_eq!(committed, Committed::Applied);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let total = THREADS as u32 * UPDATES;
    assert_eq!(
        registries[1].lock_state("alice").unwrap(),
        LockState {
            failures: total,
            locked_until_ms: 0
        }
    );
}

#[test]
fn only_one_of_many_racing_bindings_of_a_name_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(with_alice(&path));
    let registries = instances(&path, 3);
    const THREADS: usize = 9;

    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let registry = Arc::clone(&registries[i % registries.len()]);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                registry.bind_device("laptop", "alice", &fp(10 + i as u8), 1)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.iter().filter(|r| r.is_err()) {
        assert_eq!(
            r,
            &Err(RegistryError::AlreadyExists("device laptop".into()))
        );
    }
    assert_eq!(registries[0].list_devices().unwrap().len(), 1);
}

#[test]
fn a_session_revoked_through_one_handle_is_revoked_for_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let clock = Arc::new(ManualClock::new(1_000));
    let first = with_alice(&path).with_clock(clock.clone());
    let second = SqliteRegistry::open(&path).unwrap().with_clock(clock);
    let id = SessionId([1; 16]);
    // Recorded as the gate records a session: with the step that earned it.
    let session = SessionRecord {
        id,
        user: "alice".into(),
        fingerprint: fp(1),
        totp_time_ms: 1_000,
        expires_ms: 9_000,
        revoked_ms: None,
    };
    assert_eq!(
        first.commit_now(&common::recording(&session)),
        Ok(Committed::Applied)
    );
    assert_eq!(second.session(&id).unwrap(), Some(session));
    assert!(!is_revoked(&second, &id));
    assert_eq!(
        second.revoke_session(&id, 2_000).unwrap().revoked_ms,
        Some(2_000)
    );
    assert!(is_revoked(&first, &id));
    assert_eq!(first.session(&id).unwrap().unwrap().revoked_ms, Some(2_000));
    let raw = Connection::open(&path).unwrap();
    let rows: i64 = raw
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}

#[test]
fn a_lock_that_never_ends_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = with_alice(&path);
    // One failure short of the largest count (a state no commit reaches in a test's time).
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE users SET failures = ?1 WHERE name = 'alice'",
            [i64::from(u32::MAX - 1)],
        )
        .unwrap();
    // One more failure at the end of time: the count saturates, and the lock's end, past what
    // SQLite stores, is kept as the largest time it does.
    let policy = LockoutPolicy::default();
    assert_eq!(
        registry.commit_now(&charge("alice", u64::MAX - 5, policy)),
        Ok(Committed::Applied)
    );
    let stored = registry.lock_state("alice").unwrap();
    assert_eq!(stored.failures, u32::MAX);
    assert_eq!(stored.locked_until_ms, i64::MAX as u64);
    assert!(stored.remaining_ms(1_700_000_000_000).is_some());
    // Locked: neither a failure nor a right code changes anything.
    let now_ms = 1_700_000_000_000;
    assert_eq!(
        registry.commit_now(&charge("alice", now_ms, policy)),
        Ok(Committed::LockedOut(stored))
    );
    assert_eq!(
        registry.commit_now(&accept("alice", 1, now_ms)),
        Ok(Committed::LockedOut(stored))
    );
    assert_eq!(registry.lock_state("alice").unwrap(), stored);
}

#[test]
fn a_step_beyond_the_stored_range_is_refused_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = with_alice(&path);
    assert_eq!(
        registry.commit_now(&accept("alice", 7, 0)),
        Ok(Committed::Applied)
    );
    assert!(matches!(
        registry.commit_now(&accept("alice", u64::MAX, 0)),
        Err(RegistryError::Invalid(_))
    ));
    // No failure was charged, and the next step is still free.
    assert_eq!(registry.lock_state("alice").unwrap(), LockState::default());
    assert_eq!(
        registry.commit_now(&accept("alice", 8, 0)),
        Ok(Committed::Applied)
    );
}

#[test]
fn a_commit_that_fails_midway_changes_nothing_and_the_registry_works_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = with_alice(&path);
    let session = SessionRecord {
        id: SessionId([1; 16]),
        user: "alice".into(),
        fingerprint: fp(1),
        totp_time_ms: 1_000,
        expires_ms: 9_000,
        revoked_ms: None,
    };
    let with_session = |step: u64| Effects::AcceptStep {
        user: "alice".into(),
        step,
        now_ms: 1_000,
        lockout: LockoutPolicy::default(),
        session: Some(session.clone()),
    };
    assert_eq!(
        registry.commit_now(&with_session(1)),
        Ok(Committed::Applied)
    );
    let policy = LockoutPolicy::default();
    for _ in 0..2 {
        assert_eq!(
            registry.commit_now(&charge("alice", 1_000, policy)),
            Ok(Committed::Applied)
        );
    }
    let set = LockState {
        failures: 2,
        locked_until_ms: 0,
    };
    assert_eq!(registry.lock_state("alice").unwrap(), set);
    // Step 2 with a session id already recorded: the step is written, then the session's
    // insert fails, and the whole transaction is rolled back.
    assert_eq!(
        registry.commit_now(&with_session(2)),
        Err(RegistryError::AlreadyExists(format!(
            "session {}",
            session.id
        )))
    );
    // The failure count was not cleared (the step was not recorded) ...
    assert_eq!(registry.lock_state("alice").unwrap(), set);
    // ... and the write lock was released: another connection can write, and step 2 is still
    // free; then the first connection works on.
    let other = SqliteRegistry::open(&path).unwrap();
    assert_eq!(
        other.commit_now(&accept("alice", 2, 1_000)),
        Ok(Committed::Applied)
    );
    assert_eq!(
        registry.commit_now(&accept("alice", 3, 1_000)),
        Ok(Committed::Applied)
    );
    assert_eq!(registry.lock_state("alice").unwrap(), LockState::default());
    assert_eq!(registry.session(&session.id).unwrap(), Some(session));
}
