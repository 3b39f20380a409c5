//! The PCS1 codec against PROTOCOL.md: the section 8 test vectors, every rule of sections 2, 3
//! and 4 (each refused without a panic and with the right error kind), and a property-style run
//! of random and mutated frames through both decoders.

use portcullis_core::RejectCode;
use portcullis_core::codec::{
    DecodeError, Factor, FrameHeader, FrameKind, HEADER_LEN, MAX_BODY_LEN, Prefix, Verdict,
    prefix_tag, verdict_tag,
};

// ---------------------------------------------------------------------------------------------
// Section 8: test vectors, written as in the spec (each one hex string, wrapped there).

const PREFIX_HEX: &str = concat!(
    "50435331010052010005616c696365020006323837303832030010000102030405060708090a0b0c0d0e0f",
    "0400080000018bcfe56800050020abababababababababababababababababababababababababababababababab",
);

const ACCEPT_HEX: &str =
    "50435331020022100001001200080000018bcfe5687b13001011111111111111111111111111111111";

const REJECT_HEX: &str = concat!(
    "504353310200531000010611002e6d66615f6661696c65643a20746865206f6e652d74696d6520636f6465",
    "20776173206e6f742061636365707465641200080000018bcfe5687b13001022222222222222222222222222222222",
);

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn vector_prefix() -> Prefix {
    Prefix {
        user: "alice".into(),
        factor: Factor::Totp("287082".into()),
        nonce: core::array::from_fn(|i| i as u8),
        time_ms: 1_700_000_000_000,
        binding: [0xab; 32],
        agent: None,
    }
}

#[test]
fn prefix_vector_decodes_and_encodes_to_the_exact_bytes() {
    let frame = unhex(PREFIX_HEX);
    assert_eq!(frame.len(), 89);
    let prefix = Prefix::decode(&frame).unwrap();
    assert_eq!(prefix.user, "alice");
    assert_eq!(prefix.factor, Factor::Totp("287082".into()));
    assert_eq!(
        prefix.nonce,
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    );
    assert_eq!(prefix.time_ms, 1_700_000_000_000);
    assert_eq!(prefix.binding, [0xab; 32]);
    assert_eq!(prefix.agent, None);
    assert_eq!(prefix, vector_prefix());
    assert_eq!(vector_prefix().encode().unwrap(), frame);

    // The header alone announces the body, and the body alone decodes to the same value.
    let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
    let h = FrameHeader::parse(&header, FrameKind::Prefix).unwrap();
    assert_eq!(h.kind, FrameKind::Prefix);
    assert_eq!(h.body_len, 82);
    assert_eq!(Prefix::decode_body(&frame[HEADER_LEN..]).unwrap(), prefix);
}

#[test]
fn accepting_verdict_vector_decodes_and_encodes_to_the_exact_bytes() {
    let frame = unhex(ACCEPT_HEX);
    assert_eq!(frame.len(), 41);
    let v = Verdict::decode(&frame).unwrap();
    assert_eq!(v.status, 0);
    assert!(v.is_accepted());
    assert_eq!(v.reject_code(), None);
    assert_eq!(v.reason, None);
    assert_eq!(v.server_time_ms, 1_700_000_000_123);
    assert_eq!(v.reference, [0x11; 16]);
    assert_eq!(v.session, None);
    assert_eq!(v.retry_after_s, None);

    let built = Verdict::accept(1_700_000_000_123, [0x11; 16], None);
    assert_eq!(built, v);
    assert_eq!(built.encode().unwrap(), frame);
}

#[test]
fn rejecting_verdict_vector_decodes_and_encodes_to_the_exact_bytes() {
    let frame = unhex(REJECT_HEX);
    assert_eq!(frame.len(), 90);
    let v = Verdict::decode(&frame).unwrap();
    assert_eq!(v.status, 6);
    assert!(!v.is_accepted());
    assert_eq!(v.reject_code(), Some(RejectCode::MfaFailed));
    assert_eq!(
        v.reason.as_deref(),
        Some("mfa_failed: the one-time code was not accepted")
    );
    assert_eq!(v.server_time_ms, 1_700_000_000_123);
    assert_eq!(v.reference, [0x22; 16]);
    assert_eq!(v.session, None);
    assert_eq!(v.retry_after_s, None);

    let built = Verdict::reject(
        RejectCode::MfaFailed,
        "the one-time code was not accepted",
        1_700_000_000_123,
        [0x22; 16],
        None,
    );
    assert_eq!(built, v);
    assert_eq!(built.encode().unwrap(), frame);
}

