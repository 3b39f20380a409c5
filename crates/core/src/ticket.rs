//! Session tickets (PROTOCOL.md section 6): sealed by the server with AES-256-GCM, opaque to the
//! client, bound to a user and a device fingerprint, expiring and revocable.
//!
//! Layout of a ticket: `02` (version) | 8-byte key id | 12-byte AEAD nonce | ciphertext |
//! 16-byte tag. The version byte and the key id are the additional data. The plaintext is:
//! session id (16) | fingerprint (32) | TOTP time in Unix ms (8) | expiry in Unix ms (8) | user
//! length (1) | user. Tickets of version `01` (no key id; the version byte alone is the
//! additional data) were sealed before keys rotated; they are still opened, by trying each key
//! of the ring.
//!
//! The server seals under the current key of a [`TicketRing`] and opens under the key the ticket
//! names: the current one or a retired one, until no ticket sealed under it can still be valid.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest;
use zeroize::Zeroizing;

use crate::{DeviceFingerprint, Random, RandomError};

/// Tickets sealed before key ids: `01` | nonce | ciphertext | tag.
const VERSION_1: u8 = 1;
/// Tickets that name their key: `02` | key id | nonce | ciphertext | tag.
const VERSION: u8 = 2;
/// Length of a key id.
const KEY_ID_LEN: usize = 8;
/// What the key id is derived from, besides the key.
const KEY_ID_LABEL: &[u8] = b"portcullis ticket key id\0";
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

/// The id of a ticket key: the first 8 bytes of SHA-256 over a fixed label and the key. It is
/// written in every ticket, so that the server knows which key of its ring opens it; it tells
/// nothing of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketKeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for TicketKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TicketKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketKeyId({self})")
    }
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
    id: TicketKeyId,
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketKey({}, <redacted>)", self.id)
    }
}

impl TicketKey {
    /// A key from 32 secret bytes (for example read from a key file).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TicketError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| TicketError::KeyLength)?;
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_LABEL);
        ctx.update(bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&ctx.finish().as_ref()[..KEY_ID_LEN]);
        Ok(Self {
            key: LessSafeKey::new(unbound),
            id: TicketKeyId(id),
        })
    }

    /// The key's id, written in every ticket it seals.
    pub fn id(&self) -> TicketKeyId {
        self.id
    }

    /// The id of the key a ticket names (`None` for a ticket of version `01`, or bytes that are
    /// no ticket). Tells nothing of whether the ticket opens.
    pub fn id_of(ticket: &[u8]) -> Option<TicketKeyId> {
        match ticket.split_first() {
            Some((&VERSION, rest)) if rest.len() >= KEY_ID_LEN => {
                let mut id = [0u8; KEY_ID_LEN];
                id.copy_from_slice(&rest[..KEY_ID_LEN]);
                Some(TicketKeyId(id))
            }
            _ => None,
        }
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
        let mut out =
            Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + FIXED_PLAINTEXT + user.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.id.0);
        let aad_len = out.len();
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
                Aad::from(&out[..aad_len]),
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
        let aad_len = match version {
            VERSION => {
                if rest.get(..KEY_ID_LEN)? != self.id.0 {
                    return None;
                }
                1 + KEY_ID_LEN
            }
            VERSION_1 => 1,
            _ => return None,
        };
        let (aad, rest) = ticket.split_at(aad_len);
        if rest.len() < NONCE_LEN + FIXED_PLAINTEXT + TAG_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
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

/// The server's ticket keys: the current one, which seals every new ticket, and the keys it
/// replaced, which still open the tickets they sealed until those can no longer be valid.
///
/// A key retired at `r` opens tickets until `r + keep` (`keep` = the longest ticket lifetime,
/// [`TicketRing::open`]): a ticket sealed before `r` expires by then, so the key is dropped
/// without cutting any session short.
///
/// ```
/// use portcullis_core::{DeviceFingerprint, SessionClaims, SessionId, SystemRandom, TicketKey, TicketRing};
/// let rng = SystemRandom::new();
/// let claims = SessionClaims {
///     id: SessionId([9; 16]),
///     user: "alice".into(),
///     fingerprint: DeviceFingerprint::from_bytes([1; 32]),
///     totp_time_ms: 1_000,
///     expires_ms: 3_601_000,
/// };
/// let old = TicketKey::generate(&rng).unwrap();
/// let ticket = old.seal(&claims, &rng).unwrap();
/// // Rotated at t = 2 s: the old key is retired, and kept for one hour of tickets.
/// let ring = TicketRing::new(TicketKey::generate(&rng).unwrap()).with_retired(old, 2_000);
/// assert_eq!(ring.open(&ticket, 3_000, 3_600_000), Some(claims.clone()));
/// // New tickets are sealed under the new key.
/// let new = ring.seal(&claims, &rng).unwrap();
/// assert_eq!(TicketKey::id_of(&new), Some(ring.current().id()));
/// // An hour after the rotation the old key is gone.
/// assert_eq!(ring.open(&ticket, 3_602_000, 3_600_000), None);
/// ```
#[derive(Debug)]
pub struct TicketRing {
    current: TicketKey,
    /// Keys replaced, with when (Unix ms), newest first.
    retired: Vec<(TicketKey, u64)>,
}

impl From<TicketKey> for TicketRing {
    fn from(current: TicketKey) -> Self {
        Self::new(current)
    }
}

