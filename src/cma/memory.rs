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
//!   each; anything larger stays local and unsynced, with a warning.
//! - After the lease is lost nothing is sent (the new holder's copy wins).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::beneath::{is_clean, Beneath, Kind};
use super::http::{Api, ApiError, Beta, Request};
use super::secret::Secret;
use super::worker::urlencode;
use crate::sandbox::proto::ExtraDir;

pub const MARKER: &str = ".anthropic-memory-store";
pub const MAX_FILES: usize = 10_000;
pub const MAX_FILE_BYTES: u64 = 8 << 20;
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
                match shown.strip_prefix(crate::sandbox::mounts::WORKSPACE) {
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
                    shown_at: Path::new(crate::sandbox::mounts::WORKSPACE)
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
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

#[derive(Debug, Clone)]
struct Local {
    sha: String,
    /// `None`: not UTF-8, or too large; never uploaded.
    content: Option<String>,
}

/// One store's sync state.
struct Store {
    plan: StorePlan,
    baseline: BTreeMap<String, String>,
    ids: BTreeMap<String, String>,
    /// Content the server refused (400/413) or that cannot be sent: not
    /// retried until the file changes.
    refused: BTreeMap<String, String>,
    /// Uploads whose answer was lost: settled by the next listing.
    sent: BTreeMap<String, String>,
    missing_since: BTreeMap<String, Instant>,
}

/// The memory stores of one item.
pub struct Memory {
    api: Api,
    cred: Secret,
    fs: Beneath,
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
            fs,
            stores: plans
                .into_iter()
                .map(|plan| Store {
                    plan,
                    baseline: BTreeMap::new(),
                    ids: BTreeMap::new(),
                    refused: BTreeMap::new(),
                    sent: BTreeMap::new(),
                    missing_since: BTreeMap::new(),
                })
                .collect(),
            deletions,
            interval,
            last: Instant::now(),
        };
        for i in 0..m.stores.len() {
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
        let list = self
            .list(&id, "full", 20)
            .await
            .map_err(|e| e.to_string())?;
        let s = &mut self.stores[i];
        s.baseline.clear();
        s.ids.clear();
        for m in list {
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
            s.baseline
                .insert(path.to_string(), sha256_hex(content.as_bytes()));
            s.ids.insert(path.to_string(), mid.to_string());
        }
        Ok(())
    }

    fn req(&self, method: http::Method, path: String) -> Request<'_> {
        let mut r = Request::new(method, path, &self.cred);
        r.beta = Beta::Memory;
        r
    }

    /// E11, every page; memory entries only.
    async fn list(&self, store: &str, view: &str, limit: u32) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut path = format!(
                "/v1/memory_stores/{}/memories?limit={limit}&view={view}",
                urlencode(store)
            );
            if let Some(p) = &page {
                path.push_str(&format!("&page={}", urlencode(p)));
            }
            let v = self
                .api
                .send(&self.req(http::Method::GET, path))
                .await?
                .json()
                .unwrap_or(Value::Null);
            for m in v["data"].as_array().into_iter().flatten() {
                if m["type"] == "memory" {
                    out.push(m.clone());
                }
            }
            match v["next_page"].as_str().filter(|p| !p.is_empty()) {
                Some(p) => page = Some(p.to_string()),
                None => return Ok(out),
            }
        }
    }

    fn local(&self, i: usize) -> Result<BTreeMap<String, Local>, String> {
        let s = &self.stores[i];
        let files = self
            .fs
            .files(&s.plan.rel, MAX_FILES, MAX_FILE_BYTES)
            .map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for (rel, data) in files {
            if rel == MARKER {
                continue;
            }
            let local = match data {
                Ok(d) => Local {
                    sha: sha256_hex(&d),
                    content: String::from_utf8(d).ok(),
                },
                Err(e) => {
                    tracing::warn!(store = %s.plan.id, path = %rel, error = %e, "a local file is not synced");
                    continue;
                }
            };
            out.insert(format!("/{rel}"), local);
        }
        Ok(out)
    }

    /// Syncs every store when the interval has passed (after a call, §8.4).
    pub async fn sync_if_due(&mut self) {
        if self.last.elapsed() >= self.interval {
            self.sync_all(false).await;
        }
    }

    pub async fn sync_all(&mut self, final_sync: bool) {
        for i in 0..self.stores.len() {
            self.sync(i, final_sync).await;
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
            for i in 0..self.stores.len() {
                self.flush_store(i).await;
            }
        };
        if tokio::time::timeout(FINAL_BOUND, run).await.is_err() {
            tracing::warn!("the final memory flush did not finish within 30 s");
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

    async fn flush_store(&mut self, i: usize) {
        if self.stores[i].plan.read_only || !self.marker_ok(i) {
            return;
        }
        let Ok(local) = self.local(i) else { return };
        let Ok(remote) = self.remote(i).await else {
            return;
        };
        for (path, l) in &local {
            let s = &self.stores[i];
            let r = remote.get(path);
            if r.is_some_and(|r| r.sha == l.sha)
                || s.baseline.get(path) == Some(&l.sha)
                || s.refused.get(path) == Some(&l.sha)
            {
                continue;
            }
            self.upload(i, path, l, r).await;
        }
    }

    async fn sync(&mut self, i: usize, final_sync: bool) {
        let id = self.stores[i].plan.id.clone();
        let rel = self.stores[i].plan.rel.clone();
        let local = match self.local(i) {
            Ok(l) => l,
            Err(e) if matches!(self.fs.kind(&rel), Ok(None)) => {
                tracing::info!(store = %id, error = %e, "the folder is gone; downloading again");
                BTreeMap::new()
            }
            Err(e) => {
                tracing::warn!(store = %id, error = %e, "listing the folder failed; not synced");
                return;
            }
        };
        if !self.marker_ok(i) {
            if local.is_empty() {
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
        if local.is_empty() && s.baseline.len() > 1 {
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
        for (p, l, r) in uploads {
            self.upload(i, &p, &l, r.as_ref()).await;
        }
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
        let Some(content) = &l.content else {
            tracing::warn!(store = %id, path, "not UTF-8 text; kept local, not synced");
            self.stores[i]
                .refused
                .insert(path.to_string(), l.sha.clone());
            return;
        };
        let (req_path, body) = match r {
            Some(r) => (
                format!(
                    "/v1/memory_stores/{}/memories/{}",
                    urlencode(&id),
                    urlencode(&r.id)
                ),
                json!({"content": content, "precondition": {"type": "content_sha256", "content_sha256": r.sha}}),
            ),
            None => (
                format!("/v1/memory_stores/{}/memories", urlencode(&id)),
                json!({"content": content, "path": path}),
            ),
        };
        self.stores[i].sent.insert(path.to_string(), l.sha.clone());
        let mut req = self.req(http::Method::POST, req_path);
        req.body = Some(body.to_string());
        let answer = self.api.send(&req).await;
        let s = &mut self.stores[i];
        match answer {
            Ok(a) => {
                s.sent.remove(path);
                let v = a.json().unwrap_or(Value::Null);
                s.baseline.insert(path.to_string(), l.sha.clone());
                if let Some(mid) = v["id"].as_str() {
                    s.ids.insert(path.to_string(), mid.to_string());
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
                    Some(400 | 413) => {
                        tracing::warn!(store = %id, path, error = %e, "the server refused this content; not retried until it changes");
                        s.refused.insert(path.to_string(), l.sha.clone());
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
