//! Real TLS 1.3 handshakes over an in-memory duplex pipe between the configurations of this
//! crate, with certificates from the development PKI.

use std::sync::Arc;

use portcullis_tls::devpki::{CertProfile, DevCa, Issued};
use portcullis_tls::rustls::pki_types::{IpAddr, ServerName};
use portcullis_tls::rustls::{self, ClientConfig, ServerConfig};
use portcullis_tls::{
    ALPN_PCS1, CaHintResolver, DeviceIdentity, TlsError, client_config, distinguished_name,
    exporter, fingerprint, parse_crls, server_config, server_config_with_crls,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

struct Pki {
    ca: DevCa,
    server: Issued,
    device: Issued,
}

fn pki() -> Pki {
    let ca = DevCa::generate("Portcullis test CA").unwrap();
    let server = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    let device = ca.issue_device("laptop").unwrap();
    Pki { ca, server, device }
}

fn server_cfg(pki: &Pki) -> Arc<ServerConfig> {
    server_config(
        vec![pki.server.cert_der()],
        pki.server.key_der(),
        &[pki.ca.cert_der()],
        &[ALPN_PCS1],
    )
    .unwrap()
}

fn client_cfg(pki: &Pki, device: &Issued, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config(
        &[pki.ca.cert_der()],
        vec![device.cert_der()],
        device.key_der(),
        alpn,
    )
    .unwrap()
}

type Outcome = (
    std::io::Result<server::TlsStream<DuplexStream>>,
    std::io::Result<client::TlsStream<DuplexStream>>,
);

async fn handshake_to(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Outcome {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    tokio::join!(
        acceptor.accept(server_io),
        connector.connect(name, client_io)
    )
}

async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    handshake_to(server, client, ServerName::try_from("localhost").unwrap()).await
}

/// The rustls error inside an I/O error from tokio-rustls.
fn rustls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
}

/// Runs a handshake the server must refuse because of the client certificate. In TLS 1.3 the
/// client finishes first; the refusal arrives as an alert on its first read. Returns the
/// server's error and the client's read error.
async fn refused_client(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (rustls::Error, rustls::Error) {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let (server_result, client_read) = tokio::join!(acceptor.accept(server_io), async {
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), client_io)
            .await
            .expect("TLS 1.3 client handshake completes before the server judges its certificate");
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await
    });
    let server_err = server_result.expect_err("server must refuse the client");
    let client_err = client_read.expect_err("client's first read must fail");
    (
        rustls_error(&server_err).clone(),
        rustls_error(&client_err).clone(),
    )
}

