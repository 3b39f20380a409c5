//! Device identity read from certificates made by the development PKI.

use portcullis_tls::devpki::{CertProfile, DevCa, DevPkiError};
use portcullis_tls::{DeviceFingerprint, DeviceIdentity, fingerprint};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn device_certificate_identity() {
    let ca = DevCa::generate("Portcullis dev CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let id = DeviceIdentity::from_der(&device.cert_der()).unwrap();
    assert_eq!(id.subject, "laptop");
    assert!(id.sans.is_empty());
    assert!(id.client_auth);
    assert!(!id.is_ca);
    assert_eq!(id.not_after_unix - id.not_before_unix, 365 * 86_400 + 3600);
    assert!(id.is_valid_at(now()));
    assert!(!id.is_valid_at(id.not_after_unix + 1));
    assert!(!id.is_valid_at(id.not_before_unix - 1));
    assert_eq!(id.fingerprint, fingerprint(&device.cert_der()).unwrap());

    // Another device has another key, hence another fingerprint.
    let other = ca.issue_device("laptop").unwrap();
    assert_ne!(fingerprint(&other.cert_der()).unwrap(), id.fingerprint);
    // The text form is what the protocol and the registry use.
    let text = id.fingerprint.to_string();
    assert_eq!(text.parse::<DeviceFingerprint>().unwrap(), id.fingerprint);
}

#[test]
fn fingerprint_is_the_hash_of_the_public_key_info() {
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let der = device.cert_der();
    // Find the SubjectPublicKeyInfo of a P-256 key in the DER: SEQUENCE { SEQUENCE {
    // id-ecPublicKey, prime256v1 }, BIT STRING } is 91 bytes starting with 30 59 30 13.
    let start = der
        .windows(4)
        .position(|w| w == [0x30, 0x59, 0x30, 0x13])
        .expect("P-256 SPKI in the certificate");
    let spki = &der[start..start + 91];
    assert_eq!(fingerprint(&der).unwrap(), DeviceFingerprint::of_spki(spki));
}

#[test]
fn server_and_ca_certificate_identity() {
    let ca = DevCa::generate("Portcullis dev CA").unwrap();
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let server = ca.issue_server(&names).unwrap();
    let id = DeviceIdentity::from_der(&server.cert_der()).unwrap();
    assert_eq!(id.subject, "localhost");
    assert_eq!(id.sans, names);
    assert!(!id.client_auth);
    assert!(!id.is_ca);

    let ca_id = DeviceIdentity::from_der(&ca.cert_der()).unwrap();
    assert_eq!(ca_id.subject, "Portcullis dev CA");
    assert!(ca_id.is_ca);
    assert_eq!(
        ca_id.not_after_unix - ca_id.not_before_unix,
        3650 * 86_400 + 3600
    );
}

#[test]
fn profile_sets_exact_validity_and_key_usage() {
    let ca = DevCa::generate("CA").unwrap();
    let profile = CertProfile {
        common_name: "tablet".to_owned(),
        sans: vec!["tablet.example".to_owned(), "10.0.0.7".to_owned()],
        client_auth: false,
        server_auth: false,
        not_before_unix: 1_700_000_000,
        not_after_unix: 1_700_086_400,
    };
    let cert = ca.issue(&profile).unwrap();
    let id = DeviceIdentity::from_der(&cert.cert_der()).unwrap();
    assert_eq!(id.not_before_unix, 1_700_000_000);
    assert_eq!(id.not_after_unix, 1_700_086_400);
    assert_eq!(id.sans, ["tablet.example", "10.0.0.7"]);
    assert!(!id.is_valid_at(now()));
    // No extended key usage extension at all: usable as a client certificate.
    assert!(id.client_auth);

    let server_only = CertProfile {
        server_auth: true,
        ..profile.clone()
    };
    let id = DeviceIdentity::from_der(&ca.issue(&server_only).unwrap().cert_der()).unwrap();
    assert!(!id.client_auth);
    let both = CertProfile {
        client_auth: true,
        server_auth: true,
        ..profile
    };
    let id = DeviceIdentity::from_der(&ca.issue(&both).unwrap().cert_der()).unwrap();
    assert!(id.client_auth);
}

#[test]
fn bad_requests_are_refused() {
    let ca = DevCa::generate("CA").unwrap();
    assert!(matches!(
        ca.issue_server(&[]),
        Err(DevPkiError::NoServerNames)
    ));
    assert!(matches!(
        ca.issue_device(""),
        Err(DevPkiError::InvalidName { .. })
    ));
    assert!(matches!(
        ca.issue_server(&["bad\nname".to_owned()]),
        Err(DevPkiError::InvalidName { .. })
    ));
    let mut backwards = CertProfile::device("laptop");
    backwards.not_after_unix = backwards.not_before_unix;
    assert!(matches!(
        ca.issue(&backwards),
        Err(DevPkiError::Validity(_))
    ));
    assert!(matches!(
        DevCa::generate(""),
        Err(DevPkiError::InvalidName { .. })
    ));
}

#[test]
fn ca_reloads_only_from_a_matching_ca_pair() {
    let ca = DevCa::generate("CA").unwrap();
    let reloaded = DevCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(reloaded.cert_der(), ca.cert_der());
    assert_eq!(reloaded.key_pem(), ca.key_pem());
    assert_eq!(
        portcullis_tls::parse_certs(reloaded.cert_pem().as_bytes(), "ca.pem").unwrap(),
        vec![ca.cert_der()]
    );

    let other = DevCa::generate("Other").unwrap();
    assert!(matches!(
        DevCa::from_pem(&ca.cert_pem(), &other.key_pem()),
        Err(DevPkiError::KeyMismatch)
    ));

    let leaf = ca.issue_device("laptop").unwrap();
    assert!(matches!(
        DevCa::from_pem(&leaf.cert_pem, &leaf.key_pem),
        Err(DevPkiError::NotCa)
    ));

    let err = DevCa::from_pem("garbage", &ca.key_pem()).unwrap_err();
    assert!(
        err.to_string().starts_with("CA certificate: not PEM"),
        "{err}"
    );
    let err = DevCa::from_pem(&ca.cert_pem(), &ca.cert_pem()).unwrap_err();
    assert!(
        err.to_string().starts_with("CA key: no private key"),
        "{err}"
    );
}

#[test]
fn debug_output_never_shows_a_key() {
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let key_body = device.key_pem.lines().nth(1).unwrap();
    let shown = format!("{device:?}");
    assert!(!shown.contains(key_body), "{shown}");
    assert!(shown.contains("redacted"));
    let ca_key = ca.key_pem();
    let ca_key_body = ca_key.lines().nth(1).unwrap();
    assert!(!format!("{ca:?}").contains(ca_key_body));
}
