//! TOTP secrets at rest: sealed under the registry key, bound to their row, a wrong key refused
//! when the registry is opened, a secret that does not open failing closed at the gate, the key
//! file's checks, and the migration of version 1 files.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use portcullis_core::codec::{Factor, Prefix};
use portcullis_core::{
    Admin, Committed, ConnectionFacts, DeviceFingerprint, Gate, GateConfig, ManualClock,
    RegistryError, RejectCode, SystemRandom, TicketKey, TotpAlgorithm, TotpConfig,
};
use portcullis_store::{SCHEMA_VERSION, SecretKey, SqliteRegistry, StoreError};
use rusqlite::Connection;

mod common;

/// 20 bytes that look like nothing else in a database file.
const SECRET: &[u8; 20] =
    b"\x8d\x13\xf7\x02\xa9\x5e\xc4\x71\x3b\xe0\x66\x19\xd2\x4f\x88\x07\xbb\x2c\x95\xe3";
const OTHER_SECRET: &[u8; 20] =
    b"\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x01\x23\x45\x67\x89";

fn key(byte: u8) -> SecretKey {
    SecretKey::from_bytes([byte; SecretKey::LEN])
}

fn totp(secret: &[u8]) -> TotpConfig {
    TotpConfig::new(secret.to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap()
}

fn fp(byte: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([byte; 32])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every byte of the registry file and of its SQLite companions.
fn file_bytes(path: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        if let Ok(bytes) = fs::read(&name) {
            all.extend(bytes);
        }
    }
    all
}

/// Asserts that neither the raw bytes of `secret` nor its base32 form (as entered into an
/// authenticator app) appear anywhere in the registry's files.
#[track_caller]
fn assert_not_in_files(path: &Path, secret: &[u8]) {
    let bytes = file_bytes(path);
    assert!(!bytes.is_empty());
    assert!(!contains(&bytes, secret), "the raw secret is in the file");
    let base32 = totp(secret).secret_base32();
    assert!(
        !contains(&bytes, base32.as_bytes()),
        "the base32 secret is in the file"
    );
}

fn raw_secret(path: &Path, user: &str) -> Vec<u8> {
    Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT totp_secret FROM users WHERE name = ?1",
            [user],
            |r| r.get(0),
        )
        .unwrap()
}

fn backend_message(result: Result<impl std::fmt::Debug, RegistryError>) -> String {
    match result {
        Err(RegistryError::Backend(message)) => message,
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn sealed_secrets_are_not_in_the_file_and_open_again_under_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let registry = SqliteRegistry::create_with_key(&path, key(1)).unwrap();
    assert!(registry.is_sealed());
    registry.add_user("alice", totp(SECRET), 0).unwrap();
    registry.add_user("bob", totp(SECRET), 0).unwrap();

    // While the registry is open (the rows may still be in the write-ahead log) ...
    assert_not_in_files(&path, SECRET);
    let stored = raw_secret(&path, "alice");
    assert_eq!(stored[0], 0x01, "format byte of AES-256-GCM");
    assert_eq!(stored.len(), 1 + 12 + SECRET.len() + 16);
    assert!(!contains(&stored, SECRET));
    // ... the same secret of two users is sealed under different nonces.
    let bobs = raw_secret(&path, "bob");
    assert_ne!(stored[1..13], bobs[1..13]);
    assert_ne!(stored, bobs);
    assert_eq!(
        registry
            .user("alice")
            .unwrap()
            .unwrap()
            .totp
            .unwrap()
            .secret(),
        SECRET
    );
    drop(registry);

    // ... and after it was closed and checkpointed.
    assert_not_in_files(&path, SECRET);
    let reopened = SqliteRegistry::open_with_key(&path, key(1)).unwrap();
    let users = reopened.list_users().unwrap();
    assert_eq!(users.len(), 2);
    for user in users {
        assert_eq!(user.totp.unwrap().secret(), SECRET);
    }
}

#[test]
fn a_sealed_secret_moved_to_another_users_row_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let registry = SqliteRegistry::create_with_key(&path, key(1)).unwrap();
    registry.add_user("alice", totp(SECRET), 0).unwrap();
    registry.add_user("mallory", totp(OTHER_SECRET), 0).unwrap();

    // Someone with write access to the file but not the key gives mallory alice's secret.
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE users SET totp_secret = (SELECT totp_secret FROM users WHERE name = 'alice')
             WHERE name = 'mallory'",
            [],
        )
        .unwrap();

    let message = backend_message(registry.user("mallory"));
    assert_eq!(
        message,
        format!(
            "{}: cannot open the TOTP secret of mallory: wrong registry key or corrupt row",
            path.display()
        )
    );
    assert!(registry.list_users().is_err(), "listing must fail closed");
    // Alice's own row still opens.
    assert_eq!(
        registry
            .user("alice")
            .unwrap()
            .unwrap()
            .totp
            .unwrap()
            .secret(),
        SECRET
    );
}

