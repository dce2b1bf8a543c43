"""`filter_tools_list` on real loopback sockets: an MCP server stub, a PDP deciding by tool name, the PEP between.

The client sees only the tools the PDP would let it call; every listed tool is asked about as a `tools/call`; the
filtering is its own decision log line; a PDP that cannot decide the tools, or an answer that cannot be read
(not JSON, too large, compressed), never lets the unfiltered list through.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from pep import upstream as pep_upstream
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.authzen_pdp import AuthzenTestPdp
from tests.support.loopback import LoopbackServer
from tests.support.observe import LOG_KEYS, metric

V2026 = "2026-07-28"
JSON_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Accept-Encoding": "gzip, deflate, br",
}
TOOLS: list[dict[str, Any]] = [
    {"name": "read_file", "description": "Reads a file", "inputSchema": {"type": "object"}},
    {"name": "shell", "description": "Runs any command", "inputSchema": {"type": "object"}},
    {"name": "search", "title": "Search", "inputSchema": {"type": "object"}},
    {"name": "send_email", "inputSchema": {"type": "object", "properties": {"to": {"type": "string"}}}},
]
NAMES = [t["name"] for t in TOOLS]
ALLOWED = [t for t in TOOLS if t["name"] != "shell"]
ALLOWED_NAMES = [t["name"] for t in ALLOWED]
NOTE = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1, "total": 2}})
# A tools/call result that happens to hold a `tools` list: the filter must leave it alone.
CALL_RESULT: dict[str, Any] = {"content": [{"type": "text", "text": "done"}], "tools": [{"name": "shell"}]}


# --- the MCP server stub and the PDP ------------------------------------------------------------------------------


@dataclass
class Seen:
    target: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class McpServer(LoopbackServer):
    """Answers `tools/list` with `tools`; the query chooses how: `answer=json|sse|sse_cr|json_array|not_json|no_tools|
    gzip|sse_garbage`, `pad=N` adds N spaces after a JSON answer. `tools/call` gets `CALL_RESULT`, `ping` an
    empty result."""

    tools: list[dict[str, Any]] = field(default_factory=lambda: list(TOOLS))
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None, auto_decompress=False)
        await self.serve(web.ServerRunner(server))

    def reply(self, message: dict[str, Any]) -> dict[str, Any]:
        method = message.get("method")
        if method == "tools/list":
            result: dict[str, Any] = {"tools": self.tools}
        elif method == "tools/call":
            result = CALL_RESULT
        elif method == "ping":
            result = {}
        else:
            return {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "Method not found"}}
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def answer_for(self, message: Any) -> bytes:
        if isinstance(message, list):
            return orjson.dumps([self.reply(m) for m in message if "id" in m and "method" in m])
        return orjson.dumps(self.reply(message))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.raw_path, CIMultiDict(request.headers), raw))
        message = orjson.loads(raw)
        if isinstance(message, dict) and "id" not in message:
            return web.Response(status=202)
        q = request.rel_url.query
        answer = q.get("answer", "json")
        body = self.answer_for(message)
        if answer == "sse":
            return await self._sse(request, body)
        if answer == "sse_garbage":
            return await self._sse(request, b"{not json")
        if answer == "sse_cr":  # lone CRs end SSE lines too (the MCP SDK's parser reads them so)
            return await self._sse(request, body, b"\r")
        if answer == "json_array":  # one answer wrapped in an array (the TypeScript SDK accepts it)
            body = b"[" + body + b"]"
        if answer == "not_json":
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if answer == "no_tools":
            body = orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"items": self.tools}})
        if answer == "gzip":
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            return web.Response(body=gzip.compress(body), headers=headers)
        return web.Response(body=body + b" " * int(q.get("pad", "0")), content_type="application/json")

    async def _sse(self, request: web.BaseRequest, data: bytes, newline: bytes = b"\n") -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for event in sse_events(data):
            await resp.write(event.replace(b"\n", newline))
            await asyncio.sleep(0.005)  # separate chunks: the PEP must read the answer whole
        await resp.write_eof()
        return resp


def sse_events(data: bytes) -> list[bytes]:
    """What the stub sends as an SSE answer: a comment, a notification, then the answer with id and event fields."""
    return [b": ping\n\n", b"event: message\nid: ev-1\ndata: " + NOTE + b"\n\n", b"id: ev-2\ndata: " + data + b"\n\n"]


@dataclass
class ToolPdp(LoopbackServer):
    """An OPA-shaped PDP: denies the MCP names in `denied` and the MCP methods in `denied_methods`; for `tools/call`
    of a name in `failing` (or of any name, with key "*") it answers 500 ("500") or never ("hang")."""

    denied: frozenset[str] = frozenset({"shell"})
    denied_methods: frozenset[str] = frozenset()
    failing: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/data/pep/authz"

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The `mcp` facts of every tools/call asked about."""
        return [d["mcp"] for d in self.inputs if (d.get("mcp") or {}).get("method") == "tools/call"]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/data/pep/authz", self._decide)
        await self.serve(web.AppRunner(app, access_log=None, handler_cancellation=True))

    async def stop(self) -> None:
        self.release.set()
        await super().stop()

    async def _decide(self, request: web.Request) -> web.Response:
        doc = (await request.json())["input"]
        self.inputs.append(doc)
        mcp = doc.get("mcp") or {}
        if mcp.get("method") == "tools/call":
            mode = self.failing.get(str(mcp.get("name"))) or self.failing.get("*")
            if mode == "500":
                return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
            if mode == "hang":
                await asyncio.wait_for(self.release.wait(), 10)
        allow = mcp.get("name") not in self.denied and mcp.get("method") not in self.denied_methods
        return web.json_response({"result": allow})


