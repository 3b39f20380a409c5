//! The PCS1 frame codec (PROTOCOL.md sections 2 to 4), strict in what it accepts.
//!
//! A frame is `PCS1` | kind (1) | body length (2, big-endian, at most 4096) | body, and the body
//! is a sequence of fields `tag (1) | len (2) | value`. Readers on a stream first read the
//! 7-byte header and check it with [`FrameHeader::parse`] (a length over 4096 is refused before
//! the body is read), then read exactly the body and decode it with [`Prefix::decode_body`] or
//! [`Verdict::decode_body`]. Nothing past the frame is ever consumed.

use std::fmt;

use crate::RejectCode;

mod reader;
pub use reader::{FrameReader, Progress};

/// The magic of version 1: `PCS1`.
pub const MAGIC: [u8; 4] = *b"PCS1";
/// Length of a frame header: magic (4), kind (1), length (2).
pub const HEADER_LEN: usize = 7;
/// The largest body a frame may carry.
pub const MAX_BODY_LEN: usize = 4096;
/// The ALPN protocol id a PCS1 client offers.
pub const ALPN_PCS1: &[u8] = b"portcullis/1";

/// Field tags of a Prefix (section 3).
pub mod prefix_tag {
    /// The claimed user.
    pub const USER: u8 = 0x01;
    /// A TOTP code.
    pub const TOTP: u8 = 0x02;
    /// 16 random bytes.
    pub const NONCE: u8 = 0x03;
    /// Client clock, Unix ms.
    pub const TIME: u8 = 0x04;
    /// The tls-exporter channel binding.
    pub const BINDING: u8 = 0x05;
    /// A session ticket.
    pub const SESSION: u8 = 0x06;
    /// Client software and version.
    pub const AGENT: u8 = 0x07;
}

/// Field tags of a Verdict (section 4).
pub mod verdict_tag {
    /// 0 accepted, else a reject code.
    pub const STATUS: u8 = 0x10;
    /// Reject name, `: `, hint.
    pub const REASON: u8 = 0x11;
    /// Server clock, Unix ms.
    pub const SERVER_TIME: u8 = 0x12;
    /// Correlation id.
    pub const REF: u8 = 0x13;
    /// A session ticket.
    pub const SESSION: u8 = 0x14;
    /// When that ticket stops working, Unix ms.
    pub const SESSION_EXPIRES: u8 = 0x15;
    /// Seconds to wait before retrying.
    pub const RETRY_AFTER: u8 = 0x16;
}

/// The two frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client to server.
    Prefix = 1,
    /// Server to client.
    Verdict = 2,
}

/// Why a frame was refused: maps to MALFORMED or UNSUPPORTED. The detail names the rule and the
/// field, never a field's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Another PCS version, or the wrong kind.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Anything else that breaks sections 2 and 3.
    #[error("malformed: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The reject code for this error.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            Self::Unsupported(_) => RejectCode::Unsupported,
            Self::Malformed(_) => RejectCode::Malformed,
        }
    }

    fn malformed(detail: impl Into<String>) -> Self {
        Self::Malformed(detail.into())
    }
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's kind (the one expected).
    pub kind: FrameKind,
    /// Body length, at most [`MAX_BODY_LEN`].
    pub body_len: usize,
}

impl FrameHeader {
    /// Checks the 7 header bytes of a frame of the `expected` kind.
    ///
    /// ```
    /// use portcullis_core::codec::{DecodeError, FrameHeader, FrameKind};
    /// let h = FrameHeader::parse(b"PCS1\x01\x00\x52", FrameKind::Prefix).unwrap();
    /// assert_eq!(h.body_len, 0x52);
    /// assert!(matches!(FrameHeader::parse(b"PCS2\x01\x00\x52", FrameKind::Prefix), Err(DecodeError::Unsupported(_))));
    /// assert!(matches!(FrameHeader::parse(b"PCS1\x01\xff\xff", FrameKind::Prefix), Err(DecodeError::Malformed(_))));
    /// ```
    pub fn parse(header: &[u8; HEADER_LEN], expected: FrameKind) -> Result<Self, DecodeError> {
        if header[..4] != MAGIC {
            if &header[..3] == b"PCS" && header[3].is_ascii_digit() {
                return Err(DecodeError::Unsupported(format!(
                    "this server speaks PCS1, the frame is PCS{}",
                    header[3] as char
                )));
            }
            return Err(DecodeError::malformed("the frame does not start with PCS1"));
        }
        if header[4] != expected as u8 {
            return Err(DecodeError::Unsupported(format!(
                "expected frame kind {:02x}, got {:02x}",
                expected as u8, header[4]
            )));
        }
        let body_len = usize::from(u16::from_be_bytes([header[5], header[6]]));
        if body_len > MAX_BODY_LEN {
            return Err(DecodeError::malformed(format!(
                "body length {body_len} is over {MAX_BODY_LEN}"
            )));
        }
        Ok(Self {
            kind: expected,
            body_len,
        })
    }
}

