//! Memory stores (contract §8): each `memory_store` resource of the session
//! is downloaded into a folder the agent sees at its `mount_path`, synced
//! both ways while the session runs (three-way: local, remote, baseline), and
//! flushed at the end.
//!
//! Where hands departs from the SDK worker, deliberately:
//!
//! - **The folder is always inside the item's workspace.** The SDK creates
//!   `mount_path` verbatim on the host, so the server chooses where the worker
//!   writes. hands keeps the folder at `<workspace>/.memory/<n>` (or at
//!   `mount_path` itself when that is under `/workspace`) and makes
//!   `mount_path` a symlink to it *inside the sandbox only*. The agent sees
//!   the path the server named; the host sees nothing outside the workspace.
//! - **Host-side file access is anchored** ([`super::beneath`]): the agent can
//!   swap any directory of the workspace for a symlink, and the worker is root.
//! - **Read-only stores are read-only to the kernel**: a read-only bind mount
//!   inside the sandbox, so bash cannot write there either (the SDK only
//!   refuses its write and edit tools).
//! - A folder holds at most [`MAX_FILES`] files of at most [`MAX_FILE_BYTES`]
//!   each; anything larger stays local and unsynced, with a warning, and is
//!   never taken for deleted.
//! - After the lease is lost nothing is sent (the new holder's copy wins).
//!
//! What a sync costs the worker is bounded, whatever the agent puts in the
//! folder (it can make gigabytes of logical content out of a few kilobytes of
//! disk with sparse files and hard links):
//!
//! - **Files are streamed, one at a time.** A sync lists the folder's files
//!   with their stat only, hashes each one through a fixed buffer, and reads a
//!   file's content again only to upload it; uploads go one at a time. What it
//!   holds at once is one file's content and its request body, so at most
//!   [`MAX_FILE_BYTES`] plus its JSON encoding (up to six bytes per byte for
//!   control characters).
//! - **Reads and uploads have a budget per sync**, counted in logical bytes
//!   (what is read and sent: a sparse file counts its full size, not its
//!   blocks on disk): [`SYNC_READ_BYTES`] hashed, [`SYNC_SEND_BYTES`]
//!   uploaded. A file past the read budget is held (neither sent, pulled over
//!   nor deleted) and hashed by a later sync; an upload past the send budget
//!   waits for the next sync; each sync logs (target `hands::audit`) what it
//!   deferred. The final sync and the flush have a budget each, and report
//!   what they could not send.
//! - **Hashes are cached per inode** (size, mtime and ctime; files changed in
//!   the last 2 s are hashed again, contract §8.5), so an unchanged file is
//!   read once per session, and a file with several hard links once per sync.
//!   Each link is still its own memory, as the contract has it (a memory is a
//!   path): uploading it costs its full size each time.
//! - **The download goes page by page** (20 memories): a page is written out
//!   before the next is fetched.
//! - **The server's 413 is remembered by content**: other paths with exactly
//!   that content are refused without being sent (the 400 links of one file
//!   cost one upload, not 400).
//! - **Syncs are cancellable.** Hashing runs on a blocking thread that stops
//!   within one buffer when the sync is dropped (item teardown, worker
//!   shutdown); the heartbeat and the tool runner never wait on it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::beneath::{is_clean, Beneath, FileMeta, Kind};
use super::http::{Api, ApiError, Beta, Request};
use super::secret::Secret;
use super::worker::urlencode;
use crate::workspace::ExtraDir;

pub const MARKER: &str = ".anthropic-memory-store";
pub const MAX_FILES: usize = 10_000;
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Bytes of file content one sync may read to hash them, counted at their
/// logical size. Hashing runs on the worker, outside the item's cgroup: at
/// about 1 GB/s of SHA-256 this is a quarter of a second of one core per sync.
/// Unchanged files are never read again (the hash cache), so a folder larger
/// than this is taken in over a few syncs.
pub const SYNC_READ_BYTES: u64 = 256 << 20;
/// Content bytes one sync (or the final flush) may upload, at logical size. At
/// the default 15 s interval that is about 4 MiB/s per item towards the
/// control plane; changes past it go with the next syncs. The first upload of
/// a sync is always allowed, so no file is too large for the budget.
pub const SYNC_SEND_BYTES: u64 = 64 << 20;
/// The streaming hash's buffer.
const HASH_CHUNK: usize = 64 << 10;
/// A file modified this recently is hashed again rather than trusted to the
/// cache (timestamps can be this coarse; contract §8.5).
const CACHE_SETTLE_NS: i128 = 2_000_000_000;
/// A local deletion is sent only after the file was seen missing this long.
const DELETE_AFTER: Duration = Duration::from_secs(30);
/// Bound of the final sync and of the final flush, each.
pub const FINAL_BOUND: Duration = Duration::from_secs(30);

/// `memory_sync_deletions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deletions {
    Enabled,
    LogOnly,
    Disabled,
}

/// Where one store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePlan {
    pub id: String,
    pub read_only: bool,
    /// The folder, relative to the workspace.
    pub rel: PathBuf,
    /// The path the agent sees.
    pub shown_at: PathBuf,
    /// A sandbox symlink to the folder, when `shown_at` is outside `/workspace`.
    pub link_at: Option<PathBuf>,
}

impl StorePlan {
    pub fn extra_dir(&self) -> ExtraDir {
        ExtraDir {
            rel: self.rel.clone(),
            link_at: self.link_at.clone(),
            read_only: self.read_only,
        }
    }
}

