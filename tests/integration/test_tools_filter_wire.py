"""List filtering (`filter_tools_list`, `filter_prompts_list`, `filter_resources_list`) on real loopback sockets:
an MCP server stub, a PDP deciding by name, the PEP between.

The client sees only the items the PDP lets it see, each decided as its own action (`mcp.method` the list method,
`mcp.name` the item, no arguments); the filtering is its own decision log line, an allow with what it removed. An
answer to a filtered list is relayed only once the filter rewrote exactly the result for that request id:
anything it cannot read (another charset, an encoding hidden behind `identity`, not JSON-RPC, a response with
another id) is a 502 or a JSON-RPC error, and a list answered on a `GET` stream is dropped, never passed.
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
PROMPTS = [{"name": "refund_reply"}, {"name": "shell_prompt"}]
RESOURCES = [{"uri": "file:///docs/faq.md", "name": "faq"}, {"uri": "file:///etc/shadow", "name": "shell"}]
TEMPLATES = [{"uriTemplate": "file:///docs/{page}", "name": "docs"}, {"uriTemplate": "file:///etc/{f}", "name": "x"}]
NOTE = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1, "total": 2}})
ELICIT = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": "srv-1",
        "method": "elicitation/create",
        "params": {"message": "Your email?", "requestedSchema": {"type": "object", "properties": {"email": {}}}},
    }
)
# A tools/call result that happens to hold a `tools` list: the filter must leave it alone.
CALL_RESULT: dict[str, Any] = {"content": [{"type": "text", "text": "done"}], "tools": [{"name": "shell"}]}


# --- the MCP server stub and the PDP ------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class McpServer(LoopbackServer):
    """Answers lists with their items; the query chooses how: `answer=json|sse|sse_cr|json_array|not_json|no_tools|
    gzip|sse_garbage|utf16|identity_gzip|wrong_id|sse_wrong_id|misspelled`, `pad=N` adds N spaces after a JSON
    answer. `tools/call` gets `CALL_RESULT`, `ping` an empty result. A GET opens the session stream, on which this
    server answers the pending `tools/list` (id 7) with every tool, as a malicious one would."""

    tools: list[dict[str, Any]] = field(default_factory=lambda: list(TOOLS))
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None, auto_decompress=False)
        await self.serve(web.ServerRunner(server))

    def reply(self, message: dict[str, Any]) -> dict[str, Any]:
        method = message.get("method")
        results: dict[str, Any] = {
            "tools/list": {"tools": self.tools},
            "prompts/list": {"prompts": PROMPTS},
            "resources/list": {"resources": RESOURCES},
            "resources/templates/list": {"resourceTemplates": TEMPLATES},
            "tools/call": CALL_RESULT,
            "ping": {},
        }
        if method not in results:
            return {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "Method not found"}}
        return {"jsonrpc": "2.0", "id": message["id"], "result": results[str(method)]}

    def answer_for(self, message: Any) -> bytes:
        if isinstance(message, list):
            return orjson.dumps([self.reply(m) for m in message if "id" in m and "method" in m])
        return orjson.dumps(self.reply(message))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), raw))
        if request.method == "GET":
            listing = orjson.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": self.tools}})
            return await self._sse(request, listing)
        message = orjson.loads(raw)
        if isinstance(message, dict) and "id" not in message:
            return web.Response(status=202)
        q = request.rel_url.query
        answer = q.get("answer", "json")
        body = self.answer_for(message)
        if answer == "sse":
            return await self._sse(request, body)
        if answer == "sse_each":  # a batch's answers, one event each, as each request is served
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for one in orjson.loads(body):
                await resp.write(b"data: " + orjson.dumps(one) + b"\n\n")
            await resp.write_eof()
            return resp
        if answer == "sse_garbage":
            return await self._sse(request, b"{not json")
        if answer == "sse_cr":  # lone CRs end SSE lines too (the MCP SDK's parser reads them so)
            return await self._sse(request, body, b"\r")
        if answer == "sse_wrong_id":  # the SDKs give any response on a POST's stream to the POST's request
            return await self._sse(request, body.replace(b'"id":7', b'"id":8'))
        if answer == "sse_ask":  # a form before the answer, as a tool that needs the user's input sends it
            return await self._sse(request, body, ask=ELICIT)
        if answer == "utf16":  # the SDKs decode an SSE stream by its charset: the PEP would see no data line
            events = b"".join(sse_events(body)).decode().encode("utf-16")
            headers = {"Content-Type": "text/event-stream; charset=utf-16"}
            return web.Response(body=events, headers=headers)
        if answer == "json_array":  # one answer wrapped in an array (the TypeScript SDK accepts it)
            body = b"[" + body + b"]"
        if answer == "not_json":
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if answer == "no_tools":
            body = orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"items": self.tools}})
        if answer == "misspelled":  # a case-insensitive client reads `Tools` as `tools`
            body = orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [], "Tools": self.tools}})
        if answer == "wrong_id":
            body = body.replace(b'"id":7', b'"id":8')
        if answer == "gzip":
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            return web.Response(body=gzip.compress(body), headers=headers)
        if answer == "identity_gzip":  # the first value says identity, the body is gzip all the same
            headers_multi = CIMultiDict([("Content-Type", "application/json")])
            headers_multi.add("Content-Encoding", "identity")
            headers_multi.add("Content-Encoding", "gzip")
            return web.Response(body=gzip.compress(body), headers=headers_multi)
        return web.Response(body=body + b" " * int(q.get("pad", "0")), content_type="application/json")

    async def _sse(
        self, request: web.BaseRequest, data: bytes, newline: bytes = b"\n", ask: bytes | None = None
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events = sse_events(data)
        if ask is not None:
            events.insert(2, b"data: " + ask + b"\n\n")
        for event in events:
            await resp.write(event.replace(b"\n", newline))
            await asyncio.sleep(0.005)  # separate chunks
        await resp.write_eof()
        return resp


def sse_events(data: bytes) -> list[bytes]:
    """What the stub sends as an SSE answer: a comment, a notification, then the answer with id and event fields."""
    return [b": ping\n\n", b"event: message\nid: ev-1\ndata: " + NOTE + b"\n\n", b"id: ev-2\ndata: " + data + b"\n\n"]


@dataclass
class ListPdp(LoopbackServer):
    """An OPA-shaped PDP: denies the MCP names in `denied` and the MCP methods in `denied_methods`; for a list item
    whose name is in `failing` (or any item, with key "*") it answers 500 ("500") or never ("hang")."""

    denied: frozenset[str] = frozenset({"shell", "shell_prompt", "file:///etc/shadow", "file:///etc/{f}"})
    denied_methods: frozenset[str] = frozenset()
    failing_methods: frozenset[str] = frozenset()  # answered 500
    failing: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/data/pep/authz"

    @property
    def items(self) -> list[dict[str, Any]]:
        """The `mcp` facts of every list item asked about."""
        return [d["mcp"] for d in self.inputs if is_item(d.get("mcp") or {})]

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
        if mcp.get("method") in self.failing_methods:
            return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
        if is_item(mcp):
            mode = self.failing.get(str(mcp.get("name"))) or self.failing.get("*")
            if mode == "500":
                return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
            if mode == "hang":
                await asyncio.wait_for(self.release.wait(), 10)
        allow = mcp.get("name") not in self.denied and mcp.get("method") not in self.denied_methods
        return web.json_response({"result": allow})


def is_item(mcp: dict[str, Any]) -> bool:
    return str(mcp.get("method", "")).endswith("/list") and mcp.get("name") is not None


# --- fixtures and helpers -----------------------------------------------------------------------------------------


def routes(server_url: str) -> Callable[[dict[str, Any]], None]:
    """`/filtered` filters tools, `/f403` with `deny_status: 403`, `/all` every list, `/plain` none."""

    def mutate(cfg: dict[str, Any]) -> None:
        base = {"upstream": server_url + "/mcp", "strip_prefix": True, "protocol": "mcp"}
        every = {"filter_tools_list": True, "filter_prompts_list": True, "filter_resources_list": True}
        cfg["routes"] = [
            {"name": "filtered", "match": {"path_prefix": "/filtered"}, **base, "filter_tools_list": True},
            {"name": "f403", "match": {"path_prefix": "/f403"}, **base, "filter_tools_list": True, "deny_status": 403},
            {"name": "all", "match": {"path_prefix": "/all"}, **base, **every},
            {"name": "plain", "match": {"path_prefix": "/plain"}, **base},
        ]

    return mutate


@pytest.fixture
async def pdp() -> AsyncIterator[ListPdp]:
    p = ListPdp()
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
async def fpep(tmp_path: Path, pdp: ListPdp, server: McpServer) -> AsyncIterator[RunningPep]:
    def config(log: Path) -> dict[str, Any]:
        cfg = base_config(pdp.url, server.url, log)
        # A filtered list asks the PDP about every item: 250 ms is short on a loaded CI machine (a late answer here
        # would be a pdp_timeout denial, never a pass, but the test is about something else).
        cfg["pdp"]["timeout_ms"] = 1000
        return cfg

    starter = PepStarter(tmp_path, config, "filter.yaml")
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


async def send(
    running: RunningPep, path: str, body: bytes | None = LIST, headers: dict[str, str] | None = None, verb: str = "POST"
) -> Reply:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(verb, running.url + path, data=body, headers={**JSON_HEADERS, **(headers or {})}) as r,
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


def sse_ids(body: bytes) -> list[bytes]:
    return [line[4:] for line in body.split(b"\n") if line.startswith(b"id: ")]


async def scrape(running: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(running.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def assert_no_leaks(body: bytes) -> None:
    for name in (b"shell", b"/etc/"):
        assert name not in body, body


def filter_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if "filtered" in e]


# --- the list is filtered -----------------------------------------------------------------------------------------


async def test_json_list_keeps_only_visible_tools(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    reply = await send(fpep, "/filtered?session=a")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert reply.json() == {"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}
    assert [(s.target, s.body) for s in server.seen] == [("/mcp?session=a", LIST)]  # forwarded once, unchanged
    assert pdp.inputs[0]["mcp"] == {
        "method": "tools/list",
        "name": None,
        "arguments": None,
        "protocol_version": None,
        "direction": "client_to_server",
    }
    # Each listed tool is asked about as its own action: its visibility (tools/list of it), never a tools/call.
    assert len(pdp.inputs) == 1 + len(TOOLS)
    assert pdp.items == [
        {
            "method": "tools/list",
            "name": n,
            "arguments": None,
            "protocol_version": None,
            "direction": "server_to_client",
        }
        for n in NAMES
    ]
    for doc in pdp.inputs[1:]:
        assert doc["request"] == pdp.inputs[0]["request"]  # the same caller and request, only the facts differ
        assert doc["route"]["name"] == "filtered"


async def test_sse_list_keeps_only_visible_tools(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    reply = await send(fpep, "/filtered?answer=sse")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    comment, note, answer = reply.body.split(b"\n\n")[:3]
    assert comment == b": ping"  # a comment is relayed as it came
    assert note.startswith(b"event: message\nid: pt1.")  # the event id is sealed
    assert note.endswith(b"\ndata: " + NOTE)
    assert answer.startswith(b"id: pt1.")
    assert sse_data(reply.body) == [orjson.loads(NOTE), {"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}]
    assert [i["name"] for i in pdp.items] == NAMES
    # The notification the server sent on the way was decided too, as what the server sends the agent.
    assert [(d["mcp"]["method"], d["mcp"]["direction"]) for d in pdp.inputs if d["mcp"]["name"] is None] == [
        ("tools/list", "client_to_server"),
        ("notifications/progress", "server_to_client"),
    ]


async def test_odd_but_readable_answers_are_filtered_too(fpep: RunningPep, pdp: ListPdp) -> None:
    reply = await send(fpep, "/filtered?answer=sse_cr")
    assert reply.status == 200
    assert reply.body.startswith(b": ping\n\nevent: message\nid: pt1.")  # line ends normalised to LF
    assert sse_data(reply.body)[-1]["result"]["tools"] == ALLOWED
    assert_no_leaks(reply.body)
    reply = await send(fpep, "/filtered?answer=json_array")
    assert reply.status == 200
    assert reply.json() == [{"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}]
    assert len(pdp.items) == 2 * len(TOOLS)


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_2026_list_is_cache_scope_private(fpep: RunningPep, pdp: ListPdp, answer: str) -> None:
    reply = await send(fpep, f"/filtered?answer={answer}", headers=v2026())
    assert reply.status == 200
    message = reply.json() if answer == "json" else sse_data(reply.body)[-1]
    assert message["result"] == {"tools": ALLOWED, "cacheScope": "private"}
    assert {i["protocol_version"] for i in pdp.items} == {V2026}


async def test_earlier_versions_get_no_cache_scope(fpep: RunningPep) -> None:
    reply = await send(fpep, "/filtered", headers={"MCP-Protocol-Version": "2025-06-18"})
    assert reply.json()["result"] == {"tools": ALLOWED}


async def test_a_filtered_list_is_logged_as_the_allow_it_is(fpep: RunningPep, pdp: ListPdp) -> None:
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
    # One tool hidden is what the filter is for: the line is an allow, and says what it removed.
    assert (filtered["decision"], filtered["reason"]) == ("allow", "allowed")
    assert filtered["filtered"] == {"kept": ALLOWED_NAMES, "removed": ["shell"]}
    assert filtered["direction"] == "server_to_client"


async def test_an_empty_list_asks_nothing_more(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    server.tools = []
    reply = await send(fpep, "/filtered")
    assert reply.json()["result"] == {"tools": []}
    assert pdp.items == []
    assert len(await fpep.log_entries()) == 1


async def test_unnamed_tools_are_removed(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    server.tools = [{"description": "nameless"}, TOOLS[0], {"name": 5}]
    reply = await send(fpep, "/filtered")
    assert reply.json()["result"]["tools"] == [TOOLS[0]]
    assert [i["name"] for i in pdp.items] == ["read_file"]
    (filtered,) = filter_lines(await fpep.log_entries())
    assert filtered["filtered"] == {"kept": ["read_file"], "removed": []}


async def test_a_batch_cannot_get_around_the_filter(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    body = orjson.dumps([rpc("ping", 1), rpc("tools/list", 2), {"jsonrpc": "2.0", "method": "notifications/x"}])
    reply = await send(fpep, "/filtered", body)
    assert reply.status == 200
    assert reply.json() == [
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": 2, "result": {"tools": ALLOWED}},
    ]
    assert [s.body for s in server.seen] == [body]
    (filtered,) = filter_lines(await fpep.log_entries())
    assert filtered["filtered"] == {"kept": ALLOWED_NAMES, "removed": ["shell"]}


async def test_a_batch_cannot_name_two_requests_alike(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    """With `tools/list` and `ping` both under id 1, the list answered first would pass for the ping's answer, and
    reach the agent unfiltered. Answers are matched to requests by id: two requests may not share one."""
    for ids in ((1, 1), ("a", "a"), (None, None)):
        body = orjson.dumps([rpc("tools/list", ids[0]), rpc("ping", ids[1])])
        reply = await send(fpep, "/filtered?answer=sse_each", body, {"MCP-Protocol-Version": "2025-03-26"})
        assert b"shell" not in reply.body
        assert reply.status == 403
        assert reply.headers["x-pep-reason"] == "request_ambiguous"
    assert server.seen == []
    body = orjson.dumps([rpc("tools/list", 1), rpc("ping", "1")])  # 1 and "1" are two ids
    reply = await send(fpep, "/filtered?answer=sse_each", body)
    assert reply.status == 200
    assert b"shell" not in reply.body


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
        assert single.body["resource"]["type"] == "route"
        (batch,) = az.batches  # one request for all the tools
        items = batch.body["evaluations"]
        assert [(i["action"]["name"], i["resource"]["type"], i["resource"]["id"]) for i in items] == [
            ("tools/list", "tool", n) for n in NAMES
        ]
        assert {i["resource"]["properties"]["direction"] for i in items} == {"server_to_client"}
    finally:
        await starter.close()
        await az.stop()


# --- prompts and resources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "kept", "hidden"),
    [
        ("prompts/list", "prompts", ["refund_reply"], "shell_prompt"),
        ("resources/list", "resources", ["file:///docs/faq.md"], "file:///etc/shadow"),
        ("resources/templates/list", "resourceTemplates", ["file:///docs/{page}"], "file:///etc/{f}"),
    ],
)
async def test_prompts_and_resources_are_filtered_where_the_route_asks(
    fpep: RunningPep, pdp: ListPdp, method: str, key: str, kept: list[str], hidden: str
) -> None:
    body = orjson.dumps(rpc(method, 3))
    reply = await send(fpep, "/all", body)
    assert reply.status == 200
    items = reply.json()["result"][key]
    assert [i.get("name") if key == "prompts" else i.get("uri", i.get("uriTemplate")) for i in items] == kept
    assert_no_leaks(reply.body)
    assert [(i["method"], i["name"]) for i in pdp.items] == [(method, kept[0]), (method, hidden)]
    (filtered,) = filter_lines(await fpep.log_entries())
    assert filtered["filtered"] == {"kept": kept, "removed": [hidden]}
    # A route that filters only tools relays these lists as they are.
    reply = await send(fpep, "/filtered", body)
    assert hidden.encode() in reply.body


# --- the PDP cannot decide the items --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "reason"),
    [({"*": "500"}, "pdp_error_status"), ({"*": "hang"}, "pdp_timeout"), ({"search": "500"}, "pdp_error_status")],
    ids=["500", "hang", "one tool 500"],
)
async def test_pdp_failure_after_the_list_was_allowed_json(
    fpep: RunningPep, pdp: ListPdp, server: McpServer, failing: dict[str, str], reason: str
) -> None:
    pdp.failing = failing
    reply = await send(fpep, "/filtered", headers={"X-Request-ID": "fail-1"})
    assert reply.status == 200  # deny_status defaults to 200: the JSON-RPC error is the denial
    assert reply.headers["x-pep-decision"] == "deny"
    assert reply.headers["x-pep-reason"] == reason
    body = reply.json()
    assert (body["id"], body["error"]["code"]) == (7, -32603)
    assert body["error"]["data"] == {"reason": reason, "request_id": "fail-1"}
    assert_no_leaks(reply.body)
    assert len(server.seen) == 1  # the tools/list itself was allowed and forwarded
    listed, filtered = await fpep.log_entries()
    assert (listed["decision"], listed["reason"]) == ("allow", "allowed")
    assert (filtered["decision"], filtered["reason"], filtered["request_id"]) == ("deny", reason, "fail-1")


async def test_pdp_failure_after_the_list_was_allowed_sse(fpep: RunningPep, pdp: ListPdp) -> None:
    pdp.failing = {"*": "500"}
    reply = await send(fpep, "/filtered?answer=sse", headers={"X-Request-ID": "fail-2"})
    assert reply.status == 200  # the stream had begun: the denial is its last event
    assert_no_leaks(reply.body)
    *_, last = sse_data(reply.body)
    assert last == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {
            "code": -32603,
            "message": "The policy decision point answered with an error.",
            "data": {"reason": "pdp_error_status", "request_id": "fail-2"},
        },
    }


async def test_pdp_failure_with_deny_status_403(fpep: RunningPep, pdp: ListPdp) -> None:
    pdp.failing = {"*": "500"}
    reply = await send(fpep, "/f403")
    assert reply.status == 403
    assert reply.headers["x-pep-reason"] == "pdp_error_status"
    assert (reply.json()["id"], reply.json()["error"]["code"]) == (7, -32603)
    assert_no_leaks(reply.body)


async def test_a_denied_list_never_reaches_the_upstream(fpep: RunningPep, pdp: ListPdp, server: McpServer) -> None:
    pdp.denied_methods = frozenset({"tools/list"})
    reply = await send(fpep, "/filtered")
    assert reply.status == 200
    assert (reply.json()["id"], reply.json()["error"]["code"]) == (7, -32001)
    assert server.seen == []
    assert pdp.items == []
    assert len(await fpep.log_entries()) == 1


# --- answers that cannot be filtered: never a pass ------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer", ["not_json", "no_tools", "gzip", "identity_gzip", "utf16", "wrong_id", "misspelled", "big"]
)
async def test_unreadable_answer_is_502(
    fpep: RunningPep, pdp: ListPdp, server: McpServer, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    monkeypatch.setattr(pep_upstream, "WHOLE_ANSWER_LIMIT", 2048)
    server.tools = [*TOOLS, {"name": "padding", "description": "x" * 4096}]  # over the limit, not by much
    for n in (1, 2):
        query = "json" if answer == "big" else answer
        reply = await send(fpep, f"/filtered?answer={query}", headers={"X-Request-ID": f"u-{n}"})
        assert reply.status == 502
        assert reply.headers["x-pep-upstream-error"] == "unreadable"
        assert reply.headers["x-pep-decision"] == "allow"
        assert reply.json()["error"] == {
            "code": "upstream_unreadable",
            "message": "The upstream's answer could not be read to be decided.",
            "request_id": f"u-{n}",
        }
        assert_no_leaks(reply.body)
        text = await scrape(fpep)
        assert metric(text, "pep_upstream_failures_total", route="filtered", kind="unreadable") == n
    assert "Accept-Encoding" not in server.seen[-1].headers
    assert pdp.items == []  # nothing readable, nothing to decide


@pytest.mark.parametrize("answer", ["sse_garbage", "sse_wrong_id"])
async def test_unreadable_event_ends_the_stream_with_an_error(fpep: RunningPep, pdp: ListPdp, answer: str) -> None:
    reply = await send(fpep, f"/filtered?answer={answer}", headers={"X-Request-ID": "g-1"})
    assert reply.status == 200
    assert_no_leaks(reply.body)
    *_, last = sse_data(reply.body)
    assert last["id"] == 7
    assert last["error"]["code"] == -32603
    assert last["error"]["data"] == {"reason": "upstream_unreadable", "request_id": "g-1"}
    assert pdp.items == []


async def test_whole_answer_limit_is_inclusive(
    fpep: RunningPep, server: McpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(server.answer_for(rpc("tools/list", 7)))
    monkeypatch.setattr(pep_upstream, "WHOLE_ANSWER_LIMIT", size + 100)
    reply = await send(fpep, "/filtered?pad=100")
    assert reply.status == 200
    assert reply.json()["result"]["tools"] == ALLOWED
    reply = await send(fpep, "/filtered?pad=101")
    assert reply.status == 502
    assert reply.headers["x-pep-upstream-error"] == "unreadable"


async def test_answers_on_mcp_routes_are_asked_for_unencoded(fpep: RunningPep, server: McpServer) -> None:
    await send(fpep, "/filtered")
    await send(fpep, "/filtered", orjson.dumps(rpc("tools/call", 2, name="read_file", arguments={})))
    await send(fpep, "/plain")
    assert all("Accept-Encoding" not in seen.headers for seen in server.seen)  # every answer is read


# --- what the server sends the agent, when the PDP cannot decide it ---------------------------------------------------


async def test_an_undecided_server_request_ends_the_answer(fpep: RunningPep, pdp: ListPdp) -> None:
    """The PDP fails on the form the server sends before its answer: the form never reaches the agent, the call gets
    the JSON-RPC error (-32603), and nothing after it (the answer) is relayed."""
    pdp.failing_methods = frozenset({"elicitation/create"})
    body = orjson.dumps(rpc("tools/call", 7, name="read_file", arguments={}))
    reply = await send(fpep, "/filtered?answer=sse_ask", body, headers={"X-Request-ID": "ask-1"})
    assert reply.status == 200
    assert b"elicitation" not in reply.body
    assert b"Your email" not in reply.body
    *_, last = sse_data(reply.body)
    assert last["id"] == 7
    assert (last["error"]["code"], last["error"]["data"]["reason"]) == (-32603, "pdp_error_status")
    assert b"done" not in reply.body  # the tool's answer after the form is not relayed either
    entries = await fpep.log_entries()
    assert [(e["mcp_method"], e["decision"], e["reason"]) for e in entries if e.get("direction")] == [
        ("notifications/progress", "allow", "allowed"),
        ("elicitation/create", "deny", "pdp_error_status"),
    ]


async def test_an_allowed_server_request_is_relayed_under_a_sealed_id(fpep: RunningPep, pdp: ListPdp) -> None:
    body = orjson.dumps(rpc("tools/call", 7, name="read_file", arguments={}))
    reply = await send(fpep, "/filtered?answer=sse_ask", body)
    ask = next(m for m in sse_data(reply.body) if m.get("method") == "elicitation/create")
    assert ask["id"].startswith("pt1.")  # the agent answers under a token that says what it answers
    assert ask["params"] == orjson.loads(ELICIT)["params"]
    assert sse_data(reply.body)[-1]["result"] == CALL_RESULT


async def test_an_undecided_notification_is_dropped(fpep: RunningPep, pdp: ListPdp) -> None:
    pdp.failing_methods = frozenset({"notifications/progress"})
    reply = await send(fpep, "/filtered?answer=sse")
    assert b"notifications/progress" not in reply.body
    assert sse_data(reply.body) == [{"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}]  # the answer goes on


async def test_an_undecided_message_on_the_get_stream_is_dropped(fpep: RunningPep, pdp: ListPdp) -> None:
    pdp.failing_methods = frozenset({"notifications/progress"})
    reply = await send(fpep, "/filtered", None, {"Accept": "text/event-stream", "Mcp-Session-Id": "s-1"}, "GET")
    assert reply.status == 200
    assert sse_data(reply.body) == []  # the notification undecided, the list a stray response: nothing relayed


# --- the session's GET stream and resumption ------------------------------------------------------------------------


async def test_a_list_answered_on_the_get_stream_is_dropped(fpep: RunningPep, pdp: ListPdp) -> None:
    """A server that answers a pending tools/list on the session's GET stream gets nothing past the PEP: a response
    there answers no request of that GET, and the SDKs would give it to the call with its id."""
    reply = await send(fpep, "/filtered", None, {"Accept": "text/event-stream", "Mcp-Session-Id": "s-1"}, "GET")
    assert reply.status == 200
    assert_no_leaks(reply.body)
    assert sse_data(reply.body) == [orjson.loads(NOTE)]  # the notification was decided and relayed
    assert pdp.items == []
    assert b"read_file" not in reply.body


@pytest.mark.parametrize("verb", ["GET", "POST"])
async def test_an_unknown_last_event_id_is_refused(
    fpep: RunningPep, pdp: ListPdp, server: McpServer, verb: str
) -> None:
    headers = {"Last-Event-ID": "ev-2", "Accept": "text/event-stream"}
    reply = await send(fpep, "/filtered", LIST if verb == "POST" else None, headers, verb)
    assert reply.status == 403
    assert reply.headers["x-pep-reason"] == "request_ambiguous"
    assert pdp.inputs == []
    assert server.seen == []


async def test_a_resumed_stream_is_read_as_the_stream_it_continues(
    fpep: RunningPep, pdp: ListPdp, server: McpServer
) -> None:
    """A GET with the Last-Event-ID the PEP relayed resumes that POST's stream: the server gets its own event id
    back, and what it replays is read as before: the tools/list answer filtered, by its id."""
    first = await send(fpep, "/filtered?answer=sse", headers={"Mcp-Session-Id": "s-1"})
    token = sse_ids(first.body)[0].decode()  # the id of the notification: the list answer is still to come
    resumed = await send(
        fpep, "/filtered", None, {"Accept": "text/event-stream", "Mcp-Session-Id": "s-1", "Last-Event-ID": token}, "GET"
    )
    assert resumed.status == 200
    assert server.seen[-1].method == "GET"
    assert server.seen[-1].headers["Last-Event-ID"] == "ev-1"  # the server's own id, never the token
    assert sse_data(resumed.body)[-1] == {"jsonrpc": "2.0", "id": 7, "result": {"tools": ALLOWED}}
    assert_no_leaks(resumed.body)
    # The token is the caller's and the session's: another session cannot resume with it.
    other = await send(
        fpep, "/filtered", None, {"Accept": "text/event-stream", "Mcp-Session-Id": "s-2", "Last-Event-ID": token}, "GET"
    )
    assert (other.status, other.headers["x-pep-reason"]) == (403, "request_ambiguous")


# --- what is not filtered -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_route_without_filter_passes_the_list_unchanged(
    fpep: RunningPep, pdp: ListPdp, server: McpServer, answer: str
) -> None:
    reply = await send(fpep, f"/plain?answer={answer}", headers=v2026())
    assert reply.status == 200
    upstream_body = server.answer_for(rpc("tools/list", 7))
    if answer == "json":
        assert reply.body == upstream_body  # byte for byte
    else:
        assert sse_data(reply.body)[-1] == orjson.loads(upstream_body)
    assert b"shell" in reply.body
    assert pdp.items == []
    assert not filter_lines(await fpep.log_entries())


@pytest.mark.parametrize("answer", ["json", "sse"])
async def test_tools_call_is_never_filtered(fpep: RunningPep, pdp: ListPdp, server: McpServer, answer: str) -> None:
    body = orjson.dumps(rpc("tools/call", 3, name="read_file", arguments={"path": "/tmp/x"}))
    reply = await send(fpep, f"/filtered?answer={answer}", body, headers=v2026("tools/call", "read_file"))
    assert reply.status == 200
    upstream_body = server.answer_for(rpc("tools/call", 3))
    if answer == "json":
        assert reply.body == upstream_body
    else:
        assert sse_data(reply.body)[-1] == orjson.loads(upstream_body)
    assert pdp.items == []
    assert [s.body for s in server.seen] == [body]


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
async def test_kept_tools_are_shown_only_once_logged(tmp_path: Path, pdp: ListPdp, answer: str) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    server = LogRemovingServer(directory=directory)
    await server.start()
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, server.url, log), "filter.yaml")
    try:

        def mutate(cfg: dict[str, Any]) -> None:
            routes(server.url)(cfg)
            cfg["decision_log"] = {"sink": "file", "path": str(directory / "audit.jsonl"), "required": True}
            cfg["pdp"]["timeout_ms"] = 1000  # as `fpep`: every listed item is asked about (250 ms flaked in a full run)

        running = await starter(mutate=mutate)
        reply = await send(running, f"/filtered?answer={answer}", headers={"X-Request-ID": "gone-1"})
    finally:
        await starter.close()
        await server.stop()
    assert len(server.seen) == 1  # the tools/list was logged, then forwarded; the log went away meanwhile
    assert_no_leaks(reply.body)
    if answer == "json":
        assert (reply.status, reply.headers["x-pep-reason"]) == (200, "audit_unavailable")
        assert reply.json()["error"]["data"] == {"reason": "audit_unavailable", "request_id": "gone-1"}
    else:
        # The stream had begun; the first thing to let through (the notification) could not be logged.
        assert sse_data(reply.body)[-1]["error"]["data"] == {"reason": "audit_unavailable", "request_id": "gone-1"}
