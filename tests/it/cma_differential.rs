//! The read-only differential through the control plane: one scripted session
//! (`tests/cma/differential.py`: a setup phase of writes, then read, glob, grep
//! and read-only bash calls, invalid inputs included) is served once by the
//! official SDK's `EnvironmentWorker` and once by `hands worker --config` with
//! only an `[anthropic]` table, each on a fresh fake control plane, and the
//! `user.tool_result` events they post must be equal text for text (`content`
//! and `is_error`), the SDK's workdir read as `/workspace`. The script lists
//! the calls that differ on purpose, with the reason, and requires them to differ.

use std::process::Command;

use crate::differential::{python, sdk_available};

#[test]
fn hands_posts_the_same_results_as_the_sdk_worker_for_a_read_only_session() {
    crate::require_sandbox!();
    if !sdk_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cma/differential.py");
    let out = Command::new(python())
        .arg(script)
        .args(["--hands", env!("CARGO_BIN_EXE_hands")])
        .output()
        .expect("run tests/cma/differential.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the SDK worker and hands posted different results (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    assert!(
        stdout.contains(" 0 unexpected"),
        "no summary line from differential.py:\n{stdout}"
    );
}
