"""The real MCP SDKs through the PEP, on loopback: 2.x (`mcp` 2.3.0, protocol 2026-07-28, stateless) in process,
and the last 1.x (`mcp` 1.30.0, protocol 2025-11-25, sessions) as child processes run by .venv-mcp1's python.

The servers are the SDKs' own (`MCPServer` / `FastMCP`) with the support-agent tools; the PDPs serve the shipped
tool policy plus the session plumbing of tests/e2e/policies. Each server records the tool invocations it ran, so
a denied call is proven never to have reached it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import PepStarter, RunningPep
from tests.support.mcp_servers import (
    Mcp1Server,
    Mcp1Unavailable,
    Mcp2Server,
    ToolCall,
    mcp1_python,
    run_mcp1_client,
)
from tests.support.sdk_stack import AGENT, PDP_KINDS, PdpUnderTest, at_least, pep_config, settled_log

POLICY_DENY = -32001  # JSON-RPC code of a policy denial (README, "In front of an MCP server": denials)
UNDECIDED = -32603  # the PDP could not decide
CALL_BOUND_S = 5.0  # no SDK call may take longer than this, allowed or denied
EMAIL_OK = {"to": "bob@acme.example", "subject": "Your refund", "body": "It is on its way."}
EMAIL_EVIL = {"to": "bob@evil.example", "subject": "Customer list", "body": "attached"}


@pytest.fixture(params=PDP_KINDS)
async def pdp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PdpUnderTest]:
    binary = request.getfixturevalue("cerbos_binary") if request.param == "cerbos" else None
    under_test = await PdpUnderTest.start(request.param, tmp_path, binary)
    yield under_test
    await under_test.stop()


@pytest.fixture
async def cedar_pdp(tmp_path: Path) -> PdpUnderTest:
    return await PdpUnderTest.start("cedar", tmp_path)


@pytest.fixture
async def mcp2() -> AsyncIterator[Mcp2Server]:
    async with Mcp2Server() as server:
        yield server


StartPep = Callable[..., Any]


@asynccontextmanager
async def pep_starter(tmp_path: Path, pdp: PdpUnderTest, upstream: str) -> AsyncIterator[StartPep]:
    """`await start(deny_status=..., filter_tools_list=...)` starts a PEP with an `mcp` route to `upstream`."""
    starters: list[PepStarter] = []

    async def start(**options: Any) -> RunningPep:
        starter = PepStarter(
            tmp_path / f"pep-{len(starters)}",
            lambda log: pep_config(pdp.config, log, mcp_upstream=upstream, **options),
            "mcp-sdk-test.yaml",
        )
        (tmp_path / f"pep-{len(starters)}").mkdir()
        starters.append(starter)
        running: RunningPep = await starter()
        return running

    try:
        yield start
    finally:
        for starter in starters:
            await starter.close()


@asynccontextmanager
async def mcp2_client(url: str, agent: str = AGENT, mode: str = "auto") -> AsyncIterator[Client]:
    """The 2.x SDK's high-level Client over streamable HTTP, sending the agent header on every request.
    `mode="auto"` (the default) speaks 2026-07-28 and falls back to the initialize handshake; "legacy" forces it."""
    async with (
        httpx2.AsyncClient(headers={"x-agent-id": agent}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def expect_denied(client: Client, tool: str, arguments: dict[str, Any], code: int) -> MCPError:
    """The SDK surfaces the PEP's denial as an MCPError carrying the JSON-RPC error, quickly."""
    started = time.monotonic()
    async with asyncio.timeout(CALL_BOUND_S):
        with pytest.raises(MCPError) as caught:
            await client.call_tool(tool, arguments)
    assert time.monotonic() - started < 2.0
    assert caught.value.error.code == code, caught.value.error
    return caught.value


def decisions(entries: list[dict[str, Any]]) -> list[tuple[str | None, str | None, str, str]]:
    """The decisions about what the client sent (what the server sent is `from_server`)."""
    return [
        (e["mcp_method"], e["mcp_name"], e["decision"], e["reason"])
        for e in entries
        if e.get("direction") != "server_to_client"
    ]


