//! Why the PostgreSQL registry could not be opened.

/// Why [`PgRegistry`](crate::PgRegistry) could not connect to or set up its database. Every
/// message is one line that names the database host; none holds the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL is not a PostgreSQL connection string.
    #[error("registry URL: {0}")]
    Url(String),
    /// The server could not be reached, refused the login, or failed a statement.
    #[error("PostgreSQL at {host}: {cause}")]
    Database {
        /// The host (and port) of the URL.
        host: String,
        /// What went wrong, from PostgreSQL or the network.
        cause: String,
    },
    /// No stored TOTP secret opens under the registry key given: the database was set up with
    /// another `registry.key`.
    #[error(
        "PostgreSQL at {host}: the TOTP secrets there are sealed under another registry key \
         (every instance must use the same registry.key)"
    )]
    WrongKey {
        /// The host (and port) of the URL.
        host: String,
    },
    /// The database holds a schema written by a newer Portcullis.
    #[error(
        "PostgreSQL at {host}: registry schema version {version} is newer than this portcullis ({})",
        crate::SCHEMA_VERSION
    )]
    TooNew {
        /// The host (and port) of the URL.
        host: String,
        /// The version found.
        version: i32,
    },
}