// ---------------------------------------------------------------------------------------------
// Frame building helpers for the rule tests.

type Fields = Vec<(u8, Vec<u8>)>;

fn frame_of(kind: u8, fields: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in fields {
        body.push(*tag);
        body.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut out = b"PCS1".to_vec();
    out.push(kind);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The fields of the section 8 Prefix, in tag order.
fn prefix_fields() -> Fields {
    vec![
        (prefix_tag::USER, b"alice".to_vec()),
        (prefix_tag::TOTP, b"287082".to_vec()),
        (prefix_tag::NONCE, (0u8..16).collect()),
        (
            prefix_tag::TIME,
            1_700_000_000_000u64.to_be_bytes().to_vec(),
        ),
        (prefix_tag::BINDING, vec![0xab; 32]),
    ]
}

fn with(mut fields: Fields, tag: u8, value: Vec<u8>) -> Fields {
    match fields.iter_mut().find(|(t, _)| *t == tag) {
        Some(f) => f.1 = value,
        None => fields.push((tag, value)),
    }
    fields
}

fn without(mut fields: Fields, tag: u8) -> Fields {
    fields.retain(|(t, _)| *t != tag);
    fields
}

fn prefix_frame(fields: &[(u8, Vec<u8>)]) -> Vec<u8> {
    frame_of(1, fields)
}

/// The fields of the section 8 accepting Verdict.
fn verdict_fields() -> Fields {
    vec![
        (verdict_tag::STATUS, vec![0]),
        (
            verdict_tag::SERVER_TIME,
            1_700_000_000_123u64.to_be_bytes().to_vec(),
        ),
        (verdict_tag::REF, vec![0x11; 16]),
    ]
}

fn verdict_frame(fields: &[(u8, Vec<u8>)]) -> Vec<u8> {
    frame_of(2, fields)
}

#[track_caller]
fn malformed_prefix(frame: &[u8]) -> String {
    match Prefix::decode(frame) {
        Err(DecodeError::Malformed(detail)) => detail,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[track_caller]
fn unsupported_prefix(frame: &[u8]) -> String {
    match Prefix::decode(frame) {
        Err(DecodeError::Unsupported(detail)) => detail,
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[track_caller]
fn malformed_verdict(frame: &[u8]) -> String {
    match Verdict::decode(frame) {
        Err(DecodeError::Malformed(detail)) => detail,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[track_caller]
fn decodes(fields: &[(u8, Vec<u8>)]) -> Prefix {
    Prefix::decode(&prefix_frame(fields)).unwrap()
}

#[test]
fn the_helpers_build_the_vector() {
    // The rule tests below change one thing at a time from this known-good frame.
    assert_eq!(prefix_frame(&prefix_fields()), unhex(PREFIX_HEX));
    assert_eq!(verdict_frame(&verdict_fields()), unhex(ACCEPT_HEX));
}

// ---------------------------------------------------------------------------------------------
// Section 2: frames.

#[test]
fn a_frame_shorter_than_its_header_is_malformed() {
    let frame = unhex(PREFIX_HEX);
    for n in 0..HEADER_LEN {
        malformed_prefix(&frame[..n]);
        malformed_verdict(&unhex(ACCEPT_HEX)[..n]);
    }
}

#[test]
fn another_magic_is_malformed_but_another_pcs_version_is_unsupported() {
    let frame = unhex(PREFIX_HEX);
    for magic in [
        b"XCS1",
        b"pcs1",
        b"PCS\0",
        b"PCSx",
        b"PCS ",
        b"\0\0\0\0",
        b"1SCP",
        b"PCT1",
    ] {
        let mut f = frame.clone();
        f[..4].copy_from_slice(magic);
        let detail = malformed_prefix(&f);
        assert!(detail.contains("PCS1"), "{detail}");
        let header: [u8; 7] = f[..7].try_into().unwrap();
        assert!(matches!(
            FrameHeader::parse(&header, FrameKind::Prefix),
            Err(DecodeError::Malformed(_))
        ));
    }
    for digit in [b'0', b'2', b'9'] {
        let mut f = frame.clone();
        f[3] = digit;
        let detail = unsupported_prefix(&f);
        assert!(
            detail.contains(&format!("PCS{}", digit as char)),
            "{detail}"
        );
        let header: [u8; 7] = f[..7].try_into().unwrap();
        let err = FrameHeader::parse(&header, FrameKind::Prefix).unwrap_err();
        assert!(matches!(err, DecodeError::Unsupported(_)));
        assert_eq!(err.reject_code(), RejectCode::Unsupported);
    }
    let mut v = unhex(ACCEPT_HEX);
    v[3] = b'2';
    assert!(matches!(
        Verdict::decode(&v),
        Err(DecodeError::Unsupported(_))
    ));
}

#[test]
fn the_wrong_kind_is_unsupported_both_ways() {
    // A Verdict given to the Prefix decoder and a Prefix given to the Verdict decoder.
    assert!(matches!(
        Prefix::decode(&unhex(ACCEPT_HEX)),
        Err(DecodeError::Unsupported(_))
    ));
    assert!(matches!(
        Prefix::decode(&unhex(REJECT_HEX)),
        Err(DecodeError::Unsupported(_))
    ));
    assert!(matches!(
        Verdict::decode(&unhex(PREFIX_HEX)),
        Err(DecodeError::Unsupported(_))
    ));
    for kind in [0u8, 3, 0x7f, 0xff] {
        let mut f = unhex(PREFIX_HEX);
        f[4] = kind;
        unsupported_prefix(&f);
        let header: [u8; 7] = f[..7].try_into().unwrap();
        assert!(matches!(
            FrameHeader::parse(&header, FrameKind::Prefix),
            Err(DecodeError::Unsupported(_))
        ));
    }
}

#[test]
fn a_length_over_4096_is_malformed_from_the_header_alone() {
    for (len, ok) in [
        (0u16, true),
        (4096, true),
        (4097, false),
        (0x8000, false),
        (65535, false),
    ] {
        let mut header = *b"PCS1\x01\0\0";
        header[5..].copy_from_slice(&len.to_be_bytes());
        let parsed = FrameHeader::parse(&header, FrameKind::Prefix);
        if ok {
            assert_eq!(parsed.unwrap().body_len, usize::from(len));
        } else {
            let err = parsed.unwrap_err();
            assert!(matches!(err, DecodeError::Malformed(_)), "{len}: {err:?}");
            assert_eq!(err.reject_code(), RejectCode::Malformed);
        }
        // The whole-frame decoder refuses it too, with no body at all behind the header.
        if !ok {
            malformed_prefix(&header);
            let mut vh = header;
            vh[4] = 2;
            malformed_verdict(&vh);
        }
    }
    assert_eq!(MAX_BODY_LEN, 4096);
}

#[test]
fn a_body_of_exactly_4096_bytes_is_accepted() {
    // An extension field pads the body to the limit.
    let mut fields = prefix_fields();
    let used: usize = fields.iter().map(|(_, v)| 3 + v.len()).sum();
    fields.push((0x80, vec![0x5a; MAX_BODY_LEN - used - 3]));
    let frame = prefix_frame(&fields);
    assert_eq!(frame.len(), HEADER_LEN + MAX_BODY_LEN);
    assert_eq!(Prefix::decode(&frame).unwrap(), vector_prefix());
}

#[test]
fn a_header_length_other_than_the_body_is_malformed() {
    let frame = unhex(PREFIX_HEX);
    // Body shorter than announced.
    for cut in [1, 2, 10, 82] {
        malformed_prefix(&frame[..frame.len() - cut]);
    }
    // Bytes past the announced body.
    let mut longer = frame.clone();
    longer.push(0);
    malformed_prefix(&longer);
    let mut longer = frame.clone();
    longer.extend_from_slice(&frame);
    malformed_prefix(&longer);
    // The header lies in either direction while the bytes stay the same.
    for len in [81u16, 83, 0] {
        let mut f = frame.clone();
        f[5..7].copy_from_slice(&len.to_be_bytes());
        malformed_prefix(&f);
    }
    let v = unhex(ACCEPT_HEX);
    malformed_verdict(&v[..v.len() - 1]);
    let mut vl = v.clone();
    vl.push(0x80);
    malformed_verdict(&vl);
}

/// Builds a Prefix frame from the vector's fields followed by raw trailing body bytes.
fn vector_with_tail(tail: &[u8]) -> Vec<u8> {
    let mut f = prefix_frame(&prefix_fields());
    f.extend_from_slice(tail);
    let len = u16::try_from(f.len() - HEADER_LEN).unwrap();
    f[5..7].copy_from_slice(&len.to_be_bytes());
    f
}

#[test]
fn a_truncated_field_header_is_malformed() {
    for tail in [
        &[0x07][..],
        &[0x07, 0x00][..],
        &[0x80][..],
        &[0x80, 0x00][..],
    ] {
        let detail = malformed_prefix(&vector_with_tail(tail));
        assert!(detail.contains("header"), "{detail}");
    }
    let mut v = verdict_frame(&verdict_fields());
    v.push(0x11);
    let len = u16::try_from(v.len() - HEADER_LEN).unwrap();
    v[5..7].copy_from_slice(&len.to_be_bytes());
    malformed_verdict(&v);
}

#[test]
fn a_field_running_past_the_body_is_malformed() {
    // AGENT announces 5 bytes, 4 follow.
    malformed_prefix(&vector_with_tail(&[
        0x07, 0x00, 0x05, b'a', b'b', b'c', b'd',
    ]));
    // An extension field announces more than the body holds: not skipped, malformed.
    malformed_prefix(&vector_with_tail(&[0x80, 0xff, 0xff, 1, 2, 3]));
    malformed_prefix(&vector_with_tail(&[0x80, 0x00, 0x01]));
    // USER, the first field, announces one byte too many: everything after shifts.
    let mut f = unhex(PREFIX_HEX);
    f[HEADER_LEN + 2] = 0x06;
    assert!(Prefix::decode(&f).is_err());
    // The last field (BINDING) runs one byte past.
    let mut f = unhex(PREFIX_HEX);
    let at = f.len() - 32 - 1;
    assert_eq!(f[at], 0x20);
    f[at] = 0x21;
    malformed_prefix(&f);
}

#[test]
fn a_repeated_tag_is_malformed_known_or_extension() {
    let mut fields = prefix_fields();
    fields.push((prefix_tag::USER, b"alice".to_vec()));
    assert!(
        malformed_prefix(&prefix_frame(&fields)).contains("repeated"),
        "USER twice"
    );
    let mut fields = prefix_fields();
    fields.push((prefix_tag::NONCE, (0u8..16).collect()));
    malformed_prefix(&prefix_frame(&fields));
    for ext in [0x80u8, 0xc3, 0xff] {
        let mut fields = prefix_fields();
        fields.push((ext, vec![1]));
        fields.push((ext, vec![]));
        assert!(malformed_prefix(&prefix_frame(&fields)).contains("repeated"));
    }
    let mut fields = verdict_fields();
    fields.push((verdict_tag::STATUS, vec![0]));
    malformed_verdict(&verdict_frame(&fields));
}

#[test]
fn an_unknown_critical_tag_is_malformed() {
    for tag in [0x00u8, 0x08, 0x0f, 0x10, 0x16, 0x7f] {
        let mut fields = prefix_fields();
        fields.push((tag, vec![0]));
        let detail = malformed_prefix(&prefix_frame(&fields));
        assert!(detail.contains("unknown critical"), "{tag:#x}: {detail}");
    }
    // And a Prefix tag inside a Verdict.
    for tag in [prefix_tag::USER, prefix_tag::AGENT, 0x17, 0x7f] {
        let mut fields = verdict_fields();
        fields.push((tag, vec![0]));
        malformed_verdict(&verdict_frame(&fields));
    }
}

#[test]
fn an_unknown_extension_tag_is_skipped() {
    for ext in [0x80u8, 0x81, 0xfe, 0xff] {
        // At the end, at the start and in the middle; empty and with a value.
        let mut end = prefix_fields();
        end.push((ext, b"future".to_vec()));
        assert_eq!(decodes(&end), vector_prefix(), "{ext:#x} at the end");
        let mut start = prefix_fields();
        start.insert(0, (ext, vec![]));
        assert_eq!(decodes(&start), vector_prefix(), "{ext:#x} at the start");
        let mut middle = prefix_fields();
        middle.insert(2, (ext, vec![0xff; 300]));
        assert_eq!(decodes(&middle), vector_prefix(), "{ext:#x} in the middle");

        let mut vf = verdict_fields();
        vf.push((ext, vec![9, 9]));
        assert_eq!(
            Verdict::decode(&verdict_frame(&vf)).unwrap(),
            Verdict::decode(&unhex(ACCEPT_HEX)).unwrap()
        );
    }
    // Several different extensions in one frame.
    let mut many = prefix_fields();
    many.push((0x80, vec![]));
    many.push((0x90, vec![1]));
    many.push((0xff, vec![2, 3]));
    assert_eq!(decodes(&many), vector_prefix());
}

#[test]
fn fields_may_come_in_any_order() {
    let mut fields = prefix_fields();
    fields.reverse();
    assert_eq!(decodes(&fields), vector_prefix());
}

// ---------------------------------------------------------------------------------------------
// Section 3: the Prefix fields.

#[test]
fn user_is_1_to_128_bytes_of_utf8() {
    malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::USER,
        vec![],
    )));
    malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::USER,
        vec![b'a'; 129],
    )));
    // 129 bytes of multi-byte characters, too.
    malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::USER,
        "é".repeat(64)
            .into_bytes()
            .into_iter()
            .chain([b'x'])
            .collect(),
    )));
    for bad in [
        vec![0xff],
        vec![b'a', 0xc3],
        vec![0xc0, 0x80],
        vec![0xed, 0xa0, 0x80],
    ] {
        let detail = malformed_prefix(&prefix_frame(&with(prefix_fields(), prefix_tag::USER, bad)));
        assert!(detail.contains("UTF-8"), "{detail}");
    }
    assert_eq!(
        decodes(&with(prefix_fields(), prefix_tag::USER, vec![b'a'; 128])).user,
        "a".repeat(128)
    );
    assert_eq!(
        decodes(&with(
            prefix_fields(),
            prefix_tag::USER,
            "é".repeat(64).into_bytes()
        ))
        .user,
        "é".repeat(64)
    );
    assert_eq!(
        decodes(&with(prefix_fields(), prefix_tag::USER, b"a".to_vec())).user,
        "a"
    );
}

