//! TOTP (RFC 6238) parameters and checks, on top of `totp-rs`.
//!
//! Single use per time step is not decided here: [`TotpConfig::matching_step`] says which step a
//! code belongs to, and the gate accepts it only if that step is later than the last step the
//! registry accepted for the user (PROTOCOL.md section 5, step 4.7).

use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// The HMAC hash of a TOTP secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TotpAlgorithm {
    /// HMAC-SHA1, what most authenticator apps use.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl TotpAlgorithm {
    /// The name used in otpauth URIs and on the command line: `SHA1`, `SHA256`, `SHA512`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
            Self::Sha512 => "SHA512",
        }
    }

    fn to_totp_rs(self) -> totp_rs::Algorithm {
        match self {
            Self::Sha1 => totp_rs::Algorithm::SHA1,
            Self::Sha256 => totp_rs::Algorithm::SHA256,
            Self::Sha512 => totp_rs::Algorithm::SHA512,
        }
    }
}

impl fmt::Display for TotpAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TotpAlgorithm {
    type Err = TotpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "SHA1" => Ok(Self::Sha1),
            "SHA256" => Ok(Self::Sha256),
            "SHA512" => Ok(Self::Sha512),
            _ => Err(TotpError::Algorithm(s.chars().take(32).collect())),
        }
    }
}

/// Why TOTP parameters were refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TotpError {
    /// Digits outside 6..=8.
    #[error("TOTP digits must be 6, 7 or 8, not {0}")]
    Digits(u8),
    /// A secret shorter than 128 bits.
    #[error("a TOTP secret must be at least 16 bytes (128 bits), this one has {0}")]
    SecretTooShort(usize),
    /// A period of zero seconds.
    #[error("the TOTP period must be at least 1 second")]
    Period,
    /// An algorithm name other than SHA1, SHA256, SHA512.
    #[error("unknown TOTP algorithm `{0}`: use SHA1, SHA256 or SHA512")]
    Algorithm(String),
    /// The random source failed while making a secret.
    #[error("the random source failed while making a TOTP secret")]
    Random,
    /// Text that is not RFC 4648 base32.
    #[error("the TOTP secret is not valid base32")]
    Base32,
}

/// A user's TOTP parameters: the shared secret, digits, hash and period.
///
/// The secret is wiped from memory when the value is dropped, and `Debug` never shows it.
///
/// ```
/// use portcullis_core::{TotpAlgorithm, TotpConfig};
/// let totp = TotpConfig::new(b"12345678901234567890".to_vec(), 8, TotpAlgorithm::Sha1, 30).unwrap();
/// assert_eq!(totp.generate(59), "94287082"); // RFC 6238 Appendix B
/// assert_eq!(totp.matching_step("94287082", 59), Some(1));
/// assert_eq!(totp.matching_step("94287082", 200), None);
/// ```
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TotpConfig {
    secret: Vec<u8>,
    #[zeroize(skip)]
    digits: u8,
    #[zeroize(skip)]
    algorithm: TotpAlgorithm,
    #[zeroize(skip)]
    period: u64,
}

impl fmt::Debug for TotpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpConfig")
            .field("secret", &"<redacted>")
            .field("digits", &self.digits)
            .field("algorithm", &self.algorithm)
            .field("period", &self.period)
            .finish()
    }
}

impl TotpConfig {
    /// Default digits (6), as authenticator apps expect.
    pub const DEFAULT_DIGITS: u8 = 6;
    /// Default period in seconds (30).
    pub const DEFAULT_PERIOD: u64 = 30;

    /// Checks and wraps TOTP parameters.
    pub fn new(
        secret: Vec<u8>,
        digits: u8,
        algorithm: TotpAlgorithm,
        period: u64,
    ) -> Result<Self, TotpError> {
        if !(6..=8).contains(&digits) {
            return Err(TotpError::Digits(digits));
        }
        if secret.len() < 16 {
            return Err(TotpError::SecretTooShort(secret.len()));
        }
        if period == 0 {
            return Err(TotpError::Period);
        }
        Ok(Self {
            secret,
            digits,
            algorithm,
            period,
        })
    }

    /// Parameters from a base32 secret (RFC 4648, padding and case optional).
    pub fn from_base32(
        secret: &str,
        digits: u8,
        algorithm: TotpAlgorithm,
        period: u64,
    ) -> Result<Self, TotpError> {
        let cleaned = secret.trim().trim_end_matches('=').to_ascii_uppercase();
        let parsed = totp_rs::Secret::try_from_base32(cleaned).map_err(|_| TotpError::Base32)?;
        Self::new(parsed.as_bytes().to_vec(), digits, algorithm, period)
    }

    /// Parameters with a new random 160-bit secret from `rng`.
    pub fn generate_secret(
        rng: &dyn crate::Random,
        digits: u8,
        algorithm: TotpAlgorithm,
        period: u64,
    ) -> Result<Self, TotpError> {
        let mut secret = vec![0u8; 20];
        rng.fill(&mut secret).map_err(|_| TotpError::Random)?;
        Self::new(secret, digits, algorithm, period)
    }

    /// The raw secret bytes. Handle with care: never log them.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The secret in base32 without padding, as authenticator apps take it.
    pub fn secret_base32(&self) -> String {
        totp_rs::Secret::new(self.secret.clone().into_boxed_slice())
            .to_base32()
            .trim_end_matches('=')
            .to_owned()
    }

    /// Number of digits of a code.
    pub fn digits(&self) -> u8 {
        self.digits
    }

    /// The HMAC hash.
    pub fn algorithm(&self) -> TotpAlgorithm {
        self.algorithm
    }

