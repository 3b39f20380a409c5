//! A small certificate authority for development and tests, built on rcgen.
//!
//! Every key is a fresh ECDSA P-256 key; every certificate gets a random 128-bit serial number.
//! Validity starts one hour in the past, so that a peer whose clock runs a little behind still
//! accepts a certificate issued a moment ago.
//!
//! ```
//! use portcullis_tls::devpki::DevCa;
//! let ca = DevCa::generate("Portcullis dev CA").unwrap();
//! let server = ca.issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
//! let device = ca.issue_device("laptop").unwrap();
//! assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! assert!(!format!("{device:?}").contains(&device.key_pem));
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::identity::{self, CertError};
use crate::pem::{PemError, parse_certs, parse_key};

/// Validity of a CA made by [`DevCa::generate`], in days.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of the server and device certificates [`DevCa`] issues, in days.
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// How far in the past validity starts, in seconds.
pub const BACKDATE_SECS: i64 = 3600;
/// Validity of a CRL made by [`DevCa::crl_pem`], in days.
pub const CRL_VALIDITY_DAYS: i64 = 7;

/// The development PKI could not make, load or write a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevPkiError {
    /// rcgen failed to generate a key or to sign.
    #[error("cannot generate a key or sign: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// A name cannot go into a certificate.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// [`DevCa::issue_server`] was given no name.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    /// The validity period is empty or out of range.
    #[error("invalid validity period: {0}")]
    Validity(String),
    /// The CA certificate or key PEM could not be read.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The CA certificate is not a valid certificate.
    #[error("CA certificate: {0}")]
    Cert(#[from] CertError),
    /// The CA certificate does not say CA:TRUE.
    #[error("CA certificate: not a CA certificate (no basicConstraints CA:TRUE)")]
    NotCa,
    /// The CA key is a key rcgen cannot sign with (rcgen with ring signs with PKCS#8 keys).
    #[error("CA key: cannot sign with it: {0}")]
    CaKey(rcgen::Error),
    /// The CA key is not the key of the CA certificate.
    #[error("CA key: it does not belong to the CA certificate")]
    KeyMismatch,
    /// A file could not be written.
    #[error("{path}: cannot write: {error}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// A certificate and its private key, as issued by a [`DevCa`].
///
/// `Debug` shows the certificate, never the key.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM (`PRIVATE KEY`).
    pub key_pem: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Issued {
    /// The DER of the issued certificate.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The DER of the private key (PKCS#8).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Writes the certificate and the key as PEM files. On Unix the key file gets mode 0600
    /// (also when it already existed). Parent directories must exist.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), DevPkiError> {
        write_private(key_path, self.key_pem.as_bytes())?;
        std::fs::write(cert_path, self.cert_pem.as_bytes()).map_err(|error| DevPkiError::Write {
            path: cert_path.display().to_string(),
            error,
        })
    }
}

/// Writes a file readable by its owner only (on Unix).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevPkiError> {
    use std::io::Write;
    let err = |error| DevPkiError::Write {
        path: path.display().to_string(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// What to put into a certificate issued with [`DevCa::issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertProfile {
    /// The subject's common name.
    pub common_name: String,
    /// Subject alternative names: those that parse as an IP address become IP address names,
    /// the others DNS names.
    pub sans: Vec<String>,
    /// Put clientAuth into the extended key usage.
    pub client_auth: bool,
    /// Put serverAuth into the extended key usage. With neither flag the certificate has no
    /// extended key usage extension.
    pub server_auth: bool,
    /// Start of validity, Unix seconds.
    pub not_before_unix: i64,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl CertProfile {
    /// A device certificate: CN = `name`, no alternative names, clientAuth only, valid from an
    /// hour ago for [`LEAF_VALIDITY_DAYS`].
    pub fn device(name: &str) -> Self {
        let now = now_unix();
        Self {
            common_name: name.to_owned(),
            sans: Vec::new(),
            client_auth: true,
            server_auth: false,
            not_before_unix: now - BACKDATE_SECS,
            not_after_unix: now + LEAF_VALIDITY_DAYS * 86_400,
        }
    }

    /// A server certificate: CN = the first name, all `names` as alternative names, serverAuth
    /// only, valid from an hour ago for [`LEAF_VALIDITY_DAYS`].
    pub fn server(names: &[String]) -> Self {
        let now = now_unix();
        Self {
            common_name: names.first().cloned().unwrap_or_default(),
            sans: names.to_vec(),
            client_auth: false,
            server_auth: true,
            not_before_unix: now - BACKDATE_SECS,
            not_after_unix: now + LEAF_VALIDITY_DAYS * 86_400,
        }
    }
}

/// A certificate authority able to sign: its certificate and its key.
///
/// `Debug` shows the certificate, never the key.
pub struct DevCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), DevPkiError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(DevPkiError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

fn distinguished_name(common_name: &str) -> Result<DistinguishedName, DevPkiError> {
    check_name(common_name)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    Ok(dn)
}

fn random_serial() -> Result<SerialNumber, DevPkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DevPkiError::Random)?;
    // Positive, and no leading zero byte: the DER encoding is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn time_at(unix_s: i64) -> Result<OffsetDateTime, DevPkiError> {
    OffsetDateTime::from_unix_timestamp(unix_s)
        .map_err(|_| DevPkiError::Validity(format!("{unix_s} is out of range")))
}

