//! The connector's worker loop (contract §3): poll the environment's queue
//! while a slot is free, ack, and serve each item on its own task — heartbeat
//! first, session fetch, the tool runner in a sandbox session of its own,
//! teardown, force-stop — up to `capacity` items at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use super::config::AnthropicConfig;
use super::http::{Api, ApiError, Request};
use super::lease::{Beat, EndReason, Lease};
use super::memory::{self, Memory};
use super::runner::Runner;
use super::secret::{sessions_token, Secret};
use super::skills;
use crate::session::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Secret(#[from] super::secret::SecretError),
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A polled work item: the fields the worker reads.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub id: String,
    pub environment_id: String,
    pub kind: String,
    pub session_id: String,
    pub secret: Option<String>,
}

impl WorkItem {
    fn parse(v: &Value) -> Option<WorkItem> {
        Some(WorkItem {
            id: v["id"].as_str()?.to_string(),
            environment_id: v["environment_id"].as_str()?.to_string(),
            kind: v["data"]["type"].as_str().unwrap_or("").to_string(),
            session_id: v["data"]["id"].as_str().unwrap_or("").to_string(),
            secret: v["secret"].as_str().map(str::to_string),
        })
    }
}

struct Shared {
    api: Api,
    cfg: AnthropicConfig,
    env_key: Secret,
    worker_id: String,
    registry: Arc<Registry>,
    /// One handler at a time per session: an item served again (a re-queue
    /// after a lease this worker believes lost) or the session's next item
    /// waits until the previous handler has torn its sandbox down and released
    /// the session's kept workspace. Entries go when no handler holds them.
    #[allow(clippy::type_complexity)]
    sessions: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// How often kept workspaces past their retention are looked for.
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// How long a handler waits for its sandbox to be released after closing it.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Serves the environment until `shutdown`; returns an error when the
/// environment key is refused (401/403/404 on poll), as the official worker does.
pub async fn run(
    cfg: AnthropicConfig,
    worker_id: String,
    registry: Arc<Registry>,
    health: Arc<crate::worker::health::Health>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectorError> {
    use crate::worker::health::Part;
    let env_key = cfg.key.load()?;
    let api = Api::new(&cfg.base_url)?;
    let slots = Arc::new(Semaphore::new(cfg.capacity));
    let shared = Arc::new(Shared {
        api,
        cfg,
        env_key,
        worker_id,
        registry,
        sessions: Default::default(),
    });
    // Kept workspaces past their retention: at start, then every hour.
    let sweeper = {
        let workspaces = shared.registry.workspaces();
        let retention = shared.cfg.workspace_retention;
        tokio::spawn(async move {
            loop {
                let w = workspaces.clone();
                let swept = tokio::task::spawn_blocking(move || w.sweep_kept(retention))
                    .await
                    .unwrap_or(0);
                if swept > 0 {
                    tracing::info!(swept, "kept workspaces past their retention removed");
                }
                tokio::time::sleep(RETENTION_SWEEP).await;
            }
        })
    };
    let mut items = tokio::task::JoinSet::new();
    let (mut poll_failures, mut ack_failures) = (0u32, 0u32);
    let result = loop {
        // Poll only while a slot is free.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            () = crate::util::stopped(&mut shutdown) => break Ok(()),
        };
        while items.try_join_next().is_some() {}
        let polled = tokio::select! {
            r = shared.poll() => r,
            () = crate::util::stopped(&mut shutdown) => break Ok(()),
        };
        let item = match polled {
            Ok(Some(item)) => {
                poll_failures = 0;
                health.set(Part::Queue, true);
                item
            }
            Ok(None) => {
                poll_failures = 0;
                health.set(Part::Queue, true);
                drop(permit);
                let wait = Duration::from_secs_f64(1.0 + 2.0 * super::http::unit());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    () = crate::util::stopped(&mut shutdown) => break Ok(()),
                }
                continue;
            }
            Err(e) if e.is_fatal_4xx() => {
                // The error is returned, and reported once by the caller.
                tracing::info!(status = ?e.status(), "the environment refused the poll; stopping the connector");
                break Err(e.into());
            }
            Err(e) => {
                poll_failures += 1;
                health.set(Part::Queue, false);
                let wait = backoff60(poll_failures);
                tracing::warn!(error = %e, retry_in = ?wait, "poll failed");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    () = crate::util::stopped(&mut shutdown) => break Ok(()),
                }
                continue;
            }
        };
        match shared.ack(&item).await {
            Ok(()) => {
                ack_failures = 0;
                let shared = shared.clone();
                let stop = shutdown.clone();
                items.spawn(async move {
                    shared.serve_item(item, stop).await;
                    drop(permit);
                });
            }
            Err(e) if e.is_fatal_4xx() => {
                tracing::warn!(work = %item.id, error = %e, "ack refused; force-stopping the item");
                shared.force_stop(&item, &shared.env_key).await;
            }
            Err(e) => {
                ack_failures += 1;
                let wait = backoff60(ack_failures);
                tracing::warn!(work = %item.id, error = %e, retry_in = ?wait, "ack failed; the item will be offered again");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    () = crate::util::stopped(&mut shutdown) => break Ok(()),
                }
            }
        }
    };
    // Shutdown: every item runs its teardown (and force-stop).
    while items.join_next().await.is_some() {}
    sweeper.abort();
    result
}

