//! Revocation that reaches connections already open.
//!
//! The gate decides once per connection: a device revoked in the registry, or a certificate
//! added to a certificate revocation list, is refused from the next connection on. An HTTP/2
//! connection accepted before may live for hours; this module closes such connections too.
//!
//! ## Live connections
//!
//! Every connection handed to tonic is registered here, under its device fingerprint, until
//! tonic drops it. A background task (one per server, started by
//! [`crate::PortcullisServer::incoming`]) runs every [`REVOCATION_CHECK_INTERVAL`] (250 ms) and,
//! only for the fingerprints that have live connections, reads the same snapshot the gate reads
//! to decide a connection ([`portcullis_core::GateStore::snapshot`]: the binding, its user's
//! roles, and the session a connection holds), one per device and session. A
//! connection is closed when its device binding was revoked (`portcullis device revoke`, or
//! `portcullis user revoke`, which revokes every device of a user), when the fingerprint is now
//! bound under another name or to another user, or when it is bound to nothing. The registry
//! is asked afresh on every round, so a change made by another process (the command line
//! writing the same SQLite file) is seen within one round: a revoked device loses its open
//! connections within about a quarter of a second, well under one second. Its session tickets
//! stop working at the same moment, since a ticket only opens a connection whose device
//! binding stands (PROTOCOL.md section 5, step 4.4).
//!
//! ## The change log
//!
//! On a registry that keeps a change log ([`portcullis_core::GateStore::changes_since`]: the
//! PostgreSQL registry records every revocation and role change there, numbered in commit
//! order), a round first reads what was recorded since the last round (one statement), and
//! then reads only the connections the changes name (by device, user or session), together
//! with every connection no round has read yet: a round with no change costs one statement,
//! however many connections are live. When the log cannot say what changed (pruned past the
//! round's position, numbered lower after a failover, its notifications interrupted) the round
//! reads every connection again (a resync), and it does so anyway every
//! [`FULL_READ_INTERVAL`] (60 s), for changes made in the database by hand. A registry without
//! a log (SQLite, memory) is asked for every live connection on every round.
//!
//! The same round carries role changes to live connections: each connection's
//! [`AuthContext::roles`] is replaced by the roles its user holds now, so that per-call policy
//! ([`crate::policy::PolicyLayer`]) never reads the registry and still sees a role granted or
//! taken away within a round.
//!
//! ## Expired certificates
//!
//! Every round also closes the connections whose device certificate's notAfter has passed (on
//! the gate's clock or the system's); a resumed TLS session of such a certificate is refused
//! at accept ([`portcullis_core::ServerCause::CertificateExpired`]).
//!
//! Every connection closed here leaves one audit record, outcome
//! [`crate::AuditOutcome::Ended`], with the REF of its accepting Verdict and the cause
//! (`device_revoked`, `cert_expired`, `server_stopping`, ...), counted in the metric
//! `portcullis_live_connections_closed_total`.
//!
//! Closing a connection makes its stream fail every read and write from then on (a waiting
//! read is woken at once); hyper then drops the connection and every request on it fails. The
//! client sees the connection end; a reconnect is refused with DEVICE_REVOKED.
//!
//! A registry that fails during a round does not close anything (the connections were
//! authenticated; a registry that is briefly busy must not cut every client off): the failure
//! is logged and the next round asks again. New connections still fail closed, as ever.
//!
//! ## Certificate revocation lists
//!
//! With a CRL file ([`crate::Builder::crl_file`]) the server's client certificate verifier is
//! a [`ReloadableClientVerifier`]. The file is polled every [`CRL_POLL_INTERVAL`] (250 ms); when
//! its modification time or size changes it is loaded again (PEM or DER) and the verifier's
//! lists are replaced: full TLS handshakes from then on use the new lists, and the server's
//! TLS session cache is kept. A file that cannot be loaded leaves the lists in force as they
//! were, with a warning. rustls does not check revocation again on a resumed TLS session, so
//! the leaf certificate of **every** connection is checked against the current lists right
//! after its handshake, by issuer and serial number: a listed certificate is refused with
//! DEVICE_REVOKED before its Prefix is read, whether the session was resumed or not. TLS
//! resumption itself stays on. When the lists change, every live connection whose certificate
//! they now list is closed, in the same round: within about half a second of the new file.
//!
//! ## Revoked sessions and standard clients
//!
//! A connection that earned a session (an accepted code) or holds one (a session ticket) is
//! also checked, in every round, against that session: it is closed as soon as the session is
//! revoked (`portcullis session revoke`). Each session is looked up once per round, however
//! many connections share it.
//!
//! A standard gRPC client ([`crate::standard`]) is let in on a live session alone: its
//! connection is closed also when that session has expired, whatever
//! [`crate::Builder::close_on_session_expiry`] says.
//!
//! ## Expired sessions
//!
//! Off by default: with [`crate::Builder::close_on_session_expiry`] a live connection is also
//! closed once the session ticket it holds or was given expires, so that no connection outlives
//! the proof of its second factor. Without it, a connection that was accepted stays open as long
//! as client and server keep it (unless its device, certificate or session is revoked), and only
//! reconnects need a valid ticket or a new code.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, SystemTime};

