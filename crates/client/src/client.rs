//! [`Client`] and its builder.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::codec::ALPN_PCS1;
use portcullis_core::layout::DirLayout;
use portcullis_core::{Clock, SystemClock, SystemRandom};
use portcullis_tls::CaHintResolver;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::channel::PortcullisChannel;
use crate::code::check_code;
use crate::connector::{PcsConnector, connect_target};
use crate::dial::{ClientInner, target};
use crate::session::{SessionFiles, SessionInfo, TicketCache, VerdictInfo};
use crate::{ClientError, CodeSource};

/// The AGENT a client sends unless told otherwise.
pub const DEFAULT_AGENT: &str = concat!("portcullis-client/", env!("CARGO_PKG_VERSION"));

/// The environment variable [`Client::from_dir`] takes a TOTP secret (base32) from.
pub const SECRET_ENV: &str = "PORTCULLIS_TOTP_SECRET";

/// How long [`ClientBuilder::connect_timeout`] waits by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A Portcullis client: one user, one device (the client certificate in the TLS config), one
/// source of codes, and the session ticket they earn.
///
/// Cheap to clone; clones share the ticket cache. Each [`Client::connect`] or
/// [`Client::connect_lazy`] makes a [`PortcullisChannel`] that tonic's generated clients take.
///
/// ```no_run
/// # async fn run(tls: std::sync::Arc<rustls::ClientConfig>) -> Result<(), Box<dyn std::error::Error>> {
/// use portcullis_client::{Client, CodeSource};
/// use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
///
/// let client = Client::builder()
///     .tls_config(tls)
///     .user("alice")
///     .code_source(CodeSource::callback(|| Ok("287082".to_owned())))
///     .build()?;
/// let channel = client.connect("localhost:7443").await?;
/// let reply = HealthClient::new(channel)
///     .check(HealthCheckRequest { service: String::new() })
///     .await?;
/// println!("{reply:?}; session until {:?}", client.session().map(|s| s.expires_ms));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

/// Builds a [`Client`]; see [`Client::builder`].
#[derive(Default)]
pub struct ClientBuilder {
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<String>,
    user: Option<String>,
    codes: Option<CodeSource>,
    clock: Option<Arc<dyn Clock>>,
    agent: Option<String>,
    connect_timeout: Option<Duration>,
    session_dir: Option<PathBuf>,
}

impl ClientBuilder {
    /// The rustls client config (required): trusted CAs and the device's client certificate.
    /// PCS1 offers exactly the ALPN `portcullis/1`: a config with no ALPN gets it; one that
    /// offers anything else is refused. Early data is turned off. The client works on a copy
    /// whose certificate resolver is wrapped in a [`CaHintResolver`], so that a refused device
    /// certificate can be explained with the CAs the server named.
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The TLS server name to check the server certificate against; default: the host of the
    /// address given to `connect`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The user this client claims (required), 1 to 128 bytes.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Where codes come from (required).
    pub fn code_source(mut self, source: CodeSource) -> Self {
        self.codes = Some(source);
        self
    }