#[tokio::test]
async fn mutual_handshake_negotiates_alpn_binds_exporter_and_shows_device() {
    let pki = pki();
    let (server, client) = handshake(
        server_cfg(&pki),
        client_cfg(&pki, &pki.device, &[ALPN_PCS1]),
    )
    .await;
    let mut server = server.unwrap();
    let mut client = client.unwrap();

    let (_, sconn) = server.get_ref();
    let (_, cconn) = client.get_ref();
    assert_eq!(
        sconn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(sconn.alpn_protocol(), Some(ALPN_PCS1));
    assert_eq!(cconn.alpn_protocol(), Some(ALPN_PCS1));

    let server_binding = exporter(sconn).unwrap();
    let client_binding = exporter(cconn).unwrap();
    assert_eq!(server_binding, client_binding);
    assert_eq!(server_binding.len(), 32);
    assert_ne!(server_binding, [0u8; 32]);

    let peer = sconn
        .peer_certificates()
        .expect("server sees the client chain");
    assert_eq!(peer.len(), 1);
    assert_eq!(
        fingerprint(&peer[0]).unwrap(),
        fingerprint(&pki.device.cert_der()).unwrap()
    );
    let identity = DeviceIdentity::from_der(&peer[0]).unwrap();
    assert_eq!(identity.subject, "laptop");
    assert!(identity.client_auth);

    // Application data flows both ways: the server accepted the certificate.
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");

    // Another connection has another binding.
    let (server2, client2) = handshake(
        server_cfg(&pki),
        client_cfg(&pki, &pki.device, &[ALPN_PCS1]),
    )
    .await;
    let (server2, _client2) = (server2.unwrap(), client2.unwrap());
    assert_ne!(exporter(server2.get_ref().1).unwrap(), server_binding);
}

#[tokio::test]
async fn server_certificate_verifies_for_its_ip_address() {
    let pki = pki();
    let name = ServerName::IpAddress(IpAddr::from(std::net::Ipv4Addr::LOCALHOST));
    let (server, client) = handshake_to(
        server_cfg(&pki),
        client_cfg(&pki, &pki.device, &[ALPN_PCS1]),
        name,
    )
    .await;
    server.unwrap();
    client.unwrap();

    let wrong = ServerName::try_from("example.com").unwrap();
    let (_, client) = handshake_to(
        server_cfg(&pki),
        client_cfg(&pki, &pki.device, &[ALPN_PCS1]),
        wrong,
    )
    .await;
    let err = client.expect_err("a name not in the server certificate must fail");
    assert!(matches!(
        rustls_error(&err),
        rustls::Error::InvalidCertificate(_)
    ));
}

#[test]
fn exporter_fails_before_the_handshake() {
    let pki = pki();
    let conn = rustls::ClientConnection::new(
        client_cfg(&pki, &pki.device, &[ALPN_PCS1]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let err = exporter(&conn).unwrap_err();
    assert!(matches!(err, TlsError::Exporter(_)), "{err}");
}

#[tokio::test]
async fn device_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let other = DevCa::generate("Someone else's CA").unwrap();
    let stranger = other.issue_device("laptop").unwrap();
    let (server_err, client_err) =
        refused_client(server_cfg(&pki), client_cfg(&pki, &stranger, &[ALPN_PCS1])).await;
    assert!(
        matches!(server_err, rustls::Error::InvalidCertificate(_)),
        "{server_err:?}"
    );
    assert!(
        matches!(client_err, rustls::Error::AlertReceived(_)),
        "{client_err:?}"
    );
}

#[tokio::test]
async fn expired_device_certificate_is_refused() {
    let pki = pki();
    let mut profile = CertProfile::device("old-laptop");
    profile.not_before_unix -= 3 * 365 * 86_400;
    profile.not_after_unix = profile.not_before_unix + 86_400;
    let expired = pki.ca.issue(&profile).unwrap();
    let (server_err, client_err) =
        refused_client(server_cfg(&pki), client_cfg(&pki, &expired, &[ALPN_PCS1])).await;
    assert!(
        matches!(
            server_err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
                | rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
        ),
        "{server_err:?}"
    );
    assert!(matches!(client_err, rustls::Error::AlertReceived(_)));
}

#[tokio::test]
async fn server_auth_only_certificate_is_refused_as_client_certificate() {
    let pki = pki();
    let not_a_client = pki.ca.issue_server(&["laptop.example".to_owned()]).unwrap();
    let (server_err, client_err) = refused_client(
        server_cfg(&pki),
        client_cfg(&pki, &not_a_client, &[ALPN_PCS1]),
    )
    .await;
    assert!(
        matches!(server_err, rustls::Error::InvalidCertificate(_)),
        "{server_err:?}"
    );
    assert!(matches!(client_err, rustls::Error::AlertReceived(_)));
}

#[tokio::test]
async fn tls12_only_client_fails() {
    let pki = pki();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let tls12 = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![pki.device.cert_der()], pki.device.key_der())
        .unwrap();
    let (server, client) = handshake(server_cfg(&pki), Arc::new(tls12)).await;
    let server_err = server.expect_err("server must refuse TLS 1.2");
    let client_err = client.expect_err("TLS 1.2 client must fail");
    assert!(
        matches!(
            rustls_error(&server_err),
            rustls::Error::PeerIncompatible(_)
        ),
        "{server_err:?}"
    );
    assert!(
        matches!(rustls_error(&client_err), rustls::Error::AlertReceived(_)),
        "{client_err:?}"
    );
}

#[tokio::test]
async fn alpn_mismatch_fails_and_missing_alpn_is_left_to_the_caller() {
    let pki = pki();
    let (server, client) =
        handshake(server_cfg(&pki), client_cfg(&pki, &pki.device, &[b"h2"])).await;
    let server_err = server.expect_err("no common ALPN id must fail");
    assert!(
        matches!(
            rustls_error(&server_err),
            rustls::Error::NoApplicationProtocol
        ),
        "{server_err:?}"
    );
    assert!(client.is_err());

    // A client that offers no ALPN completes the handshake: the server has to check.
    let (server, client) = handshake(server_cfg(&pki), client_cfg(&pki, &pki.device, &[])).await;
    let server = server.unwrap();
    client.unwrap();
    assert_eq!(server.get_ref().1.alpn_protocol(), None);
}

#[tokio::test]
async fn certificate_from_a_reloaded_ca_is_accepted() {
    let pki = pki();
    let reloaded = DevCa::from_pem(&pki.ca.cert_pem(), &pki.ca.key_pem()).unwrap();
    assert_eq!(reloaded.cert_der(), pki.ca.cert_der());
    let device = reloaded.issue_device("phone").unwrap();
    let (server, client) =
        handshake(server_cfg(&pki), client_cfg(&pki, &device, &[ALPN_PCS1])).await;
    let mut server = server.unwrap();
    let mut client = client.unwrap();
    client.write_all(b"x").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 1];
    server.read_exact(&mut buf).await.unwrap();
    let peer = server.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(DeviceIdentity::from_der(&peer).unwrap().subject, "phone");
}

