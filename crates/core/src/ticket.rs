//! Session tickets (PROTOCOL.md section 6): sealed by the server with AES-256-GCM, opaque to the
//! client, bound to a user and a device fingerprint, expiring and revocable.
//!
//! Layout of a ticket: `01` (version) | 12-byte AEAD nonce | ciphertext | 16-byte tag. The
//! version byte is the additional data. The plaintext is: session id (16) | fingerprint (32) |
//! TOTP time in Unix ms (8) | expiry in Unix ms (8) | user length (1) | user.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::{DeviceFingerprint, Random, RandomError};

const VERSION: u8 = 1;
const FIXED_PLAINTEXT: usize = 16 + 32 + 8 + 8 + 1;
const TAG_LEN: usize = 16;

/// The id of a session, 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// What a ticket says: the session, who earned it, from which device, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    /// The session id.
    pub id: SessionId,
    /// The user the TOTP check was made for.
    pub user: String,
    /// The device the TOTP check was made from.
    pub fingerprint: DeviceFingerprint,
    /// When the TOTP check succeeded, Unix ms.
    pub totp_time_ms: u64,
    /// When the ticket stops working, Unix ms.
    pub expires_ms: u64,
}

/// Why a ticket could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The random source failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The user name is longer than 255 bytes.
    #[error("the user name is too long for a session ticket")]
    UserTooLong,
    /// The key bytes are not a 32-byte AES-256 key.
    #[error("a ticket key is exactly 32 bytes")]
    KeyLength,
    /// Sealing failed.
    #[error("sealing the session ticket failed")]
    Seal,
}

/// The server's ticket key (AES-256-GCM). Tickets sealed under one key open only under it.
///
/// ```
/// use portcullis_core::{DeviceFingerprint, SessionClaims, SessionId, SystemRandom, TicketKey};
/// let rng = SystemRandom::new();
/// let key = TicketKey::generate(&rng).unwrap();
/// let claims = SessionClaims {
///     id: SessionId([9; 16]),
///     user: "alice".into(),
///     fingerprint: DeviceFingerprint::from_bytes([1; 32]),
///     totp_time_ms: 1_000,
///     expires_ms: 3_601_000,
/// };
/// let ticket = key.seal(&claims, &rng).unwrap();
/// assert_eq!(key.open(&ticket), Some(claims));
/// assert_eq!(TicketKey::generate(&rng).unwrap().open(&ticket), None);
/// ```
pub struct TicketKey {
    key: LessSafeKey,
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKey(<redacted>)")
    }
}

impl TicketKey {
    /// A key from 32 secret bytes (for example read from a key file).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TicketError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| TicketError::KeyLength)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// A new random key.
    pub fn generate(rng: &dyn Random) -> Result<Self, TicketError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill(bytes.as_mut())?;
        Self::from_bytes(bytes.as_ref())
    }

    /// Seals claims into a ticket.
    pub fn seal(&self, claims: &SessionClaims, rng: &dyn Random) -> Result<Vec<u8>, TicketError> {
        let user = claims.user.as_bytes();
        let user_len = u8::try_from(user.len()).map_err(|_| TicketError::UserTooLong)?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + FIXED_PLAINTEXT + user.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(&claims.id.0);
        out.extend_from_slice(claims.fingerprint.as_bytes());
        out.extend_from_slice(&claims.totp_time_ms.to_be_bytes());
        out.extend_from_slice(&claims.expires_ms.to_be_bytes());
        out.push(user_len);
        out.extend_from_slice(user);
        let mut body = out.split_off(start);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([VERSION]),
                &mut body,
            )
            .map_err(|_| TicketError::Seal)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a ticket: the claims if it was sealed under this key and not altered, else `None`.
    /// Expiry and revocation are the caller's checks.
    pub fn open(&self, ticket: &[u8]) -> Option<SessionClaims> {
        let (&version, rest) = ticket.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN + FIXED_PLAINTEXT + TAG_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from([VERSION]), &mut buf)
            .ok()?;
        if plain.len() < FIXED_PLAINTEXT {
            return None;
        }
        let (fixed, user) = plain.split_at(FIXED_PLAINTEXT);
        if usize::from(fixed[FIXED_PLAINTEXT - 1]) != user.len() {
            return None;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&fixed[..16]);
        let mut fp = [0u8; 32];
        fp.copy_from_slice(&fixed[16..48]);
        let totp_time_ms = u64::from_be_bytes(fixed[48..56].try_into().ok()?);
        let expires_ms = u64::from_be_bytes(fixed[56..64].try_into().ok()?);
        Some(SessionClaims {
            id: SessionId(id),
            user: String::from_utf8(user.to_vec()).ok()?,
            fingerprint: DeviceFingerprint::from_bytes(fp),
            totp_time_ms,
            expires_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SystemRandom;

    fn claims() -> SessionClaims {
        SessionClaims {
            id: SessionId([3; 16]),
            user: "ü".repeat(64),
            fingerprint: DeviceFingerprint::from_bytes([4; 32]),
            totp_time_ms: 5,
            expires_ms: 6,
        }
    }

    #[test]
    fn any_altered_byte_fails_to_open() {
        let rng = SystemRandom::new();
        let key = TicketKey::generate(&rng).unwrap();
        let ticket = key.seal(&claims(), &rng).unwrap();
        assert!(ticket.len() <= 1024);
        assert_eq!(key.open(&ticket), Some(claims()));
        for i in 0..ticket.len() {
            let mut t = ticket.clone();
            t[i] ^= 0x01;
            assert_eq!(key.open(&t), None, "byte {i}");
        }
        assert_eq!(key.open(&ticket[..ticket.len() - 1]), None);
        assert_eq!(key.open(&[]), None);
    }

    #[test]
    fn long_users_and_bad_keys_are_refused() {
        let rng = SystemRandom::new();
        let key = TicketKey::generate(&rng).unwrap();
        let mut c = claims();
        c.user = "x".repeat(256);
        assert_eq!(key.seal(&c, &rng), Err(TicketError::UserTooLong));
        assert_eq!(
            TicketKey::from_bytes(&[0; 31]).unwrap_err(),
            TicketError::KeyLength
        );
    }
}
