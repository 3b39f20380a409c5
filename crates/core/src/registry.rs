//! The registry's records: who the users are, which device certificates are bound to them,
//! the sessions the gate issued, and the errors a registry reports. The traits that read and
//! change them are in [`crate::store`].

use crate::{DeviceFingerprint, SessionId, TotpConfig};

/// A user known to the registry.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// The user name, 1..=128 bytes of UTF-8.
    pub name: String,
    /// The user's TOTP parameters; `None` means the user has no second factor yet, and every
    /// code is refused.
    pub totp: Option<TotpConfig>,
    /// When the user was added, Unix ms.
    pub created_ms: u64,
    /// Whether the user is a service account: it has no TOTP, its bound devices are exempt
    /// from the second factor (the device key is its factor), and it may call only the methods
    /// a policy rule grants it by name or role.
    pub service: bool,
}

/// A device certificate bound to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device name, unique among devices that are not revoked.
    pub name: String,
    /// The user it is bound to.
    pub user: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub fingerprint: DeviceFingerprint,
    /// When it was bound, Unix ms. Session tickets earned before this time do not work.
    pub created_ms: u64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

impl DeviceRecord {
    /// Whether the binding was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }
}

/// A session that a TOTP check earned (PROTOCOL.md section 6), as the server records it: the
/// ticket carries the same id, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id, also sealed in the ticket.
    pub id: SessionId,
    /// The user the TOTP check was made for.
    pub user: String,
    /// The device the TOTP check was made from.
    pub fingerprint: DeviceFingerprint,
    /// When the TOTP check succeeded, Unix ms.
    pub totp_time_ms: u64,
    /// When the session stops working, Unix ms.
    pub expires_ms: u64,
    /// When it was revoked, Unix ms.
    pub revoked_ms: Option<u64>,
}

impl SessionRecord {
    /// Whether the session works at `now_ms`: not revoked and not expired.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms > now_ms
    }
}

/// What went wrong in a registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The named user or device does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The user, device name or fingerprint is already taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A name or value the registry does not take.
    #[error("invalid {0}")]
    Invalid(String),
    /// The backend failed (I/O, a corrupt or foreign database, ...).
    #[error("registry: {0}")]
    Backend(String),
}

/// Checks a user or device name: 1..=128 bytes of UTF-8, without control characters, without
/// the bidirectional and invisible formatting characters of [`is_hidden_format`] (a name with
/// U+202E RIGHT-TO-LEFT OVERRIDE would show as another name in listings and logs), without path
/// separators (`/`, `\`; device names become file names), and neither `.` nor `..`.
///
/// ```
/// use portcullis_core::check_name;
/// assert!(check_name("user", "émile").is_ok());
/// for bad in ["", "a\nb", "evil\u{202e}gpj.exe", "../etc", "a\\b", ".."] {
///     assert!(check_name("user", bad).is_err(), "{bad:?}");
/// }
/// ```
pub fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    let problem = if name.is_empty() || name.len() > 128 {
        "it must be 1 to 128 bytes of UTF-8"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else if name.chars().any(is_hidden_format) {
        "it contains a bidirectional or invisible formatting character (such as U+202E)"
    } else if name.contains(['/', '\\']) {
        "it contains a path separator ('/' or '\\')"
    } else if name == "." || name == ".." {
        "'.' and '..' are not names"
    } else {
        return Ok(());
    };
    Err(RegistryError::Invalid(format!(
        "{kind} name: {problem}; use 1 to 128 bytes of UTF-8 without control, bidirectional or \
         invisible formatting characters and without '/' or '\\'"
    )))
}

/// Whether `c` is a formatting character that changes how the text around it shows without
/// showing itself: the bidirectional marks, embeddings, overrides and isolates (U+061C,
/// U+200E-U+200F, U+202A-U+202E, U+2066-U+2069), the zero-width and invisible characters
/// (U+00AD, U+180E, U+200B-U+200D, U+2060-U+2064, U+206A-U+206F, U+FEFF) and the interlinear
/// annotation controls (U+FFF9-U+FFFB).
pub fn is_hidden_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// Checks a role name: 1..=64 bytes of ASCII letters, digits, `-`, `_`, `.` or `:`.
pub fn check_role(role: &str) -> Result<(), RegistryError> {
    if role.is_empty()
        || role.len() > 64
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(RegistryError::Invalid(format!(
            "role {role:?}: use 1 to 64 ASCII letters, digits, '-', '_', '.' or ':'"
        )));
    }
    Ok(())
}

/// Checks roles with [`check_role`] and returns them sorted, each once.
pub fn normalize_roles(roles: &[String]) -> Result<Vec<String>, RegistryError> {
    for role in roles {
        check_role(role)?;
    }
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    Ok(roles)
}
