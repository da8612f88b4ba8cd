//! `hands conformance`: named cases, in the style of the gRPC interop test
//! descriptions, run against a worker's `hands.v1.Sandbox` (gRPC) or a
//! gateway's HTTP API; and MCP cases ([`mcp`]) against any MCP face of a
//! sandbox. Procedures and assertions: `tests/conformance/README.md`.
//!
//! A run reports each case as pass, fail, xfail (failed, and listed in the
//! expected-failures file), xpass (listed there but passed: a stale baseline,
//! which fails the run) or skip (not applicable to this kind of target).

pub mod cases;
pub mod mcp;
pub mod target;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use target::{Kind, Target};

/// What a case may use: the environment, and unique ids for this run.
pub struct Ctx {
    pub env: String,
    /// The egress cases' environment and a URL it allows (`None`: skipped).
    pub egress: Option<Egress>,
    run: String,
    sessions: Mutex<Vec<String>>,
}

impl Ctx {
    pub fn new(env: &str) -> Ctx {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        Ctx {
            env: env.to_string(),
            egress: None,
            run: format!("conf-{:08x}", u32::from_le_bytes(b)),
            sessions: Mutex::new(Vec::new()),
        }
    }

    /// An id unique to this run.
    pub fn id(&self, tag: &str) -> String {
        format!("{}-{tag}", self.run)
    }

    /// Records a session to close after the case.
    pub fn opened(&self, sid: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sid.to_string());
    }

    fn take_sessions(&self) -> Vec<String> {
        std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Xfail,
    Xpass,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub status: Status,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub millis: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn count(&self, s: Status) -> usize {
        self.cases.iter().filter(|c| c.status == s).count()
    }

    /// A run fails on any unexpected failure or unexpected pass.
    pub fn ok(&self) -> bool {
        self.count(Status::Fail) == 0 && self.count(Status::Xpass) == 0
    }

    pub fn human(&self) -> String {
        let mut out = format!("hands conformance against {}\n", self.target);
        for c in &self.cases {
            let tag = match c.status {
                Status::Pass => "PASS ",
                Status::Fail => "FAIL ",
                Status::Xfail => "XFAIL",
                Status::Xpass => "XPASS",
                Status::Skip => "SKIP ",
            };
            out.push_str(&format!("{tag} {:<38} {:>6} ms", c.name, c.millis));
            if !c.detail.is_empty() {
                out.push_str(&format!("  {}", c.detail));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "{} passed, {} failed, {} expected failures, {} unexpected passes, {} skipped\n",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Xfail),
            self.count(Status::Xpass),
            self.count(Status::Skip)
        ));
        out
    }
}

/// Parses an expected-failures file: one case name per line, `#` comments.
/// Unknown names are an error (a typo would otherwise hide a failure).
pub fn parse_expected_failures(text: &str) -> Result<BTreeSet<String>, String> {
    let known: BTreeSet<&str> = cases::all()
        .iter()
        .map(|c| c.name)
        .chain(mcp::all().iter().map(|c| c.name))
        .collect();
    let mut set = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !known.contains(name) {
            return Err(format!("line {}: no case named {name:?}", i + 1));
        }
        set.insert(name.to_string());
    }
    Ok(set)
}

/// The egress cases' target: an environment in `network.mode = "egress"`
/// and an `http://` URL its policy allows, which answers a GET with 2xx or 3xx.
#[derive(Debug, Clone)]
pub struct Egress {
    pub env: String,
    pub url: String,
}

/// A case's error that means "not applicable to this run", reported as skip.
pub const SKIP: &str = "SKIP: ";

/// Options of a run.
pub struct Options {
    pub env: String,
    /// Run the egress cases against this (skipped otherwise).
    pub egress: Option<Egress>,
    /// Only these cases (all when empty).
    pub only: Vec<String>,
    pub expected_failures: BTreeSet<String>,
    /// Per-case time limit.
    pub case_timeout: Duration,
}

/// Runs the cases against `target`.
pub async fn run(target: &mut dyn Target, name: &str, opts: &Options) -> Report {
    let mut ctx = Ctx::new(&opts.env);
    ctx.egress = opts.egress.clone();
    let mut reports = Vec::new();
    for case in cases::all() {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == case.name) {
            continue;
        }
        let t0 = Instant::now();
        if case.grpc_only && target.kind() == Kind::Gateway {
            reports.push(CaseReport {
                name: case.name.into(),
                status: Status::Skip,
                detail: "not applicable to a gateway".into(),
                millis: 0,
            });
            continue;
        }
        let result = match tokio::time::timeout(opts.case_timeout, (case.run)(target, &ctx)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", opts.case_timeout)),
        };
        for sid in ctx.take_sessions() {
            let _ = tokio::time::timeout(Duration::from_secs(10), target.close(&sid)).await;
        }
        reports.push(case_report(case.name, result, opts, t0));
    }
    Report {
        target: name.to_string(),
        cases: reports,
    }
}

/// A case's report from its result: skip (an error starting with [`SKIP`]),
/// pass, fail, or, when the baseline lists it, xfail or xpass.
pub fn case_report(
    name: &str,
    result: Result<(), String>,
    opts: &Options,
    started: Instant,
) -> CaseReport {
    let expected = opts.expected_failures.contains(name);
    let (status, detail) = match (result, expected) {
        (Err(e), _) if e.starts_with(SKIP) => (Status::Skip, e[SKIP.len()..].to_string()),
        (Ok(()), false) => (Status::Pass, String::new()),
        (Ok(()), true) => (
            Status::Xpass,
            "listed as an expected failure but passed: update the baseline".into(),
        ),
        (Err(e), false) => (Status::Fail, e),
        (Err(e), true) => (Status::Xfail, e),
    };
    CaseReport {
        name: name.into(),
        status,
        detail,
        millis: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_is_documented_and_names_are_unique() {
        let doc = include_str!("../../tests/conformance/README.md");
        let mut seen = BTreeSet::new();
        let names = cases::all()
            .iter()
            .map(|c| c.name)
            .chain(mcp::all().iter().map(|c| c.name))
            .collect::<Vec<_>>();
        for name in names {
            assert!(seen.insert(name), "duplicate case {name}");
            assert!(
                doc.contains(&format!("### `{name}`")),
                "case {name} is not documented in tests/conformance/README.md"
            );
        }
    }

    #[test]
    fn expected_failures_files_are_checked() {
        let set =
            parse_expected_failures("# baseline\ninfo  # flaky\n\nbash_shell_persists\n").unwrap();
        assert_eq!(set.len(), 2);
        let e = parse_expected_failures("inf0\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("inf0"), "{e}");
    }
}