/// The stores of a session and where each goes; an error fails the item.
pub fn plan(session: &Value) -> Result<Vec<StorePlan>, String> {
    let mut out: Vec<StorePlan> = Vec::new();
    let resources = session["resources"].as_array().cloned().unwrap_or_default();
    for r in resources.iter().filter(|r| r["type"] == "memory_store") {
        let id = r["memory_store_id"]
            .as_str()
            .ok_or("a memory_store resource without memory_store_id")?
            .to_string();
        let read_only = r["access"] == "read_only";
        let plan = match r["mount_path"].as_str().filter(|m| !m.is_empty()) {
            Some(m) => {
                let p = Path::new(m);
                if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir)
                {
                    return Err(format!(
                        "memory store mount_path is not a clean absolute path: {m:?}"
                    ));
                }
                let shown: PathBuf = p.components().collect();
                match shown.strip_prefix(crate::workspace::MOUNT_POINT) {
                    Ok(rest) if !rest.as_os_str().is_empty() => StorePlan {
                        id,
                        read_only,
                        rel: rest.to_path_buf(),
                        shown_at: shown.clone(),
                        link_at: None,
                    },
                    _ => StorePlan {
                        rel: PathBuf::from(format!(".memory/{}", out.len())),
                        id,
                        read_only,
                        shown_at: shown.clone(),
                        link_at: Some(shown),
                    },
                }
            }
            None => {
                let name = r["name"]
                    .as_str()
                    .filter(|n| is_clean(Path::new(n)) && !n.contains('/'));
                let name = name.unwrap_or(&id).to_string();
                if !is_clean(Path::new(&name)) || name.contains('/') {
                    return Err(format!("memory store {id:?}: no usable folder name"));
                }
                StorePlan {
                    rel: PathBuf::from("memory").join(&name),
                    shown_at: Path::new(crate::workspace::MOUNT_POINT)
                        .join("memory")
                        .join(&name),
                    id,
                    read_only,
                    link_at: None,
                }
            }
        };
        // Under /workspace, the folder must not be where skills or the
        // folders of other stores go.
        if plan.link_at.is_none()
            && (plan.rel.starts_with("skills") || plan.rel.starts_with(".memory"))
        {
            return Err(format!(
                "memory store {:?} cannot be mounted at {}: reserved for skills and memory folders",
                plan.id,
                plan.shown_at.display()
            ));
        }
        plan.extra_dir().validate().map_err(|e| {
            format!(
                "memory store {:?} cannot be mounted at {}: {e}",
                plan.id,
                plan.shown_at.display()
            )
        })?;
        for o in &out {
            if o.shown_at.starts_with(&plan.shown_at)
                || plan.shown_at.starts_with(&o.shown_at)
                || o.rel.starts_with(&plan.rel)
                || plan.rel.starts_with(&o.rel)
            {
                return Err(format!(
                    "something already exists at the memory store's path: {} (memory store {:?}); it must not exist when the session starts",
                    plan.shown_at.display(),
                    plan.id
                ));
            }
        }
        out.push(plan);
    }
    Ok(out)
}

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A memory path from the server (`/a/b.md`) as a path under the folder.
fn local_rel(path: &str) -> Option<PathBuf> {
    let rel = path.strip_prefix('/')?;
    let ok = rel
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
    (ok && rel != MARKER).then(|| PathBuf::from(rel))
}

#[derive(Debug, Clone)]
struct Remote {
    id: String,
    sha: String,
}

/// A local file as the sync sees it: its hash, never its content.
#[derive(Debug, Clone)]
struct Local {
    sha: String,
    /// Logical size: what uploading it reads and sends.
    size: u64,
    /// Not UTF-8: never uploaded (the server takes text only).
    utf8: bool,
}

/// The local side of one store in one sync.
#[derive(Debug, Default)]
struct Scan {
    files: BTreeMap<String, Local>,
    /// Files present but not hashed this time (over the read budget, too
    /// large, changing while read): left alone by this sync.
    held: BTreeSet<String>,
    /// Held for the read budget: (files, bytes).
    deferred: (usize, u64),
}

/// Hashes by inode: `(dev, ino)` → what the file was when hashed.
#[derive(Debug, Default)]
struct HashCache(HashMap<(u64, u64), Cached>);

#[derive(Debug, Clone)]
struct Cached {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha: String,
    utf8: bool,
}

/// The length of `s` as a JSON string, as serde_json escapes it.
fn json_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// E13's body. Keys in the order the SDK sends them (sorted).
#[derive(serde::Serialize)]
struct CreateBody<'a> {
    content: &'a str,
    path: &'a str,
}

/// E14's body.
#[derive(serde::Serialize)]
struct UpdateBody<'a> {
    content: &'a str,
    precondition: Precondition<'a>,
}

#[derive(serde::Serialize)]
struct Precondition<'a> {
    content_sha256: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The part of an E13/E14 answer the sync keeps.
#[derive(serde::Deserialize)]
struct Created {
    id: Option<String>,
}

/// What one pass (a sync of every store, or the flush) may still read and send.
#[derive(Debug, Clone, Copy, Default)]
struct Budget {
    read: u64,
    sent: u64,
}

impl Budget {
    /// Charges an upload of `size` bytes, unless the pass already sent some and
    /// this one would pass [`SYNC_SEND_BYTES`].
    fn send(&mut self, size: u64) -> bool {
        if self.sent > 0 && self.sent.saturating_add(size) > SYNC_SEND_BYTES {
            return false;
        }
        self.sent = self.sent.saturating_add(size);
        true
    }
}

/// Sets its flag when dropped: a blocking task watching the flag stops when the
/// future that started it is cancelled.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Incremental UTF-8 validation across read buffers.
#[derive(Default)]
struct Utf8Check {
    pending: Vec<u8>,
    bad: bool,
}

