//! Opening, creating and refusing registry files.

use std::fs;
use std::path::Path;

use portcullis_core::{Admin, RegistryError, TotpAlgorithm, TotpConfig};
use portcullis_store::{APPLICATION_ID, SCHEMA_VERSION, SqliteRegistry, StoreError};
use rusqlite::Connection;

fn secret() -> Vec<u8> {
    b"do-not-show-this-secret!".to_vec()
}

fn add_alice(registry: &SqliteRegistry) {
    let totp = TotpConfig::new(secret(), 6, TotpAlgorithm::Sha1, 30).unwrap();
    registry.add_user("alice", totp, 0).unwrap();
}

fn open_error(path: &Path) -> StoreError {
    SqliteRegistry::open(path).unwrap_err()
}

fn assert_one_line_naming(error: &StoreError, path: &Path) {
    let text = error.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(text.starts_with(&path.display().to_string()), "{text}");
    assert_eq!(error.path(), path);
}

#[test]
fn create_sets_up_a_versioned_wal_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.db");
    let registry = SqliteRegistry::create(&path).unwrap();
    assert_eq!(registry.path(), path);
    add_alice(&registry);

    let raw = Connection::open(&path).unwrap();
    let app: i64 = raw
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    assert_eq!(app as u32, APPLICATION_ID);
    assert_eq!(APPLICATION_ID, 0x5043_5331);
    let version: i64 = raw
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = raw
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let mut tables: Vec<String> = raw
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables.sort();
    assert_eq!(tables, ["devices", "sessions", "user_roles", "users"]);
    let stored: Vec<u8> = raw
        .query_row(
            "SELECT totp_secret FROM users WHERE name = 'alice'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // A registry without a key stores the secret behind the format byte 0x00 (unsealed).
    assert_eq!(stored[0], 0x00);
    assert_eq!(stored[1..], secret());
}

#[test]
fn create_refuses_an_existing_file_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken.db");
    fs::write(&path, b"keep me").unwrap();
    let error = SqliteRegistry::create(&path).unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { .. }), "{error}");
    assert_one_line_naming(&error, &path);
    assert_eq!(fs::read(&path).unwrap(), b"keep me");

    let existing = dir.path().join("registry.db");
    SqliteRegistry::create(&existing).unwrap();
    assert!(matches!(
        SqliteRegistry::create(&existing),
        Err(StoreError::AlreadyExists { .. })
    ));
}

#[test]
fn open_refuses_a_missing_file_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let error = open_error(&path);
    assert!(matches!(error, StoreError::Missing { .. }), "{error}");
    assert_one_line_naming(&error, &path);
    assert!(!path.exists());

    let nested = dir.path().join("no-such-dir").join("registry.db");
    let error = SqliteRegistry::create(&nested).unwrap_err();
    assert!(matches!(error, StoreError::Io { .. }), "{error}");
    assert_one_line_naming(&error, &nested);
}

#[test]
fn open_or_create_creates_then_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    {
        let registry = SqliteRegistry::open_or_create(&path).unwrap();
        add_alice(&registry);
    }
    let registry = SqliteRegistry::open_or_create(&path).unwrap();
    assert!(registry.user("alice").unwrap().is_some());
}

#[test]
fn an_empty_file_is_set_up_as_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.db");
    fs::write(&path, b"").unwrap();
    let registry = SqliteRegistry::open(&path).unwrap();
    add_alice(&registry);
    drop(registry);
    assert!(
        SqliteRegistry::open(&path)
            .unwrap()
            .user("alice")
            .unwrap()
            .is_some()
    );
}

#[test]
fn garbage_is_not_a_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("short.db", b"hello, world".to_vec()),
        ("long.db", (0..8192u32).map(|i| (i * 7 + 3) as u8).collect()),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, &bytes).unwrap();
        let error = open_error(&path);
        assert!(matches!(error, StoreError::NotSqlite { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            format!("{}: not a SQLite database or corrupt", path.display())
        );
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "the file must be left alone"
        );
        assert!(matches!(
            SqliteRegistry::open_or_create(&path),
            Err(StoreError::NotSqlite { .. })
        ));
    }
}