use atomic_waker::AtomicWaker;
use portcullis_core::{
    ChangeTail, DeviceFingerprint, Gate, GateStore, Need, SessionId, SessionNeed,
};
use portcullis_tls::{CertificateDer, PrivateKeyDer, ReloadableClientVerifier};
use tokio::time::MissedTickBehavior;

use crate::ServerError;
use crate::audit::Auditor;
use crate::context::AuthContext;
use crate::stamp::Stamp;

/// How often the devices of live connections are checked against the registry.
pub const REVOCATION_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// How often a round reads every live connection's state even though the registry's change
/// log names none of them: what was changed in the database without a change record (by hand,
/// in SQL) reaches live connections within this time.
pub const FULL_READ_INTERVAL: Duration = Duration::from_secs(60);

/// How long one registry read of a revocation round may take; beyond it the round counts as
/// failed (the registry does not answer) and ends.
pub const ROUND_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a CRL file ([`crate::Builder::crl_file`]) is checked for changes (its modification
/// time and size: one `stat` call): every round of checks.
pub const CRL_POLL_INTERVAL: Duration = REVOCATION_CHECK_INTERVAL;

/// Why a live connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum CloseReason {
    DeviceRevoked = 1,
    DeviceRebound = 2,
    DeviceUnbound = 3,
    CertificateRevoked = 4,
    SessionExpired = 5,
    SessionRevoked = 6,
    ServerStopping = 7,
    RegistryUnreachable = 8,
    CertificateExpired = 9,
}

impl CloseReason {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::DeviceRevoked,
            2 => Self::DeviceRebound,
            3 => Self::DeviceUnbound,
            4 => Self::CertificateRevoked,
            5 => Self::SessionExpired,
            9 => Self::CertificateExpired,
            6 => Self::SessionRevoked,
            7 => Self::ServerStopping,
            8 => Self::RegistryUnreachable,
            _ => return None,
        })
    }

    /// The cause in the log.
    fn as_str(self) -> &'static str {
        match self {
            Self::DeviceRevoked => "device_revoked",
            Self::DeviceRebound => "device_rebound",
            Self::DeviceUnbound => "device_unknown",
            Self::CertificateRevoked => "certificate_revoked",
            Self::SessionExpired => "session_expired",
            Self::SessionRevoked => "session_revoked",
            Self::ServerStopping => "server_stopping",
            Self::RegistryUnreachable => "registry_unreachable",
            Self::CertificateExpired => "cert_expired",
        }
    }

    /// What the stream's reads and writes fail with.
    fn hint(self) -> &'static str {
        match self {
            Self::DeviceRevoked => "the device was revoked",
            Self::DeviceRebound => "the device is now bound to another user or name",
            Self::DeviceUnbound => "the device is no longer bound to a user",
            Self::CertificateRevoked => "the client certificate is listed in the server's CRL",
            Self::SessionExpired => "the session expired",
            Self::SessionRevoked => "the session was revoked",
            Self::ServerStopping => "the server is stopping",
            Self::RegistryUnreachable => {
                "the server could not confirm the device with its registry for too long"
            }
            Self::CertificateExpired => "the device certificate expired",
        }
    }
}

