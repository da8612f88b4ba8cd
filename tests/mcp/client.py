"""An independent MCP client for hands' MCP face: the official MCP Python SDK
(`mcp` from PyPI), nothing of hands'. Each scenario drives `hands mcp` over
stdio, or an MCP endpoint over streamable HTTP, and prints one JSON report on
stdout; tests/it/mcp.rs judges it.

    client.py SCENARIO HANDS [ARGS...]

HANDS is the hands binary (stdio: `hands mcp --env ENV`) or a base URL
(streamable HTTP: ENV's endpoint is BASE/ENV, or the URL with `{env}`
replaced). Over HTTP, $MCP_TOKEN is sent
as a bearer token, $MCP_CA verifies the server's certificate and
$MCP_CLIENT_CERT/$MCP_CLIENT_KEY are presented as the client's.

Scenarios: tools, every_tool, progress, cancel, isolation.
"""

import json
import os
import ssl
import subprocess
import sys

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


def server(hands, env="default"):
    return StdioServerParameters(command=hands, args=["mcp", "--env", env])


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


def outcome(result):
    return {"text": text(result), "is_error": bool(result.is_error)}


def http_client():
    import httpx2

    headers = {}
    if os.environ.get("MCP_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MCP_TOKEN"]
    verify = True
    if os.environ.get("MCP_CA"):
        verify = ssl.create_default_context(cafile=os.environ["MCP_CA"])
        if os.environ.get("MCP_CLIENT_CERT"):
            verify.load_cert_chain(os.environ["MCP_CLIENT_CERT"], os.environ["MCP_CLIENT_KEY"])
    return httpx2.AsyncClient(headers=headers, verify=verify, timeout=httpx2.Timeout(30, read=300))


async def connect(hands, body, env="default"):
    if hands.startswith(("http://", "https://")):
        from mcp.client.streamable_http import streamable_http_client

        async with http_client() as client:
            url = hands.replace("{env}", env) if "{env}" in hands else f"{hands}/{env}"
            async with streamable_http_client(url, http_client=client) as (r, w, *_):
                async with ClientSession(r, w) as s:
                    init = await s.initialize()
                    return await body(s, init)
    async with stdio_client(server(hands, env)) as (r, w):
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            return await body(s, init)


async def tools(hands, env="default"):
    async def body(s, init):
        listed = await s.list_tools()
        return {
            "server": init.server_info.name,
            "instructions": init.instructions,
            "tools": [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                    "read_only": t.annotations.read_only_hint if t.annotations else None,
                }
                for t in listed.tools
            ],
        }

    return await connect(hands, body, env)


