//! Keys that rotate: `portcullis keys rotate-ticket` against a running server (new tickets
//! under the new key, old tickets accepted until their key is dropped) and `portcullis keys
//! rekey` killed with SIGKILL between rows, on SQLite and PostgreSQL: the registry stays
//! readable under exactly one key, and running the command again finishes the job.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use portcullis_core::{Admin, TicketKey};
use portcullis_postgres::testkit::PgCluster;
use portcullis_store::{Sealer, SecretKey, SqliteRegistry};
use serde_json::Value;

/// Users a rekey re-seals in the kill tests: enough rows that a kill after the first progress
/// line lands well before the commit.
const USERS: usize = 20_000;

fn secret_file(dir: &Path, user: &str, secret: &str) -> PathBuf {
    let path = dir.join(format!("{user}.totp"));
    write_private(&path, secret.as_bytes());
    path
}

/// The ticket `login` stored for `device` (the one file of its sessions directory).
fn stored_ticket(dir: &Path, device: &str) -> (PathBuf, Vec<u8>) {
    let files: Vec<PathBuf> = fs::read_dir(dir.join("sessions").join(device))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = fs::read_to_string(&files[0]).unwrap();
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("ticket "))
        .expect("a ticket line");
    (files[0].clone(), hex::decode(hex.trim()).unwrap())
}

fn key_id(path: &Path) -> portcullis_core::TicketKeyId {
    TicketKey::from_bytes(&fs::read(path).unwrap())
        .unwrap()
        .id()
}

