"""The HTTP handler: routing, the request log, fault application, credentials
and headers, and the worker-facing endpoints of work items and sessions (E1-E8);
skills, memory, E8's event validation and the SSE stream are in modules of their
own, and the control API under /_fake is handed to the server object."""

from __future__ import annotations

import copy
import json
import re
import socket
import struct
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .events import accept_send
from .memory import memory_api, store_for
from .skills import skill_api
from .state import heartbeat_412_body
from .stream import StreamMixin
from .util import (
    BETA_MANAGED_AGENTS,
    BETA_MEMORY,
    NO_HEARTBEAT,
    Abort,
    ApiError,
    decode_cursor,
    encode_cursor,
    error_body,
    new_id,
    parse_int,
    rfc3339,
)

if TYPE_CHECKING:
    from .server import FakeControlPlane

ROUTES = [
    ("E1", "GET", r"/v1/environments/(?P<environment_id>[^/]+)/work/poll"),
    ("E2", "POST", r"/v1/environments/(?P<environment_id>[^/]+)/work/(?P<work_id>[^/]+)/ack"),
    ("E3", "POST", r"/v1/environments/(?P<environment_id>[^/]+)/work/(?P<work_id>[^/]+)/heartbeat"),
    ("E4", "POST", r"/v1/environments/(?P<environment_id>[^/]+)/work/(?P<work_id>[^/]+)/stop"),
    ("E6", "GET", r"/v1/sessions/(?P<session_id>[^/]+)/events/stream"),
    ("E7", "GET", r"/v1/sessions/(?P<session_id>[^/]+)/events"),
    ("E8", "POST", r"/v1/sessions/(?P<session_id>[^/]+)/events"),
    ("E5", "GET", r"/v1/sessions/(?P<session_id>[^/]+)"),
    ("E10", "GET", r"/v1/skills/(?P<skill_id>[^/]+)/versions/(?P<version>[^/]+)/content"),
    ("E9", "GET", r"/v1/skills/(?P<skill_id>[^/]+)/versions/(?P<version>[^/]+)"),
    ("E11", "GET", r"/v1/memory_stores/(?P<memory_store_id>[^/]+)/memories"),
    ("E13", "POST", r"/v1/memory_stores/(?P<memory_store_id>[^/]+)/memories"),
    ("E12", "GET", r"/v1/memory_stores/(?P<memory_store_id>[^/]+)/memories/(?P<memory_id>[^/]+)"),
    ("E14", "POST", r"/v1/memory_stores/(?P<memory_store_id>[^/]+)/memories/(?P<memory_id>[^/]+)"),
    ("E15", "DELETE", r"/v1/memory_stores/(?P<memory_store_id>[^/]+)/memories/(?P<memory_id>[^/]+)"),
]
ROUTES = [(e, m, re.compile("^" + p + "$")) for e, m, p in ROUTES]


