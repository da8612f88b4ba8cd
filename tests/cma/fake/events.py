"""E8: what a worker may send to a session (known user.* types, no unknown
fields, results paired with an existing call that was not denied, is not
awaiting its confirmation, not in a terminated thread, and not answered yet)."""

from __future__ import annotations

from .util import ApiError

USER_EVENT_FIELDS = {
    "user.tool_result": {"type", "tool_use_id", "is_error", "content"},
    "user.custom_tool_result": {"type", "custom_tool_use_id", "is_error", "content"},
    "user.tool_confirmation": {"type", "tool_use_id", "result", "deny_message"},
    "user.message": {"type", "content"},
    "user.interrupt": {"type"},
    "user.define_outcome": {"type", "description", "rubric", "max_iterations"},
}
CONTENT_BLOCK_TYPES = {"text", "image", "document", "search_result"}


def accept_send(state, sess, body):
    """Validates and stores the events of an E8 request; returns the stored events."""
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
        validate_user_event(state, sess, ev)
    out = []
    for ev in events:
        out.append(state.append_event(sess, ev, origin="client"))
    return out

def validate_user_event(state, sess, ev):
    """Refuses (ApiError 400) an event a worker may not send to this session."""
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
        target = state.find_event(sess, ref)
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
        if answered is not None and state.config["duplicate_result"] == "reject":
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
        target = state.find_event(sess, ev.get("tool_use_id"))
        if target is None or target.get("type") not in ("agent.tool_use", "agent.custom_tool_use",
                                                         "agent.mcp_tool_use"):
            raise ApiError(400, "events[0].tool_use_id: no such tool use")
