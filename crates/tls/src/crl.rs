//! Certificate revocation lists that can change while a server runs.
//!
//! rustls checks a client certificate against CRLs during a full TLS handshake only. Two cases
//! escape that check:
//!
//! - a **resumed** TLS session: rustls restores the peer certificates of the earlier session and
//!   verifies nothing again;
//! - a connection that is **already open** when its certificate is added to the CRL.
//!
//! [`ReloadableClientVerifier`] covers both. It is the client certificate verifier of a
//! [`rustls::ServerConfig`] (made by [`crate::server_config_with_verifier`]) whose CRLs
//! [`ReloadableClientVerifier::set_crls`] replaces at any time: the next full handshake uses the
//! new lists, with no new `ServerConfig`, so the server's TLS session cache survives a reload.
//! Beside the rustls verifier it keeps a [`RevokedCertificates`] index of the same lists, so
//! that a server can ask, for any certificate it holds, whether the current CRLs list it
//! ([`ReloadableClientVerifier::is_revoked`]): after a resumed handshake, and for every open
//! connection when the lists change ([`ReloadableClientVerifier::generation`] tells when).
//!
//! Only the end-entity certificate is checked, as [`crate::server_config_with_crls`] does. A
//! CRL whose issuer is one of the client CAs must carry that CA's valid signature, or it is
//! refused when loaded (and the lists in force stay as they were); a CRL of another issuer (an
//! intermediate CA) is taken as given here, and rustls verifies its signature when it uses it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::TlsError;
use crate::identity::CertError;

/// Why a CRL cannot be used.
pub(crate) fn parse_crl(der: &[u8]) -> Result<CertificateRevocationList<'_>, String> {
    match CertificateRevocationList::from_der(der) {
        Ok(([], crl)) => Ok(crl),
        Ok((rest, _)) => Err(format!("{} unexpected bytes after its end", rest.len())),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err("truncated DER".to_owned()),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => {
            Err(e.to_string())
        }
    }
}

/// The certificates the given CRLs list, by issuer and serial number: the index behind
/// [`ReloadableClientVerifier::is_revoked`].
///
/// ```
/// use portcullis_tls::RevokedCertificates;
/// use portcullis_tls::devpki::DevCa;
///
/// let ca = DevCa::generate("example CA").unwrap();
/// let lost = ca.issue_device("lost-laptop").unwrap();
/// let kept = ca.issue_device("phone").unwrap();
/// let crl = ca.crl_pem(&[lost.cert_der()]).unwrap();
/// let crls = portcullis_tls::parse_crls(crl.as_bytes(), "example.crl").unwrap();
/// let revoked = RevokedCertificates::from_crls(&crls, &[ca.cert_der()]).unwrap();
/// assert!(revoked.is_revoked(&lost.cert_der()).unwrap());
/// assert!(!revoked.is_revoked(&kept.cert_der()).unwrap());
/// ```
#[derive(Debug, Default, Clone)]
pub struct RevokedCertificates {
    /// Issuer name (DER) to the serial numbers (DER content octets) its CRLs list.
    by_issuer: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
    crls: usize,
    serials: usize,
    /// The earliest nextUpdate of the lists, Unix seconds (`None`: none says when).
    next_update: Option<i64>,
}