#[test]
fn totp_is_6_to_8_ascii_digits() {
    for bad in [
        &b"12345"[..],
        b"123456789",
        b"",
        b"12345a",
        b"+12345",
        b"-12345",
        b" 12345",
        b"123456 ",
        b"1234.5",
        b"\x001234567",
        "１２３４５６".as_bytes(),
    ] {
        let detail = malformed_prefix(&prefix_frame(&with(
            prefix_fields(),
            prefix_tag::TOTP,
            bad.to_vec(),
        )));
        assert!(detail.contains("TOTP"), "{detail}");
    }
    for good in ["000000", "1234567", "99999999"] {
        assert_eq!(
            decodes(&with(
                prefix_fields(),
                prefix_tag::TOTP,
                good.as_bytes().to_vec()
            ))
            .factor,
            Factor::Totp(good.into())
        );
    }
}

#[test]
fn fixed_size_fields_must_have_their_size() {
    for (tag, good, bads) in [
        (prefix_tag::NONCE, 16, [0usize, 15, 17]),
        (prefix_tag::TIME, 8, [0, 7, 9]),
        (prefix_tag::BINDING, 32, [0, 31, 33]),
    ] {
        for len in bads {
            let detail = malformed_prefix(&prefix_frame(&with(prefix_fields(), tag, vec![1; len])));
            assert!(detail.contains("exactly"), "{tag:#x} {len}: {detail}");
        }
        assert!(Prefix::decode(&prefix_frame(&with(prefix_fields(), tag, vec![1; good]))).is_ok());
    }
    assert_eq!(
        decodes(&with(prefix_fields(), prefix_tag::TIME, vec![0xff; 8])).time_ms,
        u64::MAX
    );
}