impl Utf8Check {
    fn feed(&mut self, data: &[u8]) {
        if self.bad {
            return;
        }
        let joined;
        let buf = if self.pending.is_empty() {
            data
        } else {
            joined = [std::mem::take(&mut self.pending).as_slice(), data].concat();
            &joined[..]
        };
        if let Err(e) = std::str::from_utf8(buf) {
            match e.error_len() {
                // A sequence cut by the buffer's end: completed by the next one.
                None => self.pending = buf[e.valid_up_to()..].to_vec(),
                Some(_) => self.bad = true,
            }
        }
    }

    fn finish(self) -> bool {
        !self.bad && self.pending.is_empty()
    }
}

/// Why a file was not hashed.
enum HashFailure {
    /// It changed while it was read (or since it was listed): held this time.
    Changed,
    Cancelled,
    Io(std::io::Error),
}

/// Hashes one file through a fixed buffer; checks it is still the file that was
/// listed and that it yields exactly its listed size.
fn hash_file(
    fs: &Beneath,
    rel: &Path,
    want: &FileMeta,
    cancel: &AtomicBool,
) -> Result<(String, bool), HashFailure> {
    let (mut file, st) = fs.open_file(rel).map_err(HashFailure::Io)?;
    if FileMeta::of(&st) != *want {
        return Err(HashFailure::Changed);
    }
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut utf8 = Utf8Check::default();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut total = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(HashFailure::Cancelled);
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashFailure::Io(e)),
        };
        total += n as u64;
        if total > want.size {
            return Err(HashFailure::Changed);
        }
        digest.update(&buf[..n]);
        utf8.feed(&buf[..n]);
    }
    if total != want.size {
        return Err(HashFailure::Changed);
    }
    Ok((hex(digest.finish().as_ref()), utf8.finish()))
}

