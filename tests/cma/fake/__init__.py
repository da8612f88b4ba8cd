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
            (``from fake_cp import FakeControlPlane`` or ``from fake import ...`` with
            tests/cma on sys.path)

The package, by concern:

  util.py     constants, the generic error body (ApiError), ids, timestamps,
              page cursors, integer parameters
  state.py    the fake's state: work items and their lease, sessions and their
              event log, stream subscribers, fault rules (FakeState and its parts)
  handler.py  the HTTP handler: routing, the request log, fault application,
              credentials and headers, the work and session endpoints (E1-E8)
  events.py   validation of the events a worker sends (E8)
  stream.py   the SSE event stream (E6)
  skills.py   skills and their versions (E9, E10)
  memory.py   memory stores and their memories (E11-E15)
  control.py  the test-control API under /_fake
  server.py   FakeControlPlane (the server object) and main (the command line)

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

from .handler import Handler
from .server import FakeControlPlane, main
from .util import DEFAULT_CONFIG, ApiError

__all__ = ["DEFAULT_CONFIG", "ApiError", "FakeControlPlane", "Handler", "main"]