#[test]
fn session_is_1_to_1024_bytes() {
    let session = |len: usize| {
        with(
            without(prefix_fields(), prefix_tag::TOTP),
            prefix_tag::SESSION,
            vec![7; len],
        )
    };
    malformed_prefix(&prefix_frame(&session(0)));
    malformed_prefix(&prefix_frame(&session(1025)));
    assert_eq!(decodes(&session(1)).factor, Factor::Session(vec![7]));
    assert_eq!(
        decodes(&session(1024)).factor,
        Factor::Session(vec![7; 1024])
    );
}

#[test]
fn agent_is_optional_and_0_to_64_bytes_of_utf8() {
    malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::AGENT,
        vec![b'a'; 65],
    )));
    malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::AGENT,
        vec![0xfe],
    )));
    assert_eq!(
        decodes(&with(prefix_fields(), prefix_tag::AGENT, vec![])).agent,
        Some(String::new())
    );
    assert_eq!(
        decodes(&with(prefix_fields(), prefix_tag::AGENT, vec![b'z'; 64])).agent,
        Some("z".repeat(64))
    );
    assert_eq!(decodes(&prefix_fields()).agent, None);
}

#[test]
fn exactly_one_of_totp_and_session() {
    let both = with(prefix_fields(), prefix_tag::SESSION, vec![1; 10]);
    assert!(malformed_prefix(&prefix_frame(&both)).contains("both"));
    let neither = without(prefix_fields(), prefix_tag::TOTP);
    malformed_prefix(&prefix_frame(&neither));
}