fn split_frame(frame: &[u8], expected: FrameKind) -> Result<&[u8], DecodeError> {
    let header: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| DecodeError::malformed("the frame is shorter than its 7-byte header"))?;
    let h = FrameHeader::parse(header, expected)?;
    let body = &frame[HEADER_LEN..];
    if body.len() != h.body_len {
        return Err(DecodeError::malformed(format!(
            "the header says {} body bytes, the frame has {}",
            h.body_len,
            body.len()
        )));
    }
    Ok(body)
}

/// Walks the fields of a body: each tag at most once, each within the body, unknown critical
/// tags refused, unknown extension tags (0x80 and above) skipped.
fn fields<'a>(body: &'a [u8], known: &[u8]) -> Result<[Option<&'a [u8]>; 0x80], DecodeError> {
    let mut found: [Option<&[u8]>; 0x80] = [None; 0x80];
    let mut seen = [false; 256];
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(DecodeError::malformed("a field header runs past the body"));
        }
        let tag = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let value = rest.get(3..3 + len).ok_or_else(|| {
            DecodeError::malformed(format!("field {tag:#04x} runs past the body"))
        })?;
        rest = &rest[3 + len..];
        if std::mem::replace(&mut seen[usize::from(tag)], true) {
            return Err(DecodeError::malformed(format!(
                "field {tag:#04x} is repeated"
            )));
        }
        if tag >= 0x80 {
            continue;
        }
        if !known.contains(&tag) {
            return Err(DecodeError::malformed(format!(
                "unknown critical field {tag:#04x}"
            )));
        }
        found[usize::from(tag)] = Some(value);
    }
    Ok(found)
}

fn required<'a>(v: Option<&'a [u8]>, name: &str) -> Result<&'a [u8], DecodeError> {
    v.ok_or_else(|| DecodeError::malformed(format!("the required field {name} is missing")))
}

fn fixed<const N: usize>(v: &[u8], name: &str) -> Result<[u8; N], DecodeError> {
    v.try_into()
        .map_err(|_| DecodeError::malformed(format!("{name} must be exactly {N} bytes")))
}

fn utf8(v: &[u8], name: &str, min: usize, max: usize) -> Result<String, DecodeError> {
    if v.len() < min || v.len() > max {
        return Err(DecodeError::malformed(format!(
            "{name} must be {min} to {max} bytes of UTF-8"
        )));
    }
    String::from_utf8(v.to_vec())
        .map_err(|_| DecodeError::malformed(format!("{name} is not valid UTF-8")))
}

fn check_len(v: &[u8], name: &str, min: usize, max: usize) -> Result<(), DecodeError> {
    if v.len() < min || v.len() > max {
        return Err(DecodeError::malformed(format!(
            "{name} must be {min} to {max} bytes"
        )));
    }
    Ok(())
}

fn bytes(v: &[u8], name: &str, min: usize, max: usize) -> Result<Vec<u8>, DecodeError> {
    check_len(v, name, min, max)?;
    Ok(v.to_vec())
}

/// Checks a TOTP code without copying it (encoders must not leave copies of secrets behind).
fn check_totp(code: &[u8]) -> Result<(), DecodeError> {
    if !(6..=8).contains(&code.len()) || !code.iter().all(u8::is_ascii_digit) {
        return Err(DecodeError::malformed("TOTP must be 6 to 8 ASCII digits"));
    }
    Ok(())
}

/// Writes fields and wraps them into a frame.
struct FrameWriter {
    out: Vec<u8>,
}

impl FrameWriter {
    fn new(kind: FrameKind) -> Self {
        // Room for the largest frame from the start: the buffer never grows, so no freed copy
        // of a code or ticket is left behind by a reallocation.
        let mut out = Vec::with_capacity(HEADER_LEN + MAX_BODY_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(kind as u8);
        out.extend_from_slice(&[0, 0]);
        Self { out }
    }

    fn field(&mut self, tag: u8, value: &[u8]) {
        self.out.push(tag);
        // Every value is checked against its limit (at most 1024 bytes) before it is written.
        self.out
            .extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
        self.out.extend_from_slice(value);
    }

    fn finish(mut self) -> Result<Vec<u8>, DecodeError> {
        let body_len = self.out.len() - HEADER_LEN;
        if body_len > MAX_BODY_LEN {
            return Err(DecodeError::malformed("the body is over 4096 bytes"));
        }
        self.out[5..7].copy_from_slice(&(body_len as u16).to_be_bytes());
        Ok(self.out)
    }
}

/// The second factor a Prefix carries.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Factor {
    /// A TOTP code, 6 to 8 ASCII digits.
    Totp(String),
    /// A session ticket from an earlier Verdict.
    Session(Vec<u8>),
}

