//! Device fingerprints: the SHA-256 of a certificate's SubjectPublicKeyInfo.

use std::fmt;
use std::str::FromStr;

/// The identity of a device: SHA-256 of the DER of the leaf certificate's
/// SubjectPublicKeyInfo (PROTOCOL.md section 1).
///
/// Its text form is `sha256:` followed by 64 lowercase hex digits. A certificate renewed with
/// the same key keeps its fingerprint; a new key is a new device.
///
/// ```
/// use portcullis_core::DeviceFingerprint;
/// let fp = DeviceFingerprint::of_spki(b"not really DER, but any bytes hash");
/// let text = fp.to_string();
/// assert!(text.starts_with("sha256:") && text.len() == 71);
/// assert_eq!(text.parse::<DeviceFingerprint>().unwrap(), fp);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceFingerprint([u8; 32]);

impl DeviceFingerprint {
    /// Wraps the 32 bytes of a SHA-256 digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Hashes the DER of a SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for DeviceFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text given to [`DeviceFingerprint::from_str`] is not `sha256:` and 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a device fingerprint is `sha256:` followed by 64 lowercase hex digits")]
pub struct FingerprintParseError;

impl FromStr for DeviceFingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix("sha256:").ok_or(FingerprintParseError)?;
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(FingerprintParseError);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| FingerprintParseError)?;
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_upper_case_and_wrong_length() {
        let fp = DeviceFingerprint::from_bytes([0xab; 32]);
        let text = fp.to_string();
        assert_eq!(text.parse::<DeviceFingerprint>(), Ok(fp));
        assert!(text.to_uppercase().parse::<DeviceFingerprint>().is_err());
        assert!(text[..70].parse::<DeviceFingerprint>().is_err());
        assert!(text[7..].parse::<DeviceFingerprint>().is_err());
    }
}
