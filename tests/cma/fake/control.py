"""The test-control API under /_fake (no auth, JSON in and out): settings,
environments, work items, sessions and their events and streams, skills,
memory stores, the request log and fault rules. The module docstring of the
package is its reference."""

from __future__ import annotations

import copy
import re
import time

from .memory import delete_memory, new_store, put_memory, store_control
from .skills import new_skill, skill_control
from .state import FaultRule
from .util import DEFAULT_CONFIG, ApiError, new_id, rfc3339


def control(fake, method, path, body=None, query=None):
    """One call of the control API on `fake` (a FakeControlPlane); returns
    (status, answer) or raises ApiError."""
    body = body or {}
    query = query or {}
    st = fake.state
    parts = [p for p in path.split("/") if p][1:]  # drop "_fake"
    m = method.upper()

    def need(cond_, msg="bad request"):
        if not cond_:
            raise ApiError(400, msg)

    with st.lock:
        if parts == ["health"]:
            return 200, {"ok": True, "url": fake.url if fake.httpd else None}
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
                "sessions": [session_control(s) for s in st.sessions.values()],
                "skills": list(st.skills.values()),
                "memory_stores": [store_control(s) for s in st.stores.values()],
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
                return 200, session_control(sess)
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
            sk = new_skill(body)
            st.skills[sk["skill_id"]] = sk
            return 200, skill_control(sk)
        if len(parts) == 2 and parts[0] == "skills" and m == "GET":
            sk = st.skills.get(parts[1])
            if sk is None:
                raise ApiError(404, "no such skill")
            return 200, skill_control(sk)

        # memory stores
        if parts == ["memory_stores"] and m == "POST":
            store = new_store(body)
            st.stores[store["id"]] = store
            return 200, store_control(store)
        if len(parts) >= 2 and parts[0] == "memory_stores":
            store = st.stores.get(parts[1])
            if store is None:
                raise ApiError(404, "no such memory store")
            sub = "/".join(parts[2:])
            if sub == "" and m == "GET":
                return 200, store_control(store)
            if sub == "memories" and m == "POST":
                put_memory(store, body)
                return 200, store_control(store)
            if sub == "memories/delete" and m == "POST":
                delete_memory(store, body)
                return 200, store_control(store)

        # request log
        if parts == ["requests"] and m == "GET":
            return 200, requests_view(st, query)
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


def requests_view(st, query):
    """``GET /_fake/requests``: the request log filtered (and waited for) as
    `query` says."""
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


def session_control(sess):
    """The control API's view of a session: its full log and its streams."""
    return {"session": sess.api_view(),
            "events": [dict(e["event"], _origin=e["origin"], _t=e["t"]) for e in sess.events],
            "streams": copy.deepcopy(sess.streams), "open_streams": len(sess.subscribers)}
