//! What a leaf certificate says about a device, read with x509-parser.

use std::net::IpAddr;

use portcullis_core::DeviceFingerprint;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

/// A byte string is not a usable X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The DER does not parse as a certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Invalid(String),
    /// The DER of the certificate is followed by extra bytes.
    #[error("not a valid X.509 certificate: {0} unexpected bytes after its end")]
    TrailingData(usize),
    /// An extension Portcullis reads is malformed or repeated.
    #[error("not a valid X.509 certificate: bad {extension} extension: {reason}")]
    BadExtension {
        /// The extension's name.
        extension: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn bad_extension(extension: &'static str) -> impl FnOnce(X509Error) -> CertError {
    move |e| CertError::BadExtension {
        extension,
        reason: e.to_string(),
    }
}

/// Parses the DER of one certificate, refusing trailing bytes.
pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(CertError::TrailingData(rest.len())),
        Err(x509_parser::nom::Err::Incomplete(_)) => {
            Err(CertError::Invalid("truncated DER".to_owned()))
        }
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => {
            Err(CertError::Invalid(e.to_string()))
        }
    }
}

/// The device fingerprint of a certificate: SHA-256 of the DER of its SubjectPublicKeyInfo
/// (PROTOCOL.md section 1).
///
/// A certificate renewed with the same key keeps its fingerprint.
pub fn fingerprint(der: &[u8]) -> Result<DeviceFingerprint, CertError> {
    let cert = parse(der)?;
    Ok(DeviceFingerprint::of_spki(
        cert.tbs_certificate.subject_pki.raw,
    ))
}

/// What the gate needs of a client's leaf certificate on every connection, from one parse:
/// its fingerprint and its validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafFacts {
    /// SHA-256 of the SubjectPublicKeyInfo: see [`fingerprint`].
    pub fingerprint: DeviceFingerprint,
    /// Start of validity, Unix seconds.
    pub not_before_unix: i64,
    /// End of validity, Unix seconds (inclusive).
    pub not_after_unix: i64,
}

impl LeafFacts {
    /// Reads the facts from the DER of a certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = parse(der)?;
        let validity = cert.validity();
        Ok(Self {
            fingerprint: DeviceFingerprint::of_spki(cert.tbs_certificate.subject_pki.raw),
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
        })
    }

    /// Whether `unix_ms` lies within the validity period (both ends included, RFC 5280; the
    /// end is the last second of validity).
    pub fn is_valid_at_ms(&self, unix_ms: u64) -> bool {
        let s = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
        self.not_before_unix <= s && s <= self.not_after_unix
    }

    /// The first Unix millisecond at which the certificate is no longer valid.
    pub fn expires_at_ms(&self) -> u64 {
        u64::try_from(self.not_after_unix.saturating_add(1))
            .unwrap_or(0)
            .saturating_mul(1000)
    }
}

/// What the leaf certificate of a device says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The subject's common name; the whole subject name (RFC 4514 style) when it has none.
    pub subject: String,
    /// The issuer's whole name, RFC 4514 style (`CN=Portcullis CA, O=...`): compare it with
    /// the certificate authorities a server names in its certificate request.
    pub issuer: String,
    /// The subject alternative names: DNS names, IP addresses, e-mail addresses and URIs as
    /// text. Other kinds of names are left out.
    pub sans: Vec<String>,
    /// Start of validity, Unix seconds.
    pub not_before_unix: i64,
    /// End of validity, Unix seconds (inclusive).
    pub not_after_unix: i64,
    /// SHA-256 of the SubjectPublicKeyInfo: see [`fingerprint`].
    pub fingerprint: DeviceFingerprint,
    /// The certificate may authenticate a TLS client: its extended key usage lists clientAuth,
    /// or it has no extended key usage extension.
    pub client_auth: bool,
    /// The basic constraints extension says CA:TRUE.
    pub is_ca: bool,
}

impl DeviceIdentity {
    /// Reads the identity from the DER of a certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = parse(der)?;
        let subject = match cert.subject().iter_common_name().next() {
            Some(cn) => match cn.as_str() {
                Ok(s) => s.to_owned(),
                Err(_) => cert.subject().to_string(),
            },
            None => cert.subject().to_string(),
        };

        let mut sans = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(bad_extension("subjectAltName"))?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        sans.push((*s).to_owned())
                    }
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            sans.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }

        let client_auth = match cert
            .extended_key_usage()
            .map_err(bad_extension("extendedKeyUsage"))?
        {
            Some(eku) => eku.value.client_auth,
            None => true,
        };
        let is_ca = cert
            .basic_constraints()
            .map_err(bad_extension("basicConstraints"))?
            .is_some_and(|bc| bc.value.ca);

        let validity = cert.validity();
        Ok(Self {
            subject,
            issuer: cert.issuer().to_string(),
            sans,
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
            fingerprint: DeviceFingerprint::of_spki(cert.tbs_certificate.subject_pki.raw),
            client_auth,
            is_ca,
        })
    }

    /// Whether `unix_s` lies within the validity period (both ends included, RFC 5280).
    pub fn is_valid_at(&self, unix_s: i64) -> bool {
        self.not_before_unix <= unix_s && unix_s <= self.not_after_unix
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The RFC 4514 text (`CN=Portcullis CA, O=...`) of a DER-encoded X.501 distinguished name, as
/// a server lists the certificate authorities it accepts in its certificate request; `None`
/// when the bytes are not a name.
pub fn distinguished_name(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    match x509_parser::x509::X509Name::from_der(der) {
        Ok(([], name)) => Some(name.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = DeviceIdentity::from_der(b"\x30\x03\x02\x01\x01").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("not a valid X.509 certificate: "),
            "{err}"
        );
        assert!(fingerprint(b"").is_err());
    }

    #[test]
    fn validity_bounds_are_inclusive() {
        let id = DeviceIdentity {
            subject: "d".into(),
            issuer: "CN=ca".into(),
            sans: vec![],
            not_before_unix: 100,
            not_after_unix: 200,
            fingerprint: DeviceFingerprint::from_bytes([0; 32]),
            client_auth: true,
            is_ca: false,
        };
        assert!(!id.is_valid_at(99));
        assert!(id.is_valid_at(100));
        assert!(id.is_valid_at(200));
        assert!(!id.is_valid_at(201));
    }
}