/// One authenticated connection that tonic holds.
struct LiveEntry {
    id: u64,
    auth: Arc<AuthContext>,
    /// The peer's certificates, kept (shared with tonic's connect info) only when the server
    /// checks CRLs.
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The session the connection holds or earned: it is closed when the session is revoked.
    session: Option<SessionId>,
    /// A standard client let in on `session` alone: closed also when the session expires.
    lives_with_session: bool,
    /// Whether a round has read this connection's state: until one has, every round reads
    /// it, whatever the change log says (it may have been decided on a read older than the
    /// log's position).
    checked: AtomicBool,
    /// 0 while open, else a [`CloseReason`].
    closed: AtomicU8,
    /// Where the record of its closing goes.
    auditor: Arc<Auditor>,
    /// When it was handed to tonic.
    opened: std::time::Instant,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl LiveEntry {
    fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.closed.load(Ordering::Acquire))
    }

    /// Closes the connection (the first reason wins) and wakes whatever waits on it; whether
    /// this was the first reason.
    fn close(&self, reason: CloseReason) -> bool {
        if self
            .closed
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // One audit record (which also goes to the log and the metrics).
        self.auditor.live_closed(
            &self.auth,
            reason.as_str(),
            reason.hint(),
            self.opened.elapsed(),
        );
        self.read.wake();
        self.write.wake();
        true
    }
}

/// The registration of one live connection, held by its [`crate::AuthenticatedStream`]:
/// tells the stream when to fail, and unregisters the connection when dropped.
pub(crate) struct Watch {
    entry: Arc<LiveEntry>,
    owner: Arc<Revocation>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("id", &self.entry.id)
            .field("closed", &self.entry.reason().map(CloseReason::as_str))
            .finish()
    }
}

/// Which side of the stream waits.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Read,
    Write,
}

impl Watch {
    /// `Err` once the connection was closed.
    pub(crate) fn check(&self) -> io::Result<()> {
        match self.entry.reason() {
            None => Ok(()),
            Some(reason) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the server closed the connection: {}", reason.hint()),
            )),
        }
    }

    /// Called when the stream's `side` is about to wait: the waker is woken when the connection
    /// is closed. `Err` if it already is.
    pub(crate) fn park(&self, side: Side, waker: &Waker) -> io::Result<()> {
        match side {
            Side::Read => self.entry.read.register(waker),
            Side::Write => self.entry.write.register(waker),
        }
        // After registering: a close that happened before is seen here, one that happens
        // after wakes the waker.
        self.check()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.owner.remove(&self.entry);
    }
}

/// The certificate chain, key and client CAs given to [`crate::Builder::identity`], kept so
/// that the TLS configuration can be made again with a CRL-checking verifier.
pub(crate) struct IdentityParts {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) roots: Vec<CertificateDer<'static>>,
}

