#!/usr/bin/env python3
"""A faithful fake of the Claude Managed Agents (CMA) control plane, as seen by a
self-hosted environment worker: the entry point of the ``fake`` package beside
this file, whose docstring is the reference (the worker-facing API E1-E15 and the
test-control API under /_fake). Python 3.11 standard library only.

Run it:     python3 tests/cma/fake_cp.py [--port 0] [--host 127.0.0.1] [--config JSON] [--verbose]
            prints exactly one line ``listening on 127.0.0.1:PORT`` to stdout, then
            serves until killed (SIGTERM/SIGINT).
Import it:  from fake_cp import FakeControlPlane (tests/cma on sys.path);
            fake = FakeControlPlane(port=0).start(); fake.url;
            fake.control("POST", "/_fake/environments", {}); fake.stop()
"""

import sys

if __name__ == "__main__":
    # Run as a script (the package beside it is on sys.path): no __pycache__
    # is left next to the sources.
    sys.dont_write_bytecode = True

from fake import DEFAULT_CONFIG, ApiError, FakeControlPlane, Handler, main  # noqa: E402

__all__ = ["DEFAULT_CONFIG", "ApiError", "FakeControlPlane", "Handler", "main"]

if __name__ == "__main__":
    sys.exit(main())
