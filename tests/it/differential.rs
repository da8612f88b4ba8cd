//! The differential test against the official SDK's tools: the cases of
//! `tests/sdk/cases.json` run in order through the SDK's
//! `anthropic.lib.tools.agent_toolset` (tests/sdk/run_sdk.py) on one fresh fixture
//! and through a hands session on another, and the results (texts and
//! `is_error`) must be equal after each side's workspace root is replaced by a
//! placeholder. Every deliberate difference is listed below with its reason; any
//! other difference fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::require_sandbox;
use crate::util::*;

const ROOT: &str = "<WORKSPACE>";

/// Cases whose results differ on purpose, and why. The README's table of
/// differences says the same.
const DELIBERATE: &[(&str, &str)] = &[(
    "grep_extension_field",
    "hands accepts grep's optional extension fields (-i, -n, -A/-B/-C, glob, type, \
         multiline, output_mode, head_limit); the SDK rejects every unknown field",
)];

/// Cases whose output is a set of lines in no defined order (rg searches files in
/// parallel; hands sorts by path): compared as sorted lines.
const UNORDERED: &[&str] = &[
    "grep_literal",
    "grep_regex",
    "grep_directory",
    "grep_unicode",
    "grep_after_writes",
];

pub fn python() -> String {
    std::env::var("HANDS_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn sdk_available() -> bool {
    let ok = Command::new(python())
        .args([
            "-c",
            "import anthropic, sys; sys.exit(0 if anthropic.__version__ == '2.10.0' else 1)",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "the official SDK (anthropic==2.10.0) is not importable by {} under CI=true",
                python()
            );
        }
        eprintln!("SKIP differential: anthropic==2.10.0 not importable");
    }
    ok
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

fn make_fixture(dir: &Path) {
    let st = Command::new(python())
        .arg(sdk_dir().join("make_fixture.py"))
        .arg(dir)
        .status()
        .expect("run make_fixture.py");
    assert!(st.success(), "make_fixture.py failed");
}

fn substitute(v: &Value, root: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("@WORKDIR@", root)),
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, root)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), substitute(x, root)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A result as compared: blocks with the workspace root replaced.
fn normalise(content: &Value, root: &str, unordered: bool) -> Value {
    let mut v = content.clone();
    if let Value::Array(blocks) = &mut v {
        for b in blocks {
            if let Some(Value::String(t)) = b.get_mut("text") {
                let mut s = t.replace(root, ROOT);
                if unordered {
                    let trailing = s.ends_with('\n');
                    let mut lines: Vec<&str> = s.lines().collect();
                    lines.sort_unstable();
                    s = lines.join("\n");
                    if trailing {
                        s.push('\n');
                    }
                }
                *t = s;
            }
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_results_equal_the_official_sdks() {
    require_sandbox!();
    if !sdk_available() {
        return;
    }
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(sdk_dir().join("cases.json")).expect("cases.json"),
    )
    .expect("cases.json is JSON");
    assert!(cases.len() >= 40);

    // SDK side.
    let sdk_tmp = tempfile::tempdir().unwrap();
    let sdk_ws = std::fs::canonicalize(sdk_tmp.path()).unwrap().join("ws");
    make_fixture(&sdk_ws);
    let out = Command::new(python())
        .arg(sdk_dir().join("run_sdk.py"))
        .arg("--workdir")
        .arg(&sdk_ws)
        .arg("--cases")
        .arg(sdk_dir().join("cases.json"))
        .output()
        .expect("run run_sdk.py");
    assert!(
        out.status.success(),
        "run_sdk.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Vec<Value> = serde_json::from_slice(&out.stdout).expect("SDK results");
    assert_eq!(sdk.len(), cases.len());

    // hands side.
    let hands_tmp = tempfile::tempdir().unwrap();
    let hands_ws = hands_tmp.path().join("ws");
    make_fixture(&hands_ws);
    let session = open(Some(&hands_ws)).await;
    let mut diffs = Vec::new();
    let mut same = 0;
    for (case, sdk_result) in cases.iter().zip(&sdk) {
        let name = case["name"].as_str().unwrap();
        let tool_name = case["tool"].as_str().unwrap();
        let input = substitute(&case["input"], "/workspace");
        // The SDK side pauses between calls too (run_sdk.py): a shell that just
        // died is noticed by the next call on both sides.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let r = session.call(tool_name, &input).await;
        let ours = serde_json::to_value(&r).unwrap();
        let unordered = UNORDERED.contains(&name);
        let a = normalise(&sdk_result["content"], sdk_ws.to_str().unwrap(), unordered);
        let b = normalise(&ours["content"], "/workspace", unordered);
        let equal = a == b && sdk_result["is_error"] == ours["is_error"];
        if let Some((_, why)) = DELIBERATE.iter().find(|(n, _)| *n == name) {
            assert!(
                !equal,
                "{name} is listed as a deliberate difference but is equal; remove it ({why})"
            );
            continue;
        }
        if equal {
            same += 1;
        } else {
            diffs.push(format!(
                "{name}: {tool_name} {input}\n   sdk:   is_error={} {}\n   hands: is_error={} {}",
                sdk_result["is_error"], a, ours["is_error"], b
            ));
        }
    }
    session.close().await.unwrap();
    eprintln!(
        "differential: {} cases, {same} identical, {} deliberate differences, {} unexpected",
        cases.len(),
        DELIBERATE.len(),
        diffs.len()
    );
    assert!(
        diffs.is_empty(),
        "{} unexpected differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