#[test]
fn an_unsealed_secret_planted_in_a_sealed_registry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let registry = SqliteRegistry::create_with_key(&path, key(1)).unwrap();
    registry.add_user("alice", totp(SECRET), 0).unwrap();
    let mut planted = vec![0x00];
    planted.extend_from_slice(OTHER_SECRET);
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE users SET totp_secret = ?1 WHERE name = 'alice'",
            [&planted],
        )
        .unwrap();
    let message = backend_message(registry.user("alice"));
    assert!(
        message.contains("cannot open the TOTP secret of alice: it is stored unsealed"),
        "{message}"
    );

    // An unknown format byte and a flipped bit of a sealed secret are refused too.
    registry.add_user("bob", totp(SECRET), 0).unwrap();
    let mut flipped = raw_secret(&path, "bob");
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    let raw = Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE users SET totp_secret = ?1 WHERE name = 'bob'",
        [&flipped],
    )
    .unwrap();
    assert!(backend_message(registry.user("bob")).ends_with("wrong registry key or corrupt row"));
    flipped[0] = 0x7f;
    raw.execute(
        "UPDATE users SET totp_secret = ?1 WHERE name = 'bob'",
        [&flipped],
    )
    .unwrap();
    assert!(backend_message(registry.user("bob")).ends_with("unknown storage format 0x7f"));
}

/// A registry whose secrets are sealed is refused when opened without its key, with one line
/// that names the file and the key: not at the first connection, as a registry failure.
#[test]
fn a_registry_with_sealed_secrets_is_refused_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    SqliteRegistry::create_with_key(&path, key(1))
        .unwrap()
        .add_user("alice", totp(SECRET), 0)
        .unwrap();
    let error = SqliteRegistry::open(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::SealedWithoutKey { .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{}: the TOTP secrets in this registry are sealed under a registry key; open it with \
             that key (portcullis init writes it as registry.key beside the registry)",
            path.display()
        )
    );
    // Nothing was changed: the key still opens it.
    let keyed = SqliteRegistry::open_with_key(&path, key(1)).unwrap();
    assert_eq!(
        keyed.user("alice").unwrap().unwrap().totp.unwrap().secret(),
        SECRET
    );
    // A registry without secrets (service accounts only, or empty) opens without a key.
    let empty = dir.path().join("empty.db");
    SqliteRegistry::create_with_key(&empty, key(2))
        .unwrap()
        .add_service_user("ci", 0)
        .unwrap();
    assert!(!SqliteRegistry::open(&empty).unwrap().is_sealed());
}

/// The one-line refusal of a registry opened with a key that does not open its secrets.
fn wrong_key_message(path: &Path) -> String {
    format!(
        "{}: the registry key does not open the TOTP secrets sealed in this registry; use the registry.key it was sealed with",
        path.display()
    )
}

