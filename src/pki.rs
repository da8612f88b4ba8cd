//! A development PKI: a CA and the certificates of a gateway (TLS server) and a
//! worker (TLS client), for `hands pki init`, `hands demo` and the tests; and
//! more worker certificates from a CA made earlier ([`issue_worker`]). Keys are
//! ECDSA P-256. Production deployments bring their own CA (an internal PKI,
//! cert-manager); nothing in hands requires this one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}: {cause}")]
    Generate {
        what: &'static str,
        cause: rcgen::Error,
    },
    #[error("invalid name {0:?}: neither an IP address nor a DNS name")]
    Name(String),
    #[error("{0} exists; pass --force to replace the development PKI")]
    Exists(PathBuf),
    #[error(
        "worker {id:?} already has a certificate: {path} exists (another worker id gets \
         one of its own; --force replaces the whole development PKI)"
    )]
    WorkerExists { id: String, path: PathBuf },
    #[error(
        "{dir} already holds a development CA and its gateway certificate: --gateway-name \
         applies only to a new PKI (--force replaces the whole of it)"
    )]
    GatewayNames { dir: PathBuf },
    #[error("reading {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The existing CA cannot issue: unparsable, not matching its key, expired.
    #[error("{path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What `hands pki init` creates.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca: Issued,
    pub gateway: Issued,
    pub worker: Issued,
}

/// What to put in the certificates.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the gateway is reached by (DNS names or IP addresses).
    pub gateway_names: Vec<String>,
    /// The worker's identity: its certificate's common name (the gateway takes
    /// it as the worker id).
    pub worker_id: String,
    /// Validity from now, in days; negative makes an expired certificate (tests).
    pub days: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateway_names: vec!["localhost".into(), "127.0.0.1".into()],
            worker_id: "dev-worker".into(),
            days: 90,
        }
    }
}

fn gen(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |cause| PkiError::Generate { what, cause }
}

fn params(cn: &str, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree.
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(days);
    if days < 0 {
        p.not_before = now + time::Duration::days(days - 1);
    }
    p
}

/// A CA that can issue more certificates (tests issue expired or foreign ones
/// from the same CA; `hands pki init` more workers from the CA of an earlier run).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The end of the CA's validity: nothing it issues outlives it.
    not_after: time::OffsetDateTime,
    pub issued: Issued,
}

