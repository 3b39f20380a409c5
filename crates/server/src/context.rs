//! What handlers learn about the connection a request came in on.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use portcullis_core::{AuthMethod, DeviceFingerprint, Identity, Ref};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The authenticated user and device of the connection a request came in on.
///
/// Every request that reaches a service behind Portcullis carries one in its extensions:
///
/// ```
/// use portcullis_server::AuthContext;
///
/// fn whoami<T>(request: &tonic::Request<T>) -> Result<String, tonic::Status> {
///     let auth = AuthContext::of(request)?;
///     Ok(format!("{} on {} ({})", auth.user, auth.device_name, auth.method))
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    /// The authenticated user.
    pub user: String,
    /// The device's name in the registry.
    pub device_name: String,
    /// The device certificate's fingerprint (`sha256:...`).
    pub fingerprint: DeviceFingerprint,
    /// How the second factor was proven on this connection: `totp` or `session`.
    pub method: AuthMethod,
    /// When the TOTP check was made, Unix ms (for a session: the check that earned it).
    pub totp_time_ms: u64,
    /// When the connection's session ticket expires, Unix ms, if sessions are on.
    pub session_expires_ms: Option<u64>,
    /// The client's address.
    pub peer_addr: SocketAddr,
    /// The REF of the connection's Verdict and audit record.
    pub reference: Ref,
    /// Whether the user is a service account (method `device`: no second factor).
    pub service: bool,
    /// The first Unix ms at which the device certificate of the connection is no longer valid
    /// (its notAfter has passed): the server closes the connection then.
    pub certificate_expires_ms: Option<u64>,
    /// The user's roles, shared by every request of the connection and kept current by the
    /// server's revocation round.
    roles: LiveRoles,
}

/// The roles of a connection's user: read when the connection was decided, confirmed or
/// replaced by every revocation round that reads the registry, so that per-call policy reads no
/// registry. Roles that went unconfirmed for long (the registry does not answer) are not
/// trusted ([`AuthContext::roles_age`]).
#[derive(Clone)]
struct LiveRoles(Arc<RwLock<(Arc<[String]>, Instant)>>);

impl LiveRoles {
    fn new(roles: Vec<String>) -> Self {
        Self(Arc::new(RwLock::new((roles.into(), Instant::now()))))
    }

    fn get(&self) -> Arc<[String]> {
        self.read().0
    }

    /// The roles and when they were last confirmed, in one read.
    fn read(&self) -> (Arc<[String]>, Instant) {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl PartialEq for LiveRoles {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for LiveRoles {}

impl fmt::Debug for LiveRoles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.get().iter()).finish()
    }
}

impl AuthContext {
    /// The connection's device certificate stops being valid at `expires_ms`.
    pub(crate) fn certificate_expiry(mut self, expires_ms: u64) -> Self {
        self.certificate_expires_ms = Some(expires_ms);
        self
    }

    pub(crate) fn new(identity: Identity, peer_addr: SocketAddr, reference: Ref) -> Self {
        Self {
            user: identity.user,
            device_name: identity.device_name,
            fingerprint: identity.fingerprint,
            method: identity.method,
            totp_time_ms: identity.totp_time_ms,
            session_expires_ms: identity.session.map(|(_, expires)| expires),
            peer_addr,
            reference,
            service: identity.method == AuthMethod::Device,
            certificate_expires_ms: None,
            roles: LiveRoles::new(identity.roles),
        }
    }

    /// The user's roles (sorted), as the registry holds them now: read when the connection was
    /// decided and refreshed by the server's revocation round (every 250 ms), so that a role
    /// change reaches live connections without a registry read per call.
    pub fn roles(&self) -> Arc<[String]> {
        self.roles.get()
    }

    /// How long ago the roles were read from the registry (when the connection was decided,
    /// or by the last revocation round that could read them).
    pub fn roles_age(&self) -> Duration {
        self.roles.read().1.elapsed()
    }

    /// The roles, if they were read from the registry at most `max_age` ago; else how long ago
    /// they were.
    pub(crate) fn roles_confirmed_within(
        &self,
        max_age: Duration,
    ) -> Result<Arc<[String]>, Duration> {
        let (roles, confirmed) = self.roles.read();
        let age = confirmed.elapsed();
        if age <= max_age { Ok(roles) } else { Err(age) }
    }

    /// The roles the registry holds now for the user, read by a revocation round: replaces
    /// them on this connection (and every request of it) and marks them confirmed; whether they
    /// changed.
    pub(crate) fn update_roles(&self, roles: &[String]) -> bool {
        let mut held = self.roles.0.write().unwrap_or_else(PoisonError::into_inner);
        held.1 = Instant::now();
        if *held.0 == *roles {
            return false;
        }
        held.0 = roles.into();
        true
    }

    /// The context of a request, or UNAUTHENTICATED when the request did not come through the
    /// Portcullis layer (which should not happen behind [`crate::PortcullisServer`]).
    #[allow(clippy::result_large_err)]
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&AuthContext, tonic::Status> {
        request.extensions().get::<AuthContext>().ok_or_else(|| {
            tonic::Status::unauthenticated("no Portcullis authentication on this connection")
        })
    }
}

/// The connection information of an authenticated connection, as tonic's `Connected` reports
/// it. The Portcullis layer ([`crate::AuthLayer`]) splits it into an [`AuthContext`] and tonic's
/// own `TlsConnectInfo<TcpConnectInfo>`, so that `request.peer_certs()` and
/// `request.remote_addr()` keep working.
#[derive(Debug, Clone)]
pub struct PortcullisConnectInfo {
    pub(crate) tls: TlsConnectInfo<TcpConnectInfo>,
    pub(crate) auth: Arc<AuthContext>,
}

impl PortcullisConnectInfo {
    /// The authenticated identity.
    pub fn auth(&self) -> &AuthContext {
        &self.auth
    }

    /// tonic's TLS connection information (peer certificates, addresses).
    pub fn tls(&self) -> &TlsConnectInfo<TcpConnectInfo> {
        &self.tls
    }
}
