//! [`FrameReader`]: one frame gathered from bytes as they arrive, sans I/O.

use zeroize::Zeroizing;

use super::{DecodeError, FrameHeader, FrameKind, HEADER_LEN};

/// Gathers exactly one frame of a kind (PROTOCOL.md section 2) from bytes as they arrive: the
/// 7-byte header first, checked as soon as it is complete (a length over the limit is refused
/// before any body byte is asked for), then exactly the body it announces. It never asks for a
/// byte past the frame, so whatever follows (HTTP/2 behind a Prefix, the server's bytes behind a
/// Verdict) stays unread. Its buffer is wiped when dropped: a Prefix carries a code or a ticket.
///
/// Read into [`FrameReader::unfilled`] (exactly the bytes still needed) and report with
/// [`FrameReader::filled`]; every reader of frames in Portcullis (the server's acceptor, the
/// client's stream, `portcullis doctor`, the tests) does.
///
/// ```
/// use portcullis_core::codec::{FrameKind, FrameReader, Progress};
///
/// let frame = b"PCS1\x02\x00\x03abc";
/// let mut reader = FrameReader::new(FrameKind::Verdict);
/// let mut input = &frame[..];
/// loop {
///     // Two bytes at a time, as a slow network would give them.
///     let want = reader.unfilled().len().min(2);
///     reader.unfilled()[..want].copy_from_slice(&input[..want]);
///     input = &input[want..];
///     if reader.filled(want).unwrap() == Progress::Done {
///         break;
///     }
/// }
/// assert_eq!(reader.body(), b"abc");
/// assert_eq!(reader.frame(), &frame[..]);
/// ```
#[derive(Debug)]
pub struct FrameReader {
    kind: FrameKind,
    buf: Zeroizing<Vec<u8>>,
    filled: usize,
    header: Option<FrameHeader>,
}

/// Where a [`FrameReader`] stands after bytes came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed: read into [`FrameReader::unfilled`] again.
    More,
    /// The frame is complete.
    Done,
}

impl FrameReader {
    /// A reader of one frame of `kind`.
    pub fn new(kind: FrameKind) -> Self {
        Self {
            kind,
            buf: Zeroizing::new(vec![0; HEADER_LEN]),
            filled: 0,
            header: None,
        }
    }

    /// The bytes the frame still needs, to be filled by the next read (empty once the frame is
    /// complete). Never longer than what is left of the frame.
    pub fn unfilled(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Records that the first `n` bytes of [`FrameReader::unfilled`] were filled. A header that
    /// fails its checks is the error; `n` beyond what was asked for is a caller's bug and is
    /// taken as what was asked for.
    pub fn filled(&mut self, n: usize) -> Result<Progress, DecodeError> {
        self.filled = (self.filled + n).min(self.buf.len());
        if self.filled < self.buf.len() {
            return Ok(Progress::More);
        }
        if self.header.is_none() {
            let bytes: &[u8; HEADER_LEN] = self.buf[..HEADER_LEN]
                .try_into()
                .map_err(|_| DecodeError::malformed("the frame header is incomplete"))?;
            let header = FrameHeader::parse(bytes, self.kind)?;
            self.header = Some(header);
            if header.body_len > 0 {
                self.buf.resize(HEADER_LEN + header.body_len, 0);
                return Ok(Progress::More);
            }
        }
        Ok(Progress::Done)
    }

    /// Whether the frame is complete.
    pub fn is_done(&self) -> bool {
        self.header.is_some() && self.filled == self.buf.len()
    }

    /// The header, once its 7 bytes are in and checked.
    pub fn header(&self) -> Option<FrameHeader> {
        self.header
    }

    /// The bytes read so far: the whole frame (header and body) once it is complete.
    pub fn frame(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// The body read so far: all of it once the frame is complete.
    pub fn body(&self) -> &[u8] {
        self.buf.get(HEADER_LEN..self.filled).unwrap_or(&[])
    }

    /// The frame's bytes, wiped when the returned buffer is dropped.
    pub fn into_frame(self) -> Zeroizing<Vec<u8>> {
        let mut buf = self.buf;
        buf.truncate(self.filled);
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(
        reader: &mut FrameReader,
        mut input: &[u8],
        step: usize,
    ) -> Result<Progress, DecodeError> {
        loop {
            let want = reader.unfilled().len().min(step).min(input.len());
            if want == 0 {
                return Ok(Progress::More);
            }
            reader.unfilled()[..want].copy_from_slice(&input[..want]);
            input = &input[want..];
            if reader.filled(want)? == Progress::Done {
                return Ok(Progress::Done);
            }
        }
    }

    #[test]
    fn a_frame_in_any_pieces_is_read_whole_and_never_past_its_end() {
        let mut frame = b"PCS1\x01\x00\x05hello".to_vec();
        frame.extend_from_slice(b"PRI * HTTP/2.0");
        for step in [1, 2, 3, 7, 12, 100] {
            let mut reader = FrameReader::new(FrameKind::Prefix);
            assert_eq!(feed(&mut reader, &frame, step).unwrap(), Progress::Done);
            assert!(reader.is_done());
            assert_eq!(reader.body(), b"hello");
            assert_eq!(reader.frame(), &frame[..12]);
            assert!(
                reader.unfilled().is_empty(),
                "nothing past the frame is asked for"
            );
            assert_eq!(&reader.into_frame()[..], &frame[..12]);
        }
    }

    #[test]
    fn an_empty_body_is_done_with_the_header() {
        let mut reader = FrameReader::new(FrameKind::Verdict);
        reader.unfilled().copy_from_slice(b"PCS1\x02\x00\x00");
        assert_eq!(reader.filled(HEADER_LEN).unwrap(), Progress::Done);
        assert_eq!(reader.body(), b"");
    }

    #[test]
    fn a_bad_header_is_refused_before_any_body_byte() {
        for (bytes, kind) in [
            (&b"PCS1\x01\xff\xff"[..], FrameKind::Prefix),
            (b"PCS2\x01\x00\x01", FrameKind::Prefix),
            (b"PCS1\x02\x00\x01", FrameKind::Prefix),
            (b"HTTP/1.", FrameKind::Verdict),
        ] {
            let mut reader = FrameReader::new(kind);
            reader.unfilled().copy_from_slice(bytes);
            assert!(reader.filled(HEADER_LEN).is_err(), "{bytes:?}");
            assert_eq!(reader.header(), None);
            assert_eq!(reader.unfilled().len(), 0, "the buffer never grew");
        }
    }
}