impl Ca {
    /// A new self-signed CA valid for `days` (at least one day).
    pub fn new(days: i64) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(gen("the CA key"))?;
        let mut params = params("hands development CA", days.max(1) + 1);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(gen("the CA certificate"))?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Ca {
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            issued,
        })
    }

    /// The CA written earlier at `cert` (`ca.pem`) and `key` (`ca-key.pem`):
    /// the key must be the certificate's, and the certificate a CA still valid.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|cause| PkiError::Read {
                path: path.to_path_buf(),
                cause,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let bad = |path: &Path, message: String| PkiError::Ca {
            path: path.to_path_buf(),
            message,
        };
        let key_pair =
            KeyPair::from_pem(&key_pem).map_err(|e| bad(key, format!("not a private key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(cert, format!("not a PEM certificate: {e}")))?;
        let x509 = pem
            .parse_x509()
            .map_err(|e| bad(cert, format!("not a certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(bad(cert, "not a CA certificate".into()));
        }
        if *x509.public_key().subject_public_key.data != *key_pair.public_key_raw() {
            return Err(bad(
                key,
                format!("not the key of the CA certificate {}", cert.display()),
            ));
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= time::OffsetDateTime::now_utc() {
            return Err(bad(
                cert,
                format!("the CA expired on {not_after}; --force makes a new development PKI"),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(|e| bad(cert, format!("cannot issue from this CA: {e}")))?;
        Ok(Ca {
            issuer,
            not_after,
            issued: Issued { cert_pem, key_pem },
        })
    }

    /// `p` with its validity cut at the CA's own.
    fn within(&self, mut p: CertificateParams) -> CertificateParams {
        p.not_after = p.not_after.min(self.not_after);
        p
    }

    /// A gateway (TLS server) certificate for `names` (DNS names or IPs).
    pub fn gateway(&self, names: &[String], days: i64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(gen("the gateway key"))?;
        let mut gw = params("hands gateway", days);
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|_| PkiError::Name(name.clone()))?,
                ),
            };
            gw.subject_alt_names.push(san);
        }
        gw.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        gw.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = self
            .within(gw)
            .signed_by(&key, &self.issuer)
            .map_err(gen("the gateway certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A worker (TLS client) certificate: common name and
    /// `urn:hands:worker:<id>` URI.
    pub fn worker(&self, worker_id: &str, days: i64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(gen("the worker key"))?;
        let mut wk = params(worker_id, days);
        let uri = format!("{}{worker_id}", crate::net::tls::WORKER_URI_PREFIX);
        wk.subject_alt_names = vec![SanType::URI(
            uri.clone().try_into().map_err(|_| PkiError::Name(uri))?,
        )];
        wk.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        wk.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = self
            .within(wk)
            .signed_by(&key, &self.issuer)
            .map_err(gen("the worker certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Generates a CA, a gateway server certificate and a worker client certificate.
pub fn generate(opts: &Options) -> Result<DevPki, PkiError> {
    let ca = Ca::new(opts.days)?;
    Ok(DevPki {
        gateway: ca.gateway(&opts.gateway_names, opts.days)?,
        worker: ca.worker(&opts.worker_id, opts.days)?,
        ca: ca.issued,
    })
}

/// The files `write` creates, relative to its directory.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "gateway.pem",
    "gateway-key.pem",
    "worker.pem",
    "worker-key.pem",
];

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |cause| PkiError::Write { path, cause }
}

/// Creates `dir` (0700) if it is missing.
fn make_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_error(dir))
}

/// Writes `text` to `dir/name` through a temporary file and a rename: keys
/// (`*-key.pem`) 0600, certificates 0644.
fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf, PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mode = if name.ends_with("-key.pem") {
        0o600
    } else {
        0o644
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_error(&tmp))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(write_error(&tmp))?;
    f.sync_all().map_err(write_error(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(write_error(&path))?;
    Ok(path)
}

/// The certificate and key files of a worker issued from an existing CA.
pub fn worker_files(worker_id: &str) -> [String; 2] {
    [
        format!("worker-{worker_id}.pem"),
        format!("worker-{worker_id}-key.pem"),
    ]
}

/// Whether `dir` holds a development CA (`ca.pem` and `ca-key.pem`).
pub fn has_ca(dir: &Path) -> bool {
    dir.join(FILES[0]).exists() && dir.join(FILES[1]).exists()
}

/// Issues a certificate for one more worker from the CA already in `dir`
/// (see [`has_ca`]) and writes it as [`worker_files`]; nothing else in `dir`
/// changes. Refused when that worker already has a certificate there: its own
/// files, or `worker.pem` of the first run naming the same worker.
pub fn issue_worker(dir: &Path, worker_id: &str, days: i64) -> Result<[PathBuf; 2], PkiError> {
    let exists = |path: PathBuf| PkiError::WorkerExists {
        id: worker_id.to_string(),
        path,
    };
    let first = dir.join("worker.pem");
    if crate::net::tls::worker_identity_of_file(&first).is_ok_and(|id| id == worker_id) {
        return Err(exists(first));
    }
    let [cert_name, key_name] = worker_files(worker_id);
    for name in [&cert_name, &key_name] {
        if dir.join(name).exists() {
            return Err(exists(dir.join(name)));
        }
    }
    let ca = Ca::load(&dir.join(FILES[0]), &dir.join(FILES[1]))?;
    let issued = ca.worker(worker_id, days)?;
    // The key first: a certificate is never left without its key.
    let key = write_file(dir, &key_name, &issued.key_pem)?;
    let cert = write_file(dir, &cert_name, &issued.cert_pem)?;
    Ok([cert, key])
}

/// Writes the PKI into `dir` (created 0700 if missing): certificates 0644, keys
/// 0600, each written to a temporary file and renamed. Refuses to replace any
/// existing file unless `force`.
pub fn write(dir: &Path, pki: &DevPki, force: bool) -> Result<(), PkiError> {
    make_dir(dir)?;
    if !force {
        for f in FILES {
            let p = dir.join(f);
            if p.exists() {
                return Err(PkiError::Exists(p));
            }
        }
    }
    let contents = [
        &pki.ca.cert_pem,
        &pki.ca.key_pem,
        &pki.gateway.cert_pem,
        &pki.gateway.key_pem,
        &pki.worker.cert_pem,
        &pki.worker.key_pem,
    ];
    for (name, text) in FILES.iter().zip(contents) {
        write_file(dir, name, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_ca_issues_only_with_its_own_key_and_never_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let pki = generate(&Options {
            days: 10,
            ..Default::default()
        })
        .unwrap();
        write(dir.path(), &pki, false).unwrap();
        let ca = Ca::load(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem")).unwrap();
        // Asked for a year, the certificate ends with the CA (11 days).
        let issued = ca.worker("w2", 365).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.validity().not_after.to_datetime(), ca.not_after);
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(cert.issuer(), ca_pem.parse_x509().unwrap().subject());

        // Another CA's key, or a certificate that is no CA, is refused.
        let other = generate(&Options::default()).unwrap();
        std::fs::write(dir.path().join("other-key.pem"), &other.ca.key_pem).unwrap();
        let error = Ca::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("other-key.pem"),
        )
        .err()
        .unwrap();
        assert!(
            error.to_string().contains("not the key of the CA"),
            "{error}"
        );
        let error = Ca::load(
            &dir.path().join("worker.pem"),
            &dir.path().join("worker-key.pem"),
        )
        .err()
        .unwrap();
        assert!(
            error.to_string().contains("not a CA certificate"),
            "{error}"
        );
    }
}