def from_server(entries: list[dict[str, Any]]) -> list[tuple[str | None, str | None, str, str]]:
    """The decisions about what the server sent the agent (its notifications, requests, list items)."""
    return [
        (e["mcp_method"], e["mcp_name"], e["decision"], e["reason"])
        for e in entries
        if e.get("direction") == "server_to_client"
    ]


# --- D: the SDKs work directly, client to server, no PEP --------------------------------------------------------


async def test_mcp2_client_and_server_directly(mcp2: Mcp2Server) -> None:
    async with asyncio.timeout(10), mcp2_client(mcp2.url) as client:
        listed = await client.list_tools()
        assert sorted(t.name for t in listed.tools) == ["lookup_order", "search", "send_email", "shell"]
        assert text_of(await client.call_tool("search", {"query": "refund"})) == "3 articles match 'refund'"
        assert text_of(await client.call_tool("shell", {"command": "id"})) == "pretend output"
    assert [c.tool for c in mcp2.calls] == ["search", "shell"]
    # The 2026-07-28 wire shape: stateless POSTs with the mirrored method headers, no session, no GET stream.
    assert [(r.method, r.headers.get("mcp-method")) for r in mcp2.requests] == [
        ("POST", "server/discover"),
        ("POST", "tools/list"),
        ("POST", "tools/call"),
        ("POST", "tools/call"),
    ]
    assert all(r.headers["mcp-protocol-version"] == "2026-07-28" for r in mcp2.requests)


# --- A: the 2.x SDK through the PEP, each PDP kind ----------------------------------------------------------------


async def test_mcp2_session_through_pep(pdp: PdpUnderTest, mcp2: Mcp2Server, tmp_path: Path) -> None:
    """One client session: allowed calls return results; denied ones raise MCPError and the session goes on."""
    async with pep_starter(tmp_path, pdp, mcp2.url) as start:
        pep: RunningPep = await start()
        async with asyncio.timeout(20), mcp2_client(f"{pep.url}/mcp") as client:
            listed = await client.list_tools()
            assert sorted(t.name for t in listed.tools) == ["lookup_order", "search", "send_email", "shell"]
            assert text_of(await client.call_tool("search", {"query": "refund"})) == "3 articles match 'refund'"
            result = await client.call_tool("lookup_order", {"order_id": "A-1001"})
            assert result.structured_content == {"order_id": "A-1001", "status": "shipped"}
            assert text_of(await client.call_tool("send_email", EMAIL_OK)) == "sent to bob@acme.example"

            denied = await expect_denied(client, "send_email", EMAIL_EVIL, POLICY_DENY)
            assert denied.error.data["reason"] == "policy_denied"
            # The same session keeps working after a denial.
            assert text_of(await client.call_tool("search", {"query": "after"})) == "3 articles match 'after'"
            await expect_denied(client, "shell", {"command": "cat /etc/passwd"}, POLICY_DENY)
            assert text_of(await client.call_tool("search", {"query": "last"})) == "3 articles match 'last'"
        logged = decisions(await settled_log(pep, at_least(9)))  # read while the PEP runs: see settled_log

    # Denied calls never reached the server.
    assert mcp2.calls == [
        ToolCall("search", {"query": "refund"}),
        ToolCall("lookup_order", {"order_id": "A-1001"}),
        ToolCall("send_email", EMAIL_OK),
        ToolCall("search", {"query": "after"}),
        ToolCall("search", {"query": "last"}),
    ]
    assert not any(r.headers.get("mcp-name") == "shell" for r in mcp2.requests)
    # Every forwarded request carried the decision that let it through.
    assert all(r.headers.get("x-pep-decision-id") for r in mcp2.requests)
    assert logged == [
        ("server/discover", None, "allow", "allowed"),
        ("tools/list", None, "allow", "allowed"),
        ("tools/call", "search", "allow", "allowed"),
        ("tools/call", "lookup_order", "allow", "allowed"),
        ("tools/call", "send_email", "allow", "allowed"),
        ("tools/call", "send_email", "deny", "policy_denied"),
        ("tools/call", "search", "allow", "allowed"),
        ("tools/call", "shell", "deny", "policy_denied"),
        ("tools/call", "search", "allow", "allowed"),
    ]