/// Opens `path` with `key`, expecting [`StoreError::WrongKey`] naming the file; returns the
/// error.
#[track_caller]
fn assert_wrong_key(path: &Path, key: SecretKey) -> StoreError {
    let error = SqliteRegistry::open_with_key(path, key).expect_err("a wrong key must not open");
    assert!(matches!(&error, StoreError::WrongKey { .. }), "{error}");
    assert_eq!(error.to_string(), wrong_key_message(path));
    assert_eq!(error.path(), path);
    error
}

/// The gate's decision on `code` for alice on the device `fp(7)`, at `now_s`.
fn decide_alice(
    registry: Arc<SqliteRegistry>,
    code: &str,
    nonce: u8,
    now_s: u64,
) -> portcullis_core::Decision {
    let rng = Arc::new(SystemRandom::new());
    let gate = Gate::new(
        GateConfig::default(),
        registry,
        TicketKey::generate(rng.as_ref()).unwrap(),
        Arc::new(ManualClock::new(now_s * 1000)),
        rng,
    );
    let prefix = Prefix {
        user: "alice".into(),
        factor: Factor::Totp(code.to_owned()),
        nonce: [nonce; 16],
        time_ms: now_s * 1000,
        binding: [5; 32],
        agent: None,
    };
    let facts = ConnectionFacts {
        exporter: [5; 32],
        fingerprint: fp(7),
    };
    common::now(gate.authenticate(&prefix.encode().unwrap(), &facts))
}

#[test]
fn a_wrong_key_is_refused_when_the_registry_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    {
        let registry = SqliteRegistry::create_with_key(&path, key(1)).unwrap();
        registry.add_user("alice", totp(SECRET), 0).unwrap();
        registry.bind_device("laptop", "alice", &fp(7), 0).unwrap();
    }
    let error = assert_wrong_key(&path, key(2));
    assert!(!error.to_string().contains('\n'), "{error}");
    // As a registry error (what a server reports), the same line.
    assert_eq!(
        RegistryError::from(error),
        RegistryError::Backend(wrong_key_message(&path))
    );

    // More users than are tried: still refused.
    {
        let registry = SqliteRegistry::open_with_key(&path, key(1)).unwrap();
        for name in ["bob", "carol", "dave", "erin"] {
            registry.add_user(name, totp(OTHER_SECRET), 0).unwrap();
        }
    }
    assert_wrong_key(&path, key(2));

    // The refused opens changed nothing: the right key opens, and the gate lets alice in.
    let now_s = 1_700_000_000;
    let code = totp(SECRET).generate(now_s);
    let right = Arc::new(SqliteRegistry::open_with_key(&path, key(1)).unwrap());
    assert_eq!(right.list_users().unwrap().len(), 5);
    let decision = decide_alice(right, &code, 1, now_s);
    assert!(decision.outcome.is_ok(), "{:?}", decision.outcome.err());
}

#[test]
fn a_registry_without_sealed_secrets_opens_under_any_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    drop(SqliteRegistry::create_with_key(&path, key(1)).unwrap());
    let other = SqliteRegistry::open_with_key(&path, key(2)).unwrap();
    assert!(other.is_sealed());
    // Users without a TOTP secret seal nothing.
    other.add_service_user("robot", 0).unwrap();
    drop(other);
    let third = SqliteRegistry::open_with_key(&path, key(3)).unwrap();
    assert_eq!(third.list_users().unwrap().len(), 1);
    // Once a secret is sealed, the key that sealed it is the one that opens the registry.
    third.add_user("alice", totp(SECRET), 0).unwrap();
    drop(third);
    assert_wrong_key(&path, key(1));
    assert_wrong_key(&path, key(2));
    SqliteRegistry::open_with_key(&path, key(3)).unwrap();

    // Secrets stored unsealed (by a registry opened without a key) decide nothing: the
    // registry opens under a key, and the read of such a secret fails closed.
    let plain_path = dir.path().join("plain.db");
    SqliteRegistry::create(&plain_path)
        .unwrap()
        .add_user("alice", totp(SECRET), 0)
        .unwrap();
    let keyed = SqliteRegistry::open_with_key(&plain_path, key(1)).unwrap();
    let message = backend_message(keyed.user("alice"));
    assert!(
        message.ends_with("cannot open the TOTP secret of alice: it is stored unsealed, which a registry opened with a key refuses"),
        "{message}"
    );
}

