//! The conformance cases. Each has a stable name; its procedure and assertions
//! are documented in `tests/conformance/README.md` (keep the two in step: a
//! unit test checks every name appears there).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::json;

use super::target::{Kind, Rejection, Target};
use super::Ctx;

pub type CaseFut<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
pub type CaseFn = for<'a> fn(&'a mut dyn Target, &'a Ctx) -> CaseFut<'a>;

pub struct Case {
    pub name: &'static str,
    /// Only meaningful over gRPC (the gateway API has no such operation).
    pub grpc_only: bool,
    pub run: CaseFn,
}

macro_rules! need {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! case {
    ($name:ident, |$t:ident, $c:ident| $body:block) => {
        fn $name<'a>($t: &'a mut dyn Target, $c: &'a Ctx) -> CaseFut<'a> {
            Box::pin(async move { $body })
        }
    };
}

fn r<T>(x: Result<T, Rejection>, what: &str) -> Result<T, String> {
    x.map_err(|e| format!("{what}: refused: {e}"))
}

async fn session(t: &mut dyn Target, c: &Ctx, tag: &str) -> Result<String, String> {
    let (sid, _) = r(t.open(&c.id(tag), &c.env).await, "OpenSession")?;
    c.opened(&sid);
    Ok(sid)
}

/// A call that must be answered with a result.
async fn call(
    t: &mut dyn Target,
    sid: &str,
    id: &str,
    tool: &str,
    input: serde_json::Value,
) -> Result<super::target::Events, String> {
    r(
        t.call(sid, id, tool, &input.to_string(), false).await,
        &format!("{tool} call {id}"),
    )
}

async fn text(
    t: &mut dyn Target,
    sid: &str,
    id: &str,
    tool: &str,
    input: serde_json::Value,
) -> Result<String, String> {
    let e = call(t, sid, id, tool, input).await?;
    need!(
        !e.result.is_error,
        "{tool} {id}: unexpected is_error: {:?}",
        e.text()
    );
    Ok(e.text())
}

fn refused_with<T: std::fmt::Debug>(
    x: Result<T, Rejection>,
    reasons: &[&str],
    what: &str,
) -> Result<Rejection, String> {
    match x {
        Ok(v) => Err(format!(
            "{what}: expected a refusal ({reasons:?}), got {v:?}"
        )),
        Err(e) if reasons.contains(&e.reason.as_str()) => Ok(e),
        Err(e) => Err(format!("{what}: expected reason {reasons:?}, got {e}")),
    }
}

case!(info, |t, c| {
    let i = r(t.info().await, "Info")?;
    need!(
        i["worker_id"].as_str().is_some_and(|s| !s.is_empty()),
        "no worker_id: {i}"
    );
    need!(
        i["protocols"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "hands.v1")),
        "hands.v1 not among protocols: {i}"
    );
    let env = i["environments"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == c.env.as_str()));
    let Some(env) = env else {
        return Err(format!("environment {:?} not offered: {i}", c.env));
    };
    for tool in ["bash", "read", "write", "edit", "glob", "grep"] {
        need!(
            env["tools"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|x| x == tool)),
            "tool {tool} missing: {env}"
        );
    }
    Ok(())
});

case!(info_identifies_the_process, |t, _c| {
    let first = r(t.info().await, "Info")?;
    let again = r(t.info().await, "second Info")?;
    let id = first["instance_id"].as_str().unwrap_or_default();
    need!(
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "instance_id {id:?} is not 1 to 64 characters of [A-Za-z0-9._-]"
    );
    need!(
        again["instance_id"] == first["instance_id"],
        "instance_id changed between two Info calls: {id:?}, then {}",
        again["instance_id"]
    );
    Ok(())
});

case!(open_session_is_idempotent, |t, c| {
    let id = c.id("idem");
    let (sid, created) = r(t.open(&id, &c.env).await, "first OpenSession")?;
    c.opened(&sid);
    need!(
        created && sid == id,
        "first open: created={created}, id={sid}"
    );
    let (sid2, created2) = r(t.open(&id, &c.env).await, "repeated OpenSession")?;
    need!(
        !created2 && sid2 == id,
        "repeated open: created={created2}, id={sid2}"
    );
    Ok(())
});