#[test]
fn a_damaged_registry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.db");
    {
        let registry = SqliteRegistry::create(&path).unwrap();
        add_alice(&registry);
    }
    // Make the file a plain rollback-journal database, then wreck every page after the header
    // of page 1, where the catalogue lives.
    {
        let raw = Connection::open(&path).unwrap();
        let _: String = raw
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .unwrap();
    }
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 200);
    for b in &mut bytes[100..] {
        *b = 0xA5;
    }
    fs::write(&path, &bytes).unwrap();
    let error = open_error(&path);
    assert!(matches!(error, StoreError::NotSqlite { .. }), "{error}");
    assert_one_line_naming(&error, &path);
}

#[test]
fn a_foreign_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.db");
    {
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('soup');")
            .unwrap();
    }
    let error = open_error(&path);
    assert!(
        matches!(
            error,
            StoreError::Foreign {
                application_id: 0,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{}: not a Portcullis registry (application_id 0x00000000)",
            path.display()
        )
    );

    // Another application's id, even with our tables' names.
    let other = dir.path().join("other-app.db");
    {
        let raw = Connection::open(&other).unwrap();
        raw.execute_batch("CREATE TABLE users (name TEXT); PRAGMA application_id = 1234;")
            .unwrap();
    }
    let error = open_error(&other);
    assert!(
        error
            .to_string()
            .ends_with("not a Portcullis registry (application_id 0x000004d2)"),
        "{error}"
    );

    // The refusal changed nothing: the other application's data and journal mode are intact.
    let raw = Connection::open(&path).unwrap();
    let soup: String = raw
        .query_row("SELECT name FROM recipes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(soup, "soup");
    let mode: String = raw
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    {
        let registry = SqliteRegistry::create(&path).unwrap();
        add_alice(&registry);
    }
    {
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let error = open_error(&path);
    assert!(
        matches!(error, StoreError::TooNew { version: 6, .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{}: registry schema version 6 is newer than this portcullis (5)",
            path.display()
        )
    );
    assert!(matches!(
        SqliteRegistry::open_or_create(&path),
        Err(StoreError::TooNew { .. })
    ));

    let backend: RegistryError = error.into();
    assert!(matches!(backend, RegistryError::Backend(ref m) if m.contains("newer")));
}

#[test]
fn an_unknown_older_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("older.db");
    drop(SqliteRegistry::create(&path).unwrap());
    {
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", 0).unwrap();
    }
    let error = open_error(&path);
    assert!(
        matches!(error, StoreError::Unsupported { version: 0, .. }),
        "{error}"
    );
    assert_one_line_naming(&error, &path);
}

#[cfg(unix)]
#[test]
fn the_file_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = SqliteRegistry::create(&path).unwrap();
    add_alice(&registry);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    // SQLite gives the write-ahead log the database file's mode.
    let wal = dir.path().join("registry.db-wal");
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600);

    let other = dir.path().join("other.db");
    drop(SqliteRegistry::open_or_create(&other).unwrap());
    assert_eq!(mode(&other), 0o600);
}

#[cfg(unix)]
#[test]
fn a_read_only_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(SqliteRegistry::create(&path).unwrap());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    // The superuser may write to the file anyway: only check where the mode binds.
    if fs::OpenOptions::new().write(true).open(&path).is_err() {
        let error = open_error(&path);
        assert!(matches!(error, StoreError::ReadOnly { .. }), "{error}");
        assert_one_line_naming(&error, &path);
    }
}

#[test]
fn debug_output_names_the_file_and_not_the_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let registry = SqliteRegistry::create(&path).unwrap();
    add_alice(&registry);
    let debug = format!("{registry:?}");
    assert!(debug.contains("registry.db"), "{debug}");
    assert!(!debug.contains("do-not-show"), "{debug}");
}