/// The builder's revocation settings.
#[derive(Default)]
pub(crate) struct Settings {
    pub(crate) identity: Option<IdentityParts>,
    pub(crate) crl_file: Option<PathBuf>,
    /// What a CRL past its nextUpdate means ([`crate::Builder::crl_stale`]).
    pub(crate) crl_stale: CrlStale,
    pub(crate) verifier: Option<Arc<ReloadableClientVerifier>>,
    pub(crate) close_on_session_expiry: bool,
    /// How often a round runs when nothing wakes it ([`REVOCATION_CHECK_INTERVAL`] unless set).
    pub(crate) interval: Option<Duration>,
    /// What wakes a round early (a registry's change feed).
    pub(crate) wake: Option<Arc<tokio::sync::Notify>>,
    /// Strict revocation: how long live connections may go unconfirmed before they are closed.
    pub(crate) strict: Option<Duration>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("crl_file", &self.crl_file)
            .field("client_verifier", &self.verifier.is_some())
            .field("close_on_session_expiry", &self.close_on_session_expiry)
            .field("interval", &self.interval)
            .field("woken", &self.wake.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The TLS configuration to serve with (made again from the identity when the server must
    /// check CRLs with its own verifier) and the revocation state.
    pub(crate) fn finish(
        self,
        tls: Arc<rustls::ServerConfig>,
        auditor: Arc<Auditor>,
    ) -> Result<(Arc<rustls::ServerConfig>, Revocation), ServerError> {
        let crls =
            match &self.crl_file {
                Some(path) => Some(portcullis_tls::load_crls(path).map_err(|e| {
                    ServerError::Config(format!("certificate revocation list: {e}"))
                })?),
                None => None,
            };
        let (tls, verifier) = match (self.verifier, self.identity) {
            (Some(verifier), identity) => {
                if let Some(crls) = crls {
                    verifier
                        .set_crls(crls)
                        .map_err(|e| crl_error(&self.crl_file, &e))?;
                }
                let tls = match identity {
                    // The identity's configuration is made again around the given verifier.
                    Some(parts) => with_verifier(parts, verifier.clone())?,
                    // The caller's configuration was made with this verifier.
                    None => tls,
                };
                (tls, Some(verifier))
            }
            (None, Some(parts)) if crls.is_some() => {
                let crls = crls.unwrap_or_default();
                let verifier = Arc::new(
                    ReloadableClientVerifier::new(&parts.roots, crls)
                        .map_err(|e| crl_error(&self.crl_file, &e))?,
                );
                (with_verifier(parts, verifier.clone())?, Some(verifier))
            }
            (None, None) if crls.is_some() => {
                return Err(ServerError::Config(
                    "a CRL file needs the TLS configuration made by Builder::identity, or \
                     Builder::client_verifier with the verifier of the TLS configuration"
                        .into(),
                ));
            }
            (None, _) => (tls, None),
        };
        let crl_file = self.crl_file.map(|path| {
            let stamp = Stamp::of(&path);
            Mutex::new(CrlFile {
                path,
                stamp,
                warned_stale: None,
            })
        });
        let generation = verifier.as_ref().map_or(0, |v| v.generation());
        Ok((
            tls,
            Revocation {
                live: Mutex::new(Live::default()),
                verifier,
                crl_file,
                crl_stale: self.crl_stale,
                close_on_session_expiry: self.close_on_session_expiry,
                seen_generation: AtomicU64::new(generation),
                started: AtomicBool::new(false),
                registry_failing: AtomicBool::new(false),
                interval: self.interval.unwrap_or(REVOCATION_CHECK_INTERVAL),
                wake: self.wake,
                strict: self.strict,
                confirmed: Mutex::new(std::time::Instant::now()),
                tail: Mutex::new(TailState::default()),
                auditor,
            },
        ))
    }
}

fn crl_error(path: &Option<PathBuf>, error: &portcullis_tls::TlsError) -> ServerError {
    match path {
        Some(path) => ServerError::Config(format!(
            "certificate revocation list: {}: {error}",
            path.display()
        )),
        None => ServerError::Config(format!("certificate revocation list: {error}")),
    }
}

fn with_verifier(
    parts: IdentityParts,
    verifier: Arc<ReloadableClientVerifier>,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    Ok(portcullis_tls::server_config_with_verifier(
        parts.chain,
        parts.key,
        verifier,
        &[portcullis_core::codec::ALPN_PCS1],
    )?)
}

struct CrlFile {
    path: PathBuf,
    /// The version last loaded, or last found unusable.
    stamp: Option<Stamp>,
    /// The verifier generation whose out-of-date lists were last warned of.
    warned_stale: Option<u64>,
}

/// What the server does while its certificate revocation lists are past their nextUpdate (the
/// issuer may have revoked certificates they do not list) ([`crate::Builder::crl_stale`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CrlStale {
    /// New connections are refused with OVERLOADED (cause `crl_stale`) until a current list
    /// is loaded: fail closed. Live connections stay open. The default.
    #[default]
    Refuse,
    /// The lists stay in use, with a warning in the log and the metric
    /// `portcullis_crl_stale` at 1.
    Warn,
}

#[derive(Default)]
struct Live {
    by_device: HashMap<DeviceFingerprint, HashMap<u64, Arc<LiveEntry>>>,
    next_id: u64,
    count: usize,
}

/// The live connections of a server and what may close them.
pub(crate) struct Revocation {
    live: Mutex<Live>,
    verifier: Option<Arc<ReloadableClientVerifier>>,
    crl_file: Option<Mutex<CrlFile>>,
    crl_stale: CrlStale,
    close_on_session_expiry: bool,
    /// The verifier generation the live connections were last checked against.
    seen_generation: AtomicU64,
    started: AtomicBool,
    /// Set while the registry fails, so that a long failure logs one warning.
    registry_failing: AtomicBool,
    /// How often a round runs when nothing wakes it.
    interval: Duration,
    /// What wakes a round early, besides the interval.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// Strict revocation ([`crate::Builder::strict_revocation`]).
    strict: Option<Duration>,
    /// When the registry last confirmed every live connection (or none was live).
    confirmed: Mutex<std::time::Instant>,
    /// Where the rounds stand in the registry's change log.
    tail: Mutex<TailState>,
    /// The audit trail, which records every live connection the server closes.
    auditor: Arc<Auditor>,
}

/// Where the rounds stand in the registry's change log ([`GateStore::changes_since`]).
#[derive(Debug, Default)]
struct TailState {
    /// The number of the last change applied; `None` until a round has read everything.
    after: Option<u64>,
    /// When a round last read every live connection.
    full_read: Option<std::time::Instant>,
}

/// Which live connections a round reads.
enum Scope {
    /// Every one: the store keeps no change log, or the round resyncs. `head` is where the
    /// log stood before the reads, if it has one.
    All { head: Option<u64> },
    /// Those the changes name (and those no round has read yet).
    Named {
        fingerprints: HashSet<DeviceFingerprint>,
        users: HashSet<String>,
        sessions: HashSet<SessionId>,
        head: u64,
    },
}

impl Scope {
    /// Whether the round reads `entry`'s state.
    fn reads(&self, entry: &LiveEntry) -> bool {
        match self {
            Self::All { .. } => true,
            Self::Named {
                fingerprints,
                users,
                sessions,
                ..
            } => {
                !entry.checked.load(Ordering::Acquire)
                    || fingerprints.contains(&entry.auth.fingerprint)
                    || users.contains(&entry.auth.user)
                    || entry.session.is_some_and(|s| sessions.contains(&s))
            }
        }
    }