class Handler(StreamMixin, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-cma/1.0"
    # TCP_NODELAY, as a production server sets it: with Nagle on, an SSE event
    # written while the worker still owes an ACK waits ~40 ms for it.
    disable_nagle_algorithm = True
    fake: "FakeControlPlane" = None  # set per server subclass

    def log_message(self, fmt, *args):
        if self.fake.verbose:
            sys.stderr.write("fake_cp: " + (fmt % args) + "\n")

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_PATCH(self):
        self.dispatch()

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    # -- plumbing --------------------------------------------------------------

    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send_json(self, status, obj, headers=None, rec=None):
        data = json.dumps(obj).encode("utf-8")
        self.send_bytes(status, data, "application/json", headers, rec)

    def send_bytes(self, status, data, ctype, headers=None, rec=None):
        if rec is not None:
            rec["t_headers"] = time.time()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", new_id("req"))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        if rec is not None:
            with self.fake.state.lock:
                rec["status"] = status
                rec["t_done"] = time.time()
                self.fake.state.cond.notify_all()

    def abort_connection(self, reset=True):
        self.close_connection = True
        try:
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def dispatch(self):
        state = self.fake.state
        t0 = time.time()
        split = urlsplit(self.path)
        path = unquote(split.path)
        raw_query = split.query
        query = parse_qs(raw_query, keep_blank_values=True)
        try:
            body_bytes = self.read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        if path.startswith("/_fake"):
            self.handle_control(path, query, body_bytes)
            return
        endpoint, params = None, {}
        method_ok = False
        for ep, m, rx in ROUTES:
            mm = rx.match(split.path)
            if mm:
                if m == self.command:
                    endpoint, params, method_ok = ep, {k: unquote(v) for k, v in mm.groupdict().items()}, True
                    break
                endpoint = "?"  # the path exists, the method does not
        headers = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = v if k not in headers else headers[k] + ", " + v
        try:
            parsed_body = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            parsed_body = None
        auth = headers.get("authorization")
        token = None
        if auth and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        with state.lock:
            rec = {
                "seq": len(state.requests) + 1,
                "t": t0,
                "t_headers": None,
                "t_done": None,
                "method": self.command,
                "path": path,
                "query": query,
                "raw_query": raw_query,
                "headers": headers,
                "body": parsed_body,
                "body_text": body_bytes.decode("utf-8", "replace"),
                "body_len": len(body_bytes),
                "endpoint": endpoint if method_ok else None,
                "environment_id": params.get("environment_id"),
                "work_id": params.get("work_id"),
                "session_id": params.get("session_id"),
                "skill_id": params.get("skill_id"),
                "memory_store_id": params.get("memory_store_id"),
                "memory_id": params.get("memory_id"),
                "credential": state.classify_credential(token),
                "status": None,
                "fault": None,
            }
            if rec["work_id"] and rec["work_id"] in state.work:
                rec["session_id"] = (state.work[rec["work_id"]].data or {}).get("id") \
                    if state.work[rec["work_id"]].data.get("type") == "session" else None
            state.requests.append(rec)
            rule = None
            for r in state.faults:
                # every rule counts every request its filters match, applied or not
                if not r.matches(self.command, path, raw_query, rec["endpoint"]):
                    continue
                r.matched += 1
                if rule is None and r.matched > r.skip and r.has_capacity():
                    r.applied += 1
                    rule = r
                    rec["fault"] = r.id
                    state.journal("fault_applied", fault=r.id, action=r.action, request_seq=rec["seq"])
            state.cond.notify_all()
        try:
            if rule is not None and rule.action in ("respond", "delay", "hang", "reset"):
                if rule.action == "reset":
                    raise Abort(reset=True)
                if rule.action == "hang":
                    delay = rule.delay_ms
                    state.stopping.wait(None if delay is None else delay / 1000.0)
                    raise Abort(reset=False)
                if rule.delay_ms:
                    if state.stopping.wait(rule.delay_ms / 1000.0):
                        raise Abort(reset=False)
                if rule.action == "respond":
                    body = rule.body
                    if body is None:
                        body = self.default_fault_body(rule.status, rec)
                    if isinstance(body, (dict, list)) or body is None:
                        self.send_json(rule.status, body, rule.headers, rec)
                    else:
                        self.send_bytes(rule.status, str(body).encode(), "application/json", rule.headers, rec)
                    return
            if not method_ok:
                if endpoint == "?":
                    raise ApiError(405, f"method {self.command} not allowed on {path}")
                raise ApiError(404, f"no route for {self.command} {path}")
            sse_rule = rule if (rule is not None and rule.action.startswith("sse_")) else None
            self.handle_api(endpoint, params, query, parsed_body, body_bytes, headers, token, rec, sse_rule)
        except Abort as a:
            with state.lock:
                rec["status"] = 0
                rec["t_done"] = time.time()
                state.cond.notify_all()
            self.abort_connection(reset=a.reset)
        except ApiError as e:
            with state.lock:
                if e.status >= 400 and e.status not in (404,):
                    state.journal("rejected", request_seq=rec["seq"], status=e.status, message=e.message)
            self.send_json(e.status, e.body(), e.headers, rec)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - bug in the fake
            traceback.print_exc()
            with state.lock:
                state.journal("internal_error", request_seq=rec["seq"], error=repr(e))
            try:
                self.send_json(500, error_body(500, f"fake internal error: {e!r}"), None, rec)
            except OSError:
                self.close_connection = True

    def default_fault_body(self, status, rec):
        state = self.fake.state
        if status == 412 and rec["endpoint"] == "E3":
            with state.lock:
                item = state.work.get(rec["work_id"])
                return heartbeat_412_body(item)
        return error_body(status, f"injected fault: HTTP {status}")

    # -- the worker-facing API -------------------------------------------------

    def require_headers(self, endpoint, headers):
        state = self.fake.state
        if not state.config["strict_headers"]:
            return
        if not headers.get("anthropic-version"):
            raise ApiError(400, "anthropic-version: header is required")
        betas = [b.strip() for b in (headers.get("anthropic-beta") or "").split(",") if b.strip()]
        need = None
        if endpoint in ("E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8"):
            need = BETA_MANAGED_AGENTS
        elif endpoint in ("E11", "E12", "E13", "E14", "E15"):
            need = BETA_MEMORY
        if need and need not in betas:
            raise ApiError(400, f"anthropic-beta: this endpoint requires the {need} beta header")

    def handle_api(self, ep, params, query, body, body_bytes, headers, token, rec, sse_rule):
        state = self.fake.state
        cred = rec["credential"]
        if cred["kind"] in ("none", "unknown"):
            raise ApiError(401, "invalid bearer token" if token else "missing Authorization bearer token")
        self.require_headers(ep, headers)
        q1 = {k: v[-1] for k, v in query.items()}
        if ep == "E6":
            self.handle_stream(params["session_id"], cred, rec, sse_rule)
            return
        if ep == "E1":
            self.handle_poll(params["environment_id"], cred, q1, headers, rec)
            return
        with state.lock:
            status, obj = self.api_locked(ep, params, q1, body, body_bytes, cred, rec)
        if isinstance(obj, bytes):
            self.send_bytes(status, obj, "application/octet-stream", None, rec)
        else:
            self.send_json(status, obj, None, rec)

    def handle_poll(self, env_id, cred, q, headers, rec):
        state = self.fake.state
        with state.lock:
            if env_id not in state.environments:
                raise ApiError(404, f"environment {env_id} not found", "environment_not_found")
            if cred["kind"] != "environment_key" or cred["environment_id"] != env_id:
                raise ApiError(401 if cred["kind"] != "sessions_token" else 403,
                               "poll requires this environment's key")
            block_ms = parse_int(q["block_ms"], "block_ms", 1, 999) if "block_ms" in q else 0
            reclaim = parse_int(q["reclaim_older_than_ms"], "reclaim_older_than_ms", 0, 2**31) \
                if "reclaim_older_than_ms" in q else state.config["reclaim_ms"]
            deadline = time.monotonic() + block_ms / 1000.0
            worker_id = headers.get("anthropic-worker-id")
            while True:
                now = time.monotonic()
                for item in state.work.values():
                    if item.environment_id != env_id or item.state != "queued":
                        continue
                    if item.offered_at is not None and (now - item.offered_at) * 1000.0 < reclaim:
                        continue
                    if item.offered_at is not None:
                        item.reclaims += 1
                        state.journal("reclaim", work_id=item.id)
                    item.offered_at = now
                    item.offers.append({"t": time.time(), "worker_id": worker_id, "request_seq": rec["seq"]})
                    state.journal("offer", work_id=item.id, worker_id=worker_id)
                    view = item.api_view(with_secret=True)
                    break
                else:
                    view = None
                if view is not None or state.stopping.is_set():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.cond.wait(remaining)
            empty_mode = state.config["empty_poll_response"]
        if view is None and empty_mode == "204":
            rec["t_headers"] = time.time()
            self.send_response(204)
            self.send_header("request-id", new_id("req"))
            self.end_headers()
            with state.lock:
                rec["status"], rec["t_done"] = 204, time.time()
                state.cond.notify_all()
            return
        if view is None and empty_mode == "empty":
            self.send_bytes(200, b"", "application/json", None, rec)
            return
        self.send_json(200, view, None, rec)

    def item_for(self, env_id, work_id, cred, env_key_only=False):
        state = self.fake.state
        if env_id not in state.environments:
            raise ApiError(404, f"environment {env_id} not found", "environment_not_found")
        item = state.work.get(work_id)
        if item is None or item.environment_id != env_id:
            raise ApiError(404, f"work item {work_id} not found")
        if cred["kind"] == "environment_key":
            if cred["environment_id"] != env_id:
                raise ApiError(403, "this environment key belongs to another environment")
        elif env_key_only:
            raise ApiError(403, "this call requires the environment key")
        else:
            tok_sid, tok_wid = cred.get("session_id"), cred.get("work_id")
            same = tok_wid == work_id or (tok_sid is not None and tok_sid == (item.data or {}).get("id"))
            if not same:
                raise ApiError(403, "this sessions token does not cover this work item")
        return item

    def session_for(self, sid, cred):
        state = self.fake.state
        sess = state.sessions.get(sid)
        if sess is None:
            raise ApiError(404, f"session {sid} not found")
        if cred["kind"] == "environment_key":
            if cred["environment_id"] != sess.environment_id:
                raise ApiError(403, "this environment key does not cover this session")
        elif cred.get("session_id") != sid:
            raise ApiError(403, "this sessions token does not cover this session")
        return sess

    def api_locked(self, ep, p, q, body, body_bytes, cred, rec):
        state = self.fake.state
        now_t = time.time()
        if ep == "E2":
            item = self.item_for(p["environment_id"], p["work_id"], cred, env_key_only=True)
            if item.state != "queued":
                item.acks.append({"t": now_t, "status": 409, "credential": cred})
                raise ApiError(409, f"work item is {item.state}, not queued")
            item.acks.append({"t": now_t, "status": 200, "credential": cred})
            item.acknowledged_at = rfc3339(now_t)
            item.lease_renewed = time.monotonic()
            item.expiry_recorded = False
            state.transition(item, "starting", "ack")
            return 200, item.api_view()
        if ep == "E3":
            item = self.item_for(p["environment_id"], p["work_id"], cred)
            expected = q.get("expected_last_heartbeat")
            entry = {"t": now_t, "expected_last_heartbeat": expected, "credential": cred,
                     "state_before": item.state, "request_seq": rec["seq"]}
            item.heartbeats.append(entry)
            if "desired_ttl_seconds" in q:
                item.ttl_seconds = parse_int(q["desired_ttl_seconds"], "desired_ttl_seconds", 1, 86400)
            if item.state == "stopped":
                resp = {"type": "work_heartbeat", "last_heartbeat": item.last_heartbeat or "",
                        "lease_extended": False, "state": "stopped", "ttl_seconds": item.ttl_seconds}
            elif item.state == "stopping":
                hb = state.next_heartbeat()
                item.last_heartbeat = item.latest_heartbeat_at = hb
                item.lease_renewed = time.monotonic()
                resp = {"type": "work_heartbeat", "last_heartbeat": hb, "lease_extended": True,
                        "state": "stopping", "ttl_seconds": item.ttl_seconds}
            else:
                if expected is not None:
                    stored = item.last_heartbeat
                    ok = (stored is None and expected == NO_HEARTBEAT) or (stored is not None and expected == stored)
                    if not ok:
                        entry.update(status=412, stored_last_heartbeat=stored)
                        state.journal("heartbeat_precondition_failed", work_id=item.id, expected=expected,
                                      stored=stored)
                        err = ApiError(412, "")
                        err.body = lambda item=item: heartbeat_412_body(item)
                        raise err
                if item.state == "queued":
                    entry.update(status=409)
                    raise ApiError(409, "work item has not been acknowledged")
                hb = state.next_heartbeat()
                item.last_heartbeat = item.latest_heartbeat_at = hb
                item.lease_renewed = time.monotonic()
                item.expiry_recorded = False
                if item.state == "starting":
                    item.started_at = hb
                    state.transition(item, "active", "first heartbeat")
                resp = {"type": "work_heartbeat", "last_heartbeat": hb, "lease_extended": True,
                        "state": item.state, "ttl_seconds": item.ttl_seconds}
            entry.update(status=200, last_heartbeat=resp["last_heartbeat"], state=resp["state"],
                         lease_extended=resp["lease_extended"], ttl_seconds=resp["ttl_seconds"])
            state.cond.notify_all()
            return 200, resp
        if ep == "E4":
            item = self.item_for(p["environment_id"], p["work_id"], cred)
            if body_bytes and not isinstance(body, dict):
                raise ApiError(400, "body must be a JSON object")
            force = (body or {}).get("force", False)
            if not isinstance(force, bool):
                raise ApiError(400, "force: must be a boolean")
            entry = {"t": now_t, "force": force, "state_before": item.state, "credential": cred,
                     "body": body, "request_seq": rec["seq"]}
            item.stops.append(entry)
            if item.state == "stopped":
                entry["status"] = 409
                raise ApiError(409, "work item is already stopped")
            entry["status"] = 200
            if force or item.state == "queued":
                state.transition(item, "stopped", "force stop" if force else "stop")
            elif item.state != "stopping":
                item.stop_requested_at = rfc3339(now_t)
                state.transition(item, "stopping", "graceful stop")
            return 200, item.api_view()
        if ep == "E5":
            return 200, self.session_for(p["session_id"], cred).api_view()
        if ep == "E7":
            sess = self.session_for(p["session_id"], cred)
            limit = parse_int(q["limit"], "limit", 1, 1000) if "limit" in q else 20
            if state.config["max_page_size"]:
                limit = min(limit, int(state.config["max_page_size"]))
            order = q.get("order", "asc")
            if order not in ("asc", "desc"):
                raise ApiError(400, "order: must be asc or desc")
            evs = [e["event"] for e in sess.events]
            if order == "desc":
                evs = evs[::-1]
            offset = 0
            if q.get("page"):
                cur = decode_cursor(q["page"])
                if cur.get("s") != sess.id or cur.get("d") != order:
                    raise ApiError(400, "page cursor does not belong to this listing")
                offset = int(cur.get("o", 0))
            page = evs[offset:offset + limit]
            nxt = encode_cursor({"s": sess.id, "d": order, "o": offset + limit}) \
                if offset + limit < len(evs) else None
            return 200, {"data": copy.deepcopy(page), "next_page": nxt}
        if ep == "E8":
            sess = self.session_for(p["session_id"], cred)
            stored = accept_send(state, sess, body)
            return 200, {"data": stored}
        if ep in ("E9", "E10"):
            return skill_api(state, ep, p)
        # memory
        store = store_for(state, p["memory_store_id"], cred)
        return memory_api(state, ep, store, p, q, body)
    # -- the control API -------------------------------------------------------

    def handle_control(self, path, query, body_bytes):
        try:
            body = json.loads(body_bytes) if body_bytes.strip() else {}
        except ValueError:
            self.send_json(400, {"error": "body is not JSON"})
            return
        q = {k: v[-1] for k, v in query.items()}
        try:
            status, obj = self.fake.control(self.command, path, body, q)
        except ApiError as e:
            status, obj = e.status, {"error": e.message}
        except Exception as e:  # pragma: no cover
            traceback.print_exc()
            status, obj = 500, {"error": repr(e)}
        self.send_json(status, obj)
