//! PEM loading with errors that name the file and what is wrong with it.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::identity::CertError;

/// A PEM file or buffer could not be used: names the file (or the source given to the
/// `parse_*` functions) and the cause, for example
/// `ca.pem: no CERTIFICATE block found (it holds: PRIVATE KEY)`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct PemError {
    file: String,
    kind: PemErrorKind,
}

impl PemError {
    fn new(file: &str, kind: PemErrorKind) -> Self {
        Self {
            file: file.to_owned(),
            kind,
        }
    }

    /// The file path or source name the error is about.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// What is wrong.
    pub fn kind(&self) -> &PemErrorKind {
        &self.kind
    }
}

/// What is wrong with a PEM file (see [`PemError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemErrorKind {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// The file holds nothing but white space.
    #[error("the file is empty")]
    Empty,
    /// The file has no `-----BEGIN ...-----` line at all.
    #[error("not PEM: no \"-----BEGIN\" line found")]
    NotPem,
    /// A `-----BEGIN` line is malformed.
    #[error("malformed \"-----BEGIN\" line")]
    BadBeginLine,
    /// A block has no matching `-----END` line.
    #[error("a {label} block has no \"-----END {label}-----\" line")]
    MissingEnd {
        /// The label of the unterminated block.
        label: String,
    },
    /// The base64 inside a block does not decode.
    #[error("broken base64 inside a PEM block")]
    Base64,
    /// A block is too large to be plausible.
    #[error("a PEM block is larger than 256 MiB")]
    TooLarge,
    /// No `CERTIFICATE` block was found.
    #[error("no CERTIFICATE block found{}", found_suffix(.found))]
    NoCertificate {
        /// The labels of the blocks that were found.
        found: Vec<String>,
    },
    /// A `CERTIFICATE` block does not hold a valid X.509 certificate.
    #[error("CERTIFICATE block #{index}: {error}")]
    BadCertificate {
        /// Position of the block among the CERTIFICATE blocks, from 1.
        index: usize,
        /// Why it is not a certificate.
        error: CertError,
    },
    /// No private key block was found.
    #[error(
        "no private key found (no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block){}",
        found_suffix(.found)
    )]
    NoPrivateKey {
        /// The labels of the blocks that were found.
        found: Vec<String>,
    },
    /// The only private key is encrypted.
    #[error("the private key is encrypted (ENCRYPTED PRIVATE KEY); an unencrypted key is needed")]
    EncryptedKey,
    /// More than one private key was found.
    #[error("{0} private keys found; exactly one is expected")]
    SeveralKeys(usize),
    /// The private key does not decode as a key the `ring` provider can use.
    #[error("the private key cannot be used: {0}")]
    UnusableKey(String),
    /// No `X509 CRL` block was found.
    #[error("no X509 CRL block found{}", found_suffix(.found))]
    NoCrl {
        /// The labels of the blocks that were found.
        found: Vec<String>,
    },
    /// An `X509 CRL` block (or a DER file) does not hold a valid certificate revocation list.
    #[error("X509 CRL #{index}: not a valid certificate revocation list: {reason}")]
    BadCrl {
        /// Position of the CRL in the file, from 1.
        index: usize,
        /// Why it is not a CRL.
        reason: String,
    },
    /// A CRL file is neither PEM nor the DER of one CRL.
    #[error("neither PEM (no \"-----BEGIN\" line) nor the DER of a certificate revocation list")]
    NotCrl,
}

fn found_suffix(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(" (it holds: {})", found.join(", "))
    }
}

/// Reads a file, naming it in the error.
fn read(path: &Path) -> Result<(Vec<u8>, String), PemError> {
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => Ok((bytes, name)),
        Err(e) => Err(PemError::new(&name, PemErrorKind::Read(e))),
    }
}

/// The labels of all `-----BEGIN <label>-----` lines, in order, without repetition.
fn labels(pem: &[u8]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in pem.split(|b| *b == b'\n' || *b == b'\r') {
        let Some(rest) = line.strip_prefix(b"-----BEGIN ") else {
            continue;
        };
        let label = rest.trim_ascii_end();
        let label = label.strip_suffix(b"-----").unwrap_or(label);
        let label = String::from_utf8_lossy(label).into_owned();
        if !found.contains(&label) {
            found.push(label);
        }
    }
    found
}

/// Checks for the empty and not-PEM cases, returning the block labels.
fn precheck(pem: &[u8], source: &str) -> Result<Vec<String>, PemError> {
    if pem.trim_ascii().is_empty() {
        return Err(PemError::new(source, PemErrorKind::Empty));
    }
    let found = labels(pem);
    if found.is_empty() {
        return Err(PemError::new(source, PemErrorKind::NotPem));
    }
    Ok(found)
}

