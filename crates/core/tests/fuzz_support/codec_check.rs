//! The checks of the `prefix_decode` fuzz target, shared with the corpus replay test
//! (`tests/fuzz_corpus.rs`): any bytes go through both decoders, whole-frame and streaming
//! (header, then exactly the announced body), and
//!
//! - nothing panics;
//! - the whole-frame decoder and the streaming decoder agree (same value or same error);
//! - a value that decodes re-encodes, and the encoding decodes to the same value, is no longer
//!   than the input and is a fixed point of decode-then-encode;
//! - decoded values respect the limits of PROTOCOL.md sections 3 and 4;
//! - a rejecting Verdict built from any code and any hint encodes and decodes back, with a REASON
//!   of at most 256 bytes that starts with the reject name and carries no control character.
#![allow(dead_code)]

use portcullis_core::RejectCode;
use portcullis_core::codec::{
    DecodeError, Factor, FrameHeader, FrameKind, HEADER_LEN, MAX_BODY_LEN, Prefix, Verdict,
};

/// The PROTOCOL.md section 8 Prefix (alice, 287082, NONCE 00..0f, TIME 1700000000000,
/// BINDING 32 bytes of ab).
pub const SECTION8_PREFIX_HEX: &str = concat!(
    "50435331010052010005616c696365020006323837303832030010000102030405060708090a0b0c0d0e0f",
    "0400080000018bcfe56800050020abababababababababababababababababababababababababababababababab",
);
/// The PROTOCOL.md section 8 accepting Verdict.
pub const SECTION8_ACCEPT_HEX: &str =
    "50435331020022100001001200080000018bcfe5687b13001011111111111111111111111111111111";
/// The PROTOCOL.md section 8 rejecting Verdict (mfa_failed).
pub const SECTION8_REJECT_HEX: &str = concat!(
    "504353310200531000010611002e6d66615f6661696c65643a20746865206f6e652d74696d6520636f6465",
    "20776173206e6f742061636365707465641200080000018bcfe5687b13001022222222222222222222222222222222",
);

/// Runs every check on one input. Panics (with the rule that broke) on a violation.
pub fn check_frame(data: &[u8]) {
    check_kind(
        data,
        FrameKind::Prefix,
        Prefix::decode,
        Prefix::decode_body,
        check_prefix,
    );
    check_kind(
        data,
        FrameKind::Verdict,
        Verdict::decode,
        Verdict::decode_body,
        check_verdict,
    );
    check_reject_verdict(data);
}

fn check_kind<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    kind: FrameKind,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    decode_body: fn(&[u8]) -> Result<T, DecodeError>,
    check_value: fn(&T, usize),
) {
    let whole = decode(data);
    if let Err(e) = &whole {
        check_error(e);
    }
    let Some(header) = data.get(..HEADER_LEN) else {
        assert!(
            matches!(whole, Err(DecodeError::Malformed(_))),
            "{kind:?}: a frame shorter than its header must be malformed, got {whole:?}"
        );
        return;
    };
    let header: &[u8; HEADER_LEN] = header.try_into().expect("7 bytes");
    let parsed = match FrameHeader::parse(header, kind) {
        Err(e) => {
            check_error(&e);
            // The header decides alone: the whole-frame decoder gives the same error.
            assert_eq!(
                whole,
                Err(e),
                "{kind:?}: header error differs from the frame's"
            );
            return;
        }
        Ok(h) => h,
    };
    assert_eq!(parsed.kind, kind);
    assert!(
        parsed.body_len <= MAX_BODY_LEN,
        "{kind:?}: header let through a body over 4096"
    );
    assert_eq!(
        parsed.body_len,
        usize::from(u16::from_be_bytes([header[5], header[6]])),
        "{kind:?}: the header's length is not the announced one"
    );
    let end = HEADER_LEN + parsed.body_len;
    // The streaming reader: header, then exactly the body; bytes after it stay in the stream.
    if let Some(body) = data.get(HEADER_LEN..end) {
        let streamed = decode_body(body);
        if let Err(e) = &streamed {
            check_error(e);
        }
        if data.len() == end {
            assert_eq!(
                whole, streamed,
                "{kind:?}: whole-frame and streaming decoders disagree"
            );
        }
        if let Ok(v) = &streamed {
            check_value(v, end);
        }
    }
    if data.len() != end {
        assert!(
            matches!(whole, Err(DecodeError::Malformed(_))),
            "{kind:?}: a frame whose length is not the header's must be malformed, got {whole:?}"
        );
    }
    if let Ok(v) = &whole {
        check_value(v, data.len());
    }
}

