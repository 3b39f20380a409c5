//! PEM loading: the happy path and errors that name the file and the cause.

use std::path::{Path, PathBuf};

use portcullis_tls::devpki::DevCa;
use portcullis_tls::{PemErrorKind, load_certs, load_crls, load_key, parse_certs, parse_key};

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn written_certificate_and_key_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let cert_path = dir.path().join("laptop.pem");
    let key_path = dir.path().join("laptop-key.pem");
    device.write(&cert_path, &key_path).unwrap();

    assert_eq!(load_certs(&cert_path).unwrap(), vec![device.cert_der()]);
    assert_eq!(
        load_key(&key_path).unwrap().secret_der(),
        device.key_der().secret_der()
    );

    // A chain file keeps its order.
    let chain = format!("{}{}", device.cert_pem, ca.cert_pem());
    let chain_path = write(dir.path(), "chain.pem", chain.as_bytes());
    assert_eq!(
        load_certs(&chain_path).unwrap(),
        vec![device.cert_der(), ca.cert_der()]
    );

    // A combined file (certificate and key) serves both.
    let both = format!("{}{}", device.cert_pem, device.key_pem);
    let both_path = write(dir.path(), "both.pem", both.as_bytes());
    assert_eq!(load_certs(&both_path).unwrap(), vec![device.cert_der()]);
    assert!(load_key(&both_path).is_ok());
}

#[cfg(unix)]
#[test]
fn key_file_is_private_even_when_it_existed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let key_path = write(dir.path(), "laptop-key.pem", b"old");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    device
        .write(&dir.path().join("laptop.pem"), &key_path)
        .unwrap();
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), device.key_pem);
}

#[test]
fn write_names_the_file_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let missing = dir.path().join("no-such-dir").join("laptop-key.pem");
    let err = device
        .write(&dir.path().join("laptop.pem"), &missing)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("cannot write"), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device-key.pem");
    let err = load_key(&path).unwrap_err();
    assert_eq!(err.file(), path.display().to_string());
    match err.kind() {
        PemErrorKind::Read(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{}: cannot read: ", path.display())),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    let err = load_certs(&dir.path().join("ca.pem")).unwrap_err();
    assert!(err.to_string().contains("ca.pem: cannot read: "), "{err}");
    let err = load_crls(&dir.path().join("crl.pem")).unwrap_err();
    assert!(err.to_string().contains("crl.pem: cannot read: "), "{err}");
}

#[test]
fn empty_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "ca.pem", b"\n  \n");
    let err = load_certs(&path).unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::Empty), "{err}");
    assert_eq!(
        err.to_string(),
        format!("{}: the file is empty", path.display())
    );
    let err = load_key(&path).unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::Empty), "{err}");
}

#[test]
fn garbage_is_not_pem() {
    let err = parse_certs(b"hello, I am not a certificate\n", "ca.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::NotPem), "{err}");
    assert!(err.to_string().starts_with("ca.pem: not PEM"), "{err}");
    // Binary DER is not PEM either.
    let ca = DevCa::generate("CA").unwrap();
    let err = parse_certs(&ca.cert_der(), "ca.der").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::NotPem), "{err}");
    let err = parse_key(b"\x00\x01\x02", "key.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::NotPem), "{err}");
}

#[test]
fn key_file_given_for_a_certificate_and_the_reverse() {
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();

    let err = parse_certs(device.key_pem.as_bytes(), "device-key.pem").unwrap_err();
    match err.kind() {
        PemErrorKind::NoCertificate { found } => assert_eq!(found, &["PRIVATE KEY"]),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "device-key.pem: no CERTIFICATE block found (it holds: PRIVATE KEY)"
    );
    // The message never carries key material.
    let body = device.key_pem.lines().nth(1).unwrap();
    assert!(!err.to_string().contains(body));
    assert!(!format!("{err:?}").contains(body));

    let err = parse_key(device.cert_pem.as_bytes(), "device.pem").unwrap_err();
    assert!(
        matches!(err.kind(), PemErrorKind::NoPrivateKey { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("device.pem: no private key found"),
        "{err}"
    );
    assert!(
        err.to_string().ends_with("(it holds: CERTIFICATE)"),
        "{err}"
    );
}

#[test]
fn broken_blocks_are_reported() {
    let ca = DevCa::generate("CA").unwrap();
    let pem = ca.cert_pem();

    // A character that is not base64 in the body.
    let mut lines: Vec<String> = pem.lines().map(str::to_owned).collect();
    lines[1].replace_range(5..6, "!");
    let broken = lines.join("\n");
    let err = parse_certs(broken.as_bytes(), "ca.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::Base64), "{err}");
    assert!(
        err.to_string().starts_with("ca.pem: broken base64"),
        "{err}"
    );

    // No END line.
    let truncated: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----END"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = parse_certs(truncated.as_bytes(), "ca.pem").unwrap_err();
    match err.kind() {
        PemErrorKind::MissingEnd { label } => assert!(label.contains("CERTIFICATE")),
        other => panic!("unexpected {other:?}"),
    }

    // Well-formed PEM around bytes that are not a certificate.
    let fake = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    let err = parse_certs(fake.as_bytes(), "ca.pem").unwrap_err();
    match err.kind() {
        PemErrorKind::BadCertificate { index, .. } => assert_eq!(*index, 1),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("ca.pem: CERTIFICATE block #1: not a valid X.509 certificate: "),
        "{err}"
    );
}

#[test]
fn keys_that_cannot_be_used_are_reported() {
    let ca = DevCa::generate("CA").unwrap();
    let a = ca.issue_device("a").unwrap();
    let b = ca.issue_device("b").unwrap();

    let two = format!("{}{}", a.key_pem, b.key_pem);
    let err = parse_key(two.as_bytes(), "keys.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::SeveralKeys(2)), "{err}");

    let encrypted =
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAMCAQE=\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let err = parse_key(encrypted.as_bytes(), "key.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::EncryptedKey), "{err}");
    assert!(
        err.to_string()
            .starts_with("key.pem: the private key is encrypted")
    );

    let junk = "-----BEGIN PRIVATE KEY-----\nMAMCAQE=\n-----END PRIVATE KEY-----\n";
    let err = parse_key(junk.as_bytes(), "key.pem").unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::UnusableKey(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("key.pem: the private key cannot be used")
    );
}

#[test]
fn crl_files_load_and_certificates_are_not_crls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("CA").unwrap();
    let device = ca.issue_device("laptop").unwrap();
    let crl = write(
        dir.path(),
        "crl.pem",
        ca.crl_pem(&[device.cert_der()]).unwrap().as_bytes(),
    );
    assert_eq!(load_crls(&crl).unwrap().len(), 1);
    let not_crl = write(dir.path(), "ca.pem", ca.cert_pem().as_bytes());
    let err = load_crls(&not_crl).unwrap_err();
    assert!(matches!(err.kind(), PemErrorKind::NoCrl { .. }), "{err}");
}