/// The code or ticket is wiped from memory when the factor is dropped, wherever the Prefix
/// that carried it ends (the server after its decision, the client after encoding).
impl Drop for Factor {
    fn drop(&mut self) {
        match self {
            Self::Totp(code) => zeroize::Zeroize::zeroize(code),
            Self::Session(ticket) => zeroize::Zeroize::zeroize(ticket),
        }
    }
}

impl fmt::Debug for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Totp(_) => f.write_str("Totp(<redacted>)"),
            Self::Session(t) => write!(f, "Session(<{} bytes redacted>)", t.len()),
        }
    }
}

/// The client's Prefix (section 3). `Debug` never shows the code or the ticket.
///
/// ```
/// use portcullis_core::codec::{Factor, Prefix};
/// let prefix = Prefix {
///     user: "alice".into(),
///     factor: Factor::Totp("287082".into()),
///     nonce: core::array::from_fn(|i| i as u8),
///     time_ms: 1_700_000_000_000,
///     binding: [0xab; 32],
///     agent: None,
/// };
/// let frame = prefix.encode().unwrap();
/// assert_eq!(frame.len(), 89); // the test vector of PROTOCOL.md section 8
/// assert_eq!(Prefix::decode(&frame).unwrap(), prefix);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    /// The user the client claims, 1..=128 bytes.
    pub user: String,
    /// TOTP code or session ticket.
    pub factor: Factor,
    /// 16 random bytes, new for every connection.
    pub nonce: [u8; 16],
    /// The client clock, Unix ms.
    pub time_ms: u64,
    /// The tls-exporter value of this connection.
    pub binding: [u8; 32],
    /// Client software and version, 0..=64 bytes.
    pub agent: Option<String>,
}

impl Prefix {
    /// Decodes a whole frame (header and body, nothing after it).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_body(split_frame(frame, FrameKind::Prefix)?)
    }

    /// Decodes a Prefix body whose header [`FrameHeader::parse`] already checked.
    pub fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        use prefix_tag::*;
        let f = fields(body, &[USER, TOTP, NONCE, TIME, BINDING, SESSION, AGENT])?;
        let user = utf8(required(f[USER as usize], "USER")?, "USER", 1, 128)?;
        let nonce = fixed::<16>(required(f[NONCE as usize], "NONCE")?, "NONCE")?;
        let time_ms = u64::from_be_bytes(fixed::<8>(required(f[TIME as usize], "TIME")?, "TIME")?);
        let binding = fixed::<32>(required(f[BINDING as usize], "BINDING")?, "BINDING")?;
        let factor = match (f[TOTP as usize], f[SESSION as usize]) {
            (Some(code), None) => {
                check_totp(code)?;
                Factor::Totp(String::from_utf8_lossy(code).into_owned())
            }
            (None, Some(ticket)) => Factor::Session(bytes(ticket, "SESSION", 1, 1024)?),
            (Some(_), Some(_)) => {
                return Err(DecodeError::malformed("TOTP and SESSION are both present"));
            }
            (None, None) => {
                return Err(DecodeError::malformed(
                    "one of TOTP and SESSION is required",
                ));
            }
        };
        let agent = f[AGENT as usize]
            .map(|a| utf8(a, "AGENT", 0, 64))
            .transpose()?;
        Ok(Self {
            user,
            factor,
            nonce,
            time_ms,
            binding,
            agent,
        })
    }

    /// Encodes the frame, fields in tag order. Values outside their limits are refused.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        use prefix_tag::*;
        let mut w = FrameWriter::new(FrameKind::Prefix);
        utf8(self.user.as_bytes(), "USER", 1, 128)?;
        w.field(USER, self.user.as_bytes());
        if let Factor::Totp(code) = &self.factor {
            check_totp(code.as_bytes())?;
            w.field(TOTP, code.as_bytes());
        }
        w.field(NONCE, &self.nonce);
        w.field(TIME, &self.time_ms.to_be_bytes());
        w.field(BINDING, &self.binding);
        if let Factor::Session(ticket) = &self.factor {
            check_len(ticket, "SESSION", 1, 1024)?;
            w.field(SESSION, ticket);
        }
        if let Some(agent) = &self.agent {
            utf8(agent.as_bytes(), "AGENT", 0, 64)?;
            w.field(AGENT, agent.as_bytes());
        }
        w.finish()
    }
}

/// The server's Verdict (section 4). `Debug` never shows the ticket.
#[derive(Clone, PartialEq, Eq)]
pub struct Verdict {
    /// 0 accepted, else a reject code (see [`Verdict::reject_code`]).
    pub status: u8,
    /// On reject: the reject name in lower case, `: `, a hint for a person.
    pub reason: Option<String>,
    /// The server clock, Unix ms.
    pub server_time_ms: u64,
    /// The correlation id, also in the server's audit record.
    pub reference: [u8; 16],
    /// A session ticket and the Unix ms when it stops working.
    pub session: Option<(Vec<u8>, u64)>,
    /// Seconds to wait before retrying.
    pub retry_after_s: Option<u32>,
}

