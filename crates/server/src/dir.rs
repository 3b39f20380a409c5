//! A server from what `portcullis init` made, in one line: [`PortcullisServer::from_dir`], and
//! the server's identity from PEM text as tonic takes it: [`Builder::identity_pem`].

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;

use crate::{Builder, Incoming, PortcullisServer, ServerError};

impl Builder {
    /// The TLS identity from PEM text, as tonic's `Identity::from_pem` and
    /// `Certificate::from_pem` take it: the server's certificate chain, its private key, and the
    /// CA certificates that device certificates must chain to. See [`Builder::identity`].
    ///
    /// ```no_run
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let builder = portcullis_server::PortcullisServer::builder().identity_pem(
    ///     std::fs::read("pc/server.pem")?,
    ///     std::fs::read("pc/server-key.pem")?,
    ///     std::fs::read("pc/ca.pem")?,
    /// )?;
    /// # let _ = builder; Ok(()) }
    /// ```
    pub fn identity_pem(
        self,
        chain: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        client_ca: impl AsRef<[u8]>,
    ) -> Result<Self, ServerError> {
        let chain = portcullis_tls::parse_certs(chain.as_ref(), "the server certificate")?;
        let key = portcullis_tls::parse_key(key.as_ref(), "the server key")?;
        let roots = portcullis_tls::parse_certs(client_ca.as_ref(), "the client CA")?;
        self.identity(chain, key, &roots)
    }

    /// The TLS identity from PEM files: see [`Builder::identity_pem`].
    pub fn identity_files(
        self,
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
        client_ca: impl AsRef<Path>,
    ) -> Result<Self, ServerError> {
        let chain = portcullis_tls::load_certs(chain.as_ref())?;
        let key = portcullis_tls::load_key(key.as_ref())?;
        let roots = portcullis_tls::load_certs(client_ca.as_ref())?;
        self.identity(chain, key, &roots)
    }

    /// Everything a directory made by `portcullis init` holds: the server identity
    /// (`server.pem`, `server-key.pem`), the CA device certificates must chain to (`ca.pem`),
    /// the SQLite registry with the key that seals its TOTP secrets (`portcullis.db`,
    /// `registry.key`) and the session-ticket keys (`ticket.key` and `ticket-retired/`, when
    /// present, reloaded when they change: [`Builder::ticket_keys_from`]). The other
    /// settings stay at their defaults and can be changed on the returned builder.
    ///
    /// Fails with one line naming the file: a missing or unreadable file, a registry whose
    /// secrets the key does not open, an empty registry file.
    #[cfg(feature = "sqlite")]
    pub fn dir(self, dir: impl AsRef<Path>) -> Result<Self, ServerError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ServerError::Dir(format!(
                "{}: no such directory; create it with `portcullis init --dir {}`",
                dir.display(),
                dir.display()
            )));
        }
        let layout = portcullis_core::layout::DirLayout::new(dir);
        let registry = portcullis_store::SqliteRegistry::open_dir(dir)
            .map_err(|e| ServerError::Dir(e.to_string()))?;
        let mut builder = self
            .identity_files(layout.server_cert(), layout.server_key(), layout.ca_cert())?
            .registry(std::sync::Arc::new(registry));
        if layout.ticket_key().exists() {
            builder = builder.ticket_keys_from(dir)?;
        }
        Ok(builder)
    }
}

impl PortcullisServer {
    /// The server of a directory made by `portcullis init`, with default settings: see
    /// [`Builder::dir`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # use tonic_health::server::health_reporter;
    /// # let (_, my_service) = health_reporter();
    /// use portcullis_server::PortcullisServer;
    ///
    /// let portcullis = PortcullisServer::from_dir("pc")?;
    /// portcullis
    ///     .server()
    ///     .add_service(my_service)
    ///     .serve_with_incoming(portcullis.bind("127.0.0.1:50051".parse()?).await?)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sqlite")]
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, ServerError> {
        Self::builder().dir(dir)?.build()
    }

    /// Binds a TCP listener on `addr` and starts accepting on it (see
    /// [`PortcullisServer::incoming`]): what tonic's `serve(addr)` does, with the gate in
    /// front. A failure to bind names the address. Must be called within a tokio runtime.
    pub async fn bind(&self, addr: SocketAddr) -> std::io::Result<Incoming> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: cannot listen: {e}")))?;
        Ok(self.incoming(listener))
    }
}
