//! # portcullis-postgres
//!
//! The Portcullis registry on PostgreSQL (≥ 14), for a fleet of gates sharing one state: a code
//! accepted by one instance is spent for all, a lockout on one holds on the next, a session
//! earned on one works on every other, and revocations reach them all.
//!
//! [`PgRegistry::open`] connects through a pool (deadpool-postgres; TLS by rustls on the ring
//! provider when the URL asks for it), applies the versioned migrations ([`SCHEMA_VERSION`]) in
//! one transaction under an advisory lock, and refuses a schema written by a newer Portcullis.
//! The tables mirror the SQLite registry's, plus the `changes` log that every revocation and
//! role change writes to in its own transaction (with a `NOTIFY`), numbered in commit order
//! without gaps, for every instance's revocation round to tail
//! ([`GateStore::changes_since`](portcullis_core::GateStore::changes_since); see the `listen`
//! module's [`PgRegistry::listen_changes`]). TOTP
//! secrets are sealed in Rust under `registry.key`, as in SQLite: the database never sees a
//! plain secret.
//!
//! ## The accept path
//!
//! Per connection, the gate's snapshot is **one statement** (the device, its user with the
//! lockout state, last step and roles, and the session asked for, joined in one read), and its
//! commit at most **one statement**: an accepted code is one conditional `UPDATE … WHERE
//! last_step < $step` with the session's `INSERT` in the same statement (a data-modifying
//! `WITH`), so that a step is accepted once across every instance; a wrong code is one
//! conditional `UPDATE` computing the lockout from the policy's values, passed as parameters.
//! A session ticket is one statement in all; a TOTP code two. Statements are prepared once per
//! pooled connection.
//!
//! `testkit` (feature `test-util`) starts a throwaway PostgreSQL cluster from the installed
//! binaries, for tests.

mod admin;
mod error;
mod gate;
mod listen;
mod rekey;
mod schema;
#[cfg(feature = "test-util")]
pub mod testkit;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use admin::{CHANGES_CHANNEL, Imported};
pub use error::PgError;
pub use listen::{ChangeListener, LISTENER_APPLICATION_NAME};
pub use schema::SCHEMA_VERSION;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use portcullis_core::{Clock, RegistryError, SystemClock};
use portcullis_store::{KeyCheck, Sealer, SecretKey};
use rustls::pki_types::CertificateDer;

/// How many connections one instance's pool holds at most.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The connections of the synchronous traits' calls (administration, the command line), kept
/// apart from the gate's [`DEFAULT_POOL_SIZE`].
pub const OWN_POOL_SIZE: usize = 4;