@pytest.mark.parametrize("kind", ["opa", "cerbos"])
async def test_mcp2_pdp_down_every_call_refused_quickly(
    kind: str, request: pytest.FixtureRequest, mcp2: Mcp2Server, tmp_path: Path
) -> None:
    """The PDP goes away mid-session: every call fails fast with the 'could not decide' error, none is forwarded,
    and a new client cannot connect; the SDK never hangs."""
    binary = request.getfixturevalue("cerbos_binary") if kind == "cerbos" else None
    pdp = await PdpUnderTest.start(kind, tmp_path, binary)
    try:
        async with pep_starter(tmp_path, pdp, mcp2.url) as start:
            pep: RunningPep = await start()
            async with asyncio.timeout(20), mcp2_client(f"{pep.url}/mcp") as client:
                assert text_of(await client.call_tool("search", {"query": "before"})) == "3 articles match 'before'"
                await pdp.down()
                for tool, arguments in [("search", {"query": "during"}), ("send_email", EMAIL_OK)] * 4:
                    error = await expect_denied(client, tool, arguments, UNDECIDED)
                    assert error.error.data["reason"] in {"pdp_unreachable", "circuit_open"}
            # A new session cannot even start (server/discover is denied), and fails fast.
            started = time.monotonic()
            with pytest.raises(Exception) as caught:
                async with asyncio.timeout(CALL_BOUND_S), mcp2_client(f"{pep.url}/mcp") as client:
                    await client.list_tools()
            assert not isinstance(caught.value, TimeoutError), "the SDK hung on a denied connect"
            assert time.monotonic() - started < 3.0
            # Allowed: discover, search and the tools/list the SDK sends after its first call (to learn the output
            # schema). Denied: the 8 calls, then the new client's server/discover and its fallback, initialize.
            entries = await settled_log(pep, at_least(13))
            allowed = sorted((e["mcp_method"], e["mcp_name"] or "") for e in entries if e["decision"] == "allow")
            assert allowed == [("server/discover", ""), ("tools/call", "search"), ("tools/list", "")]
            denied = [(e["mcp_method"], e["mcp_name"]) for e in entries if e["decision"] == "deny"]
            assert denied == [("tools/call", "search"), ("tools/call", "send_email")] * 4 + [
                ("server/discover", None),
                ("initialize", None),
            ]
            assert {e["reason"] for e in entries if e["decision"] == "deny"} <= {"pdp_unreachable", "circuit_open"}
    finally:
        await pdp.stop()
    assert mcp2.calls == [ToolCall("search", {"query": "before"})]


async def test_mcp2_deny_status_403(cedar_pdp: PdpUnderTest, mcp2: Mcp2Server, tmp_path: Path) -> None:
    """With `deny_status: 403` the 2.x SDK still sees the JSON-RPC error, and still nothing is forwarded."""
    async with pep_starter(tmp_path, cedar_pdp, mcp2.url) as start:
        pep: RunningPep = await start(deny_status=403)
        async with asyncio.timeout(10), mcp2_client(f"{pep.url}/mcp") as client:
            await expect_denied(client, "send_email", EMAIL_EVIL, POLICY_DENY)
            await expect_denied(client, "shell", {"command": "id"}, POLICY_DENY)
            assert text_of(await client.call_tool("search", {"query": "q"})) == "3 articles match 'q'"
    assert mcp2.calls == [ToolCall("search", {"query": "q"})]


