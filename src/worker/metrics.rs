//! The worker's Prometheus metrics: one [`WorkerMetrics`] per worker process,
//! carried by its session registry so that every face (hands.v1 through the
//! tunnel or the debug listener, Claude Managed Agents) is counted where it
//! passes anyway: sessions where the registry opens and closes them, calls in
//! the one call pipeline next to their audit record, egress decisions where
//! the egress layer records them. The tunnel and the Claude Managed Agents
//! connector report their own state. Rendered in the OpenMetrics text format
//! by the `[metrics]` listener ([`super::serve`]).
//!
//! **Every label value comes from a bounded set**, never from what a client
//! sent: tools are the six tools, `exec` or `other` ([`tool_label`]);
//! outcomes, connectors and reasons are fixed words; environments and tunnel
//! endpoints are the configured ones (another name is `other`). A bizarre tool
//! name or an environment that does not exist adds no series.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::session::journal::Outcome;
use crate::session::Connector;

/// The content type of [`WorkerMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the call duration histogram: 1 ms to 5 min.
pub const CALL_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Upper bounds (seconds) of the sandbox open histogram: 5 ms to 1 min.
pub const OPEN_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The label value of what is not among the configured names.
pub const OTHER: &str = "other";

/// Label sets of fixed words.
type Fixed<const N: usize> = [(&'static str, &'static str); N];
/// One label whose value is a configured name (an environment, an endpoint).
type Named = [(&'static str, Arc<str>); 1];

fn call_durations() -> Histogram {
    Histogram::new(CALL_BUCKETS)
}

fn open_durations() -> Histogram {
    Histogram::new(OPEN_BUCKETS)
}

/// The `tool` label of a call: one of the six tools, `exec` (`hands exec`),
/// else `other`.
pub fn tool_label(tool: &str) -> &'static str {
    match crate::tools::Tool::from_name(tool) {
        Some(t) => t.name(),
        None if tool == "exec" => "exec",
        None => OTHER,
    }
}

/// The `outcome` label of a call, as its audit record names it.
pub fn outcome_label(outcome: Outcome) -> &'static str {
    outcome.name()
}

/// One worker's metrics.
pub struct WorkerMetrics {
    registry: Registry,
    /// The configured environments: the only environment label values
    /// besides [`OTHER`].
    environments: Vec<Arc<str>>,
    other: Arc<str>,
    ready: Gauge,
    sessions_open: Family<(Named, Fixed<1>), Gauge>,
    sessions_opened: Family<(Named, Fixed<1>), Counter>,
    sessions_refused: Family<Fixed<1>, Counter>,
    session_open_durations: Family<Named, Histogram, fn() -> Histogram>,
    calls: Family<Fixed<3>, Counter>,
    call_durations: Family<Fixed<1>, Histogram, fn() -> Histogram>,
    tunnel_connected: Family<Named, Gauge>,
    tunnel_reconnects: Family<Named, Counter>,
    cma_items: Family<Fixed<1>, Counter>,
    cma_heartbeat_failures: Counter,
    cma_result_post_retries: Counter,
    egress_decisions: Family<(Named, Fixed<1>), Counter>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("environments", &self.environments)
            .finish_non_exhaustive()
    }
}