impl TicketRing {
    /// A ring of one key.
    pub fn new(current: TicketKey) -> Self {
        Self {
            current,
            retired: Vec::new(),
        }
    }

    /// Adds a key that was replaced at `retired_ms` (Unix ms). A key with the current key's id
    /// is left out.
    pub fn with_retired(mut self, key: TicketKey, retired_ms: u64) -> Self {
        if key.id != self.current.id && !self.retired.iter().any(|(k, _)| k.id == key.id) {
            self.retired.push((key, retired_ms));
            self.retired.sort_by_key(|k| std::cmp::Reverse(k.1));
        }
        self
    }

    /// The key that seals new tickets.
    pub fn current(&self) -> &TicketKey {
        &self.current
    }

    /// The retired keys and when each was replaced (Unix ms), newest first.
    pub fn retired(&self) -> impl Iterator<Item = (TicketKeyId, u64)> + '_ {
        self.retired.iter().map(|(k, at)| (k.id, *at))
    }

    /// Seals claims under the current key.
    pub fn seal(&self, claims: &SessionClaims, rng: &dyn Random) -> Result<Vec<u8>, TicketError> {
        self.current.seal(claims, rng)
    }

    /// Opens a ticket at `now_ms` under the key it names: the current key, or a key retired
    /// less than `keep_ms` ago (the longest lifetime a ticket is given). A ticket of version
    /// `01` is tried under each of those keys. Expiry and revocation are the caller's checks.
    pub fn open(&self, ticket: &[u8], now_ms: u64, keep_ms: u64) -> Option<SessionClaims> {
        let kept = self
            .retired
            .iter()
            .filter(|(_, at)| now_ms < at.saturating_add(keep_ms))
            .map(|(key, _)| key);
        let mut keys = std::iter::once(&self.current).chain(kept);
        match TicketKey::id_of(ticket) {
            Some(id) => keys.find(|k| k.id == id)?.open(ticket),
            None => keys.find_map(|k| k.open(ticket)),
        }
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

    /// A ticket as version `01` sealed it: the version byte alone is the additional data.
    fn seal_version_1(key: &TicketKey, claims: &SessionClaims) -> Vec<u8> {
        let v2 = key.seal(claims, &SystemRandom::new()).unwrap();
        let plain = key.open(&v2).unwrap();
        assert_eq!(&plain, claims);
        let mut body = Vec::new();
        body.extend_from_slice(&claims.id.0);
        body.extend_from_slice(claims.fingerprint.as_bytes());
        body.extend_from_slice(&claims.totp_time_ms.to_be_bytes());
        body.extend_from_slice(&claims.expires_ms.to_be_bytes());
        body.push(u8::try_from(claims.user.len()).unwrap());
        body.extend_from_slice(claims.user.as_bytes());
        let nonce = [7u8; NONCE_LEN];
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([VERSION_1]),
                &mut body,
            )
            .unwrap();
        let mut out = vec![VERSION_1];
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn tickets_name_their_key_and_the_ring_opens_them_while_the_key_is_kept() {
        let rng = SystemRandom::new();
        let old = TicketKey::generate(&rng).unwrap();
        let old_id = old.id();
        let ticket = old.seal(&claims(), &rng).unwrap();
        assert_eq!(TicketKey::id_of(&ticket), Some(old_id));
        let legacy = seal_version_1(&old, &claims());
        assert_eq!(TicketKey::id_of(&legacy), None);
        let new = TicketKey::generate(&rng).unwrap();
        assert_ne!(new.id(), old_id);
        // The new key alone opens neither.
        assert_eq!(new.open(&ticket), None);
        assert_eq!(new.open(&legacy), None);
        let ring = TicketRing::new(new).with_retired(old, 10_000);
        assert_eq!(ring.retired().collect::<Vec<_>>(), vec![(old_id, 10_000)]);
        for t in [&ticket, &legacy] {
            assert_eq!(ring.open(t, 10_000, 1_000), Some(claims()));
            assert_eq!(ring.open(t, 10_999, 1_000), Some(claims()));
            // Dropped once no ticket sealed under it can be valid.
            assert_eq!(ring.open(t, 11_000, 1_000), None);
        }
        let sealed = ring.seal(&claims(), &rng).unwrap();
        assert_eq!(TicketKey::id_of(&sealed), Some(ring.current().id()));
        assert_eq!(ring.open(&sealed, u64::MAX, 0), Some(claims()));
        // A ticket naming another key than the one that sealed it does not open.
        let mut renamed = ticket.clone();
        renamed[1..9].copy_from_slice(&ring.current().id().0);
        assert_eq!(ring.open(&renamed, 10_000, 1_000), None);
        assert!(format!("{:?}", ring.current()).ends_with("<redacted>)"));
    }

    #[test]
    fn a_retired_key_equal_to_the_current_one_is_left_out() {
        let rng = SystemRandom::new();
        let bytes = [5u8; 32];
        let ring = TicketRing::new(TicketKey::from_bytes(&bytes).unwrap())
            .with_retired(TicketKey::from_bytes(&bytes).unwrap(), 1)
            .with_retired(TicketKey::generate(&rng).unwrap(), 2)
            .with_retired(TicketKey::generate(&rng).unwrap(), 3);
        let at: Vec<u64> = ring.retired().map(|(_, at)| at).collect();
        assert_eq!(at, vec![3, 2]);
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
