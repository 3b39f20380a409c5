//! How TOTP secrets are written to and read from the `users.totp_secret` column.
//!
//! Every read and write of a secret goes through [`seal`] and [`open`], so that encrypting the
//! secrets at rest changes only this module. Today the column holds the raw secret bytes, and the
//! file's permissions (owner only) are what protects them.

use portcullis_core::RegistryError;
use zeroize::Zeroizing;

/// The bytes to store for `secret`.
pub(crate) fn seal(secret: &[u8]) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
    Ok(Zeroizing::new(secret.to_vec()))
}

/// The secret held in the stored bytes. `user` names the row in errors; the bytes never appear
/// in them.
pub(crate) fn open(mut stored: Zeroizing<Vec<u8>>, _user: &str) -> Result<Vec<u8>, RegistryError> {
    Ok(std::mem::take(&mut *stored))
}
