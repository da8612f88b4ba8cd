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

    // An existing PKI is never replaced silently.
    let before = std::fs::read(dir.join("ca-key.pem")).unwrap();
    let out = Command::new(hands_bin())
        .args(["pki", "init"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), before);
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