    /// The clock for TIME, for [`CodeSource::Secret`] and for ticket expiry; default: the
    /// system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The AGENT sent for the server's audit log, at most 64 bytes; default
    /// [`DEFAULT_AGENT`].
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// How long to wait for TCP and TLS, and then again for the server's Verdict
    /// on every connection (a connection without a Verdict in time fails with UNAVAILABLE,
    /// `timeout: ...`); default [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Keeps session tickets in files under `dir` (created with mode 0700; one file per user,
    /// server name and address, mode 0600) as well as in memory, so that the next client of
    /// the same device, in this process or another, uses the session instead of asking for a
    /// code. `dir` belongs to one device: a ticket only works with the device certificate
    /// that earned it. A file readable by others is not used. Default: memory only.
    pub fn session_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.session_dir = Some(dir.into());
        self
    }

    /// The TLS config of device `device` in a directory made by `portcullis init` (the CA
    /// `ca.pem`, the device's `devices/DEVICE.pem` and `devices/DEVICE-key.pem`), and the
    /// device's stored sessions (`sessions/DEVICE/`, where `portcullis login` puts them): see
    /// [`ClientBuilder::session_dir`]. Fails with one line naming the file.
    pub fn dir(self, dir: impl AsRef<Path>, device: &str) -> Result<Self, ClientError> {
        let layout = DirLayout::new(dir.as_ref());
        let load = |path: &Path| -> Result<_, ClientError> {
            portcullis_tls::load_certs(path).map_err(|e| ClientError::Config(e.to_string()))
        };
        let roots = load(&layout.ca_cert())?;
        let chain = load(&layout.device_cert(device))?;
        let key = portcullis_tls::load_key(&layout.device_key(device))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let tls = portcullis_tls::client_config(&roots, chain, key, &[ALPN_PCS1])
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(self.tls_config(tls).session_dir(layout.sessions(device)))
    }

    /// Checks the settings and builds the client.
    pub fn build(self) -> Result<Client, ClientError> {
        let mut tls = self.tls.ok_or_else(|| {
            ClientError::Config("a TLS client config is required (tls_config)".into())
        })?;
        let user = self
            .user
            .ok_or_else(|| ClientError::Config("a user is required (user)".into()))?;
        if user.is_empty() || user.len() > 128 {
            return Err(ClientError::Config(format!(
                "the user must be 1 to 128 bytes, this one has {}",
                user.len()
            )));
        }
        let codes = self
            .codes
            .ok_or_else(|| ClientError::Config("a code source is required (code_source)".into()))?;
        if let CodeSource::Fixed(code) = &codes {
            check_code(code).map_err(|e| ClientError::Config(format!("fixed code: {e}")))?;
        }
        let agent = self.agent.unwrap_or_else(|| DEFAULT_AGENT.to_owned());
        if agent.len() > 64 {
            return Err(ClientError::Config(format!(
                "the agent must be at most 64 bytes, this one has {}",
                agent.len()
            )));
        }
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.clone()).map_err(|_| {
                ClientError::Config(format!("`{name}` is not a valid TLS server name"))
            })?;
        }
        let alpn_ok = match tls.alpn_protocols.as_slice() {
            [] => false,
            [only] if only.as_slice() == ALPN_PCS1 => true,
            _ => {
                return Err(ClientError::Config(
                    "the TLS config offers ALPN protocols other than portcullis/1".into(),
                ));
            }
        };
        let config = Arc::make_mut(&mut tls);
        if !alpn_ok || config.enable_early_data {
            config.alpn_protocols = vec![ALPN_PCS1.to_vec()];
            config.enable_early_data = false;
        }
        let ca_hints = Arc::new(CaHintResolver::wrap(
            config.client_auth_cert_resolver.clone(),
        ));
        config.client_auth_cert_resolver = ca_hints.clone();
        let tickets = match self.session_dir {
            Some(dir) => TicketCache::persisted(SessionFiles::new(dir, user.clone())),
            None => TicketCache::default(),
        };
        Ok(Client {
            inner: Arc::new(ClientInner {
                tls: TlsConnector::from(tls),
                server_name: self.server_name,
                user,
                codes,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                agent,
                rng: SystemRandom::new(),
                tickets,
                connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                ca_hints,
                last_verdict: Mutex::new(None),
                spent_codes: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("tls_config", &self.tls.as_ref().map(|_| ".."))
            .field("server_name", &self.server_name)
            .field("user", &self.user)
            .field("code_source", &self.codes)
            .field("agent", &self.agent)
            .field("connect_timeout", &self.connect_timeout)
            .field("session_dir", &self.session_dir)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A new target of this client for `addr` (for the crate's tests).
    #[cfg(test)]
    pub(crate) fn target(
        &self,
        addr: &str,
    ) -> Result<(Arc<crate::dial::Target>, tonic::transport::Endpoint), ClientError> {
        target(&self.inner, addr)
    }

    /// A builder with no settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The client of `user` on device `device` of a directory made by `portcullis init`
    /// (see [`ClientBuilder::dir`]): it uses the session that `portcullis login` stored for
    /// the device, until it expires or the server refuses it. Codes come from the environment
    /// variable `PORTCULLIS_TOTP_SECRET` (the user's TOTP secret in base32) when it is set;
    /// otherwise a connection that needs a code fails, saying to run `portcullis login`. For
    /// another source of codes, use the builder: `Client::builder().dir(..)?.code_source(..)`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use portcullis_client::Client;
    ///
    /// let client = Client::from_dir("pc", "laptop", "alice")?;
    /// let channel = client.connect("https://localhost:50051").await?;
    /// # let _ = channel; Ok(()) }
    /// ```
    pub fn from_dir(
        dir: impl AsRef<Path>,
        device: &str,
        user: impl Into<String>,
    ) -> Result<Client, ClientError> {
        let dir = dir.as_ref();
        let codes = match std::env::var_os(SECRET_ENV) {
            Some(secret) => {
                let secret = Zeroizing::new(
                    secret
                        .into_string()
                        .map_err(|_| ClientError::Config(format!("{SECRET_ENV}: not UTF-8")))?,
                );
                let config = portcullis_core::TotpConfig::from_base32(
                    secret.trim(),
                    6,
                    portcullis_core::TotpAlgorithm::Sha1,
                    portcullis_core::TotpConfig::DEFAULT_PERIOD,
                )
                .map_err(|e| ClientError::Config(format!("{SECRET_ENV}: {e}")))?;
                CodeSource::secret(config)
            }
            None => {
                let hint = format!(
                    "no stored session for this server and no code source: run `portcullis login \
                     --dir {} --device {device} ...` first, or set {SECRET_ENV}",
                    dir.display()
                );
                CodeSource::callback(move || Err(hint.clone()))
            }
        };
        Client::builder()
            .dir(dir, device)?
            .user(user)
            .code_source(codes)
            .build()
    }

    /// Connects to `addr` (`host:port`, or a URI `https://host:port` as tonic's `Channel`
    /// takes it) now and waits for the server's Verdict.
    ///
    /// A refused connection is [`ClientError::Rejected`] carrying the `tonic::Status` an RPC
    /// would report; TLS problems are [`ClientError::Tls`]. Later connections of the channel
    /// (after a disconnect) are made on demand and use the session ticket when there is one.
    pub async fn connect(&self, addr: &str) -> Result<PortcullisChannel, ClientError> {
        let (target, endpoint) = target(&self.inner, addr)?;
        let channel = connect_target(&target, endpoint).await?;
        Ok(PortcullisChannel::new(channel, target))
    }

    /// A channel to `addr` (`host:port` or `https://host:port`) that connects on its first RPC. Must be called
    /// within a tokio runtime.
    pub fn connect_lazy(&self, addr: &str) -> Result<PortcullisChannel, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::Config(
                "connect_lazy must be called within a tokio runtime".into(),
            ));
        }
        let (target, endpoint) = target(&self.inner, addr)?;
        let channel = endpoint.connect_with_connector_lazy(PcsConnector {
            target: target.clone(),
        });
        Ok(PortcullisChannel::new(channel, target))
    }

    /// The session ticket the client holds, if it has not expired by the client clock.
    pub fn session(&self) -> Option<SessionInfo> {
        self.inner.tickets.info(self.inner.clock.now_ms())
    }

    /// Drops (and wipes) the session ticket: the next connection asks for a code.
    pub fn forget_session(&self) {
        self.inner.tickets.forget();
    }

    /// The last Verdict any connection of this client received.
    pub fn last_verdict(&self) -> Option<VerdictInfo> {
        self.inner
            .last_verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The user this client claims.
    pub fn user(&self) -> &str {
        &self.inner.user
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.inner.user)
            .field("server_name", &self.inner.server_name)
            .field("agent", &self.inner.agent)
            .field("code_source", &self.inner.codes)
            .field("session", &self.session())
            .finish_non_exhaustive()
    }
}
