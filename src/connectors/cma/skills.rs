//! Skills (contract §7): each `session.agent.skills` entry is resolved to a
//! concrete version (E9), its archive downloaded (E10) and unpacked into
//! `skills/<name>/` of the item's workspace before the runner starts.
//!
//! What hands adds over the SDK worker: an archive, its entry count and its
//! unpacked size are bounded ([`SkillLimits`]), so a decompression bomb costs
//! a warning, not the host's disk. The rest is the contract's: a member name
//! with an absolute path or a `..` component aborts the skill; only regular
//! files and directories are extracted (symlinks, hard links, devices and
//! FIFOs are skipped); a single wrapper directory is stripped; files are 0755
//! when the archive gives any execute bit, else 0644, never setuid; the
//! installed root is 0700. A failed skill is logged and skipped; the session
//! proceeds.
//!
//! Staging runs before the item's first tool call, in a directory created for
//! it, so no process of the session can race it. The installed skills live
//! and die with the item's workspace, which is removed at teardown.

use std::collections::BTreeSet;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::http::{Api, Beta, Request};
use super::secret::Secret;
use super::worker::urlencode;

/// Bounds on one skill archive.
#[derive(Debug, Clone, Copy)]
pub struct SkillLimits {
    /// The downloaded archive, compressed.
    pub archive_bytes: u64,
    /// Members, including the skipped ones.
    pub entries: usize,
    /// Everything extracted, summed.
    pub unpacked_bytes: u64,
}

impl Default for SkillLimits {
    fn default() -> Self {
        SkillLimits {
            archive_bytes: 64 << 20,
            entries: 10_000,
            unpacked_bytes: 256 << 20,
        }
    }
}

/// Why one skill was not installed.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    #[error("{0}")]
    Api(#[from] super::http::ApiError),
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SkillError {
    let context = context.into();
    move |source| SkillError::Io { context, source }
}

/// Stages every skill of `session` into `<workspace>/skills`; returns the
/// directories installed. Failures are logged per skill and skipped.
pub async fn stage_all(
    api: &Api,
    cred: &Secret,
    session: &Value,
    workspace: &Path,
    limits: SkillLimits,
) -> Vec<PathBuf> {
    let mut installed = Vec::new();
    let skills = session["agent"]["skills"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for s in skills {
        let (Some(id), Some(version)) = (s["skill_id"].as_str(), s["version"].as_str()) else {
            tracing::warn!(skill = %s, "a skill without skill_id or version; skipped");
            continue;
        };
        match stage_one(api, cred, id, version, workspace, limits).await {
            Ok(dest) => {
                tracing::info!(skill = id, dest = %dest.display(), "skill installed");
                installed.push(dest);
            }
            Err(e) => tracing::warn!(skill = id, error = %e, "skill skipped"),
        }
    }
    installed
}

/// The directory name for a skill: the base name of its `name`, trimmed;
/// `skill_id` when that is empty, `.` or `..`.
pub fn dir_name(name: &str, skill_id: &str) -> String {
    let base = name
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if base.is_empty() || base == "." || base == ".." {
        skill_id.to_string()
    } else {
        base
    }
}

async fn stage_one(
    api: &Api,
    cred: &Secret,
    skill_id: &str,
    version: &str,
    workspace: &Path,
    limits: SkillLimits,
) -> Result<PathBuf, SkillError> {
    let mut req = Request::new(
        http::Method::GET,
        format!(
            "/v1/skills/{}/versions/{}",
            urlencode(skill_id),
            urlencode(version)
        ),
        cred,
    );
    req.beta = Beta::None;
    let v = api
        .send(&req)
        .await?
        .json()
        .map_err(|e| SkillError::Refused(format!("version answer: {e}")))?;
    let (Some(version_id), name) = (v["id"].as_str(), v["name"].as_str().unwrap_or("")) else {
        return Err(SkillError::Refused(format!(
            "version answer without id: {v:.200}"
        )));
    };
    let dirname = dir_name(name, skill_id);
    if !super::beneath::is_clean(Path::new(&dirname)) {
        return Err(SkillError::Refused(format!(
            "{dirname:?} is not a usable directory name"
        )));
    }
    let root = workspace.join("skills");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(io_err("creating skills/"))?;
    let staging = tempfile::Builder::new()
        .prefix(".skill-")
        .tempdir_in(&root)
        .map_err(io_err("creating the staging directory"))?;
    let archive = staging.path().join("archive");

    let mut req = Request::new(
        http::Method::GET,
        format!(
            "/v1/skills/{}/versions/{}/content",
            urlencode(skill_id),
            urlencode(version_id)
        ),
        cred,
    );
    req.beta = Beta::None;
    req.accept = "application/binary";
    let resp = api.open_stream(&req).await?;
    let mut body = resp.into_body();
    let mut file = tokio::fs::File::create(&archive)
        .await
        .map_err(io_err("creating the archive file"))?;
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| SkillError::Refused(format!("download: {e}")))?;
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            if got > limits.archive_bytes {
                return Err(SkillError::Refused(format!(
                    "archive larger than {} bytes",
                    limits.archive_bytes
                )));
            }
            file.write_all(&data)
                .await
                .map_err(io_err("writing the archive"))?;
        }
    }
    file.flush().await.map_err(io_err("writing the archive"))?;
    drop(file);

    let tree = staging.path().join("tree");
    let staged = {
        let (archive, tree) = (archive.clone(), tree.clone());
        tokio::task::spawn_blocking(move || unpack(&archive, &tree, limits))
            .await
            .map_err(|e| SkillError::Refused(format!("unpacking: {e}")))??
    };
    let dest = root.join(&dirname);
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod"))?;
    if std::fs::symlink_metadata(&dest).is_ok() {
        std::fs::rename(&dest, staging.path().join("replaced"))
            .map_err(io_err("moving the old directory aside"))?;
    }
    std::fs::rename(&staged, &dest).map_err(io_err("installing"))?;
    drop(staging); // removes the archive and anything replaced
    Ok(dest)
}

