//! The bottom of the client: what every channel of a client shares ([`ClientInner`]), one
//! channel's server ([`Target`]), and opening connections to it: TCP, TLS 1.3, the Prefix with
//! a session ticket or a code ([`open_first`], [`redial`]), and the code source asked for codes.
//! The connector, the stream, the channel and the client build on it; it builds on none of them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::codec::{ALPN_PCS1, Factor, Prefix, Verdict};
use portcullis_core::{Clock, Random, SystemRandom};
use portcullis_tls::CaHintResolver;
use rustls::pki_types::ServerName;
use subtle::ConstantTimeEq;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::Endpoint;
use zeroize::Zeroizing;

use crate::code::check_code;
use crate::error::{Failure, Rejection, wrong_alpn, wrong_version};
use crate::log::{ConnLog, ConnState};
use crate::session::{TicketCache, VerdictInfo};
use crate::{ClientError, CodeSource};

/// What every channel of a client shares.
pub(crate) struct ClientInner {
    pub(crate) tls: TlsConnector,
    pub(crate) server_name: Option<String>,
    pub(crate) user: String,
    pub(crate) codes: CodeSource,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) agent: String,
    pub(crate) rng: SystemRandom,
    pub(crate) tickets: TicketCache,
    pub(crate) connect_timeout: Duration,
    /// Around the TLS config's client certificate resolver: the CAs the server last named, for
    /// the message of a refused device certificate.
    pub(crate) ca_hints: Arc<CaHintResolver>,
    pub(crate) last_verdict: Mutex<Option<VerdictInfo>>,
    /// Per server (TLS server name and address, as the ticket cache): the last code it accepted
    /// from this client, wiped when replaced or dropped.
    pub(crate) spent_codes: Mutex<HashMap<(String, String), SpentCode>>,
}

/// A code a server accepted: spent there.
pub(crate) struct SpentCode {
    code: Zeroizing<String>,
    /// The acceptance came with a session ticket: the code was checked as a TOTP code (a
    /// service account's device is let in without a session, its placeholder code unspent).
    earned_session: bool,
}

impl ClientInner {
    pub(crate) fn record_verdict(&self, verdict: &Verdict) {
        *self.last_verdict.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(VerdictInfo::of(verdict));
    }

    /// Remembers `code` as the last code the server `(server_name, addr)` accepted; the
    /// previous one is wiped.
    pub(crate) fn remember_spent_code(
        &self,
        server_name: &str,
        addr: &str,
        code: Zeroizing<String>,
        earned_session: bool,
    ) {
        self.spent_codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (server_name.to_owned(), addr.to_owned()),
                SpentCode {
                    code,
                    earned_session,
                },
            );
    }

    /// Whether `code` is the last code the server `(server_name, addr)` accepted from this
    /// client, and if so whether that acceptance earned a session. Sending it again could only
    /// fail (a server accepts a code once) and count towards the user's lockout.
    pub(crate) fn spent_code(&self, server_name: &str, addr: &str, code: &str) -> Option<bool> {
        let spent = self.spent_codes.lock().unwrap_or_else(|p| p.into_inner());
        let entry = spent.get(&(server_name.to_owned(), addr.to_owned()))?;
        bool::from(entry.code.as_bytes().ct_eq(code.as_bytes())).then_some(entry.earned_session)
    }
}

/// `host:port` from a tonic-style URI (`https://host:port`, `http://host:port/`), or `addr`
/// itself. The connection is TLS whatever the scheme says: PCS1 has no plain-text form.
fn authority(addr: &str) -> &str {
    let rest = ["https://", "http://"]
        .iter()
        .find_map(|scheme| {
            addr.get(..scheme.len())
                .filter(|s| s.eq_ignore_ascii_case(scheme))
                .map(|_| &addr[scheme.len()..])
        })
        .unwrap_or(addr);
    rest.strip_suffix('/').unwrap_or(rest)
}

/// The host part of `host:port` (`[v6]:port` for IPv6).
fn host_of(addr: &str) -> Result<&str, ClientError> {
    let bad = || ClientError::Config(format!("`{addr}` is not host:port"));
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
        (host, port)
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') {
            return Err(bad());
        }
        (host, port)
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(host)
}

/// A new target for `addr` (`host:port` or `https://host:port`) and the tonic endpoint whose
/// connector opens its connections.
pub(crate) fn target(
    client: &Arc<ClientInner>,
    addr: &str,
) -> Result<(Arc<Target>, Endpoint), ClientError> {
    let addr = authority(addr);
    let host = host_of(addr)?;
    let name = client.server_name.as_deref().unwrap_or(host).to_owned();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| ClientError::Config(format!("`{name}` is not a valid TLS server name")))?;
    // The connector does TLS itself: tonic sees plain `http://`.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Config(format!("`{addr}` is not a valid address: {e}")))?
        .connect_timeout(client.connect_timeout);
    let target = Arc::new(Target {
        client: client.clone(),
        addr: addr.to_owned(),
        server_name,
        log: ConnLog::default(),
        calls: AtomicU64::new(0),
        preset_code: Mutex::new(None),
    });
    Ok((target, endpoint))
}