async def test_mcp2_filtered_tools_list(cedar_pdp: PdpUnderTest, mcp2: Mcp2Server, tmp_path: Path) -> None:
    """`filter_tools_list`: the SDK lists what the policy shows this agent, each tool decided as its own action
    (`tools/list` of that tool, no arguments). send_email is listed although only some of its calls are allowed
    (decided on the call, with its arguments): asked as a `tools/call` without arguments it was hidden while it
    stayed callable. The unlisted shell is still refused when called."""
    async with pep_starter(tmp_path, cedar_pdp, mcp2.url) as start:
        pep: RunningPep = await start(filter_tools_list=True)
        async with asyncio.timeout(10), mcp2_client(f"{pep.url}/mcp") as client:
            listed = await client.list_tools()
            assert sorted(t.name for t in listed.tools) == ["lookup_order", "search", "send_email"]
            assert text_of(await client.call_tool("search", {"query": "q"})) == "3 articles match 'q'"
            assert text_of(await client.call_tool("send_email", EMAIL_OK)) == "sent to bob@acme.example"
            await expect_denied(client, "send_email", EMAIL_EVIL, POLICY_DENY)
            await expect_denied(client, "shell", {"command": "id"}, POLICY_DENY)
        entries = await settled_log(pep, lambda e: any(x.get("filtered") for x in e))
    assert [c.tool for c in mcp2.calls] == ["search", "send_email"]
    (listing,) = [e for e in entries if e.get("filtered")]
    # A filtered list is the allow it is, with what it removed (not a deny because one tool was hidden).
    assert (listing["mcp_method"], listing["decision"], listing["reason"]) == ("tools/list", "allow", "allowed")
    assert listing["filtered"] == {"kept": ["search", "lookup_order", "send_email"], "removed": ["shell"]}


async def test_mcp2_follows_a_servers_redirect_through_the_pep(cedar_pdp: PdpUnderTest, tmp_path: Path) -> None:
    """A server mounted at `/mcp/` answers `/mcp` with a 307 to its own absolute address. The PEP rewrites that
    `Location` to `/mcp/` on itself, so the SDK (which follows same-origin redirects only) follows it through the
    PEP and every request is decided; the upstream's address would otherwise be refused by the SDK with an error
    naming it, telling the developer to call the upstream directly."""
    server = Mcp2Server(http_path="/mcp/")
    await server.start()
    try:
        async with pep_starter(tmp_path, cedar_pdp, server.url) as start:
            pep: RunningPep = await start()
            async with asyncio.timeout(10), mcp2_client(f"{pep.url}/mcp") as client:
                assert text_of(await client.call_tool("search", {"query": "q"})) == "3 articles match 'q'"
                await expect_denied(client, "shell", {"command": "id"}, POLICY_DENY)
    finally:
        await server.stop()
    assert server.calls == [ToolCall("search", {"query": "q"})]
    assert {r.path for r in server.requests} == {"/mcp", "/mcp/"}  # redirected, then followed
    assert all("x-pep-decision-id" in r.headers for r in server.requests)  # every one through the PEP


@pytest.mark.parametrize(
    ("mode", "server"),
    [("legacy", "2.x"), ("auto", "1.x")],
    ids=["2.x-client-legacy-handshake", "2.x-client-falls-back-to-1.x-server"],
)
async def test_mcp2_client_session_shape(
    mode: str, server: str, mcp1_interpreter: Path, cedar_pdp: PdpUnderTest, tmp_path: Path
) -> None:
    """The 2.x client in the 2025-era session shape (initialize, GET stream, DELETE), by choice or because the
    server is 1.x: the plumbing is decided, a denial raises MCPError, and the session goes on."""
    upstream = Mcp2Server() if server == "2.x" else Mcp1Server(mcp1_interpreter, tmp_path / "mcp1-server.log")
    await upstream.start()
    try:
        await _session_shape(mode, upstream, cedar_pdp, tmp_path)
    finally:
        await upstream.stop()


