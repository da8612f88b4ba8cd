//! A development PKI: a CA and the certificates of a gateway (TLS server) and a
//! worker (TLS client), for `hands pki init`, `hands demo` and the tests. Keys are
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
    #[error("generating {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("invalid name {0:?}: neither an IP address nor a DNS name")]
    Name(String),
    #[error("{0} exists; pass --force to replace the development PKI")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
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
    move |source| PkiError::Generate { what, source }
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
/// from the same CA).
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
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
            params,
            key,
            issued,
        })
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
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = gw
            .signed_by(&key, &issuer)
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
        let uri = format!("{}{worker_id}", crate::tls::WORKER_URI_PREFIX);
        wk.subject_alt_names = vec![SanType::URI(
            uri.clone().try_into().map_err(|_| PkiError::Name(uri))?,
        )];
        wk.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        wk.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = wk
            .signed_by(&key, &issuer)
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

/// Writes the PKI into `dir` (created 0700 if missing): certificates 0644, keys
/// 0600, each written to a temporary file and renamed. Refuses to replace any
/// existing file unless `force`.
pub fn write(dir: &Path, pki: &DevPki, force: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Write { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(werr(dir))?;
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
            .map_err(werr(&tmp))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(werr(&tmp))?;
        f.sync_all().map_err(werr(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(werr(&path))?;
    }
    Ok(())
}
