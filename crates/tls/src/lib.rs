//! # portcullis-tls
//!
//! Everything rustls and X.509 for Portcullis:
//!
//! - [`server_config`] and [`client_config`]: TLS 1.3 only, the `ring` provider only, client
//!   certificates required and verified, ALPN as given, 0-RTT off;
//! - [`exporter`]: the RFC 9266 `tls-exporter` channel binding both sides put in the PCS1 exchange;
//! - [`load_certs`], [`load_key`], [`load_crls`] (and their `parse_*` forms): PEM loading whose
//!   errors name the file and what is wrong with it (CRLs also in DER);
//! - [`ReloadableClientVerifier`] and [`server_config_with_verifier`]: client certificate
//!   revocation lists that can be replaced while the server runs, and the check of a
//!   certificate against them that a resumed TLS session or an open connection needs;
//! - [`DeviceIdentity`] and [`fingerprint`]: what the leaf certificate says about a device;
//! - [`CaHintResolver`]: presents the device certificate and remembers which certificate
//!   authorities the server said it accepts, to explain a refused device certificate;
//! - `devpki` (feature `devpki`, on rcgen): a small certificate authority for development and
//!   tests (ECDSA P-256).

use std::sync::{Arc, OnceLock};

mod crl;
#[cfg(feature = "devpki")]
pub mod devpki;
mod hints;
mod identity;
mod pem;

pub use crl::{ReloadableClientVerifier, RevokedCertificates};
pub use hints::CaHintResolver;
pub use identity::{CertError, DeviceIdentity, LeafFacts, distinguished_name, fingerprint};
pub use pem::{
    PemError, PemErrorKind, load_certs, load_crls, load_key, parse_certs, parse_crls, parse_key,
};
pub use portcullis_core::DeviceFingerprint;
/// The ALPN protocol id a PCS1 client offers and a Portcullis server selects.
pub use portcullis_core::codec::ALPN_PCS1;
pub use rustls;
pub use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The label of the RFC 9266 `tls-exporter` channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

/// A TLS configuration could not be built, or the exporter could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// No CA certificate was given to verify the peer against.
    #[error("no CA certificate given to verify the {peer} against")]
    NoRoots {
        /// `"clients"` or `"server"`.
        peer: &'static str,
    },
    /// A CA certificate cannot serve as a trust anchor.
    #[error("CA certificate #{index} cannot be used as a trust anchor: {error}")]
    BadRoot {
        /// Position of the certificate in the list, from 1.
        index: usize,
        /// Why rustls refused it.
        error: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The own certificate chain is empty.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration rejected: {0}")]
    Config(rustls::Error),
    /// The exporter could not be computed (for example before the handshake completed).
    #[error("cannot compute the TLS exporter: {0}")]
    Exporter(rustls::Error),
    /// A certificate revocation list cannot be used.
    #[error("CRL #{index}: {reason}")]
    BadCrl {
        /// Position of the CRL in the list, from 1.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The `ring` crypto provider, the only one Portcullis uses.
///
/// The same instance is handed out on every call.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn root_store(
    roots: &[CertificateDer<'static>],
    peer: &'static str,
) -> Result<Arc<RootCertStore>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots { peer });
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|error| TlsError::BadRoot {
            index: i + 1,
            error,
        })?;
    }
    Ok(Arc::new(store))
}

/// A server configuration: TLS 1.3 only, the `ring` provider, client certificates required
/// and verified against `client_roots`, the ALPN ids of `alpn` (Portcullis passes
/// `[ALPN_PCS1]`), 0-RTT off (`max_early_data_size` 0), session tickets as rustls defaults.
///
/// `chain` starts with the server's own certificate; `key` must match it.
///
/// rustls accepts a client that offers no ALPN at all: check
/// [`alpn_protocol`](rustls::CommonState::alpn_protocol) after the handshake.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_crls(chain, key, client_roots, Vec::new(), alpn)
}

/// [`server_config`] that also checks client certificates against certificate revocation
/// lists.
///
/// Only the client's own (end-entity) certificate is checked. A certificate whose issuer has no
/// CRL among `crls` is accepted; a certificate listed in its issuer's CRL is refused. CRL expiry
/// is not enforced. With `crls` empty this is exactly [`server_config`].
///
/// rustls checks the CRLs during full handshakes only: a resumed TLS session of a certificate
/// listed since is not refused. [`ReloadableClientVerifier`] gives a server the means to check
/// that too, and to replace the lists while it runs.
pub fn server_config_with_crls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: &[CertificateDer<'static>],
    crls: Vec<CertificateRevocationListDer<'static>>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let roots = root_store(client_roots, "clients")?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        verifier = verifier
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    server_config_with_verifier(chain, key, verifier.build()?, alpn)
}

/// [`server_config`] with the client certificate verifier given: for example a
/// [`ReloadableClientVerifier`], whose CRLs can be replaced while the server runs.
///
/// TLS 1.3 only, the `ring` provider, the ALPN ids of `alpn`, 0-RTT off, session resumption as
/// rustls defaults (a resumed session is not verified again: see [`ReloadableClientVerifier`]).
pub fn server_config_with_verifier(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// A client configuration: TLS 1.3 only, the `ring` provider, the server verified against
/// `server_roots`, client authentication with `chain` and `key`, the ALPN ids of `alpn`
/// (Portcullis passes `[ALPN_PCS1]`), 0-RTT off.
pub fn client_config(
    server_roots: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let roots = root_store(server_roots, "server")?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// The RFC 9266 `tls-exporter` channel binding of a connection: 32 bytes exported with the
/// label `EXPORTER-Channel-Binding` and no context.
///
/// Both ends of one TLS connection compute the same value once the handshake is complete;
/// before that this fails.
pub fn exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], TlsError> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(TlsError::Exporter)
}

/// The name of a TLS alert as RFC 8446 writes it (`certificate_expired`, `unknown_ca`), for
/// messages that people compare with other tools' output.
///
/// ```
/// use portcullis_tls::{alert_name, rustls::AlertDescription};
/// assert_eq!(alert_name(AlertDescription::ProtocolVersion), "protocol_version");
/// assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
/// ```
pub fn alert_name(alert: rustls::AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    // `UnknownCA` and friends: keep acronyms in one word.
    out.replace("c_a", "ca")
}
