//! The connector's credentials: the environment key (read once from a file, a
//! systemd credential or an environment variable — never from argv) and each
//! work item's sessions token (from its work secret). A [`Secret`] never
//! prints its value and overwrites it when dropped; sandboxed sessions never
//! receive either (their helper starts with an empty environment).

use std::path::{Path, PathBuf};

use base64::Engine;

/// A credential. `Debug` and `Display` print `<redacted>`.
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for an `Authorization` header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret(self.0.clone())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        crate::util::constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Overwrite the value before the allocation is freed; black_box keeps
        // the stores from being optimised away (best effort without unsafe).
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

/// Where the environment key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key (surrounding whitespace ignored).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`
    /// (`LoadCredential=` / `LoadCredentialEncrypted=`).
    Credential(String),
    /// An environment variable of the worker.
    Env(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the environment key from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the environment key in {0} is empty")]
    Empty(String),
    #[error("systemd credential {0:?}: $CREDENTIALS_DIRECTORY is not set (is the worker started by systemd with LoadCredential=?)")]
    NoCredentialsDirectory(String),
    #[error("environment variable {0} is not set")]
    NoEnv(String),
}

fn read_file(path: &Path) -> Result<Secret, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(SecretError::Empty(path.display().to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the environment key file is readable by group or others; 0600 is expected");
            }
        }
    }
    Ok(Secret(value))
}

impl KeySource {
    pub fn load(&self) -> Result<Secret, SecretError> {
        match self {
            KeySource::File(p) => read_file(p),
            KeySource::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
                read_file(&Path::new(&dir).join(name))
            }
            KeySource::Env(var) => {
                let v = std::env::var(var).map_err(|_| SecretError::NoEnv(var.clone()))?;
                let v = v.trim().to_string();
                if v.is_empty() {
                    return Err(SecretError::Empty(format!("${var}")));
                }
                Ok(Secret(v))
            }
        }
    }
}

/// The sessions token inside a work secret (contract §2.2): URL-safe base64,
/// padding optional, of a JSON object with a non-empty `sessions_token`
/// string. Anything else yields None (the caller falls back to the
/// environment key and warns).
pub fn sessions_token(work_secret: &str) -> Option<Secret> {
    let s = work_secret.trim();
    if s.is_empty() {
        return None;
    }
    let mut padded = s.to_string();
    while !padded.len().is_multiple_of(4) {
        padded.push('=');
    }
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(padded.as_bytes())
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let token = v.as_object()?.get("sessions_token")?.as_str()?;
    (!token.is_empty()).then(|| Secret(token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(json: &str, pad: bool) -> String {
        let e = base64::engine::general_purpose::URL_SAFE.encode(json);
        if pad {
            e
        } else {
            e.trim_end_matches('=').to_string()
        }
    }

    #[test]
    fn sessions_tokens_decode_as_the_contract_says() {
        let t = sessions_token(&encode(r#"{"sessions_token":"sk-tok","other":1}"#, false)).unwrap();
        assert_eq!(t.expose(), "sk-tok");
        assert!(sessions_token(&encode(r#"{"sessions_token":"a?b>"}"#, true)).is_some());
        for bad in [
            String::new(),
            "not base64 !!".into(),
            encode("[1,2]", true),
            encode(r#"{"sessions_token":""}"#, true),
            encode(r#"{"sessions_token":5}"#, true),
            encode("not json", true),
        ] {
            assert!(sessions_token(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_never_print_and_keys_load_from_each_source() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "  env-key-123\n").unwrap();
        assert_eq!(
            KeySource::File(f.clone()).load().unwrap().expose(),
            "env-key-123"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            KeySource::File(f).load(),
            Err(SecretError::Empty(_))
        ));
        let e = KeySource::Env("HANDS_TEST_SURELY_UNSET_VAR".into())
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("HANDS_TEST_SURELY_UNSET_VAR"));
    }
}
