"""Starting the two workers under comparison against a fake control plane:
the official SDK's EnvironmentWorker (through ``sdk_worker.py``, a process of
its own) and ``hands worker --config`` with only an ``[anthropic]`` table.
Shared by ``differential.py`` and ``benches/cma_roundtrip.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


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