#[test]
fn each_required_field_is_required() {
    for tag in [
        prefix_tag::USER,
        prefix_tag::NONCE,
        prefix_tag::TIME,
        prefix_tag::BINDING,
    ] {
        let detail = malformed_prefix(&prefix_frame(&without(prefix_fields(), tag)));
        assert!(detail.contains("missing"), "{tag:#x}: {detail}");
    }
    malformed_prefix(&prefix_frame(&[]));
    // A header with an empty body.
    malformed_prefix(b"PCS1\x01\x00\x00");
}

#[test]
fn errors_name_the_rule_never_the_value() {
    let secret_code = "13579";
    let detail = malformed_prefix(&prefix_frame(&with(
        prefix_fields(),
        prefix_tag::TOTP,
        secret_code.as_bytes().to_vec(),
    )));
    assert!(!detail.contains(secret_code), "{detail}");
    let ticket = b"TICKETBYTES".repeat(100);
    let detail = malformed_prefix(&prefix_frame(&with(
        without(prefix_fields(), prefix_tag::TOTP),
        prefix_tag::SESSION,
        ticket,
    )));
    assert!(!detail.contains("TICKETBYTES"), "{detail}");
    // Debug of a Prefix hides the code, and of a session Prefix the ticket.
    let p = vector_prefix();
    assert!(!format!("{p:?}").contains("287082"));
    let mut s = vector_prefix();
    s.factor = Factor::Session(b"SEALEDTICKET".to_vec());
    assert!(!format!("{s:?}").contains("SEALEDTICKET"));
}

