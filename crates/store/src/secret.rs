//! How TOTP secrets are written to and read from the `users.totp_secret` column, and the key
//! that seals them.
//!
//! Every read and write of a secret goes through [`Sealer::seal`] and [`Sealer::open`]. The
//! column holds a format byte followed by the payload:
//!
//! | format | payload                                         | written by                       |
//! |--------|-------------------------------------------------|----------------------------------|
//! | `0x01` | 12-byte nonce, AES-256-GCM ciphertext, 16-byte tag | a registry opened with a key  |
//! | `0x00` | the raw secret                                  | a registry opened without a key  |
//!
//! The additional authenticated data of a sealed secret is the user's name, so a sealed secret
//! copied into another user's row does not open. Each secret gets a fresh random nonce from the
//! system's random generator; with 96-bit nonces, a registry may seal billions of secrets under
//! one key before a repeated nonce becomes a concern.
//!
//! A registry opened with a key refuses unsealed (`0x00`) secrets: without the key, whoever can
//! write to the file cannot plant a secret of their choosing.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::StoreError;

/// Format byte of a secret stored as it is.
const FORMAT_PLAIN: u8 = 0x00;
/// Format byte of a secret sealed with AES-256-GCM.
pub(crate) const FORMAT_AES_256_GCM: u8 = 0x01;
/// Bytes a sealed secret takes besides the secret itself: format, nonce, tag.
const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + 16;

/// The 32-byte key that seals the TOTP secrets of a registry (AES-256-GCM).
///
/// It is kept in a file of its own, beside the registry but never inside it: a copy of the
/// registry file alone does not give away the secrets. The bytes are wiped from memory when the
/// key is dropped, and `Debug` does not show them.
///
/// ```
/// use portcullis_store::SecretKey;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("registry.key");
/// SecretKey::create(&path).unwrap();
/// let key = SecretKey::load(&path).unwrap();
/// assert_eq!(format!("{key:?}"), "SecretKey(<redacted>)");
/// assert!(SecretKey::create(&path).is_err()); // never overwritten
/// ```
pub struct SecretKey {
    bytes: Zeroizing<[u8; SecretKey::LEN]>,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// The length of a key, and of a key file, in bytes.
    pub const LEN: usize = crate::error::KEY_LEN;

    /// A key from its bytes (for keys kept elsewhere than in a file). Wipe your copy.
    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// A new random key from the system's random generator.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        let mut bytes = Zeroizing::new([0u8; Self::LEN]);
        SystemRandom::new().fill(bytes.as_mut())?;
        Ok(Self { bytes })
    }

    /// Loads the key file at `path`.
    ///
    /// The file must hold exactly [`SecretKey::LEN`] bytes and, on Unix, must not be readable or
    /// writable by the group or by others ([`StoreError::KeyExposed`] names the `chmod` that
    /// fixes it). A missing file is [`StoreError::KeyMissing`].
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::KeyMissing {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(StoreError::io(path, e)),
        };
        // The checks look at the file that was opened, not at whatever the path names later.
        let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
        if !meta.is_file() {
            return Err(StoreError::io(
                path,
                io::Error::other("not a regular file; a registry key file was expected"),
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(StoreError::KeyExposed {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let wrong_length = |len: u64| StoreError::KeyLength {
            path: path.to_owned(),
            len,
        };
        if meta.len() != Self::LEN as u64 {
            return Err(wrong_length(meta.len()));
        }
        let mut bytes = Zeroizing::new([0u8; Self::LEN]);
        file.read_exact(bytes.as_mut()).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                wrong_length(0)
            } else {
                StoreError::io(path, e)
            }
        })?;
        // The file may have grown since it was measured.
        let mut probe = [0u8; 1];
        if file.read(&mut probe).map_err(|e| StoreError::io(path, e))? != 0 {
            return Err(wrong_length(Self::LEN as u64 + 1));
        }
        Ok(Self { bytes })
    }

    /// Writes a new random key to `path`, readable and writable by its owner only (mode 0600 on
    /// Unix), and returns it. Refuses a file that exists ([`StoreError::AlreadyExists`]): a key
    /// file overwritten is every secret sealed under it lost.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        let key = Self::generate().map_err(|_| {
            StoreError::io(path, io::Error::other("the system random generator failed"))
        })?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                StoreError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                StoreError::io(path, e)
            }
        })?;
        let written = file
            .write_all(key.bytes.as_ref())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            let _ = fs::remove_file(path);
            return Err(StoreError::io(path, e));
        }
        Ok(key)
    }
}

