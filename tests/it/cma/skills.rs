//! Skills (contract §7): archives resolved and downloaded, staged in the
//! item's workspace with their modes, and hostile archives (`..`, absolute or
//! link members, a bomb, a failed download) refused while the session goes on.

use std::process::Command;

use serde_json::{json, Value};

use super::{end_turn, needs_fake, Served};

/// Archives built by Python's zipfile/tarfile, which write hostile member
/// names as given: name → base64.
pub(super) fn archives() -> Value {
    let script = r##"
import base64, io, json, tarfile, zipfile
def z(members):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as f:
        for name, data, mode in members:
            i = zipfile.ZipInfo(name); i.create_system = 3; i.external_attr = mode << 16
            f.writestr(i, data)
    return b.getvalue()
def t(members, compression=""):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:" + compression) as f:
        for name, data, kind in members:
            i = tarfile.TarInfo(name)
            if kind == "sym":
                i.type = tarfile.SYMTYPE; i.linkname = data; f.addfile(i)
            elif kind == "hard":
                i.type = tarfile.LNKTYPE; i.linkname = data; f.addfile(i)
            else:
                i.size = len(data); i.mode = 0o644; f.addfile(i, io.BytesIO(data))
    return b.getvalue()
out = {
  "pdf_v1": z([("pdf/SKILL.md", b"old", 0o100644)]),
  "pdf_v2": z([("pdf/SKILL.md", b"# PDF skill v2\n", 0o100644),
               ("pdf/scripts/run.sh", b"#!/bin/sh\necho run\n", 0o104755)]),
  "flat": t([("SKILL.md", b"flat", "file"), ("notes/a.txt", b"a", "file")], "gz"),
  "dotdot": t([("ok.txt", b"fine", "file"), ("../escaped.txt", b"x", "file")], "bz2"),
  "absolute": z([("ok.txt", b"fine", 0o100644), ("/tmp/abs-escape.txt", b"x", 0o100644)]),
  "links": t([("links/ok.txt", b"kept", "file"), ("links/shadow", "/etc/shadow", "sym"),
              ("links/hard", "/etc/shadow", "hard")], "xz"),
  "bomb": t([("big.bin", b"\0" * (8 << 20), "file")], "gz"),
}
print(json.dumps({k: base64.b64encode(v).decode() for k, v in out.items()}))
"##;
    let out = Command::new(crate::differential::python())
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Contract §7 and §11 #11: `latest` resolves through E9, a wrapper
/// directory is stripped, modes follow the archive; archives with `..`,
/// absolute or link members, one too big, and one whose download fails are
/// refused — each a warning, the session proceeds. Skills live in the item's
/// workspace and go with it.
#[tokio::test(flavor = "multi_thread")]
async fn skills_are_staged_and_hostile_archives_refused() {
    needs_fake!();
    let a = archives();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E10", "status": 500, "path": "skill_broken", "times": null})],
    )
    .await;
    let skill = |id: &str, name: &str, versions: &[&str]| {
        json!({"skill_id": id, "versions": versions.iter().enumerate().map(|(i, k)| json!({
            "version": format!("{}", i + 1), "name": name, "archive_b64": a[*k]
        })).collect::<Vec<_>>()})
    };
    for spec in [
        skill("skill_pdf", "anthropic/pdf", &["pdf_v1", "pdf_v2"]),
        skill("skill_flat", " flat ", &["flat"]),
        skill("skill_dotdot", "dotdot", &["dotdot"]),
        skill("skill_abs", "absolute", &["absolute"]),
        skill("skill_links", "links", &["links"]),
        skill("skill_bomb", "bomb", &["bomb"]),
        skill("skill_broken", "broken", &["flat"]),
    ] {
        s.fake.control("POST", "/_fake/skills", Some(spec)).await;
    }
    let uses = |id: &str| json!({"type": "custom", "skill_id": id, "version": "latest"});
    let (sid, work) = s
        .session_spec(json!({
            "skills": [uses("skill_pdf"), uses("skill_flat"), uses("skill_dotdot"), uses("skill_abs"),
                       uses("skill_links"), uses("skill_bomb"), uses("skill_broken")],
            "events": [],
            "work": {"ttl_seconds": 4},
        }))
        .await;
    let listing = s
        .bash(&sid, "toolu_ls", "cd /workspace && find . -printf '%p %m %y\\n' | sort; cat skills/pdf/SKILL.md; ls / /tmp")
        .await;
    for want in [
        "./skills 700 d",
        "./skills/pdf 700 d",
        "./skills/pdf/SKILL.md 644 f",
        "./skills/pdf/scripts/run.sh 755 f",
        "./skills/flat 700 d",
        "./skills/flat/SKILL.md 644 f",
        "./skills/flat/notes/a.txt 644 f",
        "./skills/links/ok.txt 644 f",
        "# PDF skill v2",
    ] {
        assert!(
            listing.lines().any(|l| l == want),
            "missing {want:?} in:\n{listing}"
        );
    }
    for absent in [
        "dotdot", "absolute", "shadow", "hard", "bomb", "broken", ".skill-", "escape",
    ] {
        assert!(
            !listing.contains(absent),
            "{absent:?} must not be there:\n{listing}"
        );
    }
    // E9 with `latest`, then E10 by the concrete version id.
    let reqs = s
        .fake
        .control("GET", "/_fake/requests?skill_id=skill_pdf", None)
        .await;
    let reqs = reqs["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["endpoint"], "E9");
    assert!(reqs[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("/versions/latest"));
    assert_eq!(reqs[1]["endpoint"], "E10");
    assert!(!reqs[1]["path"].as_str().unwrap().contains("latest"));
    assert_eq!(reqs[1]["headers"]["accept"], "application/binary");
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}
