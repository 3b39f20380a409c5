//! Replays the fuzz corpora (`fuzz/corpus/prefix_decode` and `fuzz/corpus/decision`) through the
//! same checks as the fuzz targets, so that every input a fuzzer ever kept is checked again by
//! `cargo test`, without a fuzzer. The checks live in `tests/fuzz_support/`, which the targets in
//! `fuzz/fuzz_targets/` include too.

use std::fs;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};

#[path = "fuzz_support/codec_check.rs"]
mod codec_check;
#[path = "fuzz_support/decision_check.rs"]
mod decision_check;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Every file of a corpus, by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The input as `fuzz_target!` builds it from the bytes: `None` where the target skips them.
fn scenario(bytes: &[u8]) -> Option<decision_check::Scenario> {
    if bytes.len() < <decision_check::Scenario as Arbitrary>::size_hint(0).0 {
        return None;
    }
    decision_check::Scenario::arbitrary_take_rest(Unstructured::new(bytes)).ok()
}

#[test]
fn prefix_decode_corpus_passes_the_target_checks() {
    let files = corpus("prefix_decode");
    for (name, bytes) in &files {
        let outcome = std::panic::catch_unwind(|| codec_check::check_frame(bytes));
        assert!(
            outcome.is_ok(),
            "fuzz/corpus/prefix_decode/{name} fails the checks"
        );
    }
    assert!(files.len() >= codec_check::seeds().len());
}

#[test]
fn decision_corpus_passes_the_target_checks() {
    let files = corpus("decision");
    let mut replayed = 0;
    for (name, bytes) in &files {
        if let Some(s) = scenario(bytes) {
            let outcome = std::panic::catch_unwind(|| decision_check::run(&s));
            assert!(
                outcome.is_ok(),
                "fuzz/corpus/decision/{name} fails the checks"
            );
            replayed += 1;
        }
    }
    assert!(replayed >= decision_check::seeds().len());
}

#[test]
fn the_seed_corpora_are_in_place() {
    for (name, bytes) in codec_check::seeds() {
        let path = corpus_dir("prefix_decode").join(name);
        assert_eq!(
            fs::read(&path).ok(),
            Some(bytes),
            "{} is missing or stale: run the ignored test write_seed_corpora",
            path.display()
        );
    }
    for (name, s) in decision_check::seeds() {
        let path = corpus_dir("decision").join(name);
        assert_eq!(
            fs::read(&path).ok(),
            Some(decision_check::seed_bytes(&s)),
            "{} is missing or stale: run the ignored test write_seed_corpora",
            path.display()
        );
    }
}

#[test]
fn the_section_8_vectors_seed_the_decoder_corpus() {
    for (name, hex) in [
        ("section8_prefix", codec_check::SECTION8_PREFIX_HEX),
        ("section8_verdict_accept", codec_check::SECTION8_ACCEPT_HEX),
        ("section8_verdict_reject", codec_check::SECTION8_REJECT_HEX),
    ] {
        let bytes = fs::read(corpus_dir("prefix_decode").join(name)).unwrap();
        assert_eq!(hex::encode(bytes), hex, "{name}");
    }
}

/// The seed scenarios are written in the byte layout `arbitrary` reads: each reads back as
/// itself, so the seeds test what they say.
#[test]
fn seed_scenarios_read_back_as_written() {
    for (name, s) in decision_check::seeds() {
        assert_eq!(
            scenario(&decision_check::seed_bytes(&s)).as_ref(),
            Some(&s),
            "{name}"
        );
    }
}

/// The seeds pass the checks and take the paths they were written for (a seed that stopped
/// reaching an accept, a lockout or a replay would still pass the checks, but would no longer
/// guide the fuzzer there).
#[test]
fn seed_scenarios_take_their_paths() {
    let expected: &[(&str, &[&str])] = &[
        (
            "section8_vectors",
            &["code_wrong", "nonce_replay", "frame_unsupported"],
        ),
        ("section8_fields", &["code_wrong"]),
        (
            "totp_then_session_then_replays",
            &[
                "accept_totp",
                "code_reused",
                "nonce_replay",
                "accept_session",
                "code_reused",
                "accept_totp",
                "accept_totp",
                "ticket_invalid",
                "ticket_revoked",
                "ticket_expired",
                "random_failure",
                // The random source failing refuses before anything is to be written (the
                // four-phase gate writes the step only with its session), so bob's code is
                // still good on the next try: an accept, where the gate that took the step
                // before sealing the ticket answered `code_reused`.
                "accept_totp",
            ],
        ),
        (
            "lockout",
            &[
                "code_wrong",
                "code_wrong",
                "code_wrong",
                "code_wrong",
                "code_wrong",
                "locked_out",
                "locked_out",
                "accept_totp",
            ],
        ),
        (
            "devices_rebound_and_revoked",
            &[
                "accept_totp",
                "device_revoked",
                "ticket_before_binding",
                "accept_totp",
                "user_mismatch",
                "device_unknown",
            ],
        ),
        (
            "skew_binding_and_edits",
            &[
                "accept_totp",
                "clock_skew",
                "binding_mismatch",
                "accept_totp",
                "accept_totp",
                "nonce_store_full",
                "accept_totp",
                "accept_totp",
                "frame_malformed",
                "frame_malformed",
                "frame_malformed",
                "code_reused",
                "policy_denied",
                "code_reused",
            ],
        ),
    ];
    let seeds = decision_check::seeds();
    assert_eq!(seeds.len(), expected.len());
    for ((name, s), (expected_name, outcomes)) in seeds.iter().zip(expected) {
        assert_eq!(name, expected_name);
        assert_eq!(decision_check::run(s), *outcomes, "{name}");
    }
}

/// The checks catch a broken registry: a reused code, a revoked device and a locked-out user
/// each get in through a planted bug, and the replay of the seeds stops there.
#[test]
fn the_checks_catch_planted_bugs() {
    use decision_check::Fault;
    let seeds = decision_check::seeds();
    let seed = |name: &str| &seeds.iter().find(|(n, _)| *n == name).unwrap().1;
    for (fault, name, message) in [
        (
            Fault::ReusableCodes,
            "totp_then_session_then_replays",
            "not later than the last accepted",
        ),
        (
            Fault::IgnoreRevocation,
            "devices_rebound_and_revoked",
            "from a device not bound to that user, or revoked",
        ),
        (Fault::NoLockout, "lockout", "accepted while locked out"),
    ] {
        let s = seed(name);
        let panic = std::panic::catch_unwind(|| decision_check::run_with(s, fault))
            .expect_err("the planted bug goes unnoticed");
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains(message), "{fault:?} on {name}: {text}");
    }
}

/// Rewrites the seed files: `cargo test -p portcullis-core --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed files into fuzz/corpus"]
fn write_seed_corpora() {
    for (name, bytes) in codec_check::seeds() {
        let dir = corpus_dir("prefix_decode");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
    for (name, s) in decision_check::seeds() {
        let dir = corpus_dir("decision");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), decision_check::seed_bytes(&s)).unwrap();
    }
}