async def _session_shape(mode: str, upstream: Mcp2Server | Mcp1Server, pdp: PdpUnderTest, tmp_path: Path) -> None:
    async with pep_starter(tmp_path, pdp, upstream.url) as start:
        pep: RunningPep = await start()
        async with asyncio.timeout(10), mcp2_client(f"{pep.url}/mcp", mode=mode) as client:
            assert text_of(await client.call_tool("search", {"query": "q"})) == "3 articles match 'q'"
            await expect_denied(client, "shell", {"command": "id"}, POLICY_DENY)
            assert text_of(await client.call_tool("lookup_order", {"order_id": "A-7"})) != ""
        entries = await settled_log(pep, lambda e: bool(e) and e[-1]["mcp_method"] == "mcp/session/delete")
    calls = upstream.calls if isinstance(upstream, Mcp2Server) else (await upstream.records())[0]
    assert [c.tool for c in calls] == ["search", "lookup_order"]
    handshake = [] if mode == "legacy" else [("server/discover", None, "allow", "allowed")]  # 1.x: unknown method
    assert [d for d in decisions(entries) if d[0] != "tools/list"] == [
        *handshake,
        ("initialize", None, "allow", "allowed"),
        ("notifications/initialized", None, "allow", "allowed"),
        ("mcp/stream", None, "allow", "allowed"),
        ("tools/call", "search", "allow", "allowed"),
        ("tools/call", "shell", "deny", "policy_denied"),
        ("tools/call", "lookup_order", "allow", "allowed"),
        ("mcp/session/delete", None, "allow", "allowed"),
    ]


# --- B: the 1.x SDK (child processes with .venv-mcp1's python) ----------------------------------------------------


@pytest.fixture(scope="session")
def mcp1_interpreter() -> Path:
    """.venv-mcp1/bin/python with mcp 1.30.0. Missing is a failure, never a skip: `make test` builds it."""
    try:
        return mcp1_python()
    except Mcp1Unavailable as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


@pytest.fixture
async def mcp1(mcp1_interpreter: Path, tmp_path: Path) -> AsyncIterator[Mcp1Server]:
    server = Mcp1Server(mcp1_interpreter, tmp_path / "mcp1-server.log")
    await server.start()
    yield server
    await server.stop()


SESSION_PLAN: dict[str, Any] = {
    "headers": {"x-agent-id": AGENT},
    "call_timeout_s": CALL_BOUND_S,
    "steps": [
        {"op": "list"},
        {"op": "sleep", "ms": 100},  # the SDK opens the GET stream in the background after initialize
        {"op": "call", "tool": "search", "arguments": {"query": "refund"}},
        {"op": "wait_notification", "ms": 3000},  # search's list_changed arrives on the GET stream
        {"op": "call", "tool": "send_email", "arguments": EMAIL_EVIL},
        {"op": "call", "tool": "lookup_order", "arguments": {"order_id": "A-1001"}},
        {"op": "call", "tool": "shell", "arguments": {"command": "id"}},
        {"op": "call", "tool": "send_email", "arguments": EMAIL_OK},
    ],
}


def outcomes(result: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(s["op"], s.get("tool"), s["outcome"]) for s in result["steps"]]


async def test_mcp1_client_and_server_directly(mcp1_interpreter: Path, mcp1: Mcp1Server) -> None:
    result = await run_mcp1_client(mcp1_interpreter, mcp1.url, SESSION_PLAN)
    assert result["fatal"] is None, result
    assert result["protocol_version"] == "2025-11-25"
    assert result["session_id"]
    assert outcomes(result) == [
        ("list", None, "ok"),
        ("sleep", None, "ok"),
        ("call", "search", "ok"),
        ("wait_notification", None, "ok"),
        ("call", "send_email", "ok"),  # no policy without the PEP
        ("call", "lookup_order", "ok"),
        ("call", "shell", "ok"),
        ("call", "send_email", "ok"),
    ]
    calls, requests = await mcp1.records()
    assert [c.tool for c in calls] == ["search", "send_email", "lookup_order", "shell", "send_email"]
    assert {r.method for r in requests} == {"POST", "GET", "DELETE"}


