"""Memory stores and their memories: the worker-facing endpoints (E11-E15), the
memory model (paths, content, sha256, versions) and the server-side changes the
control API makes."""

from __future__ import annotations

import copy
import time

from .util import ApiError, decode_cursor, encode_cursor, new_id, parse_int, rfc3339, sha256_hex


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


def new_store(body):
    """A store from the control API's ``POST /_fake/memory_stores`` body."""
    sid = body.get("id") or new_id("memstore")
    store = {"id": sid, "name": body.get("name") or sid, "memories": {}, "prefixes":
             list(body.get("prefixes") or []), "deleted": [], "operations": []}
    for mm in body.get("memories") or []:
        check_memory_path(mm.get("path"))
        store["memories"][mm["path"]] = new_memory(sid, mm["path"], mm.get("content", ""))
    return store


def put_memory(store, body):
    """A server-side upsert: ``{"path", "content"}``."""
    check_memory_path(body.get("path"))
    mem = store["memories"].get(body["path"])
    if mem is None:
        store["memories"][body["path"]] = new_memory(store["id"], body["path"],
                                                     body.get("content", ""))
    else:
        set_memory_content(mem, body.get("content", ""))


def delete_memory(store, body):
    """A server-side delete: ``{"path"}``."""
    mem = store["memories"].pop(body.get("path"), None)
    if mem is None:
        raise ApiError(400, "no memory at that path")
    store["deleted"].append(dict(mem, deleted_t=time.time()))


def store_control(store):
    """The control API's view of a store (memories with content, deletions,
    operations)."""
    return {"id": store["id"], "name": store["name"],
            "memories": sorted(copy.deepcopy(list(store["memories"].values())), key=lambda x: x["path"]),
            "prefixes": list(store["prefixes"]), "deleted": copy.deepcopy(store["deleted"]),
            "operations": copy.deepcopy(store["operations"])}


def store_for(state, mid, cred):
    """The store a memory request names, if its credential may use it."""
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

def memory_api(state, ep, store, p, q, body):
    """E11-E15 on `store` (the state locked); returns (status, answer)."""
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