/// Decode errors name the rule in one short line, never a field's value.
fn check_error(e: &DecodeError) {
    let text = e.to_string();
    assert!(
        text.len() <= 120 && !text.contains('\n'),
        "a decode error is one short line: {text:?}"
    );
    assert!(
        text.starts_with("malformed: ") || text.starts_with("unsupported: "),
        "a decode error starts with its kind: {text:?}"
    );
}

fn check_prefix(p: &Prefix, frame_len: usize) {
    assert!(
        (1..=128).contains(&p.user.len()),
        "USER length {}",
        p.user.len()
    );
    match &p.factor {
        Factor::Totp(code) => assert!(
            (6..=8).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit()),
            "TOTP must be 6 to 8 ASCII digits"
        ),
        Factor::Session(t) => assert!((1..=1024).contains(&t.len()), "SESSION length {}", t.len()),
        other => panic!("the decoder made a factor the checks do not know: {other:?}"),
    }
    if let Some(agent) = &p.agent {
        assert!(agent.len() <= 64, "AGENT length {}", agent.len());
    }
    let encoded = p.encode().expect("a decoded Prefix must encode");
    assert!(
        encoded.len() <= frame_len,
        "re-encoding grew the frame from {frame_len} to {} bytes",
        encoded.len()
    );
    let again = Prefix::decode(&encoded).expect("a re-encoded Prefix must decode");
    assert_eq!(&again, p, "a Prefix changed across encode and decode");
    assert_eq!(
        again.encode().expect("encode"),
        encoded,
        "encoding is not a fixed point"
    );
    let debug = format!("{p:?}");
    assert!(
        debug.contains("redacted"),
        "Debug of a Prefix must redact its factor: {debug}"
    );
    if let Factor::Session(t) = &p.factor
        && t.len() >= 8
    {
        assert!(
            !debug.contains(&hex::encode(t)),
            "Debug of a Prefix shows the ticket"
        );
    }
}

fn check_verdict(v: &Verdict, frame_len: usize) {
    if let Some(reason) = &v.reason {
        assert!(reason.len() <= 256, "REASON length {}", reason.len());
    }
    if let Some((t, _)) = &v.session {
        assert!((1..=1024).contains(&t.len()), "SESSION length {}", t.len());
        if t.len() >= 8 {
            assert!(
                !format!("{v:?}").contains(&hex::encode(t)),
                "Debug of a Verdict shows the ticket"
            );
        }
    }
    match v.reject_code() {
        Some(code) => assert_eq!(code.as_u8(), v.status),
        None => assert!(
            v.status == 0 || v.status > 15,
            "status {} has no code",
            v.status
        ),
    }
    assert_eq!(v.is_accepted(), v.status == 0);
    let encoded = v.encode().expect("a decoded Verdict must encode");
    assert!(
        encoded.len() <= frame_len,
        "re-encoding grew the frame from {frame_len} to {} bytes",
        encoded.len()
    );
    let again = Verdict::decode(&encoded).expect("a re-encoded Verdict must decode");
    assert_eq!(&again, v, "a Verdict changed across encode and decode");
    assert_eq!(
        again.encode().expect("encode"),
        encoded,
        "encoding is not a fixed point"
    );
}