#[test]
fn one_secret_that_opens_proves_the_key_and_a_damaged_one_still_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    {
        let registry = SqliteRegistry::create_with_key(&path, key(1)).unwrap();
        registry.add_user("alice", totp(SECRET), 0).unwrap();
        registry.add_user("bob", totp(OTHER_SECRET), 0).unwrap();
        registry.add_user("carol", totp(OTHER_SECRET), 0).unwrap();
        registry.add_user("dave", totp(OTHER_SECRET), 0).unwrap();
    }
    let tamper = |user: &str| {
        let mut damaged = raw_secret(&path, user);
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE users SET totp_secret = ?1 WHERE name = ?2",
                rusqlite::params![damaged, user],
            )
            .unwrap();
    };

    // Alice's row is damaged, bob's opens: the key is right, the registry opens ...
    tamper("alice");
    let registry = SqliteRegistry::open_with_key(&path, key(1)).unwrap();
    assert_eq!(
        registry
            .user("bob")
            .unwrap()
            .unwrap()
            .totp
            .unwrap()
            .secret(),
        OTHER_SECRET
    );
    // ... and alice's read fails closed.
    let message = backend_message(registry.user("alice"));
    assert_eq!(
        message,
        format!(
            "{}: cannot open the TOTP secret of alice: wrong registry key or corrupt row",
            path.display()
        )
    );
    assert!(registry.list_users().is_err(), "listing must fail closed");
    drop(registry);
    // Another key opens neither row.
    assert_wrong_key(&path, key(2));

    // Three damaged rows: the secrets are tried until one opens, so the right key still opens.
    tamper("bob");
    tamper("carol");
    drop(SqliteRegistry::open_with_key(&path, key(1)).unwrap());
    assert_wrong_key(&path, key(2));

    // When no secret opens, the registry cannot tell a wrong key from damage: refused.
    tamper("dave");
    assert_wrong_key(&path, key(1));
}

#[test]
fn a_secret_that_does_not_open_fails_closed_at_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    // Opened while empty with key 1; another handle, with key 2, then seals alice's secret:
    // the first handle holds a key that does not open it.
    let first = Arc::new(SqliteRegistry::create_with_key(&path, key(1)).unwrap());
    let second = Arc::new(SqliteRegistry::open_with_key(&path, key(2)).unwrap());
    second.add_user("alice", totp(SECRET), 0).unwrap();
    second.bind_device("laptop", "alice", &fp(7), 0).unwrap();

    let now_s = 1_700_000_000;
    let code = totp(SECRET).generate(now_s);
    // Devices and lock state are not sealed; the secret does not open.
    assert!(first.device_by_name("laptop").unwrap().is_some());
    let message = backend_message(first.user("alice"));
    assert!(
        message
            .ends_with("cannot open the TOTP secret of alice: wrong registry key or corrupt row"),
        "{message}"
    );
    assert!(!message.contains(&code));

    // The gate refuses a right code: OVERLOADED, not an acceptance ...
    let decision = decide_alice(first.clone(), &code, 1, now_s);
    let rejection = decision
        .outcome
        .expect_err("a secret that does not open must not let anyone in");
    assert_eq!(rejection.code, RejectCode::Overloaded);
    // ... no failure was charged, and the code was not spent: the handle with the key that
    // sealed the secret accepts it.
    assert_eq!(first.lock_state("alice").unwrap().failures, 0);
    let decision = decide_alice(second, &code, 2, now_s);
    assert!(decision.outcome.is_ok(), "{:?}", decision.outcome.err());
    drop(first);
    // Opened afresh, key 1 is refused at once.
    assert_wrong_key(&path, key(1));
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(unix)]
#[test]
fn the_key_file_is_made_private_and_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.key");
    let created = SecretKey::create(&path).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let bytes = fs::read(&path).unwrap();
    assert_ne!(bytes, vec![0u8; 32]);

    let error = SecretKey::create(&path).unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { .. }), "{error}");
    assert_eq!(
        fs::read(&path).unwrap(),
        bytes,
        "the key file was overwritten"
    );

    // The created key and the loaded one are the same key.
    let db = dir.path().join("portcullis.db");
    SqliteRegistry::create_with_key(&db, created)
        .unwrap()
        .add_user("alice", totp(SECRET), 0)
        .unwrap();
    let loaded = SecretKey::load(&path).unwrap();
    let registry = SqliteRegistry::open_with_key(&db, loaded).unwrap();
    assert_eq!(
        registry
            .user("alice")
            .unwrap()
            .unwrap()
            .totp
            .unwrap()
            .secret(),
        SECRET
    );
    let debug = format!("{:?}", SecretKey::load(&path).unwrap());
    assert_eq!(debug, "SecretKey(<redacted>)");
    let debug = format!("{registry:?}");
    assert!(debug.contains("sealed: true"), "{debug}");
}

