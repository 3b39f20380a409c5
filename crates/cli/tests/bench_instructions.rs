//! `portcullis bench instructions`: a missing valgrind is one line, and a tiny run under valgrind
//! reports every scenario with its ratio to mtls. Nothing is timed or compared with a target.
//!
//! The run needs valgrind and takes about half a minute in a debug build (six servers under
//! callgrind), so it runs only when PORTCULLIS_REQUIRE_VALGRIND is set, and then fails without
//! valgrind; otherwise it prints a SKIP line and passes.

use std::process::Command;

fn portcullis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

#[test]
fn a_missing_valgrind_is_one_line() {
    let out = portcullis(&[
        "bench",
        "instructions",
        "--valgrind",
        "/nonexistent/valgrind",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("valgrind not found"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn baseline_must_be_smaller() {
    let out = portcullis(&[
        "bench",
        "instructions",
        "--connections",
        "3",
        "--baseline",
        "3",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--baseline"), "{stderr}");
}

#[test]
fn a_tiny_run_counts_every_scenario() {
    if std::env::var_os("PORTCULLIS_REQUIRE_VALGRIND").is_none() {
        println!(
            "SKIP bench instructions run: slow under valgrind; set PORTCULLIS_REQUIRE_VALGRIND=1 to run it"
        );
        return;
    }
    let found = Command::new("valgrind").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "PORTCULLIS_REQUIRE_VALGRIND is set but valgrind is not installed"
    );
    let out = portcullis(&[
        "bench",
        "instructions",
        "--connections",
        "2",
        "--baseline",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for name in ["mtls", "portcullis-totp", "portcullis-session"] {
        let s = &report["scenarios"][name];
        let long = s["instructions"].as_u64().expect("instructions");
        let short = s["baseline_instructions"].as_u64().expect("baseline");
        assert!(long > short && short > 0, "{name}: {s}");
        assert!(s["instructions_per_conn"].as_f64().unwrap() > 0.0, "{name}");
    }
    for name in ["portcullis-totp", "portcullis-session"] {
        assert!(
            report["ratios_to_mtls"][name].as_f64().unwrap() > 0.0,
            "{name}"
        );
        assert!(report["targets"][name].as_f64().is_some(), "{name}");
    }
}