fn new_key() -> Result<KeyPair, DevPkiError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

impl DevCa {
    /// A new self-signed CA with CN = `common_name`, valid from an hour ago for
    /// [`CA_VALIDITY_DAYS`]. It may sign end-entity certificates only (path length 0).
    pub fn generate(common_name: &str) -> Result<Self, DevPkiError> {
        let key = new_key()?;
        let now = now_unix();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time_at(now - BACKDATE_SECS)?;
        params.not_after = time_at(now + CA_VALIDITY_DAYS * 86_400)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA from its certificate and its PKCS#8 private key, both PEM.
    ///
    /// Fails when either does not parse, when the certificate is not a CA, or when the key is
    /// not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, DevPkiError> {
        let cert_der = parse_certs(cert_pem.as_bytes(), "CA certificate")?
            .into_iter()
            .next()
            .ok_or(DevPkiError::Cert(CertError::Invalid(
                "no certificate".to_owned(),
            )))?;
        let key_der = parse_key(key_pem.as_bytes(), "CA key")?;
        let key = KeyPair::try_from(&key_der).map_err(DevPkiError::CaKey)?;
        {
            let cert = identity::parse(&cert_der)?;
            let is_ca = cert
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(DevPkiError::NotCa);
            }
            if rcgen::PublicKeyData::subject_public_key_info(&key)
                != cert.tbs_certificate.subject_pki.raw
            {
                return Err(DevPkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let cert_pem = pem_encode_cert(&cert_der);
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The DER of the CA certificate.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A server certificate for `names` (see [`CertProfile::server`]).
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, DevPkiError> {
        if names.is_empty() {
            return Err(DevPkiError::NoServerNames);
        }
        self.issue(&CertProfile::server(names))
    }

    /// A device (client) certificate with CN = `device` (see [`CertProfile::device`]).
    pub fn issue_device(&self, device: &str) -> Result<Issued, DevPkiError> {
        self.issue(&CertProfile::device(device))
    }

    /// A certificate with a new key, as `profile` says. Also for certificates a verifier must
    /// refuse (expired, wrong key usage).
    pub fn issue(&self, profile: &CertProfile) -> Result<Issued, DevPkiError> {
        let not_before = time_at(profile.not_before_unix)?;
        let not_after = time_at(profile.not_after_unix)?;
        if not_after <= not_before {
            return Err(DevPkiError::Validity(format!(
                "not after ({}) is not later than not before ({})",
                profile.not_after_unix, profile.not_before_unix
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&profile.common_name)?;
        params.subject_alt_names = profile
            .sans
            .iter()
            .map(|name| san(name))
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if profile.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if profile.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);

        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// A certificate revocation list signed by this CA that lists `revoked` (certificates this
    /// CA issued), PEM. Valid from an hour ago for [`CRL_VALIDITY_DAYS`].
    pub fn crl_pem(&self, revoked: &[CertificateDer<'_>]) -> Result<String, DevPkiError> {
        let next = OffsetDateTime::now_utc() + Duration::days(CRL_VALIDITY_DAYS);
        self.crl_pem_until(revoked, next.unix_timestamp())
    }

    /// Like [`DevCa::crl_pem`], with the CRL's nextUpdate at `next_update_unix` (Unix
    /// seconds): in the past, it makes a CRL that is out of date.
    pub fn crl_pem_until(
        &self,
        revoked: &[CertificateDer<'_>],
        next_update_unix: i64,
    ) -> Result<String, DevPkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|der| {
                let cert = identity::parse(der)?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, DevPkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::seconds(BACKDATE_SECS),
            next_update: time_at(next_update_unix)?,
            crl_number: random_serial()?,
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn san(name: &str) -> Result<SanType, DevPkiError> {
    check_name(name)?;
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name.try_into().map_err(|_| DevPkiError::InvalidName {
        name: name.to_owned(),
        reason: "a DNS name must be ASCII",
    })?;
    Ok(SanType::DnsName(dns))
}

/// PEM of a certificate (LF line endings, as rcgen writes them).
fn pem_encode_cert(der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", der.to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}