/// A member name screened: `\` read as `/`, `.` and empty components
/// dropped; an absolute name or a `..` component refuses the archive.
pub fn screen(name: &str) -> Result<Vec<String>, SkillError> {
    let name = name.replace('\\', "/");
    if name.starts_with('/') {
        return Err(SkillError::Refused(format!(
            "absolute member name {name:?}"
        )));
    }
    let mut out = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(SkillError::Refused(format!(
                    "member name {name:?} leaves the archive"
                )))
            }
            c if c.contains('\0') => {
                return Err(SkillError::Refused("NUL in a member name".into()))
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

/// Unpacks into `tree` (created); returns the directory to install (the
/// wrapper directory when there is one).
pub fn unpack(archive: &Path, tree: &Path, limits: SkillLimits) -> Result<PathBuf, SkillError> {
    std::fs::create_dir(tree).map_err(io_err("creating the tree"))?;
    let mut f = std::fs::File::open(archive).map_err(io_err("opening the archive"))?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(io_err("reading the archive"))?;
    f.rewind().map_err(io_err("reading the archive"))?;
    let magic = &magic[..n];
    let mut out = Unpacked {
        tree: tree.to_path_buf(),
        limits,
        entries: 0,
        bytes: 0,
        top: BTreeSet::new(),
        nested: false,
    };
    if magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06") {
        unzip(f, &mut out)?;
    } else if magic.starts_with(&[0x1f, 0x8b]) {
        untar(
            flate2::read::MultiGzDecoder::new(BufReader::new(f)),
            &mut out,
        )?;
    } else if magic.starts_with(b"BZh") {
        untar(
            bzip2::read::MultiBzDecoder::new(BufReader::new(f)),
            &mut out,
        )?;
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        // lzma-rs decodes into a writer: bounded by the unpacked-size limit.
        let plain_path = archive.with_extension("tar");
        let plain = std::fs::File::create(&plain_path).map_err(io_err("xz"))?;
        let mut w = Bounded {
            inner: plain,
            left: limits.unpacked_bytes + 1024,
        };
        lzma_rs::xz_decompress(&mut BufReader::new(f), &mut w)
            .map_err(|e| SkillError::Refused(format!("xz: {e}")))?;
        let plain = std::fs::File::open(&plain_path).map_err(io_err("xz"))?;
        untar(BufReader::new(plain), &mut out)?;
    } else {
        untar(BufReader::new(f), &mut out)?;
    }
    if out.top.len() == 1 && out.nested {
        let top = out.top.into_iter().next().unwrap_or_default();
        Ok(tree.join(top))
    } else {
        Ok(tree.to_path_buf())
    }
}

struct Bounded<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(io::Error::other("unpacked size limit"));
        }
        self.left -= buf.len() as u64;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Unpacked {
    tree: PathBuf,
    limits: SkillLimits,
    entries: usize,
    bytes: u64,
    top: BTreeSet<String>,
    nested: bool,
}

