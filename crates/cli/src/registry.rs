//! Which registry a command opens: `--registry URL` (or `PORTCULLIS_REGISTRY`), a PostgreSQL
//! database shared by a fleet of servers or a SQLite file; without it, `DIR/portcullis.db`.
//! The TOTP secrets are sealed under `DIR/registry.key` in every case.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use portcullis_core::Registry;
use portcullis_postgres::{PgError, PgRegistry};
use portcullis_store::{SecretKey, SqliteRegistry, StoreError};

use crate::CliResult;
use crate::dir::Layout;

/// The environment variable `--registry` is read from when the flag is not given.
pub(crate) const REGISTRY_ENV: &str = "PORTCULLIS_REGISTRY";

/// The `--registry URL` flag of every command that opens the registry.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct RegistryArg {
    /// The registry: `postgres://USER:PASSWORD@HOST:PORT/DB` (one database shared by several
    /// servers; add `?sslmode=require` for TLS, verified against --registry-ca) or
    /// `sqlite:PATH`. Without it, DIR/portcullis.db. The TOTP secrets are sealed under
    /// DIR/registry.key in every case.
    #[arg(long, value_name = "URL", env = REGISTRY_ENV, hide_env_values = true)]
    pub(crate) registry: Option<String>,
    /// The CA certificate(s) (PEM) a TLS connection to PostgreSQL is verified against.
    #[arg(long, value_name = "FILE")]
    pub(crate) registry_ca: Option<PathBuf>,
}

/// Where a registry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// `DIR/portcullis.db`.
    Dir,
    /// A SQLite file elsewhere.
    Sqlite(PathBuf),
    /// A PostgreSQL database (the URL holds the password: never shown).
    Postgres(String),
}

impl Location {
    /// Reads a registry URL: `postgres://…`, `postgresql://…` or `sqlite:PATH`.
    pub(crate) fn parse(url: &str) -> CliResult<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("--registry sqlite:PATH: the path is empty".to_owned());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        Err("--registry: use postgres://USER:PASSWORD@HOST:PORT/DB or sqlite:PATH".to_owned())
    }
}

impl RegistryArg {
    /// The CAs of `--registry-ca` (none without it).
    pub(crate) fn roots(&self) -> CliResult<Vec<rustls::pki_types::CertificateDer<'static>>> {
        match &self.registry_ca {
            None => Ok(Vec::new()),
            Some(path) => {
                portcullis_tls::load_certs(path).map_err(|e| format!("--registry-ca: {e}"))
            }
        }
    }

    /// Where the registry lives.
    pub(crate) fn location(&self) -> CliResult<Location> {
        match &self.registry {
            None => Ok(Location::Dir),
            Some(url) if url.is_empty() => Ok(Location::Dir),
            Some(url) => Location::parse(url),
        }
    }
}

impl Layout {
    /// Opens the registry `arg` names, with the directory's registry key. A missing key file,
    /// or a key that does not open the registry's TOTP secrets, is refused here, naming the
    /// key file and the fix; a database that cannot be reached names its host and the cause.
    pub(crate) fn open_registry(&self, arg: &RegistryArg) -> CliResult<Arc<dyn Registry>> {
        match arg.location()? {
            Location::Postgres(url) => Ok(Arc::new(self.open_postgres(&url, arg)?)),
            sqlite => Ok(Arc::new(self.open_sqlite(&sqlite)?)),
        }
    }

    /// Opens a SQLite registry: the directory's own ([`Location::Dir`]) or the file of
    /// [`Location::Sqlite`].
    pub(crate) fn open_sqlite(&self, location: &Location) -> CliResult<SqliteRegistry> {
        match location {
            Location::Sqlite(path) => {
                if !path.is_file() {
                    return Err(format!(
                        "{}: no such registry file (sqlite:PATH)",
                        path.display()
                    ));
                }
                let key = self.load_registry_key()?;
                SqliteRegistry::open_with_key(path, key).map_err(|e| self.store_error(e))
            }
            _ => {
                self.check_registry_file()?;
                SqliteRegistry::open_dir(&self.dir).map_err(|e| self.store_error(e))
            }
        }
    }