    /// Where the log stands once the round's reads succeeded.
    fn head(&self) -> Option<u64> {
        match self {
            Self::All { head } => *head,
            Self::Named { head, .. } => Some(*head),
        }
    }
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("live", &self.live_count())
            .field("crl_checks", &self.verifier.is_some())
            .field("close_on_session_expiry", &self.close_on_session_expiry)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a single insert or removal: a panic elsewhere cannot
    // leave the maps half changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Revocation {
    /// The verifier that checks CRLs, when the server has one.
    pub(crate) fn verifier(&self) -> Option<&Arc<ReloadableClientVerifier>> {
        self.verifier.as_ref()
    }

    /// How many authenticated connections tonic holds.
    pub(crate) fn live_count(&self) -> usize {
        lock(&self.live).count
    }

    /// Whether the current CRLs list the leaf certificate of a connection just after its TLS
    /// handshake (full or resumed). `false` when the server checks no CRLs.
    /// The earliest nextUpdate of the CRLs in force (Unix seconds) when it has passed at
    /// `now_ms`; `None` when the lists are current, or there are none.
    pub(crate) fn stale_crl(&self, now_ms: u64) -> Option<i64> {
        let revoked = self.verifier.as_ref()?.revoked();
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        revoked
            .is_stale_at(now_s)
            .then(|| revoked.next_update_unix())
            .flatten()
    }

    /// Whether new connections are refused now because the CRLs are out of date.
    pub(crate) fn refuses_for_stale_crl(&self, now_ms: u64) -> Option<i64> {
        match self.crl_stale {
            CrlStale::Refuse => self.stale_crl(now_ms),
            CrlStale::Warn => None,
        }
    }

    pub(crate) fn certificate_revoked(&self, conn: &rustls::ServerConnection) -> bool {
        let Some(verifier) = &self.verifier else {
            return false;
        };
        match conn.peer_certificates().and_then(|certs| certs.first()) {
            Some(leaf) => verifier.is_revoked(leaf),
            // No certificate: refused elsewhere.
            None => false,
        }
    }

    /// Registers an authenticated connection: from now on it is closed when its device or
    /// certificate is revoked, when `session` (the session it holds or earned) is revoked, and,
    /// with `lives_with_session` (a standard client let in on that session alone), when the
    /// session expires.
    pub(crate) fn register(
        self: &Arc<Self>,
        auth: Arc<AuthContext>,
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        session: Option<SessionId>,
        lives_with_session: bool,
    ) -> Watch {
        let certs = if self.verifier.is_some() { certs } else { None };
        let mut live = lock(&self.live);
        live.next_id += 1;
        let entry = Arc::new(LiveEntry {
            id: live.next_id,
            auth,
            certs,
            session,
            lives_with_session,
            checked: AtomicBool::new(false),
            closed: AtomicU8::new(0),
            auditor: self.auditor.clone(),
            opened: std::time::Instant::now(),
            read: AtomicWaker::new(),
            write: AtomicWaker::new(),
        });
        live.by_device
            .entry(entry.auth.fingerprint)
            .or_default()
            .insert(entry.id, entry.clone());
        live.count += 1;
        // Checked under the lock: lists replaced after this check are applied to this entry by
        // the next round, which finds it registered.
        if let (Some(verifier), Some(certs)) = (&self.verifier, &entry.certs)
            && certs.first().is_none_or(|leaf| verifier.is_revoked(leaf))
        {
            entry.close(CloseReason::CertificateRevoked);
        }
        drop(live);
        Watch {
            entry,
            owner: self.clone(),
        }
    }