#[tokio::test]
async fn revoked_device_is_refused_when_crls_are_given() {
    let pki = pki();
    let revoked = pki.ca.issue_device("stolen").unwrap();
    let crl_pem = pki.ca.crl_pem(&[revoked.cert_der()]).unwrap();
    let crls = parse_crls(crl_pem.as_bytes(), "crl.pem").unwrap();
    let with_crls = || {
        server_config_with_crls(
            vec![pki.server.cert_der()],
            pki.server.key_der(),
            &[pki.ca.cert_der()],
            crls.clone(),
            &[ALPN_PCS1],
        )
        .unwrap()
    };

    let (server_err, _) =
        refused_client(with_crls(), client_cfg(&pki, &revoked, &[ALPN_PCS1])).await;
    assert!(
        matches!(
            server_err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{server_err:?}"
    );

    // The device that is not listed still gets in.
    let (server, client) =
        handshake(with_crls(), client_cfg(&pki, &pki.device, &[ALPN_PCS1])).await;
    let mut server = server.unwrap();
    let mut client = client.unwrap();
    client.write_all(b"x").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 1];
    server.read_exact(&mut buf).await.unwrap();
}

#[test]
fn configs_refuse_bad_inputs() {
    let pki = pki();
    // A key that does not belong to the certificate.
    let err = server_config(
        vec![pki.server.cert_der()],
        pki.device.key_der(),
        &[pki.ca.cert_der()],
        &[ALPN_PCS1],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err}");
    let err = client_config(
        &[pki.ca.cert_der()],
        vec![pki.device.cert_der()],
        pki.server.key_der(),
        &[ALPN_PCS1],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err}");

    // Nothing to verify clients against.
    let err = server_config(
        vec![pki.server.cert_der()],
        pki.server.key_der(),
        &[],
        &[ALPN_PCS1],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::NoRoots { .. }), "{err}");
    assert!(err.to_string().contains("clients"), "{err}");

    // No own certificate.
    let err = client_config(&[pki.ca.cert_der()], vec![], pki.device.key_der(), &[]).unwrap_err();
    assert!(matches!(err, TlsError::EmptyChain), "{err}");

    // The configurations say what Portcullis promises.
    let server = server_cfg(&pki);
    assert_eq!(server.alpn_protocols, vec![ALPN_PCS1.to_vec()]);
    assert_eq!(server.max_early_data_size, 0);
    let client = client_cfg(&pki, &pki.device, &[ALPN_PCS1]);
    assert!(!client.enable_early_data);
    assert_eq!(client.alpn_protocols, vec![ALPN_PCS1.to_vec()]);
}

#[tokio::test]
async fn hint_resolver_names_the_ca_the_server_expects_for_a_refused_device() {
    let pki = pki();
    let other = DevCa::generate("Someone else's CA").unwrap();
    let stranger = other.issue_device("laptop").unwrap();
    let resolver =
        Arc::new(CaHintResolver::new(vec![stranger.cert_der()], stranger.key_der()).unwrap());
    assert_eq!(resolver.expected_issuers(), None);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let mut client = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(resolver.clone());
    client.alpn_protocols = vec![ALPN_PCS1.to_vec()];
    let (server_err, _) = refused_client(server_cfg(&pki), Arc::new(client)).await;
    assert!(
        matches!(server_err, rustls::Error::InvalidCertificate(_)),
        "{server_err:?}"
    );
    // The server named its own CA; the refused device's issuer is another one.
    assert_eq!(
        resolver.expected_issuers(),
        Some(vec!["CN=Portcullis test CA".to_owned()])
    );
    let ours = DeviceIdentity::from_der(&stranger.cert_der()).unwrap();
    assert_eq!(ours.issuer, "CN=Someone else's CA");
    assert_eq!(resolver.presented_issuer(), Some(ours.issuer.clone()));
    assert_eq!(
        resolver.refusal_hint().unwrap(),
        "the server accepts client certificates issued by CN=Portcullis test CA; this one is \
         issued by CN=Someone else's CA"
    );

    // Around the resolver of a configuration of this crate: the device still gets in, and the
    // request's CA is recorded.
    let mut config = (*client_cfg(&pki, &pki.device, &[ALPN_PCS1])).clone();
    let wrapped = Arc::new(CaHintResolver::wrap(
        config.client_auth_cert_resolver.clone(),
    ));
    config.client_auth_cert_resolver = wrapped.clone();
    let (server, client) = handshake(server_cfg(&pki), Arc::new(config)).await;
    server.expect("the wrapped resolver presents the device certificate");
    client.unwrap();
    assert_eq!(
        wrapped.expected_issuers(),
        Some(vec!["CN=Portcullis test CA".to_owned()])
    );
    assert_eq!(
        wrapped.presented_issuer().as_deref(),
        Some("CN=Portcullis test CA")
    );
    assert_eq!(distinguished_name(b"\x04\x01x"), None, "not a name");
}