impl fmt::Debug for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verdict")
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("server_time_ms", &self.server_time_ms)
            .field("reference", &hex::encode(self.reference))
            .field(
                "session",
                &self
                    .session
                    .as_ref()
                    .map(|(t, exp)| (format!("<{} bytes>", t.len()), exp)),
            )
            .field("retry_after_s", &self.retry_after_s)
            .finish()
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Verdict {
    /// An accepting Verdict.
    pub fn accept(
        server_time_ms: u64,
        reference: [u8; 16],
        session: Option<(Vec<u8>, u64)>,
    ) -> Self {
        Self {
            status: 0,
            reason: None,
            server_time_ms,
            reference,
            session,
            retry_after_s: None,
        }
    }

    /// A rejecting Verdict whose REASON is `code`'s name, `: ` and `hint` (control characters
    /// replaced by U+FFFD, cut to 256 bytes).
    /// RETRY_AFTER is kept only for the codes that carry it.
    pub fn reject(
        code: RejectCode,
        hint: &str,
        server_time_ms: u64,
        reference: [u8; 16],
        retry_after_s: Option<u32>,
    ) -> Self {
        // The hint may quote client text (a user name): no control characters go back out.
        let hint: String = hint
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        let reason = format!("{}: {hint}", code.name());
        Self {
            status: code.as_u8(),
            reason: Some(truncate_utf8(&reason, 256).to_owned()),
            server_time_ms,
            reference,
            session: None,
            retry_after_s: retry_after_s.filter(|_| code.has_retry_after()),
        }
    }

    /// Whether the connection was accepted.
    pub fn is_accepted(&self) -> bool {
        self.status == 0
    }

    /// The reject code, or `None` when accepted or the code is unknown to this version.
    pub fn reject_code(&self) -> Option<RejectCode> {
        RejectCode::from_u8(self.status)
    }

    /// Decodes a whole frame.
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_body(split_frame(frame, FrameKind::Verdict)?)
    }

    /// Decodes a Verdict body whose header [`FrameHeader::parse`] already checked.
    pub fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        use verdict_tag::*;
        let f = fields(
            body,
            &[
                STATUS,
                REASON,
                SERVER_TIME,
                REF,
                SESSION,
                SESSION_EXPIRES,
                RETRY_AFTER,
            ],
        )?;
        let [status] = fixed::<1>(required(f[STATUS as usize], "STATUS")?, "STATUS")?;
        let server_time_ms = u64::from_be_bytes(fixed::<8>(
            required(f[SERVER_TIME as usize], "SERVER_TIME")?,
            "SERVER_TIME",
        )?);
        let reference = fixed::<16>(required(f[REF as usize], "REF")?, "REF")?;
        let reason = f[REASON as usize]
            .map(|r| utf8(r, "REASON", 0, 256))
            .transpose()?;
        let session = match (f[SESSION as usize], f[SESSION_EXPIRES as usize]) {
            (Some(t), Some(e)) => Some((
                bytes(t, "SESSION", 1, 1024)?,
                u64::from_be_bytes(fixed::<8>(e, "SESSION_EXPIRES")?),
            )),
            (None, None) => None,
            _ => {
                return Err(DecodeError::malformed(
                    "SESSION and SESSION_EXPIRES come together",
                ));
            }
        };
        let retry_after_s = f[RETRY_AFTER as usize]
            .map(|r| fixed::<4>(r, "RETRY_AFTER").map(u32::from_be_bytes))
            .transpose()?;
        Ok(Self {
            status,
            reason,
            server_time_ms,
            reference,
            session,
            retry_after_s,
        })
    }

    /// Encodes the frame, fields in tag order.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        use verdict_tag::*;
        let mut w = FrameWriter::new(FrameKind::Verdict);
        w.field(STATUS, &[self.status]);
        if let Some(reason) = &self.reason {
            utf8(reason.as_bytes(), "REASON", 0, 256)?;
            w.field(REASON, reason.as_bytes());
        }
        w.field(SERVER_TIME, &self.server_time_ms.to_be_bytes());
        w.field(REF, &self.reference);
        if let Some((ticket, expires)) = &self.session {
            check_len(ticket, "SESSION", 1, 1024)?;
            w.field(SESSION, ticket);
            w.field(SESSION_EXPIRES, &expires.to_be_bytes());
        }
        if let Some(retry) = self.retry_after_s {
            w.field(RETRY_AFTER, &retry.to_be_bytes());
        }
        w.finish()
    }
}
