//! The PROXY protocol version 2 header that an L4 load balancer (HAProxy, AWS NLB, Envoy,
//! nginx `stream`) writes in front of a connection it forwards, so that the server behind it
//! learns the client's address. Sans-IO: [`decode`] looks at the bytes read so far and says how
//! many more it needs, what the header names, or why it is refused; the server reads exactly
//! that many bytes, so not one byte of the TLS handshake that follows is consumed.
//!
//! The header is only believed from a peer in [`TrustedProxies`]: anyone else could name any
//! address, and with it escape the rate limit of their own or spend someone else's.
//!
//! What is accepted, and what is refused:
//!
//! | the bytes | outcome |
//! |---|---|
//! | a v2 header, command PROXY, TCP over IPv4 or IPv6 | [`Header::client`] is the source address it names |
//! | a v2 header, command LOCAL (the balancer's own health check), or family UNSPEC/UNIX | [`Header::client`] is `None`: the connection's own peer address stands |
//! | anything that does not start with the v2 signature (a TLS ClientHello: no header) | [`HeaderError::Missing`] |
//! | a version 1 (text) header | [`HeaderError::Version1`] |
//! | a header longer than [`MAX_HEADER_LEN`] bytes | [`HeaderError::TooLong`] |
//! | a UDP (datagram) header | [`HeaderError::Datagram`] |
//! | any other malformed header | [`HeaderError::Malformed`] |
//!
//! ```
//! use portcullis_proxy::{decode, Progress, TrustedProxies};
//!
//! let trusted: TrustedProxies = "10.0.0.0/8, 127.0.0.1".parse().unwrap();
//! assert!(trusted.contains("10.1.2.3".parse().unwrap()));
//!
//! // What a balancer sends for 203.0.113.7:4444 -> 10.0.0.1:443.
//! let mut header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
//! header.extend_from_slice(&[203, 0, 113, 7, 10, 0, 0, 1, 0x11, 0x5c, 0x01, 0xbb]);
//!
//! assert_eq!(decode(&header[..10]).unwrap(), Progress::Need(6));
//! assert_eq!(decode(&header[..16]).unwrap(), Progress::Need(12));
//! let Progress::Done(done) = decode(&header).unwrap() else { panic!() };
//! assert_eq!(done.client, Some("203.0.113.7:4444".parse().unwrap()));
//! assert_eq!(done.len, 28);
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use proxy_header::{ParseConfig, Protocol, ProxyHeader};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\x00\r\nQUIT\n";

/// The fixed part of a version 2 header: the signature, the version and command, the family
/// and protocol, and the length of what follows.
pub const FIXED_LEN: usize = 16;

/// The longest header accepted, in bytes, fixed part and TLVs included. Addresses take at most
/// 36 bytes (IPv6); the rest is room for the TLVs balancers add (AWS NLB's VPC endpoint id,
/// HAProxy's TLS and unique-id TLVs). A header announcing more is refused without reading it.
pub const MAX_HEADER_LEN: usize = 1024;

/// Where [`decode`] stands on the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Read exactly this many more bytes, then call [`decode`] again with all of them.
    Need(usize),
    /// The header is complete.
    Done(Header),
}

/// A complete, accepted header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client the balancer forwards for; `None` for a LOCAL header (the balancer's own
    /// connection, such as a health check) or one without an address, where the connection's
    /// own peer address stands.
    pub client: Option<SocketAddr>,
    /// The header's length in bytes: the application data (TLS) starts right after it.
    pub len: usize,
}

/// Why a header is refused. None of them is worth a reply: the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The first bytes are not a PROXY protocol v2 signature: the peer sent no header (a
    /// client that connected directly, past the balancer).
    #[error("no PROXY protocol v2 header (the first bytes are not its signature)")]
    Missing,
    /// A PROXY protocol version 1 (text) header: only version 2 is accepted.
    #[error("a PROXY protocol v1 (text) header; only v2 is accepted")]
    Version1,
    /// The header announces more bytes than [`MAX_HEADER_LEN`].
    #[error("the PROXY header announces {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The length the header announces, fixed part included.
        len: usize,
        /// [`MAX_HEADER_LEN`].
        max: usize,
    },
    /// The header forwards a UDP (datagram) connection.
    #[error("the PROXY header names a datagram (UDP) connection")]
    Datagram,
    /// Another violation of the version 2 format (version, command, family or lengths).
    #[error("a malformed PROXY protocol v2 header")]
    Malformed,
}

