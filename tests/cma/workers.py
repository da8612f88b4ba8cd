"""Starting the two workers under comparison against a fake control plane:
the official SDK's EnvironmentWorker (through ``sdk_worker.py``, a process of
its own) and ``hands worker --config`` with only an ``[anthropic]`` table.
Shared by ``differential.py`` and ``benches/cma_roundtrip.py``; ``control``
(the fake's control API) also by ``fidelity.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def control(url, method, path, body=None, **query):
    """A call to the fake's ``/_fake`` control API; the decoded JSON answer."""
    q = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in query.items() if v is not None)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path + ("?" + q if q else ""), data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"control {method} {path} -> {e.code}: {e.read()[:300]!r}") from None


def _key_file(tmp, name, key):
    path = os.path.join(tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, key.encode())
    os.close(fd)
    return path


def start_sdk(url, env, tmp, workdir, max_idle):
    """The SDK worker serving ``env`` on the fake at ``url``; returns (process, log path)."""
    keyfile = _key_file(tmp, "sdk-key", env["key"])
    logf = open(os.path.join(tmp, "sdk-worker.log"), "w")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "sdk_worker.py"), "--url", url,
                          "--environment-id", env["id"], "--key-file", keyfile, "--workdir", workdir,
                          "--max-idle", str(max_idle)], stdout=subprocess.PIPE, stderr=logf, text=True)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise RuntimeError(f"SDK worker did not start ({line!r}); log: {open(logf.name).read()[-2000:]}")
    return p, logf.name


def start_hands(url, env, tmp, hands, worker_id, max_idle):
    """``hands worker`` serving ``env`` on the fake at ``url``; returns (process, log path)."""
    _key_file(tmp, "hands-key", env["key"])
    cfg = os.path.join(tmp, "hands.toml")
    with open(cfg, "w") as f:
        f.write(f'''worker_id = "{worker_id}"
capacity = 2

[anthropic]
environment_id = "{env["id"]}"
environment_key_file = "hands-key"
environment = "default"
max_idle_secs = {max_idle}
base_url = "{url}"
''')
    logf = open(os.path.join(tmp, "hands-worker.log"), "w")
    penv = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    penv.setdefault("RUST_LOG", "info")
    p = subprocess.Popen([hands, "worker", "--config", cfg], stdout=logf, stderr=subprocess.STDOUT, env=penv)
    return p, logf.name


def stop_process(p, timeout=20):
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