/// Why a stored secret could not be read or a secret could not be sealed. The messages never
/// contain secret bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The tag did not verify: another key, another user's row, or damaged bytes.
    #[error("wrong registry key or corrupt row")]
    WrongKeyOrCorrupt,
    /// A sealed secret met a registry opened without a key.
    #[error("it is sealed, and the registry was opened without its key")]
    NoKey,
    /// An unsealed secret met a registry opened with a key.
    #[error("it is stored unsealed, which a registry opened with a key refuses")]
    Unsealed,
    /// A format byte this build does not know.
    #[error("unknown storage format {0:#04x}")]
    UnknownFormat(u8),
    /// Nothing stored at all.
    #[error("the stored value is empty")]
    Empty,
    /// The system's random generator failed to give a nonce.
    #[error("the system random generator failed")]
    Random,
}

/// Seals and opens the secrets of one registry: with AES-256-GCM under its key, or, for a
/// registry opened without a key, not at all. Every backend that stores TOTP secrets (SQLite
/// here, PostgreSQL in `portcullis-postgres`) seals and opens them with this, so that the
/// stored bytes are the same wherever they live.
///
/// ```
/// use portcullis_store::{SecretKey, Sealer};
///
/// let sealer = Sealer::new(Some(SecretKey::from_bytes([7; 32]))).unwrap();
/// let stored = sealer.seal("alice", b"0123456789abcdef").unwrap();
/// assert_eq!(sealer.open("alice", stored.clone()).unwrap(), b"0123456789abcdef");
/// assert!(sealer.open("bob", stored).is_err()); // sealed for alice only
/// ```
pub struct Sealer {
    inner: Inner,
}

enum Inner {
    /// No key: secrets are stored as they are.
    Plain,
    /// Secrets are sealed under this key.
    Aes256Gcm {
        /// ring's expanded key. ring does not wipe it on drop; it lives as long as the registry.
        key: Box<LessSafeKey>,
        rng: SystemRandom,
    },
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

/// What [`Sealer::check_key`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// A stored secret opened under the key (or there was nothing to try).
    Opens,
    /// No stored secret opened, and at least one failed its authentication tag: another key.
    WrongKey,
}

impl Sealer {
    /// A sealer for a registry opened with `key`, or without a key.
    pub fn new(key: Option<SecretKey>) -> Result<Self, ring::error::Unspecified> {
        Ok(Self {
            inner: match key {
                None => Inner::Plain,
                Some(key) => Inner::Aes256Gcm {
                    key: Box::new(LessSafeKey::new(UnboundKey::new(
                        &AES_256_GCM,
                        key.bytes.as_ref(),
                    )?)),
                    rng: SystemRandom::new(),
                },
            },
        })
    }

    /// A sealer without a key: secrets are stored as they are (tests and examples).
    pub fn plain() -> Self {
        Self {
            inner: Inner::Plain,
        }
    }

    /// Whether secrets are sealed under a key.
    pub fn is_sealed(&self) -> bool {
        matches!(self.inner, Inner::Aes256Gcm { .. })
    }

    /// Whether the key is the registry's: tries `stored` secrets (user, stored bytes) in turn
    /// until one opens. One that opens is enough (others may be damaged); a secret stored
    /// unsealed or in an unknown format is not counted either way; none at all is
    /// [`KeyCheck::Opens`].
    pub fn check_key<I>(&self, stored: I) -> KeyCheck
    where
        I: IntoIterator<Item = (String, Zeroizing<Vec<u8>>)>,
    {
        let mut refused = false;
        for (name, bytes) in stored {
            match self.open(&name, bytes) {
                Ok(secret) => {
                    drop(Zeroizing::new(secret));
                    return KeyCheck::Opens;
                }
                Err(SecretError::WrongKeyOrCorrupt) => refused = true,
                Err(_) => {}
            }
        }
        if refused {
            KeyCheck::WrongKey
        } else {
            KeyCheck::Opens
        }
    }