/// Waits (at most 10 s) until the server has logged `times` reloads of its ticket keys.
fn wait_for_reloads(server: &Server, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .stderr()
        .matches("session ticket keys loaded")
        .count()
        < times
    {
        assert!(
            Instant::now() < deadline,
            "no reload of the ticket keys logged; stderr: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rotated_ticket_key_seals_new_tickets_and_opens_old_ones_until_it_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    let bob = add_user(&dir, "bob");
    issue_device(&dir, "desk", "bob");
    let server = Server::start_with_env(&dir, &[("RUST_LOG", "info")]);
    let as_user = |device: &'static str, user: &'static str| {
        vec![
            "--dir".to_owned(),
            d.to_owned(),
            "--server".to_owned(),
            server.addr.clone(),
            "--device".to_owned(),
            device.to_owned(),
            "--user".to_owned(),
            user.to_owned(),
        ]
    };
    let with = |verb: &str, base: &[String], more: &[&str]| -> Output {
        let mut args: Vec<&str> = vec![verb];
        args.extend(base.iter().map(String::as_str));
        args.extend_from_slice(more);
        run(&args)
    };
    let alice_args = as_user("laptop", "alice");
    let bob_args = as_user("desk", "bob");

    let first_key = key_id(&dir.join("ticket.key"));
    let alice_file = secret_file(tmp.path(), "alice", &alice);
    let login = with("login", &alice_args, &["--secret-file", s(&alice_file)]);
    assert!(login.status.success(), "{login:?}");
    let (_, ticket) = stored_ticket(&dir, "laptop");
    assert_eq!(TicketKey::id_of(&ticket), Some(first_key));

    let rotated = run_ok(&["keys", "rotate-ticket", "--dir", d]);
    let second_key = key_id(&dir.join("ticket.key"));
    assert_ne!(second_key, first_key);
    assert!(rotated.contains(&second_key.to_string()), "{rotated}");
    let retired: Vec<PathBuf> = fs::read_dir(dir.join("ticket-retired"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(retired.len(), 1);
    assert_eq!(key_id(&retired[0]), first_key);
    wait_for_reloads(&server, 1);

    // The ticket sealed under the retired key still lets alice in.
    let call = with("call", &alice_args, &["--json"]);
    assert!(call.status.success(), "{call:?}");
    let reply: Value = serde_json::from_str(call.stdout.trim()).unwrap();
    assert_eq!(reply["auth_method"], "session", "{reply}");
    // A new ticket is sealed under the new key.
    let bob_file = secret_file(tmp.path(), "bob", &bob);
    let login = with("login", &bob_args, &["--secret-file", s(&bob_file)]);
    assert!(login.status.success(), "{login:?}");
    let (_, bob_ticket) = stored_ticket(&dir, "desk");
    assert_eq!(TicketKey::id_of(&bob_ticket), Some(second_key));

    // Rotated again with --keep 1, more than a second later: the first key is deleted, and
    // the server drops it; bob's ticket (under the second key, now retired) still works.
    std::thread::sleep(Duration::from_millis(1100));
    let again = run_ok(&["keys", "rotate-ticket", "--dir", d, "--keep", "1"]);
    assert!(
        again.contains("1 retired key(s) older than 1 s deleted"),
        "{again}"
    );
    assert!(!retired[0].exists());
    wait_for_reloads(&server, 2);
    let dropped = with("call", &alice_args, &[]);
    assert_one_line_error(&dropped, &["stored session ended", "portcullis login"]);
    let call = with("call", &bob_args, &["--json"]);
    assert!(call.status.success(), "{call:?}");

    // A file that is no key leaves the keys in force, with a warning naming it.
    fs::write(dir.join("ticket-retired/notes.txt"), b"x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .stderr()
        .contains("notes.txt: not a retired ticket key")
    {
        assert!(Instant::now() < deadline, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let call = with("call", &bob_args, &["--json"]);
    assert!(call.status.success(), "{call:?}");
    server.stop();
}

/// Every user's secret as `fill` wrote it.
type Secrets = Vec<(String, Vec<u8>)>;

/// `n` users written straight into the directory's SQLite registry in one transaction, each
/// secret sealed under the directory's registry key (as `user add` seals it).
fn fill(dir: &Path, n: usize) -> Secrets {
    let key = SecretKey::load(&dir.join("registry.key")).unwrap();
    let sealer = Sealer::new(Some(key)).unwrap();
    let mut conn = rusqlite::Connection::open(dir.join("portcullis.db")).unwrap();
    let tx = conn.transaction().unwrap();
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("user{i:05}");
        let secret: Vec<u8> = (0..20u8)
            .map(|b| b.wrapping_mul(31).wrapping_add(i as u8))
            .collect();
        let sealed = sealer.seal(&name, &secret).unwrap();
        tx.execute(
            "INSERT INTO users (name, totp_secret, digits, algorithm, period, created_ms)
             VALUES (?1, ?2, 6, 'SHA1', 30, 1)",
            rusqlite::params![name, &sealed[..]],
        )
        .unwrap();
        users.push((name, secret));
    }
    tx.commit().unwrap();
    users
}

/// The registry's users and their secrets, opened under `key`; `None` when `key` does not
/// open it.
fn read_under(open: &dyn Fn(SecretKey) -> Option<Box<dyn Admin>>, key: &[u8]) -> Option<Secrets> {
    let registry = open(SecretKey::from_bytes(key.try_into().unwrap()))?;
    let users = registry.list_users().expect("every secret opens");
    Some(
        users
            .into_iter()
            .filter_map(|u| Some((u.name, u.totp?.secret().to_vec())))
            .collect(),
    )
}

/// Asserts that exactly one of `keys` opens the registry, with every secret as written, and
/// returns which.
fn exactly_one_key(
    open: &dyn Fn(SecretKey) -> Option<Box<dyn Admin>>,
    keys: &[&[u8]],
    expected: &Secrets,
) -> usize {
    let opened: Vec<(usize, Secrets)> = keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| read_under(open, k).map(|s| (i, s)))
        .collect();
    assert_eq!(
        opened.len(),
        1,
        "keys that open the registry: {}",
        opened.len()
    );
    let mut found = opened[0].1.clone();
    found.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(found.len(), want.len());
    assert!(found == want, "a secret changed");
    opened[0].0
}

/// Runs `keys rekey` and kills it (SIGKILL) once it has re-sealed its first 1000 rows; its
/// stdout (empty when the kill came before the end).
fn rekey_killed_between_rows(dir: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = command();
    cmd.envs(env.iter().copied())
        .args(["keys", "rekey", "--dir", s(dir)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::new(cmd.spawn().unwrap());
    let mut err = BufReader::new(child.child().stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "rekey ended before its first progress line");
        if line.starts_with("re-sealed 1000 of") {
            break;
        }
    }
    let mut out = child.child().stdout.take().unwrap();
    child.kill();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut out, &mut stdout).unwrap();
    stdout
}

/// The kill test on the registry `open` opens (under the directory `dir`'s keys).
fn rekey_survives_a_kill(
    dir: &Path,
    env: &[(&str, &str)],
    open: &dyn Fn(SecretKey) -> Option<Box<dyn Admin>>,
    users: &Secrets,
) {
    let d = s(dir);
    let old = fs::read(dir.join("registry.key")).unwrap();
    let stdout = rekey_killed_between_rows(dir, env);
    assert!(
        stdout.is_empty(),
        "the rekey finished before the kill: {stdout}"
    );
    let pending = dir.join("registry.key.new");
    assert!(pending.exists());
    let new = fs::read(&pending).unwrap();
    assert_eq!(exactly_one_key(open, &[&old, &new], users), 0);
    // Until it is settled, nothing else opens the registry.
    let list = run_with_env(&["user", "list", "--dir", d], env);
    assert_one_line_error(&list, &["registry.key.new", "interrupted", "keys rekey"]);

    // Run again: the unused key is dropped, and the rekey done.
    let out = run_with_env(&["keys", "rekey", "--dir", d], env);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("changed nothing"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("re-sealed {} TOTP secrets", users.len())),
        "{}",
        out.stdout
    );
    assert!(!pending.exists());
    let current = fs::read(dir.join("registry.key")).unwrap();
    assert_ne!(current, old);
    assert_ne!(current, new);
    assert_eq!(exactly_one_key(open, &[&old, &new, &current], users), 2);
    let aside = replaced_keys(dir);
    assert_eq!(aside.len(), 1);
    assert_eq!(fs::read(&aside[0]).unwrap(), old);

    // The crash after the commit, before the key files moved (the old key still in place, or
    // already moved away): the next rekey finishes the job with the key that opens.
    for old_key_in_place in [true, false] {
        let sealed_under = fs::read(dir.join("registry.key")).unwrap();
        fs::rename(dir.join("registry.key"), &pending).unwrap();
        if old_key_in_place {
            write_private(&dir.join("registry.key"), &old);
        }
        let out = run_with_env(&["keys", "rekey", "--dir", d], env);
        assert!(out.status.success(), "{out:?}");
        assert!(
            out.stdout.contains("finished an interrupted rekey"),
            "{}",
            out.stdout
        );
        assert_eq!(fs::read(dir.join("registry.key")).unwrap(), sealed_under);
        assert!(!pending.exists());
        assert_eq!(exactly_one_key(open, &[&old, &sealed_under], users), 1);
    }
    let listed = run_ok_with_env(&["user", "list", "--dir", d], env);
    assert!(listed.contains("user19999"), "{listed}");
}

fn write_private(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

fn run_ok_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_with_env(args, env);
    assert!(out.status.success(), "{args:?}: {out:?}");
    out.stdout
}

/// The registry keys kept in `DIR/replaced-*/`.
fn replaced_keys(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("replaced-"))
        })
        .map(|p| p.join("registry.key"))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn a_rekey_killed_between_rows_leaves_sqlite_under_one_key_and_finishes_when_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let mut users = fill(&dir, USERS);
    users.push(("alice".to_owned(), totp(&alice).secret().to_vec()));
    let db = dir.join("portcullis.db");
    let open = move |key: SecretKey| -> Option<Box<dyn Admin>> {
        match SqliteRegistry::open_with_key(&db, key) {
            Ok(r) => Some(Box::new(r)),
            Err(portcullis_store::StoreError::WrongKey { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    };
    rekey_survives_a_kill(&dir, &[], &open, &users);
    // A new key cut short (the crash came while it was written) was never used: dropped.
    write_private(&dir.join("registry.key.new"), &[7u8; 10]);
    let out = run(&["keys", "rekey", "--dir", s(&dir)]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("changed nothing"), "{}", out.stdout);
    // The registry is sound.
    let conn = rusqlite::Connection::open(dir.join("portcullis.db")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_rekey_killed_between_rows_leaves_postgres_under_one_key_and_finishes_when_run_again() {
    let Some(cluster) = PgCluster::start("cli keys rekey on PostgreSQL") else {
        return;
    };
    let url = cluster.database_blocking();
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let mut users = fill(&dir, USERS);
    users.push(("alice".to_owned(), totp(&alice).secret().to_vec()));
    let copied = run_ok(&["registry", "copy", "--dir", s(&dir), "--to", &url]);
    assert!(copied.contains(&format!("{}", USERS + 1)), "{copied}");
    let open_url = url.clone();
    let open = move |key: SecretKey| -> Option<Box<dyn Admin>> {
        match portcullis_postgres::PgRegistry::open_blocking(&open_url, key, &[]) {
            Ok(r) => Some(Box::new(r)),
            Err(portcullis_postgres::PgError::WrongKey { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    };
    let env = [("PORTCULLIS_REGISTRY", url.as_str())];
    rekey_survives_a_kill(&dir, &env, &open, &users);
}
