"""What every part of the fake shares: the API's constants and settings, the
generic error body (ApiError), ids, timestamps, page cursors and integer
parameters."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from datetime import datetime, timezone

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


class Abort(Exception):
    """Drop the connection without a response."""

    def __init__(self, reset=True):
        self.reset = reset