#[cfg(unix)]
#[test]
fn a_key_file_others_may_read_or_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.key");
    SecretKey::create(&path).unwrap();
    let shown = path.display().to_string();

    chmod(&path, 0o644);
    let error = SecretKey::load(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::KeyExposed { mode: 0o644, .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!("{shown}: the key file is readable by others (mode 0644); run chmod 600 {shown}")
    );
    assert_eq!(error.path(), path);

    for (mode, word) in [
        (0o640, "readable"),
        (0o604, "readable"),
        (0o620, "writable"),
        (0o602, "writable"),
        (0o610, "accessible"),
    ] {
        chmod(&path, mode);
        let error = SecretKey::load(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{shown}: the key file is {word} by others (mode {mode:04o}); run chmod 600 {shown}"
            )
        );
    }
    for mode in [0o600, 0o400] {
        chmod(&path, mode);
        SecretKey::load(&path).unwrap();
    }
}

#[test]
fn a_key_file_of_the_wrong_length_or_missing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.key");
    let shown = path.display().to_string();
    for len in [0usize, 16, 31, 33, 64] {
        let _ = fs::remove_file(&path);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        std::io::Write::write_all(&mut options.open(&path).unwrap(), &vec![9u8; len]).unwrap();
        let error = SecretKey::load(&path).unwrap_err();
        assert!(
            matches!(error, StoreError::KeyLength { len: l, .. } if l == len as u64),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!("{shown}: a registry key file holds exactly 32 bytes, this one holds {len}")
        );
    }

    let missing = dir.path().join("absent.key");
    let error = SecretKey::load(&missing).unwrap_err();
    assert!(matches!(error, StoreError::KeyMissing { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}: no registry key file", missing.display())),
        "{error}"
    );

    let error = SecretKey::load(dir.path()).unwrap_err();
    assert!(!error.to_string().contains('\n'), "{error}");
    assert_eq!(error.path(), dir.path());
}