    /// Opens (and migrates) the PostgreSQL registry at `url`.
    pub(crate) fn open_postgres(&self, url: &str, arg: &RegistryArg) -> CliResult<PgRegistry> {
        let key = self.load_registry_key()?;
        let roots = arg.roots()?;
        PgRegistry::open_blocking(url, key, &roots).map_err(|e| match e {
            PgError::WrongKey { host } => format!(
                "PostgreSQL at {host}: the registry key {} does not open the TOTP secrets sealed there; every server of a fleet uses the same registry.key",
                self.registry_key().display()
            ),
            other => other.to_string(),
        })
    }

    /// The directory's registry key.
    pub(crate) fn load_registry_key(&self) -> CliResult<SecretKey> {
        let pending = self.registry_key_new();
        if pending.exists() {
            return Err(StoreError::RekeyPending { path: pending }.to_string());
        }
        SecretKey::load(&self.registry_key()).map_err(|e| self.store_error(e))
    }

    pub(crate) fn store_error(&self, e: StoreError) -> String {
        match e {
            StoreError::KeyMissing { path } => format!(
                "{}: no registry key file; `portcullis init` makes one, and `portcullis init --dir {} --add-key` adds one to a directory made by an older portcullis",
                path.display(),
                self.dir.display()
            ),
            StoreError::WrongKey { path } => format!(
                "{}: the registry key {} does not open the TOTP secrets sealed in this registry; restore the registry.key it was sealed with",
                path.display(),
                self.registry_key().display()
            ),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_are_read_or_refused_in_one_line() {
        assert_eq!(
            Location::parse("postgres://u:p@db:5432/x").unwrap(),
            Location::Postgres("postgres://u:p@db:5432/x".into())
        );
        assert!(matches!(
            Location::parse("postgresql://db/x").unwrap(),
            Location::Postgres(_)
        ));
        assert_eq!(
            Location::parse("sqlite:/var/lib/p.db").unwrap(),
            Location::Sqlite("/var/lib/p.db".into())
        );
        assert_eq!(
            Location::parse("sqlite://rel.db").unwrap(),
            Location::Sqlite("rel.db".into())
        );
        for bad in ["sqlite:", "mysql://u:secret@h/db", "p.db"] {
            let err = Location::parse(bad).unwrap_err();
            assert!(!err.contains("secret") && !err.contains('\n'), "{err}");
        }
    }
}

/// `portcullis registry copy`.
#[derive(Debug, clap::Args)]
pub(crate) struct CopyArgs {
    #[command(flatten)]
    dir: crate::DirArg,
    /// The registry to copy: `sqlite:PATH`; without it, DIR/portcullis.db.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// The registry to fill: `postgres://USER:PASSWORD@HOST:PORT/DB`, an empty database.
    #[arg(long, value_name = "URL")]
    to: String,
    /// The CA certificate(s) (PEM) a TLS connection to PostgreSQL is verified against.
    #[arg(long, value_name = "FILE")]
    registry_ca: Option<PathBuf>,
}

/// Copies a SQLite registry (users with their sealed secrets, lockout and single-use state,
/// devices active and revoked, roles, sessions) into an empty PostgreSQL database, in one
/// transaction; the source is only read. Both are sealed under DIR/registry.key.
pub(crate) fn copy(args: &CopyArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let from = RegistryArg {
        registry: args.from.clone(),
        registry_ca: None,
    };
    let source = match from.location()? {
        Location::Postgres(_) => {
            return Err(
                "--from: copy from a SQLite registry (sqlite:PATH, or DIR/portcullis.db)"
                    .to_owned(),
            );
        }
        sqlite => layout.open_sqlite(&sqlite)?,
    };
    let Location::Postgres(url) = Location::parse(&args.to)? else {
        return Err(
            "--to: copy to a PostgreSQL registry (postgres://USER:PASSWORD@HOST:PORT/DB)"
                .to_owned(),
        );
    };
    let to = RegistryArg {
        registry: Some(url.clone()),
        registry_ca: args.registry_ca.clone(),
    };
    let target = layout.open_postgres(&url, &to)?;
    let export = source.export().map_err(|e| e.to_string())?;
    let done = target.import(&export).map_err(|e| e.to_string())?;
    out!(
        "copied {} users, {} devices ({} active), {} roles and {} sessions to PostgreSQL at {}",
        done.users,
        done.devices,
        done.active_devices,
        done.roles,
        done.sessions,
        target.host()
    );
    out!(
        "next: portcullis serve --dir {} --registry postgres://… (PORTCULLIS_REGISTRY); the SQLite file is left as it was",
        layout.dir.display()
    );
    Ok(())
}
