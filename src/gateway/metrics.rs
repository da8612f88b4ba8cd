//! The gateway's Prometheus metrics, kept in a `prometheus-client` registry and
//! rendered in the OpenMetrics text format at `GET /metrics`. Counters are
//! registered without their `_total` suffix, which the encoder adds: the
//! exposed names are those of the README and docs/gateway.md.
//!
//! Every label value is one of a fixed set (`&'static str`): a tool name a
//! client chose is counted as `other` unless it is one of the six tools, so
//! no request can add series.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the tool call duration histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// A label set of `N` fixed names and bounded values.
type Labels<const N: usize> = [(&'static str, &'static str); N];

fn durations() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    workers_connected: Gauge,
    tunnels_connected: Gauge,
    /// Worker processes connected (set from the registry of workers when
    /// scraped).
    worker_processes: Gauge,
    /// API connections open now (the listener's tasks move it).
    api_connections: Gauge,
    tunnels_accepted: Counter,
    tunnels_rejected: Family<Labels<1>, Counter>,
    sessions_opened: Counter,
    tool_calls: Family<Labels<2>, Counter>,
    call_resumes: Counter,
    http_unauthorized: Counter,
    api_connections_refused: Counter,
    api_connections_timed_out: Family<Labels<1>, Counter>,
    accept_errors: Family<Labels<1>, Counter>,
    call_durations: Family<Labels<1>, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            workers_connected: Gauge::default(),
            tunnels_connected: Gauge::default(),
            worker_processes: Gauge::default(),
            api_connections: Gauge::default(),
            tunnels_accepted: Counter::default(),
            tunnels_rejected: Family::default(),
            sessions_opened: Counter::default(),
            tool_calls: Family::default(),
            call_resumes: Counter::default(),
            http_unauthorized: Counter::default(),
            api_connections_refused: Counter::default(),
            api_connections_timed_out: Family::default(),
            accept_errors: Family::default(),
            call_durations: Family::new_with_constructor(durations),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "hands_gateway_workers_connected",
            "Workers with at least one tunnel",
            m.workers_connected.clone(),
        );
        r.register(
            "hands_gateway_tunnels_connected",
            "Tunnel connections up",
            m.tunnels_connected.clone(),
        );
        r.register(
            "hands_gateway_worker_processes",
            "Worker processes with at least one tunnel; more than \
             hands_gateway_workers_connected means processes share a worker identity",
            m.worker_processes.clone(),
        );
        r.register(
            "hands_gateway_api_connections",
            "API connections open",
            m.api_connections.clone(),
        );
        r.register(
            "hands_gateway_tunnels_accepted",
            "Worker tunnel connections registered",
            m.tunnels_accepted.clone(),
        );
        r.register(
            "hands_gateway_tunnels_rejected",
            "Worker tunnel connections refused, by reason (tls, identity, http2, info, limit)",
            m.tunnels_rejected.clone(),
        );
        r.register(
            "hands_gateway_sessions_opened",
            "Sessions opened through the API",
            m.sessions_opened.clone(),
        );
        r.register(
            "hands_gateway_tool_calls",
            "Tool calls answered, by tool (the six tools, attach, other) and result \
             (ok, is_error, error)",
            m.tool_calls.clone(),
        );
        r.register(
            "hands_gateway_call_resumes",
            "Tool calls resumed after their tunnel connection was lost",
            m.call_resumes.clone(),
        );
        r.register(
            "hands_gateway_http_unauthorized",
            "API requests refused for a missing or wrong bearer token",
            m.http_unauthorized.clone(),
        );
        r.register(
            "hands_gateway_api_connections_refused",
            "API connections answered 503 and closed: api.max_connections were open",
            m.api_connections_refused.clone(),
        );
        r.register(
            "hands_gateway_api_connections_timed_out",
            "API connections closed by a timer, by reason (header_read, idle, stalled_reader)",
            m.api_connections_timed_out.clone(),
        );
        r.register(
            "hands_gateway_accept_errors",
            "Failed accepts (e.g. EMFILE), by listener (api, tunnel); each pauses the listener",
            m.accept_errors.clone(),
        );
        r.register(
            "hands_gateway_tool_call_duration_seconds",
            "Tool call round trip through the tunnel, by tool",
            m.call_durations.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// The `tool` label of a call: one of the six tools, `attach` (a re-attach
/// names no tool), else `other`.
fn tool_label(tool: &str) -> &'static str {
    if tool.is_empty() {
        return "attach";
    }
    crate::tools::Tool::from_name(tool).map_or("other", crate::tools::Tool::name)
}