impl Unpacked {
    fn count(&mut self) -> Result<(), SkillError> {
        self.entries += 1;
        if self.entries > self.limits.entries {
            return Err(SkillError::Refused(format!(
                "more than {} entries",
                self.limits.entries
            )));
        }
        Ok(())
    }

    fn note(&mut self, parts: &[String]) {
        if let Some(first) = parts.first() {
            self.top.insert(first.clone());
        }
        if parts.len() > 1 {
            self.nested = true;
        }
    }

    fn target(&self, parts: &[String]) -> PathBuf {
        let mut p = self.tree.clone();
        p.extend(parts);
        p
    }

    fn dir(&mut self, parts: &[String]) -> Result<(), SkillError> {
        if parts.is_empty() {
            return Ok(());
        }
        self.note(parts);
        let p = self.target(parts);
        std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", parts.join("/"))))
    }

    fn file(&mut self, parts: &[String], mode: u32, mut data: impl Read) -> Result<(), SkillError> {
        if parts.is_empty() {
            return Ok(());
        }
        self.note(parts);
        let p = self.target(parts);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parts.join("/"))))?;
        }
        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(perm)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(io_err(format!("creating {}", parts.join("/"))))?;
        let left = self.limits.unpacked_bytes - self.bytes;
        let n = io::copy(&mut (&mut data).take(left + 1), &mut f)
            .map_err(io_err(format!("unpacking {}", parts.join("/"))))?;
        if n > left {
            return Err(SkillError::Refused(format!(
                "unpacks to more than {} bytes",
                self.limits.unpacked_bytes
            )));
        }
        self.bytes += n;
        // The umask may have narrowed it; setuid/setgid/sticky never set.
        f.set_permissions(std::fs::Permissions::from_mode(perm))
            .map_err(io_err("chmod"))
    }
}

fn unzip(f: std::fs::File, out: &mut Unpacked) -> Result<(), SkillError> {
    let mut z = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| SkillError::Refused(format!("zip: {e}")))?;
    if z.len() > out.limits.entries {
        return Err(SkillError::Refused(format!(
            "more than {} entries",
            out.limits.entries
        )));
    }
    // Screen every name first: one bad member refuses the whole skill.
    let mut names = Vec::with_capacity(z.len());
    for i in 0..z.len() {
        let e = z
            .by_index_raw(i)
            .map_err(|e| SkillError::Refused(format!("zip: {e}")))?;
        names.push(screen(e.name())?);
    }
    for (i, parts) in names.into_iter().enumerate() {
        out.count()?;
        let e = z
            .by_index(i)
            .map_err(|e| SkillError::Refused(format!("zip: {e}")))?;
        let mode = e.unix_mode().unwrap_or(0);
        let kind = mode & 0o170000;
        if e.is_dir() {
            out.dir(&parts)?;
        } else if kind == 0 || kind == 0o100000 {
            out.file(&parts, mode, e)?;
        } // symlinks, devices, FIFOs and sockets: skipped
    }
    Ok(())
}

fn untar(r: impl Read, out: &mut Unpacked) -> Result<(), SkillError> {
    // One pass: a tar stream cannot be screened ahead, so a bad name found
    // late refuses the skill and the caller discards the staging directory.
    let mut a = tar::Archive::new(r);
    let entries = a
        .entries()
        .map_err(|e| SkillError::Refused(format!("tar: {e}")))?;
    for e in entries {
        let e = e.map_err(|e| SkillError::Refused(format!("tar: {e}")))?;
        out.count()?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let parts = screen(&name)?;
        let mode = e.header().mode().unwrap_or(0);
        match e.header().entry_type() {
            tar::EntryType::Directory => out.dir(&parts)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => out.file(&parts, mode, e)?,
            _ => {} // symlinks, hard links, devices, FIFOs: skipped
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_screened_as_the_contract_says() {
        assert_eq!(screen("pdf/./SKILL.md").unwrap(), ["pdf", "SKILL.md"]);
        assert_eq!(screen("a\\b").unwrap(), ["a", "b"]);
        assert!(screen("/etc/passwd").is_err());
        assert!(screen("\\etc").is_err());
        assert!(screen("a/../../x").is_err());
        assert!(screen("..").is_err());
        assert_eq!(dir_name(" pdf ", "skill_1"), "pdf");
        assert_eq!(dir_name("org/pdf", "skill_1"), "pdf");
        assert_eq!(dir_name("..", "skill_1"), "skill_1");
        assert_eq!(dir_name("  ", "skill_1"), "skill_1");
    }
}
