#!/usr/bin/env python3
"""Baseline for `hands bench`: the official SDK's bash and read tools, in process.

    sdk_tools.py --workdir DIR --file NAME --iterations N

Times N calls of the SDK's bash tool running `/bin/true` and N calls of its read
tool on DIR/NAME, each called and converted exactly as the SDK's session runner
does (tests/sdk/run_sdk.py's `call_tool`), after a warm-up. Prints
{"bash_true": [seconds...], "read": [seconds...]} as JSON.
"""

import argparse
import json
import os
import sys
import time

import anyio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "sdk"))
from run_sdk import call_tool  # noqa: E402


async def run(workdir: str, name: str, n: int) -> dict:
    from anthropic.lib.tools._beta_functions import aclose_runnable_tool
    from anthropic.lib.tools._tool_dispatch import tool_registry
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    ctx = AgentToolContext(workdir=workdir)
    await ctx.__aenter__()
    tools = beta_agent_toolset_20260401(ctx)
    by_name = tool_registry(tools)
    out = {"bash_true": [], "read": []}
    try:
        for key, tool, inp in (
            ("bash_true", "bash", {"command": "/bin/true"}),
            ("read", "read", {"file_path": name}),
        ):
            for i in range(n + 20):
                t = time.perf_counter()
                _, is_error = await call_tool(by_name[tool], tool, dict(inp))
                dt = time.perf_counter() - t
                if is_error:
                    sys.exit(f"SDK {tool} failed")
                if i >= 20:
                    out[key].append(dt)
    finally:
        for tool in tools:
            await aclose_runnable_tool(tool)
        await ctx.__aexit__(None, None, None)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--iterations", type=int, default=200)
    a = p.parse_args()
    json.dump(anyio.run(run, a.workdir, a.file, a.iterations), sys.stdout)


if __name__ == "__main__":
    main()