/// The schema of version 1, as that version wrote it: the secrets in the clear.
const SCHEMA_V1: &str = "
CREATE TABLE users (
    name            TEXT    NOT NULL PRIMARY KEY,
    totp_secret     BLOB,
    digits          INTEGER CHECK (digits BETWEEN 6 AND 8),
    algorithm       TEXT    CHECK (algorithm IN ('SHA1', 'SHA256', 'SHA512')),
    period          INTEGER CHECK (period >= 1),
    last_step       INTEGER,
    failures        INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until_ms INTEGER NOT NULL DEFAULT 0 CHECK (locked_until_ms >= 0),
    created_ms      INTEGER NOT NULL CHECK (created_ms >= 0),
    CHECK ((totp_secret IS NULL) = (digits IS NULL)
       AND (totp_secret IS NULL) = (algorithm IS NULL)
       AND (totp_secret IS NULL) = (period IS NULL))
) STRICT;
CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    user        TEXT    NOT NULL REFERENCES users (name),
    fingerprint BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    created_ms  INTEGER NOT NULL CHECK (created_ms >= 0),
    revoked_ms  INTEGER CHECK (revoked_ms >= 0)
) STRICT;
CREATE UNIQUE INDEX devices_active_name ON devices (name) WHERE revoked_ms IS NULL;
CREATE UNIQUE INDEX devices_active_fingerprint ON devices (fingerprint) WHERE revoked_ms IS NULL;
CREATE INDEX devices_by_name ON devices (name, created_ms);
CREATE INDEX devices_by_fingerprint ON devices (fingerprint, created_ms);
CREATE INDEX devices_by_user ON devices (user);
CREATE TABLE revoked_sessions (
    id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    expires_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX revoked_sessions_by_expiry ON revoked_sessions (expires_ms);
";

/// A registry file as version 1 left it: WAL mode, secrets in the clear, a device, a used step
/// and a failure count.
fn write_v1_registry(path: &Path) {
    let raw = Connection::open(path).unwrap();
    let _: String = raw
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .unwrap();
    raw.execute_batch(SCHEMA_V1).unwrap();
    raw.pragma_update(None, "application_id", 0x5043_5331_i32)
        .unwrap();
    raw.pragma_update(None, "user_version", 1).unwrap();
    // Users without a secret around alice's row, and carol's row apart from hers, so that the
    // page is not rebuilt by the migration's updates: SQLite then leaves the space an update
    // frees as it was, unless told to overwrite it (this layout fails without `secure_delete`).
    let add_filler = |range: std::ops::Range<u8>| {
        for i in range {
            raw.execute(
                "INSERT INTO users (name, created_ms) VALUES (?1, 0)",
                [format!("user{i}")],
            )
            .unwrap();
        }
    };
    raw.execute(
        "INSERT INTO users (name, totp_secret, digits, algorithm, period, created_ms)
         VALUES ('carol', ?1, 8, 'SHA256', 60, 200)",
        [&OTHER_SECRET[..]],
    )
    .unwrap();
    add_filler(0..5);
    raw.execute(
        "INSERT INTO users (name, totp_secret, digits, algorithm, period, last_step, failures,
                            created_ms)
         VALUES ('alice', ?1, 6, 'SHA1', 30, 56666666, 2, 100),
                ('nofactor', NULL, NULL, NULL, NULL, NULL, 0, 300)",
        [&SECRET[..]],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO devices (name, user, fingerprint, created_ms) VALUES ('laptop', 'alice', ?1, 150)",
        [&[7u8; 32][..]],
    )
    .unwrap();
    add_filler(5..10);
    // Closing the last connection checkpoints the log into the main file.
    drop(raw);
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_version_1_registry_is_refused_without_a_key_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    write_v1_registry(&path);
    let before = fs::read(&path).unwrap();

    let error = SqliteRegistry::open(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::NeedsKey { version: 1, .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{}: registry schema version 1 keeps the TOTP secrets unsealed; open it with the registry key to seal them",
            path.display()
        )
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refused open changed the file"
    );
    assert_eq!(user_version(&path), 1);
}

