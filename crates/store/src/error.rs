//! Why a registry file could not be opened or created.

use std::io;
use std::path::{Path, PathBuf};

use portcullis_core::RegistryError;

use crate::SCHEMA_VERSION;

/// The length of a registry key and of its file, in bytes ([`SecretKey::LEN`](crate::SecretKey::LEN)).
pub(crate) const KEY_LEN: usize = 32;

/// Why [`SqliteRegistry`](crate::SqliteRegistry) could not open or create a registry file.
///
/// Every message is one line that starts with the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// [`SqliteRegistry::open`](crate::SqliteRegistry::open) was given a file that does not exist.
    #[error("{}: no registry file here (create one first)", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// [`SqliteRegistry::open_dir`](crate::SqliteRegistry::open_dir) found an empty registry
    /// file.
    #[error("{}: the registry file is empty; not a registry made by `portcullis init`", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// [`SqliteRegistry::create`](crate::SqliteRegistry::create) was given a file that exists.
    #[error("{}: already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a SQLite database, or its pages are damaged.
    #[error("{}: not a SQLite database or corrupt", path.display())]
    NotSqlite {
        /// The file.
        path: PathBuf,
    },
    /// The file is a SQLite database of some other application.
    #[error(
        "{}: not a Portcullis registry (application_id {application_id:#010x})",
        path.display()
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The `PRAGMA application_id` found in it.
        application_id: u32,
    },
    /// The registry was written by a newer Portcullis.
    #[error(
        "{}: registry schema version {version} is newer than this portcullis ({})",
        path.display(),
        SCHEMA_VERSION
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// The schema version found in it.
        version: i64,
    },
    /// The registry carries a schema version this Portcullis does not know how to read.
    #[error(
        "{}: registry schema version {version} is not supported by this portcullis ({})",
        path.display(),
        SCHEMA_VERSION
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The schema version found in it.
        version: i64,
    },
    /// The registry keeps its TOTP secrets unsealed (schema version 1) and was opened without a
    /// key. Opened with [`SqliteRegistry::open_with_key`](crate::SqliteRegistry::open_with_key),
    /// it is migrated: its secrets are sealed under the key.
    #[error(
        "{}: registry schema version {version} keeps the TOTP secrets unsealed; open it with the registry key to seal them",
        path.display()
    )]
    NeedsKey {
        /// The file.
        path: PathBuf,
        /// The schema version found in it.
        version: i64,
    },
    /// The registry was opened with a key that opens none of the TOTP secrets it tried: the
    /// secrets are sealed under another key. The message holds no secret and no key bytes.
    #[error(
        "{}: the registry key does not open the TOTP secrets sealed in this registry; use the registry.key it was sealed with",
        path.display()
    )]
    WrongKey {
        /// The registry file.
        path: PathBuf,
    },
    /// The registry's TOTP secrets are sealed under a key and it was opened without one
    /// ([`SqliteRegistry::open`](crate::SqliteRegistry::open)): refused at open, so that no
    /// connection is refused later for a secret the registry cannot read.
    #[error(
        "{}: the TOTP secrets in this registry are sealed under a registry key; open it with that key (portcullis init writes it as registry.key beside the registry)",
        path.display()
    )]
    SealedWithoutKey {
        /// The registry file.
        path: PathBuf,
    },
    /// A directory holds `registry.key.new`: a `portcullis keys rekey` was interrupted, and
    /// until it is finished the registry may be sealed under either key.
    #[error(
        "{}: an interrupted `portcullis keys rekey` left this new registry key; run `portcullis keys rekey` on this directory again to finish it",
        path.display()
    )]
    RekeyPending {
        /// The new key file.
        path: PathBuf,
    },
    /// [`SecretKey::load`](crate::SecretKey::load) was given a file that does not exist.
    #[error("{}: no registry key file here (it holds the key that seals the TOTP secrets)", path.display())]
    KeyMissing {
        /// The key file.
        path: PathBuf,
    },
    /// The key file may be read or written by the group or by others.
    #[error(
        "{}: the key file is {} by others (mode {mode:04o}); run chmod 600 {}",
        path.display(),
        exposure(*mode),
        path.display()
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold exactly [`SecretKey::LEN`](crate::SecretKey::LEN) bytes.
    #[error(
        "{}: a registry key file holds exactly {} bytes, this one holds {len}",
        path.display(),
        KEY_LEN
    )]
    KeyLength {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The file can only be read, but the registry must write to it.
    #[error("{}: registry is read-only; it must be writable", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// Creating the file or setting its permissions failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// SQLite refused an operation while opening or setting up the registry.
    #[error("{}: {message}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        message: String,
    },
}

impl StoreError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Missing { path }
            | Self::Empty { path }
            | Self::AlreadyExists { path }
            | Self::NotSqlite { path }
            | Self::Foreign { path, .. }
            | Self::TooNew { path, .. }
            | Self::Unsupported { path, .. }
            | Self::NeedsKey { path, .. }
            | Self::WrongKey { path }
            | Self::SealedWithoutKey { path }
            | Self::RekeyPending { path }
            | Self::KeyMissing { path }
            | Self::KeyExposed { path, .. }
            | Self::KeyLength { path, .. }
            | Self::ReadOnly { path }
            | Self::Io { path, .. }
            | Self::Sqlite { path, .. } => path,
        }
    }

    /// Classifies a SQLite error met while opening `path`: a file that is not a database or is
    /// damaged becomes [`StoreError::NotSqlite`], anything else [`StoreError::Sqlite`].
    pub(crate) fn from_sqlite(path: &Path, error: &rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode;
        match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Self::NotSqlite {
                path: path.to_owned(),
            },
            _ => Self::Sqlite {
                path: path.to_owned(),
                message: one_line(&error.to_string()),
            },
        }
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(error: StoreError) -> Self {
        RegistryError::Backend(error.to_string())
    }
}

/// What the group and others may do with a key file of this mode that they must not.
fn exposure(mode: u32) -> &'static str {
    if mode & 0o044 != 0 {
        "readable"
    } else if mode & 0o022 != 0 {
        "writable"
    } else {
        "accessible"
    }
}

/// Folds a message onto one line.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
