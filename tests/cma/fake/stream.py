"""E6: the SSE event stream of a session, with its pings, the events appended
after it attached, and the faults and closes the control API asks for."""

from __future__ import annotations

import json
import queue
import time

from .state import Subscriber
from .util import Abort, error_body, new_id


class StreamMixin:
    """The SSE part of the handler (``Handler`` mixes it in)."""

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
                        raise Abort(reset=True)
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
                        raise Abort(reset=True)
                    if mode == "error":
                        payload = payload or error_body(529, "Overloaded")
                        self.write_chunk(b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n")
                    reason = "closed_" + mode
                    self.end_chunks()
                    break
        except Abort:
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