# --- fixtures and helpers -----------------------------------------------------------------------------------------


def routes(server_url: str) -> Callable[[dict[str, Any]], None]:
    """`/filtered` filters, `/filtered200` filters with `deny_status: 200`, `/plain` does not: all onto the stub."""

    def mutate(cfg: dict[str, Any]) -> None:
        base = {"upstream": server_url + "/mcp", "strip_prefix": True, "protocol": "mcp"}
        cfg["routes"] = [
            {"name": "filtered", "match": {"path_prefix": "/filtered"}, **base, "filter_tools_list": True},
            {
                "name": "filtered200",
                "match": {"path_prefix": "/f200"},
                **base,
                "filter_tools_list": True,
                "deny_status": 200,
            },
            {"name": "plain", "match": {"path_prefix": "/plain"}, **base},
        ]

    return mutate


@pytest.fixture
async def pdp() -> AsyncIterator[ToolPdp]:
    p = ToolPdp()
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def server() -> AsyncIterator[McpServer]:
    s = McpServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def fpep(tmp_path: Path, pdp: ToolPdp, server: McpServer) -> AsyncIterator[RunningPep]:
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, server.url, log), "filter.yaml")
    yield await starter(mutate=routes(server.url))
    await starter.close()


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def rpc(method: str, rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params:
        msg["params"] = params
    return msg


LIST = orjson.dumps(rpc("tools/list", 7))


async def send(running: RunningPep, path: str, body: bytes = LIST, headers: dict[str, str] | None = None) -> Reply:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(running.url + path, data=body, headers={**JSON_HEADERS, **(headers or {})}) as r,
    ):
        return Reply(r.status, r.headers, await asyncio.wait_for(r.read(), 5))


