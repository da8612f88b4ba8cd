"""The server object (FakeControlPlane: the HTTP server on a thread of its own,
the lease-expiry loop, the control API callable from Python) and main, the
command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from http.server import ThreadingHTTPServer

from .control import control
from .handler import Handler
from .state import FakeState
from .util import DEFAULT_CONFIG


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
        return control(self, method, path, body, query)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake CMA control plane (see the docstring of tests/cma/fake/__init__.py).")
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