async def test_mcp1_session_through_pep(
    mcp1_interpreter: Path, mcp1: Mcp1Server, cedar_pdp: PdpUnderTest, tmp_path: Path
) -> None:
    """A 2025-11-25 session through the PEP with the default route (denials are a JSON-RPC error in a 200, what the
    1.x SDK needs: with a 403 it ends the session, see the next test): session id, GET stream, list and calls, a
    denial as an McpError with the session going on, the server's notification decided on the GET stream, DELETE
    decided and forwarded at close."""
    async with pep_starter(tmp_path, cedar_pdp, mcp1.url) as start:
        pep: RunningPep = await start()
        result = await run_mcp1_client(mcp1_interpreter, f"{pep.url}/mcp", SESSION_PLAN)
        entries = await settled_log(pep, lambda e: len(e) >= 10 and e[-1]["mcp_method"] == "mcp/session/delete")
    assert result["fatal"] is None, result
    assert result["protocol_version"] == "2025-11-25"
    assert result["session_id"]
    assert result["notifications"] == ["notifications/tools/list_changed"]
    assert outcomes(result) == [
        ("list", None, "ok"),
        ("sleep", None, "ok"),
        ("call", "search", "ok"),
        ("wait_notification", None, "ok"),
        ("call", "send_email", "mcp_error"),
        ("call", "lookup_order", "ok"),
        ("call", "shell", "mcp_error"),
        ("call", "send_email", "ok"),
    ]
    denied = [s for s in result["steps"] if s["outcome"] == "mcp_error"]
    assert [(s["code"], s["data"]["reason"]) for s in denied] == [(POLICY_DENY, "policy_denied")] * 2

    calls, requests = await mcp1.records()
    assert calls == [
        ToolCall("search", {"query": "refund"}),
        ToolCall("lookup_order", {"order_id": "A-1001"}),
        ToolCall("send_email", EMAIL_OK),
    ]
    session = result["session_id"]
    assert [r.method for r in requests if r.method != "POST"] == ["GET", "DELETE"]
    assert all(r.headers.get("mcp-session-id") == session for r in requests[1:])
    assert all(r.headers.get("x-pep-decision-id") for r in requests)

    logged = decisions(entries)
    assert ("mcp/stream", None, "allow", "allowed") in logged
    assert logged[-1] == ("mcp/session/delete", None, "allow", "allowed")
    assert from_server(entries) == [("notifications/tools/list_changed", None, "allow", "allowed")]
    assert [d for d in logged if d[0] not in {"mcp/stream"}] == [
        ("initialize", None, "allow", "allowed"),
        ("notifications/initialized", None, "allow", "allowed"),
        ("tools/list", None, "allow", "allowed"),
        ("tools/call", "search", "allow", "allowed"),
        ("tools/call", "send_email", "deny", "policy_denied"),
        ("tools/call", "lookup_order", "allow", "allowed"),
        ("tools/call", "shell", "deny", "policy_denied"),
        ("tools/call", "send_email", "allow", "allowed"),
        ("mcp/session/delete", None, "allow", "allowed"),
    ]


async def test_mcp1_sdk_ends_the_session_on_a_403(
    mcp1_interpreter: Path, mcp1: Mcp1Server, cedar_pdp: PdpUnderTest, tmp_path: Path
) -> None:
    """With `deny_status: 403` a denied call ends the whole 1.x session: the 1.x transport raises
    httpx.HTTPStatusError on any non-2xx POST answer (it never reads the JSON-RPC error in the body), which tears
    its task group down. It fails fast, never hangs, and nothing denied is forwarded; but 1.x clients need the
    default `deny_status: 200` (previous test) to go on after a denial. The 2.x SDK copes with both."""
    plan = {
        "headers": {"x-agent-id": AGENT},
        "call_timeout_s": 3,
        "steps": [
            {"op": "call", "tool": "shell", "arguments": {"command": "id"}},
            {"op": "call", "tool": "search", "arguments": {"query": "after"}},
        ],
    }
    async with pep_starter(tmp_path, cedar_pdp, mcp1.url) as start:
        pep: RunningPep = await start(deny_status=403)
        result = await run_mcp1_client(mcp1_interpreter, f"{pep.url}/mcp", plan, timeout_s=20)
        entries = await settled_log(pep, lambda e: any(x["mcp_name"] == "shell" for x in e))
    assert result["session_id"], result  # initialize went through
    assert result["steps"] == [], result  # the denied call never returned: the session ended under it
    assert "HTTPStatusError" in result["fatal"], result
    assert "403" in result["fatal"], result
    assert result["elapsed_s"] < 3.0, result
    calls, _ = await mcp1.records()
    assert calls == []
    assert ("tools/call", "shell", "deny", "policy_denied") in decisions(entries)