/// `min(60, 2^n) + U[0,1)` seconds.
fn backoff60(n: u32) -> Duration {
    Duration::from_secs_f64(2f64.powi(n.min(10) as i32).min(60.0) + super::http::unit())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deletes the skill directories an item installed (contract §7.4), anchored
/// in the workspace: the agent may have replaced any of them with a symlink.
fn dispose_skills(workspace: &std::path::Path, installed: &[std::path::PathBuf]) {
    if installed.is_empty() {
        return;
    }
    let fs = match super::beneath::Beneath::open(workspace) {
        Ok(fs) => fs,
        Err(e) => {
            tracing::warn!(error = %e, "opening the workspace to remove skills");
            return;
        }
    };
    for dest in installed {
        let Ok(rel) = dest.strip_prefix(workspace) else {
            continue;
        };
        if let Err(e) = fs.remove_tree(rel) {
            tracing::warn!(skill = %rel.display(), error = %e, "removing an installed skill");
        }
    }
}

impl Shared {
    /// The session's turn lock (see `Shared::sessions`).
    fn session_turn(&self, session_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.sessions)
            .entry(session_id.to_string())
            .or_default()
            .clone()
    }

    /// Drops the session's turn lock when no handler holds or waits for it.
    fn forget_turn(&self, session_id: &str) {
        let mut map = lock(&self.sessions);
        if map
            .get(session_id)
            .is_some_and(|t| Arc::strong_count(t) == 1)
        {
            map.remove(session_id);
        }
    }

    fn env_path(&self, rest: &str) -> String {
        format!("/v1/environments/{}{rest}", self.cfg.environment_id)
    }

    async fn poll(&self) -> Result<Option<WorkItem>, ApiError> {
        let mut req = Request::new(
            http::Method::GET,
            self.env_path("/work/poll?block_ms=999"),
            &self.env_key,
        );
        req.headers
            .push(("anthropic-worker-id", self.worker_id.clone()));
        let a = self.api.send(&req).await?;
        // `null` is "no work"; an empty body or 204 is accepted as the same.
        if a.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let v = a.json().map_err(|e| ApiError::Transport {
            method: "GET".into(),
            path: "work/poll".into(),
            message: format!("not JSON: {e}"),
        })?;
        if v.is_null() {
            return Ok(None);
        }
        WorkItem::parse(&v)
            .map(Some)
            .ok_or_else(|| ApiError::Transport {
                method: "GET".into(),
                path: "work/poll".into(),
                message: format!("not a work item: {v:.200}"),
            })
    }

    async fn ack(&self, item: &WorkItem) -> Result<(), ApiError> {
        let req = Request::new(
            http::Method::POST,
            self.env_path(&format!("/work/{}/ack", item.id)),
            &self.env_key,
        );
        self.api.send(&req).await.map(|_| ())
    }

    async fn force_stop(&self, item: &WorkItem, cred: &Secret) {
        let mut req = Request::new(
            http::Method::POST,
            format!(
                "/v1/environments/{}/work/{}/stop",
                item.environment_id, item.id
            ),
            cred,
        );
        req.body = Some(r#"{"force":true}"#.into());
        match self.api.send(&req).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(409) => {} // already stopped
            Err(e) => tracing::error!(work = %item.id, error = %e, "force-stop failed"),
        }
    }

    /// The heartbeat of one item, until its lease ends (then records why).
    async fn heartbeat(
        &self,
        item: &WorkItem,
        cred: &Secret,
        lease_tx: &watch::Sender<Option<EndReason>>,
        ttl_tx: &watch::Sender<Option<Duration>>,
    ) {
        let mut lease = Lease::new(Instant::now());
        let mut ended = lease_tx.subscribe();
        let end = |reason: EndReason| {
            tracing::info!(work = %item.id, ?reason, "lease ended");
            lease_tx.send_if_modified(|r| {
                if matches!(r, None | Some(EndReason::Draining)) {
                    *r = Some(reason);
                    true
                } else {
                    false
                }
            });
        };
        // A draining item keeps its lease until its call in flight is done.
        let over = |r: &Option<EndReason>| !matches!(r, None | Some(EndReason::Draining));
        loop {
            if over(&ended.borrow()) {
                return;
            }
            // Past the TTL since the last successful heartbeat, the lease is
            // lost: nothing more goes out for this claim.
            let Some(attempt) = lease.next_attempt(Instant::now()) else {
                end(EndReason::AssumedLost);
                return;
            };
            let req = Request::new(
                http::Method::POST,
                format!(
                    "/v1/environments/{}/work/{}/heartbeat?expected_last_heartbeat={}",
                    item.environment_id,
                    item.id,
                    urlencode(lease.expected())
                ),
                cred,
            );
            let beat = match tokio::time::timeout(attempt, self.api.send(&req)).await {
                Ok(Ok(a)) => match a.json() {
                    Ok(v) => Beat::Ok(v),
                    Err(_) => Beat::Transient,
                },
                Ok(Err(e)) => match e.status() {
                    Some(s) => Beat::Status(s),
                    None => Beat::Transient,
                },
                Err(_) => Beat::Transient,
            };
            if !matches!(beat, Beat::Ok(_)) {
                if let Some(m) = self.registry.metrics() {
                    m.cma_heartbeat_failed();
                }
            }
            if let Some(reason) = lease.record(beat, Instant::now()) {
                end(reason);
                return;
            }
            ttl_tx.send_replace(Some(lease.ttl));
            tokio::select! {
                _ = tokio::time::sleep(lease.interval) => {}
                _ = ended.wait_for(over) => return,
            }
        }
    }

    async fn serve_item(self: Arc<Self>, item: WorkItem, mut shutdown: watch::Receiver<bool>) {
        let token = item.secret.as_deref().and_then(sessions_token);
        if token.is_none() && item.secret.as_deref().is_some_and(|s| !s.is_empty()) {
            tracing::warn!(work = %item.id, "the work secret carries no usable sessions token; using the environment key");
        }
        let has_token = token.is_some();
        let cred = token.unwrap_or_else(|| self.env_key.clone());
        if item.kind != "session" {
            self.force_stop(&item, &cred).await;
            if let Some(m) = self.registry.metrics() {
                m.cma_item_ended("not_a_session");
            }
            return;
        }
        let (lease_tx, lease_rx) = watch::channel(None::<EndReason>);
        let (ttl_tx, ttl_rx) = watch::channel(None::<Duration>);
        // A sandbox of this claim alone: a claim of the same item served
        // again never finds, shares or closes it.
        let sandbox_id = format!("cma-{}-{}", item.id, crate::workspace::disk::random_id());
        let memory: tokio::sync::Mutex<Option<Memory>> = tokio::sync::Mutex::new(None);
        let clean_end = std::sync::atomic::AtomicBool::new(false);
        // Set when the session is seen terminated, archived or deleted: its
        // kept workspace goes at the end of this item.
        let session_over = std::sync::atomic::AtomicBool::new(false);
        // This handler's turn on the session (see `Shared::sessions`), held
        // from before its sandbox opens until after it is released.
        let turn = self.session_turn(&item.session_id);
        let held: std::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>> =
            std::sync::Mutex::new(None);
        let installed: std::sync::Mutex<Vec<std::path::PathBuf>> =
            std::sync::Mutex::new(Vec::new());
        let sandbox_weak: std::sync::Mutex<Option<std::sync::Weak<crate::session::Session>>> =
            std::sync::Mutex::new(None);
        let mut work = Box::pin(async {
            let req = Request::new(
                http::Method::GET,
                format!("/v1/sessions/{}", item.session_id),
                &cred,
            );
            let session = self.api.send(&req).await.and_then(|a| {
                a.json().map_err(|e| ApiError::Transport {
                    method: "GET".into(),
                    path: "session".into(),
                    message: e.to_string(),
                })
            });
            let session = match session {
                Ok(s) => s,
                Err(e) => {
                    if e.status() == Some(404) {
                        // Deleted: nothing of it is needed any more.
                        session_over.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    tracing::error!(work = %item.id, error = %e, "fetching the session failed");
                    return;
                }
            };
            if !session["archived_at"].is_null() {
                // Served as the SDK worker serves it, but no later item will
                // come: its workspace goes at the end of this one.
                session_over.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if super::runner::session_status(&session) == "terminated" {
                session_over.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            // Memory stores (§3.3 steps 1, 5, 7): their folders are part of
            // the sandbox session, so they are planned before it opens.
            let plans = match self.cfg.memory_sync {
                None => Vec::new(),
                Some(_) => match memory::plan(&session) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(work = %item.id, error = %e, "the session's memory stores cannot be served");
                        return;
                    }
                },
            };
            if !plans.is_empty() && !has_token {
                tracing::error!(work = %item.id, "the session has memory stores but the work item carried no sessions token, and the memory endpoints reject the environment key");
                return;
            }
            let extra = plans.iter().map(memory::StorePlan::extra_dir).collect();
            if turn.try_lock().is_err() {
                tracing::info!(work = %item.id, session = %item.session_id, "waiting for the session's previous handler to finish");
            }
            *lock(&held) = Some(turn.clone().lock_owned().await);
            let sandbox = match self
                .registry
                .open_in(
                    &sandbox_id,
                    &self.cfg.environment,
                    crate::session::Origin {
                        connector: crate::session::Connector::ClaudeManagedAgents,
                        session: item.session_id.clone(),
                    },
                    extra,
                    Some(item.session_id.clone()),
                )
                .await
            {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::error!(work = %item.id, error = %crate::util::error_chain(&e), "opening the item's sandbox session failed");
                    return;
                }
            };
            *lock(&sandbox_weak) = Some(Arc::downgrade(&sandbox));
            let staged = skills::stage_all(
                &self.api,
                &cred,
                &session,
                sandbox.workspace(),
                self.cfg.skill_limits,
            )
            .await;
            *lock(&installed) = staged;
            if let (false, Some(interval)) = (plans.is_empty(), self.cfg.memory_sync) {
                match Memory::download(
                    self.api.clone(),
                    cred.clone(),
                    sandbox.workspace(),
                    plans,
                    interval,
                    self.cfg.memory_deletions,
                )
                .await
                {
                    Ok(m) => *memory.lock().await = Some(m),
                    Err(e) => {
                        tracing::error!(work = %item.id, error = %e, "downloading the memory stores failed");
                        return;
                    }
                }
            }
            let runner = Runner::new(
                self.api.clone(),
                cred.clone(),
                item.session_id.clone(),
                sandbox,
                self.cfg.max_idle,
                self.cfg.stream_read_timeout,
                ttl_rx,
                lease_rx.clone(),
            );
            let mut ticks = runner.yielded();
            let syncs = async {
                while ticks.changed().await.is_ok() {
                    if let Some(m) = memory.lock().await.as_mut() {
                        m.sync_if_due().await;
                    }
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = runner.run() => clean_end.store(true, std::sync::atomic::Ordering::SeqCst),
                () = syncs => {}
            }
            if runner.session_ended() {
                session_over.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let heartbeat = self.heartbeat(&item, &cred, &lease_tx, &ttl_tx);
        tokio::pin!(heartbeat);
        let mut lost_rx = lease_rx.clone();
        let lost = async move {
            let _ = lost_rx
                .wait_for(|r| matches!(r, Some(EndReason::LeaseLost | EndReason::AssumedLost)))
                .await;
        };
        tokio::pin!(lost);
        let mut beating = true;
        // The worker's stop drains the item: the runner takes no further
        // call, the call in flight gets the grace to finish and post.
        let drained = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drained);
        let mut draining = false;
        loop {
            tokio::select! {
                // In this order: the first heartbeat goes out before the
                // session fetch (contract §3.3 step 2).
                biased;
                // The lease ended: the runner sees it, finishes the call in
                // flight (its result is still ours to post) and returns.
                () = &mut heartbeat, if beating => beating = false,
                () = work.as_mut() => break,
                // The lease is someone else's: abandon the call in flight.
                () = &mut lost => break,
                () = crate::util::stopped(&mut shutdown), if !draining => {
                    draining = true;
                    tracing::info!(work = %item.id, grace_secs = self.cfg.drain_grace.as_secs(), "draining: the call in flight may finish");
                    lease_tx.send_if_modified(|r| {
                        if r.is_none() {
                            *r = Some(EndReason::Draining);
                            true
                        } else {
                            false
                        }
                    });
                    drained.as_mut().reset(tokio::time::Instant::now() + self.cfg.drain_grace);
                }
                // Past the grace: torn down, its call in flight killed.
                () = &mut drained => {
                    tracing::warn!(work = %item.id, "draining: the grace is over; tearing the item down");
                    break;
                }
            }
        }
        drop(work);
        // Teardown (§3.6), the heartbeat still keeping the lease: the item's
        // processes are killed first, so the memory folders hold still; then
        // memory: a clean end gets the final sync and the flush, any other end
        // the flush (§8.6); after a lost lease nothing is sent.
        let lost = matches!(
            *lease_rx.borrow(),
            Some(EndReason::LeaseLost | EndReason::AssumedLost)
        );
        let teardown = async {
            let sandbox = self.registry.get(&sandbox_id).ok();
            if let Some(sandbox) = &sandbox {
                sandbox.kill_processes().await;
            }
            if let Some(mut m) = memory.lock().await.take() {
                if lost {
                    tracing::warn!(work = %item.id, "lease lost: local memory changes not sent");
                } else if clean_end.load(std::sync::atomic::Ordering::SeqCst) {
                    m.finish().await;
                } else {
                    m.flush().await;
                }
                // The workspace is kept for the session's next item, which
                // downloads the stores again (§8.6 dispose).
                m.dispose();
            }
            // And installs its skills again (§7.4): what this item installed goes.
            if let Some(sandbox) = &sandbox {
                let installed = std::mem::take(&mut *lock(&installed));
                dispose_skills(sandbox.workspace(), &installed);
            }
        };
        tokio::pin!(teardown);
        loop {
            tokio::select! {
                biased;
                () = &mut heartbeat, if beating => beating = false,
                () = &mut teardown => break,
            }
        }
        // Teardown: every process of the item dies with its sandbox session.
        // Its workspace is kept for the session's next item, unless the session
        // is over; either way the next handler of the session waits until this
        // sandbox is released.
        self.registry.close(&sandbox_id);
        let weak = lock(&sandbox_weak).take();
        if let Some(weak) = weak {
            let deadline = Instant::now() + RELEASE_WAIT;
            while weak.strong_count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if weak.strong_count() > 0 {
                tracing::warn!(work = %item.id, "the item's sandbox is still held after 30 s");
            }
        }
        if session_over.load(std::sync::atomic::Ordering::SeqCst) && !item.session_id.is_empty() {
            let workspaces = self.registry.workspaces();
            let key = item.session_id.clone();
            match tokio::task::spawn_blocking(move || workspaces.delete_kept(&key)).await {
                Ok(Ok(true)) => {
                    tracing::info!(session = %item.session_id, "the session is over: its workspace was removed")
                }
                Ok(Ok(false)) => {
                    tracing::warn!(session = %item.session_id, "the session is over but its workspace is in use; the retention sweep removes it")
                }
                Ok(Err(e)) => {
                    tracing::error!(session = %item.session_id, error = %e, "removing the workspace of a finished session")
                }
                Err(e) => {
                    tracing::error!(session = %item.session_id, error = %e, "removing the workspace of a finished session")
                }
            }
        }
        drop(lock(&held).take());
        drop(turn);
        self.forget_turn(&item.session_id);
        lease_tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(EndReason::RunnerDone);
                true
            } else {
                false
            }
        });
        let reason = lease_rx.borrow().unwrap_or(EndReason::RunnerDone);
        if reason.force_stop() {
            self.force_stop(&item, &cred).await;
        }
        if let Some(m) = self.registry.metrics() {
            m.cma_item_ended(reason.name());
        }
        tracing::info!(work = %item.id, ?reason, "work item done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            urlencode("2026-01-01T00:00:01Z"),
            "2026-01-01T00%3A00%3A01Z"
        );
        assert_eq!(urlencode("NO_HEARTBEAT"), "NO_HEARTBEAT");
        assert_eq!(urlencode("a b+c/é"), "a%20b%2Bc%2F%C3%A9");
    }
}
