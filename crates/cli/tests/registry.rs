//! `--registry URL` against a real PostgreSQL server (a throwaway cluster): `init` creates the
//! schema, the administrative commands and two `portcullis serve` processes share the database
//! (a fleet of two), a code accepted by one server is spent for the other, a device revoked
//! through the database is refused by both, and bad URLs, refused passwords and a database
//! that holds another registry are one-line errors that never show the password.

mod common;

use common::*;
use portcullis_postgres::testkit::PgCluster;

/// `VERB --dir DIR --server SERVER --server-name localhost --device laptop --user alice`.
fn as_alice<'a>(verb: &'a str, dir: &'a str, server: &'a str) -> Vec<&'a str> {
    vec![
        verb,
        "--dir",
        dir,
        "--server",
        server,
        "--server-name",
        "localhost",
        "--device",
        "laptop",
        "--user",
        "alice",
    ]
}

fn call<'a>(dir: &'a str, server: &'a str, code: &'a str) -> Vec<&'a str> {
    let mut args = as_alice("call", dir, server);
    args.extend(["--code", code]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_database_spend_a_code_once_and_share_revocations() {
    let Some(cluster) = PgCluster::start("cli --registry") else {
        return;
    };
    let url = cluster.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pc");
    let d = s(&dir);
    let env = [("PORTCULLIS_REGISTRY", url.as_str())];
    let out = run_with_env(&["init", "--dir", d], &env);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("PostgreSQL at 127.0.0.1"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(cluster.password()), "{}", out.stdout);
    assert!(
        !dir.join("portcullis.db").exists(),
        "no SQLite file beside a PostgreSQL registry"
    );

    let added = run_with_env(&["user", "add", "alice", "--dir", d, "--json"], &env);
    assert!(added.status.success(), "{}", added.stderr);
    let json: serde_json::Value = serde_json::from_str(&added.stdout).unwrap();
    let secret = json["secret"].as_str().unwrap().to_owned();
    let issued = run_with_env(
        &["device", "issue", "laptop", "--user", "alice", "--dir", d],
        &env,
    );
    assert!(issued.status.success(), "{}", issued.stderr);
    // Without --registry the directory has no registry of its own.
    assert_one_line_error(
        &run(&["user", "list", "--dir", d]),
        &["portcullis.db", "--registry"],
    );
    let listed = run_with_env(&["user", "list", "--dir", d], &env);
    assert!(listed.stdout.contains("alice"), "{}", listed.stdout);

    let (_a, a) = serve(&dir, &["--registry", &url]);
    let (_b, b) = serve(&dir, &["--registry", &url]);
    let code = totp(&secret).generate(unix_now());
    let accepted = run(&call(d, &a, &code));
    assert!(accepted.status.success(), "{}", accepted.stderr);
    let reused = run(&call(d, &b, &code));
    assert!(!reused.status.success());
    assert!(reused.stderr.contains("already used"), "{}", reused.stderr);

    let revoked = run_with_env(&["device", "revoke", "laptop", "--dir", d], &env);
    assert!(revoked.status.success(), "{}", revoked.stderr);
    let code = totp(&secret).generate(unix_now() + 30);
    for server in [&a, &b] {
        let refused = run(&call(d, server, &code));
        assert!(!refused.status.success());
        assert!(
            refused.stderr.contains("device_revoked"),
            "{}",
            refused.stderr
        );
    }

    // Another directory cannot take over a database that holds a registry.
    let other = tmp.path().join("other");
    let taken = run_with_env(&["init", "--dir", s(&other)], &env);
    assert_one_line_error(&taken, &["already holds a registry"]);
    assert!(!other.exists(), "nothing written for a refused init");

    // A wrong password and a server that is not there: one line, the host, never the password.
    let wrong = cluster.url_with_wrong_password("postgres");
    for (url, needle) in [
        (wrong.as_str(), "password authentication failed"),
        ("postgres://postgres:topsecret@127.0.0.1:1/x", "127.0.0.1:1"),
        ("mysql://postgres:topsecret@127.0.0.1/x", "postgres://"),
    ] {
        let out = run(&["user", "list", "--dir", d, "--registry", url]);
        let line = assert_one_line_error(&out, &[needle]);
        assert!(
            !line.contains(cluster.password()) && !line.contains("topsecret"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_registry_moves_to_postgres_without_loss() {
    let Some(cluster) = PgCluster::start("cli registry copy") else {
        return;
    };
    let url = cluster.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let d = s(&dir);
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "laptop", "alice");
    add_user(&dir, "bob");
    issue_device(&dir, "phone", "bob");
    run_ok(&["device", "revoke", "phone", "--dir", d]);
    run_ok(&["user", "set", "alice", "--role", "admin", "--dir", d]);

    // On SQLite: a code earns a session; then two wrong codes.
    let spent = totp(&alice).generate(unix_now());
    {
        let (_server, addr) = serve(&dir, &[]);
        let mut login = as_alice("login", d, &addr);
        login.extend(["--code", &spent]);
        let login = run(&login);
        assert!(login.status.success(), "{}", login.stderr);
        // The stored ticket would go first: the calls below are to spend codes.
        run_ok(&as_alice("logout", d, &addr));
        let wrong = wrong_code(&alice);
        for _ in 0..2 {
            let out = run(&call(d, &addr, &wrong));
            assert!(out.stderr.contains("mfa_failed"), "{}", out.stderr);
        }
    }
    let before = run_ok(&["session", "list", "--dir", d]);

    let copied = run(&["registry", "copy", "--dir", d, "--to", &url]);
    assert!(copied.status.success(), "{}", copied.stderr);
    assert!(
        copied
            .stdout
            .contains("copied 2 users, 2 devices (1 active), 1 roles and 1 sessions"),
        "{}",
        copied.stdout
    );
    assert!(!copied.stdout.contains(cluster.password()));
    // A second copy would mix two registries: refused, nothing written.
    let again = run(&["registry", "copy", "--dir", d, "--to", &url]);
    assert_one_line_error(&again, &["already exists"]);

    let pg = ["--registry", url.as_str()];
    let users = run_ok(&[&["user", "list", "--dir", d][..], &pg[..]].concat());
    assert!(
        users.contains("alice") && users.contains("admin") && users.contains("bob"),
        "{users}"
    );
    let devices = run_ok(&[&["device", "list", "--dir", d][..], &pg[..]].concat());
    let phone = devices.lines().find(|l| l.contains("phone")).unwrap();
    assert!(phone.contains("revoked"), "{devices}");
    let after = run_ok(&[&["session", "list", "--dir", d][..], &pg[..]].concat());
    assert_eq!(before, after, "the same session records");

    let (_server, addr) = serve(&dir, &pg);
    // The code spent on SQLite is spent here too (the sealed secret opens, the step is kept).
    let reused = run(&call(d, &addr, &spent));
    assert!(reused.stderr.contains("already used"), "{}", reused.stderr);
    // Two failures came along: three more lock alice out.
    let wrong = wrong_code(&alice);
    for _ in 0..3 {
        let out = run(&call(d, &addr, &wrong));
        assert!(out.stderr.contains("mfa_failed"), "{}", out.stderr);
    }
    let locked = run(&call(d, &addr, &wrong));
    assert!(locked.stderr.contains("locked_out"), "{}", locked.stderr);
}
