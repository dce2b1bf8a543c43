"""A client of the last MCP SDK 1.x (1.30.0): streamable HTTP transport + ClientSession, driven by a JSON plan.

Run with the interpreter of .venv-mcp1: `.venv-mcp1/bin/python tests/support/mcp1/client.py URL PLAN_JSON`.
The plan: `{"headers": {...}, "call_timeout_s": 5, "steps": [...]}` with steps `{"op": "list"}`,
`{"op": "call", "tool": NAME, "arguments": {...}}`, `{"op": "sleep", "ms": N}` and `{"op": "wait_notification",
"ms": N}` (wait for a server notification on the GET stream). It initializes (getting Mcp-Session-Id; the SDK
then opens the GET stream), runs the steps, and closes the session (the SDK sends DELETE). It prints one JSON
object on stdout: the session id, protocol version, tool names, each step's outcome (`ok`, `tool_error` for
`isError`, `mcp_error` with the JSON-RPC code, `timeout`, or `exception`), the notifications received and, when
the transport itself failed, `fatal`. The exit code is 0 whenever that JSON was printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any

import anyio
from mcp import ClientSession, McpError, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.session import RequestResponder


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def run(url: str, plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": [], "notifications": [], "session_id": None, "fatal": None}
    timeout = timedelta(seconds=float(plan.get("call_timeout_s", 5)))
    notified = anyio.Event()

    async def on_message(
        message: RequestResponder[types.ServerRequest, types.ClientResult] | types.ServerNotification | Exception,
    ) -> None:
        if isinstance(message, types.ServerNotification):
            out["notifications"].append(message.root.method)
            notified.set()
        elif isinstance(message, Exception):
            out["notifications"].append(f"exception: {message!r}")

    started = time.monotonic()
    try:
        http = create_mcp_http_client(headers=plan.get("headers") or {})
        async with (
            http,
            streamable_http_client(url, http_client=http) as (read, write, get_session_id),
            ClientSession(read, write, read_timeout_seconds=timeout, message_handler=on_message) as session,
        ):
            init = await session.initialize()
            out["protocol_version"] = init.protocolVersion
            out["server_name"] = init.serverInfo.name
            out["session_id"] = get_session_id()
            for step in plan.get("steps", []):
                out["steps"].append(await _step(session, step, notified))
        out["closed"] = True
    except BaseException as exc:  # the transport died (e.g. an HTTP error status); report what the SDK raised
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        out["fatal"] = _describe(exc)
    out["elapsed_s"] = round(time.monotonic() - started, 3)
    return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def _step(session: ClientSession, step: dict[str, Any], notified: anyio.Event) -> dict[str, Any]:
    op = step["op"]
    record: dict[str, Any] = {"op": op}
    started = time.monotonic()
    try:
        if op == "list":
            listed = await session.list_tools()
            record.update(outcome="ok", tools=sorted(t.name for t in listed.tools))
        elif op == "call":
            record["tool"] = step["tool"]
            result = await session.call_tool(step["tool"], step.get("arguments") or {})
            record.update(outcome="tool_error" if result.isError else "ok", text=_text(result))
        elif op == "sleep":
            await anyio.sleep(step["ms"] / 1000)
            record["outcome"] = "ok"
        elif op == "wait_notification":
            with anyio.fail_after(step["ms"] / 1000):
                await notified.wait()
            record["outcome"] = "ok"
        else:
            raise ValueError(f"unknown op {op!r}")
    except McpError as exc:
        record.update(outcome="mcp_error", code=exc.error.code, message=exc.error.message, data=exc.error.data)
    except TimeoutError:
        record["outcome"] = "timeout"
    except Exception as exc:
        record.update(outcome="exception", message=_describe(exc))
    record["elapsed_s"] = round(time.monotonic() - started, 3)
    return record


def main() -> None:
    url, plan = sys.argv[1], json.loads(sys.argv[2])
    result = asyncio.run(run(url, plan))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