/// The local side of one store: its files listed with their stat, each hashed
/// (or taken from the cache) within the pass's read budget.
fn scan_store(
    fs: &Beneath,
    store: &str,
    folder: &Path,
    cache: &mut HashCache,
    budget: &mut Budget,
    cancel: &AtomicBool,
) -> Result<Scan, String> {
    let entries = fs.entries(folder, MAX_FILES).map_err(|e| e.to_string())?;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let mut scan = Scan::default();
    let mut seen = HashSet::new();
    // Inodes hashed by this scan: another link to one is not read again, however
    // recently it changed.
    let mut this_scan: HashMap<(u64, u64), Local> = HashMap::new();
    for (rel, meta) in entries {
        if rel == MARKER {
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        let path = format!("/{rel}");
        if meta.size > MAX_FILE_BYTES {
            tracing::warn!(
                store,
                path,
                size = meta.size,
                on_disk = meta.on_disk,
                "larger than {MAX_FILE_BYTES} bytes: kept local, not synced"
            );
            scan.held.insert(path);
            continue;
        }
        let key = (meta.dev, meta.ino);
        seen.insert(key);
        if let Some(l) = this_scan.get(&key).filter(|l| l.size == meta.size) {
            scan.files.insert(path, l.clone());
            continue;
        }
        if let Some(c) = cache.0.get(&key).filter(|c| {
            c.size == meta.size
                && c.mtime_ns == meta.mtime_ns
                && c.ctime_ns == meta.ctime_ns
                && now_ns - meta.mtime_ns >= CACHE_SETTLE_NS
        }) {
            scan.files.insert(
                path,
                Local {
                    sha: c.sha.clone(),
                    size: c.size,
                    utf8: c.utf8,
                },
            );
            continue;
        }
        // Counted at the logical size: a sparse file reads as its full size.
        if budget.read > 0 && budget.read.saturating_add(meta.size) > SYNC_READ_BYTES {
            scan.deferred.0 += 1;
            scan.deferred.1 += meta.size;
            scan.held.insert(path);
            continue;
        }
        budget.read = budget.read.saturating_add(meta.size);
        match hash_file(fs, &folder.join(&rel), &meta, cancel) {
            Ok((sha, utf8)) => {
                cache.0.insert(
                    key,
                    Cached {
                        size: meta.size,
                        mtime_ns: meta.mtime_ns,
                        ctime_ns: meta.ctime_ns,
                        sha: sha.clone(),
                        utf8,
                    },
                );
                let local = Local {
                    sha,
                    size: meta.size,
                    utf8,
                };
                this_scan.insert(key, local.clone());
                scan.files.insert(path, local);
            }
            Err(HashFailure::Cancelled) => return Err("cancelled".into()),
            Err(HashFailure::Changed) => {
                scan.held.insert(path);
            }
            Err(HashFailure::Io(e)) => {
                tracing::warn!(store, path, error = %e, "a local file could not be read; not synced this time");
                scan.held.insert(path);
            }
        }
    }
    // Forget inodes that are gone; this also bounds the cache by MAX_FILES.
    cache.0.retain(|k, _| seen.contains(k));
    Ok(scan)
}

/// Reads a file to upload it: exactly the content that was hashed (else `None`:
/// it changed since, and the next sync sees it again).
fn read_for_upload(fs: &Beneath, rel: &Path, l: &Local) -> Option<String> {
    let (file, _) = fs.open_file(rel).ok()?;
    let mut data = Vec::with_capacity(usize::try_from(l.size).ok()?);
    file.take(l.size.saturating_add(1))
        .read_to_end(&mut data)
        .ok()?;
    if data.len() as u64 != l.size || sha256_hex(&data) != l.sha {
        return None;
    }
    String::from_utf8(data).ok()
}

/// One store's sync state.
struct Store {
    plan: StorePlan,
    baseline: BTreeMap<String, String>,
    ids: BTreeMap<String, String>,
    /// Content the server refused (400/413) or that cannot be sent: not
    /// retried until the file changes.
    refused: BTreeMap<String, String>,
    /// Content (by sha) the server answered 413 for: any path with it is
    /// refused without being sent.
    too_large: BTreeSet<String>,
    /// Uploads whose answer was lost: settled by the next listing.
    sent: BTreeMap<String, String>,
    missing_since: BTreeMap<String, Instant>,
}

/// The memory stores of one item.
pub struct Memory {
    api: Api,
    cred: Secret,
    fs: Arc<Beneath>,
    /// Moved into the blocking scan and back; lost (and rebuilt) when a scan
    /// is cancelled.
    cache: HashCache,
    stores: Vec<Store>,
    deletions: Deletions,
    pub interval: Duration,
    last: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory store {store}: {message}")]
    Store { store: String, message: String },
}

impl Memory {
    /// Downloads every store into its folder (already created by the sandbox
    /// session); any failure fails the item.
    pub async fn download(
        api: Api,
        cred: Secret,
        workspace: &Path,
        plans: Vec<StorePlan>,
        interval: Duration,
        deletions: Deletions,
    ) -> Result<Memory, MemoryError> {
        let fs = Beneath::open(workspace).map_err(|e| MemoryError::Store {
            store: "-".into(),
            message: format!("opening the workspace: {e}"),
        })?;
        let mut m = Memory {
            api,
            cred,
            fs: Arc::new(fs),
            cache: HashCache::default(),
            stores: plans
                .into_iter()
                .map(|plan| Store {
                    plan,
                    baseline: BTreeMap::new(),
                    ids: BTreeMap::new(),
                    refused: BTreeMap::new(),
                    too_large: BTreeSet::new(),
                    sent: BTreeMap::new(),
                    missing_since: BTreeMap::new(),
                })
                .collect(),
            deletions,
            interval,
            last: Instant::now(),
        };
        for i in 0..m.stores.len() {
            // The session's workspace is kept between its items, and every
            // item removes its folders at the end: files here now are not ours.
            let occupied = match m.fs.entries(&m.stores[i].plan.rel, MAX_FILES) {
                Ok(files) => !files.is_empty(),
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            };
            if occupied {
                return Err(MemoryError::Store {
                    store: m.stores[i].plan.id.clone(),
                    message: format!(
                        "something already exists at the memory store's path: {}; it must not exist when the session starts",
                        m.stores[i].plan.shown_at.display()
                    ),
                });
            }
            m.download_store(i)
                .await
                .map_err(|message| MemoryError::Store {
                    store: m.stores[i].plan.id.clone(),
                    message,
                })?;
        }
        m.last = Instant::now();
        Ok(m)
    }

    fn marker_text(id: &str) -> String {
        format!("version 1\n{id}")
    }

    fn marker_ok(&self, i: usize) -> bool {
        let s = &self.stores[i];
        let want = sha256_hex(Self::marker_text(&s.plan.id).as_bytes());
        self.fs
            .read(&s.plan.rel.join(MARKER), 4096)
            .is_ok_and(|got| sha256_hex(&got) == want)
    }

    async fn download_store(&mut self, i: usize) -> Result<(), String> {
        let (rel, id) = (
            self.stores[i].plan.rel.clone(),
            self.stores[i].plan.id.clone(),
        );
        self.fs
            .mkdir_all(&rel)
            .map_err(|e| format!("cannot create the memory store's folder: {e}"))?;
        self.fs
            .write_atomic(&rel.join(MARKER), Self::marker_text(&id).as_bytes())
            .map_err(|e| format!("writing the marker: {e}"))?;
        self.stores[i].baseline.clear();
        self.stores[i].ids.clear();
        // Page by page: a page's memories are written before the next is
        // fetched, so a large store is never held in memory whole.
        let mut page: Option<String> = None;
        loop {
            let (memories, next) = self
                .list_page(&id, "full", 20, page.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            for m in memories {
                let (Some(path), Some(mid), Some(content)) =
                    (m["path"].as_str(), m["id"].as_str(), m["content"].as_str())
                else {
                    continue;
                };
                let Some(lr) = local_rel(path) else {
                    tracing::warn!(store = %id, path, "a memory path hands cannot write; skipped");
                    continue;
                };
                if let Err(e) = self.fs.write_atomic(&rel.join(&lr), content.as_bytes()) {
                    tracing::warn!(store = %id, path, error = %e, "writing a memory failed; skipped");
                    continue;
                }
                let s = &mut self.stores[i];
                s.baseline
                    .insert(path.to_string(), sha256_hex(content.as_bytes()));
                s.ids.insert(path.to_string(), mid.to_string());
            }
            match next {
                Some(next) => page = Some(next),
                None => return Ok(()),
            }
        }
    }

    fn req(&self, method: http::Method, path: String) -> Request<'_> {
        let mut r = Request::new(method, path, &self.cred);
        r.beta = Beta::Memory;
        r
    }

    /// E11, one page: its memory entries and the next page's cursor.
    async fn list_page(
        &self,
        store: &str,
        view: &str,
        limit: u32,
        page: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>), ApiError> {
        let mut path = format!(
            "/v1/memory_stores/{}/memories?limit={limit}&view={view}",
            urlencode(store)
        );
        if let Some(p) = page {
            path.push_str(&format!("&page={}", urlencode(p)));
        }
        let mut v = self
            .api
            .send(&self.req(http::Method::GET, path))
            .await?
            .json()
            .unwrap_or(Value::Null);
        let next = v["next_page"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        let memories = match v["data"].take() {
            Value::Array(data) => data.into_iter().filter(|m| m["type"] == "memory").collect(),
            _ => Vec::new(),
        };
        Ok((memories, next))
    }

    /// E11, every page; memory entries only.
    async fn list(&self, store: &str, view: &str, limit: u32) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let (memories, next) = self.list_page(store, view, limit, page.as_deref()).await?;
            out.extend(memories);
            match next {
                Some(next) => page = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Scans store `i` on a blocking thread, within `budget`. Dropping the
    /// future stops the scan within one buffer.
    async fn local(&mut self, i: usize, budget: &mut Budget) -> Result<Scan, String> {
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let fs = self.fs.clone();
        let store = self.stores[i].plan.id.clone();
        let folder = self.stores[i].plan.rel.clone();
        let mut cache = std::mem::take(&mut self.cache);
        let mut pass = *budget;
        let (cache, pass, scan) = tokio::task::spawn_blocking(move || {
            let scan = scan_store(&fs, &store, &folder, &mut cache, &mut pass, &cancel);
            (cache, pass, scan)
        })
        .await
        .map_err(|e| format!("the scan failed: {e}"))?;
        self.cache = cache;
        *budget = pass;
        let scan = scan?;
        if scan.deferred.0 > 0 {
            tracing::warn!(target: "hands::audit", store = %self.stores[i].plan.id, files = scan.deferred.0, bytes = scan.deferred.1, budget = SYNC_READ_BYTES, "memory sync: files past the read budget are held until a later sync");
        }
        Ok(scan)
    }

    /// Uploads the planned files of store `i` one at a time within `budget`;
    /// reports what waits for a later pass.
    async fn upload_all(
        &mut self,
        i: usize,
        uploads: Vec<(String, Local, Option<Remote>)>,
        budget: &mut Budget,
    ) {
        let (mut deferred, mut deferred_bytes, mut known_too_large) = (0usize, 0u64, 0usize);
        for (p, l, r) in uploads {
            let s = &mut self.stores[i];
            if l.utf8 && s.too_large.contains(&l.sha) {
                s.refused.insert(p, l.sha.clone());
                known_too_large += 1;
                continue;
            }
            if l.utf8 && !budget.send(l.size) {
                deferred += 1;
                deferred_bytes += l.size;
                continue;
            }
            self.upload(i, &p, &l, r.as_ref()).await;
        }
        let id = &self.stores[i].plan.id;
        if known_too_large > 0 {
            tracing::warn!(store = %id, files = known_too_large, "content the server refused as too large (413) elsewhere: not sent");
        }
        if deferred > 0 {
            tracing::warn!(target: "hands::audit", store = %id, files = deferred, bytes = deferred_bytes, budget = SYNC_SEND_BYTES, "memory sync: uploads past the send budget wait for the next sync");
        }
    }

    /// Syncs every store when the interval has passed (after a call, §8.4).
    pub async fn sync_if_due(&mut self) {
        if self.last.elapsed() >= self.interval {
            self.sync_all(false).await;
        }
    }

    pub async fn sync_all(&mut self, final_sync: bool) {
        let mut budget = Budget::default();
        for i in 0..self.stores.len() {
            self.sync(i, final_sync, &mut budget).await;
        }
        self.last = Instant::now();
    }

    /// The end of a session that ended cleanly: one final sync (deletion
    /// window waived), then the flush, each bounded by 30 s.
    pub async fn finish(&mut self) {
        if tokio::time::timeout(FINAL_BOUND, self.sync_all(true))
            .await
            .is_err()
        {
            tracing::warn!("the final memory sync did not finish within 30 s");
        }
        self.flush().await;
    }

    /// Push-only pass, bounded by 30 s: uploads of new and changed files.
    pub async fn flush(&mut self) {
        let run = async {
            let mut budget = Budget::default();
            for i in 0..self.stores.len() {
                self.flush_store(i, &mut budget).await;
            }
        };
        if tokio::time::timeout(FINAL_BOUND, run).await.is_err() {
            tracing::warn!("the final memory flush did not finish within 30 s");
        }
    }

    /// At the end of the item (contract §8.6 "dispose"): deletes each store's
    /// folder, since the session's workspace is kept for its next item, which
    /// downloads the store again. A folder whose marker is wrong while files
    /// remain is kept, with a warning: it is not ours to delete.
    pub fn dispose(&self) {
        for (i, s) in self.stores.iter().enumerate() {
            let files = self
                .fs
                .entries(&s.plan.rel, MAX_FILES + 1)
                .unwrap_or_default();
            let ours = self.marker_ok(i) || files.is_empty();
            if !ours {
                tracing::warn!(store = %s.plan.id, "memory folder kept: its marker is not this store's and files remain");
                continue;
            }
            if let Err(e) = self.fs.remove_tree(&s.plan.rel) {
                tracing::warn!(store = %s.plan.id, error = %e, "removing the memory folder");
            }
        }
    }

    async fn remote(&self, i: usize) -> Result<BTreeMap<String, Remote>, ApiError> {
        let list = self.list(&self.stores[i].plan.id, "basic", 100).await?;
        Ok(list
            .into_iter()
            .filter_map(|m| {
                Some((
                    m["path"].as_str()?.to_string(),
                    Remote {
                        id: m["id"].as_str()?.to_string(),
                        sha: m["content_sha256"].as_str().unwrap_or("").to_string(),
                    },
                ))
            })
            .collect())
    }

    async fn flush_store(&mut self, i: usize, budget: &mut Budget) {
        if self.stores[i].plan.read_only || !self.marker_ok(i) {
            return;
        }
        let Ok(scan) = self.local(i, budget).await else {
            return;
        };
        let Ok(remote) = self.remote(i).await else {
            return;
        };
        let s = &self.stores[i];
        let uploads = scan
            .files
            .into_iter()
            .filter(|(path, l)| {
                !(remote.get(path).is_some_and(|r| r.sha == l.sha)
                    || s.baseline.get(path) == Some(&l.sha)
                    || s.refused.get(path) == Some(&l.sha))
            })
            .map(|(path, l)| {
                let r = remote.get(&path).cloned();
                (path, l, r)
            })
            .collect();
        self.upload_all(i, uploads, budget).await;
    }

    async fn sync(&mut self, i: usize, final_sync: bool, budget: &mut Budget) {
        let id = self.stores[i].plan.id.clone();
        let rel = self.stores[i].plan.rel.clone();
        let scan = match self.local(i, budget).await {
            Ok(scan) => scan,
            Err(e) if matches!(self.fs.kind(&rel), Ok(None)) => {
                tracing::info!(store = %id, error = %e, "the folder is gone; downloading again");
                Scan::default()
            }
            Err(e) => {
                tracing::warn!(store = %id, error = %e, "listing the folder failed; not synced");
                return;
            }
        };
        let (local, held) = (scan.files, scan.held);
        if !self.marker_ok(i) {
            if local.is_empty() && held.is_empty() {
                if let Err(e) = self.download_store(i).await {
                    tracing::warn!(store = %id, error = %e, "downloading again failed");
                }
            } else {
                tracing::warn!(store = %id, "the marker file is missing or wrong; the folder is left alone");
            }
            return;
        }
        let remote = match self.remote(i).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(store = %id, error = %e, "listing the store failed; next sync retries");
                return;
            }
        };
        // Uploads whose answer was lost.
        let s = &mut self.stores[i];
        let sent = std::mem::take(&mut s.sent);
        for (p, sha) in sent {
            if let Some(r) = remote.get(&p).filter(|r| r.sha == sha) {
                s.baseline.insert(p.clone(), sha);
                s.ids.insert(p, r.id.clone());
            }
        }
        if local.is_empty() && held.is_empty() && s.baseline.len() > 1 {
            tracing::warn!(store = %id, "every local file is gone: treated as a wipe, downloading again");
            if let Err(e) = self.download_store(i).await {
                tracing::warn!(store = %id, error = %e, "downloading again failed");
            }
            return;
        }
        let paths: BTreeSet<String> = remote
            .keys()
            .chain(local.keys())
            .chain(s.baseline.keys())
            .cloned()
            .collect();
        let writable = !s.plan.read_only;
        let (mut pulls, mut uploads, mut candidates) = (Vec::new(), Vec::new(), Vec::new());
        for p in paths {
            // Present but not hashed this time: nothing is decided about it.
            if held.contains(&p) {
                continue;
            }
            let (r, l, b) = (remote.get(&p), local.get(&p), s.baseline.get(&p).cloned());
            match (r, l) {
                (None, None) => {
                    s.baseline.remove(&p);
                    s.ids.remove(&p);
                    s.missing_since.remove(&p);
                }
                (None, Some(l)) => {
                    if b.as_ref() == Some(&l.sha) {
                        // Deleted on the server, unchanged here: the deletion wins.
                        if let Some(lr) = local_rel(&p) {
                            let _ = self.fs.remove_file(&rel.join(lr));
                        }
                        s.baseline.remove(&p);
                        s.ids.remove(&p);
                    } else if writable && s.refused.get(&p) != Some(&l.sha) {
                        uploads.push((p, l.clone(), None));
                    }
                }
                (Some(r), None) => {
                    if b.as_ref() == Some(&r.sha) && writable {
                        let since = *s
                            .missing_since
                            .entry(p.clone())
                            .or_insert_with(Instant::now);
                        if final_sync || since.elapsed() >= DELETE_AFTER {
                            candidates.push((p, r.clone()));
                        }
                    } else {
                        // New on the server, changed there, or a read-only store.
                        pulls.push((p, r.clone()));
                    }
                }
                (Some(r), Some(l)) => {
                    s.missing_since.remove(&p);
                    let remote_changed = b.as_ref() != Some(&r.sha);
                    let local_changed = b.as_ref() != Some(&l.sha);
                    if l.sha == r.sha {
                        s.baseline.insert(p.clone(), r.sha.clone());
                        s.ids.insert(p, r.id.clone());
                    } else if remote_changed {
                        if local_changed {
                            tracing::warn!(store = %id, path = %p, "changed both here and on the server; the server's version wins");
                        }
                        pulls.push((p, r.clone()));
                    } else if local_changed && writable && s.refused.get(&p) != Some(&l.sha) {
                        uploads.push((p, l.clone(), Some(r.clone())));
                    }
                }
            }
        }
        for (p, r) in pulls {
            self.pull(i, &p, &r).await;
        }
        self.upload_all(i, uploads, budget).await;
        self.delete(i, candidates, final_sync).await;
    }

    async fn pull(&mut self, i: usize, path: &str, r: &Remote) {
        let id = self.stores[i].plan.id.clone();
        let req = self.req(
            http::Method::GET,
            format!(
                "/v1/memory_stores/{}/memories/{}?view=full",
                urlencode(&id),
                urlencode(&r.id)
            ),
        );
        let m = match self.api.send(&req).await {
            Ok(a) => a.json().unwrap_or(Value::Null),
            Err(e) if e.status() == Some(404) => return, // the next sync reconciles
            Err(e) => {
                tracing::warn!(store = %id, path, error = %e, "fetching a memory failed");
                return;
            }
        };
        let Some(content) = m["content"].as_str() else {
            return;
        };
        let Some(lr) = local_rel(path) else {
            tracing::warn!(store = %id, path, "a memory path hands cannot write; skipped");
            return;
        };
        let rel = self.stores[i].plan.rel.join(lr);
        match self.fs.write_atomic(&rel, content.as_bytes()) {
            Ok(()) => {
                let s = &mut self.stores[i];
                s.baseline
                    .insert(path.to_string(), sha256_hex(content.as_bytes()));
                s.ids.insert(path.to_string(), r.id.clone());
                s.missing_since.remove(path);
            }
            Err(e) => tracing::warn!(store = %id, path, error = %e, "writing a memory failed"),
        }
    }

    /// E13 (create) or E14 (update with the remote sha as precondition).
    async fn upload(&mut self, i: usize, path: &str, l: &Local, r: Option<&Remote>) {
        let id = self.stores[i].plan.id.clone();
        if !l.utf8 {
            tracing::warn!(store = %id, path, "not UTF-8 text; kept local, not synced");
            self.stores[i]
                .refused
                .insert(path.to_string(), l.sha.clone());
            return;
        }
        let Some(lr) = local_rel(path) else { return };
        let (fs, file) = (self.fs.clone(), self.stores[i].plan.rel.join(lr));
        let want = l.clone();
        let read = tokio::task::spawn_blocking(move || read_for_upload(&fs, &file, &want)).await;
        let Ok(Some(content)) = read else {
            tracing::info!(store = %id, path, "changed since it was hashed; the next sync sends it");
            return;
        };
        // Serialised straight from the content (no copy into a JSON value) into
        // a buffer of the right size (no doubling on the way), and the content
        // dropped before sending: one copy is held meanwhile.
        let mut buf = Vec::with_capacity(json_len(&content) + json_len(path) + 160);
        let (req_path, body) = match r {
            Some(r) => (
                format!(
                    "/v1/memory_stores/{}/memories/{}",
                    urlencode(&id),
                    urlencode(&r.id)
                ),
                serde_json::to_writer(
                    &mut buf,
                    &UpdateBody {
                        content: &content,
                        precondition: Precondition {
                            content_sha256: &r.sha,
                            kind: "content_sha256",
                        },
                    },
                ),
            ),
            None => (
                format!("/v1/memory_stores/{}/memories", urlencode(&id)),
                serde_json::to_writer(
                    &mut buf,
                    &CreateBody {
                        content: &content,
                        path,
                    },
                ),
            ),
        };
        drop(content);
        let Ok(body) = body.map(|()| Bytes::from(buf)) else {
            return;
        };
        self.stores[i].sent.insert(path.to_string(), l.sha.clone());
        let mut req = self.req(http::Method::POST, req_path);
        req.body = Some(body);
        let answer = self.api.send(&req).await;
        let s = &mut self.stores[i];
        match answer {
            Ok(a) => {
                s.sent.remove(path);
                // The answer repeats the content: only the id is kept from it.
                let created: Option<Created> = serde_json::from_slice(&a.body).ok();
                s.baseline.insert(path.to_string(), l.sha.clone());
                if let Some(mid) = created.and_then(|c| c.id) {
                    s.ids.insert(path.to_string(), mid);
                }
            }
            Err(e) => {
                s.sent.remove(path);
                match e.status() {
                    Some(404) if r.is_some() => {
                        Box::pin(self.upload(i, path, l, None)).await;
                    }
                    Some(409) if r.is_some() => {
                        tracing::warn!(store = %id, path, "the memory changed on the server meanwhile; the local edit loses");
                    }
                    Some(status @ (400 | 413)) => {
                        tracing::warn!(store = %id, path, error = %e, "the server refused this content; not retried until it changes");
                        s.refused.insert(path.to_string(), l.sha.clone());
                        if status == 413 {
                            s.too_large.insert(l.sha.clone());
                        }
                    }
                    _ => {
                        // Maybe applied: the next listing settles it.
                        s.sent.insert(path.to_string(), l.sha.clone());
                        tracing::warn!(store = %id, path, error = %e, "uploading a memory failed; next sync retries");
                    }
                }
            }
        }
    }

    async fn delete(&mut self, i: usize, candidates: Vec<(String, Remote)>, final_sync: bool) {
        if candidates.is_empty() {
            return;
        }
        let id = self.stores[i].plan.id.clone();
        match self.deletions {
            Deletions::Disabled => return,
            Deletions::LogOnly => {
                for (p, _) in &candidates {
                    tracing::info!(store = %id, path = %p, final_sync, "would delete (memory_sync_deletions = log_only)");
                }
                return;
            }
            Deletions::Enabled => {}
        }
        if !self.marker_ok(i) {
            return;
        }
        let cap = (self.stores[i].baseline.len() / 4).clamp(8, 50);
        for (p, r) in candidates.into_iter().take(cap) {
            let Some(lr) = local_rel(&p) else { continue };
            if !matches!(
                self.fs.kind(&self.stores[i].plan.rel.join(lr)),
                Ok(None) | Ok(Some(Kind::Other))
            ) {
                continue; // back meanwhile
            }
            let req = self.req(
                http::Method::DELETE,
                format!(
                    "/v1/memory_stores/{}/memories/{}?expected_content_sha256={}",
                    urlencode(&id),
                    urlencode(&r.id),
                    urlencode(&r.sha)
                ),
            );
            let answer = self.api.send(&req).await;
            let s = &mut self.stores[i];
            match answer {
                Ok(_) => {
                    s.baseline.remove(&p);
                    s.ids.remove(&p);
                    s.missing_since.remove(&p);
                }
                Err(e) if e.status() == Some(404) => {
                    s.baseline.remove(&p);
                    s.ids.remove(&p);
                    s.missing_since.remove(&p);
                }
                Err(e) if matches!(e.status(), Some(409 | 412)) => {
                    // Changed on the server: its version stays, and comes back here.
                    s.baseline.remove(&p);
                    s.missing_since.remove(&p);
                }
                Err(e) => {
                    tracing::warn!(store = %id, path = %p, error = %e, "deleting a memory failed; next sync retries")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stores_land_in_the_workspace_whatever_path_the_server_names() {
        let s = json!({"resources": [
            {"type": "memory_store", "memory_store_id": "mem_1", "mount_path": "/mnt/memory/notes", "access": "read_write"},
            {"type": "memory_store", "memory_store_id": "mem_2", "mount_path": "/workspace/kb", "access": "read_only"},
            {"type": "memory_store", "memory_store_id": "mem_3", "name": "team"},
            {"type": "file", "file_id": "f"},
        ]});
        let p = plan(&s).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].rel, Path::new(".memory/0"));
        assert_eq!(
            p[0].link_at.as_deref(),
            Some(Path::new("/mnt/memory/notes"))
        );
        assert_eq!(p[1].rel, Path::new("kb"));
        assert!(p[1].read_only && p[1].link_at.is_none());
        assert_eq!(p[2].rel, Path::new("memory/team"));
        assert_eq!(p[2].shown_at, Path::new("/workspace/memory/team"));
    }

    #[test]
    fn unclean_or_clashing_mount_paths_fail_the_item() {
        for m in [
            "relative/x",
            "/mnt/../etc",
            "/proc/x",
            "/tmp/m",
            "/",
            "/workspace",
            "/dev",
            "/workspace/skills/pdf",
            "/workspace/.memory/0",
        ] {
            let s = json!({"resources": [{"type": "memory_store", "memory_store_id": "m", "mount_path": m}]});
            assert!(plan(&s).is_err(), "{m}");
        }
        let s = json!({"resources": [
            {"type": "memory_store", "memory_store_id": "a", "mount_path": "/mnt/m"},
            {"type": "memory_store", "memory_store_id": "b", "mount_path": "/mnt/m/sub"},
        ]});
        assert!(plan(&s).unwrap_err().contains("already exists"));
    }

    #[test]
    fn json_lengths_are_exact() {
        for s in [
            "",
            "plain",
            "a\"b\\c\n\t\u{0}\u{1f}é€\u{7f}",
            &"\u{0}".repeat(1000),
        ] {
            assert_eq!(
                json_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn utf8_is_checked_across_buffers() {
        let text = "aé€😀".repeat(3);
        for cut in 0..text.len() {
            let mut c = Utf8Check::default();
            c.feed(&text.as_bytes()[..cut]);
            c.feed(&text.as_bytes()[cut..]);
            assert!(c.finish(), "cut at {cut}");
        }
        let mut c = Utf8Check::default();
        c.feed(b"ok\xe2\x82");
        assert!(!c.finish(), "a cut sequence at the end");
        let mut c = Utf8Check::default();
        c.feed(b"\xff");
        c.feed(b"fine");
        assert!(!c.finish());
    }

    #[test]
    fn the_send_budget_always_lets_the_first_upload_through() {
        let mut b = Budget::default();
        assert!(b.send(SYNC_SEND_BYTES * 2), "the first, whatever its size");
        assert!(!b.send(1));
        let mut b = Budget::default();
        assert!(b.send(SYNC_SEND_BYTES / 2) && b.send(SYNC_SEND_BYTES / 2));
        assert!(!b.send(1));
    }

    /// A folder with one sparse file of `MAX_FILE_BYTES` and `links` hard links to it.
    fn linked_folder(links: usize) -> (tempfile::TempDir, Beneath) {
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        let f = std::fs::File::create(dir.join("big")).unwrap();
        f.set_len(MAX_FILE_BYTES).unwrap();
        for n in 0..links {
            std::fs::hard_link(dir.join("big"), dir.join(format!("l{n}"))).unwrap();
        }
        let fs = Beneath::open(ws.path()).unwrap();
        (ws, fs)
    }

    #[test]
    fn hard_links_are_read_once_and_sparse_files_count_their_logical_size() {
        let (_ws, fs) = linked_folder(40);
        let (mut cache, mut budget) = (HashCache::default(), Budget::default());
        let stop = AtomicBool::new(false);
        let scan = scan_store(&fs, "m", Path::new("m"), &mut cache, &mut budget, &stop).unwrap();
        // 41 memories (every path is one), one read of the inode, at its full
        // logical size although it has no block on disk.
        assert_eq!(scan.files.len(), 41);
        assert!(scan.held.is_empty());
        assert_eq!(budget.read, MAX_FILE_BYTES);
        let shas: BTreeSet<&String> = scan.files.values().map(|l| &l.sha).collect();
        assert_eq!(shas.len(), 1);
        assert!(scan
            .files
            .values()
            .all(|l| l.utf8 && l.size == MAX_FILE_BYTES));
    }

    #[test]
    fn files_past_the_read_budget_are_held_for_a_later_sync() {
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        for n in 0..6 {
            // Distinct sparse files: each is read in full.
            let f = std::fs::File::create(dir.join(format!("f{n}"))).unwrap();
            f.set_len(MAX_FILE_BYTES - n).unwrap();
        }
        let fs = Beneath::open(ws.path()).unwrap();
        let stop = AtomicBool::new(false);
        let mut cache = HashCache::default();
        let mut budget = Budget {
            read: SYNC_READ_BYTES - 2 * MAX_FILE_BYTES,
            sent: 0,
        };
        let scan = scan_store(&fs, "m", Path::new("m"), &mut cache, &mut budget, &stop).unwrap();
        assert_eq!((scan.files.len(), scan.held.len()), (2, 4), "{scan:?}");
        assert_eq!(scan.deferred.0, 4);
        // A cancelled scan stops.
        stop.store(true, Ordering::Relaxed);
        let mut budget = Budget::default();
        assert!(scan_store(
            &fs,
            "m",
            Path::new("m"),
            &mut HashCache::default(),
            &mut budget,
            &stop
        )
        .is_err());
    }

    #[test]
    fn memory_paths_map_under_the_folder_only() {
        assert_eq!(local_rel("/a/b.md"), Some(PathBuf::from("a/b.md")));
        assert_eq!(local_rel("/../x"), None);
        assert_eq!(local_rel("/a/./b"), None);
        assert_eq!(local_rel("/.anthropic-memory-store"), None);
        assert_eq!(local_rel("x"), None);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