    fn remove(&self, entry: &LiveEntry) {
        let mut live = lock(&self.live);
        let fingerprint = entry.auth.fingerprint;
        if let Some(entries) = live.by_device.get_mut(&fingerprint)
            && entries.remove(&entry.id).is_some()
        {
            if entries.is_empty() {
                live.by_device.remove(&fingerprint);
            }
            live.count -= 1;
        }
    }

    /// Whether a round has anything to do.
    fn has_work(&self) -> bool {
        self.crl_file.is_some() || self.live_count() > 0
    }

    /// Closes every live connection because the server is stopping; how many were open.
    pub(crate) fn close_all(&self) -> usize {
        let entries: Vec<Arc<LiveEntry>> = lock(&self.live)
            .by_device
            .values()
            .flat_map(|entries| entries.values().cloned())
            .collect();
        let mut closed = 0;
        for entry in entries {
            if entry.reason().is_none() {
                entry.close(CloseReason::ServerStopping);
                closed += 1;
            }
        }
        closed
    }

    /// Which connections this round reads: what the registry's change log names since the
    /// last round, or every one (no change log, a resync, or [`FULL_READ_INTERVAL`] passed).
    fn scope(
        &self,
        store: &dyn GateStore,
        handle: &tokio::runtime::Handle,
    ) -> Result<Scope, String> {
        let (after, full_due) = {
            let tail = lock(&self.tail);
            let due = tail
                .full_read
                .is_none_or(|at| at.elapsed() >= FULL_READ_INTERVAL);
            (tail.after, due)
        };
        let ask = if full_due { None } else { after };
        let read = handle.block_on(tokio::time::timeout(
            ROUND_READ_TIMEOUT,
            store.changes_since(ask),
        ));
        let tail = match read {
            Ok(Ok(tail)) => tail,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "no answer within {} ms",
                    ROUND_READ_TIMEOUT.as_millis()
                ));
            }
        };
        Ok(match tail {
            ChangeTail::Unsupported => Scope::All { head: None },
            ChangeTail::Resync { head } => {
                if ask.is_some() {
                    tracing::info!(
                        after = ask,
                        head,
                        "the registry's change log cannot say what changed; every live connection is read again"
                    );
                }
                Scope::All { head: Some(head) }
            }
            ChangeTail::Changes { changes, head } => {
                let mut scope = (HashSet::new(), HashSet::new(), HashSet::new());
                for change in changes {
                    scope.0.extend(change.fingerprint);
                    scope.1.extend(change.user);
                    scope.2.extend(change.session);
                }
                Scope::Named {
                    fingerprints: scope.0,
                    users: scope.1,
                    sessions: scope.2,
                    head,
                }
            }
        })
    }

    /// One round: the CRL file, then the live connections against the CRLs, the registry and
    /// (when on) their session expiry. Blocking (file and registry I/O).
    ///
    /// On a registry with a change log the round first reads the log, and then only the
    /// connections its changes name (and those no round has read yet); a registry without
    /// one is asked for every live connection on every round.
    fn check(&self, gate: &Gate) {
        if let (Some(file), Some(verifier)) = (&self.crl_file, &self.verifier) {
            poll_crl_file(file, verifier);
            self.warn_stale_crl(file, verifier, gate.clock().now_ms());
        }
        let store = gate.store();
        let now = gate.clock().now_ms();
        let handle = tokio::runtime::Handle::current();
        // The log is read before the live connections are listed: a connection registered
        // after this point is read by the next round (it is not yet `checked`).
        let scope = self.scope(store.as_ref(), &handle);
        // The generation is read before the snapshot: lists replaced after this point are
        // checked in the next round.
        let generation = self.verifier.as_ref().map(|v| v.generation());
        let snapshot: Vec<(DeviceFingerprint, Vec<Arc<LiveEntry>>)> = lock(&self.live)
            .by_device
            .iter()
            .map(|(fp, entries)| (*fp, entries.values().cloned().collect()))
            .collect();
        if snapshot.is_empty() {
            // Nothing held depends on the registry (a new connection needs it to be let in).
            *lock(&self.confirmed) = std::time::Instant::now();
            // The next connections are read in full: no log is tailed for nothing.
            *lock(&self.tail) = TailState::default();
        }

        if let (Some(verifier), Some(generation)) = (&self.verifier, generation)
            && self.seen_generation.swap(generation, Ordering::AcqRel) != generation
        {
            let revoked = verifier.revoked();
            for entry in snapshot.iter().flat_map(|(_, entries)| entries) {
                if let Some(certs) = &entry.certs
                    && certs
                        .first()
                        .is_none_or(|leaf| revoked.is_revoked(leaf).unwrap_or(true))
                {
                    entry.close(CloseReason::CertificateRevoked);
                }
            }
        }

        // One snapshot per device and session to read (the same read the gate makes to
        // decide a connection): the binding, the user's current roles, and the session's
        // record.
        let mut failed = scope.as_ref().err().cloned();
        if let Ok(scope) = &scope {
            'devices: for (fingerprint, entries) in &snapshot {
                let mut by_session: HashMap<Option<SessionId>, Vec<&Arc<LiveEntry>>> =
                    HashMap::new();
                for entry in entries
                    .iter()
                    .filter(|e| e.reason().is_none() && scope.reads(e))
                {
                    by_session.entry(entry.session).or_default().push(entry);
                }
                for (session, entries) in by_session {
                    let need = Need {
                        fingerprint: *fingerprint,
                        secret: false,
                        session: session.map_or(SessionNeed::None, SessionNeed::ById),
                        now_ms: now,
                    };
                    let read = match handle.block_on(tokio::time::timeout(
                        ROUND_READ_TIMEOUT,
                        store.snapshot(&need),
                    )) {
                        Ok(Ok(read)) => read,
                        // The registry fails or does not answer: the rest of the round would
                        // wait on it as well; the next round tries again.
                        Ok(Err(e)) => {
                            failed = Some(e.to_string());
                            break 'devices;
                        }
                        Err(_) => {
                            failed = Some(format!(
                                "no answer within {} ms",
                                ROUND_READ_TIMEOUT.as_millis()
                            ));
                            break 'devices;
                        }
                    };
                    for entry in entries {
                        entry.checked.store(true, Ordering::Release);
                        apply(entry, session, &read);
                    }
                }
            }
            if failed.is_none() {
                let mut tail = lock(&self.tail);
                if let Some(head) = scope.head() {
                    tail.after = Some(head);
                }
                if matches!(scope, Scope::All { .. }) {
                    tail.full_read = Some(std::time::Instant::now());
                }
            }
        }
        match failed {
            Some(e) => {
                let unconfirmed = lock(&self.confirmed).elapsed();
                match self.strict {
                    Some(limit) if unconfirmed >= limit => {
                        let mut closed = 0;
                        for entry in snapshot.iter().flat_map(|(_, entries)| entries) {
                            if entry.reason().is_none() {
                                entry.close(CloseReason::RegistryUnreachable);
                                closed += 1;
                            }
                        }
                        if closed > 0 {
                            tracing::warn!(
                                error = %e,
                                closed,
                                unconfirmed_ms = unconfirmed.as_millis() as u64,
                                "strict revocation: the registry has not confirmed live connections for too long; they are closed"
                            );
                        }
                    }
                    Some(_) => {
                        if !self.registry_failing.swap(true, Ordering::AcqRel) {
                            tracing::warn!(error = %e, "cannot check live connections against the registry; under strict revocation they are closed if it stays unreachable");
                        }
                    }
                    None => {
                        if !self.registry_failing.swap(true, Ordering::AcqRel) {
                            tracing::warn!(error = %e, "cannot check live connections against the registry; they stay open until it answers");
                        }
                    }
                }
            }
            None => {
                *lock(&self.confirmed) = std::time::Instant::now();
                if self.registry_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("the registry answers again; live connections are checked");
                }
            }
        }

        // What the clock alone decides, for every connection, read this round or not.
        let wall_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for entry in snapshot.iter().flat_map(|(_, entries)| entries) {
            // The device certificate's notAfter, on the gate's clock and on the system's (the
            // one rustls verified it by).
            if entry
                .auth
                .certificate_expires_ms
                .is_some_and(|at| at <= now || at <= wall_ms)
            {
                entry.close(CloseReason::CertificateExpired);
            }
            let expired = entry.auth.session_expires_ms.is_none_or(|at| at <= now);
            // Standard clients live only as long as the session they were let in on.
            if entry.session.is_some() && entry.lives_with_session && expired {
                entry.close(CloseReason::SessionExpired);
            }
            if self.close_on_session_expiry
                && entry.auth.session_expires_ms.is_some_and(|at| at <= now)
            {
                entry.close(CloseReason::SessionExpired);
            }
        }
    }
}