/// How long a connection to the database may take to open, and how long a caller waits for a
/// free connection of the pool, unless the URL sets `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry in a PostgreSQL database: a complete backend ([`portcullis_core::Registry`]).
///
/// The gate's store ([`portcullis_core::GateStore`]) is asynchronous: one statement for the
/// snapshot, one for the commit, each one round trip on a pooled connection. The sessions and
/// the administration ([`portcullis_core::SessionStore`], [`portcullis_core::Admin`]) are
/// synchronous traits: their calls run on a runtime of the registry's own (one thread), so
/// that they may be made from any thread, inside an async runtime or not, as the `postgres`
/// crate does for `tokio-postgres`.
pub struct PgRegistry {
    /// The connections of callers on their own runtime (the gate, the revocation round): each
    /// connection's I/O task runs on the runtime that opened it, where its queries come from.
    pool: Pool,
    /// The connections of the synchronous traits' calls, made and driven on `runtime`: kept
    /// apart, so that the gate never drives a query through this registry's own thread.
    own_pool: Pool,
    /// The connection settings, for the change feed's connection of its own.
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    host: String,
    sealer: Sealer,
    clock: Arc<dyn Clock>,
    /// When a new session last purged expired records (the sessions' time, Unix ms).
    last_purge_ms: AtomicU64,
    /// Set each time the change feed listens (again): what changed while it did not listen is
    /// read by a resync ([`portcullis_core::ChangeTail::Resync`]).
    feed_resync: Arc<std::sync::atomic::AtomicBool>,
    /// The runtime the synchronous traits' calls run on (`None` only while dropped).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRegistry")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Drop for PgRegistry {
    fn drop(&mut self) {
        // A registry may be dropped inside an async runtime, where blocking is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl PgRegistry {
    /// Connects to the database of `url` (`postgres://user:password@host:port/db`, or the
    /// key=value form), migrates its schema to [`SCHEMA_VERSION`] and keeps a pool of
    /// [`DEFAULT_POOL_SIZE`] connections. `roots` are the CAs a TLS connection to the database
    /// is verified against (`sslmode=require` or `prefer` in the URL; `disable` sends
    /// nothing over TLS). TOTP secrets are sealed under `key`; a database whose secrets were
    /// sealed under another key is refused ([`PgError::WrongKey`]).
    ///
    /// Errors are one line naming the host and the cause, never the password.
    pub async fn open(
        url: &str,
        key: SecretKey,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, PgError> {
        let registry = Self::new(url, key, roots)?;
        registry.migrate().await?;
        registry.check_key().await?;
        Ok(registry)
    }

    /// [`PgRegistry::open`], from synchronous code (a command-line tool): waits for it on the
    /// registry's own runtime.
    pub fn open_blocking(
        url: &str,
        key: SecretKey,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, PgError> {
        let registry = Self::new(url, key, roots)?;
        registry.wait(async {
            registry.migrate().await?;
            registry.check_key().await
        })?;
        Ok(registry)
    }

    fn new(url: &str, key: SecretKey, roots: &[CertificateDer<'static>]) -> Result<Self, PgError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| PgError::Url(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let wait = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT);
        config.application_name("portcullis");
        // The gate's statements are prepared once per connection and run with new values on
        // every accept: a generic plan, made once, instead of a plan per execution.
        let options = match config.get_options() {
            Some(given) => format!("{given} -c plan_cache_mode=force_generic_plan"),
            None => "-c plan_cache_mode=force_generic_plan".to_owned(),
        };
        config.options(&options);
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
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let pool_of = |size: usize| {
            let manager = Manager::from_config(
                config.clone(),
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(wait))
                .create_timeout(Some(wait))
                .build()
                .map_err(|e| PgError::Url(format!("connection pool: {e}")))
        };
        let pool = pool_of(DEFAULT_POOL_SIZE)?;
        let own_pool = pool_of(OWN_POOL_SIZE)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("portcullis-postgres")
            .enable_all()
            .build()
            .map_err(|e| PgError::Url(format!("runtime: {e}")))?;
        let sealer = Sealer::new(Some(key))
            .map_err(|_| PgError::Url("AES-256-GCM refused the registry key".to_owned()))?;
        Ok(Self {
            pool,
            own_pool,
            config,
            tls,
            host,
            sealer,
            clock: Arc::new(SystemClock),
            last_purge_ms: AtomicU64::new(0),
            feed_resync: Arc::default(),
            runtime: Some(runtime),
        })
    }

    /// Replaces the clock that, with the time of each new session, decides when an expired
    /// session record can be forgotten (by default the system clock). Give it the gate's clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Waits for `work` on the registry's own runtime: from a thread of its own when called
    /// inside an async runtime (where blocking the caller's runtime on another is refused).
    fn wait<T: Send>(&self, work: impl Future<Output = T> + Send) -> T {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the registry");
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(work);
        }
        std::thread::scope(
            |scope| match scope.spawn(|| runtime.block_on(work)).join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            },
        )
    }

    /// Refuses a key under which no stored secret opens (another instance's key).
    async fn check_key(&self) -> Result<(), PgError> {
        let client = self.client().await?;
        // A few are enough: one that opens proves the key.
        let rows = client
            .query(
                "SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL LIMIT 16",
                &[],
            )
            .await
            .map_err(|e| self.database(&e))?;
        let stored = rows.iter().map(|r| {
            (
                r.get::<_, String>(0),
                zeroize::Zeroizing::new(r.get::<_, Vec<u8>>(1)),
            )
        });
        match self.sealer.check_key(stored) {
            KeyCheck::Opens => Ok(()),
            KeyCheck::WrongKey => Err(PgError::WrongKey {
                host: self.host.clone(),
            }),
        }
    }

    /// Whether the registry holds no user, device or session (a new database, or one whose
    /// registry was never used).
    pub fn is_empty(&self) -> Result<bool, RegistryError> {
        self.wait(async {
            let client = self.conn().await?;
            let row = client
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM devices)
                       AND NOT EXISTS (SELECT 1 FROM sessions)",
                    &[],
                )
                .await
                .map_err(|e| self.backend(&e))?;
            Ok(row.get(0))
        })
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

    /// A connection of the pool, for the store traits: a failure is a
    /// [`RegistryError::Backend`] naming the host.
    async fn conn(&self) -> Result<deadpool_postgres::Client, RegistryError> {
        self.client()
            .await
            .map_err(|e| RegistryError::Backend(e.to_string()))
    }

    /// A failed statement of the store traits, as [`RegistryError::Backend`] naming the host.
    fn backend(&self, e: &tokio_postgres::Error) -> RegistryError {
        RegistryError::Backend(self.database(e).to_string())
    }

    /// A stored row this build cannot make sense of.
    fn damaged(&self, d: portcullis_store::rows::Damaged) -> RegistryError {
        RegistryError::Backend(format!("PostgreSQL at {}: {d}", self.host))
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        // On this registry's own runtime (a synchronous call, see `wait`), its own pool.
        let own = self.runtime.as_ref().is_some_and(|own| {
            tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == own.handle().id())
        });
        let pool = if own { &self.own_pool } else { &self.pool };
        pool.get().await.map_err(|e| PgError::Database {
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
pub(crate) fn db_cause(e: &tokio_postgres::Error) -> String {
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