/// A rejecting Verdict from the first byte (the code), the next four (RETRY_AFTER) and the rest
/// (the hint, as lossy UTF-8).
fn check_reject_verdict(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let code = RejectCode::ALL[usize::from(first) % RejectCode::ALL.len()];
    let retry = rest
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let hint = String::from_utf8_lossy(rest.get(4..).unwrap_or_default());
    let v = Verdict::reject(code, &hint, 1_700_000_000_123, [0x22; 16], retry);
    let reason = v.reason.as_deref().expect("a reject has a REASON");
    assert!(reason.len() <= 256, "REASON of {} bytes", reason.len());
    assert!(
        reason.starts_with(&format!("{}: ", code.name())),
        "REASON {reason:?}"
    );
    assert!(
        !reason.chars().any(char::is_control),
        "REASON has a control character"
    );
    assert_eq!(v.reject_code(), Some(code));
    assert_eq!(
        v.retry_after_s.is_some(),
        code.has_retry_after() && retry.is_some()
    );
    let frame = v.encode().expect("a rejecting Verdict must encode");
    assert_eq!(
        Verdict::decode(&frame),
        Ok(v),
        "a rejecting Verdict changed across the wire"
    );
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

fn with_body_len(mut frame: Vec<u8>) -> Vec<u8> {
    let len = u16::try_from(frame.len() - HEADER_LEN).expect("short body");
    frame[5..7].copy_from_slice(&len.to_be_bytes());
    frame
}

/// The seed corpus of the `prefix_decode` target: the three section 8 vectors, valid frames that
/// use every field, and frames that break each rule of section 2 and 3 once.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let prefix = unhex(SECTION8_PREFIX_HEX);
    let accept = unhex(SECTION8_ACCEPT_HEX);
    let reject = unhex(SECTION8_REJECT_HEX);
    let session_prefix = Prefix {
        user: "bob".into(),
        factor: Factor::Session(vec![0x5c; 93]),
        nonce: [0x33; 16],
        time_ms: 1_700_000_030_000,
        binding: [0x44; 32],
        agent: Some("portcullis-client/0.1.0".into()),
    }
    .encode()
    .expect("valid");
    let eight_digits = Prefix {
        user: "zoë".into(),
        factor: Factor::Totp("94287082".into()),
        nonce: [0xff; 16],
        time_ms: u64::MAX,
        binding: [0; 32],
        agent: Some(String::new()),
    }
    .encode()
    .expect("valid");
    let accept_with_session = Verdict::accept(
        1_700_000_000_123,
        [0x11; 16],
        Some((vec![0x5c; 93], 1_700_003_600_123)),
    )
    .encode()
    .expect("valid");
    let locked_out = Verdict::reject(
        RejectCode::LockedOut,
        "too many failed codes for alice; retry in 30 s",
        1_700_000_000_123,
        [0x33; 16],
        Some(30),
    )
    .encode()
    .expect("valid");

    let mut extension = prefix.clone();
    extension.extend_from_slice(&[0x80, 0x00, 0x03, 1, 2, 3]);
    let extension = with_body_len(extension);
    let mut critical = prefix.clone();
    critical.extend_from_slice(&[0x08, 0x00, 0x01, 0]);
    let critical = with_body_len(critical);
    let mut repeated = prefix.clone();
    repeated.extend_from_slice(&[0x01, 0x00, 0x03, b'b', b'o', b'b']);
    let repeated = with_body_len(repeated);
    let mut both_factors = prefix.clone();
    both_factors.extend_from_slice(&[0x06, 0x00, 0x02, 0xaa, 0xbb]);
    let both_factors = with_body_len(both_factors);
    let mut pipelined = prefix.clone();
    pipelined.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut pcs2 = prefix.clone();
    pcs2[3] = b'2';
    let mut as_verdict = prefix.clone();
    as_verdict[4] = 2;
    let mut field_past_body = prefix.clone();
    field_past_body.extend_from_slice(&[0x81, 0x00, 0x09, 1]);
    let field_past_body = with_body_len(field_past_body);

    vec![
        ("section8_prefix", prefix.clone()),
        ("section8_verdict_accept", accept),
        ("section8_verdict_reject", reject),
        ("prefix_session_agent", session_prefix),
        ("prefix_eight_digits", eight_digits),
        ("prefix_extension_field", extension),
        ("verdict_accept_session", accept_with_session),
        ("verdict_locked_out", locked_out),
        ("bad_unknown_critical_tag", critical),
        ("bad_repeated_tag", repeated),
        ("bad_totp_and_session", both_factors),
        ("bad_field_past_body", field_past_body),
        ("bad_truncated", prefix[..prefix.len() - 1].to_vec()),
        ("bad_pipelined_http2", pipelined),
        ("bad_magic_pcs2", pcs2),
        ("bad_kind_verdict", as_verdict),
        ("bad_length_65535", b"PCS1\x01\xff\xff".to_vec()),
        (
            "bad_http2_preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("bad_empty", Vec::new()),
    ]
}
