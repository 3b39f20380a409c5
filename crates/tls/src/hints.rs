//! Which certificate authorities a server says it accepts client certificates from.

use std::sync::{Arc, Mutex};

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{TlsError, distinguished_name, provider};

/// A client certificate resolver that presents one certificate chain and remembers the
/// certificate authorities the server named in its CertificateRequest
/// (`certificate_authorities`), so that a refused device certificate can be explained with the
/// CA the server expected.
///
/// One resolver serves any number of connections; it remembers the names of the latest
/// request it saw. Use it with
/// [`ConfigBuilder::with_client_cert_resolver`](rustls::ConfigBuilder::with_client_cert_resolver).
///
/// ```
/// # use std::sync::Arc;
/// # use portcullis_tls::devpki::{CertProfile, DevCa};
/// use portcullis_tls::CaHintResolver;
///
/// let ca = DevCa::generate("Example CA").unwrap();
/// let device = ca.issue_device("laptop").unwrap();
/// let resolver = CaHintResolver::new(vec![device.cert_der()], device.key_der()).unwrap();
/// // Before a handshake the server has named nothing.
/// assert_eq!(resolver.expected_issuers(), None);
/// ```
#[derive(Debug)]
pub struct CaHintResolver {
    key: Arc<CertifiedKey>,
    seen: Mutex<Option<Vec<String>>>,
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
            key: Arc::new(key),
            seen: Mutex::new(None),
        })
    }

    /// The certificate authorities (RFC 4514 names) the server named in the latest certificate
    /// request: `None` before any request, empty when the server named none. Names that do not
    /// decode are shown as `<undecodable name>`.
    pub fn expected_issuers(&self) -> Option<Vec<String>> {
        self.seen.lock().ok().and_then(|seen| seen.clone())
    }
}

impl ResolvesClientCert for CaHintResolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let names = root_hint_subjects
            .iter()
            .map(|der| distinguished_name(der).unwrap_or_else(|| "<undecodable name>".to_owned()))
            .collect();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(names);
        }
        Some(Arc::clone(&self.key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}
