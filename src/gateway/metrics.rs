//! The gateway's Prometheus metrics, rendered in the text exposition format at
//! `GET /metrics`. A handful of counters and one histogram do not justify a
//! metrics library.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the tool call duration histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    /// API connections open now (a gauge; the listener's tasks move it).
    api_connections: AtomicU64,
    /// Worker processes connected (a gauge, set from the registry of
    /// workers when scraped).
    worker_processes: AtomicU64,
}

/// Counters with labels: no `0` line is printed for them before they count.
const LABELLED: [&str; 4] = [
    "hands_gateway_tunnels_rejected_total",
    "hands_gateway_tool_calls_total",
    "hands_gateway_api_connections_timed_out_total",
    "hands_gateway_accept_errors_total",
];

const HELP: [(&str, &str, &str); 9] = [
    (
        "hands_gateway_tunnels_accepted_total",
        "counter",
        "Worker tunnel connections registered.",
    ),
    (
        "hands_gateway_tunnels_rejected_total",
        "counter",
        "Worker tunnel connections refused, by reason (tls, identity, http2, info, limit).",
    ),
    (
        "hands_gateway_sessions_opened_total",
        "counter",
        "Sessions opened through the API.",
    ),
    (
        "hands_gateway_tool_calls_total",
        "counter",
        "Tool calls answered, by tool and result (ok, is_error, error).",
    ),
    (
        "hands_gateway_call_resumes_total",
        "counter",
        "Tool calls resumed after their tunnel connection was lost.",
    ),
    (
        "hands_gateway_http_unauthorized_total",
        "counter",
        "API requests refused for a missing or wrong bearer token.",
    ),
    (
        "hands_gateway_api_connections_refused_total",
        "counter",
        "API connections answered 503 and closed: api.max_connections were open.",
    ),
    (
        "hands_gateway_api_connections_timed_out_total",
        "counter",
        "API connections closed by a timer, by reason (header_read, idle, stalled_reader).",
    ),
    (
        "hands_gateway_accept_errors_total",
        "counter",
        "Failed accepts (e.g. EMFILE), by listener (api, tunnel); each pauses the listener.",
    ),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Adds one to `name{labels}`; `labels` is already `k="v",…` or empty.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((name, labels))
            .or_default() += 1;
    }

    pub fn api_connection_opened(&self) {
        self.api_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn api_connection_closed(&self) {
        self.api_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets the worker processes gauge (read from the registry at scrape).
    pub fn set_worker_processes(&self, n: usize) {
        self.worker_processes.store(n as u64, Ordering::Relaxed);
    }

    pub fn observe_call(&self, tool: &str, took: Duration) {
        let s = took.as_secs_f64();
        let mut d = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = d.entry(tool.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.count += 1;
    }

    /// The exposition text; `workers` and `tunnels` are gauges read now.
    pub fn render(&self, workers: usize, tunnels: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hands_gateway_workers_connected Workers with at least one tunnel.\n# TYPE hands_gateway_workers_connected gauge\nhands_gateway_workers_connected {workers}"
        );
        let _ = writeln!(
            out,
            "# HELP hands_gateway_tunnels_connected Tunnel connections up.\n# TYPE hands_gateway_tunnels_connected gauge\nhands_gateway_tunnels_connected {tunnels}"
        );
        let _ = writeln!(
            out,
            "# HELP hands_gateway_worker_processes Worker processes with at least one tunnel; more than hands_gateway_workers_connected means processes share a worker identity.\n# TYPE hands_gateway_worker_processes gauge\nhands_gateway_worker_processes {}",
            self.worker_processes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP hands_gateway_api_connections API connections open.\n# TYPE hands_gateway_api_connections gauge\nhands_gateway_api_connections {}",
            self.api_connections.load(Ordering::Relaxed)
        );
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let mut any = false;
            for ((n, labels), v) in counters.iter() {
                if *n == name {
                    any = true;
                    if labels.is_empty() {
                        let _ = writeln!(out, "{name} {v}");
                    } else {
                        let _ = writeln!(out, "{name}{{{labels}}} {v}");
                    }
                }
            }
            if !any && !LABELLED.contains(&name) {
                let _ = writeln!(out, "{name} 0");
            }
        }
        drop(counters);
        let name = "hands_gateway_tool_call_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Tool call round trip through the tunnel.\n# TYPE {name} histogram"
        );
        let d = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (tool, h) in d.iter() {
            let tool = escape(tool);
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{tool=\"{tool}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{tool=\"{tool}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "{name}_sum{{tool=\"{tool}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{tool=\"{tool}\"}} {}", h.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.inc(
            "hands_gateway_tool_calls_total",
            &[("tool", "bash"), ("result", "ok")],
        );
        m.inc(
            "hands_gateway_tool_calls_total",
            &[("tool", "bash"), ("result", "ok")],
        );
        m.inc("hands_gateway_tunnels_rejected_total", &[("reason", "tls")]);
        m.observe_call("bash", Duration::from_millis(3));
        let text = m.render(1, 2);
        assert!(
            text.contains("hands_gateway_workers_connected 1\n"),
            "{text}"
        );
        assert!(text.contains("hands_gateway_tunnels_connected 2\n"));
        assert!(text.contains("hands_gateway_tool_calls_total{tool=\"bash\",result=\"ok\"} 2\n"));
        assert!(text.contains("hands_gateway_tunnels_rejected_total{reason=\"tls\"} 1\n"));
        assert!(text.contains("hands_gateway_sessions_opened_total 0\n"));
        assert!(text.contains(
            "hands_gateway_tool_call_duration_seconds_bucket{tool=\"bash\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains(
            "hands_gateway_tool_call_duration_seconds_bucket{tool=\"bash\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains("hands_gateway_tool_call_duration_seconds_count{tool=\"bash\"} 1\n"));
    }
}