#[test]
fn encode_refuses_values_outside_their_limits() {
    let bad = |f: fn(&mut Prefix)| {
        let mut p = vector_prefix();
        f(&mut p);
        assert!(
            matches!(p.encode(), Err(DecodeError::Malformed(_))),
            "{p:?}"
        );
    };
    bad(|p| p.user = String::new());
    bad(|p| p.user = "u".repeat(129));
    bad(|p| p.factor = Factor::Totp("12345".into()));
    bad(|p| p.factor = Factor::Totp("123456789".into()));
    bad(|p| p.factor = Factor::Totp("+12345".into()));
    bad(|p| p.factor = Factor::Session(vec![]));
    bad(|p| p.factor = Factor::Session(vec![1; 1025]));
    bad(|p| p.agent = Some("a".repeat(65)));

    let mut v = Verdict::accept(1, [0; 16], Some((vec![], 5)));
    assert!(v.encode().is_err());
    v.session = Some((vec![1; 1025], 5));
    assert!(v.encode().is_err());
    let mut v = Verdict::accept(1, [0; 16], None);
    v.reason = Some("r".repeat(257));
    assert!(v.encode().is_err());
}

// ---------------------------------------------------------------------------------------------
// Section 4: the Verdict fields.

#[test]
fn verdict_required_fields() {
    for tag in [
        verdict_tag::STATUS,
        verdict_tag::SERVER_TIME,
        verdict_tag::REF,
    ] {
        let detail = malformed_verdict(&verdict_frame(&without(verdict_fields(), tag)));
        assert!(detail.contains("missing"), "{tag:#x}: {detail}");
    }
}