case!(close_session_is_idempotent, |t, c| {
    let sid = session(t, c, "close").await?;
    need!(
        r(t.close(&sid).await, "CloseSession")?,
        "the first close said closed=false"
    );
    need!(
        !r(t.close(&sid).await, "repeated CloseSession")?,
        "the second close said closed=true"
    );
    refused_with(
        t.call(&sid, "after-close", "bash", r#"{"command":"true"}"#, false)
            .await,
        &["SESSION_NOT_FOUND"],
        "a call on a closed session",
    )?;
    Ok(())
});

case!(write_then_read, |t, c| {
    let sid = session(t, c, "rw").await?;
    text(
        t,
        &sid,
        "w",
        "write",
        json!({"file_path": "d/f.txt", "content": "alpha\nbeta\n"}),
    )
    .await?;
    let got = text(t, &sid, "r", "read", json!({"file_path": "d/f.txt"})).await?;
    need!(got == "alpha\nbeta\n", "read returned {got:?}");
    Ok(())
});

case!(edit_requires_a_unique_match, |t, c| {
    let sid = session(t, c, "edit").await?;
    text(
        t,
        &sid,
        "w",
        "write",
        json!({"file_path": "e.txt", "content": "x and x\n"}),
    )
    .await?;
    let e = call(
        t,
        &sid,
        "e1",
        "edit",
        json!({"file_path": "e.txt", "old_string": "x", "new_string": "y"}),
    )
    .await?;
    need!(
        e.result.is_error,
        "an ambiguous edit succeeded: {:?}",
        e.text()
    );
    text(
        t,
        &sid,
        "e2",
        "edit",
        json!({"file_path": "e.txt", "old_string": "x", "new_string": "y", "replace_all": true}),
    )
    .await?;
    let got = text(t, &sid, "r", "read", json!({"file_path": "e.txt"})).await?;
    need!(got == "y and y\n", "after replace_all: {got:?}");
    Ok(())
});

case!(glob_lists_matches, |t, c| {
    let sid = session(t, c, "glob").await?;
    for (i, f) in ["a.rs", "sub/b.rs", "c.txt"].iter().enumerate() {
        text(
            t,
            &sid,
            &format!("w{i}"),
            "write",
            json!({"file_path": f, "content": "x"}),
        )
        .await?;
    }
    let got = text(t, &sid, "g", "glob", json!({"pattern": "**/*.rs"})).await?;
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort();
    need!(
        lines.len() == 2 && lines[0].ends_with("/a.rs") && lines[1].ends_with("/sub/b.rs"),
        "glob returned {got:?}"
    );
    Ok(())
});

case!(grep_finds_lines, |t, c| {
    let sid = session(t, c, "grep").await?;
    text(
        t,
        &sid,
        "w",
        "write",
        json!({"file_path": "g.txt", "content": "hay\nneeedle\nhay\n"}),
    )
    .await?;
    let got = text(t, &sid, "g", "grep", json!({"pattern": "ne+dle"})).await?;
    need!(
        got.trim_end().ends_with("g.txt:2:neeedle") && got.lines().count() == 1,
        "grep returned {got:?}"
    );
    Ok(())
});

case!(bash_shell_persists, |t, c| {
    let sid = session(t, c, "shell").await?;
    text(
        t,
        &sid,
        "b1",
        "bash",
        json!({"command": "cd /tmp && export HANDS_CONF=7"}),
    )
    .await?;
    let got = text(
        t,
        &sid,
        "b2",
        "bash",
        json!({"command": "echo $PWD $HANDS_CONF"}),
    )
    .await?;
    need!(got == "/tmp 7", "the shell forgot: {got:?}");
    Ok(())
});

case!(bash_output_streams, |t, c| {
    let sid = session(t, c, "stream").await?;
    let e = r(
        t.call(
            &sid,
            "s",
            "bash",
            &json!({"command": "for i in 1 2 3; do echo $i; sleep 0.2; done"}).to_string(),
            true,
        )
        .await,
        "streamed call",
    )?;
    need!(
        e.output.len() >= 2,
        "expected output as it is produced, got {} event(s)",
        e.output.len()
    );
    let mut at = 0;
    let mut all = Vec::new();
    for (off, data) in &e.output {
        need!(
            *off == at,
            "output offset {off}, expected {at} (gap or repeat)"
        );
        at += data.len() as u64;
        all.extend_from_slice(data);
    }
    need!(
        all == b"1\n2\n3\n",
        "output {:?}",
        String::from_utf8_lossy(&all)
    );
    need!(e.text() == "1\n2\n3", "result {:?}", e.text());
    Ok(())
});

case!(tool_failure_is_a_result, |t, c| {
    let sid = session(t, c, "fail").await?;
    let e = call(t, &sid, "r", "read", json!({"file_path": "does/not/exist"})).await?;
    need!(
        e.result.is_error && !e.text().is_empty(),
        "expected an is_error result, got {:?}",
        e.result
    );
    Ok(())
});

case!(unknown_tool_is_a_result, |t, c| {
    let sid = session(t, c, "unknown").await?;
    let e = call(t, &sid, "u", "teleport", json!({})).await?;
    need!(
        e.result.is_error,
        "an unknown tool succeeded: {:?}",
        e.result
    );
    Ok(())
});

case!(non_object_input_is_a_result, |t, c| {
    let sid = session(t, c, "null").await?;
    let e = call(t, &sid, "n", "read", json!(null)).await?;
    need!(e.result.is_error, "a null input succeeded: {:?}", e.result);
    Ok(())
});

case!(bash_timeout_is_a_result, |t, c| {
    let sid = session(t, c, "timeout").await?;
    let e = call(
        t,
        &sid,
        "slow",
        "bash",
        json!({"command": "sleep 10", "timeout_ms": 300}),
    )
    .await?;
    need!(
        e.result.is_error && e.text().contains("timed out"),
        "expected a timeout result: {:?}",
        e.result
    );
    need!(e.outcome == "timed_out", "outcome {}", e.outcome);
    Ok(())
});

case!(repeated_call_id_does_not_rerun, |t, c| {
    let sid = session(t, c, "once").await?;
    let input = json!({"command": "echo x >> once.log; wc -l < once.log"});
    let first = call(t, &sid, "k", "bash", input.clone()).await?;
    let again = call(t, &sid, "k", "bash", input).await?;
    need!(first.text() == "1", "first run {:?}", first.text());
    need!(
        again.text() == "1",
        "the repeat answered {:?}",
        again.text()
    );
    if t.kind() == Kind::Grpc {
        need!(
            first.executed_now && !again.executed_now,
            "executed_now: first {}, repeat {}",
            first.executed_now,
            again.executed_now
        );
    }
    let log = text(t, &sid, "count", "read", json!({"file_path": "once.log"})).await?;
    need!(log == "x\n", "the command ran more than once: {log:?}");
    Ok(())
});

case!(call_id_with_other_input_is_refused, |t, c| {
    let sid = session(t, c, "conflict").await?;
    call(t, &sid, "k", "bash", json!({"command": "echo one"})).await?;
    refused_with(
        t.call(
            &sid,
            "k",
            "bash",
            &json!({"command": "echo two"}).to_string(),
            false,
        )
        .await,
        &["CALL_INPUT_MISMATCH"],
        "same id, other input",
    )?;
    Ok(())
});

case!(attach_after_disconnect, |t, c| {
    let sid = session(t, c, "attach").await?;
    let input = json!({"command": "sleep 1; echo ran >> att.log; echo finished"}).to_string();
    r(t.start_and_leave(&sid, "a", "bash", &input).await, "start")?;
    let e = r(t.attach(&sid, "a", 0).await, "Attach")?;
    need!(
        e.outcome == "completed" && e.text() == "finished",
        "after re-attaching: outcome {}, {:?}",
        e.outcome,
        e.text()
    );
    let log = text(t, &sid, "count", "read", json!({"file_path": "att.log"})).await?;
    need!(
        log == "ran\n",
        "the call ran {} time(s)",
        log.lines().count()
    );
    Ok(())
});

case!(attach_resumes_from_offset, |t, c| {
    let sid = session(t, c, "offset").await?;
    r(
        t.call(
            &sid,
            "p",
            "bash",
            &json!({"command": "printf abcdefghij"}).to_string(),
            true,
        )
        .await,
        "call",
    )?;
    let e = r(t.attach(&sid, "p", 4).await, "Attach from 4")?;
    let first = e.output.first().map(|(o, _)| *o);
    let all: Vec<u8> = e.output.iter().flat_map(|(_, d)| d.clone()).collect();
    need!(
        first == Some(4) && all == b"efghij",
        "from offset 4: first offset {first:?}, output {:?}",
        String::from_utf8_lossy(&all)
    );
    Ok(())
});

case!(attach_to_unknown_call, |t, c| {
    let sid = session(t, c, "noattach").await?;
    refused_with(
        t.attach(&sid, "never-started", 0).await,
        &["CALL_NOT_FOUND"],
        "Attach to an unknown call",
    )?;
    Ok(())
});

case!(cancel_kills_the_process_tree, |t, c| {
    let sid = session(t, c, "cancel").await?;
    let input = json!({"command": "sleep 60 & sleep 60 & wait"}).to_string();
    r(
        t.start_and_leave(&sid, "long", "bash", &input).await,
        "start",
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    need!(
        r(t.cancel(&sid, "long").await, "Cancel")?,
        "Cancel said cancelled=false"
    );
    let e = r(t.attach(&sid, "long", 0).await, "Attach")?;
    need!(
        e.outcome == "cancelled" && e.result.is_error,
        "outcome {} is_error {}",
        e.outcome,
        e.result.is_error
    );
    need!(
        !r(t.cancel(&sid, "long").await, "second Cancel")?,
        "cancelling a finished call said cancelled=true"
    );
    call(t, &sid, "restart", "bash", json!({"restart": true})).await?;
    let n = text(t, &sid, "count", "bash", json!({"command": "for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done | grep -c '^sleep$' || true"})).await?;
    need!(n == "0", "{n} sleep process(es) survived the cancel");
    Ok(())
});

case!(deadline_cancels_the_call, |t, c| {
    let sid = session(t, c, "deadline").await?;
    let input = json!({"command": "sleep 3; echo survived"}).to_string();
    let Some(x) = t
        .call_with_deadline(&sid, "dl", "bash", &input, Duration::from_millis(500))
        .await
    else {
        return Ok(());
    };
    match x {
        Err(e) if e.code == "DEADLINE_EXCEEDED" => {}
        other => return Err(format!("expected DEADLINE_EXCEEDED, got {other:?}")),
    }
    let e = r(t.attach(&sid, "dl", 0).await, "Attach")?;
    need!(
        e.outcome == "cancelled",
        "the call outlived its deadline: outcome {}, {:?}",
        e.outcome,
        e.text()
    );
    Ok(())
});

case!(error_session_not_found, |t, c| {
    let ghost = match t.kind() {
        Kind::Grpc => c.id("ghost"),
        Kind::Gateway => {
            // A real worker's id with a session that does not exist.
            let i = r(t.info().await, "info")?;
            format!(
                "{}:s{}",
                i["worker_id"].as_str().unwrap_or(""),
                c.id("ghost").replace([':', '-', '.'], "")
            )
        }
    };
    refused_with(
        t.call(&ghost, "x", "bash", r#"{"command":"true"}"#, false)
            .await,
        &["SESSION_NOT_FOUND"],
        "a call on no session",
    )?;
    Ok(())
});

case!(error_invalid_call_id, |t, c| {
    let sid = session(t, c, "badid").await?;
    refused_with(
        t.call(&sid, "bad id!", "bash", r#"{"command":"true"}"#, false)
            .await,
        &["INVALID_ID"],
        "a malformed call id",
    )?;
    Ok(())
});

case!(error_invalid_input_json, |t, c| {
    let sid = session(t, c, "badjson").await?;
    refused_with(
        t.call(&sid, "j", "bash", "{not json", false).await,
        &["INVALID_INPUT_JSON"],
        "input_json that is not JSON",
    )?;
    Ok(())
});

case!(error_unknown_environment, |t, c| {
    let reasons: &[&str] = match t.kind() {
        Kind::Grpc => &["UNKNOWN_ENVIRONMENT"],
        Kind::Gateway => &["NO_WORKER"],
    };
    refused_with(
        t.open(&c.id("noenv"), "no-such-environment").await,
        reasons,
        "OpenSession in no environment",
    )?;
    Ok(())
});

case!(payload_over_limit_is_refused, |t, c| {
    let sid = session(t, c, "huge").await?;
    let huge = "x".repeat(65 << 20);
    let x = t
        .call(
            &sid,
            "huge",
            "write",
            &json!({"file_path": "h", "content": huge}).to_string(),
            false,
        )
        .await;
    match x {
        // gRPC implementations differ (grpc-go: RESOURCE_EXHAUSTED, tonic:
        // OUT_OF_RANGE); the proto allows both.
        Err(e)
            if matches!(e.code.as_str(), "RESOURCE_EXHAUSTED" | "OUT_OF_RANGE")
                || e.reason == "PAYLOAD_TOO_LARGE" => {}
        other => {
            return Err(format!(
                "a 65 MiB message was not refused as too large: {:?}",
                other.map(|e| e.result)
            ))
        }
    }
    let after = text(
        t,
        &sid,
        "after",
        "bash",
        json!({"command": "echo still serving"}),
    )
    .await?;
    need!(after == "still serving", "after the refusal: {after:?}");
    Ok(())
});

case!(large_payload_round_trips, |t, c| {
    let sid = session(t, c, "big").await?;
    text(
        t,
        &sid,
        "w",
        "write",
        json!({"file_path": "big", "content": "y".repeat(8 << 20)}),
    )
    .await?;
    let n = text(t, &sid, "n", "bash", json!({"command": "wc -c < big"})).await?;
    need!(n == "8388608", "8 MiB written, {n} bytes on disk");
    Ok(())
});

case!(escape_host_secrets_unreadable, |t, c| {
    let sid = session(t, c, "shadow").await?;
    let got = call(t, &sid, "s", "bash", json!({"command": "cat /etc/shadow"}))
        .await?
        .text();
    need!(
        !got.contains("root:")
            && (got.contains("Permission denied") || got.contains("No such file")),
        "/etc/shadow: {got:?}"
    );
    Ok(())
});

case!(escape_runs_unprivileged, |t, c| {
    let sid = session(t, c, "uid").await?;
    let got = text(
        t,
        &sid,
        "u",
        "bash",
        json!({"command": "id -u; grep CapEff /proc/self/status"}),
    )
    .await?;
    let mut lines = got.lines();
    need!(lines.next() != Some("0"), "runs as root: {got:?}");
    need!(
        lines
            .next()
            .is_some_and(|l| l.ends_with("0000000000000000")),
        "has capabilities: {got:?}"
    );
    Ok(())
});

case!(escape_no_user_namespaces, |t, c| {
    let sid = session(t, c, "userns").await?;
    let got = call(
        t,
        &sid,
        "u",
        "bash",
        json!({"command": "unshare --user --map-root-user true; echo rc=$?"}),
    )
    .await?
    .text();
    need!(!got.ends_with("rc=0"), "created a user namespace: {got:?}");
    Ok(())
});

case!(escape_network_is_isolated, |t, c| {
    let sid = session(t, c, "net").await?;
    let got = text(
        t,
        &sid,
        "n",
        "bash",
        json!({"command": "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"}),
    )
    .await?;
    need!(
        got.lines().all(|l| l == "lo"),
        "interfaces besides lo: {got:?}"
    );
    Ok(())
});

case!(escape_host_processes_invisible, |t, c| {
    let sid = session(t, c, "pids").await?;
    let got = text(
        t,
        &sid,
        "p",
        "bash",
        json!({"command": "ls -d /proc/[0-9]* | wc -l; cat /proc/1/comm"}),
    )
    .await?;
    let n: usize = got
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(usize::MAX);
    need!(n < 32, "{n} processes visible: {got:?}");
    Ok(())
});

case!(escape_system_is_read_only, |t, c| {
    let sid = session(t, c, "ro").await?;
    let got = call(t, &sid, "w", "bash", json!({"command": "touch /usr/hands-conformance-probe; echo rc=$?; rm -f /usr/hands-conformance-probe 2>/dev/null"})).await?.text();
    need!(!got.contains("rc=0"), "wrote under /usr: {got:?}");
    let e = call(
        t,
        &sid,
        "w2",
        "write",
        json!({"file_path": "/etc/hands-conformance-probe", "content": "x"}),
    )
    .await?;
    need!(
        e.result.is_error,
        "the write tool wrote /etc/hands-conformance-probe"
    );
    Ok(())
});

/// The listed session `sid`, if any.
async fn listed(t: &mut dyn Target, sid: &str) -> Result<Option<serde_json::Value>, String> {
    let all = r(t.list().await, "ListSessions")?;
    Ok(all.into_iter().find(|s| s["session_id"] == sid))
}

fn field(s: &serde_json::Value, name: &str) -> u64 {
    s[name].as_u64().unwrap_or(u64::MAX)
}

case!(list_sessions_shows_open_sessions, |t, c| {
    let sid = session(t, c, "list").await?;
    text(t, &sid, "e", "bash", json!({"command": "echo listed"})).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Some(s) = listed(t, &sid).await? else {
        return Err(format!("the open session {sid} is not listed"));
    };
    need!(s["environment"] == c.env.as_str(), "environment: {s}");
    need!(field(&s, "running_calls") == 0, "running_calls: {s}");
    need!(field(&s, "calls") == 1, "calls: {s}");
    let (idle, age) = (field(&s, "idle_ms"), field(&s, "age_ms"));
    need!(
        (300..=60_000).contains(&idle) && idle <= age,
        "idle_ms {idle} after 400 ms without a call (age_ms {age}): {s}"
    );
    need!(
        r(t.close(&sid).await, "CloseSession")?,
        "the close said closed=false"
    );
    need!(
        listed(t, &sid).await?.is_none(),
        "the closed session {sid} is still listed"
    );
    Ok(())
});

case!(list_sessions_counts_running_calls, |t, c| {
    let sid = session(t, c, "running").await?;
    let input = json!({"command": "sleep 30"}).to_string();
    r(
        t.start_and_leave(&sid, "long", "bash", &input).await,
        "start",
    )?;
    let s = listed(t, &sid).await?.ok_or("the session is not listed")?;
    need!(
        field(&s, "running_calls") == 1 && field(&s, "idle_ms") == 0,
        "with a call running (its stream gone): {s}"
    );
    need!(
        r(t.cancel(&sid, "long").await, "Cancel")?,
        "Cancel said cancelled=false"
    );
    r(t.attach(&sid, "long", 0).await, "Attach")?;
    let s = listed(t, &sid).await?.ok_or("the session is not listed")?;
    need!(
        field(&s, "running_calls") == 0 && field(&s, "calls") == 1,
        "after the call ended: {s}"
    );
    Ok(())
});

// ---- egress ------------------------------------------------------------------

/// A session of the run's egress environment, or a skip.
async fn egress_session(
    t: &mut dyn Target,
    c: &Ctx,
    tag: &str,
) -> Result<(String, super::Egress), String> {
    let Some(e) = c.egress.clone() else {
        return Err(format!(
            "{}no egress environment given (--egress-env, --egress-url)",
            super::SKIP
        ));
    };
    let (sid, _) = r(t.open(&c.id(tag), &e.env).await, "OpenSession (egress)")?;
    c.opened(&sid);
    Ok((sid, e))
}

/// A bash command that sends `GET url` with `Host: host` to the session's
/// HTTP proxy (from `$HTTP_PROXY`, as any client finds it) and prints the
/// answer; needs nothing but bash and coreutils in the sandbox.
fn proxied_get(url: &str, host: &str) -> String {
    format!(
        "p=${{HTTP_PROXY#http://}}; p=${{p%/}}; \
         exec 3<>/dev/tcp/${{p%:*}}/${{p##*:}} || {{ echo 'no proxy at '$HTTP_PROXY; exit 0; }}; \
         printf 'GET {url} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' >&3; timeout 20 cat <&3; true"
    )
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// The answer is a 403 whose reason header names `host` and `port`.
fn denied_403(got: &str, host: &str, port: u16) -> Result<(), String> {
    let status = got.lines().next().unwrap_or("");
    need!(
        status.starts_with("HTTP/1.") && status.contains(" 403"),
        "expected a 403 from the proxy, got: {got:?}"
    );
    let header = got
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-hands-egress:"))
        .unwrap_or("");
    need!(
        header.contains(&format!("host={host}")) && header.contains(&format!("port={port}")),
        "the X-Hands-Egress header does not name {host}:{port}: {got:?}"
    );
    Ok(())
}

case!(egress_allowed_host_is_reached, |t, c| {
    let (sid, e) = egress_session(t, c, "eg-allow").await?;
    let got = text(
        t,
        &sid,
        "a",
        "bash",
        json!({"command": proxied_get(&e.url, &host_of(&e.url))}),
    )
    .await?;
    let status = got.lines().next().unwrap_or("");
    need!(
        status.starts_with("HTTP/1.") && (status.contains(" 2") || status.contains(" 3")),
        "{} is allowed but the answer was: {got:?}",
        e.url
    );
    Ok(())
});

case!(
    egress_denied_host_is_refused_with_a_403_naming_it,
    |t, c| {
        let (sid, _) = egress_session(t, c, "eg-deny").await?;
        let host = format!("{}.invalid", c.id("denied"));
        let got = text(
            t,
            &sid,
            "d",
            "bash",
            json!({"command": proxied_get(&format!("http://{host}/"), &host)}),
        )
        .await?;
        denied_403(&got, &host, 80)
    }
);

case!(egress_metadata_address_is_refused, |t, c| {
    let (sid, _) = egress_session(t, c, "eg-class").await?;
    let got = text(
        t,
        &sid,
        "m",
        "bash",
        json!({"command": proxied_get("http://169.254.169.254/latest/meta-data/", "169.254.169.254")}),
    )
    .await?;
    denied_403(&got, "169.254.169.254", 80)
});

case!(egress_resolver_refuses_an_unlisted_name, |t, c| {
    let (sid, _) = egress_session(t, c, "eg-dns").await?;
    let name = format!("{}.invalid", c.id("exfil"));
    let got = text(
        t,
        &sid,
        "r",
        "bash",
        json!({"command": format!("getent hosts {name}; echo rc=$?")}),
    )
    .await?;
    // getent: 2 is "not found"; an answer prints the address and exits 0.
    need!(
        got.lines().any(|l| l == "rc=2"),
        "the session resolver answered an unlisted name: {got:?}"
    );
    Ok(())
});

case!(egress_bash_result_names_each_denial, |t, c| {
    let (sid, e) = egress_session(t, c, "eg-note").await?;
    let host = format!("{}.invalid", c.id("noted"));
    // Only the status line of the proxy's answer is printed: the note must
    // come from the worker, not from the 403's body.
    let command = proxied_get(&format!("http://{host}/"), &host)
        .replace("timeout 20 cat <&3", "timeout 20 head -n 1 <&3");
    let got = text(t, &sid, "n", "bash", json!({ "command": command })).await?;
    let note = got.lines().last().unwrap_or("");
    need!(
        note.contains("denied") && note.contains(&e.env) && note.contains(&format!("{host}:80")),
        "the result does not end with a note naming {host}:80, the word denied and the environment: {got:?}"
    );
    Ok(())
});

/// Every case, in run order.
pub fn all() -> Vec<Case> {
    macro_rules! list {
        ($($name:ident),* $(,)?) => {
            vec![$(Case { name: stringify!($name), grpc_only: grpc_only(stringify!($name)), run: $name }),*]
        };
    }
    list![
        info,
        info_identifies_the_process,
        open_session_is_idempotent,
        close_session_is_idempotent,
        list_sessions_shows_open_sessions,
        list_sessions_counts_running_calls,
        write_then_read,
        edit_requires_a_unique_match,
        glob_lists_matches,
        grep_finds_lines,
        bash_shell_persists,
        bash_output_streams,
        tool_failure_is_a_result,
        unknown_tool_is_a_result,
        non_object_input_is_a_result,
        bash_timeout_is_a_result,
        repeated_call_id_does_not_rerun,
        call_id_with_other_input_is_refused,
        attach_after_disconnect,
        attach_resumes_from_offset,
        attach_to_unknown_call,
        cancel_kills_the_process_tree,
        deadline_cancels_the_call,
        error_session_not_found,
        error_invalid_call_id,
        error_invalid_input_json,
        error_unknown_environment,
        payload_over_limit_is_refused,
        large_payload_round_trips,
        escape_host_secrets_unreadable,
        escape_runs_unprivileged,
        escape_no_user_namespaces,
        escape_network_is_isolated,
        escape_host_processes_invisible,
        escape_system_is_read_only,
        egress_allowed_host_is_reached,
        egress_denied_host_is_refused_with_a_403_naming_it,
        egress_metadata_address_is_refused,
        egress_resolver_refuses_an_unlisted_name,
        egress_bash_result_names_each_denial,
    ]
}

fn grpc_only(name: &str) -> bool {
    matches!(
        name,
        "info_identifies_the_process"
            | "open_session_is_idempotent"
            | "deadline_cancels_the_call"
            | "error_invalid_input_json"
    )
}
