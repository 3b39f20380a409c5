//! Any bytes through the PROXY protocol v2 header decoder: no panic, and decoding the bytes
//! whole agrees with reading them exactly as the decoder asks.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/proxy/tests/fuzz_support/proxy_check.rs"]
mod proxy_check;

fuzz_target!(|data: &[u8]| proxy_check::check(data));
