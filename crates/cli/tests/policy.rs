//! `portcullis serve --policy FILE`: the example of docs/POLICY.md is accepted as written and
//! applied to the Echo service; a file with an unknown key is a one-line error naming the file
//! and the line.

mod common;

use std::path::Path;

use common::{
    Output, add_user, assert_one_line_error, init_dir, issue_device, run, s, serve, totp, unix_now,
};

/// The TOML block under `## A complete example` in docs/POLICY.md.
fn documented_example() -> String {
    let doc = include_str!("../../../docs/POLICY.md");
    let section = doc
        .split_once("## A complete example")
        .expect("docs/POLICY.md has `## A complete example`")
        .1;
    let block = section.split_once("```toml\n").expect("a ```toml block").1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_owned()
}

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

#[test]
fn serve_applies_the_documented_policy_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, documented_example()).unwrap();
    let alice = add_user(&dir, "alice");
    issue_device(&dir, "alice-laptop", "alice");
    let mallory = add_user(&dir, "mallory");
    issue_device(&dir, "mallory-laptop", "mallory");
    let (_server, addr) = serve(&dir, &["--policy", s(&policy)]);

    // Say needs the role admin or operator, which alice does not hold; mallory is denied.
    let out = call(&dir, &addr, "alice", &alice);
    assert_one_line_error(&out, &["policy_denied", "admin or operator"]);
    let out = call(&dir, &addr, "mallory", &mallory);
    assert_one_line_error(&out, &["policy_denied", "mallory"]);
}

#[test]
fn a_policy_file_with_an_unknown_key_stops_serve_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nmethod = \"/portcullis.demo.v1.Echo/Say\"\nfresh_totp_seconds = 300\n",
    )
    .unwrap();
    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--policy",
        s(&policy),
    ]);
    assert_one_line_error(
        &out,
        &[s(&policy), "line 3", "unknown field `fresh_totp_seconds`"],
    );
    let missing = tmp.path().join("missing.toml");
    let out = run(&[
        "serve",
        "--dir",
        s(&dir),
        "--listen",
        "127.0.0.1:0",
        "--policy",
        s(&missing),
    ]);
    assert_one_line_error(&out, &[s(&missing), "cannot read the policy file"]);
}
