#!/usr/bin/env python3
"""Tool round trip through the fake control plane: hands vs the official SDK worker.

    benches/cma_roundtrip.py [--n 200] [--warmup 20] [--hands PATH] [--json]
                             [--workers sdk,hands] [--tools bash,read]

For each worker, on the same scenario: the fake control plane (tests/cma/fake_cp.py)
runs as a process of its own; the worker is started against a fresh environment
(the SDK's ``EnvironmentWorker``, anthropic 2.10.0, through tests/cma/sdk_worker.py in
its own process, workdir = a fresh host directory; hands as ``hands worker --config``
with only an ``[anthropic]`` table); one session is created and the worker attaches.
A ``write`` creates a 1 KiB file, then ``--warmup`` rounds of each tool run
unmeasured, then ``--n`` sequential rounds per tool:

    bash   {"command": "true"}
    read   {"file_path": "small.txt"}   (1 KiB of text)

One round = the driver appends one ``agent.tool_use`` event through the fake's
control API and waits (long-poll) for the worker's ``user.tool_result``. The
round trip is measured on the fake's clock, between the time the fake stored the
tool_use event (just before writing it to the worker's open event stream) and the
time it stored the posted result (after reading and validating the worker's E8
request): stream delivery, the worker's dispatch, the tool, the result post. The
driver's own overhead is outside the interval, and the next round starts only
after the previous result was stored.

Prints p50 and p99 (nearest rank) per tool per worker and the ratio hands/SDK;
``--json`` prints the figures as JSON instead (with ``--samples``, every round).
Needs root (hands' sandbox) and Python with anthropic==2.10.0. Build hands first:
``cargo build --release --bin hands`` (default PATH: $CARGO_TARGET_DIR/release/hands).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMA = os.path.join(ROOT, "tests", "cma")
sys.path.insert(0, CMA)
sys.dont_write_bytecode = True
from workers import control, start_hands, start_sdk, stop_process  # noqa: E402
SMALL = "".join(f"line {i:03d} of a small text file for the read round trip ".ljust(63, ".") + "\n" for i in range(16))
assert len(SMALL) == 1024

TOOLS = {
    "bash": ("bash", {"command": "true"}),
    "read": ("read", {"file_path": "small.txt"}),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Fake:
    """The fake control plane as a process, driven over its HTTP control API."""

    def __init__(self, nodelay=True):
        # With nodelay, the fake's sockets get TCP_NODELAY (as production HTTP servers
        # set it): the fake as shipped writes with Nagle on, so an SSE event written
        # while the worker still owes the ACK of the previous one waits for the
        # worker's delayed ACK (~40 ms on Linux) and swamps what is measured here.
        code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.dont_write_bytecode = True; import fake_cp; "
                f"fake_cp.Handler.disable_nagle_algorithm = {bool(nodelay)}; "
                "sys.exit(fake_cp.main(sys.argv[2:]))")
        self.p = subprocess.Popen([sys.executable, "-c", code, CMA, "--port", "0"],
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.p.kill()
            raise RuntimeError(f"the fake said {line!r}")
        self.url = "http://" + line[len("listening on "):]

    def call(self, method, path, body=None, **query):
        return control(self.url, method, path, body, **query)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def start_worker(kind, fake, env, tmp, hands):
    if kind == "sdk":
        workdir = os.path.realpath(os.path.join(tmp, "sdk-workdir"))
        os.makedirs(workdir)
        return start_sdk(fake.url, env, tmp, workdir, 2)
    return start_hands(fake.url, env, tmp, hands, "bench-worker", 2)


class Session:
    def __init__(self, fake, env_id):
        self.fake = fake
        r = fake.call("POST", "/_fake/sessions", {"environment_id": env_id, "work": {"ttl_seconds": 300}})
        self.sid, self.wid = r["session"]["id"], r["work"]["id"]
        self.index = 0  # events in the session's log so far
        self.seq = 0

    def round(self, tool, inp, timeout=60.0):
        """One tool_use -> result; returns (seconds on the fake's clock, result event)."""
        self.seq += 1
        tid = f"toolu_{tool}_{self.seq:05d}"
        ev = {"type": "agent.tool_use", "id": tid, "name": tool, "input": inp}
        since = self.index
        self.fake.call("POST", f"/_fake/sessions/{self.sid}/events", {"events": [ev]})
        got = self.fake.call("GET", f"/_fake/sessions/{self.sid}/events", since_index=since, wait_count=2,
                             timeout_ms=int(timeout * 1000))
        if got.get("timed_out"):
            raise RuntimeError(f"no result for {tid} within {timeout}s")
        evs = got["data"]
        if len(evs) != 2 or evs[0]["id"] != tid or evs[1].get("tool_use_id") != tid:
            raise RuntimeError(f"unexpected events after {tid}: {json.dumps(evs)[:500]}")
        self.index += 2
        return evs[1]["_t"] - evs[0]["_t"], evs[1]

    def end(self):
        self.fake.call("POST", f"/_fake/sessions/{self.sid}/events",
                       {"events": [{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}]})
        return self.fake.call("GET", f"/_fake/work/{self.wid}", wait_state="stopped", timeout_ms=20000)


def run_worker(kind, fake, hands, tools, n, warmup):
    tmp = tempfile.mkdtemp(prefix=f"hands-cma-bench-{kind}-")
    env = fake.call("POST", "/_fake/environments", {})
    proc, logname = start_worker(kind, fake, env, tmp, hands)
    try:
        s = Session(fake, env["id"])
        _, r = s.round("write", {"file_path": "small.txt", "content": SMALL}, timeout=90)
        if r["is_error"]:
            raise RuntimeError(f"{kind}: write failed: {r['content']}")
        samples = {}
        for name in tools:
            tool, inp = TOOLS[name]
            for _ in range(warmup):
                s.round(tool, inp)
            xs = []
            for _ in range(n):
                dt, r = s.round(tool, inp)
                if r["is_error"]:
                    raise RuntimeError(f"{kind}: {name} failed: {r['content']}")
                xs.append(dt)
            if name == "read" and r["content"] != [{"type": "text", "text": SMALL}]:
                raise RuntimeError(f"{kind}: read returned {json.dumps(r['content'])[:200]}")
            samples[name] = xs
        w = s.end()
        if w.get("state") != "stopped":
            log(f"{kind}: the item did not end after the idle ({w.get('state')})")
        return samples
    except Exception:
        log(f"--- {kind} worker log ({logname}) ---")
        log(open(logname).read()[-4000:])
        raise
    finally:
        stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def pct(xs, p):
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    ap.add_argument("--hands", default=os.path.join(target, "release", "hands"))
    ap.add_argument("--n", type=int, default=200, help="measured rounds per tool (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured rounds per tool first (default 20)")
    ap.add_argument("--workers", default="sdk,hands")
    ap.add_argument("--tools", default="bash,read")
    ap.add_argument("--fake-nagle", action="store_true",
                    help="leave Nagle's algorithm on in the fake's sockets, as fake_cp.py ships (see Fake)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--samples", action="store_true", help="with --json: include every round's seconds")
    a = ap.parse_args()
    workers = [w for w in a.workers.split(",") if w]
    tools = [t for t in a.tools.split(",") if t]
    assert set(workers) <= {"sdk", "hands"} and set(tools) <= set(TOOLS) and a.n > 0
    if "hands" in workers and not os.access(a.hands, os.X_OK):
        sys.exit(f"no hands binary at {a.hands} (cargo build --release --bin hands)")
    for k in list(os.environ):
        if k.startswith("ANTHROPIC_"):
            del os.environ[k]
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"

    fake = Fake(nodelay=not a.fake_nagle)
    results = {}
    try:
        for kind in workers:
            log(f"cma_roundtrip: {kind}: {a.warmup} warm-up + {a.n} rounds each of {', '.join(tools)} ...")
            t0 = time.monotonic()
            results[kind] = run_worker(kind, fake, a.hands, tools, a.n, a.warmup)
            log(f"cma_roundtrip: {kind}: done in {time.monotonic() - t0:.1f}s")
    finally:
        fake.stop()

    figures = {"n": a.n, "warmup": a.warmup, "hands": a.hands, "fake_tcp_nodelay": not a.fake_nagle, "unit": "ms",
               "tools": {}}
    for t in tools:
        row = {}
        for kind in workers:
            xs = results[kind][t]
            row[kind] = {"p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3,
                         "mean": sum(xs) / len(xs) * 1e3, "min": min(xs) * 1e3, "max": max(xs) * 1e3}
            if a.samples:
                row[kind]["samples"] = [x * 1e3 for x in xs]
        if "sdk" in row and "hands" in row:
            row["ratio_hands_over_sdk"] = {q: row["hands"][q] / row["sdk"][q] for q in ("p50", "p99")}
        figures["tools"][t] = row
    if a.json:
        json.dump(figures, sys.stdout, indent=1)
        print()
        return
    print(f"tool round trip through the fake control plane (tool_use stored -> result stored), "
          f"{a.n} rounds after {a.warmup} warm-up, ms")
    print(f"{'tool':6} {'worker':6} {'p50':>8} {'p99':>8} {'mean':>8} {'min':>8} {'max':>8}")
    for t, row in figures["tools"].items():
        for kind in workers:
            f = row[kind]
            print(f"{t:6} {kind:6} {f['p50']:8.3f} {f['p99']:8.3f} {f['mean']:8.3f} {f['min']:8.3f} {f['max']:8.3f}")
        if "ratio_hands_over_sdk" in row:
            r = row["ratio_hands_over_sdk"]
            print(f"{t:6} {'ratio':6} {r['p50']:7.2f}x {r['p99']:7.2f}x   (hands / SDK)")


if __name__ == "__main__":
    main()
