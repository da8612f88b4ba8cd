//! SIGHUP: the worker reads its configuration and policies again and applies
//! what can change under running sessions — the environments offered (added,
//! removed, or with a changed policy) and `capacity` — and names every other
//! key that changed as needing a restart. A configuration or policy that
//! fails validation changes nothing: the worker keeps serving with what it
//! has, and says why.
//!
//! Open sessions keep the policy they were opened with; new sessions get the
//! new one.

use super::Config;
use crate::session::registry::Registry;

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Environments offered now that were not before.
    pub added: Vec<String>,
    /// Environments no longer offered.
    pub removed: Vec<String>,
    /// Environments whose policy (or source file) changed.
    pub changed: Vec<String>,
    /// The new capacity, when it changed.
    pub capacity: Option<usize>,
    /// Keys that changed but take effect only at the next start.
    pub needs_restart: Vec<&'static str>,
}

impl Reloaded {
    /// One line for the log and the service manager's status.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (what, names) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("environments {what}: {}", names.join(", ")));
            }
        }
        if let Some(c) = self.capacity {
            parts.push(format!("capacity now {c}"));
        }
        if parts.is_empty() {
            parts.push("nothing to apply".into());
        }
        if !self.needs_restart.is_empty() {
            parts.push(format!(
                "changed but needing a restart: {}",
                self.needs_restart.join(", ")
            ));
        }
        parts.join("; ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the Claude Managed Agents connector serves environment {0:?}, which the new configuration no longer offers (restart the worker to change it)")]
    ConnectorEnvironment(String),
}

/// Applies `new` over `running` (the configuration the worker serves with):
/// the environments and capacity go to `registry`, and `running` becomes
/// `new` for those keys only, so the next reload compares against what is
/// in force.
pub fn apply(
    running: &mut Config,
    new: Config,
    registry: &Registry,
) -> Result<Reloaded, ReloadError> {
    if let Some(a) = &running.anthropic {
        if !new.policies.iter().any(|p| p.name == a.environment) {
            return Err(ReloadError::ConnectorEnvironment(a.environment.clone()));
        }
    }
    let mut r = Reloaded::default();
    for p in &new.policies {
        match running.policies.iter().find(|o| o.name == p.name) {
            None => r.added.push(p.name.clone()),
            Some(o) if o != p || running.sources.get(&p.name) != new.sources.get(&p.name) => {
                r.changed.push(p.name.clone())
            }
            Some(_) => {}
        }
    }
    for o in &running.policies {
        if !new.policies.iter().any(|p| p.name == o.name) {
            r.removed.push(o.name.clone());
        }
    }
    if new.capacity != running.capacity {
        r.capacity = Some(new.capacity);
    }
    // Compared by their full, validated values.
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let keys: [(&'static str, bool); 9] = [
        ("worker_id", running.worker_id == new.worker_id),
        ("listen", running.listen == new.listen),
        (
            "shutdown_grace_secs",
            running.shutdown_grace == new.shutdown_grace,
        ),
        ("tunnel", same(&running.tunnel, &new.tunnel)),
        ("anthropic", same(&running.anthropic, &new.anthropic)),
        ("journal", same(&running.journal, &new.journal)),
        (
            "sessions",
            running.session_idle_timeout == new.session_idle_timeout,
        ),
        ("audit", same(&running.audit, &new.audit)),
        // Compared with its token (its Debug hides it).
        ("mcp", running.mcp == new.mcp),
    ];
    r.needs_restart = keys.iter().filter(|(_, s)| !s).map(|(k, _)| *k).collect();
    registry.set_environments(new.policies.iter().cloned());
    registry.set_capacity(new.capacity);
    running.policies = new.policies;
    running.sources = new.sources;
    running.capacity = new.capacity;
    Ok(r)
}
