//! Where the client's one-time codes come from.

use std::fmt;
use std::sync::Arc;

use portcullis_core::{TotpAlgorithm, TotpConfig};
use zeroize::{Zeroize, Zeroizing};

use crate::ClientError;

/// A function that returns a one-time code, or a one-line reason why it cannot.
pub type CodeCallback = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Where the client gets the TOTP code for a connection that carries no session ticket.
///
/// A code is asked for only when a connection needs one: the first connection, and any later
/// one when the session ticket is missing, expired or refused. `Debug` never shows a code or a
/// secret.
///
/// ```
/// use portcullis_client::CodeSource;
/// use portcullis_core::TotpAlgorithm;
///
/// let fixed = CodeSource::fixed("287082");
/// assert_eq!(format!("{fixed:?}"), "CodeSource::Fixed(<redacted>)");
///
/// // RFC 6238 Appendix B: the SHA1 seed "12345678901234567890" in base32, 8 digits.
/// let secret = CodeSource::base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", 8, TotpAlgorithm::Sha1, 30)?;
/// assert_eq!(secret.code_at(59_000)?.as_str(), "94287082");
/// # Ok::<(), portcullis_client::ClientError>(())
/// ```
#[derive(Clone)]
pub enum CodeSource {
    /// One code given up front (for example typed on a command line). The server accepts a
    /// code once, so this serves one connection; later ones ride on the session ticket. When
    /// the server refuses that ticket (MFA_REQUIRED), the code is not sent again: the call
    /// fails with the MFA_REQUIRED status.
    Fixed(String),
    /// The TOTP secret itself: codes are computed for the client clock.
    Secret(TotpConfig),
    /// A function asked for each code (for example a prompt). It runs on tokio's blocking
    /// pool, so it may block. Its error text is reported to the caller: it must hold no secret.
    Callback(CodeCallback),
}

impl CodeSource {
    /// One fixed code, 6 to 8 ASCII digits.
    pub fn fixed(code: impl Into<String>) -> Self {
        Self::Fixed(code.into())
    }

    /// Codes computed from a TOTP secret.
    pub fn secret(config: TotpConfig) -> Self {
        Self::Secret(config)
    }

    /// Codes computed from a base32 TOTP secret (RFC 4648, padding and case optional).
    pub fn base32(
        secret: &str,
        digits: u8,
        algorithm: TotpAlgorithm,
        period: u64,
    ) -> Result<Self, ClientError> {
        TotpConfig::from_base32(secret, digits, algorithm, period)
            .map(Self::Secret)
            .map_err(|e| ClientError::Config(format!("TOTP secret: {e}")))
    }

    /// Codes from a function, asked once per connection that needs a code.
    pub fn callback(f: impl Fn() -> Result<String, String> + Send + Sync + 'static) -> Self {
        Self::Callback(Arc::new(f))
    }

    /// The code this source gives at `now_ms` (Unix milliseconds), checked to be 6 to 8 ASCII
    /// digits. A callback is called right here, on the current thread.
    pub fn code_at(&self, now_ms: u64) -> Result<Zeroizing<String>, ClientError> {
        let code = self.raw_code(now_ms).map_err(ClientError::Code)?;
        check_code(&code).map_err(ClientError::Code)?;
        Ok(code)
    }

    /// The code without the format check.
    pub(crate) fn raw_code(&self, now_ms: u64) -> Result<Zeroizing<String>, String> {
        match self {
            Self::Fixed(code) => Ok(Zeroizing::new(code.clone())),
            Self::Secret(config) => Ok(Zeroizing::new(config.generate(now_ms / 1000))),
            Self::Callback(f) => f().map(Zeroizing::new),
        }
    }
}

/// Checks that a code is 6 to 8 ASCII digits; the error never repeats the code.
pub(crate) fn check_code(code: &str) -> Result<(), String> {
    if (6..=8).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!(
            "the code is not 6 to 8 ASCII digits (it has {} characters)",
            code.chars().count()
        ))
    }
}

impl Drop for CodeSource {
    fn drop(&mut self) {
        if let Self::Fixed(code) = self {
            code.zeroize();
        }
    }
}

impl fmt::Debug for CodeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(_) => f.write_str("CodeSource::Fixed(<redacted>)"),
            Self::Secret(config) => f
                .debug_struct("CodeSource::Secret")
                .field("digits", &config.digits())
                .field("algorithm", &config.algorithm())
                .field("period", &config.period())
                .finish_non_exhaustive(),
            Self::Callback(_) => f.write_str("CodeSource::Callback(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_give_checked_codes() {
        assert_eq!(
            CodeSource::fixed("123456").code_at(0).unwrap().as_str(),
            "123456"
        );
        assert!(matches!(
            CodeSource::fixed("12345").code_at(0),
            Err(ClientError::Code(m)) if !m.contains("12345")
        ));
        assert!(CodeSource::fixed("12a456").code_at(0).is_err());
        let cb = CodeSource::callback(|| Ok("87654321".into()));
        assert_eq!(cb.code_at(0).unwrap().as_str(), "87654321");
        let failing = CodeSource::callback(|| Err("no terminal".into()));
        assert!(matches!(failing.code_at(0), Err(ClientError::Code(m)) if m == "no terminal"));
    }

    #[test]
    fn secret_follows_rfc6238_for_the_given_time() {
        let seed = b"12345678901234567890".to_vec();
        let src = CodeSource::secret(TotpConfig::new(seed, 8, TotpAlgorithm::Sha1, 30).unwrap());
        assert_eq!(src.code_at(59_000).unwrap().as_str(), "94287082");
        assert_eq!(src.code_at(1_111_111_109_000).unwrap().as_str(), "07081804");
        assert!(CodeSource::base32("not base32!", 6, TotpAlgorithm::Sha1, 30).is_err());
    }

    #[test]
    fn debug_redacts() {
        let text = format!("{:?}", CodeSource::fixed("246810"));
        assert!(!text.contains("246810"));
        let b32 = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        let text = format!(
            "{:?}",
            CodeSource::base32(b32, 6, TotpAlgorithm::Sha1, 30).unwrap()
        );
        assert!(!text.contains(b32) && text.contains("digits: 6"));
    }
}