/// Closes `entry` when `read` (its device's snapshot, with `session`'s record) says it must
/// go; otherwise carries its user's current roles to it.
fn apply(entry: &LiveEntry, session: Option<SessionId>, read: &portcullis_core::Snapshot) {
    let reason = match &read.device {
        None => Some(CloseReason::DeviceUnbound),
        Some(d) if d.is_revoked() => Some(CloseReason::DeviceRevoked),
        Some(d) if d.user != entry.auth.user || d.name != entry.auth.device_name => {
            Some(CloseReason::DeviceRebound)
        }
        // A revoked session closes the connections that hold or earned it.
        Some(_)
            if session.is_some()
                && read
                    .session
                    .as_ref()
                    .is_some_and(|s| s.revoked_ms.is_some()) =>
        {
            Some(CloseReason::SessionRevoked)
        }
        Some(_) => None,
    };
    match reason {
        Some(reason) => {
            entry.close(reason);
        }
        None => {
            // A role change reaches the live connection's next call.
            if let Some(user) = &read.user
                && entry.auth.update_roles(&user.roles)
            {
                tracing::debug!(
                    user = %user.name,
                    roles = ?user.roles,
                    "roles of a live connection updated"
                );
            }
        }
    }
}

impl Revocation {
    /// Logs once per version of the lists that they are past their nextUpdate, naming the file.
    fn warn_stale_crl(
        &self,
        file: &Mutex<CrlFile>,
        verifier: &ReloadableClientVerifier,
        now_ms: u64,
    ) {
        let Some(next_update) = self.stale_crl(now_ms) else {
            return;
        };
        let mut file = lock(file);
        let generation = verifier.generation();
        if file.warned_stale == Some(generation) {
            return;
        }
        file.warned_stale = Some(generation);
        let next_update = crate::audit::format_time_s(next_update);
        match self.crl_stale {
            CrlStale::Refuse => tracing::error!(
                file = %file.path.display(),
                next_update,
                "certificate revocation list is past its nextUpdate: new connections are refused with OVERLOADED until a current one is in the file (--crl-stale refuse)"
            ),
            CrlStale::Warn => tracing::warn!(
                file = %file.path.display(),
                next_update,
                "certificate revocation list is past its nextUpdate and still used (--crl-stale warn): certificates revoked since are not refused"
            ),
        }
    }
}

