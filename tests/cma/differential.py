#!/usr/bin/env python3
"""Differential test through the control plane: the results hands posts equal, text
for text, those the official SDK worker posts for the same scripted session.

    differential.py [--hands PATH/TO/hands] [--verbose] [--keep] [--json FILE]

(default --hands: $CARGO_TARGET_DIR/debug/hands; needs root for hands' sandbox and
anthropic==2.10.0; about 25 s; `cargo test --test it cma_differential` runs it.)

One scripted session (the CALLS below, same event ids on both sides) is played
twice, each time on a fresh fake control plane (fake_cp.py, in process): once
served by the SDK's ``EnvironmentWorker`` (anthropic 2.10.0, sdk_worker.py, in a
process of its own, workdir = a fresh host directory) and once by ``hands worker
--config`` with only an ``[anthropic]`` table (workspace = ``/workspace`` inside the
session sandbox). Calls are appended one at a time as ``agent.tool_use`` events and
the next one only after the previous result was posted, as a model would. Then an
``end_turn`` idle ends the item.

Phases:
  setup     ``write`` calls and one ``bash`` call build the same fixture on both
            sides (nested text files, no trailing newline, a 3000-byte line, an
            empty file, invalid UTF-8, a dotfile, an ``.ignore``, a file over the
            262144-byte read cap, a text file with an image extension, symlinks
            inside / outside / dangling / to a directory, an empty directory), and
            give every entry its own mtime (glob sorts by mtime, newest first; a
            symlink ties with its target, so no glob case meets both). Their
            results are compared too.
  compared  read-only calls only: read, glob, grep and bash commands that change
            nothing, including invalid inputs (missing field, unknown field,
            wrong type) and a bash shell that times out / exits / is restarted.

Every posted ``user.tool_result`` is collected by ``tool_use_id``; in the SDK's
texts the workdir path is replaced by ``/workspace``; ``content`` (all blocks) and
``is_error`` must be equal for every id, except for the few calls in DELIBERATE,
which must differ (the reason is printed). Multi-file grep output is compared as
sorted lines (rg searches files in parallel; hands prints in path order: a
documented difference of order only).

Prints one line per call and a summary; on any difference a unified diff of the
two texts; exits 1 on any unexpected difference or missing result, 2 on a setup
failure (fake, SDK or hands not starting).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True

from fake_cp import FakeControlPlane  # noqa: E402
from workers import start_hands, start_sdk, stop_process  # noqa: E402

WORKDIR = "@WORKDIR@"  # replaced in inputs by the SDK's workdir or /workspace
HANDS_ROOT = "/workspace"
MAX_IDLE = 2

# ---------------------------------------------------------------------------
# the scripted session
# ---------------------------------------------------------------------------

BIG_LINES = 30000  # "lorem ipsum dolor\n" x 30000 = 540000 bytes, over the read cap

MTIMES = (
    # every entry gets its own mtime, after all writes (writing into a directory
    # changes its mtime), in an order unrelated to names (the i-th name in sorted
    # order gets slot 37*i mod 101, distinct for i < 101), so a name-sorted result
    # cannot pass for a time-sorted one; -h: a symlink's own mtime, never its
    # target's (out_link points at /etc/passwd)
    "i=0; find . -mindepth 1 -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' f; do "
    "i=$((i+1)); touch -h -d \"@$((1700000000 + (i*37 % 101)*10))\" \"$f\"; done"
)

SETUP = [
    ("w_a", "write", {"file_path": "a.txt", "content": "alpha\nbeta\ngamma\nbeta\n"}),
    ("w_b", "write", {"file_path": "b.txt", "content": "bee\n"}),
    ("w_guide", "write", {"file_path": "docs/guide.md", "content": "# Guide\n\nSee alpha.\nTODO: more\n"}),
    ("w_ref", "write", {"file_path": "docs/api/ref.md", "content": "ref line 1\nref line 2\nalpha in ref\n"}),
    ("w_main", "write", {"file_path": "src/main.rs", "content": "fn main() {\n    println!(\"alpha\");\n}\n"}),
    ("w_noeol", "write", {"file_path": "noeol.txt", "content": "first\nsecond\nno newline at end"}),
    ("w_long", "write", {"file_path": "long.txt", "content": "x" * 3000 + " alpha\nshort\n"}),
    ("w_empty", "write", {"file_path": "empty.txt", "content": ""}),
    ("w_hidden", "write", {"file_path": ".hidden", "content": "secret alpha\n"}),
    ("w_unicode", "write", {"file_path": "unicode.txt", "content": "h\u00e9llo w\u00f6rld \u2713\nemoji \U0001f389 alpha\n"}),
    ("w_crlf", "write", {"file_path": "crlf.txt", "content": "one\r\ntwo\r\n"}),
    ("w_pic", "write", {"file_path": "pic.JPG", "content": "not really a jpeg\n"}),
    ("w_ignore", "write", {"file_path": ".ignore", "content": "ignored.txt\n"}),
    ("w_ignored", "write", {"file_path": "ignored.txt", "content": "alpha ignored\n"}),
    ("w_space", "write", {"file_path": "sub dir/space name.txt", "content": "spaced alpha\n"}),
    ("w_abs", "write", {"file_path": WORKDIR + "/docs/abs.md", "content": "written by absolute path\n"}),
    ("b_setup", "bash", {"command": (
        "printf 'ok\\xff\\xfebad\\n' > invalid.txt && "
        f"yes 'lorem ipsum dolor' | head -n {BIG_LINES} > big.txt && "
        "ln -s docs/guide.md link.txt && ln -s ../docs src/docs_link && ln -s /etc/passwd out_link && "
        "ln -s missing_target dangling && "
        "mkdir emptydir && " + MTIMES)}),
]

READ = [
    ("r_whole", "read", {"file_path": "a.txt"}),
    ("r_abs", "read", {"file_path": WORKDIR + "/a.txt"}),
    ("r_range", "read", {"file_path": "a.txt", "view_range": [2, 3]}),
    ("r_range_to_end", "read", {"file_path": "a.txt", "view_range": [2, 0]}),
    ("r_range_neg_end", "read", {"file_path": "a.txt", "view_range": [3, -1]}),
    ("r_range_start0", "read", {"file_path": "a.txt", "view_range": [0, 1]}),
    ("r_range_empty", "read", {"file_path": "a.txt", "view_range": [5, 2]}),
    ("r_range_past_end", "read", {"file_path": "a.txt", "view_range": [10, 20]}),
    ("r_range_strings", "read", {"file_path": "a.txt", "view_range": ["2", "3"]}),
    ("r_range_float", "read", {"file_path": "a.txt", "view_range": [2.0, 3]}),
    ("r_range_bad_float", "read", {"file_path": "a.txt", "view_range": [1.5, 3]}),
    ("r_range_one", "read", {"file_path": "a.txt", "view_range": [1]}),
    ("r_range_three", "read", {"file_path": "a.txt", "view_range": [1, 2, 3]}),
    ("r_range_empty_list", "read", {"file_path": "a.txt", "view_range": []}),
    ("r_range_wrong_type", "read", {"file_path": "a.txt", "view_range": "1-2"}),
    ("r_range_missing_file", "read", {"file_path": "nope.txt", "view_range": [1]}),
    ("r_noeol", "read", {"file_path": "noeol.txt"}),
    ("r_noeol_last", "read", {"file_path": "noeol.txt", "view_range": [3, 3]}),
    ("r_long", "read", {"file_path": "long.txt"}),
    ("r_empty", "read", {"file_path": "empty.txt"}),
    ("r_empty_range", "read", {"file_path": "empty.txt", "view_range": [1, 1]}),
    ("r_hidden", "read", {"file_path": ".hidden"}),
    ("r_unicode", "read", {"file_path": "unicode.txt"}),
    ("r_crlf", "read", {"file_path": "crlf.txt"}),
    ("r_crlf_line", "read", {"file_path": "crlf.txt", "view_range": [1, 1]}),
    ("r_invalid_utf8", "read", {"file_path": "invalid.txt"}),
    ("r_invalid_utf8_range", "read", {"file_path": "invalid.txt", "view_range": [1, 1]}),
    ("r_big", "read", {"file_path": "big.txt"}),
    ("r_big_range", "read", {"file_path": "big.txt", "view_range": [2, 3]}),
    ("r_big_range_too_much", "read", {"file_path": "big.txt", "view_range": [1, 0]}),
    ("r_image_ext", "read", {"file_path": "pic.JPG"}),
    ("r_image_ext_range", "read", {"file_path": "pic.JPG", "view_range": [1, 1]}),
    ("r_space", "read", {"file_path": "sub dir/space name.txt"}),
    ("r_written_abs", "read", {"file_path": "docs/abs.md"}),
    ("r_dotdot_inside", "read", {"file_path": "docs/../a.txt"}),
    ("r_trailing_slash", "read", {"file_path": "a.txt/"}),
    ("r_link", "read", {"file_path": "link.txt"}),
    ("r_through_dir_link", "read", {"file_path": "src/docs_link/guide.md"}),
    ("r_link_outside", "read", {"file_path": "out_link"}),
    ("r_dangling", "read", {"file_path": "dangling"}),
    ("r_missing", "read", {"file_path": "nope.txt"}),
    ("r_missing_dir", "read", {"file_path": "nodir/nope.txt"}),
    ("r_not_a_dir", "read", {"file_path": "a.txt/x"}),
    ("r_directory", "read", {"file_path": "docs"}),
    ("r_workspace", "read", {"file_path": "."}),
    ("r_empty_path", "read", {"file_path": ""}),
    ("r_etc_passwd", "read", {"file_path": "/etc/passwd"}),
    ("r_dotdot", "read", {"file_path": "../x"}),
    ("r_dotdot_quote", "read", {"file_path": "../it's"}),
    ("r_dotdot_newline", "read", {"file_path": "../a\nb"}),
    ("r_missing_field", "read", {}),
    ("r_unknown_field", "read", {"file_path": "a.txt", "offset": 1, "limit": 2}),
    ("r_wrong_type", "read", {"file_path": 5}),
    ("r_null_path", "read", {"file_path": None}),
]

GLOB = [
    ("g_txt", "glob", {"pattern": "*.txt"}),
    ("g_star", "glob", {"pattern": "*"}),
    ("g_dot", "glob", {"pattern": ".*"}),
    ("g_md_recursive", "glob", {"pattern": "**/*.md"}),
    ("g_txt_recursive", "glob", {"pattern": "**/*.txt"}),
    ("g_dirs_only", "glob", {"pattern": "**"}),
    ("g_docs_trailing", "glob", {"pattern": "docs/**"}),
    ("g_nested", "glob", {"pattern": "docs/*/*.md"}),
    ("g_subdir_star", "glob", {"pattern": "src/*"}),
    ("g_through_dir_link", "glob", {"pattern": "*.md", "path": "src/docs_link"}),
    ("g_pattern_through_dir_link", "glob", {"pattern": "src/docs_link/*.md"}),
    ("g_question", "glob", {"pattern": "?.txt"}),
    ("g_class", "glob", {"pattern": "[ab].txt"}),
    ("g_brace_literal", "glob", {"pattern": "{a,b}.txt"}),
    ("g_no_match", "glob", {"pattern": "*.xyz"}),
    ("g_path", "glob", {"pattern": "*.md", "path": "docs"}),
    ("g_path_abs", "glob", {"pattern": "**/*.md", "path": WORKDIR + "/docs"}),
    ("g_path_space", "glob", {"pattern": "*", "path": "sub dir"}),
    ("g_path_missing", "glob", {"pattern": "*", "path": "nope"}),
    ("g_path_file", "glob", {"pattern": "*", "path": "a.txt"}),
    ("g_path_empty_dir", "glob", {"pattern": "*", "path": "emptydir"}),
    ("g_path_outside", "glob", {"pattern": "*", "path": "/etc"}),
    ("g_path_link_outside", "glob", {"pattern": "*", "path": "out_link"}),
    ("g_path_dotdot", "glob", {"pattern": "*", "path": ".."}),
    ("g_abs_pattern", "glob", {"pattern": "/etc/*"}),
    ("g_dotdot_pattern", "glob", {"pattern": "../*"}),
    ("g_empty_pattern", "glob", {"pattern": ""}),
    ("g_missing_field", "glob", {}),
    ("g_unknown_field", "glob", {"pattern": "*", "bogus": True}),
    ("g_wrong_type", "glob", {"pattern": 3}),
]

GREP = [
    ("s_literal", "grep", {"pattern": "alpha"}),
    ("s_regex", "grep", {"pattern": "^ref line \\d$"}),
    ("s_dir", "grep", {"pattern": "alpha", "path": "docs"}),
    ("s_dir_abs", "grep", {"pattern": "alpha", "path": WORKDIR + "/docs"}),
    ("s_single_file", "grep", {"pattern": "beta", "path": "a.txt"}),
    ("s_alternation", "grep", {"pattern": "beta|gamma", "path": "a.txt"}),
    ("s_no_match", "grep", {"pattern": "zzz_no_match"}),
    ("s_case_sensitive", "grep", {"pattern": "ALPHA"}),
    ("s_hidden_skipped", "grep", {"pattern": "secret"}),
    ("s_hidden_explicit", "grep", {"pattern": "secret", "path": ".hidden"}),
    ("s_dot_ignore", "grep", {"pattern": "ignored"}),
    ("s_unicode", "grep", {"pattern": "w\u00f6rld"}),
    ("s_crlf_anchor", "grep", {"pattern": "two$", "path": "crlf.txt"}),
    ("s_invalid_utf8", "grep", {"pattern": "bad", "path": "invalid.txt"}),
    ("s_long_line", "grep", {"pattern": "alpha", "path": "long.txt"}),
    ("s_space_path", "grep", {"pattern": "spaced", "path": "sub dir"}),
    ("s_truncated", "grep", {"pattern": "lorem", "path": "big.txt"}),
    ("s_through_dir_link", "grep", {"pattern": "alpha", "path": "src/docs_link"}),
    ("s_link_file", "grep", {"pattern": "TODO", "path": "link.txt"}),
    ("s_bad_regex", "grep", {"pattern": "("}),
    ("s_bad_class", "grep", {"pattern": "[z-a]"}),
    ("s_missing_path", "grep", {"pattern": "alpha", "path": "nope"}),
    ("s_outside", "grep", {"pattern": "root", "path": "/etc"}),
    ("s_link_outside", "grep", {"pattern": "root", "path": "out_link"}),
    ("s_missing_field", "grep", {}),
    ("s_unknown_field", "grep", {"pattern": "alpha", "bogus": 1}),
    ("s_wrong_type", "grep", {"pattern": ["alpha"]}),
    ("s_output_mode", "grep", {"pattern": "alpha", "output_mode": "files_with_matches"}),
]

BASH = [
    ("b_cat", "bash", {"command": "cat a.txt"}),
    ("b_wc", "bash", {"command": "wc -l < a.txt"}),
    ("b_arith", "bash", {"command": "echo $((1+2))"}),
    ("b_true", "bash", {"command": "true"}),
    ("b_false", "bash", {"command": "false"}),
    ("b_false_status", "bash", {"command": "false; echo $?"}),
    ("b_grep_status", "bash", {"command": "grep -q zzz a.txt"}),
    ("b_missing_cmd", "bash", {"command": "no_such_command_xyz"}),
    ("b_missing_cmd_again", "bash", {"command": "echo before; no_such_command_xyz"}),
    ("b_stderr", "bash", {"command": "echo oops >&2"}),
    ("b_interleaved", "bash", {"command": "echo out; echo err >&2; echo out2"}),
    ("b_ansi", "bash", {"command": "printf '\\033[31mred\\033[0m\\n'"}),
    ("b_trailing_newlines", "bash", {"command": "printf 'a\\n\\n\\n'"}),
    ("b_leading_blank", "bash", {"command": "printf '\\n\\n  lead\\n'"}),
    ("b_pwd", "bash", {"command": "pwd"}),
    ("b_cd", "bash", {"command": "cd docs && pwd"}),
    ("b_cwd_persists", "bash", {"command": "pwd; cat guide.md"}),
    ("b_cd_back", "bash", {"command": "cd - >/dev/null; pwd"}),
    ("b_var_set", "bash", {"command": "X=41"}),
    ("b_var_get", "bash", {"command": "echo $((X+1))"}),
    ("b_func_def", "bash", {"command": "f() { echo \"f:$1\"; }; f z"}),
    ("b_func_persists", "bash", {"command": "f y"}),
    ("b_invalid_utf8", "bash", {"command": "cat invalid.txt"}),
    ("b_noeol", "bash", {"command": "cat noeol.txt"}),
    ("b_find", "bash", {"command": "find . -name '*.md' | LC_ALL=C sort"}),
    ("b_wc_files", "bash", {"command": "wc -c a.txt noeol.txt empty.txt long.txt"}),
    ("b_stdin_eof", "bash", {"command": "cat"}),
    ("b_symlink", "bash", {"command": "readlink link.txt out_link dangling"}),
    ("b_big_output", "bash", {"command": "head -c 150000 /dev/zero | tr '\\0' x; echo; echo tail"}),
    ("b_timeout_string", "bash", {"command": "echo coerced", "timeout_ms": "5000"}),
    ("b_missing_command", "bash", {}),
    ("b_empty_command", "bash", {"command": ""}),
    ("b_null_command", "bash", {"command": None}),
    ("b_unknown_field", "bash", {"command": "echo x", "bogus": 1}),
    ("b_wrong_type", "bash", {"command": 5}),
    ("b_bad_timeout", "bash", {"command": "echo x", "timeout_ms": "soon"}),
    ("b_timeout", "bash", {"command": "sleep 5", "timeout_ms": 300}),
    ("b_dead_after_timeout", "bash", {"command": "echo alive?"}),
    ("b_restart", "bash", {"restart": True}),
    ("b_after_restart", "bash", {"command": "echo $((1+2)) \"[$X]\"; no_such_command_xyz"}),
    ("b_syntax_error", "bash", {"command": "echo ("}),
    ("b_dead_after_syntax", "bash", {"command": "echo alive?"}),
    ("b_restart_truthy", "bash", {"restart": "yes", "command": "echo ignored"}),
    ("b_exit", "bash", {"command": "echo oops >&2; exit 3"}),
    ("b_dead_after_exit", "bash", {"command": "echo alive?"}),
    ("b_restart_again", "bash", {"restart": True}),
    ("b_exit_zero", "bash", {"command": "exit 0"}),
    ("b_restart_last", "bash", {"restart": True}),
    ("b_final", "bash", {"command": "echo done"}),
]

COMPARED = READ + GLOB + GREP + BASH
CALLS = [("setup",) + c for c in SETUP] + [("compared",) + c for c in COMPARED]

# Calls whose texts differ ON PURPOSE (README "where hands differs from the SDK
# worker"). They still run on both sides; they must differ, and both texts are shown.
DELIBERATE = {
    "s_output_mode": "hands accepts grep's documented optional extensions (output_mode, -i, -n, -A/-B/-C, "
                     "glob, type, multiline, head_limit); the SDK rejects every unknown field",
}

# Calls where the SDK worker itself answers one of two texts depending on timing:
# after a syntax error kills the shell, the next call reports the dead session if
# the SDK has noticed the exit, else the write to the dead shell's stdin fails
# first (anyio's BrokenResourceError). The second is a race inside the SDK; when
# the SDK shows it, hands is compared with the first, which is what the SDK
# answers when it wins the race. After `exit 3` the same race has a third face:
# the SDK has not reaped the shell yet (`closed` is its returncode), its write
# lands in the dead pipe's buffer and its read meets end of file at once, an
# error with no output (seen once in CI under load).
SDK_RACES = {
    "b_dead_after_syntax": {"BrokenResourceError()": "bash: bash session terminated; restart required"},
    "b_dead_after_exit": {
        "BrokenResourceError()": "bash: bash session terminated; restart required",
        "": "bash: bash session terminated; restart required",
    },
}

# Multi-file grep output: rg searches files in parallel, hands prints in path order.
UNORDERED = {"s_literal", "s_regex", "s_dir", "s_dir_abs", "s_dot_ignore", "s_hidden_skipped",
             "s_case_sensitive", "s_unicode", "s_space_path", "s_through_dir_link"}

# Not in the session at all (these would not be comparable; listed for honesty):
#  - a null / string / list tool input: the SDK's runner raises outside its error
#    handling and fails the whole work item (contract §12.11); hands answers
#    ValueError(...) with is_error (README). Sending one would end the SDK's session.
#  - bash reading the environment, $HOME, ids, /proc, the network or host files
#    (`cat /etc/passwd`): hands runs bash in a sandbox with a fixed environment, the
#    SDK on the host (contract §10). The file tools' confinement texts ARE compared.

# ---------------------------------------------------------------------------
# running one side
# ---------------------------------------------------------------------------


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def substitute(v, root):
    if isinstance(v, str):
        return v.replace(WORKDIR, root)
    if isinstance(v, list):
        return [substitute(x, root) for x in v]
    if isinstance(v, dict):
        return {k: substitute(x, root) for k, x in v.items()}
    return v


class Fake:
    def __init__(self):
        self.fake = FakeControlPlane(port=0).start()
        self.url = self.fake.url

    def call(self, method, path, body=None, **query):
        st, b = self.fake.control(method, path, body, {k: str(v) for k, v in query.items()})
        if st >= 300:
            raise RuntimeError(f"control {method} {path} -> {st}: {b}")
        return b

    def stop(self):
        self.fake.stop()


def play(fake, env_id, root, verbose=False):
    """Plays CALLS on a fresh session; returns {id: result event}, the work view."""
    r = fake.call("POST", "/_fake/sessions", {"environment_id": env_id, "work": {"ttl_seconds": 60}})
    sid, wid = r["session"]["id"], r["work"]["id"]
    results = {}
    for i, (phase, cid, tool, inp) in enumerate(CALLS):
        ev = {"type": "agent.tool_use", "id": "toolu_" + cid, "name": tool, "input": substitute(inp, root)}
        fake.call("POST", f"/_fake/sessions/{sid}/events", {"events": [ev]})
        got = fake.call("GET", f"/_fake/sessions/{sid}/events", type="user.tool_result", wait_count=i + 1,
                        timeout_ms=60000 if i == 0 else 30000)
        if got.get("timed_out"):
            raise RuntimeError(f"no result for {cid} within the timeout (results so far: {len(got['data'])})")
        for e in got["data"]:
            results[e["tool_use_id"]] = e
        if verbose:
            e = results.get(ev["id"])
            log(f"  {cid}: {json.dumps(e and e['content'])[:200]}")
    fake.call("POST", f"/_fake/sessions/{sid}/events",
              {"events": [{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}]})
    w = fake.call("GET", f"/_fake/work/{wid}", wait_state="stopped", timeout_ms=(MAX_IDLE + 15) * 1000)
    all_events = fake.call("GET", f"/_fake/sessions/{sid}")["events"]
    posted = [e for e in all_events if e["_origin"] == "client"]
    return results, w, posted


def run_side(name, hands, tmp, verbose):
    fake = Fake()
    proc = None
    try:
        env = fake.call("POST", "/_fake/environments", {})
        if name == "sdk":
            workdir = os.path.realpath(os.path.join(tmp, "sdk-workdir"))
            os.makedirs(workdir)
            proc, logname = start_sdk(fake.url, env, tmp, workdir, MAX_IDLE)
            root = workdir
        else:
            proc, logname = start_hands(fake.url, env, tmp, hands, "diff-worker", MAX_IDLE)
            root = HANDS_ROOT
        t0 = time.monotonic()
        try:
            results, work, posted = play(fake, env["id"], root, verbose)
        except Exception:
            log(f"--- {name} worker log ({logname}) ---")
            log(open(logname).read()[-4000:])
            raise
        dt = time.monotonic() - t0
        return {"results": results, "work": work, "posted": posted, "root": root, "seconds": dt,
                "log": logname}
    finally:
        if proc is not None:
            stop_process(proc)
        fake.stop()


# ---------------------------------------------------------------------------
# comparing
# ---------------------------------------------------------------------------


def normalise(content, root, unordered):
    out = json.loads(json.dumps(content))
    for b in out:
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            t = b["text"]
            if root != HANDS_ROOT:
                t = t.replace(root, HANDS_ROOT)
            if unordered:
                trailing = t.endswith("\n")
                t = "\n".join(sorted(t.split("\n")[:-1] if trailing else t.split("\n"))) + ("\n" if trailing else "")
            b["text"] = t
    return out


def text(content):
    parts = []
    for b in content or []:
        parts.append(b["text"] if b.get("type") == "text" else json.dumps(b, sort_keys=True))
    return "\n".join(parts)


def short(s, n=60):
    s = json.dumps(s, ensure_ascii=False)[1:-1]
    return s if len(s) <= n else s[: n - 3] + "..."


def compare(sdk, hands):
    rows, unexpected, deliberate_ok = [], [], 0
    for phase, cid, tool, inp in CALLS:
        tid = "toolu_" + cid
        a, b = sdk["results"].get(tid), hands["results"].get(tid)
        if a is None or b is None:
            rows.append((phase, cid, "MISSING", f"sdk={'yes' if a else 'no'} hands={'yes' if b else 'no'}"))
            unexpected.append((cid, tool, inp, a, b, None, None))
            continue
        un = cid in UNORDERED
        ca, cb = normalise(a["content"], sdk["root"], un), normalise(b["content"], hands["root"], un)
        raced = SDK_RACES.get(cid, {}).get(text(ca))
        if raced is not None:
            ca = [{"type": "text", "text": raced}]
        equal = ca == cb and a["is_error"] == b["is_error"]
        if cid in DELIBERATE:
            status = "DELIB" if not equal else "EQUAL?"
            if equal:
                unexpected.append((cid, tool, inp, a, b, ca, cb))
            else:
                deliberate_ok += 1
        else:
            status = ("same*" if raced is not None else "same") if equal else "DIFF"
            if not equal:
                unexpected.append((cid, tool, inp, a, b, ca, cb))
        rows.append((phase, cid, status, f"is_error={str(a['is_error']).lower():5} {short(text(ca))}"))
    return rows, unexpected, deliberate_ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hands", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "hands"))
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, SDK workdir)")
    ap.add_argument("--json", help="write both sides' results to this file")
    a = ap.parse_args()
    ids = [c[1] for c in CALLS]
    assert len(ids) == len(set(ids)), "duplicate call ids"
    assert set(DELIBERATE) <= set(ids) and UNORDERED <= set(ids) and set(SDK_RACES) <= set(ids)
    if not os.access(a.hands, os.X_OK):
        log(f"differential: no hands binary at {a.hands}")
        return 2
    for k in list(os.environ):
        if k.startswith("ANTHROPIC_"):
            del os.environ[k]
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    tmp = tempfile.mkdtemp(prefix="hands-cma-diff-")
    try:
        try:
            log(f"differential: {len(CALLS)} calls ({len(SETUP)} setup, {len(COMPARED)} read-only), SDK worker ...")
            sdk = run_side("sdk", a.hands, tmp, a.verbose)
            log(f"differential: SDK side done in {sdk['seconds']:.1f}s; hands worker ...")
            hands = run_side("hands", a.hands, tmp, a.verbose)
            log(f"differential: hands side done in {hands['seconds']:.1f}s")
        except Exception as e:  # noqa: BLE001
            log(f"differential: SETUP FAILURE: {e}")
            return 2
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"sdk": sdk, "hands": hands}, f, indent=1)
        rows, unexpected, deliberate_ok = compare(sdk, hands)
        w = max(len(r[1]) for r in rows)
        print(f"{'phase':8} {'call':{w}} {'result':7} text (SDK, normalised)")
        for phase, cid, status, detail in rows:
            print(f"{phase:8} {cid:{w}} {status:7} {detail}")
        # Both workers must also have posted exactly one result per call and ended the item.
        problems = []
        for side in (sdk, hands):
            name = "SDK" if side is sdk else "hands"
            n = len(side["posted"])
            if n != len(CALLS):
                problems.append(f"{name} posted {n} events for {len(CALLS)} calls")
            if side["work"].get("state") != "stopped":
                problems.append(f"{name}: the item did not end after the end_turn idle ({side['work'].get('state')})")
        for cid, tool, inp, ra, rb, ca, cb in unexpected:
            print(f"\n=== {cid}: {tool} {json.dumps(inp, ensure_ascii=False)}"
                  + (f"  [deliberate: {DELIBERATE[cid]}]" if cid in DELIBERATE else ""))
            if ra is None or rb is None:
                print(f"    missing result: sdk={ra is not None} hands={rb is not None}")
                continue
            print(f"    is_error: sdk={ra['is_error']} hands={rb['is_error']}")
            ta, tb = text(ca), text(cb)
            if ta == tb:
                print("    texts equal (blocks differ):", json.dumps(ca)[:300], "vs", json.dumps(cb)[:300])
            diff = difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True),
                                        "sdk", "hands", n=2)
            sys.stdout.writelines(x if x.endswith("\n") else x + "\n\\ No newline at end of file\n" for x in diff)
        for cid in DELIBERATE:
            for _, c, status, _ in rows:
                if c == cid and status == "DELIB":
                    tid = "toolu_" + cid
                    print(f"\ndeliberate difference {cid}: {DELIBERATE[cid]}\n"
                          f"    sdk:   {short(text(sdk['results'][tid]['content']), 200)}\n"
                          f"    hands: {short(text(hands['results'][tid]['content']), 200)}")
        for p in problems:
            print("PROBLEM:", p)
        same = sum(1 for r in rows if r[2] == "same")
        print(f"\ndifferential: {len(rows)} calls, {same} identical, {deliberate_ok} deliberate differences, "
              f"{len(unexpected)} unexpected; SDK side {sdk['seconds']:.1f}s, hands side {hands['seconds']:.1f}s")
        return 1 if unexpected or problems else 0
    finally:
        if a.keep:
            log(f"differential: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