/// Counts one in a gauge while it is held: a session open (the registry keeps
/// it with the session's entry, which every way of closing drops), a tunnel
/// connection up (however its task ends).
#[derive(Debug)]
pub struct Held(Gauge);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl WorkerMetrics {
    /// The metrics of a worker offering `environments` with room for
    /// `capacity` sessions.
    pub fn new<'a>(environments: impl IntoIterator<Item = &'a str>, capacity: usize) -> Self {
        let mut registry = Registry::default();
        let m = WorkerMetrics {
            registry: Registry::default(),
            environments: environments.into_iter().map(Arc::from).collect(),
            other: Arc::from(OTHER),
            ready: Gauge::default(),
            sessions_open: Family::default(),
            sessions_opened: Family::default(),
            sessions_refused: Family::default(),
            session_open_durations: Family::new_with_constructor(open_durations),
            calls: Family::default(),
            call_durations: Family::new_with_constructor(call_durations),
            tunnel_connected: Family::default(),
            tunnel_reconnects: Family::default(),
            cma_items: Family::default(),
            cma_heartbeat_failures: Counter::default(),
            cma_result_post_retries: Counter::default(),
            egress_decisions: Family::default(),
        };
        let r = &mut registry;
        r.register(
            "hands_worker_build",
            "The worker's version (always 1)",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "hands_worker_ready",
            "1 while every configured way in is up and the worker is not draining (as /readyz)",
            m.ready.clone(),
        );
        let capacity_gauge = Gauge::<i64>::default();
        capacity_gauge.set(i64::try_from(capacity).unwrap_or(i64::MAX));
        r.register(
            "hands_worker_sessions_capacity",
            "Most sessions open at once (capacity)",
            capacity_gauge,
        );
        r.register(
            "hands_worker_sessions_open",
            "Sessions open now, by environment and connector",
            m.sessions_open.clone(),
        );
        r.register(
            "hands_worker_sessions_opened",
            "Sessions opened, by environment and connector",
            m.sessions_opened.clone(),
        );
        r.register(
            "hands_worker_sessions_refused",
            "Session opens refused, by reason (at_capacity, unknown_environment, \
             environment_mismatch, invalid_id, open_failed)",
            m.sessions_refused.clone(),
        );
        r.register(
            "hands_worker_session_open_duration_seconds",
            "Time to open a session's sandbox (workspace, cgroup, helper), by environment",
            m.session_open_durations.clone(),
        );
        r.register(
            "hands_worker_calls",
            "Tool calls ended, by connector, tool (the six tools, exec, other) and outcome \
             (completed, timed_out, cancelled, shutdown, denied)",
            m.calls.clone(),
        );
        r.register(
            "hands_worker_call_duration_seconds",
            "Tool call duration in the worker, by tool",
            m.call_durations.clone(),
        );
        r.register(
            "hands_worker_tunnel_connected",
            "Tunnel connections up to each gateway endpoint (0 or 1 with tunnel.connections = 1)",
            m.tunnel_connected.clone(),
        );
        r.register(
            "hands_worker_tunnel_reconnects",
            "Tunnel connections established again after one was lost or failed, by endpoint",
            m.tunnel_reconnects.clone(),
        );
        r.register(
            "hands_worker_cma_items",
            "Claude Managed Agents work items ended, by reason (runner_done, heartbeat_stop, \
             heartbeat_rejected, lease_lost, assumed_lost, draining, not_a_session)",
            m.cma_items.clone(),
        );
        r.register(
            "hands_worker_cma_heartbeat_failures",
            "Claude Managed Agents heartbeats that failed (an error status or no answer)",
            m.cma_heartbeat_failures.clone(),
        );
        r.register(
            "hands_worker_cma_result_post_retries",
            "Claude Managed Agents tool results posted again after a failed post",
            m.cma_result_post_retries.clone(),
        );
        r.register(
            "hands_worker_egress_decisions",
            "Egress connections and names decided, by environment and decision (allowed, denied)",
            m.egress_decisions.clone(),
        );
        WorkerMetrics { registry, ..m }
    }

    /// The label value of environment `name`: itself when configured, else
    /// [`OTHER`].
    pub fn environment(&self, name: &str) -> Arc<str> {
        self.environments
            .iter()
            .find(|e| ***e == *name)
            .unwrap_or(&self.other)
            .clone()
    }

    /// A session opened in `environment` for `connector`, its sandbox in
    /// `took`; open while the returned guard is held.
    pub fn session_opened(&self, environment: &str, connector: Connector, took: Duration) -> Held {
        let env = self.environment(environment);
        let labels = (
            [("environment", env.clone())],
            [("connector", connector.name())],
        );
        self.sessions_opened.get_or_create(&labels).inc();
        self.session_open_durations
            .get_or_create(&[("environment", env)])
            .observe(took.as_secs_f64());
        let open = self.sessions_open.get_or_create_owned(&labels);
        open.inc();
        Held(open)
    }

    /// A session open refused for `reason` (a fixed word).
    pub fn session_refused(&self, reason: &'static str) {
        self.sessions_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A call ended with `outcome` after `took`.
    pub fn call_ended(&self, connector: Connector, tool: &str, outcome: Outcome, took: Duration) {
        let tool = tool_label(tool);
        self.calls
            .get_or_create(&[
                ("connector", connector.name()),
                ("tool", tool),
                ("outcome", outcome_label(outcome)),
            ])
            .inc();
        self.call_durations
            .get_or_create(&[("tool", tool)])
            .observe(took.as_secs_f64());
    }

    /// A call a connector refused without running it (outcome `denied`).
    pub fn call_denied(&self, connector: Connector, tool: &str) {
        self.calls
            .get_or_create(&[
                ("connector", connector.name()),
                ("tool", tool_label(tool)),
                ("outcome", "denied"),
            ])
            .inc();
    }

    /// The tunnel's endpoints, shown at 0 before they connect.
    pub fn tunnel_endpoints<'a>(&self, endpoints: impl IntoIterator<Item = &'a str>) {
        for e in endpoints {
            let labels = [("endpoint", Arc::from(e))];
            drop(self.tunnel_connected.get_or_create(&labels));
            drop(self.tunnel_reconnects.get_or_create(&labels));
        }
    }

    /// A tunnel connection to `endpoint` is up while the guard is held.
    pub fn tunnel_up(&self, endpoint: &Arc<str>) -> Held {
        let g = self
            .tunnel_connected
            .get_or_create_owned(&[("endpoint", endpoint.clone())]);
        g.inc();
        Held(g)
    }

    /// A tunnel connection to `endpoint` was established again.
    pub fn tunnel_reconnected(&self, endpoint: &Arc<str>) {
        self.tunnel_reconnects
            .get_or_create(&[("endpoint", endpoint.clone())])
            .inc();
    }

    /// A Claude Managed Agents work item ended for `reason` (a fixed word).
    pub fn cma_item_ended(&self, reason: &'static str) {
        self.cma_items.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn cma_heartbeat_failed(&self) {
        self.cma_heartbeat_failures.inc();
    }

    pub fn cma_result_post_retried(&self) {
        self.cma_result_post_retries.inc();
    }

    /// An egress decision in a session of `environment`.
    pub fn egress_decided(&self, environment: &str, allowed: bool) {
        let decision = if allowed { "allowed" } else { "denied" };
        self.egress_decisions
            .get_or_create(&(
                [("environment", self.environment(environment))],
                [("decision", decision)],
            ))
            .inc();
    }

    /// The exposition text ([`CONTENT_TYPE`]), with the readiness read now.
    pub fn render(&self, ready: bool) -> String {
        self.ready.set(i64::from(ready));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every label value of every sample line of `text`.
    fn label_values(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((_, rest)) = line.split_once('{') else {
                continue;
            };
            let labels = &rest[..rest.rfind('}').unwrap()];
            for pair in labels.split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap();
                out.push((k.to_string(), v.trim_end_matches('"').to_string()));
            }
        }
        out
    }

    #[test]
    fn tool_names_map_to_a_bounded_set() {
        for t in crate::tools::Tool::ALL {
            assert_eq!(tool_label(t.name()), t.name());
        }
        assert_eq!(tool_label("exec"), "exec");
        for hostile in [
            "",
            "Bash",
            "bash ",
            "rm -rf",
            "x\"}\n1",
            &"a".repeat(10_000),
        ] {
            assert_eq!(tool_label(hostile), OTHER, "{hostile:?}");
        }
    }

    #[test]
    fn environments_are_the_configured_ones_or_other() {
        let m = WorkerMetrics::new(["default", "strict"], 4);
        assert_eq!(&*m.environment("strict"), "strict");
        assert_eq!(&*m.environment("nope"), OTHER);
        assert_eq!(&*m.environment(""), OTHER);
    }

    #[test]
    fn hostile_names_add_no_label_values() {
        let m = WorkerMetrics::new(["default"], 4);
        m.call_ended(
            Connector::HandsV1,
            "bash\"} 1\nhands_worker_ready 7",
            Outcome::Completed,
            Duration::from_millis(1),
        );
        m.call_denied(Connector::ClaudeManagedAgents, "nosuchtool");
        m.egress_decided("attacker-env", false);
        let _open = m.session_opened("attacker-env", Connector::HandsV1, Duration::ZERO);
        let text = m.render(false);
        let allowed = [
            "other",
            "default",
            "hands.v1",
            "claude-managed-agents",
            "completed",
            "denied",
            env!("CARGO_PKG_VERSION"),
        ];
        for (k, v) in label_values(&text) {
            assert!(
                k == "le" || allowed.contains(&v.as_str()),
                "{k}={v:?} in\n{text}"
            );
        }
        assert!(text.contains("hands_worker_ready 0\n"), "{text}");
    }

    #[test]
    fn renders_every_metric_with_its_labels() {
        let m = WorkerMetrics::new(["default", "strict"], 16);
        m.tunnel_endpoints(["gw-a:7443"]);
        let gw: Arc<str> = Arc::from("gw-a:7443");
        drop(m.tunnel_up(&gw));
        let _up = m.tunnel_up(&gw);
        m.tunnel_reconnected(&gw);
        let open = m.session_opened("strict", Connector::HandsV1, Duration::from_millis(12));
        let _other = m.session_opened("strict", Connector::HandsV1, Duration::from_millis(12));
        drop(open);
        m.session_refused("at_capacity");
        m.call_ended(
            Connector::HandsV1,
            "read",
            Outcome::Completed,
            Duration::from_millis(3),
        );
        m.call_ended(
            Connector::HandsV1,
            "read",
            Outcome::TimedOut,
            Duration::from_secs(400),
        );
        m.cma_item_ended("lease_lost");
        m.cma_heartbeat_failed();
        m.cma_result_post_retried();
        m.egress_decided("strict", true);
        let text = m.render(true);
        for line in [
            &format!(
                "hands_worker_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "hands_worker_ready 1",
            "hands_worker_sessions_capacity 16",
            "hands_worker_sessions_open{environment=\"strict\",connector=\"hands.v1\"} 1",
            "hands_worker_sessions_opened_total{environment=\"strict\",connector=\"hands.v1\"} 2",
            "hands_worker_sessions_refused_total{reason=\"at_capacity\"} 1",
            "hands_worker_session_open_duration_seconds_count{environment=\"strict\"} 2",
            "hands_worker_calls_total{connector=\"hands.v1\",tool=\"read\",outcome=\"completed\"} 1",
            "hands_worker_calls_total{connector=\"hands.v1\",tool=\"read\",outcome=\"timed_out\"} 1",
            "hands_worker_call_duration_seconds_bucket{le=\"0.001\",tool=\"read\"} 0",
            "hands_worker_call_duration_seconds_bucket{le=\"0.005\",tool=\"read\"} 1",
            "hands_worker_call_duration_seconds_bucket{le=\"300.0\",tool=\"read\"} 1",
            "hands_worker_call_duration_seconds_bucket{le=\"+Inf\",tool=\"read\"} 2",
            "hands_worker_call_duration_seconds_count{tool=\"read\"} 2",
            "hands_worker_tunnel_connected{endpoint=\"gw-a:7443\"} 1",
            "hands_worker_tunnel_reconnects_total{endpoint=\"gw-a:7443\"} 1",
            "hands_worker_cma_items_total{reason=\"lease_lost\"} 1",
            "hands_worker_cma_heartbeat_failures_total 1",
            "hands_worker_cma_result_post_retries_total 1",
            "hands_worker_egress_decisions_total{environment=\"strict\",decision=\"allowed\"} 1",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