/// One channel's server: where to connect, and the record of its connections.
pub(crate) struct Target {
    pub(crate) client: Arc<ClientInner>,
    /// `host:port`, as the caller gave it.
    pub(crate) addr: String,
    /// The TLS server name the server's certificate is verified against.
    pub(crate) server_name: ServerName<'static>,
    pub(crate) log: ConnLog,
    /// How many calls the channel has taken (see [`ConnLog::failed_since`]).
    pub(crate) calls: AtomicU64,
    /// A code fetched ahead for the channel's next connection (a step-up), used instead of
    /// the session ticket or a new code.
    pub(crate) preset_code: std::sync::Mutex<Option<Zeroizing<String>>>,
}

impl Target {
    /// The verified TLS server name as text: half of the session-ticket cache key.
    pub(crate) fn server_name_text(&self) -> Cow<'_, str> {
        self.server_name.to_str()
    }
}

/// What a connection's Prefix proved the second factor with.
pub(crate) enum Proof {
    /// A session ticket (kept to drop exactly it on MFA_REQUIRED, and for the replay).
    Ticket(Zeroizing<Vec<u8>>),
    /// A code from the code source (remembered as accepted if the Verdict accepts it).
    Code(Zeroizing<String>),
}

/// Records the outcome of one connection; a connection dropped before its Verdict is recorded
/// as failed, so nobody waits for it forever.
pub(crate) struct ConnGuard {
    pub(crate) target: Arc<Target>,
    pub(crate) id: u64,
    settled: bool,
}

impl ConnGuard {
    pub(crate) fn begin(target: Arc<Target>, calls: u64) -> Self {
        let id = target.log.begin(calls);
        Self {
            target,
            id,
            settled: false,
        }
    }

    pub(crate) fn settle(&mut self, state: ConnState) {
        self.settled = true;
        self.target.log.settle(self.id, state);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if !self.settled {
            self.target.log.settle(
                self.id,
                ConnState::Failed(Failure::Io {
                    kind: std::io::ErrorKind::ConnectionAborted,
                    detail: "the connection was closed before the server's verdict".into(),
                }),
            );
        }
    }
}

/// The first connection of a [`PcsStream`]: with the session ticket when the cache has a live
/// one for this server name and address, else with a code. Returns the TLS stream, its encoded
/// Prefix (not yet written) and what the Prefix carries.
pub(crate) async fn open_first(
    target: &Target,
) -> Result<(TlsStream<TcpStream>, Zeroizing<Vec<u8>>, Proof), Failure> {
    let client = &target.client;
    let preset = target
        .preset_code
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(code) = preset {
        let (tls, prefix) = open(target, Factor::Totp(code.to_string()), &[]).await?;
        return Ok((tls, prefix, Proof::Code(code)));
    }
    let ticket = client.tickets.valid_for(
        &target.server_name_text(),
        &target.addr,
        client.clock.now_ms(),
    );
    match ticket {
        Some(ticket) => {
            let (tls, prefix) = open(target, Factor::Session(ticket.to_vec()), &[]).await?;
            Ok((tls, prefix, Proof::Ticket(ticket)))
        }
        None => {
            let (code, spent) = fetch_code_for(target).await?;
            // A code spent on a session there: a service account's placeholder code, accepted
            // without a session, may go again.
            if spent == Some(true) {
                // Sent again it could only be refused as reused.
                return Err(Failure::Code(
                    "it gave the code the server already accepted from this client, and a code \
                     is accepted once: give the next code (the session ticket that would have \
                     spared it is gone: expired, refused or forgotten)"
                        .into(),
                ));
            }
            let (tls, prefix) = open(target, Factor::Totp(code.to_string()), &[]).await?;
            Ok((tls, prefix, Proof::Code(code)))
        }
    }
}

/// A replacement connection, open and with its Prefix and the replayed bytes ready to go.
pub(crate) struct Reopened {
    pub(crate) tls: TlsStream<TcpStream>,
    /// The encoded Prefix followed by the replayed bytes, not yet written.
    pub(crate) frame: Zeroizing<Vec<u8>>,
    /// The code the Prefix carries.
    pub(crate) code: Zeroizing<String>,
}

/// A replacement connection after `refusal` (MFA_REQUIRED): a fresh code, then the bytes hyper
/// already wrote on the refused connection (sent by the [`PcsStream`] right behind the
/// Prefix).
///
/// A code equal to the last one a server accepted from this client (a fixed code, or a TOTP
/// secret still in the same time step) is not sent: the server would refuse it as reused and
/// count the attempt towards the user's lockout. The refusal is reported instead. The whole
/// attempt is bounded by the connect timeout.
pub(crate) async fn redial(
    target: Arc<Target>,
    replay: Zeroizing<Vec<u8>>,
    refusal: Arc<Rejection>,
) -> Result<Reopened, Failure> {
    let timeout = target.client.connect_timeout;
    let attempt = async {
        let (code, spent) = fetch_code_for(&target).await?;
        if spent.is_some() {
            return Err(Failure::Rejected(refusal));
        }
        let (tls, frame) = open(&target, Factor::Totp(code.to_string()), &replay).await?;
        Ok(Reopened { tls, frame, code })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Io {
            kind: std::io::ErrorKind::TimedOut,
            detail: format!(
                "could not reopen the connection within {} s",
                timeout.as_secs_f64()
            ),
        }),
    }
}