async def every_tool(hands):
    async def body(s, init):
        out = {}
        out["bash"] = outcome(await s.call_tool("bash", {"command": "cd /workspace && echo uid=$(id -u) && pwd"}))
        out["bash_fails"] = outcome(await s.call_tool("bash", {"command": "echo no >&2; false"}))
        out["write"] = outcome(await s.call_tool("write", {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"}))
        out["read"] = outcome(await s.call_tool("read", {"file_path": "notes/a.txt"}))
        out["edit"] = outcome(
            await s.call_tool("edit", {"file_path": "notes/a.txt", "old_string": "beta", "new_string": "gamma"})
        )
        out["read_after_edit"] = outcome(await s.call_tool("read", {"file_path": "notes/a.txt"}))
        out["glob"] = outcome(await s.call_tool("glob", {"pattern": "**/*.txt"}))
        out["grep"] = outcome(await s.call_tool("grep", {"pattern": "gam+a", "path": "notes"}))
        out["read_outside"] = outcome(await s.call_tool("read", {"file_path": "/etc/shadow"}))
        out["bash_shadow"] = outcome(await s.call_tool("bash", {"command": "cat /etc/shadow"}))
        try:
            await s.call_tool("launch_missiles", {})
            out["unknown_tool"] = {"error": None}
        except Exception as e:  # the SDK raises the JSON-RPC error
            out["unknown_tool"] = {"error": str(e)}
        out["still_serving"] = outcome(await s.call_tool("bash", {"command": "echo still here"}))
        return out

    return await connect(hands, body)


async def progress(hands):
    async def body(s, init):
        notes = []

        async def on_progress(p, total, message):
            notes.append({"progress": p, "message": message})

        result = await s.call_tool(
            "bash",
            {"command": "for i in 1 2 3 4; do echo line$i; sleep 0.4; done; echo done"},
            progress_callback=on_progress,
        )
        return {"notes": notes, "result": outcome(result)}

    return await connect(hands, body)


def host_processes(pattern):
    """Processes on the host whose command line matches (pgrep -f), as seen
    from outside every session."""
    out = subprocess.run(["pgrep", "-f", "-a", pattern], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


async def cancel(hands, marker):
    async def body(s, init):
        started = anyio.Event()
        report = {}

        async def long_call():
            await s.call_tool("bash", {"command": f"sleep {marker} & sleep {marker}; echo finished"})
            report["long_call_returned"] = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            # Wait until the call's processes run, seen from the host.
            with anyio.fail_after(30):
                while len(host_processes(f"sleep {marker}")) < 2:
                    await anyio.sleep(0.1)
            report["running_before"] = len(host_processes(f"sleep {marker}"))
            # Abandoning the request sends notifications/cancelled.
            tg.cancel_scope.cancel()
        with anyio.fail_after(30):
            while host_processes(f"sleep {marker}"):
                await anyio.sleep(0.1)
        report["running_after"] = len(host_processes(f"sleep {marker}"))
        report["after_cancel"] = outcome(await s.call_tool("bash", {"command": "echo next"}))
        report["restart"] = outcome(await s.call_tool("bash", {"restart": True}))
        report["next"] = outcome(await s.call_tool("bash", {"command": "echo next; pgrep -c sleep || true"}))
        return report

    return await connect(hands, body)


async def isolation(hands, marker):
    report = {}
    a_ready = anyio.Event()
    b_done = anyio.Event()

    async def a(s, init):
        report["a_id"] = outcome(await s.call_tool("bash", {"command": "id -u"}))
        report["a_write"] = outcome(await s.call_tool("write", {"file_path": "secret.txt", "content": "a-only\n"}))
        report["a_bg"] = outcome(
            await s.call_tool("bash", {"command": f"(sleep {marker} >/dev/null 2>&1 &); echo started"})
        )
        a_ready.set()
        await b_done.wait()
        return None

    async def b(s, init):
        await a_ready.wait()
        report["b_id"] = outcome(await s.call_tool("bash", {"command": "id -u"}))
        report["b_ls"] = outcome(await s.call_tool("bash", {"command": "ls -a /workspace"}))
        report["b_read"] = outcome(await s.call_tool("read", {"file_path": "secret.txt"}))
        report["b_ps"] = outcome(await s.call_tool("bash", {"command": "ps -eo args"}))
        report["b_kill"] = outcome(await s.call_tool("bash", {"command": f"pkill -f 'sleep {marker}'; echo $?"}))
        report["a_still_running"] = len(host_processes(f"sleep {marker}"))
        b_done.set()
        return None

    async with anyio.create_task_group() as tg:
        tg.start_soon(connect, hands, a)
        tg.start_soon(connect, hands, b)
    # Both connections are closed: their sessions with them.
    with anyio.fail_after(30):
        while host_processes(f"sleep {marker}"):
            await anyio.sleep(0.1)
    report["left_after_close"] = len(host_processes(f"sleep {marker}"))
    return report


def main():
    scenario, hands, *args = sys.argv[1:]
    run = {
        "tools": tools,
        "every_tool": every_tool,
        "progress": progress,
        "cancel": cancel,
        "isolation": isolation,
    }[scenario]
    report = anyio.run(run, hands, *args)
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
