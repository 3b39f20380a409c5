//! Which certificate authorities a server says it accepts client certificates from.

use std::sync::{Arc, Mutex};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{TlsError, distinguished_name, provider};

/// Where the certificate presented comes from.
#[derive(Debug)]
enum Source {
    /// One fixed chain and key.
    Key(Arc<CertifiedKey>),
    /// Another resolver (the one a client configuration had).
    Inner(Arc<dyn ResolvesClientCert>),
}

/// What the latest certificate request named (DER names), and what was presented in answer:
/// kept raw, and decoded only when a message needs them, to stay off the handshake's path.
#[derive(Debug, Default)]
struct Seen {
    expected: Option<Vec<Vec<u8>>>,
    presented: Option<Arc<CertifiedKey>>,
}

/// A client certificate resolver that presents a certificate chain and remembers the
/// certificate authorities the server named in its CertificateRequest
/// (`certificate_authorities`), and the issuer of the certificate presented, so that a refused
/// device certificate can be explained with the CA the server expected.
///
/// One resolver serves any number of connections; it remembers the latest request it saw (with
/// connections to several servers at once, that of whichever handshake came last). Use
/// it with
/// [`ConfigBuilder::with_client_cert_resolver`](rustls::ConfigBuilder::with_client_cert_resolver),
/// or put it around the resolver a configuration already has with [`CaHintResolver::wrap`].
///
/// ```
/// use portcullis_tls::CaHintResolver;
/// # use portcullis_tls::devpki::DevCa;
///
/// let ca = DevCa::generate("Example CA").unwrap();
/// let device = ca.issue_device("laptop").unwrap();
/// let resolver = CaHintResolver::new(vec![device.cert_der()], device.key_der()).unwrap();
/// // Before a handshake the server has named nothing.
/// assert_eq!(resolver.expected_issuers(), None);
/// assert_eq!(resolver.refusal_hint(), None);
/// ```
#[derive(Debug)]
pub struct CaHintResolver {
    source: Source,
    seen: Mutex<Seen>,
}

impl CaHintResolver {
    /// A resolver presenting `chain` (leaf first) signed with `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        if chain.is_empty() {
            return Err(TlsError::EmptyChain);
        }
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Config)?;
        Ok(Self {
            source: Source::Key(Arc::new(key)),
            seen: Mutex::default(),
        })
    }

    /// A resolver that presents what `inner` chooses, and records what the server named.
    pub fn wrap(inner: Arc<dyn ResolvesClientCert>) -> Self {
        Self {
            source: Source::Inner(inner),
            seen: Mutex::default(),
        }
    }

    /// The certificate authorities (RFC 4514 names) the server named in the latest certificate
    /// request: `None` before any request, empty when the server named none. Names that do not
    /// decode are shown as `<undecodable name>`.
    pub fn expected_issuers(&self) -> Option<Vec<String>> {
        let expected = self.seen.lock().ok()?.expected.clone()?;
        Some(
            expected
                .iter()
                .map(|der| {
                    distinguished_name(der).unwrap_or_else(|| "<undecodable name>".to_owned())
                })
                .collect(),
        )
    }

    /// The issuer (RFC 4514 name) of the certificate presented in answer to the latest request.
    pub fn presented_issuer(&self) -> Option<String> {
        let presented = self.seen.lock().ok()?.presented.clone()?;
        let leaf = presented.cert.first()?;
        crate::identity::parse(leaf)
            .ok()
            .map(|cert| cert.issuer().to_string())
    }

    /// One clause for a message about a refused client certificate, when the latest request
    /// named CAs: `the server accepts client certificates issued by CN=A; this one is issued by
    /// CN=B`.
    pub fn refusal_hint(&self) -> Option<String> {
        let expected = self.expected_issuers().filter(|e| !e.is_empty())?;
        let mut hint = format!(
            "the server accepts client certificates issued by {}",
            expected.join(" or ")
        );
        if let Some(issuer) = self.presented_issuer() {
            hint.push_str(&format!("; this one is issued by {issuer}"));
        }
        Some(hint)
    }
}

impl ResolvesClientCert for CaHintResolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let chosen = match &self.source {
            Source::Key(key) => Some(Arc::clone(key)),
            Source::Inner(inner) => inner.resolve(root_hint_subjects, sigschemes),
        };
        if let Ok(mut seen) = self.seen.lock() {
            // The same server names the same CAs on every handshake: copied only when they
            // change.
            let same = seen.expected.as_ref().is_some_and(|names| {
                names.len() == root_hint_subjects.len()
                    && names.iter().zip(root_hint_subjects).all(|(a, b)| a == b)
            });
            if !same {
                seen.expected = Some(root_hint_subjects.iter().map(|d| d.to_vec()).collect());
            }
            seen.presented.clone_from(&chosen);
        }
        chosen
    }

    fn only_raw_public_keys(&self) -> bool {
        match &self.source {
            Source::Key(_) => false,
            Source::Inner(inner) => inner.only_raw_public_keys(),
        }
    }

    fn has_certs(&self) -> bool {
        match &self.source {
            Source::Key(_) => true,
            Source::Inner(inner) => inner.has_certs(),
        }
    }
}
