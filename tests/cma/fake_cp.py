#!/usr/bin/env python3
"""A faithful fake of the Claude Managed Agents (CMA) control plane, as seen by a
self-hosted environment worker.

Reference: docs/claude-managed-agents.md (the "contract", as the official SDK worker
and hands implement it); endpoint numbers E1-E15 are its endpoint table. Python 3.11
standard library only.

Run it:     python3 tests/cma/fake_cp.py [--port 0] [--host 127.0.0.1] [--config JSON] [--verbose]
            prints exactly one line ``listening on 127.0.0.1:PORT`` to stdout, then
            serves until killed (SIGTERM/SIGINT).
Import it:  fake = FakeControlPlane(port=0).start(); fake.url; fake.control("POST",
            "/_fake/environments", {}); fake.stop()

==============================================================================
1. THE WORKER-FACING API (what a worker talks to)
==============================================================================

Every request must carry ``Authorization: Bearer <token>`` and, unless the
``strict_headers`` setting is off, ``anthropic-version`` (any value; the SDK sends
2026-10-21) and the beta header its family needs: ``anthropic-beta`` containing
``managed-agents-2026-04-01`` for E1-E8, ``agent-memory-2026-07-22`` for E11-E15,
none for E9/E10. A missing header is a 400. Errors always use the generic body
``{"type":"error","error":{"type":<t>,"message":<m>[,"details":{"error_code":...}]}}``.
Unknown credential / none -> 401 authentication_error; a valid credential that
may not do this -> 403 permission_error.

Credentials. Environment key: made by the control API per environment. Sessions
token: made per work item when it carries a secret; the work secret is the
URL-safe base64 (padding stripped unless ``secret_padding``) of the JSON
``{"sessions_token": ..., "ingress_token": ..., "source_token": ...}``.

  E1  GET    /v1/environments/{env}/work/poll?block_ms=N[&reclaim_older_than_ms=M]
      Env key of {env} only. block_ms must be an integer 1..999 (0, 1000, junk ->
      400); omitted = non-blocking. Returns the oldest offerable queued item
      (with its ``secret``), else holds up to block_ms and answers 200 JSON ``null``.
      An offered item that is not acked is re-offered after ``reclaim_ms``
      (5000 by default, or the request's reclaim_older_than_ms).
  E2  POST   .../work/{work}/ack            env key only; queued -> starting; 409 if
      not queued (already acked/stopped); 404 unknown item. Response: work item.
  E3  POST   .../work/{work}/heartbeat?expected_last_heartbeat=V[&desired_ttl_seconds=T]
      Env key or the item's sessions token. Unless the item is stopping/stopped,
      V is compared STRICTLY with the stored heartbeat (``NO_HEARTBEAT`` matches
      "none stored"); a mismatch is 412 with body
      {"type":"error","error":{"type":"invalid_request_error","message":...,
       "details":{"error_code":"heartbeat_precondition_failed","current_state":
       {"last_heartbeat":str|null,"lease_extended":false,"state":...,"ttl_seconds":N}}}}.
      A matching beat on a still-queued item -> 409. Success: records a new
      RFC 3339 (microsecond) heartbeat, starting -> active, and answers
      {"type":"work_heartbeat","last_heartbeat":...,"lease_extended":true,
       "state":...,"ttl_seconds":N}. While stopping: no comparison, heartbeat
      recorded, ``state:"stopping"``, lease_extended true. While stopped: no
      comparison, nothing recorded, ``state:"stopped"``, lease_extended false.
      Lease TTL: an item in starting/active/stopping with no heartbeat (or ack)
      for ttl_seconds expires; the expiry is recorded and, per the item's
      ``on_lease_expiry`` ("requeue" default | "stop" | "ignore"), the item goes
      back to queued with its stored heartbeat cleared (so the old holder's next
      beat is a 412), or is stopped. A stopping item always becomes stopped.
  E4  POST   .../work/{work}/stop  body {"force": bool}   env key or item token.
      force (or item still queued) -> stopped; otherwise graceful -> stopping.
      409 conflict_error when already stopped. Response: work item.
  E5  GET    /v1/sessions/{s}                 env key of the session's env or a
      sessions token of that session. Full session object (status, agent.skills,
      resources, ...).
  E6  GET    /v1/sessions/{s}/events/stream   SSE, chunked. Only events appended
      after the stream is attached are sent (no replay), each as
      ``event: <type>\\ndata: <json>\\n\\n`` (event name = the event's type unless
      the ``sse_event_name`` setting names a fixed string); ``event: ping`` /
      ``data: {"type": "ping"}`` every ``ping_interval_ms``. The subscription is
      registered before the response headers go out, so nothing appended after
      the worker saw the headers is lost.
  E7  GET    /v1/sessions/{s}/events?limit=N&page=C[&order=asc|desc]
      limit 1..1000 (default 20; capped by the ``max_page_size`` setting when
      set). {"data":[...], "next_page": cursor|null}. Ascending by default.
  E8  POST   /v1/sessions/{s}/events  body {"events":[ONE event]}
      Exactly one event per request (``max_events_per_send``), a known user.*
      type, no unknown fields. user.tool_result must name an existing
      agent.tool_use by ``tool_use_id``; user.custom_tool_result an existing
      agent.custom_tool_use by ``custom_tool_use_id``. Also refused (400): a
      second result for the same call (``duplicate_result`` = "reject"), a
      result for a call that was denied (evaluated_permission deny or a deny
      confirmation), still awaiting its confirmation (ask), or in a terminated
      thread; content that is not a list of text/image/document/search_result
      blocks; is_error that is not a boolean. Accepted events get an id
      (``sevt_...``) and processed_at, are appended to the log and broadcast on
      open streams. Response {"data":[stored event]}.
  E9  GET    /v1/skills/{skill}/versions/{version}     version id, version
      number or ``latest``. Any env key or sessions token. BetaSkillVersion JSON.
  E10 GET    /v1/skills/{skill}/versions/{version}/content  archive bytes
      (application/octet-stream); ``latest`` is NOT accepted here (404).
  E11 GET    /v1/memory_stores/{m}/memories?view=basic|full&limit=N&page=C[&path_prefix=P]
  E12 GET    /v1/memory_stores/{m}/memories/{id}?view=full|basic
  E13 POST   /v1/memory_stores/{m}/memories  {"path":"/x","content":str}  409
      memory_path_conflict_error if the path exists.
  E14 POST   /v1/memory_stores/{m}/memories/{id}  {"content"?, "path"?,
      "precondition":{"type":"content_sha256","content_sha256":sha}}  409
      memory_precondition_failed_error on a sha mismatch.
  E15 DELETE /v1/memory_stores/{m}/memories/{id}?expected_content_sha256=sha  409 on
      mismatch; {"type":"memory_deleted","id":...}.
      Memory endpoints accept ONLY a sessions token of a session that has the
      store attached; the environment key gets 403. List limit 1..100; memories
      sorted by path; ``basic`` view has ``content: null``; registered prefixes
      appear as {"type":"memory_prefix","path":...} entries.

==============================================================================
2. THE TEST-CONTROL API (no auth, JSON in and out, under /_fake)
==============================================================================

Timestamps in control output: ``t`` fields are Unix epoch seconds (float).

Server
  GET  /_fake/health                         {"ok": true, "url": ...}
  POST /_fake/reset                          forget everything (config back to defaults
                                             unless {"keep_config": true})
  GET  /_fake/config  POST /_fake/config {k: v}   settings (see DEFAULT_CONFIG):
       reclaim_ms, ping_interval_ms, max_page_size, strict_headers,
       lease_expiry_action, lease_check_interval_ms, sse_event_name,
       max_events_per_send, duplicate_result ("reject"|"accept"),
       default_ttl_seconds, max_memory_bytes, empty_poll_response ("null"|"204"|"empty")
  GET  /_fake/state                          everything (debugging)
  GET  /_fake/journal[?since=N]              internal happenings: offer, reclaim, ack,
                                             lease_expired, transition, stream_open/close,
                                             fault_applied, rejected (validation failures)

Environments and work
  POST /_fake/environments {"id"?, "key"?}   -> {"id", "key"}
  POST /_fake/environments/{env}/work {"data"?: {"type":"healthcheck"}, WORK OPTIONS}
                                             enqueue a non-session item -> work view
  GET  /_fake/work[?environment_id=]         -> {"data": [work views]}
  GET  /_fake/work/{w}[?wait_state=S&timeout_ms=T]
        work view: id, environment_id, data, state, timestamps, secret, sessions_token,
        ttl_seconds, last_heartbeat, on_lease_expiry, offers [{t, worker_id}],
        acks [{t, status, credential}], heartbeats [{t, expected_last_heartbeat,
        status, last_heartbeat (returned), state, lease_extended, ttl_seconds,
        credential}], stops [{t, force, status, state_before, credential}],
        transitions [{t, from, to, reason}], lease_expirations [{t, state,
        last_heartbeat, action}], reclaims. With wait_state, blocks until the state
        is reached (or timeout; then "timed_out": true).
  POST /_fake/work/{w}/stop {"force"?: false}  server-side stop: graceful -> stopping
                                             (the next heartbeat reports it), force -> stopped
  POST /_fake/work/{w}/steal {"last_heartbeat"?}  store a different heartbeat, as if
                                             another worker held the lease (next beat -> 412)
  POST /_fake/work/{w}/expire                expire the lease now
  POST /_fake/work/{w}/update {"ttl_seconds"?, "on_lease_expiry"?}

  WORK OPTIONS (also the "work" member of session creation):
    "secret": true (default; mint a sessions token) | false (no secret) | "<raw string>"
    "secret_padding": false, "secret_extra": {...}, "sessions_token": "<explicit>",
    "ttl_seconds": default_ttl_seconds (300), "metadata": {}, "on_lease_expiry": ...

Sessions and events
  POST /_fake/sessions {"environment_id", "id"?, "status"? ("running"), "agent"?: {...},
        "skills"?: [{"type","skill_id","version"}], "resources"?: [...], "metadata"?,
        "title"?, "events"?: [initial history], "work"?: WORK OPTIONS | false}
        -> {"session": session, "work": work view | null}
  POST /_fake/sessions/{s}/work {WORK OPTIONS}      enqueue another item -> work view
  GET  /_fake/sessions/{s}                         {"session", "events" (the full log,
        including what workers posted; each event carries extra "_origin": "server" |
        "client" and "_t"), "streams": [{id, request_seq, t_open, t_close, events_sent,
        pings_sent, close_reason, fault}], "open_streams": n}
  GET  /_fake/sessions/{s}/events[?since_index=N&type=T&wait_count=K&timeout_ms=T]
        -> {"data": [...], "timed_out"?}  (wait_count: block until >= K match)
  POST /_fake/sessions/{s}/events {"events": [...], "broadcast"?: true, "store"?: true}
        append server-side events (id "sevt_..." and processed_at filled in unless
        given; status events update the session status); broadcast=false -> history
        only; store=false -> live-only (a replay) -> {"data": [...]}
  POST /_fake/sessions/{s}/update {"status"?, "resources"?, "agent"?, "archived_at"?}
  POST /_fake/sessions/{s}/sse {"frames": ["raw SSE text", ...]}   written verbatim
        to every open stream (not stored) -> {"streams": n}
  POST /_fake/sessions/{s}/streams/close {"mode": "clean"|"abort"|"error", "error"?: {...}}
        clean = end the chunked body; abort = reset the TCP connection;
        error = an ``event: error`` frame then clean end -> {"streams": n}

Skills and memory
  POST /_fake/skills {"skill_id"?, "type"?: "custom", "versions": [{"id"?, "version"?,
        "name", "description"?, "archive_b64"}]}     the last version is "latest"
  GET  /_fake/skills/{id}                    includes downloads per version
  POST /_fake/memory_stores {"id"?, "name"?, "memories": [{"path","content"}],
        "prefixes"?: ["/dir/"]}
  GET  /_fake/memory_stores/{m}              {"id","name","memories":[full objects],
                                             "deleted":[...],"operations":[...]}
  POST /_fake/memory_stores/{m}/memories {"path","content"}   server-side upsert
  POST /_fake/memory_stores/{m}/memories/delete {"path"}      server-side delete

Request log (every non-/_fake request, in arrival order)
  GET  /_fake/requests[?since=SEQ&endpoint=E3&method=POST&path=REGEX&work_id=&session_id=
        &environment_id=&memory_store_id=&skill_id=&query=REGEX&completed=1&wait_count=K&timeout_ms=T]
        -> {"requests": [...], "last_seq": n, "timed_out"?: bool}
        each: seq, t (arrival), t_headers (first response byte), t_done (response
        finished), method, path, query (dict of lists), raw_query, headers (all,
        lower-case names; incl. authorization, anthropic-beta, anthropic-version,
        anthropic-worker-id, x-api-key), body (parsed JSON or null), body_text,
        body_len, endpoint ("E1".."E15" or null), environment_id, work_id,
        session_id, skill_id, memory_store_id, memory_id, credential {kind:
        environment_key|sessions_token|none|unknown, environment_id?, session_id?,
        work_id?}, status, fault (rule id if one answered/shaped it).
        query= is a regex searched in the raw query string. completed=1 keeps only requests whose response has been fully sent (or that were
        dropped); wait_count blocks until >= K requests match the filters;
        bodies=0 leaves out body and body_text (body_len stays).
  POST /_fake/requests/clear

Fault injection. Every rule counts every request its filters match ("matched"),
whether or not it is the one applied; a request gets the first rule (in creation
order) whose count is past its "skip" and that has capacity left ("times").
  POST /_fake/faults {"method"?: "*", "path"?: REGEX (re.search on the decoded path),
        "query"?: REGEX (on the raw query), "endpoint"?: "E3", "skip"?: 0 (the first N
        matching requests are left alone), "times"?: 1 (null = unlimited),
        "action"?: "respond" | "delay" | "hang" | "reset" | "sse_drop" | "sse_abort"
        | "sse_error", "status"?, "body"?, "headers"?, "delay_ms"?, "after_events"?,
        "error"?}
        respond: answer status (body default = the generic error body for that
          status; for a heartbeat 412 the exact precondition body built from the
          item's current state) with extra headers (e.g. {"x-should-retry":"false"},
          {"retry-after-ms": "10"}), after delay_ms. Default action when status given.
        delay: wait delay_ms then serve normally (slow response).
        hang: accept and never answer (a blackhole) for delay_ms (default: until the
          server stops), then drop the connection.
        reset: drop the connection (TCP reset) without answering.
        sse_drop / sse_abort / sse_error (E6 only): serve the stream, and after
          after_events events (default 0 = immediately after the headers) end it
          cleanly / reset the connection / send ``event: error`` with ``error`` (a
          JSON payload, default an overloaded error body) and end it.
        -> the rule with "id"
  GET  /_fake/faults                         rules with "matched" and "applied" counts
  DELETE /_fake/faults/{id}   DELETE /_fake/faults   POST /_fake/faults/clear
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import queue
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

API_VERSION = "2026-10-21"
BETA_MANAGED_AGENTS = "managed-agents-2026-04-01"
BETA_MEMORY = "agent-memory-2026-07-22"
NO_HEARTBEAT = "NO_HEARTBEAT"
STATES = ("queued", "starting", "active", "stopping", "stopped")

DEFAULT_CONFIG = {
    "reclaim_ms": 5000,  # un-acked offered items are re-offered after this long
    "ping_interval_ms": 5000,  # SSE ping cadence
    "max_page_size": None,  # cap on E7/E11 page sizes (force pagination in tests)
    "strict_headers": True,  # 400 on a missing anthropic-version / required anthropic-beta
    "lease_expiry_action": "requeue",  # default on_lease_expiry of new items
    "lease_check_interval_ms": 100,
    "sse_event_name": "type",  # "type" = the event's type; anything else = that fixed name
    "max_events_per_send": 1,
    "duplicate_result": "reject",  # a second result for one call: "reject" (400) | "accept"
    "default_ttl_seconds": 300,
    "max_memory_bytes": 1048576,  # E13/E14 content above this -> 413
    # How an empty poll is answered: "null" (200 JSON null, what the real server and the
    # SDK agree on), "204" (204 No Content) or "empty" (200 with an empty body). The SDK
    # worker crashes on the last two (contract 2.4); they exist to test other workers.
    "empty_poll_response": "null",
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    412: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

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

USER_EVENT_FIELDS = {
    "user.tool_result": {"type", "tool_use_id", "is_error", "content"},
    "user.custom_tool_result": {"type", "custom_tool_use_id", "is_error", "content"},
    "user.tool_confirmation": {"type", "tool_use_id", "result", "deny_message"},
    "user.message": {"type", "content"},
    "user.interrupt": {"type"},
    "user.define_outcome": {"type", "description", "rubric", "max_iterations"},
}
CONTENT_BLOCK_TYPES = {"text", "image", "document", "search_result"}


class ApiError(Exception):
    def __init__(self, status, message, error_code=None, headers=None, **details):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.details = details
        self.headers = headers or {}

    def body(self):
        return error_body(self.status, self.message, self.error_code, **self.details)


def error_body(status, message, error_code=None, **details):
    etype = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    err = {"type": etype, "message": message}
    if error_code is not None or details:
        d = {}
        if error_code is not None:
            d["error_code"] = error_code
        d.update(details)
        err["details"] = d
    return {"type": "error", "error": err}


def rfc3339(t=None):
    t = time.time() if t is None else t
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix):
    return prefix + "_" + secrets.token_hex(12)


def sha256_hex(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def b64url(data, padding=False):
    s = base64.urlsafe_b64encode(data).decode("ascii")
    return s if padding else s.rstrip("=")


def encode_cursor(obj):
    return "page_" + b64url(json.dumps(obj, separators=(",", ":")).encode())


def decode_cursor(cur):
    if not isinstance(cur, str) or not cur.startswith("page_"):
        raise ApiError(400, "invalid page cursor")
    raw = cur[5:]
    try:
        return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except Exception:
        raise ApiError(400, "invalid page cursor") from None


def parse_int(value, name, lo, hi):
    try:
        if isinstance(value, str) and not re.fullmatch(r"-?\d+", value):
            raise ValueError
        v = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name}: value must be an integer") from None
    if v < lo or v > hi:
        raise ApiError(400, f"{name}: value must be between {lo} and {hi}")
    return v


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


class WorkItem:
    def __init__(self, env_id, data, ttl, on_expiry, metadata):
        self.id = new_id("work")
        self.environment_id = env_id
        self.data = data
        self.state = "queued"
        self.created_at = rfc3339()
        self.created_t = time.time()
        self.metadata = metadata or {}
        self.acknowledged_at = None
        self.started_at = None
        self.latest_heartbeat_at = None
        self.stop_requested_at = None
        self.stopped_at = None
        self.secret = None
        self.sessions_token = None
        self.ttl_seconds = ttl
        self.on_lease_expiry = on_expiry
        self.last_heartbeat = None  # stored heartbeat string or None
        self.lease_renewed = None  # monotonic time of the last ack/heartbeat
        self.offered_at = None  # monotonic time of the last offer
        self.expiry_recorded = False
        self.offers = []
        self.acks = []
        self.heartbeats = []
        self.stops = []
        self.transitions = []
        self.lease_expirations = []
        self.reclaims = 0

    def api_view(self, with_secret=False):
        return {
            "type": "work",
            "id": self.id,
            "environment_id": self.environment_id,
            "data": copy.deepcopy(self.data),
            "state": self.state,
            "created_at": self.created_at,
            "metadata": dict(self.metadata),
            "acknowledged_at": self.acknowledged_at,
            "started_at": self.started_at,
            "latest_heartbeat_at": self.latest_heartbeat_at,
            "stop_requested_at": self.stop_requested_at,
            "stopped_at": self.stopped_at,
            "secret": self.secret if with_secret else None,
        }

    def control_view(self):
        v = self.api_view(with_secret=True)
        v.update(
            {
                "sessions_token": self.sessions_token,
                "ttl_seconds": self.ttl_seconds,
                "last_heartbeat": self.last_heartbeat,
                "on_lease_expiry": self.on_lease_expiry,
                "offers": copy.deepcopy(self.offers),
                "acks": copy.deepcopy(self.acks),
                "heartbeats": copy.deepcopy(self.heartbeats),
                "stops": copy.deepcopy(self.stops),
                "transitions": copy.deepcopy(self.transitions),
                "lease_expirations": copy.deepcopy(self.lease_expirations),
                "reclaims": self.reclaims,
            }
        )
        return v


class Session:
    def __init__(self, sid, env_id, status, agent, resources, metadata, title):
        self.id = sid
        self.environment_id = env_id
        self.status = status
        self.agent = agent
        self.resources = resources
        self.metadata = metadata
        self.title = title
        self.created_at = rfc3339()
        self.updated_at = self.created_at
        self.archived_at = None
        self.events = []
        self.event_ids = {}
        self.subscribers = set()
        self.streams = []

    def api_view(self):
        return {
            "type": "session",
            "id": self.id,
            "agent": copy.deepcopy(self.agent),
            "archived_at": self.archived_at,
            "budget": None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "environment_id": self.environment_id,
            "metadata": dict(self.metadata),
            "outcome_evaluations": [],
            "resources": copy.deepcopy(self.resources),
            "stats": {"active_seconds": 0.0, "duration_seconds": 0.0},
            "status": self.status,
            "title": self.title,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "vault_ids": [],
        }


class Subscriber:
    def __init__(self, sid, rule, stream_rec):
        self.q = queue.Queue()
        self.session_id = sid
        self.rule = rule
        self.rec = stream_rec


class FaultRule:
    FIELDS = ("method", "path", "query", "endpoint", "skip", "times", "action", "status", "body",
              "headers", "delay_ms", "after_events", "error")

    def __init__(self, spec, rid):
        unknown = set(spec) - set(self.FIELDS)
        if unknown:
            raise ApiError(400, f"unknown fault fields: {sorted(unknown)}")
        self.id = rid
        self.method = (spec.get("method") or "*").upper()
        self.path = spec.get("path") or ".*"
        self.path_re = re.compile(self.path)
        self.query = spec.get("query")
        self.query_re = re.compile(self.query) if self.query else None
        self.endpoint = spec.get("endpoint")
        self.skip = int(spec.get("skip") or 0)
        self.times = spec.get("times", 1)
        self.status = spec.get("status")
        action = spec.get("action")
        if action is None:
            action = "respond" if self.status is not None else "delay"
        if action not in ("respond", "delay", "hang", "reset", "sse_drop", "sse_abort", "sse_error"):
            raise ApiError(400, f"unknown fault action {action!r}")
        if action == "respond" and self.status is None:
            raise ApiError(400, "action respond needs a status")
        self.action = action
        self.body = spec.get("body")
        self.headers = spec.get("headers") or {}
        self.delay_ms = spec.get("delay_ms")
        self.after_events = int(spec.get("after_events") or 0)
        self.error = spec.get("error")
        self.matched = 0
        self.applied = 0

    def view(self):
        return {
            "id": self.id, "method": self.method, "path": self.path, "query": self.query,
            "endpoint": self.endpoint, "skip": self.skip, "times": self.times, "action": self.action,
            "status": self.status, "body": self.body, "headers": self.headers, "delay_ms": self.delay_ms,
            "after_events": self.after_events, "error": self.error, "matched": self.matched,
            "applied": self.applied,
        }

    def matches(self, method, path, raw_query, endpoint):
        if self.method != "*" and self.method != method:
            return False
        if self.endpoint and self.endpoint != endpoint:
            return False
        if self.action.startswith("sse_") and endpoint != "E6":
            return False
        if not self.path_re.search(path):
            return False
        if self.query_re and not self.query_re.search(raw_query):
            return False
        return True

    def has_capacity(self):
        return self.times is None or self.applied < int(self.times)


class FakeState:
    def __init__(self, config=None):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.base_config = dict(DEFAULT_CONFIG)
        self.base_config.update(config or {})
        self.reset()

    def reset(self, keep_config=False):
        with self.lock:
            if not keep_config:
                self.config = dict(self.base_config)
            for sess in getattr(self, "sessions", {}).values():
                for sub in list(sess.subscribers):
                    sub.q.put(("close", "clean"))
            self.environments = {}  # id -> {"id","key"}
            self.env_keys = {}  # key -> env id
            self.work = {}  # id -> WorkItem (insertion order = queue order)
            self.sessions = {}
            self.tokens = {}  # sessions token -> (session_id|None, work_id)
            self.skills = {}
            self.stores = {}
            self.requests = []
            self.journal_entries = []
            self.faults = []
            self.fault_seq = 0
            self.stream_seq = 0
            self.last_hb_t = 0.0
            self.cond.notify_all()

    # -- helpers -------------------------------------------------------------

    def journal(self, kind, **kw):
        entry = {"seq": len(self.journal_entries) + 1, "t": time.time(), "kind": kind}
        entry.update(kw)
        self.journal_entries.append(entry)
        self.cond.notify_all()

    def transition(self, item, new_state, reason):
        if item.state == new_state:
            return
        item.transitions.append({"t": time.time(), "from": item.state, "to": new_state, "reason": reason})
        self.journal("transition", work_id=item.id, **{"from": item.state, "to": new_state, "reason": reason})
        item.state = new_state
        if new_state == "stopped":
            item.stopped_at = rfc3339()
            if item.stop_requested_at is None:
                item.stop_requested_at = item.stopped_at
        self.cond.notify_all()

    def next_heartbeat(self):
        t = max(time.time(), self.last_hb_t + 1e-6)
        self.last_hb_t = t
        return rfc3339(t)

    def classify_credential(self, token):
        if token is None:
            return {"kind": "none"}
        if token in self.env_keys:
            return {"kind": "environment_key", "environment_id": self.env_keys[token]}
        if token in self.tokens:
            sid, wid = self.tokens[token]
            return {"kind": "sessions_token", "session_id": sid, "work_id": wid}
        return {"kind": "unknown"}

    # -- creation (shared by the control API and Python callers) -------------

    def create_environment(self, env_id=None, key=None):
        with self.lock:
            env_id = env_id or new_id("env")
            if env_id in self.environments:
                raise ApiError(409, f"environment {env_id} exists")
            key = key or "envkey_" + secrets.token_hex(16)
            self.environments[env_id] = {"id": env_id, "key": key}
            self.env_keys[key] = env_id
            return {"id": env_id, "key": key}

    def enqueue_work(self, env_id, data, opts):
        with self.lock:
            if env_id not in self.environments:
                raise ApiError(404, f"no environment {env_id}")
            opts = dict(opts or {})
            ttl = int(opts.get("ttl_seconds", self.config["default_ttl_seconds"]))
            on_expiry = opts.get("on_lease_expiry") or self.config["lease_expiry_action"]
            if on_expiry not in ("requeue", "stop", "ignore"):
                raise ApiError(400, "on_lease_expiry must be requeue, stop or ignore")
            item = WorkItem(env_id, data, ttl, on_expiry, opts.get("metadata"))
            secret = opts.get("secret", True)
            if secret is True:
                token = opts.get("sessions_token") or "sesstok_" + secrets.token_hex(16)
                payload = {"sessions_token": token, "ingress_token": "ingtok_" + secrets.token_hex(8),
                           "source_token": "srctok_" + secrets.token_hex(8)}
                payload.update(opts.get("secret_extra") or {})
                item.secret = b64url(json.dumps(payload).encode(), padding=bool(opts.get("secret_padding")))
                item.sessions_token = token
                sid = data.get("id") if data.get("type") == "session" else None
                self.tokens[token] = (sid, item.id)
            elif isinstance(secret, str):
                item.secret = secret
            self.work[item.id] = item
            self.journal("enqueued", work_id=item.id, data=data)
            self.cond.notify_all()
            return item

    def create_session(self, spec):
        with self.lock:
            env_id = spec.get("environment_id")
            if env_id not in self.environments:
                raise ApiError(404, f"no environment {env_id!r}")
            sid = spec.get("id") or new_id("sesn")
            if sid in self.sessions:
                raise ApiError(409, f"session {sid} exists")
            agent = {
                "type": "agent",
                "id": new_id("agent"),
                "name": "fake-agent",
                "version": 1,
                "description": None,
                "system": None,
                "model": {"id": "claude-sonnet-4-5"},
                "execution_identity": {"type": "agent"},
                "mcp_servers": [],
                "multiagent": None,
                "skills": [],
                "tools": [{"type": "agent_toolset_20260401"}],
            }
            agent.update(spec.get("agent") or {})
            if "skills" in spec:
                agent["skills"] = spec["skills"]
            sess = Session(sid, env_id, spec.get("status", "running"), agent, spec.get("resources") or [],
                           spec.get("metadata") or {}, spec.get("title"))
            self.sessions[sid] = sess
            for ev in spec.get("events") or []:
                self.append_event(sess, ev, broadcast=False)
            work = None
            if spec.get("work", {}) is not False:
                work = self.enqueue_work(env_id, {"type": "session", "id": sid}, spec.get("work") or {})
            return sess, work

    def append_event(self, sess, ev, broadcast=True, store=True, origin="server"):
        ev = copy.deepcopy(ev)
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            raise ApiError(400, "an event must be an object with a string type")
        ev.setdefault("id", new_id("sevt"))
        ev.setdefault("processed_at", rfc3339())
        if store:
            if ev["id"] in sess.event_ids:
                raise ApiError(409, f"event id {ev['id']} already in the log")
            sess.event_ids[ev["id"]] = len(sess.events)
            sess.events.append({"event": ev, "origin": origin, "t": time.time()})
            t = ev["type"]
            status = {"session.status_running": "running", "session.status_idle": "idle",
                      "session.status_rescheduled": "rescheduling", "session.status_terminated": "terminated",
                      "session.deleted": "terminated"}.get(t)
            if status:
                sess.status = status
            sess.updated_at = rfc3339()
        if broadcast:
            for sub in list(sess.subscribers):
                sub.q.put(("event", ev))
        self.cond.notify_all()
        return ev

    def find_event(self, sess, eid):
        idx = sess.event_ids.get(eid)
        return None if idx is None else sess.events[idx]["event"]

    # -- lease expiry ----------------------------------------------------------

    def check_leases(self):
        now = time.monotonic()
        with self.lock:
            for item in self.work.values():
                if item.state not in ("starting", "active", "stopping") or item.lease_renewed is None:
                    continue
                if item.ttl_seconds <= 0 or now - item.lease_renewed <= item.ttl_seconds:
                    continue
                self.expire(item, "ttl")

    def expire(self, item, why):
        action = "stop" if item.state == "stopping" else item.on_lease_expiry
        if action == "ignore" and item.expiry_recorded:
            return
        item.lease_expirations.append({"t": time.time(), "state": item.state,
                                       "last_heartbeat": item.last_heartbeat, "action": action, "why": why})
        self.journal("lease_expired", work_id=item.id, state=item.state, action=action, why=why)
        if action == "requeue":
            self.transition(item, "queued", "lease expired")
            item.acknowledged_at = item.started_at = item.latest_heartbeat_at = None
            item.last_heartbeat = None
            item.offered_at = None
            item.lease_renewed = None
        elif action == "stop":
            self.transition(item, "stopped", "lease expired")
            item.lease_renewed = None
        else:
            item.expiry_recorded = True


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class _Abort(Exception):
    """Drop the connection without a response."""

    def __init__(self, reset=True):
        self.reset = reset


class Handler(BaseHTTPRequestHandler):
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
                    raise _Abort(reset=True)
                if rule.action == "hang":
                    delay = rule.delay_ms
                    state.stopping.wait(None if delay is None else delay / 1000.0)
                    raise _Abort(reset=False)
                if rule.delay_ms:
                    if state.stopping.wait(rule.delay_ms / 1000.0):
                        raise _Abort(reset=False)
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
        except _Abort as a:
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

    def store_for(self, mid, cred):
        state = self.fake.state
        if cred["kind"] == "environment_key":
            raise ApiError(403, "the memory endpoints do not accept an environment key; use the sessions token")
        store = state.stores.get(mid)
        if store is None:
            raise ApiError(404, f"memory store {mid} not found")
        sess = state.sessions.get(cred.get("session_id"))
        attached = sess is not None and any(
            r.get("type") == "memory_store" and r.get("memory_store_id") == mid for r in sess.resources)
        if not attached:
            raise ApiError(403, "this sessions token's session has no such memory store attached")
        return store

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
            stored = self.accept_send(sess, body)
            return 200, {"data": stored}
        if ep in ("E9", "E10"):
            skill = state.skills.get(p["skill_id"])
            if skill is None:
                raise ApiError(404, f"skill {p['skill_id']} not found")
            v = p["version"]
            if v == "latest" and ep == "E9":
                ver = skill["versions"][-1] if skill["versions"] else None
            else:
                ver = next((x for x in skill["versions"] if v in (x["id"], x["version"])), None)
            if ver is None:
                raise ApiError(404, f"skill version {v} not found")
            if ep == "E9":
                return 200, skill_version_view(skill, ver)
            ver["downloads"] += 1
            return 200, base64.b64decode(ver["archive_b64"])
        # memory
        store = self.store_for(p["memory_store_id"], cred)
        return self.memory_api(ep, store, p, q, body, cred)

    def accept_send(self, sess, body):
        state = self.fake.state
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object with an events array")
        if set(body) - {"events"}:
            raise ApiError(400, f"unknown body fields: {sorted(set(body) - {'events'})}")
        events = body.get("events")
        if not isinstance(events, list) or not events:
            raise ApiError(400, "events: must be a non-empty array")
        if len(events) > int(state.config["max_events_per_send"]):
            raise ApiError(400, f"events: at most {state.config['max_events_per_send']} event(s) per request")
        for ev in events:
            self.validate_user_event(sess, ev)
        out = []
        for ev in events:
            out.append(state.append_event(sess, ev, origin="client"))
        return out

    def validate_user_event(self, sess, ev):
        if not isinstance(ev, dict):
            raise ApiError(400, "events[0]: must be an object")
        t = ev.get("type")
        allowed = USER_EVENT_FIELDS.get(t)
        if allowed is None:
            raise ApiError(400, f"events[0].type: unsupported event type {t!r}")
        extra = set(ev) - allowed
        if extra:
            raise ApiError(400, f"events[0]: unknown fields {sorted(extra)}")
        if t in ("user.tool_result", "user.custom_tool_result"):
            key, want = ("tool_use_id", "agent.tool_use") if t == "user.tool_result" else (
                "custom_tool_use_id", "agent.custom_tool_use")
            ref = ev.get(key)
            if not isinstance(ref, str) or not ref:
                raise ApiError(400, f"events[0].{key}: required")
            target = self.fake.state.find_event(sess, ref)
            if target is None or target.get("type") != want:
                raise ApiError(400, f"events[0].{key}: {ref!r} does not match any {want} event of this session")
            if "is_error" in ev and not isinstance(ev["is_error"], bool):
                raise ApiError(400, "events[0].is_error: must be a boolean")
            content = ev.get("content", [])
            if not isinstance(content, list):
                raise ApiError(400, "events[0].content: must be an array of content blocks")
            for i, blk in enumerate(content):
                if not isinstance(blk, dict) or blk.get("type") not in CONTENT_BLOCK_TYPES:
                    raise ApiError(400, f"events[0].content[{i}]: unsupported block")
                if blk["type"] == "text" and not isinstance(blk.get("text"), str):
                    raise ApiError(400, f"events[0].content[{i}].text: must be a string")
            answered = verdict = None
            thread = target.get("session_thread_id")
            terminated = False
            for rec in sess.events:
                e = rec["event"]
                et = e.get("type")
                if et == t and e.get(key) == ref:
                    answered = e
                elif et == "user.tool_confirmation" and e.get("tool_use_id") == ref:
                    verdict = e.get("result")
                elif et == "session.thread_status_terminated" and thread and e.get("session_thread_id") == thread:
                    terminated = True
            if answered is not None and self.fake.state.config["duplicate_result"] == "reject":
                raise ApiError(400, f"events[0].{key}: {ref!r} already has a result")
            if terminated:
                raise ApiError(400, f"events[0].{key}: the thread of {ref!r} has terminated")
            perm = target.get("evaluated_permission")
            if perm == "deny" or verdict == "deny":
                raise ApiError(400, f"events[0].{key}: {ref!r} was denied")
            if perm not in (None, "allow") and verdict != "allow":
                raise ApiError(400, f"events[0].{key}: {ref!r} is awaiting user confirmation")
        elif t == "user.tool_confirmation":
            if ev.get("result") not in ("allow", "deny"):
                raise ApiError(400, "events[0].result: must be allow or deny")
            target = self.fake.state.find_event(sess, ev.get("tool_use_id"))
            if target is None or target.get("type") not in ("agent.tool_use", "agent.custom_tool_use",
                                                             "agent.mcp_tool_use"):
                raise ApiError(400, "events[0].tool_use_id: no such tool use")

    def memory_api(self, ep, store, p, q, body, cred):
        state = self.fake.state
        now = rfc3339()
        if ep in ("E12", "E14", "E15"):
            mem = next((m for m in store["memories"].values() if m["id"] == p["memory_id"]), None)
            if mem is None:
                store["operations"].append({"t": time.time(), "op": ep, "memory_id": p["memory_id"],
                                            "status": 404})
                raise ApiError(404, f"memory {p['memory_id']} not found")
        if ep == "E11":
            view = q.get("view", "basic")
            if view not in ("basic", "full"):
                raise ApiError(400, "view: must be basic or full")
            limit = parse_int(q["limit"], "limit", 1, 100) if "limit" in q else 20
            if state.config["max_page_size"]:
                limit = min(limit, int(state.config["max_page_size"]))
            prefix = q.get("path_prefix", "")
            items = [memory_view(m, view) for m in store["memories"].values() if m["path"].startswith(prefix)]
            items += [{"type": "memory_prefix", "path": pre} for pre in store["prefixes"] if pre.startswith(prefix)]
            items.sort(key=lambda x: x["path"])
            if q.get("page"):
                after = decode_cursor(q["page"]).get("after", "")
                items = [x for x in items if x["path"] > after]
            page = items[:limit]
            nxt = encode_cursor({"after": page[-1]["path"]}) if len(items) > limit else None
            store["operations"].append({"t": time.time(), "op": "list", "view": view, "status": 200})
            return 200, {"data": page, "next_page": nxt}
        if ep == "E12":
            view = q.get("view", "full")
            if view not in ("basic", "full"):
                raise ApiError(400, "view: must be basic or full")
            store["operations"].append({"t": time.time(), "op": "get", "path": mem["path"], "status": 200})
            return 200, memory_view(mem, view)
        if ep == "E13":
            if not isinstance(body, dict) or set(body) - {"path", "content"}:
                raise ApiError(400, "body must be {path, content}")
            path, content = body.get("path"), body.get("content")
            check_memory_path(path)
            if not isinstance(content, str):
                raise ApiError(400, "content: must be a string")
            if len(content.encode()) > state.config["max_memory_bytes"]:
                raise ApiError(413, "content too large")
            if path in store["memories"]:
                store["operations"].append({"t": time.time(), "op": "create", "path": path, "status": 409})
                raise ApiError(409, f"a memory already exists at {path}", "memory_path_conflict")
            mem = new_memory(store["id"], path, content)
            store["memories"][path] = mem
            store["operations"].append({"t": time.time(), "op": "create", "path": path, "status": 200,
                                        "sha": mem["content_sha256"]})
            state.cond.notify_all()
            return 200, memory_view(mem, "full")
        if ep == "E14":
            if not isinstance(body, dict) or set(body) - {"path", "content", "precondition"}:
                raise ApiError(400, "body must be {content?, path?, precondition?}")
            pre = body.get("precondition")
            if pre is not None:
                if not isinstance(pre, dict) or pre.get("type") != "content_sha256" or \
                        not isinstance(pre.get("content_sha256"), str):
                    raise ApiError(400, "precondition: must be {type: content_sha256, content_sha256}")
                if pre["content_sha256"] != mem["content_sha256"]:
                    store["operations"].append({"t": time.time(), "op": "update", "path": mem["path"],
                                                "status": 409})
                    raise ApiError(409, "content_sha256 precondition failed", "memory_precondition_failed",
                                   current_content_sha256=mem["content_sha256"])
            content = body.get("content", mem["content"])
            if not isinstance(content, str):
                raise ApiError(400, "content: must be a string")
            if len(content.encode()) > state.config["max_memory_bytes"]:
                raise ApiError(413, "content too large")
            newpath = body.get("path", mem["path"])
            check_memory_path(newpath)
            if newpath != mem["path"]:
                if newpath in store["memories"]:
                    raise ApiError(409, f"a memory already exists at {newpath}", "memory_path_conflict")
                del store["memories"][mem["path"]]
                mem["path"] = newpath
                store["memories"][newpath] = mem
            set_memory_content(mem, content)
            store["operations"].append({"t": time.time(), "op": "update", "path": mem["path"], "status": 200,
                                        "sha": mem["content_sha256"]})
            state.cond.notify_all()
            return 200, memory_view(mem, "full")
        if ep == "E15":
            exp = q.get("expected_content_sha256")
            if exp is not None and exp != mem["content_sha256"]:
                store["operations"].append({"t": time.time(), "op": "delete", "path": mem["path"], "status": 409})
                raise ApiError(409, "content_sha256 precondition failed", "memory_precondition_failed",
                               current_content_sha256=mem["content_sha256"])
            del store["memories"][mem["path"]]
            store["deleted"].append(dict(mem, deleted_t=time.time()))
            store["operations"].append({"t": time.time(), "op": "delete", "path": mem["path"], "status": 200})
            state.cond.notify_all()
            return 200, {"type": "memory_deleted", "id": mem["id"]}
        raise ApiError(404, "no such memory endpoint")

    # -- SSE -------------------------------------------------------------------

    def handle_stream(self, sid, cred, rec, rule):
        state = self.fake.state
        with state.lock:
            sess = self.session_for(sid, cred)
            state.stream_seq += 1
            srec = {"id": state.stream_seq, "request_seq": rec["seq"], "t_open": time.time(), "t_close": None,
                    "events_sent": 0, "pings_sent": 0, "close_reason": None, "fault": rule.id if rule else None}
            sess.streams.append(srec)
            sub = Subscriber(sid, rule, srec)
            sess.subscribers.add(sub)
            ping_s = state.config["ping_interval_ms"] / 1000.0
            fixed_name = state.config["sse_event_name"]
            state.journal("stream_open", session_id=sid, stream=srec["id"], request_seq=rec["seq"])
        reason = "client_gone"
        try:
            rec["t_headers"] = time.time()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("request-id", new_id("req"))
            self.end_headers()
            with state.lock:
                rec["status"] = 200
                state.cond.notify_all()
            self.wfile.flush()

            def fault_due():
                return rule is not None and srec["events_sent"] >= rule.after_events

            while True:
                if fault_due():
                    if rule.action == "sse_abort":
                        reason = "fault_abort"
                        raise _Abort(reset=True)
                    if rule.action == "sse_error":
                        payload = rule.error or error_body(529, "Overloaded")
                        self.write_chunk(b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n")
                        reason = "fault_error"
                    else:
                        reason = "fault_drop"
                    self.end_chunks()
                    break
                if state.stopping.is_set():
                    reason = "server_stop"
                    self.end_chunks()
                    break
                try:
                    kind, val = sub.q.get(timeout=ping_s)
                except queue.Empty:
                    self.write_chunk(b'event: ping\ndata: {"type": "ping"}\n\n')
                    srec["pings_sent"] += 1
                    continue
                if kind == "event":
                    name = val.get("type") if fixed_name == "type" else fixed_name
                    self.write_chunk(("event: %s\ndata: %s\n\n" % (name, json.dumps(val))).encode())
                    srec["events_sent"] += 1
                elif kind == "raw":
                    self.write_chunk(val.encode() if isinstance(val, str) else val)
                elif kind == "close":
                    mode, payload = (val, None) if isinstance(val, str) else val
                    if mode == "abort":
                        reason = "closed_abort"
                        raise _Abort(reset=True)
                    if mode == "error":
                        payload = payload or error_body(529, "Overloaded")
                        self.write_chunk(b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n")
                    reason = "closed_" + mode
                    self.end_chunks()
                    break
        except _Abort:
            self.abort_connection(reset=True)
        except OSError:
            self.close_connection = True
        finally:
            self.close_connection = True
            with state.lock:
                sess.subscribers.discard(sub)
                srec["t_close"] = time.time()
                srec["close_reason"] = reason
                rec["t_done"] = srec["t_close"]
                state.journal("stream_close", session_id=sid, stream=srec["id"], reason=reason,
                              events_sent=srec["events_sent"])

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

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


def heartbeat_412_body(item):
    state_ = item.state if item else "stopped"
    return error_body(
        412,
        "expected_last_heartbeat does not match the stored heartbeat; another worker may hold the lease",
        "heartbeat_precondition_failed",
        current_state={
            "last_heartbeat": item.last_heartbeat if item else None,
            "lease_extended": False,
            "state": state_,
            "ttl_seconds": item.ttl_seconds if item else 0,
        },
    )


def check_memory_path(path):
    if not isinstance(path, str) or not path.startswith("/") or path.endswith("/"):
        raise ApiError(400, "path: must be an absolute memory path like /notes.md")
    parts = path[1:].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ApiError(400, "path: must not contain empty, '.' or '..' components")


def new_memory(store_id, path, content):
    now = rfc3339()
    mem = {"type": "memory", "id": new_id("mem"), "memory_store_id": store_id, "path": path,
           "created_at": now, "updated_at": now}
    set_memory_content(mem, content)
    return mem


def set_memory_content(mem, content):
    mem["content"] = content
    mem["content_sha256"] = sha256_hex(content)
    mem["content_size_bytes"] = len(content.encode("utf-8"))
    mem["memory_version_id"] = new_id("memver")
    mem["updated_at"] = rfc3339()


def memory_view(mem, view):
    v = copy.deepcopy(mem)
    if view == "basic":
        v["content"] = None
    return v


def skill_version_view(skill, ver):
    return {"type": "skill_version", "id": ver["id"], "skill_id": skill["skill_id"], "version": ver["version"],
            "name": ver["name"], "description": ver.get("description", ""), "directory": ver["name"],
            "created_at": ver["created_at"]}


# ---------------------------------------------------------------------------
# The server object
# ---------------------------------------------------------------------------


class FakeControlPlane:
    """The fake; ``start()`` serves on a background thread, ``stop()`` ends it."""

    def __init__(self, port=0, host="127.0.0.1", verbose=False, **config):
        self.host = host
        self.requested_port = port
        self.verbose = verbose
        self.state = FakeState(config)
        self.httpd = None
        self.threads = []

    @property
    def port(self):
        return self.httpd.server_address[1]

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def start(self):
        fake = self

        class _H(Handler):
            pass

        _H.fake = fake

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 64

        self.httpd = _Server((self.host, self.requested_port), _H)
        t = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                             name="fake-cp-http", daemon=True)
        t.start()
        lt = threading.Thread(target=self._lease_loop, name="fake-cp-lease", daemon=True)
        lt.start()
        self.threads = [t, lt]
        return self

    def _lease_loop(self):
        while not self.state.stopping.is_set():
            try:
                self.state.check_leases()
            except Exception:  # pragma: no cover
                traceback.print_exc()
            self.state.stopping.wait(self.state.config["lease_check_interval_ms"] / 1000.0)

    def stop(self):
        st = self.state
        st.stopping.set()
        with st.lock:
            for sess in st.sessions.values():
                for sub in list(sess.subscribers):
                    sub.q.put(("close", "clean"))
            st.cond.notify_all()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the control API (also callable directly from Python) -----------------

    def control(self, method, path, body=None, query=None):
        body = body or {}
        query = query or {}
        st = self.state
        parts = [p for p in path.split("/") if p][1:]  # drop "_fake"
        m = method.upper()

        def need(cond_, msg="bad request"):
            if not cond_:
                raise ApiError(400, msg)

        with st.lock:
            if parts == ["health"]:
                return 200, {"ok": True, "url": self.url if self.httpd else None}
            if parts == ["reset"] and m == "POST":
                st.reset(keep_config=bool(body.get("keep_config")))
                return 200, {"ok": True}
            if parts == ["config"]:
                if m == "POST":
                    unknown = set(body) - set(DEFAULT_CONFIG)
                    need(not unknown, f"unknown config keys {sorted(unknown)}")
                    st.config.update(body)
                    st.cond.notify_all()
                return 200, dict(st.config)
            if parts == ["state"]:
                return 200, {
                    "config": st.config,
                    "environments": list(st.environments.values()),
                    "work": [w.control_view() for w in st.work.values()],
                    "sessions": [self._session_control(s) for s in st.sessions.values()],
                    "skills": list(st.skills.values()),
                    "memory_stores": [self._store_control(s) for s in st.stores.values()],
                    "faults": [r.view() for r in st.faults],
                    "requests": len(st.requests),
                }
            if parts == ["journal"]:
                since = int(query.get("since", 0))
                return 200, {"data": [e for e in st.journal_entries if e["seq"] > since]}

            # environments
            if parts == ["environments"] and m == "POST":
                return 200, st.create_environment(body.get("id"), body.get("key"))
            if len(parts) == 3 and parts[0] == "environments" and parts[2] == "work" and m == "POST":
                data = body.get("data") or {"type": "healthcheck", "id": new_id("hc")}
                opts = {k: v for k, v in body.items() if k != "data"}
                opts.setdefault("secret", False)
                return 200, st.enqueue_work(parts[1], data, opts).control_view()

            # work
            if parts == ["work"] and m == "GET":
                env = query.get("environment_id")
                return 200, {"data": [w.control_view() for w in st.work.values()
                                      if env is None or w.environment_id == env]}
            if len(parts) >= 2 and parts[0] == "work":
                item = st.work.get(parts[1])
                if item is None:
                    raise ApiError(404, f"no work item {parts[1]}")
                if len(parts) == 2 and m == "GET":
                    want = query.get("wait_state")
                    timed_out = False
                    if want:
                        deadline = time.monotonic() + int(query.get("timeout_ms", 10000)) / 1000.0
                        while item.state != want:
                            rem = deadline - time.monotonic()
                            if rem <= 0:
                                timed_out = True
                                break
                            st.cond.wait(rem)
                    v = item.control_view()
                    if want:
                        v["timed_out"] = timed_out
                    return 200, v
                action = parts[2] if len(parts) == 3 else None
                if action == "stop" and m == "POST":
                    if item.state == "stopped":
                        raise ApiError(409, "already stopped")
                    if body.get("force") or item.state == "queued":
                        st.transition(item, "stopped", "server force stop")
                    elif item.state != "stopping":
                        item.stop_requested_at = rfc3339()
                        st.transition(item, "stopping", "server graceful stop")
                    return 200, item.control_view()
                if action == "steal" and m == "POST":
                    item.last_heartbeat = body.get("last_heartbeat") or st.next_heartbeat()
                    item.latest_heartbeat_at = item.last_heartbeat
                    item.lease_renewed = time.monotonic()
                    st.journal("stolen", work_id=item.id, last_heartbeat=item.last_heartbeat)
                    return 200, item.control_view()
                if action == "expire" and m == "POST":
                    st.expire(item, "forced")
                    return 200, item.control_view()
                if action == "update" and m == "POST":
                    if "ttl_seconds" in body:
                        item.ttl_seconds = int(body["ttl_seconds"])
                    if "on_lease_expiry" in body:
                        need(body["on_lease_expiry"] in ("requeue", "stop", "ignore"), "bad on_lease_expiry")
                        item.on_lease_expiry = body["on_lease_expiry"]
                    return 200, item.control_view()

            # sessions
            if parts == ["sessions"] and m == "POST":
                sess, work = st.create_session(body)
                return 200, {"session": sess.api_view(), "work": work.control_view() if work else None}
            if len(parts) >= 2 and parts[0] == "sessions":
                sess = st.sessions.get(parts[1])
                if sess is None:
                    raise ApiError(404, f"no session {parts[1]}")
                if len(parts) == 2 and m == "GET":
                    return 200, self._session_control(sess)
                sub = "/".join(parts[2:])
                if sub == "work" and m == "POST":
                    return 200, st.enqueue_work(sess.environment_id, {"type": "session", "id": sess.id},
                                                body).control_view()
                if sub == "events" and m == "GET":
                    since = int(query.get("since_index", 0))
                    typ = query.get("type")
                    want = int(query.get("wait_count", 0))
                    deadline = time.monotonic() + int(query.get("timeout_ms", 10000)) / 1000.0

                    def sel():
                        return [dict(e["event"], _origin=e["origin"], _t=e["t"]) for e in sess.events[since:]
                                if typ is None or e["event"].get("type") == typ]

                    res = sel()
                    timed_out = False
                    while want and len(res) < want:
                        rem = deadline - time.monotonic()
                        if rem <= 0:
                            timed_out = True
                            break
                        st.cond.wait(rem)
                        res = sel()
                    out = {"data": res}
                    if want:
                        out["timed_out"] = timed_out
                    return 200, out
                if sub == "events" and m == "POST":
                    evs = body.get("events")
                    need(isinstance(evs, list), "events: array required")
                    stored = [st.append_event(sess, ev, broadcast=body.get("broadcast", True),
                                              store=body.get("store", True)) for ev in evs]
                    return 200, {"data": stored}
                if sub == "update" and m == "POST":
                    for k in ("status", "resources", "archived_at", "title", "metadata"):
                        if k in body:
                            setattr(sess, k, body[k])
                    if "agent" in body:
                        sess.agent.update(body["agent"])
                    sess.updated_at = rfc3339()
                    return 200, sess.api_view()
                if sub == "sse" and m == "POST":
                    frames = body.get("frames") or ([body["frame"]] if "frame" in body else [])
                    for sub_ in list(sess.subscribers):
                        for f in frames:
                            sub_.q.put(("raw", f))
                    return 200, {"streams": len(sess.subscribers)}
                if sub == "streams/close" and m == "POST":
                    mode = body.get("mode", "clean")
                    need(mode in ("clean", "abort", "error"), "mode must be clean, abort or error")
                    n = len(sess.subscribers)
                    for sub_ in list(sess.subscribers):
                        sub_.q.put(("close", (mode, body.get("error"))))
                    return 200, {"streams": n}

            # skills
            if parts == ["skills"] and m == "POST":
                sk = {"skill_id": body.get("skill_id") or new_id("skill"), "type": body.get("type", "custom"),
                      "versions": []}
                for i, v in enumerate(body.get("versions") or []):
                    need(isinstance(v.get("archive_b64"), str), "versions[].archive_b64 required")
                    base64.b64decode(v["archive_b64"])
                    sk["versions"].append({
                        "id": v.get("id") or new_id("skillver"),
                        "version": str(v.get("version") or (1700000000000000 + i)),
                        "name": v.get("name", "skill"),
                        "description": v.get("description", ""),
                        "archive_b64": v["archive_b64"],
                        "created_at": rfc3339(),
                        "downloads": 0,
                    })
                st.skills[sk["skill_id"]] = sk
                return 200, self._skill_control(sk)
            if len(parts) == 2 and parts[0] == "skills" and m == "GET":
                sk = st.skills.get(parts[1])
                if sk is None:
                    raise ApiError(404, "no such skill")
                return 200, self._skill_control(sk)

            # memory stores
            if parts == ["memory_stores"] and m == "POST":
                sid = body.get("id") or new_id("memstore")
                store = {"id": sid, "name": body.get("name") or sid, "memories": {}, "prefixes":
                         list(body.get("prefixes") or []), "deleted": [], "operations": []}
                for mm in body.get("memories") or []:
                    check_memory_path(mm.get("path"))
                    store["memories"][mm["path"]] = new_memory(sid, mm["path"], mm.get("content", ""))
                st.stores[sid] = store
                return 200, self._store_control(store)
            if len(parts) >= 2 and parts[0] == "memory_stores":
                store = st.stores.get(parts[1])
                if store is None:
                    raise ApiError(404, "no such memory store")
                sub = "/".join(parts[2:])
                if sub == "" and m == "GET":
                    return 200, self._store_control(store)
                if sub == "memories" and m == "POST":
                    check_memory_path(body.get("path"))
                    mem = store["memories"].get(body["path"])
                    if mem is None:
                        store["memories"][body["path"]] = new_memory(store["id"], body["path"],
                                                                     body.get("content", ""))
                    else:
                        set_memory_content(mem, body.get("content", ""))
                    return 200, self._store_control(store)
                if sub == "memories/delete" and m == "POST":
                    mem = store["memories"].pop(body.get("path"), None)
                    need(mem is not None, "no memory at that path")
                    store["deleted"].append(dict(mem, deleted_t=time.time()))
                    return 200, self._store_control(store)

            # request log
            if parts == ["requests"] and m == "GET":
                return 200, self._requests(query)
            if parts == ["requests", "clear"] and m == "POST":
                st.requests.clear()
                return 200, {"ok": True}

            # faults
            if parts == ["faults"] and m == "POST":
                st.fault_seq += 1
                rule = FaultRule(body, f"fault_{st.fault_seq}")
                st.faults.append(rule)
                return 200, rule.view()
            if parts == ["faults"] and m == "GET":
                return 200, {"data": [r.view() for r in st.faults]}
            if (parts == ["faults"] and m == "DELETE") or (parts == ["faults", "clear"] and m == "POST"):
                st.faults.clear()
                return 200, {"ok": True}
            if len(parts) == 2 and parts[0] == "faults" and m == "DELETE":
                before = len(st.faults)
                st.faults[:] = [r for r in st.faults if r.id != parts[1]]
                if len(st.faults) == before:
                    raise ApiError(404, "no such fault")
                return 200, {"ok": True}
        raise ApiError(404, f"no control route {method} {path}")

    def _requests(self, query):
        st = self.state
        since = int(query.get("since", 0))
        want = int(query.get("wait_count", 0))
        rx = re.compile(query["path"]) if query.get("path") else None
        qrx = re.compile(query["query"]) if query.get("query") is not None else None
        keys = ("endpoint", "method", "work_id", "session_id", "environment_id", "memory_store_id", "skill_id")

        completed = query.get("completed") in ("1", "true")

        def sel():
            out = []
            for r in st.requests[since:]:
                if completed and r["t_done"] is None:
                    continue
                if any(query.get(k) is not None and r.get(k) != (query[k].upper() if k == "method" else query[k])
                       for k in keys):
                    continue
                if rx and not rx.search(r["path"]):
                    continue
                if qrx and not qrx.search(r["raw_query"]):
                    continue
                out.append(r)
            return out

        res = sel()
        timed_out = False
        if want:
            deadline = time.monotonic() + int(query.get("timeout_ms", 10000)) / 1000.0
            while len(res) < want:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    timed_out = True
                    break
                st.cond.wait(rem)
                res = sel()
        if query.get("bodies") in ("0", "false"):
            # Without the bodies (large uploads would make the answer huge).
            res = [{k: v for k, v in r.items() if k not in ("body", "body_text")} for r in res]
        out = {"requests": copy.deepcopy(res), "last_seq": len(st.requests)}
        if want:
            out["timed_out"] = timed_out
        return out

    def _session_control(self, sess):
        return {"session": sess.api_view(),
                "events": [dict(e["event"], _origin=e["origin"], _t=e["t"]) for e in sess.events],
                "streams": copy.deepcopy(sess.streams), "open_streams": len(sess.subscribers)}

    @staticmethod
    def _skill_control(sk):
        return {"skill_id": sk["skill_id"], "type": sk["type"],
                "versions": [{k: v for k, v in ver.items() if k != "archive_b64"} for ver in sk["versions"]],
                "latest": sk["versions"][-1]["id"] if sk["versions"] else None}

    @staticmethod
    def _store_control(store):
        return {"id": store["id"], "name": store["name"],
                "memories": sorted(copy.deepcopy(list(store["memories"].values())), key=lambda x: x["path"]),
                "prefixes": list(store["prefixes"]), "deleted": copy.deepcopy(store["deleted"]),
                "operations": copy.deepcopy(store["operations"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake CMA control plane (see the module docstring).")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--config", default=None, help="JSON object of settings (see DEFAULT_CONFIG)")
    ap.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("loopback only")
    config = json.loads(args.config) if args.config else {}
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        ap.error(f"unknown config keys {sorted(unknown)}")
    fake = FakeControlPlane(port=args.port, host=args.host, verbose=args.verbose, **config).start()
    done = threading.Event()

    def _sig(*_):
        done.set()

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    sys.stdout.write(f"listening on {args.host}:{fake.port}\n")
    sys.stdout.flush()
    while not done.wait(0.2):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
