//! Where `call` (and `login`, `doctor`) take a TOTP secret from: a file readable by its owner
//! only, the environment variable `PORTCULLIS_TOTP_SECRET`, or `--secret` on the command line,
//! which works but warns that other local users can read a process's command line.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;

const WARNING: &str = "--secret puts the TOTP secret in this process's command line";

fn call_args<'a>(dir: &'a str, server: &'a str, device: &'a str, user: &'a str) -> Vec<&'a str> {
    vec![
        "call", "--dir", dir, "--server", server, "--device", device, "--user", user, "--json",
    ]
}

#[test]
fn a_secret_comes_from_a_private_file_or_the_environment_and_the_command_line_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init_dir(&tmp);
    let alice = add_user(&dir, "alice");
    let bob = add_user(&dir, "bob");
    let carol = add_user(&dir, "carol");
    issue_device(&dir, "laptop", "alice");
    issue_device(&dir, "desk", "bob");
    issue_device(&dir, "phone", "carol");
    issue_device(&dir, "tablet", "alice");
    let server = Server::start(&dir);
    let d = s(&dir);

    // A file the group may read is refused, with the fix, and nothing is sent.
    let file = tmp.path().join("alice.totp");
    fs::write(&file, format!("{alice}\n")).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let mut args = call_args(d, &server.addr, "laptop", "alice");
    args.extend(["--secret-file", s(&file)]);
    let line = assert_one_line_error(&run(&args), &["open to other users", "chmod 600"]);
    assert!(!line.contains(&alice), "{line}");

    // Readable by its owner only: the call goes through, without a warning.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(&args);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("\"user\":\"alice\""), "{out:?}");
    assert!(out.stderr.trim().is_empty(), "{out:?}");

    // From the environment.
    let out = run_with_env(
        &call_args(d, &server.addr, "desk", "bob"),
        &[("PORTCULLIS_TOTP_SECRET", &bob)],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("\"user\":\"bob\""), "{out:?}");
    assert!(out.stderr.trim().is_empty(), "{out:?}");

    // On the command line: it works, and says why it should not be used.
    let mut args = call_args(d, &server.addr, "phone", "carol");
    args.extend(["--secret", &carol]);
    let out = run(&args);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.contains(WARNING), "{out:?}");
    assert!(out.stderr.contains("--secret-file"), "{out:?}");
    assert!(!out.stderr.contains(&carol), "{out:?}");

    // No factor at all and no stored session (device tablet never connected): one line
    // naming every source.
    assert_one_line_error(
        &run(&call_args(d, &server.addr, "tablet", "alice")),
        &[
            "--code",
            "--secret-file",
            "--secret",
            "PORTCULLIS_TOTP_SECRET",
        ],
    );
    // A file that is not a secret: one line naming the file, no echo of its content.
    let junk = tmp.path().join("junk.totp");
    fs::write(&junk, "not base32 at all!").unwrap();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
    let mut args = call_args(d, &server.addr, "laptop", "alice");
    args.extend(["--secret-file", s(&junk)]);
    let line = assert_one_line_error(&run(&args), &[s(&junk)]);
    assert!(!line.contains("not base32 at all"), "{line}");
    server.stop();
}
