"""The support-agent tools on a FastMCP server of the last MCP SDK 1.x (1.30.0), over streamable HTTP at /mcp.

Run with the interpreter of .venv-mcp1: `.venv-mcp1/bin/python tests/support/mcp1/server.py`. It binds a free port
on 127.0.0.1, prints `{"port": N}` on stdout once it listens, and serves until SIGTERM. Sessions are on (the
2025-11-25 shape: initialize issues Mcp-Session-Id, GET opens the server stream, DELETE ends the session) and the
SDK's DNS-rebinding protection is left at its localhost default. `search` also sends
`notifications/tools/list_changed`, which the SDK delivers on the GET stream.

`GET /_records` (outside the MCP endpoint, never recorded itself) answers what reached the server:
`{"calls": [{"tool", "arguments"}], "requests": [{"method", "path", "headers"}]}`.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.session import ServerSession
from starlette.types import ASGIApp, Receive, Scope, Send

RECORDED_HEADERS = ("mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "x-pep-decision-id")

calls: list[dict[str, Any]] = []
requests: list[dict[str, Any]] = []

mcp = FastMCP("support-tools", host="127.0.0.1", log_level="WARNING")


@mcp.tool()
async def search(query: str, ctx: Context[ServerSession, None]) -> str:
    """Search the knowledge base."""
    calls.append({"tool": "search", "arguments": {"query": query}})
    # A notification outside any request: the SDK sends it on the session's GET stream, so a client that receives
    # it proves that stream works end to end (through the PEP, too).
    await ctx.session.send_tool_list_changed()
    return f"3 articles match {query!r}"


@mcp.tool()
def lookup_order(order_id: str) -> dict[str, str]:
    """Look an order up by id."""
    calls.append({"tool": "lookup_order", "arguments": {"order_id": order_id}})
    return {"order_id": order_id, "status": "shipped"}


@mcp.tool()
def send_email(to: str, subject: str, body: str) -> str:
    """Send an email."""
    calls.append({"tool": "send_email", "arguments": {"to": to, "subject": subject, "body": body}})
    return f"sent to {to}"


@mcp.tool()
def shell(command: str) -> str:
    """Run a shell command (never allowed by policy; the server only records that it was reached)."""
    calls.append({"tool": "shell", "arguments": {"command": command}})
    return "pretend output"


class Recorder:
    """Notes every HTTP request before the MCP app sees it, and serves the notes at /_records."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/_records":
            body = json.dumps({"calls": calls, "requests": requests}).encode()
            json_type = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": json_type})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            kept = {name: headers[name] for name in RECORDED_HEADERS if name in headers}
            requests.append({"method": scope["method"], "path": scope["path"], "headers": kept})
        await self.app(scope, receive, send)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        Recorder(mcp.streamable_http_app()),
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    # Announce the port only once uvicorn listens: the parent connects right after reading it.
    original_startup = server.startup

    async def startup(sockets: list[socket.socket] | None = None) -> None:
        await original_startup(sockets)
        sys.stdout.write(json.dumps({"port": sock.getsockname()[1]}) + "\n")
        sys.stdout.flush()

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
