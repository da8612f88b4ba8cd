//! TLS: the client configuration of public HTTPS APIs (system roots), and
//! the tunnel's, both ends: TLS 1.3 only, the ring provider, PEM files
//! re-read when they change, and the worker identity a client certificate
//! carries.
//!
//! A worker's identity is the `urn:hands:worker:<id>` URI in its certificate's
//! subjectAltName (what `hands pki init` issues), or failing that its subject
//! common name; either way it must be a valid hands id.
//!
//! [`Reloading`] stats the three files on every new connection and rebuilds the
//! rustls configuration when one changed, so rotated certificates take effect
//! for new connections without a restart; established connections keep theirs.
//! A rotation that does not parse is logged and the last good configuration is
//! kept, so a half-written file never takes the tunnel down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The system's root certificates (a warning when there are none).
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        tracing::warn!("no system root certificates found; https:// connections will fail");
    }
    roots
}

/// ALPN for the tunnel: HTTP/2 only.
pub const ALPN_H2: &[u8] = b"h2";

/// The URI prefix of a worker identity in a certificate.
pub const WORKER_URI_PREFIX: &str = "urn:hands:worker:";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    // The cause is part of the message and not also a `source()`, so that a
    // printer of error chains shows it once.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Config(e)
    }
}

/// The three files one end of the tunnel needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) the peer must chain to.
    pub ca: PathBuf,
    /// This end's certificate chain.
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        store
            .add(cert)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration for HTTPS (HTTP/1.1): TLS 1.2 and 1.3, trusting only
/// the certificates in `ca` (else the system's roots, as for public APIs),
/// presenting `identity` (certificate chain, key) when given.
pub fn https_client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => roots(ca)?,
        None => system_roots(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The worker's end: trusts only `files.ca`, presents `files.cert`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = roots(&files.ca)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The gateway's end: requires a client certificate chaining to `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = Arc::new(roots(&files.ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// An HTTPS listener's end (HTTP/1.1 over TLS 1.3, which curl, Python and
/// every MCP SDK speak): presents `cert`, and requires a client certificate
/// chaining to `client_ca` when one is given.
pub fn https_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server name to verify the gateway's certificate against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// The worker identity in a (verified) client certificate.
pub fn worker_identity(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Certificate(format!("unparsable certificate: {e}")))?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(WORKER_URI_PREFIX) {
                    return checked_id(id);
                }
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str());
    match cn {
        Some(Ok(id)) => checked_id(id),
        Some(Err(_)) => Err(TlsError::Certificate(
            "the subject common name is not a string".into(),
        )),
        None => Err(TlsError::Certificate(format!(
            "no worker identity: neither a {WORKER_URI_PREFIX}<id> URI nor a common name"
        ))),
    }
}

fn checked_id(id: &str) -> Result<String, TlsError> {
    if crate::session::registry::valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(TlsError::Certificate(format!(
            "worker identity {id:?} is not 1 to 128 characters of [A-Za-z0-9._:-]"
        )))
    }
}

/// The identity in the first certificate of a PEM file (a worker checks its
/// configured `worker_id` against its own certificate at startup).
pub fn worker_identity_of_file(path: &Path) -> Result<String, TlsError> {
    let certs = load_certs(path)?;
    worker_identity(&certs[0])
}

type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// A rustls configuration rebuilt when its files change.
pub struct Reloading<T> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<Arc<T>, TlsError>,
    current: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    /// Builds the first configuration; errors here are fatal (bad config).
    pub fn new(
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<Arc<T>, TlsError>,
    ) -> Result<Self, TlsError> {
        let s = stamp(&files);
        let config = build(&files)?;
        Ok(Reloading {
            files,
            build,
            current: Mutex::new((s, config)),
        })
    }

    /// The configuration for a new connection.
    pub fn get(&self) -> Arc<T> {
        let s = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != s {
            match (self.build)(&self.files) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                    *current = (s, config);
                }
                Err(e) => {
                    // Keep serving with the last good configuration; the
                    // stamp is left alone so the next connection retries.
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                }
            }
        }
        current.1.clone()
    }
}

pub type ClientTls = Reloading<rustls::ClientConfig>;
pub type ServerTls = Reloading<rustls::ServerConfig>;

impl ClientTls {
    pub fn client(files: TlsFiles) -> Result<Self, TlsError> {
        Reloading::new(files, client_config)
    }
}

impl ServerTls {
    pub fn server(files: TlsFiles) -> Result<Self, TlsError> {
        Reloading::new(files, server_config)
    }
}
