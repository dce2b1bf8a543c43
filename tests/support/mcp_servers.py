"""Real MCP servers for the SDK tests: a 2.x `MCPServer` in-process, and the 1.x `FastMCP` script as a child process.

Both serve the support-agent tools of config/policies (search, lookup_order, send_email, shell) over streamable
HTTP at `/mcp` on 127.0.0.1, and both record what reached them, so a test can prove that a denied call never did:
- `Mcp2Server` runs `MCPServer.streamable_http_app()` under uvicorn in the test's own event loop; `calls` lists
  every tool invocation and `requests` every HTTP request (method, path, a few MCP headers);
- `Mcp1Server` starts tests/support/mcp1/server.py with the interpreter of .venv-mcp1 (the 1.x SDK cannot share a
  venv with 2.x) and reads the same records from its `/_records` route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

REPO = Path(__file__).resolve().parents[2]
MCP1_PYTHON = REPO / ".venv-mcp1" / "bin" / "python"
MCP1_DIR = Path(__file__).resolve().parent / "mcp1"
MCP1_SERVER = MCP1_DIR / "server.py"
MCP1_CLIENT = MCP1_DIR / "client.py"
MCP1_VERSION = "1.30.0"

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# Headers worth keeping per request: enough to show sessions, protocol versions and the mirrored method headers.
RECORDED_HEADERS = ("mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "x-pep-decision-id")


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class HttpRecord:
    method: str
    path: str
    headers: dict[str, str]


class RecordingAsgi:
    """ASGI middleware that notes every HTTP request before the MCP app sees it."""

    def __init__(self, app: ASGIApp, into: list[HttpRecord]) -> None:
        self._app = app
        self._into = into

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            kept = {name: headers[name] for name in RECORDED_HEADERS if name in headers}
            self._into.append(HttpRecord(scope["method"], scope["path"], kept))
        await self._app(scope, receive, send)


def build_tools_server(calls: list[ToolCall]) -> MCPServer:
    """The four support-agent tools on a 2.x MCPServer; each invocation is appended to `calls`."""
    server = MCPServer("support-tools", log_level="WARNING")

    @server.tool()
    def search(query: str) -> str:
        """Search the knowledge base."""
        calls.append(ToolCall("search", {"query": query}))
        return f"3 articles match {query!r}"

    @server.tool()
    def lookup_order(order_id: str) -> dict[str, str]:
        """Look an order up by id."""
        calls.append(ToolCall("lookup_order", {"order_id": order_id}))
        return {"order_id": order_id, "status": "shipped"}

    @server.tool()
    def send_email(to: str, subject: str, body: str) -> str:
        """Send an email."""
        calls.append(ToolCall("send_email", {"to": to, "subject": subject, "body": body}))
        return f"sent to {to}"

    @server.tool()
    def shell(command: str) -> str:
        """Run a shell command (never allowed by policy; the server only records that it was reached)."""
        calls.append(ToolCall("shell", {"command": command}))
        return "pretend output"

    return server


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@dataclass
class Mcp2Server:
    """The 2.x MCPServer (streamable HTTP at /mcp) under uvicorn, in the running event loop, on a free port."""

    calls: list[ToolCall] = field(default_factory=list)
    requests: list[HttpRecord] = field(default_factory=list)
    port: int = 0
    # Where the app serves MCP. "/mcp/" makes Starlette answer `/mcp` with a 307 to its own absolute
    # `http://127.0.0.1:PORT/mcp/` (redirect_slashes), as a server mounted under a trailing slash does.
    http_path: str = "/mcp"
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"http://127.0.0.1:{self.port}/mcp"

    def called(self, tool: str) -> list[ToolCall]:
        return [c for c in self.calls if c.tool == tool]

    async def start(self) -> None:
        app = build_tools_server(self.calls).streamable_http_app(host="127.0.0.1", streamable_http_path=self.http_path)
        sock = _loopback_socket()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            RecordingAsgi(app, self.requests),
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the MCP server stopped during start-up")
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"the MCP server did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await asyncio.shield(task)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class Mcp1Unavailable(RuntimeError):
    """.venv-mcp1 is missing or holds another MCP SDK version."""


def mcp1_python() -> Path:
    """The interpreter of .venv-mcp1, checked to hold the pinned 1.x SDK. Raises Mcp1Unavailable saying what to do."""
    if not MCP1_PYTHON.is_file() or not os.access(MCP1_PYTHON, os.X_OK):
        raise Mcp1Unavailable(
            f"{MCP1_PYTHON} is missing: the MCP SDK {MCP1_VERSION} tests need the second venv; run `make test` "
            "(or `make venv-mcp1`), which builds it from requirements/constraints-mcp1.txt"
        )
    probe = "import importlib.metadata as m; print(m.version('mcp'))"
    try:
        done = subprocess.run([str(MCP1_PYTHON), "-c", probe], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Mcp1Unavailable(f"{MCP1_PYTHON} does not run ({exc}); run `make venv-mcp1`") from None
    version = done.stdout.strip()
    if done.returncode != 0 or version != MCP1_VERSION:
        raise Mcp1Unavailable(
            f"{MCP1_PYTHON} has mcp {version or '?'} (needs {MCP1_VERSION}): {done.stderr.strip()[-500:]}; "
            "run `make venv-mcp1`"
        )
    return MCP1_PYTHON


class Mcp1Server:
    """tests/support/mcp1/server.py (FastMCP 1.x, streamable HTTP at /mcp) as a child process on a free port.

    The script binds port 0 itself and prints `{"port": N}` once it listens. Only this child is ever signalled.
    """

    def __init__(self, python: Path, log_path: Path) -> None:
        self.python = python
        self.log_path = log_path
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.python),
                str(MCP1_SERVER),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(REPO),
            )
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await self._proc.stdout.readline()
        except TimeoutError:
            await self.stop()
            raise RuntimeError(
                f"the MCP 1.x server did not start within {START_TIMEOUT_S} s: {self.log_tail()}"
            ) from None
        if not line:
            await self.stop()
            raise RuntimeError(f"the MCP 1.x server exited during start-up: {self.log_tail()}")
        self.port = int(json.loads(line)["port"])

    async def records(self) -> tuple[list[ToolCall], list[HttpRecord]]:
        """What reached the server so far (read from it directly, not through the PEP)."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{self.port}/_records") as resp,
        ):
            resp.raise_for_status()
            data = await resp.json()
        calls = [ToolCall(c["tool"], c["arguments"]) for c in data["calls"]]
        requests = [HttpRecord(r["method"], r["path"], r["headers"]) for r in data["requests"]]
        return calls, requests

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()


async def run_mcp1_client(python: Path, url: str, plan: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Runs tests/support/mcp1/client.py with `plan` (JSON on argv) and returns the JSON it prints on stdout."""
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(MCP1_CLIENT),
        url,
        json.dumps(plan),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the MCP 1.x client did not finish within {timeout_s} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"the MCP 1.x client failed ({proc.returncode}): {err.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    result["stderr"] = err.decode(errors="replace")
    return result
