//! Certificate revocation lists: loading PEM and DER, the index of listed certificates, and a
//! verifier whose lists are replaced between real TLS 1.3 handshakes (full and resumed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_tls::devpki::{DevCa, Issued};
use portcullis_tls::rustls::pki_types::ServerName;
use portcullis_tls::rustls::{self, ClientConfig, HandshakeKind, ServerConfig};
use portcullis_tls::{
    ALPN_PCS1, CertificateRevocationListDer, PemErrorKind, ReloadableClientVerifier,
    RevokedCertificates, TlsError, client_config, load_crls, parse_crls,
    server_config_with_verifier,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn crls_listing(ca: &DevCa, revoked: &[&Issued]) -> Vec<CertificateRevocationListDer<'static>> {
    let ders: Vec<_> = revoked.iter().map(|i| i.cert_der()).collect();
    parse_crls(ca.crl_pem(&ders).unwrap().as_bytes(), "test.crl").unwrap()
}

#[test]
fn crl_files_load_as_pem_or_der_and_broken_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let pem = ca.crl_pem(&[device.cert_der()]).unwrap();
    let der = parse_crls(pem.as_bytes(), "crl.pem").unwrap().remove(0);

    // PEM, and the same CRL as DER.
    let from_pem = load_crls(&write(dir.path(), "crl.pem", pem.as_bytes())).unwrap();
    let from_der = load_crls(&write(dir.path(), "crl.der", der.as_ref())).unwrap();
    assert_eq!(from_pem, vec![der.clone()]);
    assert_eq!(from_der, vec![der.clone()]);

    // DER cut short, or followed by junk.
    let cut = write(
        dir.path(),
        "cut.der",
        &der.as_ref()[..der.as_ref().len() - 10],
    );
    let err = load_crls(&cut).unwrap_err();
    assert!(
        matches!(err.kind(), PemErrorKind::BadCrl { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cut.der"), "{err}");
    let mut long = der.as_ref().to_vec();
    long.extend_from_slice(b"junk");
    let err = load_crls(&write(dir.path(), "long.der", &long)).unwrap_err();
    assert!(
        err.to_string().contains("unexpected bytes after its end"),
        "{err}"
    );

    // Neither PEM nor DER.
    let err = load_crls(&write(dir.path(), "junk", b"hello, world")).unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::NotCrl), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: neither PEM",
            dir.path().join("junk").display()
        )),
        "{err}"
    );

    // A PEM block labelled X509 CRL that holds something else (a certificate).
    let cert_body = pem::encode(&pem::Pem::new("X509 CRL", device.cert_der().to_vec()));
    let err = load_crls(&write(dir.path(), "fake.pem", cert_body.as_bytes())).unwrap_err();
    assert!(
        matches!(err.kind(), PemErrorKind::BadCrl { index: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("X509 CRL #1: not a valid certificate revocation list"),
        "{err}"
    );
}

#[test]
fn the_index_lists_exactly_the_revoked_certificates_of_its_issuer() {
    let ca = DevCa::generate("CA one").unwrap();
    let other_ca = DevCa::generate("CA two").unwrap();
    let lost = ca.issue_device("lost").unwrap();
    let kept = ca.issue_device("kept").unwrap();
    // A certificate of another CA with, possibly, any serial: never listed by CA one's CRL.
    let foreign = other_ca.issue_device("foreign").unwrap();

    let crls = crls_listing(&ca, &[&lost]);
    let index = RevokedCertificates::from_crls(&crls, &[ca.cert_der()]).unwrap();
    assert_eq!((index.crl_count(), index.len()), (1, 1));
    assert!(index.is_revoked(&lost.cert_der()).unwrap());
    assert!(!index.is_revoked(&kept.cert_der()).unwrap());
    assert!(!index.is_revoked(&foreign.cert_der()).unwrap());

    // An empty CRL and no CRL list nothing.
    let empty = RevokedCertificates::from_crls(&crls_listing(&ca, &[]), &[ca.cert_der()]).unwrap();
    assert!(empty.is_empty());
    assert!(!empty.is_revoked(&lost.cert_der()).unwrap());
    assert!(
        !RevokedCertificates::empty()
            .is_revoked(&lost.cert_der())
            .unwrap()
    );

    // Garbage is not a certificate.
    let garbage = portcullis_tls::CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    assert!(index.is_revoked(&garbage).is_err());
}

#[test]
fn a_crl_not_signed_by_its_client_ca_is_refused() {
    let ca = DevCa::generate("Portcullis CA").unwrap();
    // Same name, another key: its CRL claims the real CA as issuer.
    let impostor = DevCa::generate("Portcullis CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let forged = crls_listing(&impostor, &[&device]);

    let err = RevokedCertificates::from_crls(&forged, &[ca.cert_der()]).unwrap_err();
    assert!(matches!(err, TlsError::BadCrl { index: 1, .. }), "{err}");
    assert!(
        err.to_string().contains("signature does not verify"),
        "{err}"
    );

    // The verifier keeps its lists in force when handed such a CRL.
    let verifier = ReloadableClientVerifier::new(&[ca.cert_der()], Vec::new()).unwrap();
    assert!(verifier.set_crls(forged).is_err());
    assert_eq!(verifier.generation(), 0);
    assert!(!verifier.is_revoked(&device.cert_der()));
}

struct Pki {
    ca: DevCa,
    server: Issued,
}

fn pki() -> Pki {
    let ca = DevCa::generate("Portcullis test CA").unwrap();
    let server = ca.issue_server(&["localhost".to_owned()]).unwrap();
    Pki { ca, server }
}

fn server_cfg(pki: &Pki, verifier: Arc<ReloadableClientVerifier>) -> Arc<ServerConfig> {
    server_config_with_verifier(
        vec![pki.server.cert_der()],
        pki.server.key_der(),
        verifier,
        &[ALPN_PCS1],
    )
    .unwrap()
}

fn client_cfg(pki: &Pki, device: &Issued) -> Arc<ClientConfig> {
    client_config(
        &[pki.ca.cert_der()],
        vec![device.cert_der()],
        device.key_der(),
        &[ALPN_PCS1],
    )
    .unwrap()
}

/// A handshake, then one byte from server to client (which also delivers the session
/// tickets). Returns how the server saw the handshake and the client's leaf certificate, or
/// the server's error.
async fn connect(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> Result<(HandshakeKind, Vec<u8>), rustls::Error> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.clone());
    let connector = TlsConnector::from(client.clone());
    let (accepted, connected) = tokio::join!(
        acceptor.accept(server_io),
        connector.connect(ServerName::try_from("localhost").unwrap(), client_io)
    );
    let mut tls = match accepted {
        Ok(tls) => tls,
        Err(e) => {
            return Err(e
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .cloned()
                .unwrap_or_else(|| panic!("not a rustls error: {e:?}")));
        }
    };
    let mut client = connected.unwrap();
    tls.write_all(b"x").await.unwrap();
    tls.flush().await.unwrap();
    let mut byte = [0u8; 1];
    client.read_exact(&mut byte).await.unwrap();
    let (_, conn) = tls.get_ref();
    Ok((
        conn.handshake_kind().unwrap(),
        conn.peer_certificates().unwrap()[0].to_vec(),
    ))
}

#[tokio::test]
async fn new_crls_apply_to_the_next_full_handshake_and_resumption_needs_the_index() {
    let pki = pki();
    let laptop = pki.ca.issue_device("laptop").unwrap();
    let phone = pki.ca.issue_device("phone").unwrap();
    let verifier =
        Arc::new(ReloadableClientVerifier::new(&[pki.ca.cert_der()], Vec::new()).unwrap());
    let server = server_cfg(&pki, verifier.clone());
    let laptop_client = client_cfg(&pki, &laptop);

    // No CRL yet: a full handshake, then a resumed one.
    assert_eq!(
        connect(&server, &laptop_client).await.unwrap().0,
        HandshakeKind::Full
    );
    assert_eq!(
        connect(&server, &laptop_client).await.unwrap().0,
        HandshakeKind::Resumed
    );

    // The laptop is listed. A full handshake (a client without a session) is refused at once,
    // with no new ServerConfig.
    verifier
        .set_crls(crls_listing(&pki.ca, &[&laptop]))
        .unwrap();
    assert_eq!(verifier.generation(), 1);
    let fresh_client = client_cfg(&pki, &laptop);
    let err = connect(&server, &fresh_client).await.unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
    // The phone, not listed, still gets in.
    connect(&server, &client_cfg(&pki, &phone)).await.unwrap();

    // A resumed session of the laptop passes the TLS layer: rustls does not verify it again
    // (the session cache survived the reload). The index says it is revoked.
    let (kind, leaf) = connect(&server, &laptop_client).await.unwrap();
    assert_eq!(kind, HandshakeKind::Resumed);
    assert!(verifier.is_revoked(&leaf.into()));
    assert!(!verifier.is_revoked(&phone.cert_der()));

    // Lists emptied again: the laptop gets in with a full handshake.
    verifier.set_crls(Vec::new()).unwrap();
    assert_eq!(verifier.generation(), 2);
    assert!(!verifier.is_revoked(&laptop.cert_der()));
    assert_eq!(
        connect(&server, &fresh_client).await.unwrap().0,
        HandshakeKind::Full
    );
}