/// Decodes a version 2 header from `buf`, the bytes read from the connection so far.
///
/// Never asks for more than the header holds, so that a caller reading exactly
/// [`Progress::Need`] bytes each time consumes the header and nothing after it. Bytes past the
/// header's length are ignored. A mismatch with the signature is reported as soon as the first
/// differing byte is in `buf`.
pub fn decode(buf: &[u8]) -> Result<Progress, HeaderError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
            HeaderError::Version1
        } else {
            HeaderError::Missing
        });
    }
    if buf.len() < FIXED_LEN {
        return Ok(Progress::Need(FIXED_LEN - buf.len()));
    }
    // Version 2 in the high nibble; command LOCAL (0) or PROXY (1) in the low one.
    let local = match buf[12] {
        0x20 => true,
        0x21 => false,
        _ => return Err(HeaderError::Malformed),
    };
    let len = FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong {
            len,
            max: MAX_HEADER_LEN,
        });
    }
    if buf.len() < len {
        return Ok(Progress::Need(len - buf.len()));
    }
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: false,
        allow_v2: true,
    };
    let (header, consumed) =
        ProxyHeader::parse(&buf[..len], config).map_err(|_| HeaderError::Malformed)?;
    if consumed != len {
        return Err(HeaderError::Malformed);
    }
    let client = match header.proxied_address() {
        _ if local => None,
        Some(address) if address.protocol == Protocol::Datagram => {
            return Err(HeaderError::Datagram);
        }
        Some(address) => Some(address.source),
        None => None,
    };
    Ok(Progress::Done(Header { client, len }))
}

/// The peers whose PROXY header is believed: addresses (`10.0.0.7`, `::1`) and networks
/// (`10.0.0.0/8`, `fd00::/8`).
///
/// An IPv4 peer seen as an IPv4-mapped IPv6 address (`::ffff:10.0.0.7`, on a dual-stack
/// listener) matches the IPv4 entries.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// The networks given. An empty list trusts no one: every connection is refused.
    pub fn new(networks: impl IntoIterator<Item = IpNet>) -> Self {
        Self(networks.into_iter().map(|n| n.trunc()).collect())
    }

    /// Whether a header from `peer` is believed.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.0.iter().any(|net| net.contains(&peer))
    }

    /// The networks, in the order given.
    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }
}

impl fmt::Debug for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedProxies({self})")
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// A list entry that is neither an address nor a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an IP address or network (such as 10.0.0.7 or 10.0.0.0/8)")]
pub struct BadProxyEntry {
    /// The entry as written.
    pub entry: String,
}

/// One entry: `ADDR` or `ADDR/PREFIX`.
fn parse_entry(entry: &str) -> Result<IpNet, BadProxyEntry> {
    let bad = || BadProxyEntry {
        entry: entry.to_owned(),
    };
    if entry.contains('/') {
        entry.parse::<IpNet>().map_err(|_| bad())
    } else {
        entry
            .parse::<IpAddr>()
            .map(|ip| IpNet::from(ip.to_canonical()))
            .map_err(|_| bad())
    }
}

impl FromStr for TrustedProxies {
    type Err = BadProxyEntry;

    /// A comma-separated list of addresses and networks; blanks around entries are ignored.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let networks = list
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(networks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_match() {
        let trusted: TrustedProxies = " 10.0.0.0/8 ,127.0.0.1,fd00::/8,::1".parse().unwrap();
        assert_eq!(
            trusted.to_string(),
            "10.0.0.0/8,127.0.0.1/32,fd00::/8,::1/128"
        );
        for yes in [
            "10.255.0.1",
            "127.0.0.1",
            "fd12::1",
            "::1",
            "::ffff:10.1.1.1",
        ] {
            assert!(trusted.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "11.0.0.1",
            "127.0.0.2",
            "fe80::1",
            "::2",
            "::ffff:127.0.0.2",
        ] {
            assert!(!trusted.contains(no.parse().unwrap()), "{no}");
        }
        // A host part in a network is cut off, not refused: 10.1.2.3/8 is 10.0.0.0/8.
        let cut: TrustedProxies = "10.1.2.3/8".parse().unwrap();
        assert_eq!(cut.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "10.0.0",
            "10.0.0.0/33",
            "localhost",
            "10.0.0.1:80",
            "::/129",
        ] {
            let e = bad.parse::<TrustedProxies>().unwrap_err();
            assert_eq!(e.entry, bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        let empty: TrustedProxies = " , ".parse().unwrap();
        assert!(!empty.contains("127.0.0.1".parse().unwrap()));
    }
}
