//! The PROXY protocol v2 decoder against headers written by an independent encoder
//! (`proxy-header`'s), against every refusal of the crate's table, and against 40,000 random and
//! mutated inputs; the fuzz corpus (`fuzz/corpus/proxy_header`) is replayed too.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

use portcullis_proxy::{FIXED_LEN, Header, HeaderError, MAX_HEADER_LEN, Progress, decode};
use proxy_header::{ProxiedAddress, ProxyHeader, SslInfo, Tlv};

#[path = "fuzz_support/proxy_check.rs"]
mod proxy_check;

fn encoded(header: &ProxyHeader<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    header.encode_v2(&mut buf).unwrap();
    buf
}

fn stream(source: &str, destination: &str) -> ProxyHeader<'static> {
    ProxyHeader::with_address(ProxiedAddress::stream(
        source.parse().unwrap(),
        destination.parse().unwrap(),
    ))
}

fn done(bytes: &[u8]) -> Header {
    match decode(bytes) {
        Ok(Progress::Done(header)) => header,
        other => panic!("{other:?}"),
    }
}

#[test]
fn headers_of_an_independent_encoder_name_their_client() {
    for (source, destination) in [
        ("203.0.113.7:4444", "10.0.0.1:443"),
        ("[2001:db8::1]:51234", "[2001:db8::2]:443"),
    ] {
        let bytes = encoded(&stream(source, destination));
        let header = done(&bytes);
        assert_eq!(header.client, Some(source.parse::<SocketAddr>().unwrap()));
        assert_eq!(header.len, bytes.len());
        // Read byte by byte, the decoder asks for exactly what is left, never more.
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Ok(Progress::Need(n)) => {
                    assert!(cut + n <= bytes.len(), "asks past the header at {cut}")
                }
                other => panic!("at {cut}: {other:?}"),
            }
        }
        // The TLS record after it is not part of it.
        let mut with_tls = bytes.clone();
        with_tls.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0xc8]);
        assert_eq!(done(&with_tls), header);
    }
}