/// A code from the code source for a connection to `target`, and whether the server there
/// already accepted that very code from this client (`Some`; `Some(true)` when it earned a
/// session with it): such a code is not to be sent again.
pub(crate) async fn fetch_code_for(
    target: &Target,
) -> Result<(Zeroizing<String>, Option<bool>), Failure> {
    let code = fetch_code(&target.client).await?;
    let spent = target
        .client
        .spent_code(&target.server_name_text(), &target.addr, &code);
    if spent.is_some() {
        tracing::debug!("the code source gave the code this server already accepted");
    }
    Ok((code, spent))
}

/// Asks the code source for a code; a callback runs on the blocking pool.
pub(crate) async fn fetch_code(client: &Arc<ClientInner>) -> Result<Zeroizing<String>, Failure> {
    let now_ms = client.clock.now_ms();
    let code = match &client.codes {
        CodeSource::Callback(_) => {
            let client = client.clone();
            tokio::task::spawn_blocking(move || client.codes.raw_code(now_ms))
                .await
                .map_err(|_| Failure::Code("the code callback panicked".into()))?
        }
        other => other.raw_code(now_ms),
    }
    .map_err(Failure::Code)?;
    check_code(&code).map_err(Failure::Code)?;
    Ok(code)
}

/// TCP, TLS 1.3 with ALPN `portcullis/1`, then the Prefix for `factor` encoded, followed by
/// `trailer`. Nothing is written: the [`PcsStream`] sends these bytes in front of hyper's.
async fn open(
    target: &Target,
    factor: Factor,
    trailer: &[u8],
) -> Result<(TlsStream<TcpStream>, Zeroizing<Vec<u8>>), Failure> {
    let client = &target.client;
    // The factor wipes itself when this is dropped, on every path out of here.
    let mut prefix = Prefix {
        user: client.user.clone(),
        factor,
        nonce: [0u8; 16],
        time_ms: 0,
        binding: [0u8; 32],
        agent: Some(client.agent.clone()),
    };
    let tcp = TcpStream::connect(target.addr.as_str())
        .await
        .map_err(|e| Failure::Io {
            kind: e.kind(),
            detail: format!("could not connect to {}: {e}", target.addr),
        })?;
    tcp.set_nodelay(true).map_err(|e| Failure::Io {
        kind: e.kind(),
        detail: format!("could not set TCP_NODELAY: {e}"),
    })?;
    let tls = match client.tls.connect(target.server_name.clone(), tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            return Err(Failure::from_handshake(
                &e,
                &target.addr,
                target.server_name.clone(),
                client.connect_timeout,
            )
            .await);
        }
    };

    let (_, conn) = tls.get_ref();
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(Failure::Tls(wrong_version(conn.protocol_version())));
    }
    if conn.alpn_protocol() != Some(ALPN_PCS1) {
        return Err(Failure::Tls(wrong_alpn(conn.alpn_protocol())));
    }
    prefix.binding = portcullis_tls::exporter(conn)
        .map_err(|e| Failure::Tls(format!("could not compute the channel binding: {e}")))?;
    client
        .rng
        .fill(&mut prefix.nonce)
        .map_err(|_| Failure::Random)?;
    prefix.time_ms = client.clock.now_ms();
    let encoded = Zeroizing::new(
        prefix
            .encode()
            .map_err(|e| Failure::Protocol(format!("could not encode the Prefix: {e}")))?,
    );
    let frame = if trailer.is_empty() {
        encoded
    } else {
        // Sized once, so that no copy of the Prefix is left behind by a reallocation.
        let mut frame = Zeroizing::new(Vec::with_capacity(encoded.len() + trailer.len()));
        frame.extend_from_slice(&encoded);
        frame.extend_from_slice(trailer);
        frame
    };
    tracing::debug!(
        addr = %target.addr,
        session = matches!(prefix.factor, Factor::Session(_)),
        "PCS1 Prefix ready"
    );
    Ok((tls, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_give_their_authority() {
        assert_eq!(authority("https://localhost:50051"), "localhost:50051");
        assert_eq!(authority("HTTP://[::1]:50051/"), "[::1]:50051");
        assert_eq!(authority("localhost:1"), "localhost:1");
        // Anything after the authority is left for `host_of` to refuse.
        assert!(host_of(authority("https://h:1/path")).is_err());
        assert!(host_of(authority("ftp://h:1")).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(host_of("localhost:443").unwrap(), "localhost");
        assert_eq!(host_of("127.0.0.1:1").unwrap(), "127.0.0.1");
        assert_eq!(host_of("[::1]:8443").unwrap(), "::1");
        for bad in [
            "localhost",
            "::1:80",
            ":80",
            "host:port",
            "[::1]",
            "h:70000",
        ] {
            assert!(host_of(bad).is_err(), "{bad}");
        }
    }
}
