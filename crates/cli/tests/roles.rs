//! Roles: `portcullis user add --role`, `user set --role` / `--clear-roles`, `user list`, and
//! `serve --policy` with a rule that requires a role, over real sockets.

mod common;

use std::path::Path;

use common::{
    Output, add_user, assert_one_line_error, init_dir, issue_device, run, run_json, run_ok, s,
    serve, totp, unix_now,
};

fn call(dir: &Path, addr: &str, user: &str, secret: &str) -> Output {
    let code = totp(secret).generate(unix_now());
    run(&[
        "call",
        "--dir",
        s(dir),
        "--server",
        addr,
        "--server-name",
        "localhost",
        "--device",
        &format!("{user}-laptop"),
        "--user",
        user,
        "--code",
        &code,
    ])
}

/// Adds a user with `--role` flags and returns its base32 secret.
fn add_user_with_roles(dir: &Path, user: &str, roles: &[&str]) -> String {
    let mut args = vec!["user", "add", user, "--dir", s(dir), "--json"];
    for role in roles {
        args.extend(["--role", role]);
    }
    let json = run_json(&args);
    let mut expected = strings(roles);
    expected.sort_unstable();
    expected.dedup();
    let held = listed(dir)
        .into_iter()
        .find(|(name, _, _)| name == user)
        .expect("the user is listed")
        .1;
    assert_eq!(held, expected);
    json["secret"].as_str().expect("secret").to_owned()
}

/// `user list --json` as (user, roles, service) triples.
fn listed(dir: &Path) -> Vec<(String, Vec<String>, bool)> {
    let json = run_json(&["user", "list", "--dir", s(dir), "--json"]);
    json.as_array()
        .expect("an array")
        .iter()
        .map(|u| {
            assert!(u["created"].as_str().is_some(), "{u}");
            (
                u["user"].as_str().unwrap().to_owned(),
                u["roles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
                u["service"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| (*r).to_owned()).collect()
}

#[test]
fn roles_are_added_replaced_cleared_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    add_user_with_roles(&dir, "alice", &["ops", "admin", "ops"]);
    add_user(&dir, "bob");
    assert_eq!(
        listed(&dir),
        [
            ("alice".to_owned(), strings(&["admin", "ops"]), false),
            ("bob".to_owned(), vec![], false),
        ]
    );

    run_ok(&["user", "set", "bob", "--dir", s(&dir), "--role", "audit"]);
    run_ok(&["user", "set", "alice", "--dir", s(&dir), "--clear-roles"]);
    assert_eq!(
        listed(&dir),
        [
            ("alice".to_owned(), vec![], false),
            ("bob".to_owned(), strings(&["audit"]), false),
        ]
    );
    let table = run_ok(&["user", "list", "--dir", s(&dir)]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bob") && l.ends_with("audit")),
        "{table}"
    );

    // Errors are one line, and change nothing.
    let out = run(&["user", "set", "carol", "--dir", s(&dir), "--role", "x"]);
    assert_one_line_error(&out, &["no user carol"]);
    let out = run(&["user", "set", "bob", "--dir", s(&dir), "--role", "bad role"]);
    assert_one_line_error(&out, &["role", "bad role"]);
    let out = run(&["user", "add", "dave", "--dir", s(&dir), "--role", ""]);
    assert_one_line_error(&out, &["role"]);
    assert_eq!(listed(&dir).len(), 2, "a refused role adds no user");
    assert_eq!(listed(&dir)[1].1, strings(&["audit"]));
}

#[test]
fn a_rule_that_requires_a_role_admits_its_holders_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nmethod = \"/portcullis.demo.v1.Echo/Say\"\nroles = [\"admin\"]\n",
    )
    .unwrap();
    let alice = add_user_with_roles(&dir, "alice", &["admin"]);
    issue_device(&dir, "alice-laptop", "alice");
    let bob = add_user_with_roles(&dir, "bob", &["ops"]);
    issue_device(&dir, "bob-laptop", "bob");
    let (_server, addr) = serve(&dir, &["--policy", s(&policy)]);

    let out = call(&dir, &addr, "alice", &alice);
    assert!(
        out.status.success(),
        "alice holds admin: {}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("alice"), "{}", out.stdout);
    let out = call(&dir, &addr, "bob", &bob);
    assert_one_line_error(
        &out,
        &[
            "PermissionDenied",
            "policy_denied",
            "needs the role admin",
            "bob",
        ],
    );

    // Roles are read per call: a role given by `user set` while the server runs counts.
    let carol = add_user(&dir, "carol");
    issue_device(&dir, "carol-laptop", "carol");
    run_ok(&["user", "set", "carol", "--dir", s(&dir), "--role", "admin"]);
    let out = call(&dir, &addr, "carol", &carol);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
}

#[test]
fn a_service_account_is_listed_as_such_with_its_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let json = run_json(&[
        "user",
        "add",
        "backup-bot",
        "--service",
        "--role",
        "backup",
        "--dir",
        s(&dir),
        "--json",
    ]);
    assert_eq!(json["service"], true);
    assert!(
        json.get("secret").is_none(),
        "a service account has no secret: {json}"
    );
    add_user(&dir, "alice");
    assert_eq!(
        listed(&dir),
        [
            ("alice".to_owned(), vec![], false),
            ("backup-bot".to_owned(), strings(&["backup"]), true),
        ]
    );
    issue_device(&dir, "bot-box", "backup-bot");
    issue_device(&dir, "alice-laptop", "alice");
    let devices = run_json(&["device", "list", "--dir", s(&dir), "--json"]);
    let flags: Vec<(&str, bool)> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap(),
                d["service"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(flags, [("alice-laptop", false), ("bot-box", true)]);
    let table = run_ok(&["user", "list", "--dir", s(&dir)]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("backup-bot") && l.contains("service")),
        "{table}"
    );
}
