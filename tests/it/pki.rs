//! `hands pki init`: the development PKI, checked by an independent
//! implementation (the openssl command line).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::util::*;

fn openssl(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn pki_init_makes_a_ca_and_server_and_client_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let out = Command::new(hands_bin())
        .args(["pki", "init"])
        .arg(&dir)
        .args([
            "--worker-id",
            "host-7",
            "--gateway-name",
            "gw.example.internal",
            "--gateway-name",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for f in hands::pki::FILES {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        let want = if f.ends_with("-key.pem") {
            0o600
        } else {
            0o644
        };
        assert_eq!(mode, want, "{f}");
    }
    let (ok, text) = openssl(
        &["verify", "-CAfile", "ca.pem", "gateway.pem", "worker.pem"],
        &dir,
    );
    assert!(
        ok && text.contains("gateway.pem: OK") && text.contains("worker.pem: OK"),
        "{text}"
    );
    let (_, gw) = openssl(
        &[
            "x509",
            "-in",
            "gateway.pem",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
        ],
        &dir,
    );
    assert!(
        gw.contains("DNS:gw.example.internal") && gw.contains("IP Address:127.0.0.1"),
        "{gw}"
    );
    assert!(
        gw.contains("TLS Web Server Authentication") && !gw.contains("Client"),
        "{gw}"
    );
    let (_, wk) = openssl(
        &[
            "x509",
            "-in",
            "worker.pem",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,extendedKeyUsage",
        ],
        &dir,
    );
    assert!(
        wk.contains("CN = host-7") && wk.contains("URI:urn:hands:worker:host-7"),
        "{wk}"
    );
    assert!(
        wk.contains("TLS Web Client Authentication") && !wk.contains("Server"),
        "{wk}"
    );
    let (ok, text) = openssl(&["x509", "-in", "ca.pem", "-noout", "-checkend", "0"], &dir);
    assert!(ok, "CA already expired: {text}");
    // Keys match their certificates.
    for (cert, key) in [
        ("gateway.pem", "gateway-key.pem"),
        ("worker.pem", "worker-key.pem"),
    ] {
        let (_, a) = openssl(&["x509", "-in", cert, "-noout", "-pubkey"], &dir);
        let (_, b) = openssl(&["pkey", "-in", key, "-pubout"], &dir);
        assert_eq!(a, b, "{key} does not belong to {cert}");
    }

    // An existing PKI is never replaced silently: the same worker again is
    // refused.
    let before = std::fs::read(dir.join("ca-key.pem")).unwrap();
    let out = Command::new(hands_bin())
        .args(["pki", "init"])
        .arg(&dir)
        .args(["--worker-id", "host-7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists") && err.contains("host-7"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), before);
}

/// A second worker gets its certificate from the CA already there, without
/// `--force`: the CA, the gateway's and the first worker's files are left as
/// they are, and both workers chain to the same CA.
#[test]
fn pki_init_issues_another_worker_certificate_from_the_existing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let init = |id: &str| {
        Command::new(hands_bin())
            .args(["pki", "init"])
            .arg(&dir)
            .args(["--worker-id", id])
            .output()
            .unwrap()
    };
    let out = init("w1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before: Vec<Vec<u8>> = hands::pki::FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let out = init("w2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Vec<Vec<u8>> = hands::pki::FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert_eq!(before, after, "the existing PKI changed");
    assert!(stdout.contains("worker-w2.pem"), "{stdout}");
    let mode = std::fs::metadata(dir.join("worker-w2-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (ok, text) = openssl(
        &["verify", "-CAfile", "ca.pem", "worker.pem", "worker-w2.pem"],
        &dir,
    );
    assert!(ok && text.contains("worker-w2.pem: OK"), "{text}");
    assert_eq!(
        hands::net::tls::worker_identity_of_file(&dir.join("worker-w2.pem")).unwrap(),
        "w2"
    );
    let (_, a) = openssl(&["x509", "-in", "worker-w2.pem", "-noout", "-pubkey"], &dir);
    let (_, b) = openssl(&["pkey", "-in", "worker-w2-key.pem", "-pubout"], &dir);
    assert_eq!(a, b);
    // The same worker twice is refused: its certificate exists.
    let out = init("w2");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn expired_certificates_can_be_made_for_tests() {
    let pki = hands::pki::generate(&hands::pki::Options {
        days: -1,
        ..Default::default()
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    hands::pki::write(tmp.path(), &pki, false).unwrap();
    let (ok, _) = openssl(
        &["x509", "-in", "worker.pem", "-noout", "-checkend", "0"],
        tmp.path(),
    );
    assert!(
        !ok,
        "a certificate made with days = -1 must already be expired"
    );
    let (ok, text) = openssl(&["verify", "-CAfile", "ca.pem", "worker.pem"], tmp.path());
    assert!(!ok && text.contains("expired"), "{text}");
}