#[test]
fn verdict_session_and_its_expiry_come_together() {
    let only_session = with(verdict_fields(), verdict_tag::SESSION, vec![1; 40]);
    malformed_verdict(&verdict_frame(&only_session));
    let only_expiry = with(
        verdict_fields(),
        verdict_tag::SESSION_EXPIRES,
        5u64.to_be_bytes().to_vec(),
    );
    malformed_verdict(&verdict_frame(&only_expiry));
    let both = with(
        only_session.clone(),
        verdict_tag::SESSION_EXPIRES,
        5u64.to_be_bytes().to_vec(),
    );
    let v = Verdict::decode(&verdict_frame(&both)).unwrap();
    assert_eq!(v.session, Some((vec![1; 40], 5)));
    // Sizes: SESSION 1..=1024, SESSION_EXPIRES 8.
    for len in [0usize, 1025] {
        let f = with(both.clone(), verdict_tag::SESSION, vec![1; len]);
        malformed_verdict(&verdict_frame(&f));
    }
    let f = with(both.clone(), verdict_tag::SESSION_EXPIRES, vec![0; 7]);
    malformed_verdict(&verdict_frame(&f));
}

#[test]
fn verdict_field_sizes() {
    // REASON 0..=256 bytes of UTF-8.
    let reason = |r: Vec<u8>| verdict_frame(&with(verdict_fields(), verdict_tag::REASON, r));
    malformed_verdict(&reason(vec![b'r'; 257]));
    malformed_verdict(&reason(vec![0xff, b'a']));
    assert_eq!(
        Verdict::decode(&reason(vec![b'r'; 256])).unwrap().reason,
        Some("r".repeat(256))
    );
    assert_eq!(
        Verdict::decode(&reason(vec![])).unwrap().reason,
        Some(String::new())
    );
    // RETRY_AFTER 4 bytes.
    for len in [0usize, 3, 5, 8] {
        let f = with(verdict_fields(), verdict_tag::RETRY_AFTER, vec![0; len]);
        malformed_verdict(&verdict_frame(&f));
    }
    let f = with(
        verdict_fields(),
        verdict_tag::RETRY_AFTER,
        vec![0, 0, 0, 30],
    );
    assert_eq!(
        Verdict::decode(&verdict_frame(&f)).unwrap().retry_after_s,
        Some(30)
    );
    // STATUS 1 byte, SERVER_TIME 8, REF 16.
    for (tag, bad) in [
        (verdict_tag::STATUS, [0usize, 2]),
        (verdict_tag::SERVER_TIME, [7, 9]),
        (verdict_tag::REF, [15, 17]),
    ] {
        for len in bad {
            let f = with(verdict_fields(), tag, vec![0; len]);
            malformed_verdict(&verdict_frame(&f));
        }
    }
}

#[test]
fn verdict_reject_builds_reason_and_keeps_retry_after_only_where_it_belongs() {
    let v = Verdict::reject(RejectCode::LockedOut, "wait", 1, [3; 16], Some(30));
    assert_eq!(v.reason.as_deref(), Some("locked_out: wait"));
    assert_eq!(v.retry_after_s, Some(30));
    assert_eq!(Verdict::decode(&v.encode().unwrap()).unwrap(), v);
    let v = Verdict::reject(RejectCode::MfaFailed, "no", 1, [3; 16], Some(30));
    assert_eq!(v.retry_after_s, None);
    // A long hint is cut to 256 bytes on a character boundary and still encodes.
    let v = Verdict::reject(RejectCode::UserMismatch, &"é".repeat(300), 1, [3; 16], None);
    let reason = v.reason.clone().unwrap();
    assert!(
        reason.len() <= 256 && reason.len() >= 255,
        "{}",
        reason.len()
    );
    assert!(reason.starts_with("user_mismatch: "));
    assert_eq!(Verdict::decode(&v.encode().unwrap()).unwrap(), v);
    // A full Verdict round-trips.
    let full = Verdict {
        status: 0,
        reason: None,
        server_time_ms: u64::MAX,
        reference: [0xfe; 16],
        session: Some((vec![0xaa; 1024], 42)),
        retry_after_s: Some(u32::MAX),
    };
    assert_eq!(Verdict::decode(&full.encode().unwrap()).unwrap(), full);
    assert!(!format!("{full:?}").contains("aaaaaaaa"));
}

// ---------------------------------------------------------------------------------------------
// Property-style: random and mutated frames never panic; what decodes round-trips.

/// xorshift64*: tiny and deterministic, good enough to spread test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }
}

