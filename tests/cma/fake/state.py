"""The fake's state: work items and their lease (WorkItem), sessions and their
event log (Session), stream subscribers, fault rules (FaultRule), and FakeState,
which holds them all under one lock and implements the transitions the
worker-facing and the control API share."""

from __future__ import annotations

import copy
import json
import queue
import re
import secrets
import threading
import time

from .util import (
    DEFAULT_CONFIG,
    ApiError,
    b64url,
    error_body,
    new_id,
    rfc3339,
)


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