impl Metrics {
    pub fn tunnel_accepted(&self) {
        self.tunnels_accepted.inc();
    }

    /// A tunnel connection refused for `reason` (one of a fixed set).
    pub fn tunnel_rejected(&self, reason: &'static str) {
        self.tunnels_rejected
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn session_opened(&self) {
        self.sessions_opened.inc();
    }

    pub fn call_resumed(&self) {
        self.call_resumes.inc();
    }

    pub fn unauthorized(&self) {
        self.http_unauthorized.inc();
    }

    pub fn api_connection_opened(&self) {
        self.api_connections.inc();
    }

    pub fn api_connection_closed(&self) {
        self.api_connections.dec();
    }

    pub fn api_connection_refused(&self) {
        self.api_connections_refused.inc();
    }

    /// An API connection closed by its timer `reason`.
    pub fn api_connection_timed_out(&self, reason: &'static str) {
        self.api_connections_timed_out
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A failed accept on `listener` (`api`, `tunnel`).
    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors
            .get_or_create(&[("listener", listener)])
            .inc();
    }

    /// Sets the worker processes gauge (read from the registry at scrape).
    pub fn set_worker_processes(&self, n: usize) {
        self.worker_processes.set(n as i64);
    }

    /// One tool call answered (`result`: `ok`, `is_error`, `error`) after
    /// `took`; `tool` is what the client named (empty: a re-attach).
    pub fn call_answered(&self, tool: &str, result: &'static str, took: Duration) {
        let tool = tool_label(tool);
        self.tool_calls
            .get_or_create(&[("tool", tool), ("result", result)])
            .inc();
        self.call_durations
            .get_or_create(&[("tool", tool)])
            .observe(took.as_secs_f64());
    }

    /// The exposition text ([`CONTENT_TYPE`]); `workers` and `tunnels` are
    /// gauges read now.
    pub fn render(&self, workers: usize, tunnels: usize) -> String {
        self.workers_connected.set(workers as i64);
        self.tunnels_connected.set(tunnels as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.call_answered("bash", "ok", Duration::from_millis(3));
        m.call_answered("bash", "ok", Duration::from_millis(30));
        m.tunnel_rejected("tls");
        let text = m.render(1, 2);
        assert!(
            text.contains("hands_gateway_workers_connected 1\n"),
            "{text}"
        );
        assert!(text.contains("hands_gateway_tunnels_connected 2\n"));
        assert!(text.contains("hands_gateway_tool_calls_total{tool=\"bash\",result=\"ok\"} 2\n"));
        assert!(text.contains("hands_gateway_tunnels_rejected_total{reason=\"tls\"} 1\n"));
        assert!(text.contains("hands_gateway_sessions_opened_total 0\n"));
        // Labelled counters print nothing before they count.
        assert!(
            !text.contains("hands_gateway_accept_errors_total"),
            "{text}"
        );
        assert!(text.contains(
            "hands_gateway_tool_call_duration_seconds_bucket{le=\"0.0025\",tool=\"bash\"} 0\n"
        ));
        assert!(text.contains(
            "hands_gateway_tool_call_duration_seconds_bucket{le=\"0.005\",tool=\"bash\"} 1\n"
        ));
        assert!(text.contains("hands_gateway_tool_call_duration_seconds_count{tool=\"bash\"} 2\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_tool_name_a_client_chose_is_not_a_label_value() {
        let m = Metrics::default();
        m.call_answered("bash\"} 1\nevil", "error", Duration::ZERO);
        m.call_answered("nosuchtool", "error", Duration::ZERO);
        m.call_answered("", "ok", Duration::ZERO);
        let text = m.render(0, 0);
        assert!(
            !text.contains("evil") && !text.contains("nosuchtool"),
            "{text}"
        );
        assert!(
            text.contains("hands_gateway_tool_calls_total{tool=\"other\",result=\"error\"} 2\n")
        );
        assert!(text.contains("hands_gateway_tool_calls_total{tool=\"attach\",result=\"ok\"} 1\n"));
    }
}
