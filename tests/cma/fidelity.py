#!/usr/bin/env python3
"""Fidelity check: run the OFFICIAL Python SDK environment worker
(``anthropic.lib.environments.EnvironmentWorker``, anthropic 2.10.0) against the
fake control plane in ``fake_cp.py`` and check that what the fake sees matches the
contract (docs/claude-managed-agents.md).

    python3 tests/cma/fidelity.py [--verbose] [--only NAME[,NAME...]] [--keep]

Prints one ``PASS``/``FAIL`` line per check and exits 1 if any check failed.
Everything is driven through the fake's HTTP control API (the same API a Rust
suite uses), with event-driven waits (the fake's ``wait_count`` / ``wait_state``
long-polls) and timeouts rather than fixed sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ next to the sources

from fake_cp import FakeControlPlane  # noqa: E402
from workers import control  # noqa: E402

# The worker must not pick up anything from the developer's environment.
for _k in list(os.environ):
    if _k.startswith("ANTHROPIC_"):
        del os.environ[_k]
os.environ["NO_PROXY"] = "127.0.0.1,localhost"

import anthropic  # noqa: E402
from anthropic.lib.environments import EnvironmentWorker  # noqa: E402

API_VERSION = "2026-10-21"
BETA_MA = "managed-agents-2026-04-01"
BETA_MEM = "agent-memory-2026-07-22"
MAX_IDLE = 2.0
PARENT_KEY = "sk-parent-key-must-never-be-sent"

# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

RESULTS: list[tuple[str, str, bool, str]] = []
CURRENT = ["-"]


def check(name, ok, detail=""):
    ok = bool(ok)
    RESULTS.append((CURRENT[0], name, ok, detail))
    tag = "PASS" if ok else "FAIL"
    line = f"{tag}  [{CURRENT[0]}] {name}"
    if detail:
        line += f"  ({detail})"
    print(line, flush=True)
    return ok


def short(x, n=160):
    s = json.dumps(x) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------
# the control API client
# ---------------------------------------------------------------------------


class Ctl:
    def __init__(self, url):
        self.url = url

    def call(self, method, path, body=None, **query):
        return control(self.url, method, path, body, **query)

    # raw API access (for the fake's own self-checks)
    def api(self, method, path, token=None, body=None, headers=None, raw_body=None):
        h = {"anthropic-version": API_VERSION, "anthropic-beta": BETA_MA, "Content-Type": "application/json"}
        if token:
            h["Authorization"] = "Bearer " + token
        h.update(headers or {})
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw

    def requests(self, **f):
        return self.call("GET", "/_fake/requests", **f)["requests"]

    def wait_requests(self, count, timeout=15.0, completed=True, **f):
        """Wait until `count` matching requests have arrived (and, by default, been answered)."""
        r = self.call("GET", "/_fake/requests", wait_count=count, timeout_ms=int(timeout * 1000),
                      completed=1 if completed else None, **f)
        return r["requests"], not r["timed_out"]

    def last_seq(self):
        return self.call("GET", "/_fake/requests", since=10**9)["last_seq"]

    def work(self, wid, wait_state=None, timeout=15.0):
        if wait_state:
            return self.call("GET", f"/_fake/work/{wid}", wait_state=wait_state, timeout_ms=int(timeout * 1000))
        return self.call("GET", f"/_fake/work/{wid}")

    def session(self, sid):
        return self.call("GET", f"/_fake/sessions/{sid}")

    def append(self, sid, *events, broadcast=True, store=True):
        return self.call("POST", f"/_fake/sessions/{sid}/events",
                         {"events": list(events), "broadcast": broadcast, "store": store})["data"]

    def fault(self, **rule):
        return self.call("POST", "/_fake/faults", rule)


# ---------------------------------------------------------------------------
# the SDK worker in a thread
# ---------------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(f"{record.created:.3f} {record.levelname} {record.name}: {record.getMessage()}")
        except Exception:
            pass


class WorkerThread:
    def __init__(self, url, env_id, env_key, workdir):
        self.url, self.env_id, self.env_key, self.workdir = url, env_id, env_key, workdir
        self.loop = None
        self.task = None
        self.error = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sdk-worker", daemon=True)

    def start(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        client = anthropic.AsyncAnthropic(api_key=PARENT_KEY, base_url=self.url, max_retries=2)
        worker = EnvironmentWorker(client, environment_id=self.env_id, environment_key=self.env_key,
                                   workdir=self.workdir, max_idle=MAX_IDLE)
        self.task = self.loop.create_task(worker.run())
        self.ready.set()
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            try:
                self.loop.run_until_complete(client.close())
            except Exception:
                pass

    @property
    def alive(self):
        return self.thread.is_alive() and self.error is None

    def stop(self):
        if self.loop and self.task and not self.task.done():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(15)


# ---------------------------------------------------------------------------
# helpers for assertions
# ---------------------------------------------------------------------------


def hdr(r, name):
    return r["headers"].get(name.lower())


def betas(r):
    return [b.strip() for b in (hdr(r, "anthropic-beta") or "").split(",") if b.strip()]


def bearer(r):
    a = hdr(r, "authorization") or ""
    return a[7:] if a.lower().startswith("bearer ") else None


def tool_use(tid, name, inp, **extra):
    ev = {"type": "agent.tool_use", "id": tid, "name": name, "input": inp}
    ev.update(extra)
    return ev


def idle(reason="end_turn"):
    return {"type": "session.status_idle", "stop_reason": {"type": reason}}


def results_for(ctl, sid):
    """All E8 requests for a session, with the single event they carried."""
    out = []
    for r in ctl.requests(endpoint="E8", session_id=sid):
        evs = (r["body"] or {}).get("events") or []
        out.append((r, evs[0] if len(evs) == 1 else None, len(evs)))
    return out


def stored_results(ctl, sid):
    return [e for e in ctl.session(sid)["events"] if e["_origin"] == "client"]


def text_of(ev):
    return "".join(b.get("text", "") for b in ev.get("content") or [] if b.get("type") == "text")


class Ctx:
    def __init__(self, ctl, env, workdir, worker):
        self.ctl, self.env, self.workdir, self.worker = ctl, env, workdir, worker

    def new_session(self, sid=None, **spec):
        spec.setdefault("environment_id", self.env["id"])
        if sid:
            spec["id"] = sid
        r = self.ctl.call("POST", "/_fake/sessions", spec)
        return r["session"]["id"], r["work"]

    def wait_stopped(self, wid, timeout=20.0):
        """Wait for the item to reach `stopped` and for the requests about it so far to be answered."""
        w = self.ctl.work(wid, wait_state="stopped", timeout=timeout)
        if not w.get("timed_out"):
            n = len(self.ctl.requests(work_id=wid))
            self.ctl.wait_requests(n, 5, work_id=wid)
        return w, not w.get("timed_out")

    def wait_next_poll(self, after_seq, timeout=8.0):
        rs, ok = self.ctl.wait_requests(1, timeout, completed=False, endpoint="E1", environment_id=self.env["id"],
                                        since=after_seq)
        return ok

    def common_item_checks(self, wid, sid, token, expect_stop=True):
        """Ordering, credentials and headers for one work item."""
        ctl = self.ctl
        w = ctl.work(wid)
        item_reqs = [r for r in ctl.requests(work_id=wid)]
        sess_reqs = ctl.requests(session_id=sid) if sid else []
        allr = sorted({r["seq"]: r for r in item_reqs + sess_reqs}.values(), key=lambda r: r["seq"])
        offers = w["offers"]
        acks = [r for r in allr if r["endpoint"] == "E2"]
        check("ack follows the poll that offered the item", offers and acks and
              acks[0]["seq"] > offers[0]["request_seq"])
        first = allr[0] if allr else None
        check("ack is the first request about the item", first is not None and first["endpoint"] == "E2",
              first and first["endpoint"])
        check("ack: POST, empty body, environment key",
              acks and all(a["body_len"] == 0 and bearer(a) == self.env["key"] for a in acks))
        others = [r for r in allr if r["endpoint"] not in ("E1", "E2")]
        want = token or self.env["key"]
        wrong = [(r["endpoint"], r["credential"]["kind"]) for r in others if bearer(r) != want]
        check(f"per-item calls use the {'sessions token' if token else 'environment key'}", not wrong,
              short(wrong) if wrong else f"{len(others)} calls")
        check("no x-api-key and not the parent key on any item request",
              all(hdr(r, "x-api-key") is None and PARENT_KEY not in json.dumps(r["headers"]) for r in allr))
        bad_ver = [r["endpoint"] for r in allr if hdr(r, "anthropic-version") != API_VERSION]
        check("anthropic-version: 2026-10-21 on every request", not bad_ver, short(bad_ver))
        bad_beta = [r["endpoint"] for r in allr if r["endpoint"] in ("E2", "E3", "E4", "E5", "E6", "E7", "E8")
                    and BETA_MA not in betas(r)]
        check("anthropic-beta: managed-agents-2026-04-01 on work and session calls", not bad_beta, short(bad_beta))
        posts = [r for r in allr if r["method"] == "POST"]
        check("Content-Type: application/json on every POST",
              all((hdr(r, "content-type") or "").startswith("application/json") for r in posts))
        hbs = [h for h in w["heartbeats"]]
        if hbs:
            check("first heartbeat carries expected_last_heartbeat=NO_HEARTBEAT",
                  hbs[0]["expected_last_heartbeat"] == "NO_HEARTBEAT", hbs[0]["expected_last_heartbeat"])
            echo_ok = True
            prev = None
            for h in hbs:
                if prev is not None and prev.get("status") == 200:
                    echo_ok &= h["expected_last_heartbeat"] == prev["last_heartbeat"]
                prev = h
            check("each later heartbeat echoes the previous last_heartbeat exactly", echo_ok, f"{len(hbs)} beats")
            hb_reqs = [r for r in allr if r["endpoint"] == "E3"]
            check("heartbeat: POST with empty body and only expected_last_heartbeat in the query",
                  all(r["body_len"] == 0 and set(r["query"]) == {"expected_last_heartbeat"} for r in hb_reqs))
        stops = [r for r in allr if r["endpoint"] == "E4"]
        if expect_stop:
            check("force-stop sent with body {\"force\": true}", stops and all(
                r["body"] == {"force": True} for r in stops), short([r["body"] for r in stops]))
            if stops:
                late = [h for h in hbs if h["t"] > stops[0]["t"]]
                check("no heartbeat after the force-stop", not late, f"{len(late)} late")
        else:
            check("no stop sent for the item", not stops, f"{len(stops)} stops")
        return w, allr


# ---------------------------------------------------------------------------
# fake self-checks (no SDK): the server semantics the SDK scenarios do not reach
# ---------------------------------------------------------------------------


def fake_self_checks(ctl):
    CURRENT[0] = "fake"
    env = ctl.call("POST", "/_fake/environments", {})
    eid, key = env["id"], env["key"]
    poll = f"/v1/environments/{eid}/work/poll"
    for bad in ("0", "1000", "abc"):
        st, b = ctl.api("GET", f"{poll}?block_ms={bad}", key)
        check(f"poll block_ms={bad} -> 400 generic error body", st == 400 and b["type"] == "error" and
              b["error"]["type"] == "invalid_request_error", st)
    st, b = ctl.api("GET", f"{poll}?block_ms=1", "nope")
    check("poll with an unknown key -> 401", st == 401 and b["error"]["type"] == "authentication_error", st)
    t0 = time.monotonic()
    st, b = ctl.api("GET", f"{poll}?block_ms=300", key)
    dt = time.monotonic() - t0
    check("empty poll held ~block_ms then 200 null", st == 200 and b is None and 0.28 <= dt < 0.8, f"{dt:.3f}s")
    st, b = ctl.api("GET", poll, key)
    check("poll without block_ms is non-blocking", st == 200 and b is None)
    # healthcheck-free session item for queue semantics
    r = ctl.call("POST", "/_fake/sessions", {"environment_id": eid, "work": {"ttl_seconds": 1},
                                            "events": [tool_use("toolu_self_1", "bash", {"command": "true"}),
                                                       {"type": "agent.custom_tool_use", "id": "ctu_self_1",
                                                        "name": "lookup", "input": {}}]})
    sid, w = r["session"]["id"], r["work"]
    wid, tok = w["id"], w["sessions_token"]
    raw = w["secret"]
    dec = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    check("work secret = URL-safe base64 (unpadded) JSON carrying sessions_token",
          "=" not in raw and dec.get("sessions_token") == tok)
    st, item = ctl.api("GET", f"{poll}?block_ms=1", key)
    check("poll returns the item with its secret", st == 200 and item["id"] == wid and item["secret"] == raw and
          item["state"] == "queued" and item["data"] == {"type": "session", "id": sid})
    st, b = ctl.api("GET", f"{poll}?block_ms=1", key)
    check("an offered, un-acked item is not re-offered before the reclaim delay", b is None)
    time.sleep(0.15)
    st, b = ctl.api("GET", f"{poll}?block_ms=1&reclaim_older_than_ms=100", key)
    check("un-acked item re-offered after reclaim_older_than_ms", b and b["id"] == wid)
    check("fake records the reclaim", ctl.work(wid)["reclaims"] == 1)
    hb = f"/v1/environments/{eid}/work/{wid}/heartbeat"
    st, b = ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/ack", tok)
    check("ack with the sessions token -> 403 (env key only)", st == 403, st)
    st, b = ctl.api("POST", f"{hb}?expected_last_heartbeat=NO_HEARTBEAT", tok)
    check("heartbeat before ack -> 409", st == 409, st)
    st, b = ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/ack", key)
    check("ack -> 200, state starting", st == 200 and b["state"] == "starting" and b["secret"] is None, st)
    st, b = ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/ack", key)
    check("second ack -> 409", st == 409, st)
    st, b1 = ctl.api("POST", f"{hb}?expected_last_heartbeat=NO_HEARTBEAT", tok)
    check("first heartbeat NO_HEARTBEAT -> 200 active", st == 200 and b1["state"] == "active" and
          b1["lease_extended"] is True and b1["ttl_seconds"] == 1 and b1["type"] == "work_heartbeat", short(b1))
    st, b = ctl.api("POST", f"{hb}?expected_last_heartbeat=NO_HEARTBEAT", tok)
    cs = (((b or {}).get("error") or {}).get("details") or {}).get("current_state") or {}
    check("stale expected_last_heartbeat -> 412 with the contract's body", st == 412 and
          b["error"]["details"]["error_code"] == "heartbeat_precondition_failed" and
          cs == {"last_heartbeat": b1["last_heartbeat"], "lease_extended": False, "state": "active",
                 "ttl_seconds": 1}, short(b))
    st, b2 = ctl.api("POST", f"{hb}?expected_last_heartbeat={urllib.request.quote(b1['last_heartbeat'])}", tok)
    check("exact echo -> 200 with a new last_heartbeat", st == 200 and b2["last_heartbeat"] != b1["last_heartbeat"])
    # lease TTL expiry (ttl 1 s) -> requeued; the old holder's next beat is a 412
    wv = ctl.work(wid, wait_state="queued", timeout=4)
    check("lease expiry after ttl without heartbeat: recorded, item requeued",
          not wv.get("timed_out") and wv["lease_expirations"] and wv["lease_expirations"][0]["action"] == "requeue")
    st, b = ctl.api("POST", f"{hb}?expected_last_heartbeat={urllib.request.quote(b2['last_heartbeat'])}", tok)
    check("old holder's heartbeat after expiry -> 412", st == 412, st)
    st, b = ctl.api("GET", f"{poll}?block_ms=1", key)
    check("expired item is offered again", b and b["id"] == wid)
    ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/ack", key)
    # E8 pairing validation
    ev = f"/v1/sessions/{sid}/events"
    res = {"type": "user.tool_result", "tool_use_id": "toolu_self_1", "is_error": False,
           "content": [{"type": "text", "text": "ok"}]}
    st, b = ctl.api("POST", ev, tok, {"events": [dict(res, tool_use_id="toolu_missing")]})
    check("result for an unknown tool_use_id -> 400", st == 400 and b["type"] == "error", st)
    st, b = ctl.api("POST", ev, tok, {"events": [dict(res, tool_use_id="ctu_self_1")]})
    check("user.tool_result naming an agent.custom_tool_use -> 400", st == 400, st)
    st, b = ctl.api("POST", ev, tok, {"events": [{"type": "user.custom_tool_result", "custom_tool_use_id":
                                                 "toolu_self_1", "is_error": False, "content": []}]})
    check("user.custom_tool_result naming an agent.tool_use -> 400", st == 400, st)
    st, b = ctl.api("POST", ev, tok, {"events": [res, res]})
    check("two events in one send -> 400", st == 400, st)
    st, b = ctl.api("POST", ev, tok, {"events": [dict(res, session_thread_id="sthr_x")]})
    check("unknown field on a result -> 400", st == 400, st)
    st, b = ctl.api("POST", ev, key, {"events": [res]})
    check("valid result -> 200 with a stored id", st == 200 and b["data"][0]["id"].startswith("sevt_"), st)
    st, b = ctl.api("POST", ev, tok, {"events": [res]})
    check("duplicate result -> 400", st == 400, st)
    st, b = ctl.api("POST", ev, tok, {"events": [{"type": "user.custom_tool_result", "custom_tool_use_id":
                                                 "ctu_self_1", "is_error": True,
                                                 "content": [{"type": "text", "text": "x"}]}]})
    check("valid custom result -> 200", st == 200, st)
    st, b = ctl.api("GET", f"/v1/sessions/{sid}/events?limit=1", tok)
    st2, b2 = ctl.api("GET", f"/v1/sessions/{sid}/events?limit=1&page={b['next_page']}", tok)
    check("history pages with limit/page/next_page", st == 200 and len(b["data"]) == 1 and b["next_page"] and
          st2 == 200 and b2["data"][0]["id"] == "ctu_self_1")
    st, b = ctl.api("GET", f"/v1/sessions/{sid}", tok, headers={"anthropic-beta": "other-beta"})
    check("session call without the managed-agents beta -> 400", st == 400, st)
    st, b = ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/stop", key, {"force": True})
    st2, b2 = ctl.api("POST", f"/v1/environments/{eid}/work/{wid}/stop", key, {"force": True})
    check("force stop -> 200 stopped; again -> 409 conflict_error", st == 200 and b["state"] == "stopped" and
          st2 == 409 and b2["error"]["type"] == "conflict_error", f"{st} {st2}")
    st, b = ctl.api("POST", f"{hb}?expected_last_heartbeat=anything", tok)
    check("heartbeat on a stopped item: no comparison, state stopped, lease_extended false",
          st == 200 and b["state"] == "stopped" and b["lease_extended"] is False, short(b))
    # memory
    store = ctl.call("POST", "/_fake/memory_stores", {"memories": [{"path": "/a.md", "content": "A"}]})
    r = ctl.call("POST", "/_fake/sessions", {"environment_id": eid, "resources": [
        {"type": "memory_store", "memory_store_id": store["id"], "access": "read_write", "name": "m"}]})
    mtok = r["work"]["sessions_token"]
    mh = {"anthropic-beta": BETA_MEM}
    mp = f"/v1/memory_stores/{store['id']}/memories"
    st, b = ctl.api("GET", f"{mp}?view=full&limit=20", key, headers=mh)
    check("memory list with the environment key -> 403", st == 403, st)
    st, b = ctl.api("GET", f"{mp}?view=basic&limit=100", mtok, headers=mh)
    mem = b["data"][0] if st == 200 and b["data"] else {}
    check("memory list basic view: content null, sha present", st == 200 and mem.get("content") is None and
          len(mem.get("content_sha256", "")) == 64)
    st, b = ctl.api("POST", f"{mp}/{mem.get('id')}", mtok, {"content": "B", "precondition": {
        "type": "content_sha256", "content_sha256": "0" * 64}}, headers=mh)
    check("memory update with a stale sha -> 409", st == 409, st)
    st, b = ctl.api("POST", mp, mtok, {"path": "/a.md", "content": "dup"}, headers=mh)
    check("memory create on an existing path -> 409", st == 409, st)
    st, b = ctl.api("DELETE", f"{mp}/{mem.get('id')}?expected_content_sha256={'0' * 64}", mtok, headers=mh)
    check("memory delete with a stale sha -> 409", st == 409, st)
    st, b = ctl.api("GET", f"{mp}/{mem.get('id')}?view=full", mtok, headers=mh)
    check("memory get full view", st == 200 and b["content"] == "A" and b["type"] == "memory", st)
    st, b = ctl.api("POST", f"{mp}/{mem.get('id')}", mtok, {"content": "B", "precondition": {
        "type": "content_sha256", "content_sha256": mem.get("content_sha256")}}, headers=mh)
    check("memory update with the current sha -> 200, new sha", st == 200 and b["content_sha256"] ==
          __import__("hashlib").sha256(b"B").hexdigest(), st)
    st, b2 = ctl.api("POST", mp, mtok, {"path": "/dir/c.md", "content": "C"}, headers=mh)
    st3, p1 = ctl.api("GET", f"{mp}?view=basic&limit=1", mtok, headers=mh)
    st4, p2 = ctl.api("GET", f"{mp}?view=basic&limit=1&page={p1.get('next_page')}", mtok, headers=mh)
    check("memory create -> 200; list pages by cursor in path order", st == 200 and st3 == 200 and st4 == 200 and
          [x["path"] for x in p1["data"] + p2["data"]] == ["/a.md", "/dir/c.md"] and p2["next_page"] is None)
    st, b3 = ctl.api("DELETE", f"{mp}/{b2['id']}?expected_content_sha256={b2['content_sha256']}", mtok, headers=mh)
    check("memory delete with the current sha -> memory_deleted", st == 200 and b3 == {"type": "memory_deleted",
                                                                                    "id": b2["id"]}, short(b3))
    st, b = ctl.api("GET", f"{mp}/{b2['id']}", mtok, headers=mh)
    check("deleted memory -> 404", st == 404, st)
    ctl.call("POST", f"/_fake/work/{r['work']['id']}/stop", {"force": True})


# ---------------------------------------------------------------------------
# scenarios against the SDK worker
# ---------------------------------------------------------------------------


def s_idle_polls(cx):
    ctl = cx.ctl
    polls, ok = ctl.wait_requests(3, 20, endpoint="E1", environment_id=cx.env["id"])
    if not check("worker polls (3 polls seen)", ok, f"{len(polls)}"):
        return
    # the fake answered them: wait for the third to finish
    time.sleep(1.1)
    polls = ctl.requests(endpoint="E1", environment_id=cx.env["id"])[:3]
    check("poll query is exactly block_ms=999", all(p["query"] == {"block_ms": ["999"]} for p in polls),
          short([p["raw_query"] for p in polls]))
    wids = {hdr(p, "anthropic-worker-id") for p in polls}
    wid = next(iter(wids))
    check("Anthropic-Worker-ID present, stable, <hostname>-<12 hex>",
          len(wids) == 1 and wid and re.fullmatch(r".+-[0-9a-f]{12}", wid), short(list(wids)))
    check("poll: Bearer environment key, no x-api-key",
          all(bearer(p) == cx.env["key"] and hdr(p, "x-api-key") is None for p in polls))
    check("poll: anthropic-beta managed-agents, anthropic-version 2026-10-21",
          all(BETA_MA in betas(p) and hdr(p, "anthropic-version") == API_VERSION for p in polls))
    check("poll: Accept application/json", all(hdr(p, "accept") == "application/json" for p in polls))
    held = [p["t_done"] - p["t"] for p in polls if p["t_done"]]
    check("fake held each empty poll ~999 ms and answered 200 null",
          all(p["status"] == 200 for p in polls) and all(0.95 <= h < 1.3 for h in held), short([f"{h:.3f}" for h in held]))
    gaps = [polls[i + 1]["t"] - polls[i]["t_done"] for i in range(len(polls) - 1)]
    check("re-poll after a null comes U[1,3) s later", gaps and all(0.95 <= g < 3.3 for g in gaps),
          ", ".join(f"{g:.2f}s" for g in gaps))


def s_full_session(cx):
    ctl = cx.ctl
    wd = os.path.realpath(cx.workdir)
    history = [
        {"type": "user.message", "content": [{"type": "text", "text": "do the thing"}]},
        {"type": "session.status_running"},
        {"type": "agent.message", "content": [{"type": "text", "text": "on it"}]},
        {"type": "span.model_request_start"},
        {"type": "session.status_running"},
    ]
    sid, w = cx.new_session(events=history, work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    lists, ok = ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    if not check("session attached (first history list seen)", ok):
        return
    calls = [
        tool_use("toolu_write", "write", {"file_path": "fid/hello.txt", "content": "hello world\nsecond line\n"}),
        tool_use("toolu_read", "read", {"file_path": "fid/hello.txt"}),
        tool_use("toolu_edit", "edit", {"file_path": "fid/hello.txt", "old_string": "world", "new_string": "there"}),
        tool_use("toolu_glob", "glob", {"pattern": "fid/*.txt"}),
        tool_use("toolu_grep", "grep", {"pattern": "there", "path": "fid"}),
        tool_use("toolu_bash", "bash", {"command": "wc -l < fid/hello.txt"}, evaluated_permission="allow"),
        tool_use("toolu_unowned", "web_fetch_elsewhere", {"url": "x"}),
        {"type": "agent.custom_tool_use", "id": "ctu_unowned", "name": "lookup_order", "input": {"id": 1}},
        tool_use("toolu_ask", "bash", {"command": "echo approved"}, evaluated_permission="ask"),
    ]
    ctl.append(sid, *calls)
    posted, ok = ctl.wait_requests(6, 25, endpoint="E8", session_id=sid)
    check("six owned calls answered", ok, f"{len(posted)} posts")
    hbs, ok = ctl.wait_requests(3, 12, endpoint="E3", work_id=wid)
    check("three heartbeats while the session runs", ok, f"{len(hbs)}")
    # the ask-gated call stays held: give the dispatcher a moment to (not) run it
    time.sleep(1.0)
    early = [e for e in stored_results(ctl, sid) if e.get("tool_use_id") == "toolu_ask"]
    check("evaluated_permission ask: nothing executed or posted before the confirmation", not early)
    t_conf = time.time()
    ctl.append(sid, {"type": "user.tool_confirmation", "tool_use_id": "toolu_ask", "result": "allow"})
    posted, ok = ctl.wait_requests(7, 15, endpoint="E8", session_id=sid)
    check("ask call executed and posted after the allow", ok)
    t_idle = time.time()
    ctl.append(sid, idle("end_turn"))
    wv, ok = cx.wait_stopped(wid, timeout=15)
    if not check("end_turn idle -> item stopped", ok, wv["state"]):
        return
    stop = [r for r in ctl.requests(endpoint="E4", work_id=wid)]
    dt = stop[0]["t"] - t_idle if stop else -1
    check(f"force-stop ~max_idle ({MAX_IDLE}s) after the end_turn idle", MAX_IDLE - 0.1 <= dt <= MAX_IDLE + 2.5,
          f"{dt:.2f}s")
    cx.wait_next_poll(stop[-1]["seq"] if stop else 0)
    w, allr = cx.common_item_checks(wid, sid, tok)
    check("fake state machine queued->starting->active->stopped",
          [t["to"] for t in w["transitions"]] == ["starting", "active", "stopped"],
          short([t["to"] for t in w["transitions"]]))
    # heartbeat cadence from ttl 4 -> interval 2 s
    hb = w["heartbeats"]
    hb_reqs = {r["seq"]: r for r in ctl.requests(endpoint="E3", work_id=wid)}
    gaps = []
    for a, b in zip(hb, hb[1:]):
        ra, rb = hb_reqs.get(a["request_seq"]), hb_reqs.get(b["request_seq"])
        if ra and rb:
            gaps.append(rb["t"] - ra["t_done"])
    check("ttl_seconds 4 -> heartbeats every ~2 s", gaps and all(1.85 <= g <= 2.7 for g in gaps),
          ", ".join(f"{g:.2f}" for g in gaps))
    # ordering: stream before list; list with limit=1000 and following next_page
    e6 = ctl.requests(endpoint="E6", session_id=sid)
    e7 = ctl.requests(endpoint="E7", session_id=sid)
    e5 = ctl.requests(endpoint="E5", session_id=sid)
    check("session fetched once (E5), before the stream", len(e5) == 1 and e6 and e5[0]["t_done"] <= e6[0]["t"])
    check("event stream opened (headers received) before history is listed",
          e6 and e7 and e6[0]["t_headers"] is not None and e6[0]["t_headers"] < e7[0]["t"],
          f"E6 headers {e6[0]['t_headers']:.3f} E7 {e7[0]['t']:.3f}" if e6 and e7 else "")
    check("stream request has no query and sends Accept: application/json",
          e6 and e6[0]["raw_query"] == "" and hdr(e6[0], "accept") == "application/json",
          e6 and f"{e6[0]['raw_query']!r} {hdr(e6[0], 'accept')}")
    first_list = [r for r in e7 if "page" not in r["query"]]
    paged = [r for r in e7 if "page" in r["query"]]
    check("history list: limit=1000, then follows next_page as page=<cursor> keeping limit=1000",
          first_list and all(r["query"].get("limit") == ["1000"] for r in e7) and paged,
          f"{len(first_list)} first pages, {len(paged)} cursor pages")
    # results
    posts = results_for(ctl, sid)
    check("every send carries exactly one event", all(n == 1 for _, _, n in posts), short([n for _, _, n in posts]))
    by_id = {}
    for r, ev, _ in posts:
        if ev and r["status"] == 200:
            key = ev.get("tool_use_id") or ev.get("custom_tool_use_id")
            by_id.setdefault(key, []).append((r, ev))
    expect = {
        "toolu_write": "wrote 24 bytes to fid/hello.txt",
        "toolu_read": "hello world\nsecond line\n",
        "toolu_edit": "edited fid/hello.txt (1 replacement(s))",
        "toolu_glob": wd + "/fid/hello.txt",
        "toolu_grep": wd + "/fid/hello.txt:1:hello there",
        "toolu_bash": "2",
        "toolu_ask": "approved",
    }
    for tid, want in expect.items():
        got = by_id.get(tid, [])
        ev = got[0][1] if got else {}
        txt = text_of(ev).rstrip("\n") if tid == "toolu_grep" else text_of(ev)
        check(f"{tid}: exactly one user.tool_result, paired, is_error false, expected text",
              len(got) == 1 and ev.get("type") == "user.tool_result" and ev.get("tool_use_id") == tid and
              ev.get("is_error") is False and txt == want, short(ev) if len(got) == 1 else f"{len(got)} results")
    r0 = posts[0][0] if posts else None
    check("result field order type, tool_use_id, is_error, content",
          r0 is not None and list(json.loads(r0["body_text"])["events"][0]) ==
          ["type", "tool_use_id", "is_error", "content"], r0 and r0["body_text"][:90])
    check("unowned agent.tool_use left unanswered", "toolu_unowned" not in by_id)
    check("unowned agent.custom_tool_use left unanswered", "ctu_unowned" not in by_id)
    ask = by_id.get("toolu_ask", [])
    check("ask call's result posted only after the confirmation", ask and ask[0][0]["t"] > t_conf)
    rejected = [r for r in ctl.requests(session_id=sid) if r["status"] and r["status"] >= 400]
    check("the fake rejected none of the worker's requests", not rejected,
          short([(r["endpoint"], r["status"]) for r in rejected]))
    helpers = {r["endpoint"]: hdr(r, "x-stainless-helper") for r in allr}
    check("x-stainless-helper per call family (telemetry only)",
          helpers.get("E2") == "environments-work-poller" and helpers.get("E3") == "environments-worker" and
          helpers.get("E4") == "environments-worker" and helpers.get("E5") == "environments-worker" and
          helpers.get("E6") == "session-tool-runner" and helpers.get("E8") == "session-tool-runner", short(helpers))


def _idle_at_attach(cx, work, label):
    ctl = cx.ctl
    sid, w = cx.new_session(events=[{"type": "session.status_running"}, idle("end_turn")], work=work)
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=20)
    if not check(f"{label}: session idle at attach -> item stopped", ok, wv["state"]):
        return
    e7 = ctl.requests(endpoint="E7", session_id=sid)
    stop = ctl.requests(endpoint="E4", work_id=wid)
    dt = stop[0]["t"] - e7[-1]["t_done"] if stop and e7 else -1
    check(f"{label}: stops ~max_idle after the history read", MAX_IDLE - 0.1 <= dt <= MAX_IDLE + 2.5, f"{dt:.2f}s")
    cx.wait_next_poll(stop[-1]["seq"] if stop else 0)
    cx.common_item_checks(wid, sid, None)
    check(f"{label}: nothing posted", not ctl.requests(endpoint="E8", session_id=sid))


def s_no_secret(cx):
    _idle_at_attach(cx, {"secret": False, "ttl_seconds": 4}, "no secret")


def s_garbage_secret(cx):
    _idle_at_attach(cx, {"secret": "%%%-not-base64-%%%", "ttl_seconds": 4}, "garbage secret")


def s_secret_without_token(cx):
    raw = base64.urlsafe_b64encode(json.dumps({"ingress_token": "x"}).encode()).decode().rstrip("=")
    _idle_at_attach(cx, {"secret": raw, "ttl_seconds": 4}, "secret without sessions_token")


def s_heartbeat_412(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4, "on_lease_expiry": "stop"})
    wid, tok = w["id"], w["sessions_token"]
    hbs, ok = ctl.wait_requests(1, 15, endpoint="E3", work_id=wid)
    if not check("first heartbeat seen", ok):
        return
    ctl.wait_requests(1, 10, endpoint="E7", session_id=sid)
    ctl.append(sid, tool_use("toolu_late", "bash", {"command": "sleep 3; echo late"}))
    ctl.call("POST", f"/_fake/work/{wid}/steal", {})
    deadline = time.time() + 10
    got412 = None
    while time.time() < deadline and got412 is None:
        rs, _ = ctl.wait_requests(2, 5, endpoint="E3", work_id=wid)
        got412 = next((r for r in rs if r["status"] == 412), None)
    if not check("stolen lease -> the worker's next heartbeat gets 412", got412 is not None):
        return
    posted, ok = ctl.wait_requests(1, 10, endpoint="E8", session_id=sid)
    check("in-flight tool finishes and its result is still posted after the 412",
          ok and posted[0]["status"] == 200 and posted[0]["t"] > got412["t"] and
          text_of(posted[0]["body"]["events"][0]) == "late")
    ok = cx.wait_next_poll(got412["seq"], timeout=10)
    check("worker polls again after losing the lease", ok)
    after = [r for r in ctl.requests(work_id=wid) if r["endpoint"] == "E3" and r["seq"] > got412["seq"]]
    check("no heartbeat after the 412", not after)
    cx.common_item_checks(wid, sid, tok, expect_stop=False)
    wv = ctl.work(wid, wait_state="stopped", timeout=8)
    check("fake records the lease expiry once nobody heartbeats (ttl 4 s)",
          wv["lease_expirations"] and wv["state"] == "stopped", short(wv["lease_expirations"]))


def s_healthcheck(cx):
    ctl = cx.ctl
    w = ctl.call("POST", f"/_fake/environments/{cx.env['id']}/work", {"data": {"type": "healthcheck"}})
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=15)
    if not check("healthcheck item -> stopped", ok, wv["state"]):
        return
    rs = ctl.requests(work_id=wid)
    eps = [r["endpoint"] for r in rs]
    check("healthcheck: exactly ack then force-stop, no heartbeat", eps == ["E2", "E4"], short(eps))
    check("healthcheck: stop {\"force\": true} with the environment key",
          rs and rs[-1]["body"] == {"force": True} and bearer(rs[-1]) == cx.env["key"])
    check("healthcheck: no session calls", rs and not [r for r in ctl.requests(since=rs[0]["seq"] - 1)
                                                         if r["endpoint"] in ("E5", "E6", "E7", "E8")
                                                         and r["t"] <= rs[-1]["t_done"]])
    cx.wait_next_poll(rs[-1]["seq"])


def s_graceful_stop(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    _, ok = ctl.wait_requests(1, 15, endpoint="E3", work_id=wid)
    ctl.wait_requests(1, 10, endpoint="E7", session_id=sid)
    ctl.call("POST", f"/_fake/work/{wid}/stop", {"force": False})
    wv, ok = cx.wait_stopped(wid, timeout=10)
    if not check("graceful stop requested by the server -> worker force-stops", ok, wv["state"]):
        return
    hb = wv["heartbeats"]
    check("heartbeat reported state stopping", any(h.get("state") == "stopping" for h in hb),
          short([h.get("state") for h in hb]))
    check("transitions active->stopping->stopped",
          [t["to"] for t in wv["transitions"]][-2:] == ["stopping", "stopped"])
    stops = ctl.requests(endpoint="E4", work_id=wid)
    check("one force-stop, answered 200", len(stops) == 1 and stops[0]["status"] == 200)
    cx.wait_next_poll(stops[-1]["seq"] if stops else 0)
    cx.common_item_checks(wid, sid, tok)


def s_stop_409(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    _, ok = ctl.wait_requests(1, 15, endpoint="E3", work_id=wid)
    ctl.wait_requests(1, 10, endpoint="E7", session_id=sid)
    ctl.call("POST", f"/_fake/work/{wid}/stop", {"force": True})
    stops, ok = ctl.wait_requests(3, 12, endpoint="E4", work_id=wid)
    check("server-stopped item: heartbeat says stopped, worker's stop gets 409, client retries (3 requests)",
          ok and all(r["status"] == 409 for r in stops),
          short([(r["status"], hdr(r, "x-stainless-retry-count")) for r in stops]))
    check("x-stainless-retry-count 0,1,2 on the stop attempts",
          [hdr(r, "x-stainless-retry-count") for r in stops] == ["0", "1", "2"])
    ok = cx.wait_next_poll(stops[-1]["seq"] if stops else 0, timeout=10)
    check("409 on stop tolerated: polling resumes", ok and cx.worker.alive)
    time.sleep(0.3)
    check("no further stop attempts", len(ctl.requests(endpoint="E4", work_id=wid)) == 3)


def s_stream_reconnect(cx):
    ctl = cx.ctl
    sid = "sesn_fid_sse_" + secrets.token_hex(4)
    pat = f"^/v1/sessions/{sid}/events/stream$"
    ctl.fault(endpoint="E6", path=pat, action="sse_error", after_events=1, times=1)
    ctl.fault(endpoint="E6", path=pat, skip=1, action="sse_drop", after_events=1, times=1)
    ctl.fault(endpoint="E6", path=pat, skip=2, action="sse_abort", after_events=0, times=1)
    first_page = "^limit=1000$"
    sid, w = cx.new_session(sid=sid, work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    _, ok = ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    if not check("attached", ok):
        return
    ctl.append(sid, tool_use("toolu_a", "bash", {"command": "echo a"}))
    e7, ok = ctl.wait_requests(2, 10, endpoint="E7", session_id=sid, query=first_page)
    check("event: error frame -> reconnect and a new history read", ok)
    ctl.append(sid, tool_use("toolu_b", "bash", {"command": "echo b"}), broadcast=False)  # missed while away
    ctl.append(sid, tool_use("toolu_c", "bash", {"command": "echo c"}))
    e7, ok = ctl.wait_requests(3, 10, endpoint="E7", session_id=sid, query=first_page)
    check("stream closed cleanly by the server -> reconnect and a new history read", ok)
    e7, ok = ctl.wait_requests(4, 10, endpoint="E7", session_id=sid, query=first_page)
    check("stream connection reset -> reconnect and a new history read", ok)
    _, ok = ctl.wait_requests(3, 15, endpoint="E8", session_id=sid)
    ctl.append(sid, idle())
    wv, ok2 = cx.wait_stopped(wid, timeout=15)
    check("session ends after the idle", ok2)
    e6 = ctl.requests(endpoint="E6", session_id=sid)
    e7 = [r for r in ctl.requests(endpoint="E7", session_id=sid) if "page" not in r["query"]]
    check("four stream connections, four history reads", len(e6) == 4 and len(e7) == 4, f"{len(e6)} {len(e7)}")
    order_ok = len(e6) == len(e7) and all(a["t_headers"] < b["t"] for a, b in zip(e6, e7)) and \
        all(b["t"] < a2["t"] for b, a2 in zip(e7, e6[1:]))
    check("each (re)connect: stream first, then the list", order_ok)
    streams = ctl.session(sid)["streams"]
    reasons = [s_["close_reason"] for s_ in streams]
    check("fake ended streams with event: error / clean close / reset",
          reasons[:3] == ["fault_error", "fault_drop", "fault_abort"], short(reasons))
    gaps = [e6[i + 1]["t"] - streams[i]["t_close"] for i in range(min(3, len(streams), len(e6) - 1))]
    check("reconnect backoff 0.5 s after a parsed event, doubled (1 s) after a connection without events",
          len(gaps) == 3 and 0.4 <= gaps[0] <= 1.2 and 0.4 <= gaps[1] <= 1.2 and 0.9 <= gaps[2] <= 1.8,
          ", ".join(f"{g:.2f}" for g in gaps))
    res = [e for e in stored_results(ctl, sid)]
    counts = {t: sum(1 for e in res if e.get("tool_use_id") == t) for t in ("toolu_a", "toolu_b", "toolu_c")}
    check("a (before the error), b (missed, found by re-list), c (live) each answered exactly once",
          counts == {"toolu_a": 1, "toolu_b": 1, "toolu_c": 1}, short(counts))
    b_post = [r for r, ev, _ in results_for(ctl, sid) if ev and ev.get("tool_use_id") == "toolu_b"]
    check("the missed call ran after the third history read", b_post and len(e7) >= 3 and b_post[0]["t"] > e7[2]["t"])
    cx.wait_next_poll(ctl.last_seq() - 1)
    cx.common_item_checks(wid, sid, tok)


def s_send_503(cx):
    ctl = cx.ctl
    sid = "sesn_fid_503_" + secrets.token_hex(4)
    ctl.fault(method="POST", endpoint="E8", path=f"^/v1/sessions/{sid}/events$", status=503, times=4)
    sid, w = cx.new_session(sid=sid, work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    ctl.append(sid, tool_use("toolu_retry", "bash", {"command": "echo retried"}))
    posts, ok = ctl.wait_requests(5, 20, endpoint="E8", session_id=sid)
    statuses = [r["status"] for r in posts]
    # wait for the last one to complete
    time.sleep(0.2)
    posts = ctl.requests(endpoint="E8", session_id=sid)
    statuses = [r["status"] for r in posts]
    check("send 503 x4: client retries (3 attempts) then a worker-level retry succeeds",
          statuses == [503, 503, 503, 503, 200], short(statuses))
    check("x-stainless-retry-count 0,1,2 then 0,1",
          [hdr(r, "x-stainless-retry-count") for r in posts] == ["0", "1", "2", "0", "1"],
          short([hdr(r, "x-stainless-retry-count") for r in posts]))
    check("every attempt carries the identical body", len({r["body_text"] for r in posts}) == 1)
    if len(posts) >= 4:
        g = posts[3]["t"] - posts[2]["t_done"]
        check("worker-level retry waits U[0.5,1) s after the client gave up", 0.45 <= g <= 1.3, f"{g:.2f}s")
    res = [e for e in stored_results(ctl, sid) if e.get("tool_use_id") == "toolu_retry"]
    check("exactly one result stored", len(res) == 1 and text_of(res[0]) == "retried")
    ctl.append(sid, idle())
    wv, ok = cx.wait_stopped(wid, timeout=15)
    check("session ends after the idle", ok)
    cx.wait_next_poll(ctl.last_seq() - 1)


def make_zip(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, mode) in files.items():
            zi = zipfile.ZipInfo(name)
            zi.create_system = 3
            zi.external_attr = (0o100000 | mode) << 16
            z.writestr(zi, data)
    return base64.b64encode(buf.getvalue()).decode()


def s_skills(cx):
    ctl = cx.ctl
    skill_md = "# PDF skill\nUse it.\n"
    sk = ctl.call("POST", "/_fake/skills", {"versions": [
        {"name": "old", "archive_b64": make_zip({"old/SKILL.md": ("old", 0o644)})},
        {"name": "pdf", "archive_b64": make_zip({"pdf/SKILL.md": (skill_md, 0o644),
                                                 "pdf/scripts/run.sh": ("#!/bin/sh\necho run\n", 0o755)})},
    ]})
    skill_id, latest = sk["skill_id"], sk["latest"]
    seq0 = ctl.last_seq()
    sid, w = cx.new_session(skills=[{"type": "custom", "skill_id": skill_id, "version": "latest"}],
                            work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    _, ok = ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    ctl.append(sid, tool_use("toolu_skill", "read", {"file_path": "skills/pdf/SKILL.md"}),
               tool_use("toolu_mode", "bash", {"command": "stat -c %a skills/pdf skills/pdf/scripts/run.sh "
                                                          "skills/pdf/SKILL.md | tr '\\n' ' '"}))
    _, ok = ctl.wait_requests(2, 15, endpoint="E8", session_id=sid)
    ctl.append(sid, idle())
    wv, ok = cx.wait_stopped(wid, timeout=15)
    check("skill session ends", ok)
    e9 = ctl.requests(endpoint="E9", skill_id=skill_id, since=seq0)
    e10 = ctl.requests(endpoint="E10", skill_id=skill_id, since=seq0)
    check("E9 resolves version 'latest'", len(e9) == 1 and e9[0]["path"].endswith("/versions/latest"),
          short([r["path"] for r in e9]))
    check("E10 downloads by the concrete version id", len(e10) == 1 and
          e10[0]["path"] == f"/v1/skills/{skill_id}/versions/{latest}/content", short([r["path"] for r in e10]))
    check("skills calls: sessions token, no anthropic-beta, anthropic-version present",
          all(bearer(r) == tok and hdr(r, "anthropic-beta") is None and hdr(r, "anthropic-version") == API_VERSION
              for r in e9 + e10))
    check("E10 sends Accept: application/binary", e10 and hdr(e10[0], "accept") == "application/binary",
          e10 and hdr(e10[0], "accept"))
    e6 = ctl.requests(endpoint="E6", session_id=sid)
    check("skills downloaded before the runner attaches", e10 and e6 and e10[0]["t_done"] <= e6[0]["t"])
    res = {e.get("tool_use_id"): e for e in stored_results(ctl, sid)}
    check("wrapper dir stripped: skills/pdf/SKILL.md readable by the tools",
          text_of(res.get("toolu_skill", {})) == skill_md, short(res.get("toolu_skill")))
    check("modes: skill dir 0700, executable 0755, other files 0644",
          text_of(res.get("toolu_mode", {})).split() == ["700", "755", "644"], short(res.get("toolu_mode")))
    cx.wait_next_poll(ctl.last_seq() - 1)
    check("skill directory removed at teardown", not os.path.exists(os.path.join(cx.workdir, "skills", "pdf")))
    cx.common_item_checks(wid, sid, tok)


def s_memory(cx):
    ctl = cx.ctl
    store = ctl.call("POST", "/_fake/memory_stores", {"name": "notes", "memories": [
        {"path": "/notes.md", "content": "remember this"}, {"path": "/sub/deep.md", "content": "deep"}]})
    mid = store["id"]
    seq0 = ctl.last_seq()
    sid, w = cx.new_session(resources=[{"type": "memory_store", "memory_store_id": mid, "access": "read_write",
                                        "name": "notes"}], work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    _, ok = ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    if not check("memory session attached", ok):
        return
    ctl.append(sid, tool_use("toolu_mread", "read", {"file_path": "memory/notes/notes.md"}),
               tool_use("toolu_mwrite", "write", {"file_path": "memory/notes/new.md", "content": "fresh"}))
    _, ok = ctl.wait_requests(2, 15, endpoint="E8", session_id=sid)
    ctl.append(sid, idle())
    wv, ok = cx.wait_stopped(wid, timeout=20)
    check("memory session ends", ok)
    mem = [r for r in ctl.requests(memory_store_id=mid, since=seq0)]
    lists = [r for r in mem if r["endpoint"] == "E11"]
    check("download lists view=full limit=20 first", lists and lists[0]["query"].get("view") == ["full"] and
          lists[0]["query"].get("limit") == ["20"], short([r["raw_query"] for r in lists]))
    check("sync lists view=basic limit=100", any(r["query"].get("view") == ["basic"] and
                                                 r["query"].get("limit") == ["100"] for r in lists))
    check("memory calls: sessions token + anthropic-beta agent-memory-2026-07-22",
          mem and all(bearer(r) == tok and BETA_MEM in betas(r) and BETA_MA not in betas(r) for r in mem))
    res = {e.get("tool_use_id"): e for e in stored_results(ctl, sid)}
    check("downloaded memory visible to the tools", text_of(res.get("toolu_mread", {})) == "remember this")
    creates = [r for r in mem if r["endpoint"] == "E13"]
    check("final sync creates the new file (E13 {path, content})",
          len(creates) == 1 and creates[0]["body"] == {"path": "/new.md", "content": "fresh"} and
          creates[0]["status"] == 200, short([r["body"] for r in creates]))
    st = ctl.call("GET", f"/_fake/memory_stores/{mid}")
    check("fake store now holds /new.md", any(m["path"] == "/new.md" and m["content"] == "fresh"
                                              for m in st["memories"]))
    stop = ctl.requests(endpoint="E4", work_id=wid)
    check("memory upload happens before the force-stop", creates and stop and creates[0]["t"] < stop[0]["t"])
    cx.wait_next_poll(ctl.last_seq() - 1)
    cx.common_item_checks(wid, sid, tok)


def s_memory_no_token(cx):
    ctl = cx.ctl
    store = ctl.call("POST", "/_fake/memory_stores", {"memories": [{"path": "/x.md", "content": "x"}]})
    seq0 = ctl.last_seq()
    sid, w = cx.new_session(resources=[{"type": "memory_store", "memory_store_id": store["id"],
                                        "access": "read_write", "name": "nt"}], work={"secret": False})
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=15)
    if not check("memory store without a sessions token -> item fails and is force-stopped", ok):
        return
    eps = [r["endpoint"] for r in ctl.requests(session_id=sid)]
    check("no events calls, no memory calls", not set(eps) & {"E6", "E7", "E8"} and
          not ctl.requests(memory_store_id=store["id"], since=seq0), short(eps))
    stop = ctl.requests(endpoint="E4", work_id=wid)
    check("force-stop with the environment key", stop and bearer(stop[0]) == cx.env["key"])
    cx.wait_next_poll(stop[-1]["seq"] if stop else 0)


def s_terminated_session(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(status="terminated", work={"ttl_seconds": 4})
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=15)
    if not check("terminated session -> item force-stopped", ok):
        return
    eps = [r["endpoint"] for r in ctl.requests(session_id=sid)]
    # The SDK's heartbeat thread races its stop: its one beat may land after it.
    check("terminated: at most one NO_HEARTBEAT beat, session fetch, stop; no events calls",
          not set(eps) & {"E6", "E7", "E8"} and eps.count("E3") <= 1 and "E5" in eps
          and [e for e in eps if e != "E3"][-1] == "E4", short(eps))
    cx.wait_next_poll(ctl.last_seq() - 1)


def s_live_terminated(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid = w["id"]
    ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    t0 = time.time()
    ctl.append(sid, {"type": "session.status_terminated"})
    wv, ok = cx.wait_stopped(wid, timeout=10)
    stop = ctl.requests(endpoint="E4", work_id=wid)
    dt = stop[0]["t"] - t0 if stop else -1
    check("live session.status_terminated -> runner stops at once -> force-stop", ok and 0 <= dt < 1.5, f"{dt:.2f}s")
    cx.wait_next_poll(ctl.last_seq() - 1)


def s_history_replay(cx):
    ctl = cx.ctl
    hist = [
        tool_use("toolu_h1", "bash", {"command": "echo h1"}),
        {"type": "user.tool_result", "tool_use_id": "toolu_h1", "is_error": False,
         "content": [{"type": "text", "text": "h1"}]},
        tool_use("toolu_h2", "bash", {"command": "echo h2"}),
    ]
    sid, w = cx.new_session(events=hist, work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    posts, ok = ctl.wait_requests(1, 15, endpoint="E8", session_id=sid)
    check("history tool_use without a result executed after attach", ok and
          posts[0]["body"]["events"][0]["tool_use_id"] == "toolu_h2")
    ctl.append(sid, tool_use("toolu_h2", "bash", {"command": "echo h2"}), store=False)  # a replay on the stream
    ctl.append(sid, tool_use("toolu_h3", "bash", {"command": "echo h3"}))
    ctl.wait_requests(2, 10, endpoint="E8", session_id=sid)
    ctl.append(sid, idle())
    wv, ok = cx.wait_stopped(wid, timeout=15)
    ids = [ev.get("tool_use_id") for _, ev, _ in results_for(ctl, sid)]
    check("answered call in history not executed; replayed call executed once",
          ids == ["toolu_h2", "toolu_h3"], short(ids))
    cx.wait_next_poll(ctl.last_seq() - 1)
    cx.common_item_checks(wid, sid, tok)


def s_sse_framing(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid, tok = w["id"], w["sessions_token"]
    ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    ev = ctl.append(sid, tool_use("toolu_noname", "bash", {"command": "echo noname"}), broadcast=False)[0]
    frames = [
        "data: " + json.dumps(ev) + "\n\n",  # no event: field -> dropped by the SDK
        ": a comment line\n\n",
        "event: agent.tool_use\ndata: \n\n",  # empty data -> dropped
        'event: span.brand_new_kind\ndata: {"type": "span.brand_new_kind", "id": "sevt_unknown_1", '
        '"processed_at": "2026-01-01T00:00:00Z"}\n\n',  # unknown type tolerated
    ]
    ctl.call("POST", f"/_fake/sessions/{sid}/sse", {"frames": frames})
    ctl.append(sid, tool_use("toolu_named", "bash", {"command": "echo named"}))
    ctl.wait_requests(1, 10, endpoint="E8", session_id=sid)
    ctl.append(sid, idle())
    wv, ok = cx.wait_stopped(wid, timeout=15)
    ids = [e.get("tool_use_id") for _, e, _ in results_for(ctl, sid)]
    check("frame without event: ignored, empty data ignored, unknown type tolerated; named frame executed",
          ok and ids == ["toolu_named"], short(ids))
    e6 = ctl.requests(endpoint="E6", session_id=sid)
    check("no reconnect caused by the odd frames", len(e6) == 1, f"{len(e6)} streams")
    st = ctl.session(sid)["streams"]
    check("the SDK tolerated ping frames (fake sent some)", st and st[0]["pings_sent"] >= 1, short(st))
    cx.wait_next_poll(ctl.last_seq() - 1)


def s_requires_action(cx):
    ctl = cx.ctl
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid = w["id"]
    ctl.wait_requests(1, 15, endpoint="E7", session_id=sid)
    ctl.append(sid, idle("requires_action"))
    wv = ctl.work(wid, wait_state="stopped", timeout=MAX_IDLE + 1.5)
    check(f"requires_action idle: still running after max_idle + 1.5 s", wv.get("timed_out") and
          wv["state"] == "active", wv["state"])
    t0 = time.time()
    ctl.append(sid, idle("retries_exhausted"))
    wv, ok = cx.wait_stopped(wid, timeout=10)
    stop = ctl.requests(endpoint="E4", work_id=wid)
    dt = stop[0]["t"] - t0 if stop else -1
    check("any other stop_reason (retries_exhausted) ends the turn -> stop after max_idle",
          ok and MAX_IDLE - 0.1 <= dt <= MAX_IDLE + 2.5, f"{dt:.2f}s")
    cx.wait_next_poll(ctl.last_seq() - 1)


def s_poll_errors(cx):
    ctl = cx.ctl
    seq0 = ctl.last_seq()
    ctl.fault(endpoint="E1", status=503, headers={"x-should-retry": "false"}, times=1)
    ctl.fault(endpoint="E1", status=429, headers={"retry-after-ms": "50"}, times=1)
    polls, ok = ctl.wait_requests(3, 12, endpoint="E1", environment_id=cx.env["id"], since=seq0)
    st = [p["status"] for p in polls]
    check("poll 503 + x-should-retry: false -> no client retry; then 429 + retry-after-ms -> client retry",
          ok and st == [503, 429, 200], short(st))
    if len(polls) >= 3:
        g1 = polls[1]["t"] - polls[0]["t_done"]
        g2 = polls[2]["t"] - polls[1]["t_done"]
        check("worker backoff after a failed poll is 2 s + U[0,1)", 1.95 <= g1 <= 3.3, f"{g1:.2f}s")
        check("client honours retry-after-ms (50 ms)", 0.03 <= g2 <= 0.5, f"{g2:.3f}s")
        check("the client retry carries x-stainless-retry-count 1",
              hdr(polls[2], "x-stainless-retry-count") == "1", hdr(polls[2], "x-stainless-retry-count"))
    ctl.call("POST", "/_fake/faults/clear")


def s_ack_errors(cx):
    ctl = cx.ctl
    # ack 500 (client retries exhausted) -> item dropped locally, no stop, re-offered after the 5 s reclaim
    ctl.fault(endpoint="E2", status=500, times=3)
    sid, w = cx.new_session(events=[idle()], work={"ttl_seconds": 4})
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=25)
    if not check("ack 500 x3 -> the item is served after the reclaim delay", ok, wv["state"]):
        return
    acks = ctl.requests(endpoint="E2", work_id=wid)
    check("first ack attempt: 3 requests (client retries), all 500; then one 200",
          [a["status"] for a in acks] == [500, 500, 500, 200], short([a["status"] for a in acks]))
    offers = wv["offers"]
    check("the fake re-offered the un-acked item >= 5 s after the first offer",
          len(offers) == 2 and offers[1]["t"] - offers[0]["t"] >= 5.0 and wv["reclaims"] == 1,
          f"{offers[1]['t'] - offers[0]['t']:.2f}s" if len(offers) == 2 else short(offers))
    stops = ctl.requests(endpoint="E4", work_id=wid)
    check("no stop for the dropped attempt (only the final force-stop)",
          len(stops) == 1 and stops[0]["t"] > acks[-1]["t"])
    cx.wait_next_poll(ctl.last_seq() - 1)
    # ack 404 -> force-stop with the environment key, polling continues
    ctl.fault(endpoint="E2", status=404, times=1)
    sid, w = cx.new_session(work={"ttl_seconds": 4})
    wid = w["id"]
    wv, ok = cx.wait_stopped(wid, timeout=15)
    rs = ctl.requests(work_id=wid)
    check("ack 404 -> force-stop {force: true} with the environment key, nothing else",
          ok and [r["endpoint"] for r in rs] == ["E2", "E4"] and rs[1]["body"] == {"force": True} and
          bearer(rs[1]) == cx.env["key"], short([(r["endpoint"], r["status"]) for r in rs]))
    ok = cx.wait_next_poll(rs[-1]["seq"] if rs else 0)
    check("polling continues after the fatal ack", ok)


def s_heartbeat_lost(cx):
    ctl = cx.ctl
    sid = "sesn_fid_hb_" + secrets.token_hex(4)
    # beat 1 ok; beat 2: 503 without client retries; beats 3+: blackholed (never answered)
    ctl.fault(endpoint="E3", path=r"/heartbeat$", skip=1, times=1, status=503, headers={"x-should-retry": "false"})
    ctl.fault(endpoint="E3", path=r"/heartbeat$", skip=2, times=None, action="hang", delay_ms=8000)
    sid, w = cx.new_session(sid=sid, work={"ttl_seconds": 4, "on_lease_expiry": "stop"})
    wid, tok = w["id"], w["sessions_token"]
    hbs, ok = ctl.wait_requests(1, 15, endpoint="E3", work_id=wid)
    t_ok = hbs[0]["t_done"] if ok else time.time()
    ok = cx.wait_next_poll(hbs[0]["seq"] if hbs else 0, timeout=15)
    check("transient heartbeat failures for > ttl -> lease assumed lost, worker moves on", ok)
    hb = ctl.requests(endpoint="E3", work_id=wid)
    poll = ctl.requests(endpoint="E1", environment_id=cx.env["id"], since=hb[0]["seq"])
    lost_after = poll[0]["t"] - t_ok if poll else -1
    check("lost once a failure ends more than ttl (4 s) after the last good beat", 4.0 < lost_after < 7.5,
          f"{lost_after:.2f}s")
    gaps = [b["t"] - a["t"] for a, b in zip(hb[1:], hb[2:])]
    check("blackholed beats abandoned and retried every ~interval (2 s)", gaps and all(1.9 <= g <= 2.8 for g in gaps),
          ", ".join(f"{g:.2f}" for g in gaps))
    cx.common_item_checks(wid, sid, tok, expect_stop=False)


SCENARIOS = [
    ("idle-polls", s_idle_polls),
    ("full-session", s_full_session),
    ("no-secret", s_no_secret),
    ("garbage-secret", s_garbage_secret),
    ("secret-no-token", s_secret_without_token),
    ("heartbeat-412", s_heartbeat_412),
    ("healthcheck", s_healthcheck),
    ("graceful-stop", s_graceful_stop),
    ("stop-409", s_stop_409),
    ("stream-reconnect", s_stream_reconnect),
    ("send-503", s_send_503),
    ("skills", s_skills),
    ("memory", s_memory),
    ("memory-no-token", s_memory_no_token),
    ("terminated", s_terminated_session),
    ("live-terminated", s_live_terminated),
    ("history-replay", s_history_replay),
    ("sse-framing", s_sse_framing),
    ("requires-action", s_requires_action),
    ("poll-errors", s_poll_errors),
    ("ack-errors", s_ack_errors),
    ("heartbeat-lost", s_heartbeat_lost),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="print the SDK worker's log at the end")
    ap.add_argument("--only", default=None, help="comma-separated scenario names (fake self-checks always run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    args = ap.parse_args()
    t_start = time.monotonic()
    print(f"anthropic {anthropic.__version__}; contract: docs/claude-managed-agents.md", flush=True)

    handler = ListHandler()
    lg = logging.getLogger("anthropic")
    lg.setLevel(logging.INFO)
    lg.addHandler(handler)
    lg.propagate = False

    # max_page_size 3 makes the worker follow next_page on E7/E11; pings every second.
    fake = FakeControlPlane(port=0, max_page_size=3, ping_interval_ms=1000).start()
    ctl = Ctl(fake.url)
    workdir = tempfile.mkdtemp(prefix="cma-fidelity-")
    worker = None
    try:
        t0 = time.monotonic()
        try:
            fake_self_checks(ctl)
        except Exception:
            check("fake self-checks ran to completion", False, traceback.format_exc(limit=3).strip().splitlines()[-1])
            traceback.print_exc()
        print(f"-- fake self-checks: {time.monotonic() - t0:.1f}s", flush=True)
        env = ctl.call("POST", "/_fake/environments", {})
        worker = WorkerThread(fake.url, env["id"], env["key"], workdir).start()
        cx = Ctx(ctl, env, workdir, worker)
        only = set(args.only.split(",")) if args.only else None
        for name, fn in SCENARIOS:
            if only and name not in only:
                continue
            CURRENT[0] = name
            t0 = time.monotonic()
            if not worker.alive:
                check("SDK worker is running", False, repr(worker.error))
                break
            try:
                fn(cx)
            except Exception:
                check("scenario ran to completion", False, traceback.format_exc(limit=4).strip().splitlines()[-1])
                traceback.print_exc()
            finally:
                ctl.call("POST", "/_fake/faults/clear")
            print(f"-- {name}: {time.monotonic() - t0:.1f}s", flush=True)
        CURRENT[0] = "end"
        check("SDK worker still running after all scenarios", worker.alive, repr(worker.error))
        errs = [e for e in ctl.call("GET", "/_fake/journal")["data"] if e["kind"] == "internal_error"]
        check("fake had no internal errors", not errs, short(errs))
    finally:
        if worker:
            worker.stop()
        fake.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [r for r in RESULTS if not r[2]]
    if args.verbose or failed:
        print("---- SDK worker log (last 80 lines) ----", file=sys.stderr)
        for ln in handler.lines[-80:]:
            print(ln, file=sys.stderr)
    total = time.monotonic() - t_start
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed, {len(failed)} failed, {total:.1f}s")
    for scen, name, _, detail in failed:
        print(f"  FAILED [{scen}] {name}  ({detail})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