    /// The bytes to store for `user`'s `secret`.
    pub fn seal(&self, user: &str, secret: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        match &self.inner {
            Inner::Plain => {
                let mut stored = Zeroizing::new(Vec::with_capacity(1 + secret.len()));
                stored.push(FORMAT_PLAIN);
                stored.extend_from_slice(secret);
                Ok(stored)
            }
            Inner::Aes256Gcm { key, rng } => {
                let mut nonce = [0u8; NONCE_LEN];
                rng.fill(&mut nonce).map_err(|_| SecretError::Random)?;
                // The capacity covers the tag, so the buffer holding the plaintext is never
                // reallocated (which would leave a copy behind); it is wiped when dropped.
                let mut stored = Zeroizing::new(Vec::with_capacity(SEAL_OVERHEAD + secret.len()));
                stored.push(FORMAT_AES_256_GCM);
                stored.extend_from_slice(&nonce);
                stored.extend_from_slice(secret);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(user.as_bytes()),
                        &mut stored[1 + NONCE_LEN..],
                    )
                    .map_err(|_| SecretError::WrongKeyOrCorrupt)?;
                stored.extend_from_slice(tag.as_ref());
                Ok(stored)
            }
        }
    }

    /// `user`'s secret from the stored bytes. The plaintext is decrypted in place, in a buffer
    /// that is wiped on every error path; on success it is handed over without a copy.
    pub fn open(&self, user: &str, mut stored: Zeroizing<Vec<u8>>) -> Result<Vec<u8>, SecretError> {
        let format = *stored.first().ok_or(SecretError::Empty)?;
        match (format, &self.inner) {
            (FORMAT_PLAIN, Inner::Plain) => {
                stored.remove(0);
                Ok(std::mem::take(&mut *stored))
            }
            (FORMAT_PLAIN, Inner::Aes256Gcm { .. }) => Err(SecretError::Unsealed),
            (FORMAT_AES_256_GCM, Inner::Plain) => Err(SecretError::NoKey),
            (FORMAT_AES_256_GCM, Inner::Aes256Gcm { key, .. }) => {
                if stored.len() < SEAL_OVERHEAD {
                    return Err(SecretError::WrongKeyOrCorrupt);
                }
                let nonce = Nonce::try_assume_unique_for_key(&stored[1..1 + NONCE_LEN])
                    .map_err(|_| SecretError::WrongKeyOrCorrupt)?;
                // Ciphertext and tag to the front of the buffer, then open them in place.
                stored.drain(..1 + NONCE_LEN);
                let plain_len = key
                    .open_in_place(nonce, Aad::from(user.as_bytes()), &mut stored[..])
                    .map_err(|_| SecretError::WrongKeyOrCorrupt)?
                    .len();
                stored.truncate(plain_len);
                Ok(std::mem::take(&mut *stored))
            }
            (other, _) => Err(SecretError::UnknownFormat(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(Some(SecretKey::from_bytes([byte; SecretKey::LEN]))).unwrap()
    }

    #[test]
    fn sealed_secrets_open_for_their_user_under_their_key_only() {
        let secret = b"twenty bytes secret!".to_vec();
        let a = sealer(1);
        let stored = a.seal("alice", &secret).unwrap();
        assert_eq!(stored.len(), SEAL_OVERHEAD + secret.len());
        assert_eq!(stored[0], FORMAT_AES_256_GCM);
        assert!(!stored.windows(secret.len()).any(|w| w == secret));
        assert_eq!(a.open("alice", stored.clone()).unwrap(), secret);
        assert!(matches!(
            a.open("bob", stored.clone()),
            Err(SecretError::WrongKeyOrCorrupt)
        ));
        assert!(matches!(
            sealer(2).open("alice", stored.clone()),
            Err(SecretError::WrongKeyOrCorrupt)
        ));
        assert!(matches!(
            Sealer::plain().open("alice", stored.clone()),
            Err(SecretError::NoKey)
        ));
        for i in 0..stored.len() {
            let mut flipped = stored.clone();
            flipped[i] ^= 0x01;
            assert!(a.open("alice", flipped).is_err(), "byte {i} flipped");
        }
        let mut short = stored.clone();
        short.truncate(SEAL_OVERHEAD - 1);
        assert!(matches!(
            a.open("alice", short),
            Err(SecretError::WrongKeyOrCorrupt)
        ));
    }

    #[test]
    fn every_seal_takes_a_new_nonce() {
        let a = sealer(1);
        let one = a.seal("alice", b"same secret, twice").unwrap();
        let two = a.seal("alice", b"same secret, twice").unwrap();
        assert_ne!(one[1..1 + NONCE_LEN], two[1..1 + NONCE_LEN]);
        assert_ne!(*one, *two);
    }

    #[test]
    fn plain_secrets_are_tagged_and_refused_by_a_keyed_sealer() {
        let stored = Sealer::plain().seal("alice", b"0123456789abcdef").unwrap();
        assert_eq!(stored[0], FORMAT_PLAIN);
        assert_eq!(
            Sealer::plain().open("alice", stored.clone()).unwrap(),
            b"0123456789abcdef"
        );
        assert!(matches!(
            sealer(1).open("alice", stored),
            Err(SecretError::Unsealed)
        ));
        assert!(matches!(
            Sealer::plain().open("alice", Zeroizing::new(vec![7, 1, 2])),
            Err(SecretError::UnknownFormat(7))
        ));
        assert!(matches!(
            Sealer::plain().open("alice", Zeroizing::new(Vec::new())),
            Err(SecretError::Empty)
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        let key = SecretKey::from_bytes([0xAB; SecretKey::LEN]);
        let debug = format!("{key:?}");
        assert_eq!(debug, "SecretKey(<redacted>)");
        assert!(!debug.to_lowercase().contains("ab"), "{debug}");
    }
}