def v2026(method: str = "tools/list", name: str | None = None) -> dict[str, str]:
    headers = {"MCP-Protocol-Version": V2026, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def sse_data(body: bytes) -> list[Any]:
    """The JSON of each `data:` line of an SSE body."""
    return [orjson.loads(line[5:]) for line in body.split(b"\n") if line.startswith(b"data:")]


async def scrape(running: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(running.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def assert_no_tool_leaks(body: bytes) -> None:
    for name in NAMES:
        assert name.encode() not in body, body


# --- the list is filtered -----------------------------------------------------------------------------------------


async def test_json_list_keeps_only_allowed_tools(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    reply = await send(fpep, "/filtered?session=a")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert reply.json() == {"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}
    assert [(s.target, s.body) for s in server.seen] == [("/mcp?session=a", LIST)]  # forwarded once, unchanged
    # The PDP was asked about the tools/list, then about every listed tool as a tools/call without arguments.
    assert pdp.inputs[0]["mcp"] == {"method": "tools/list", "name": None, "arguments": None, "protocol_version": None}
    assert len(pdp.inputs) == 1 + len(TOOLS)
    assert sorted(c["name"] for c in pdp.calls) == sorted(NAMES)
    assert all(
        c == {"method": "tools/call", "name": c["name"], "arguments": None, "protocol_version": None} for c in pdp.calls
    )
    for doc in pdp.inputs[1:]:
        assert doc["request"] == pdp.inputs[0]["request"]  # the same caller and request, only the action differs
        assert doc["route"]["name"] == "filtered"


async def test_sse_list_keeps_only_allowed_tools(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    reply = await send(fpep, "/filtered?answer=sse")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    ping, note, _ = sse_events(orjson.dumps(server.reply(rpc("tools/list", 7))))
    filtered = orjson.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}})
    assert reply.body == ping + note + b"id: ev-2\ndata: " + filtered + b"\n\n"  # other events byte for byte
    assert sse_data(reply.body)[-1]["result"]["tools"] == ALLOWED
    assert sorted(c["name"] for c in pdp.calls) == sorted(NAMES)


async def test_odd_but_readable_answers_are_filtered_too(fpep: RunningPep, pdp: ToolPdp) -> None:
    reply = await send(fpep, "/filtered?answer=sse_cr")
    assert reply.status == 200
    assert reply.body.startswith(b": ping\n\nevent: message\nid: ev-1\ndata: ")  # line ends normalised to LF
    assert sse_data(reply.body)[-1]["result"]["tools"] == ALLOWED
    assert b"shell" not in reply.body
    reply = await send(fpep, "/filtered?answer=json_array")
    assert reply.status == 200
    assert reply.json() == [{"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}]
    assert len(pdp.calls) == 2 * len(TOOLS)


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_2026_list_is_cache_scope_private(fpep: RunningPep, pdp: ToolPdp, answer: str) -> None:
    reply = await send(fpep, f"/filtered?answer={answer}", headers=v2026())
    assert reply.status == 200
    message = reply.json() if answer == "json" else sse_data(reply.body)[-1]
    assert message["result"] == {"tools": ALLOWED, "cacheScope": "private"}
    assert {c["protocol_version"] for c in pdp.calls} == {V2026}
    assert len(pdp.calls) == len(TOOLS)


async def test_earlier_versions_get_no_cache_scope(fpep: RunningPep) -> None:
    reply = await send(fpep, "/filtered", headers={"MCP-Protocol-Version": "2025-06-18"})
    assert reply.json()["result"] == {"tools": ALLOWED}


async def test_decision_log_has_the_list_and_the_filter_lines(fpep: RunningPep, pdp: ToolPdp) -> None:
    reply = await send(fpep, "/filtered", headers={"X-Request-ID": "list-1"})
    assert reply.status == 200
    listed, filtered = await fpep.log_entries()
    assert listed.keys() >= LOG_KEYS
    assert filtered.keys() >= LOG_KEYS
    assert (listed["request_id"], listed["decision"], listed["reason"]) == ("list-1", "allow", "allowed")
    assert (listed["mcp_method"], listed["mcp_name"], listed["route"]) == ("tools/list", None, "filtered")
    assert "filtered" not in listed
    assert filtered["request_id"] == "list-1"
    assert filtered["decision_id"] != listed["decision_id"]
    assert (filtered["mcp_method"], filtered["route"], filtered["path"]) == ("tools/list", "filtered", "/filtered")
    assert (filtered["decision"], filtered["reason"]) == ("deny", "policy_denied")  # some tool was refused
    assert filtered["filtered"] == {"kept": ALLOWED_NAMES, "removed": ["shell"]}


async def test_decision_log_when_every_tool_is_allowed(fpep: RunningPep, pdp: ToolPdp) -> None:
    pdp.denied = frozenset()
    reply = await send(fpep, "/filtered")
    assert reply.json()["result"]["tools"] == TOOLS
    _, filtered = await fpep.log_entries()
    assert (filtered["decision"], filtered["reason"]) == ("allow", "allowed")
    assert filtered["filtered"] == {"kept": NAMES, "removed": []}


async def test_an_empty_list_asks_nothing_more(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    server.tools = []
    reply = await send(fpep, "/filtered")
    assert reply.json()["result"] == {"tools": []}
    assert pdp.calls == []
    assert len(await fpep.log_entries()) == 1


async def test_unnamed_tools_are_removed(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    server.tools = [{"description": "nameless"}, TOOLS[0], {"name": 5}]
    reply = await send(fpep, "/filtered")
    assert reply.json()["result"]["tools"] == [TOOLS[0]]
    assert [c["name"] for c in pdp.calls] == ["read_file"]


async def test_a_batch_cannot_get_around_the_filter(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    body = orjson.dumps([rpc("ping", 1), rpc("tools/list", 2), {"jsonrpc": "2.0", "method": "notifications/x"}])
    reply = await send(fpep, "/filtered", body)
    assert reply.status == 200
    assert reply.json() == [
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": 2, "result": {"tools": ALLOWED}},
    ]
    assert [s.body for s in server.seen] == [body]
    assert sorted(c["name"] for c in pdp.calls) == sorted(NAMES)
    _, filtered = await fpep.log_entries()
    assert filtered["filtered"] == {"kept": ALLOWED_NAMES, "removed": ["shell"]}


async def test_one_authzen_batch_for_every_tool(tmp_path: Path, server: McpServer) -> None:
    def decide(item: dict[str, Any]) -> Any:
        return {"decision": item["resource"]["id"] != "shell"}

    az = AuthzenTestPdp(decide=decide)
    await az.start()

    def authzen(cfg: dict[str, Any]) -> None:
        cfg["pdp"] = {"kind": "authzen", "url": az.url, "timeout_ms": 2000, "retries": 0}
        routes(server.url)(cfg)

    starter = PepStarter(tmp_path, lambda log: base_config(az.url, server.url, log), "authzen.yaml")
    try:
        running = await starter(mutate=authzen)
        reply = await send(running, "/filtered")
        assert reply.json()["result"]["tools"] == ALLOWED
        (single,) = az.evaluations
        assert single.body["action"]["name"] == "tools/list"
        (batch,) = az.batches  # one request for all the tools
        items = batch.body["evaluations"]
        assert [(i["action"]["name"], i["resource"]["type"], i["resource"]["id"]) for i in items] == [
            ("tools/call", "tool", n) for n in NAMES
        ]
        _, filtered = await running.log_entries()
        assert filtered["filtered"] == {"kept": ALLOWED_NAMES, "removed": ["shell"]}
    finally:
        await starter.close()
        await az.stop()


# --- the PDP cannot decide the tools --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "reason"),
    [({"*": "500"}, "pdp_error_status"), ({"*": "hang"}, "pdp_timeout"), ({"search": "500"}, "pdp_error_status")],
    ids=["500", "hang", "one tool 500"],
)
@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_pdp_failure_after_the_list_was_allowed(
    fpep: RunningPep, pdp: ToolPdp, server: McpServer, failing: dict[str, str], reason: str, answer: str
) -> None:
    pdp.failing = failing
    reply = await send(fpep, f"/filtered?answer={answer}", headers={"X-Request-ID": "fail-1"})
    assert reply.status == 403
    assert reply.headers["x-pep-decision"] == "deny"
    assert reply.headers["x-pep-reason"] == reason
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["id"] == 7
    assert body["error"]["code"] == -32603
    assert body["error"]["data"] == {"reason": reason, "request_id": "fail-1"}
    assert_no_tool_leaks(reply.body)
    assert len(server.seen) == 1  # the tools/list itself was allowed and forwarded
    assert pdp.inputs[0]["mcp"]["method"] == "tools/list"
    listed, filtered = await fpep.log_entries()
    assert (listed["decision"], listed["reason"]) == ("allow", "allowed")
    assert (filtered["decision"], filtered["reason"], filtered["request_id"]) == ("deny", reason, "fail-1")
    assert "shell" in filtered["filtered"]["removed"]


async def test_pdp_failure_with_deny_status_200(fpep: RunningPep, pdp: ToolPdp) -> None:
    pdp.failing = {"*": "500"}
    reply = await send(fpep, "/f200")
    assert reply.status == 200
    assert reply.headers["x-pep-reason"] == "pdp_error_status"
    assert (reply.json()["id"], reply.json()["error"]["code"]) == (7, -32603)
    assert_no_tool_leaks(reply.body)


async def test_a_denied_list_never_reaches_the_upstream(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    pdp.denied_methods = frozenset({"tools/list"})
    reply = await send(fpep, "/filtered")
    assert reply.status == 403
    assert (reply.json()["id"], reply.json()["error"]["code"]) == (7, -32001)
    assert server.seen == []
    assert pdp.calls == []
    assert len(await fpep.log_entries()) == 1


# --- answers that cannot be filtered --------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["not_json", "no_tools", "gzip", "sse_garbage", "big"])
async def test_unfilterable_answer_is_502(
    fpep: RunningPep, pdp: ToolPdp, server: McpServer, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    monkeypatch.setattr(pep_upstream, "REWRITE_LIMIT", 2048)
    server.tools = [*TOOLS, {"name": "padding", "description": "x" * 4096}]  # over the limit, not by much
    for n in (1, 2):
        query = "json" if answer == "big" else answer
        reply = await send(fpep, f"/filtered?answer={query}", headers={"X-Request-ID": f"u-{n}"})
        assert reply.status == 502
        assert reply.headers["x-pep-upstream-error"] == "unfilterable"
        assert reply.headers["x-pep-decision"] == "allow"
        assert reply.json()["error"] == {
            "code": "upstream_unreadable",
            "message": reply.json()["error"]["message"],
            "request_id": f"u-{n}",
        }
        assert_no_tool_leaks(reply.body)
        text = await scrape(fpep)
        assert metric(text, "pep_upstream_failures_total", route="filtered", kind="unfilterable") == n
    assert "Accept-Encoding" not in server.seen[-1].headers
    assert pdp.calls == []  # nothing readable, nothing to decide


async def test_rewrite_limit_is_inclusive(fpep: RunningPep, server: McpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    size = len(server.answer_for(rpc("tools/list", 7)))
    monkeypatch.setattr(pep_upstream, "REWRITE_LIMIT", size + 100)
    reply = await send(fpep, "/filtered?pad=100")
    assert reply.status == 200
    assert reply.json()["result"]["tools"] == ALLOWED
    reply = await send(fpep, "/filtered?pad=101")
    assert reply.status == 502
    assert reply.headers["x-pep-upstream-error"] == "unfilterable"


async def test_filtering_drops_accept_encoding_only_for_the_list(fpep: RunningPep, server: McpServer) -> None:
    await send(fpep, "/filtered")
    await send(fpep, "/filtered", orjson.dumps(rpc("tools/call", 2, name="read_file", arguments={})))
    await send(fpep, "/plain")
    listed, called, plain = server.seen
    assert "Accept-Encoding" not in listed.headers
    assert called.headers.getall("Accept-Encoding") == [JSON_HEADERS["Accept-Encoding"]]
    assert plain.headers.getall("Accept-Encoding") == [JSON_HEADERS["Accept-Encoding"]]


# --- what is not filtered -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_route_without_filter_passes_the_list_unchanged(
    fpep: RunningPep, pdp: ToolPdp, server: McpServer, answer: str
) -> None:
    reply = await send(fpep, f"/plain?answer={answer}", headers=v2026())
    assert reply.status == 200
    upstream_body = server.answer_for(rpc("tools/list", 7))
    assert reply.body == (upstream_body if answer == "json" else b"".join(sse_events(upstream_body)))
    assert b"shell" in reply.body
    assert [d["mcp"]["method"] for d in pdp.inputs] == ["tools/list"]
    (entry,) = await fpep.log_entries()
    assert "filtered" not in entry


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_tools_call_is_never_filtered(fpep: RunningPep, pdp: ToolPdp, server: McpServer, answer: str) -> None:
    body = orjson.dumps(rpc("tools/call", 3, name="read_file", arguments={"path": "/etc/hosts"}))
    reply = await send(fpep, f"/filtered?answer={answer}", body, headers=v2026("tools/call", "read_file"))
    assert reply.status == 200
    upstream_body = server.answer_for(rpc("tools/call", 3))
    assert reply.body == (upstream_body if answer == "json" else b"".join(sse_events(upstream_body)))
    assert [(d["mcp"]["method"], d["mcp"]["name"]) for d in pdp.inputs] == [("tools/call", "read_file")]
    assert [s.body for s in server.seen] == [body]
    (entry,) = await fpep.log_entries()
    assert "filtered" not in entry


async def test_other_methods_are_not_filtered(fpep: RunningPep, pdp: ToolPdp, server: McpServer) -> None:
    reply = await send(fpep, "/filtered?answer=not_json", orjson.dumps(rpc("ping", 4)))
    assert reply.status == 200  # not read, so not refused for being unreadable
    assert reply.body == b"<html>502 Bad Gateway</html>"
    assert len(pdp.inputs) == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_stream_resumption_is_refused_on_a_filtering_route(
    fpep: RunningPep, pdp: ToolPdp, server: McpServer, method: str
) -> None:
    # A resumed stream may replay a tools/list answer the filter never saw.
    headers = {**JSON_HEADERS, "Last-Event-ID": "3", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as s:
        body = LIST if method == "POST" else None
        async with s.request(method, fpep.url + "/filtered", data=body, headers=headers) as r:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == "request_ambiguous"
    assert pdp.inputs == []
    assert server.seen == []


# --- a required decision log ----------------------------------------------------------------------------------------


@dataclass
class LogRemovingServer(McpServer):
    """Removes the PEP's log directory when the tools/list arrives, before answering it."""

    directory: Path | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.directory is not None:
            shutil.rmtree(self.directory)
            self.directory = None
        return await super()._handle(request)


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_kept_tools_are_shown_only_once_logged(tmp_path: Path, pdp: ToolPdp, answer: str) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    server = LogRemovingServer(directory=directory)
    await server.start()
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, server.url, log), "filter.yaml")
    try:

        def mutate(cfg: dict[str, Any]) -> None:
            routes(server.url)(cfg)
            cfg["decision_log"] = {"sink": "file", "path": str(directory / "audit.jsonl"), "required": True}

        running = await starter(mutate=mutate)
        reply = await send(running, f"/filtered?answer={answer}", headers={"X-Request-ID": "gone-1"})
    finally:
        await starter.close()
        await server.stop()
    assert len(server.seen) == 1  # the tools/list was logged, then forwarded; the log went away meanwhile
    assert (reply.status, reply.headers["x-pep-reason"]) == (403, "audit_unavailable")
    assert reply.json()["error"]["data"] == {"reason": "audit_unavailable", "request_id": "gone-1"}
    assert_no_tool_leaks(reply.body)
