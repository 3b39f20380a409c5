//! Any bytes through the PCS1 decoders (whole frame and streaming, Prefix and Verdict): no panic,
//! both paths agree, and every value that decodes re-encodes to bytes that decode to it.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/core/tests/fuzz_support/codec_check.rs"]
mod codec_check;

fuzz_target!(|data: &[u8]| codec_check::check_frame(data));