#[test]
fn a_version_1_registry_is_migrated_when_opened_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    write_v1_registry(&path);
    // The fixture is meaningful: the secrets are there to be found before the migration.
    let bytes = file_bytes(&path);
    assert!(contains(&bytes, SECRET) && contains(&bytes, OTHER_SECRET));

    let registry = SqliteRegistry::open_with_key(&path, key(3)).unwrap();
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 5);

    // Everything reads as before.
    let alice = registry.user("alice").unwrap().unwrap();
    let alice_totp = alice.totp.unwrap();
    assert_eq!(alice_totp.secret(), SECRET);
    assert_eq!(alice.created_ms, 100);
    let carol = registry.user("carol").unwrap().unwrap().totp.unwrap();
    assert_eq!(carol.secret(), OTHER_SECRET);
    assert_eq!(
        (carol.digits(), carol.algorithm(), carol.period()),
        (8, TotpAlgorithm::Sha256, 60)
    );
    assert!(registry.user("nofactor").unwrap().unwrap().totp.is_none());
    assert_eq!(
        registry
            .device_by_fingerprint(&fp(7))
            .unwrap()
            .unwrap()
            .name,
        "laptop"
    );
    assert_eq!(registry.lock_state("alice").unwrap().failures, 2);
    assert!(matches!(
        registry.commit_now(&common::accept("alice", 56_666_666, 0)),
        Ok(Committed::StepTaken(_))
    ));
    assert_eq!(
        registry.commit_now(&common::accept("alice", 56_666_667, 0)),
        Ok(Committed::Applied)
    );

    // The secrets are sealed, and the clear ones are gone from the files.
    let sealed = raw_secret(&path, "alice");
    assert_eq!(sealed[0], 0x01);
    assert_eq!(sealed.len(), 1 + 12 + SECRET.len() + 16);
    assert_not_in_files(&path, SECRET);
    assert_not_in_files(&path, OTHER_SECRET);
    drop(registry);
    assert_not_in_files(&path, SECRET);
    assert_not_in_files(&path, OTHER_SECRET);

    // Opening again does not migrate again; the key is now needed.
    let again = SqliteRegistry::open_with_key(&path, key(3)).unwrap();
    assert_eq!(raw_secret(&path, "alice"), sealed);
    assert_eq!(
        again.user("alice").unwrap().unwrap().totp.unwrap().secret(),
        SECRET
    );
    drop(again);
    assert_wrong_key(&path, key(4));
    assert_eq!(
        raw_secret(&path, "alice"),
        sealed,
        "a refused open changed the row"
    );
    assert!(matches!(
        SqliteRegistry::open(&path),
        Err(StoreError::SealedWithoutKey { .. })
    ));
}

#[test]
fn errors_and_debug_output_show_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let registry = SqliteRegistry::create_with_key(&path, key(0x5a)).unwrap();
    // Opened while the registry is empty, so that it holds a key that does not open alice's.
    let wrong = SqliteRegistry::open_with_key(&path, key(0x5b)).unwrap();
    registry.add_user("alice", totp(SECRET), 0).unwrap();
    let refused = SqliteRegistry::open_with_key(&path, key(0x5b)).unwrap_err();
    assert!(matches!(refused, StoreError::WrongKey { .. }), "{refused}");
    let texts = [
        format!("{registry:?}"),
        format!("{wrong:?}"),
        backend_message(wrong.user("alice")),
        format!("{:?}", wrong.user("alice")),
        format!("{:?}", registry.user("alice").unwrap()),
        format!("{:?}", key(0x5a)),
        refused.to_string(),
        format!("{refused:?}"),
    ];
    let base32 = totp(SECRET).secret_base32();
    let hex_secret: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    for text in texts {
        assert!(!text.contains(&base32), "{text}");
        assert!(!text.to_lowercase().contains(&hex_secret), "{text}");
        assert!(
            !text.contains("5a, 5a")
                && !text.contains("90, 90")
                && !text.contains("5b, 5b")
                && !text.contains("91, 91"),
            "{text}"
        );
        assert!(!contains(text.as_bytes(), SECRET), "{text}");
    }
}

#[test]
fn registries_opening_a_version_1_file_at_once_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    write_v1_registry(&path);
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                SqliteRegistry::open_with_key(&path, key(3)).unwrap()
            })
        })
        .collect();
    for handle in opened {
        let registry = handle.join().unwrap();
        assert_eq!(
            registry
                .user("alice")
                .unwrap()
                .unwrap()
                .totp
                .unwrap()
                .secret(),
            SECRET
        );
    }
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    assert_not_in_files(&path, SECRET);
}
