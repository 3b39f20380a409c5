//! Sequences of operations against one gate (users, devices, clock, sessions, and Prefix frames
//! built from chosen fields), checked against a model of PROTOCOL.md sections 5 and 6.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/core/tests/fuzz_support/codec_check.rs"]
mod codec_check;
#[path = "../../crates/core/tests/fuzz_support/decision_check.rs"]
mod decision_check;

fuzz_target!(|scenario: decision_check::Scenario| {
    decision_check::run(&scenario);
});