impl RevokedCertificates {
    /// An index that lists nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Indexes `crls`. Each must parse as an X.509 CRL; one whose issuer is among
    /// `client_roots` must be signed by that CA.
    pub fn from_crls(
        crls: &[CertificateRevocationListDer<'_>],
        client_roots: &[CertificateDer<'_>],
    ) -> Result<Self, TlsError> {
        // A CA certificate x509-parser cannot read signs nothing here (rustls refuses such a
        // root when the verifier is built).
        let roots: Vec<_> = client_roots
            .iter()
            .filter_map(|der| crate::identity::parse(der).ok())
            .collect();
        let mut index = Self::empty();
        for (i, der) in crls.iter().enumerate() {
            let bad = |reason: String| TlsError::BadCrl {
                index: i + 1,
                reason,
            };
            let crl = parse_crl(der.as_ref()).map_err(|e| bad(format!("not a valid CRL: {e}")))?;
            let issuer = crl.issuer().as_raw();
            let mut signers = roots
                .iter()
                .filter(|root| root.subject().as_raw() == issuer)
                .peekable();
            if signers.peek().is_some()
                && !signers.any(|root| crl.verify_signature(root.public_key()).is_ok())
            {
                return Err(bad(format!(
                    "its signature does not verify against the client CA {}",
                    crl.issuer()
                )));
            }
            let serials = index.by_issuer.entry(issuer.to_vec()).or_default();
            for revoked in crl.iter_revoked_certificates() {
                if serials.insert(revoked.raw_serial().to_vec()) {
                    index.serials += 1;
                }
            }
            if let Some(next) = crl.next_update() {
                let next = next.timestamp();
                index.next_update = Some(index.next_update.map_or(next, |n| n.min(next)));
            }
            index.crls += 1;
        }
        Ok(index)
    }

    /// The earliest nextUpdate of the lists, Unix seconds: after it, the issuer may have
    /// revoked certificates these lists do not know of. `None` when no list says.
    pub fn next_update_unix(&self) -> Option<i64> {
        self.next_update
    }

    /// Whether a list is past its nextUpdate at `unix_s`.
    pub fn is_stale_at(&self, unix_s: i64) -> bool {
        self.next_update.is_some_and(|next| next < unix_s)
    }

    /// Whether the CRLs list `cert` (by its issuer and serial number). Fails when `cert` is not
    /// a valid X.509 certificate; a caller deciding access should treat that as revoked.
    pub fn is_revoked(&self, cert: &CertificateDer<'_>) -> Result<bool, CertError> {
        if self.serials == 0 {
            return Ok(false);
        }
        let cert = crate::identity::parse(cert.as_ref())?;
        Ok(self
            .by_issuer
            .get(cert.issuer().as_raw())
            .is_some_and(|serials| serials.contains(cert.raw_serial())))
    }

    /// How many CRLs were indexed.
    pub fn crl_count(&self) -> usize {
        self.crls
    }

    /// How many distinct certificates they list.
    pub fn len(&self) -> usize {
        self.serials
    }

    /// Whether they list no certificate at all.
    pub fn is_empty(&self) -> bool {
        self.serials == 0
    }
}

/// What a [`ReloadableClientVerifier`] checks against now.
#[derive(Debug)]
struct Lists {
    verifier: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RevokedCertificates>,
}

/// A client certificate verifier (the rustls WebPKI verifier, client certificates required)
/// whose certificate revocation lists can be replaced while the server runs.
///
/// rustls checks a client certificate against CRLs during a full TLS handshake only: a
/// **resumed** TLS session restores the earlier peer certificates without verifying them
/// again, and a connection **already open** when its certificate is listed is not touched.
/// This verifier serves as the client certificate verifier of a [`rustls::ServerConfig`]
/// (made by [`crate::server_config_with_verifier`]); [`ReloadableClientVerifier::set_crls`]
/// replaces its lists at any time, and the next full handshake uses them, with the same
/// `ServerConfig` (its TLS session cache survives). Beside the rustls verifier it keeps a
/// [`RevokedCertificates`] index of the same lists, so that a server can ask, for any
/// certificate it holds, whether the current lists name it
/// ([`ReloadableClientVerifier::is_revoked`]): after a resumed handshake, and for every open
/// connection when the lists change ([`ReloadableClientVerifier::generation`] tells when).
///
/// Only the end-entity certificate is checked, as [`crate::server_config_with_crls`] does. A
/// CRL whose issuer is one of the client CAs must carry that CA's valid signature, or it is
/// refused (and the lists in force stay as they were); a CRL of another issuer (an
/// intermediate CA) is indexed as given, and rustls verifies its signature when it uses it.
///
/// ```
/// use std::sync::Arc;
/// use portcullis_tls::{ALPN_PCS1, ReloadableClientVerifier};
/// use portcullis_tls::devpki::DevCa;
///
/// let ca = DevCa::generate("example CA").unwrap();
/// let server = ca.issue_server(&["localhost".into()]).unwrap();
/// let verifier = Arc::new(ReloadableClientVerifier::new(&[ca.cert_der()], Vec::new()).unwrap());
/// let config = portcullis_tls::server_config_with_verifier(
///     vec![server.cert_der()],
///     server.key_der(),
///     verifier.clone(),
///     &[ALPN_PCS1],
/// )
/// .unwrap();
///
/// // Later: a device is lost. The next handshakes use the new list.
/// let lost = ca.issue_device("lost-laptop").unwrap();
/// let crl = ca.crl_pem(&[lost.cert_der()]).unwrap();
/// verifier.set_crls(portcullis_tls::parse_crls(crl.as_bytes(), "example.crl").unwrap()).unwrap();
/// assert!(verifier.is_revoked(&lost.cert_der()));
/// assert_eq!(verifier.generation(), 1);
/// # drop(config);
/// ```
#[derive(Debug)]
pub struct ReloadableClientVerifier {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    lists: RwLock<Arc<Lists>>,
    generation: AtomicU64,
}

impl ReloadableClientVerifier {
    /// A verifier that requires client certificates chaining to `client_roots`, and checks
    /// end-entity certificates against `crls` (none: no revocation check).
    pub fn new(
        client_roots: &[CertificateDer<'static>],
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Self, TlsError> {
        let store = crate::root_store(client_roots, "clients")?;
        let lists = Self::make_lists(client_roots, &store, crls)?;
        let hints = lists.verifier.root_hint_subjects().to_vec();
        Ok(Self {
            roots: client_roots.to_vec(),
            store,
            hints,
            lists: RwLock::new(Arc::new(lists)),
            generation: AtomicU64::new(0),
        })
    }

    fn make_lists(
        roots: &[CertificateDer<'static>],
        store: &Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Lists, TlsError> {
        let revoked = RevokedCertificates::from_crls(&crls, roots)?;
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(store.clone(), crate::provider());
        if !crls.is_empty() {
            builder = builder
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        Ok(Lists {
            verifier: builder.build()?,
            revoked: Arc::new(revoked),
        })
    }

    fn lists(&self) -> Arc<Lists> {
        // The lock only guards the swap of an `Arc`: a panic elsewhere cannot leave it half
        // written, so a poisoned lock is still sound to read.
        self.lists
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the CRLs: handshakes that start from now on are checked against `crls`, and
    /// [`ReloadableClientVerifier::generation`] goes up by one. On error (a CRL that does not
    /// parse, or whose signature does not verify against its client CA) the lists in force
    /// stay as they were.
    pub fn set_crls(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<(), TlsError> {
        let lists = Arc::new(Self::make_lists(&self.roots, &self.store, crls)?);
        let mut current = self
            .lists
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = lists;
        // Bumped while the new lists are in place and the lock is held: a reader that sees the
        // new generation also sees the new lists.
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// How many times the CRLs were replaced. A server re-checks its open connections when it
    /// changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The index of the certificates the current CRLs list.
    pub fn revoked(&self) -> Arc<RevokedCertificates> {
        self.lists().revoked.clone()
    }

    /// Whether the current CRLs list `cert`. A certificate that does not parse counts as
    /// revoked (fail closed).
    pub fn is_revoked(&self, cert: &CertificateDer<'_>) -> bool {
        self.revoked().is_revoked(cert).unwrap_or(true)
    }
}

impl ClientCertVerifier for ReloadableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The roots never change, only the CRLs: the hints of the first verifier hold.
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.lists()
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.lists()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.lists()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.lists().verifier.supported_verify_schemes()
    }
}
