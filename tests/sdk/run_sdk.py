#!/usr/bin/env python3
"""Run the differential test's cases through the official SDK's agent toolset.

    run_sdk.py --workdir DIR --cases cases.json > sdk.json

DIR is a fresh fixture (make_fixture.py). Every case runs, in file order, on one
`AgentToolContext` and one set of `beta_agent_toolset_20260401` tools, so bash state
carries over between cases as it does between the calls of one session. Each call is
executed and its outcome converted exactly as the SDK's session runner does it
(`SessionToolRunner._call_tool` in `_beta_session_runner.py`, anthropic 2.10.0): the
runner's 150 s timeout, `ToolError` texts, `repr()` of any other exception (so bad
input reads `ValueError('Invalid arguments for function read')`), and the conversion
into session content blocks (`(no output)` for empty results). The runner's own
helpers are imported rather than copied, so the conversion cannot drift from the SDK;
the SDK version is pinned because the cases and the expected differences are
calibrated against it.

Output on stdout: a JSON list of `{"name", "content", "is_error"}`, `content` being
the list of blocks the runner would post. Paths in it are the canonical DIR as given
(it must already be canonical, so the caller knows the exact string to replace).

Inputs may contain the placeholder `@WORKDIR@` in any string; it is replaced by DIR
before the call (the hands side replaces it with `/workspace`).

The process environment is replaced before any tool runs, as if the worker had been
started with only PATH and LANG: bash and rg inherit it (minus `ANTHROPIC_*`), and a
fixed one keeps texts from depending on who runs the test. PATH holds /usr/bin so the
SDK finds /usr/bin/rg and uses ripgrep, the engine hands' grep mirrors, instead of its
built-in Python walker.
"""

import argparse
import json
import os
import shutil
import sys
from typing import Any

import anyio

SDK_VERSION = "2.10.0"
PLACEHOLDER = "@WORKDIR@"
PAUSE_BETWEEN_CALLS = 0.01
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def substitute(value: Any, workdir: str) -> Any:
    """`value` with the placeholder replaced in every string, at any depth."""
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, workdir)
    if isinstance(value, list):
        return [substitute(v, workdir) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, workdir) for k, v in value.items()}
    return value


async def call_tool(tool: Any, name: str, input_: dict[str, object]) -> tuple[list[Any], bool]:
    """One call, as `SessionToolRunner._call_tool` makes it and converts its outcome."""
    from anthropic.lib.tools._beta_functions import ToolError
    from anthropic.lib.tools._tool_dispatch import run_runnable_tool, tool_error_content, tool_result_content
    from anthropic.lib.tools._beta_session_runner import TOOL_TIMEOUT, _to_session_content

    is_error = False
    try:
        with anyio.fail_after(TOOL_TIMEOUT):
            content = tool_result_content(await run_runnable_tool(tool, input_))
    except TimeoutError:
        content = f"tool {name!r} timed out"
        is_error = True
    except ToolError as e:
        content = tool_error_content(e)
        is_error = True
    except Exception as e:  # the runner catches every exception the same way
        content = tool_error_content(e)
        is_error = True
    session_content, _ = _to_session_content(content)
    return session_content, is_error


async def run(workdir: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from anthropic.lib.tools._beta_functions import aclose_runnable_tool
    from anthropic.lib.tools._tool_dispatch import tool_registry
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    # As EnvironmentWorker builds it for a session without memory stores or skills.
    ctx = AgentToolContext(workdir=workdir)
    await ctx.__aenter__()
    tools = beta_agent_toolset_20260401(ctx)
    by_name = tool_registry(tools)
    results = []
    try:
        for case in cases:
            # The runner passes `dict(ev.input)`; cases are objects already.
            input_ = dict(substitute(case["input"], workdir))
            content, is_error = await call_tool(by_name[case["tool"]], case["tool"], input_)
            results.append({"name": case["name"], "content": content, "is_error": is_error})
            # The runner posts each result before it takes the next call. This pause
            # stands in for that round trip; without it the next bash call can come
            # before asyncio has recorded that a shell died (`exit`), and the SDK
            # reads EOF as `(no output)` instead of `bash session terminated`.
            await anyio.sleep(PAUSE_BETWEEN_CALLS)
    finally:
        # The runner's teardown, then the worker's: each tool's cleanup hook (this is
        # what kills the bash tool's shell), then the context's exit. Shielded as in
        # the SDK, so an interrupt cannot leave the shell behind.
        with anyio.CancelScope(shield=True):
            for tool in tools:
                await aclose_runnable_tool(tool)
            await ctx.__aexit__(None, None, None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a fresh fixture tree, canonical absolute path")
    parser.add_argument("--cases", required=True, help="cases.json")
    args = parser.parse_args()

    import anthropic

    if anthropic.__version__ != SDK_VERSION:
        sys.exit(f"anthropic {anthropic.__version__} installed; these cases are calibrated for {SDK_VERSION}")
    workdir = args.workdir
    if not os.path.isabs(workdir) or os.path.realpath(workdir) != workdir or not os.path.isdir(workdir):
        sys.exit(f"--workdir {workdir!r} must be an existing directory given by its canonical absolute path")
    with open(args.cases, encoding="utf-8") as f:
        cases = json.load(f)

    os.environ.clear()
    os.environ.update(ENVIRONMENT)
    if shutil.which("rg") != "/usr/bin/rg":
        sys.exit("/usr/bin/rg is required: without it the SDK's grep falls back to its built-in walker")

    results = anyio.run(run, workdir, cases)
    json.dump(results, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