/// Every Prefix that decodes re-encodes to a frame that decodes to the same value.
#[track_caller]
fn check_round_trip(frame: &[u8]) -> bool {
    let _ = Verdict::decode(frame);
    match Prefix::decode(frame) {
        Ok(p) => {
            let again = p.encode().expect("a decoded Prefix encodes");
            assert_eq!(Prefix::decode(&again).unwrap(), p);
            true
        }
        Err(_) => false,
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..20_000 {
        let len = rng.below(200);
        let mut frame = rng.bytes(len);
        // Half of them get a valid header, so that the body rules are reached.
        if i % 2 == 0 && frame.len() >= HEADER_LEN {
            frame[..4].copy_from_slice(b"PCS1");
            frame[4] = 1 + (i % 4 == 0) as u8;
            let body = u16::try_from(frame.len() - HEADER_LEN).unwrap();
            frame[5..7].copy_from_slice(&body.to_be_bytes());
        }
        check_round_trip(&frame);
        if frame.len() >= HEADER_LEN {
            let _ = Prefix::decode_body(&frame[HEADER_LEN..]);
            let _ = Verdict::decode_body(&frame[HEADER_LEN..]);
        }
    }
}

#[test]
fn mutated_vectors_never_panic_and_what_decodes_round_trips() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let seeds = [unhex(PREFIX_HEX), unhex(ACCEPT_HEX), unhex(REJECT_HEX)];
    let mut decoded = 0;
    for i in 0..20_000 {
        let mut frame = seeds[if i % 4 == 3 { 1 + i % 2 } else { 0 }].clone();
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 | 1 => {
                    if !frame.is_empty() {
                        let at = rng.below(frame.len());
                        frame[at] ^= 1 << rng.below(8);
                    }
                }
                2 => {
                    let keep = rng.below(frame.len() + 1);
                    frame.truncate(keep);
                }
                _ => {
                    let at = rng.below(frame.len() + 1);
                    let n = 1 + rng.below(4);
                    let ins = rng.bytes(n);
                    frame.splice(at..at, ins);
                }
            }
        }
        if check_round_trip(&frame) {
            decoded += 1;
        }
    }
    // Bit flips inside NONCE, TIME and BINDING keep the frame valid: a good share decodes, so
    // the round trip above was really exercised.
    assert!(decoded > 2_000, "only {decoded} mutated frames decoded");
}

#[test]
fn random_valid_prefixes_and_verdicts_round_trip() {
    let mut rng = Rng(42);
    let alphabet = ['a', 'Z', '0', '-', '.', 'é', 'ß', '€', '😀', ' '];
    let text = |rng: &mut Rng, max_bytes: usize, min_bytes: usize| loop {
        let n = rng.below(max_bytes + 1);
        let mut s = String::new();
        while s.len() < n {
            let c = alphabet[rng.below(alphabet.len())];
            if s.len() + c.len_utf8() > max_bytes {
                break;
            }
            s.push(c);
        }
        if s.len() >= min_bytes {
            return s;
        }
    };
    for _ in 0..2_000 {
        let factor = if rng.below(2) == 0 {
            let n = 6 + rng.below(3);
            Factor::Totp(
                (0..n)
                    .map(|_| char::from(b'0' + rng.below(10) as u8))
                    .collect(),
            )
        } else {
            let n = 1 + rng.below(1024);
            Factor::Session(rng.bytes(n))
        };
        let p = Prefix {
            user: text(&mut rng, 128, 1),
            factor,
            nonce: rng.bytes(16).try_into().unwrap(),
            time_ms: rng.next(),
            binding: rng.bytes(32).try_into().unwrap(),
            agent: (rng.below(2) == 0).then(|| text(&mut rng, 64, 0)),
        };
        let frame = p.encode().unwrap();
        assert_eq!(Prefix::decode(&frame).unwrap(), p);

        let session = (rng.below(2) == 0).then(|| {
            let n = 1 + rng.below(1024);
            (rng.bytes(n), rng.next())
        });
        let v = Verdict {
            status: rng.byte(),
            reason: (rng.below(2) == 0).then(|| text(&mut rng, 256, 0)),
            server_time_ms: rng.next(),
            reference: rng.bytes(16).try_into().unwrap(),
            session,
            retry_after_s: (rng.below(2) == 0).then(|| rng.next() as u32),
        };
        assert_eq!(Verdict::decode(&v.encode().unwrap()).unwrap(), v);
    }
}