#[test]
fn tlvs_are_skipped_within_the_limit() {
    let address = ProxiedAddress::stream(
        "198.51.100.9:1000".parse().unwrap(),
        "10.0.0.1:443".parse().unwrap(),
    );
    let header = ProxyHeader::with_tlvs(
        Some(address),
        [
            Tlv::Authority("gate.example".into()),
            Tlv::UniqueId(b"connection-42".as_slice().into()),
            Tlv::Ssl(SslInfo::new(true, false, false, 0)),
        ],
    );
    let bytes = encoded(&header);
    assert_eq!(
        done(&bytes).client,
        Some("198.51.100.9:1000".parse().unwrap())
    );

    // The biggest accepted header, and one byte more.
    let fits = MAX_HEADER_LEN - FIXED_LEN - 12 - 3;
    let big = |n: usize| {
        let address = ProxiedAddress::stream(
            "198.51.100.9:1000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        );
        encoded(&ProxyHeader::with_tlvs(Some(address), [Tlv::Noop(n)]))
    };
    assert_eq!(done(&big(fits)).len, MAX_HEADER_LEN);
    let too_big = big(fits + 1);
    assert_eq!(
        decode(&too_big[..FIXED_LEN]),
        Err(HeaderError::TooLong {
            len: MAX_HEADER_LEN + 1,
            max: MAX_HEADER_LEN
        }),
        "refused on the fixed part alone, before the rest is read"
    );
}

#[test]
fn local_and_addressless_headers_leave_the_peer_address() {
    let local = encoded(&ProxyHeader::with_local());
    assert_eq!(
        done(&local),
        Header {
            client: None,
            len: FIXED_LEN
        }
    );
    // LOCAL with addresses (HAProxy's health checks carry them): the addresses are ignored.
    let mut local_with_addresses = encoded(&stream("203.0.113.7:4444", "10.0.0.1:443"));
    local_with_addresses[12] = 0x20;
    assert_eq!(done(&local_with_addresses).client, None);
    // PROXY over UNSPEC and over AF_UNIX: no client address to take.
    let mut unspec = local.clone();
    unspec[12] = 0x21;
    assert_eq!(done(&unspec).client, None);
    let mut unix = fixed_part(0x21, 0x31, 216);
    unix.extend_from_slice(&[0; 216]);
    assert_eq!(done(&unix).client, None);
}

/// The fixed part of a header: signature, version/command, family/protocol, length.
fn fixed_part(ver_cmd: u8, fam: u8, len: u16) -> Vec<u8> {
    let mut bytes = portcullis_proxy::SIGNATURE.to_vec();
    bytes.extend_from_slice(&[ver_cmd, fam]);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes
}

#[test]
fn every_refusal_of_the_table() {
    // A TLS ClientHello where the header should be: refused on its first byte.
    assert_eq!(decode(&[0x16]), Err(HeaderError::Missing));
    assert_eq!(
        decode(&[0x16, 0x03, 0x01, 0x02, 0x00]),
        Err(HeaderError::Missing)
    );
    // An HTTP/2 preface, and a signature that goes wrong at its last byte.
    assert_eq!(decode(b"PRI * HTTP/2.0\r\n"), Err(HeaderError::Missing));
    let mut almost = portcullis_proxy::SIGNATURE.to_vec();
    almost[11] = b'X';
    assert_eq!(decode(&almost), Err(HeaderError::Missing));
    // Version 1, text.
    assert_eq!(
        decode(b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 443\r\n"),
        Err(HeaderError::Version1)
    );
    // UDP.
    let mut udp = encoded(&ProxyHeader::with_address(ProxiedAddress::datagram(
        "203.0.113.7:4444".parse().unwrap(),
        "10.0.0.1:443".parse().unwrap(),
    )));
    assert_eq!(decode(&udp), Err(HeaderError::Datagram));
    // Version 1 or 3 in the binary form, an unknown command, an unknown family.
    for (offset, value) in [(12, 0x11), (12, 0x31), (12, 0x22), (13, 0x41), (13, 0x13)] {
        let saved = udp[offset];
        udp[offset] = value;
        assert_eq!(
            decode(&udp),
            Err(HeaderError::Malformed),
            "byte {offset} = {value:#x}"
        );
        udp[offset] = saved;
    }
    // A length too short for the family's addresses.
    let mut short = fixed_part(0x21, 0x11, 8);
    short.extend_from_slice(&[0; 8]);
    assert_eq!(decode(&short), Err(HeaderError::Malformed));
    // The largest length the field can say.
    assert_eq!(
        decode(&fixed_part(0x21, 0x11, u16::MAX)),
        Err(HeaderError::TooLong {
            len: FIXED_LEN + 65535,
            max: MAX_HEADER_LEN
        })
    );
}

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
}

#[test]
fn random_and_mutated_headers_pass_the_fuzz_checks() {
    let seeds = [
        encoded(&stream("203.0.113.7:4444", "10.0.0.1:443")),
        encoded(&stream("[2001:db8::1]:51234", "[2001:db8::2]:443")),
        encoded(&ProxyHeader::with_local()),
        encoded(&ProxyHeader::with_tlvs(
            Some(ProxiedAddress::stream(
                "198.51.100.9:1000".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap(),
            )),
            [Tlv::Authority("gate.example".into()), Tlv::Noop(40)],
        )),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for i in 0..40_000 {
        let mut bytes = if i % 5 == 0 {
            // Random bytes, a third of them behind a valid signature.
            let len = rng.below(80);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i % 3 == 0 {
                bytes.splice(0..0, portcullis_proxy::SIGNATURE);
            }
            bytes
        } else {
            seeds[i % seeds.len()].clone()
        };
        for _ in 0..=rng.below(3) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] ^= 1 << rng.below(8),
                2 => bytes.truncate(at),
                _ => bytes.insert(at, rng.next() as u8),
            }
        }
        proxy_check::check(&bytes);
        if matches!(decode(&bytes), Ok(Progress::Done(_))) {
            decoded += 1;
        }
    }
    // The mutations leave enough valid headers for the checks on them to mean something.
    assert!(decoded > 2_000, "only {decoded} inputs decoded");
}

#[test]
fn the_fuzz_corpus_passes_the_checks() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/proxy_header");
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
    {
        let path = entry.unwrap().path();
        proxy_check::check(&fs::read(&path).unwrap());
        files += 1;
    }
    assert!(files > 0, "{} is empty", dir.display());
}