    /// Length of a time step in seconds.
    pub fn period(&self) -> u64 {
        self.period
    }

    /// The time step that `unix_seconds` falls into.
    pub fn step_at(&self, unix_seconds: u64) -> u64 {
        unix_seconds / self.period
    }

    fn totp(&self, skew: u8) -> totp_rs::Totp {
        totp_rs::Builder::new()
            .with_algorithm(self.algorithm.to_totp_rs())
            .with_digits(self.digits)
            .with_skew(u16::from(skew))
            .with_step_duration(self.period)
            .with_secret(self.secret.clone())
            .build_noncompliant()
    }

    /// The code for the time `unix_seconds`.
    pub fn generate(&self, unix_seconds: u64) -> String {
        self.totp(0).generate(unix_seconds).to_string()
    }

    /// The time step whose code is `code`, looking one step either side of `unix_seconds`, or
    /// `None`. When neighbouring steps happen to share the code, the latest one is returned, so
    /// that a valid code is not mistaken for the earlier, already used step. All three
    /// candidates are always computed and compared in constant time.
    pub fn matching_step(&self, code: &str, unix_seconds: u64) -> Option<u64> {
        use subtle::ConstantTimeEq;
        if code.len() != usize::from(self.digits) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let totp = self.totp(0);
        let origin = self.step_at(unix_seconds);
        let mut found = None;
        for step in origin.saturating_sub(1)..=origin.saturating_add(1) {
            let candidate = totp.generate(step.saturating_mul(self.period)).to_string();
            if bool::from(candidate.as_bytes().ct_eq(code.as_bytes())) {
                found = Some(step);
            }
        }
        found
    }

    /// The `otpauth://totp/` URI that authenticator apps scan.
    pub fn otpauth_uri(&self, issuer: &str, account: &str) -> String {
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        format!(
            "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm={}&digits={}&period={}",
            enc(issuer),
            enc(account),
            self.secret_base32(),
            enc(issuer),
            self.algorithm.name(),
            self.digits,
            self.period
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, with each hash's own seed: 20, 32 and 64 bytes.
    #[test]
    fn rfc6238_appendix_b_vectors() {
        let seed20 = b"12345678901234567890".to_vec();
        let seed32 = b"12345678901234567890123456789012".to_vec();
        let seed64 = b"1234567890123456789012345678901234567890123456789012345678901234".to_vec();
        let cases: [(u64, &str, &str, &str); 6] = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        let sha1 = TotpConfig::new(seed20, 8, TotpAlgorithm::Sha1, 30).unwrap();
        let sha256 = TotpConfig::new(seed32, 8, TotpAlgorithm::Sha256, 30).unwrap();
        let sha512 = TotpConfig::new(seed64, 8, TotpAlgorithm::Sha512, 30).unwrap();
        for (t, c1, c256, c512) in cases {
            assert_eq!(sha1.generate(t), c1, "SHA1 at {t}");
            assert_eq!(sha256.generate(t), c256, "SHA256 at {t}");
            assert_eq!(sha512.generate(t), c512, "SHA512 at {t}");
            let step = t / 30;
            assert_eq!(sha1.matching_step(c1, t), Some(step));
            assert_eq!(sha256.matching_step(c256, t), Some(step));
            assert_eq!(sha512.matching_step(c512, t), Some(step));
        }
    }

    #[test]
    fn a_code_shared_by_neighbouring_steps_belongs_to_the_latest() {
        // With this secret, steps 814519 and 814520 share the code 688480 (about one pair in a
        // million for 6 digits; found by searching the steps from 0).
        let cfg = TotpConfig::new(vec![0x5a; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
        let step = 814_519;
        let code = cfg.generate(step * 30);
        assert_eq!(code, "688480");
        assert_eq!(cfg.generate((step + 1) * 30), code);
        assert_eq!(cfg.matching_step(&code, step * 30), Some(step + 1));
        assert_eq!(cfg.matching_step(&code, (step + 1) * 30), Some(step + 1));
    }

    #[test]
    fn window_is_one_step_either_side() {
        let cfg = TotpConfig::new(vec![7u8; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
        let code = cfg.generate(3000); // step 100
        assert_eq!(cfg.matching_step(&code, 3000 - 30), Some(100));
        assert_eq!(cfg.matching_step(&code, 3000 + 30), Some(100));
        assert_eq!(cfg.matching_step(&code, 3000 - 31), None);
        assert_eq!(cfg.matching_step(&code, 3000 + 60), None);
        assert_eq!(cfg.matching_step("12345", 3000), None);
        assert_eq!(cfg.matching_step("+12345", 3000), None);
    }

    #[test]
    fn parameters_are_checked_and_debug_hides_the_secret() {
        assert_eq!(
            TotpConfig::new(vec![1; 20], 5, TotpAlgorithm::Sha1, 30).unwrap_err(),
            TotpError::Digits(5)
        );
        assert_eq!(
            TotpConfig::new(vec![1; 10], 6, TotpAlgorithm::Sha1, 30).unwrap_err(),
            TotpError::SecretTooShort(10)
        );
        assert!(TotpConfig::from_base32("not base32!", 6, TotpAlgorithm::Sha1, 30).is_err());
        let cfg = TotpConfig::new(vec![0x42; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
        let b32 = cfg.secret_base32();
        let back =
            TotpConfig::from_base32(&b32.to_lowercase(), 6, TotpAlgorithm::Sha1, 30).unwrap();
        assert_eq!(back.secret(), cfg.secret());
        assert!(!format!("{cfg:?}").contains(&b32));
        assert!(
            cfg.otpauth_uri("Portcullis", "alice")
                .starts_with("otpauth://totp/Portcullis:alice?secret=")
        );
    }
}
