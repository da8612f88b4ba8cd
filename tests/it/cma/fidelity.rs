//! The fake control plane is faithful to the official SDK worker: the SDK's
//! `EnvironmentWorker` runs against `tests/cma/fake_cp.py` through the
//! scripted sessions of `tests/cma/fidelity.py`, and the fake must see what
//! the contract says. Every other test of this module relies on it.

use std::process::Command;

use crate::differential::{python, sdk_available};

#[test]
fn the_fake_control_plane_is_faithful_to_the_official_sdk_worker() {
    if !sdk_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cma/fidelity.py");
    let out = Command::new(python()).arg(script).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fidelity check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