/// Loads the CRL file again when it changed since the last poll.
fn poll_crl_file(file: &Mutex<CrlFile>, verifier: &ReloadableClientVerifier) {
    let mut file = lock(file);
    let stamp = Stamp::of(&file.path);
    if stamp == file.stamp {
        return;
    }
    // Remembered also when the file cannot be used: one warning per version of the file.
    file.stamp = stamp;
    let loaded = portcullis_tls::load_crls(&file.path)
        .map_err(|e| e.to_string())
        .and_then(|crls| {
            let count = crls.len();
            verifier
                .set_crls(crls)
                .map(|()| count)
                .map_err(|e| format!("{}: {e}", file.path.display()))
        });
    match loaded {
        Ok(count) => {
            let revoked = verifier.revoked();
            tracing::info!(
                file = %file.path.display(),
                crls = count,
                revoked_certificates = revoked.len(),
                "certificate revocation list reloaded"
            );
        }
        Err(e) => tracing::warn!(
            error = %e,
            "certificate revocation list not reloaded; the previous one stays in force"
        ),
    }
}

/// Starts the background task of a server's revocation checks, once. It holds weak handles: it
/// stops when the revocation state (the server and its last live connection) or the gate is
/// gone.
pub(crate) fn start(revocation: &Arc<Revocation>, gate: &Arc<Gate>) {
    if revocation.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let interval = revocation.interval;
    let wake = revocation.wake.clone();
    let (revocation, gate): (Weak<Revocation>, Weak<Gate>) =
        (Arc::downgrade(revocation), Arc::downgrade(gate));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            match &wake {
                // A change reported by the registry starts a round at once; the interval
                // still runs them when no report comes (a lost notification costs one interval).
                Some(wake) => tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                },
                None => {
                    tick.tick().await;
                }
            }
            let (Some(revocation), Some(gate)) = (revocation.upgrade(), gate.upgrade()) else {
                break;
            };
            if !revocation.has_work() {
                // Nothing held depends on the registry (a new connection needs it to be let
                // in): strict revocation counts from here.
                *lock(&revocation.confirmed) = std::time::Instant::now();
                continue;
            }
            // File and registry I/O: off the runtime's workers. Rounds never overlap.
            let round = tokio::task::spawn_blocking(move || {
                revocation.check(&gate);
            });
            if round.await.is_err() {
                tracing::error!("a revocation round failed; the next one runs as planned");
            }
        }
    });
}
