#!/usr/bin/env python3
"""Run the OFFICIAL SDK environment worker (anthropic 2.10.0) as a process.

    sdk_worker.py --url URL --environment-id ENV --key-file FILE --workdir DIR [--max-idle S]

The same worker fidelity.py drives in a thread, started the same way
(``AsyncAnthropic(base_url=URL, max_retries=2)`` + ``EnvironmentWorker(workdir=DIR,
max_idle=S)``), but in a process of its own, for tests/cma/differential.py and
benches/cma_roundtrip.py: results must not depend on who runs them, and a worker in
its own process does not share a GIL with the fake or the driver.

The process environment is replaced before anything runs, as tests/sdk/run_sdk.py
does, by PATH (so the SDK's grep finds /usr/bin/rg, the engine hands mirrors) and
LANG=C.UTF-8, the locale hands gives its sessions. Prints ``ready`` on stdout once the
worker task exists; SIGTERM/SIGINT cancel the worker (teardown runs) and exit 0.
"""

import argparse
import asyncio
import os
import signal
import sys

ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "NO_PROXY": "127.0.0.1,localhost"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--environment-id", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--max-idle", type=float, default=2.0)
    a = p.parse_args()
    key = open(a.key_file).read().strip()
    os.environ.clear()
    os.environ.update(ENVIRONMENT)
    sys.dont_write_bytecode = True

    import anthropic
    from anthropic.lib.environments import EnvironmentWorker

    if anthropic.__version__ != "2.10.0":
        sys.exit(f"sdk_worker.py needs anthropic 2.10.0, found {anthropic.__version__}")

    async def run() -> None:
        client = anthropic.AsyncAnthropic(api_key="sk-parent-key-not-used", base_url=a.url, max_retries=2)
        worker = EnvironmentWorker(client, environment_id=a.environment_id, environment_key=key,
                                   workdir=a.workdir, max_idle=a.max_idle)
        task = asyncio.get_running_loop().create_task(worker.run())
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        print("ready", flush=True)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await client.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
