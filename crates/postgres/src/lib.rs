//! # portcullis-postgres
//!
//! The Portcullis registry on PostgreSQL (≥ 14), for a fleet of gates sharing one state: a code
//! accepted by one instance is spent for all, a lockout on one holds on the next, a session
//! earned on one works on every other, and revocations reach them all.
//!
//! This crate is built in steps. What stands: [`PgRegistry::open`] connects through a pool
//! (deadpool-postgres; TLS by rustls on the ring provider when the URL asks for it), applies
//! the versioned migrations ([`SCHEMA_VERSION`]) in one transaction under an advisory lock, and
//! refuses a schema written by a newer Portcullis. The tables mirror the SQLite registry's,
//! plus the `changes` table every instance's revocation round will tail. TOTP secrets are
//! sealed in Rust under `registry.key`, as in SQLite: the database never sees a plain secret.
//! The store traits (`GateStore`, `SessionStore`, `Admin`) come next.
//!
//! `testkit` (feature `test-util`) starts a throwaway PostgreSQL cluster from the installed
//! binaries, for tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod schema;
#[cfg(feature = "test-util")]
pub mod testkit;

use std::str::FromStr;
use std::sync::Arc;

pub use error::PgError;
pub use schema::SCHEMA_VERSION;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use portcullis_store::SecretKey;
use rustls::pki_types::CertificateDer;

/// How many connections one instance's pool holds at most.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The registry in a PostgreSQL database.
pub struct PgRegistry {
    pool: Pool,
    host: String,
    /// The key the TOTP secrets are sealed under (used by the store traits).
    #[allow(dead_code)]
    key: Arc<SecretKey>,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRegistry")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl PgRegistry {
    /// Connects to the database of `url` (`postgres://user:password@host:port/db`, or the
    /// key=value form), migrates its schema to [`SCHEMA_VERSION`] and keeps a pool of
    /// [`DEFAULT_POOL_SIZE`] connections. `roots` are the CAs a TLS connection to the database
    /// is verified against (`sslmode=require` or `prefer` in the URL; `disable` sends
    /// nothing over TLS). TOTP secrets are sealed under `key`.
    ///
    /// Errors are one line naming the host and the cause, never the password.
    pub async fn open(
        url: &str,
        key: SecretKey,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, PgError> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| PgError::Url(format!("not a PostgreSQL URL: {e}")))?;
        let host = host_of(&config);
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| PgError::Url(format!("CA certificate: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Url(format!("TLS: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
        let manager = Manager::from_config(
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(DEFAULT_POOL_SIZE)
            .build()
            .map_err(|e| PgError::Url(format!("connection pool: {e}")))?;
        let registry = Self {
            pool,
            host,
            key: Arc::new(key),
        };
        registry.migrate().await?;
        Ok(registry)
    }

    /// The host (and port) this registry connects to, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The schema version the database holds.
    pub async fn schema_version(&self) -> Result<i32, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT version FROM portcullis_schema", &[])
            .await
            .map_err(|e| self.database(&e))?;
        Ok(row.get(0))
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        self.pool.get().await.map_err(|e| PgError::Database {
            host: self.host.clone(),
            cause: pool_cause(&e),
        })
    }

    fn database(&self, e: &tokio_postgres::Error) -> PgError {
        PgError::Database {
            host: self.host.clone(),
            cause: db_cause(e),
        }
    }

    /// Applies the migrations the database lacks, in one transaction under
    /// [`schema::MIGRATION_LOCK`]; refuses a newer schema.
    async fn migrate(&self) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.database(&e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&schema::MIGRATION_LOCK],
        )
        .await
        .map_err(|e| self.database(&e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS portcullis_schema (
                 one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                 version INTEGER NOT NULL CHECK (version >= 0)
             );
             INSERT INTO portcullis_schema (version) VALUES (0) ON CONFLICT DO NOTHING;",
        )
        .await
        .map_err(|e| self.database(&e))?;
        let version: i32 = tx
            .query_one("SELECT version FROM portcullis_schema", &[])
            .await
            .map_err(|e| self.database(&e))?
            .get(0);
        if version > SCHEMA_VERSION {
            return Err(PgError::TooNew {
                host: self.host.clone(),
                version,
            });
        }
        let from = usize::try_from(version).unwrap_or(0);
        for migration in &schema::MIGRATIONS[from..] {
            tx.batch_execute(migration)
                .await
                .map_err(|e| self.database(&e))?;
        }
        tx.execute(
            "UPDATE portcullis_schema SET version = $1",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(|e| self.database(&e))?;
        tx.commit().await.map_err(|e| self.database(&e))
    }
}

/// `host:port` of the first host of `config` (what messages name).
fn host_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The cause of a database error in one line: PostgreSQL's message for a server error, the
/// error chain for the rest (neither holds the password).
fn db_cause(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

fn pool_cause(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_cause(e),
        other => other.to_string(),
    }
}