fn syntax_error(source: &str, error: pem::Error) -> PemError {
    let kind = match error {
        pem::Error::MissingSectionEnd { end_marker } => PemErrorKind::MissingEnd {
            label: String::from_utf8_lossy(&end_marker).into_owned(),
        },
        pem::Error::IllegalSectionStart { .. } => PemErrorKind::BadBeginLine,
        pem::Error::Base64Decode(_) => PemErrorKind::Base64,
        pem::Error::Io(e) => PemErrorKind::Read(e),
        pem::Error::SectionTooLarge => PemErrorKind::TooLarge,
        // `NoItemsFound` is not produced by the iterators; treat anything else as unreadable.
        _ => PemErrorKind::NotPem,
    };
    PemError::new(source, kind)
}

/// Loads all certificates of a PEM file, in file order (leaf first for a chain).
///
/// Fails naming the file when it cannot be read, is empty, is not PEM, has a broken block, has
/// no `CERTIFICATE` block, or holds a block that is not a valid X.509 certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let (bytes, name) = read(path)?;
    parse_certs(&bytes, &name)
}

/// Loads the single private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
///
/// Fails naming the file when it cannot be read, is empty, is not PEM, has a broken block, has
/// no private key or more than one, holds only an encrypted key, or holds a key the `ring`
/// provider cannot use. Errors never include key material.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let (bytes, name) = read(path)?;
    parse_key(&bytes, &name)
}

/// Loads the certificate revocation lists of a file: every `X509 CRL` block of a PEM file, or
/// the one CRL of a DER file (as `openssl crl -outform DER` writes it).
///
/// Fails naming the file when it cannot be read, is empty, is neither PEM nor DER, has a broken
/// block, has no `X509 CRL` block, or holds one that is not a valid CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let (bytes, name) = read(path)?;
    if !bytes.trim_ascii().is_empty() && labels(&bytes).is_empty() {
        // No PEM line at all: the DER of one CRL (an ASN.1 SEQUENCE), or nothing usable.
        if bytes.first() != Some(&0x30) {
            return Err(PemError::new(&name, PemErrorKind::NotCrl));
        }
        if let Err(reason) = crate::crl::parse_crl(&bytes) {
            return Err(PemError::new(
                &name,
                PemErrorKind::BadCrl { index: 1, reason },
            ));
        }
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    parse_crls(&bytes, &name)
}

/// [`load_certs`] on PEM text already in memory; `source` names it in errors.
pub fn parse_certs(pem: &[u8], source: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let found = precheck(pem, source)?;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| syntax_error(source, e))?;
    if certs.is_empty() {
        return Err(PemError::new(source, PemErrorKind::NoCertificate { found }));
    }
    for (i, cert) in certs.iter().enumerate() {
        if let Err(error) = crate::identity::parse(cert) {
            return Err(PemError::new(
                source,
                PemErrorKind::BadCertificate {
                    index: i + 1,
                    error,
                },
            ));
        }
    }
    Ok(certs)
}

/// [`load_key`] on PEM text already in memory; `source` names it in errors.
pub fn parse_key(pem: &[u8], source: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    let found = precheck(pem, source)?;
    let mut keys = PrivateKeyDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| syntax_error(source, e))?;
    let key = match keys.len() {
        1 => keys.remove(0),
        0 if found.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") => {
            return Err(PemError::new(source, PemErrorKind::EncryptedKey));
        }
        0 => return Err(PemError::new(source, PemErrorKind::NoPrivateKey { found })),
        n => return Err(PemError::new(source, PemErrorKind::SeveralKeys(n))),
    };
    if let Err(e) = crate::provider()
        .key_provider
        .load_private_key(key.clone_key())
    {
        return Err(PemError::new(
            source,
            PemErrorKind::UnusableKey(e.to_string()),
        ));
    }
    Ok(key)
}

/// [`load_crls`] on PEM text already in memory; `source` names it in errors.
pub fn parse_crls(
    pem: &[u8],
    source: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let found = precheck(pem, source)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| syntax_error(source, e))?;
    if crls.is_empty() {
        return Err(PemError::new(source, PemErrorKind::NoCrl { found }));
    }
    for (i, crl) in crls.iter().enumerate() {
        if let Err(reason) = crate::crl::parse_crl(crl.as_ref()) {
            return Err(PemError::new(
                source,
                PemErrorKind::BadCrl {
                    index: i + 1,
                    reason,
                },
            ));
        }
    }
    Ok(crls)
}
