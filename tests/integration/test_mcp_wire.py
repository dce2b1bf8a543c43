"""MCP and OpenAI routes through the PEP on real loopback sockets.

What is refused before the PDP never reaches the PDP or the upstream; what is decided shows its `mcp` or `model`
facts in the policy input; what is allowed reaches the upstream byte for byte, once; denials have the protocol's
shape; responses (SSE included) stream through unbuffered.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.fault_pdp import FaultPdp
from tests.support.policy_pdp import PolicyPdp
from tests.support.upstream import RecordingUpstream

Mutate = Callable[[dict[str, Any]], None]
MakePep = Callable[..., Any]
Headers = Mapping[str, str] | CIMultiDict[str]

MIB = 1024 * 1024
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
V2026 = "2026-07-28"


# --- helpers ----------------------------------------------------------------------------------------------------


def routes(**mcp_opts: Any) -> Mutate:
    """An MCP route `/mcp` (options `mcp_opts`), an MCP route `/mcpsse` onto the upstream's SSE behaviour, and
    OpenAI routes `/v1` (onto `/v1`) and `/llm` (onto the upstream's root, so `/llm/sse/chat/completions` streams).
    """

    def mutate(cfg: dict[str, Any]) -> None:
        up = cfg["routes"][0]["upstream"]
        cfg["routes"] = [
            {
                "name": "mcp",
                "match": {"path_prefix": "/mcp"},
                "upstream": up + "/mcp",
                "strip_prefix": True,
                "protocol": "mcp",
                **mcp_opts,
            },
            {
                "name": "mcp-sse",
                "match": {"path_prefix": "/mcpsse"},
                "upstream": up + "/sse",
                "strip_prefix": True,
                "protocol": "mcp",
            },
            {
                "name": "openai",
                "match": {"path_prefix": "/v1"},
                "upstream": up + "/v1",
                "strip_prefix": True,
                "protocol": "openai",
            },
            {
                "name": "llm",
                "match": {"path_prefix": "/llm"},
                "upstream": up,
                "strip_prefix": True,
                "protocol": "openai",
            },
        ]

    return mutate


def also(*mutations: Mutate) -> Mutate:
    def mutate(cfg: dict[str, Any]) -> None:
        for m in mutations:
            m(cfg)

    return mutate


def rpc(method: str | None = "tools/call", rpc_id: Any = 1, **params: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if method is None:
        del msg["method"]
        msg["result"] = {}
    if rpc_id is not None:
        msg["id"] = rpc_id
    if params:
        msg["params"] = params
    return msg


def call(name: str, rpc_id: Any = 1, **arguments: Any) -> bytes:
    return orjson.dumps(rpc("tools/call", rpc_id, name=name, arguments=arguments))


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def send(
    pep: RunningPep,
    path: str,
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: Headers | None = None,
    method: str = "POST",
) -> Reply:
    merged: CIMultiDict[str] = CIMultiDict(JSON_HEADERS)
    if headers is not None:
        for k, v in headers.items():
            merged.add(k, v)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, pep.url + path, data=body, headers=merged) as r,
    ):
        return Reply(r.status, r.headers, await asyncio.wait_for(r.read(), 5))


def policy_input(pdp: FaultPdp, index: int = -1) -> dict[str, Any]:
    body = pdp.requests[index].body
    assert isinstance(body, dict)
    doc = body["input"]
    assert isinstance(doc, dict)
    return doc


def assert_denied(reply: Reply, reason: str) -> None:
    assert reply.headers["x-pep-decision"] == "deny", reply
    assert reply.headers["x-pep-reason"] == reason, reply
    assert reply.headers["x-request-id"]


def assert_rpc_error(reply: Reply, rpc_id: Any, code: int, reason: str) -> None:
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == rpc_id
    assert body["error"]["code"] == code
    assert body["error"]["data"] == {"reason": reason, "request_id": reply.headers["x-request-id"]}


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


@dataclass
class NamePdp(PolicyPdp):
    """An OPA-shaped PDP that denies the MCP names in `denied`, allows everything else, and keeps every input."""

    denied: frozenset[str] = frozenset()

    def decide(self, doc: dict[str, Any]) -> Any:
        return (doc.get("mcp") or {}).get("name") not in self.denied


@pytest.fixture
async def name_pdp() -> AsyncIterator[NamePdp]:
    pdp = NamePdp(denied=frozenset({"delete_all"}))
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.fixture
async def mcp_pep(make_pep: MakePep) -> RunningPep:
    running: RunningPep = await make_pep(mutate=routes())
    return running


@pytest.fixture
async def named_pep(tmp_path: Path, name_pdp: NamePdp, upstream: RecordingUpstream) -> AsyncIterator[RunningPep]:
    """A PEP whose PDP denies the tool `delete_all` and allows the rest."""
    starter = PepStarter(tmp_path, lambda log: base_config(name_pdp.url, upstream.url, log), "named.yaml")
    yield await starter(mutate=routes())
    await starter.close()


# --- refused before the PDP ---------------------------------------------------------------------------------------

CALL = call("send_email", 1, to="a@example.com")
REFUSALS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("invalid json", b'{"jsonrpc":"2.0","id":1,"method":', {}, "body_unreadable"),
    ("trailing data", CALL + b"{}", {}, "body_unreadable"),
    (
        "invalid utf-8",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xff"}}',
        {},
        "body_unreadable",
    ),
    ("duplicate key", b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}', {}, "body_unreadable"),
    (
        "duplicate argument",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"to":"a","to":"b"}}}',
        {},
        "body_unreadable",
    ),
    (
        "too deep",
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b'{"a":' * 70 + b"1" + b"}" * 71,
        {},
        "body_unreadable",
    ),
    ("not json-rpc 2.0", b'{"jsonrpc":"1.0","id":1,"method":"ping"}', {}, "body_unreadable"),
    ("boolean id", b'{"jsonrpc":"2.0","id":true,"method":"ping"}', {}, "body_unreadable"),
    ("name not a string", orjson.dumps(rpc("tools/call", 1, name=["a"])), {}, "body_unreadable"),
    ("arguments not an object", orjson.dumps(rpc("tools/call", 1, name="a", arguments=[1])), {}, "body_unreadable"),
    ("empty batch", b"[]", {}, "body_unreadable"),
    ("batch in 2025-06-18", b"[" + CALL + b"]", {"MCP-Protocol-Version": "2025-06-18"}, "request_ambiguous"),
    ("batch in 2026-07-28", b"[" + CALL + b"]", {"MCP-Protocol-Version": V2026}, "request_ambiguous"),
    ("2026 without Mcp-Method", CALL, {"MCP-Protocol-Version": V2026}, "request_ambiguous"),
    ("2026 without Mcp-Name", CALL, {"MCP-Protocol-Version": V2026, "Mcp-Method": "tools/call"}, "request_ambiguous"),
    ("Mcp-Method mismatch", CALL, {"Mcp-Method": "tools/list"}, "request_ambiguous"),
    ("Mcp-Name mismatch", CALL, {"Mcp-Method": "tools/call", "Mcp-Name": "read_inbox"}, "request_ambiguous"),
    ("Mcp-Name bad base64", CALL, {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?***?="}, "request_ambiguous"),
    (
        "version header vs _meta",
        orjson.dumps(rpc("tools/list", 1, _meta={"io.modelcontextprotocol/protocolVersion": V2026})),
        {"MCP-Protocol-Version": "2025-11-25"},
        "body_unreadable",
    ),
    ("gzip", gzip.compress(CALL), {"Content-Encoding": "gzip"}, "body_unreadable"),
    (
        "request with an error",  # an SDK server reads it as an error reply to its own request 0
        b'{"jsonrpc":"2.0","id":0,"method":"ping","error":{"code":-1,"message":"declined"}}',
        {},
        "body_unreadable",
    ),
]


@pytest.mark.parametrize(("body", "headers", "reason"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
async def test_refused_before_the_pdp(
    mcp_pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    body: bytes,
    headers: dict[str, str],
    reason: str,
) -> None:
    reply = await send(mcp_pep, "/mcp", body, headers)
    assert reply.status == 403
    assert_denied(reply, reason)
    assert reply.json()["error"]["reason"] == reason  # no JSON-RPC id could be trusted: the plain shape
    assert fault_pdp.requests == []
    assert upstream.seen == []
    (entry,) = await mcp_pep.log_entries()
    assert (entry["route"], entry["decision"], entry["reason"]) == ("mcp", "deny", reason)
    assert entry["pdp_ms"] is None


async def test_repeated_mirrored_header_refused(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    headers = CIMultiDict([("Mcp-Method", "tools/call"), ("Mcp-Name", "send_email"), ("Mcp-Name", "delete_all")])
    reply = await send(mcp_pep, "/mcp", CALL, headers)
    assert reply.status == 403
    assert_denied(reply, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []


async def test_a_coding_in_any_content_encoding_field_is_refused(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """`identity` then `gzip`: an upstream that reads the second field, or the joined value, inflates what the PEP
    decided as it was. Every field counts, as it does for answers."""
    for path, body in (("/mcp", CALL), ("/v1/chat/completions", b'{"model":"gpt-4o-mini"}')):
        headers = CIMultiDict([("Content-Encoding", "identity"), ("Content-Encoding", "gzip")])
        reply = await send(mcp_pep, path, body, headers)
        assert reply.status == 403
        assert_denied(reply, "body_unreadable")
    assert fault_pdp.requests == []
    assert upstream.seen == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_default_body_limit_is_one_mib(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, chunked: bool
) -> None:
    upstream.client_max_size = 4 * MIB
    head = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"pad":"'
    tail = b'"}}}'
    at_limit = head + b"x" * (MIB - len(head) - len(tail)) + tail
    over = head + b"x" * (MIB + 1 - len(head) - len(tail)) + tail
    assert (len(at_limit), len(over)) == (MIB, MIB + 1)

    reply = await send(mcp_pep, "/mcp", chunks(over, 65536) if chunked else over)
    assert reply.status == 403
    assert_denied(reply, "body_too_large")
    assert fault_pdp.requests == []
    assert upstream.seen == []

    reply = await send(mcp_pep, "/mcp", chunks(at_limit, 65536) if chunked else at_limit)
    assert reply.status == 200
    assert [r.body for r in upstream.seen] == [at_limit]
    assert policy_input(fault_pdp)["request"]["body_bytes"] == MIB
    assert policy_input(fault_pdp)["mcp"]["name"] == "t"


async def test_configured_body_limit(make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    pep: RunningPep = await make_pep(mutate=routes(max_body_bytes=len(CALL)))
    reply = await send(pep, "/mcp", chunks(CALL + b" ", 7))
    assert_denied(reply, "body_too_large")
    reply = await send(pep, "/mcp", CALL + b" ")
    assert_denied(reply, "body_too_large")
    assert fault_pdp.requests == []
    assert upstream.seen == []
    reply = await send(pep, "/mcp", chunks(CALL, 7))
    assert reply.status == 200
    assert [r.body for r in upstream.seen] == [CALL]


# --- decided and forwarded ----------------------------------------------------------------------------------------


async def test_policy_input_has_mcp_facts(mcp_pep: RunningPep, fault_pdp: FaultPdp) -> None:
    headers = {"MCP-Protocol-Version": V2026, "Mcp-Method": "tools/call", "Mcp-Name": "send_email"}
    reply = await send(mcp_pep, "/mcp", CALL, headers)
    assert reply.status == 200
    doc = policy_input(fault_pdp)
    assert doc["mcp"] == {
        "method": "tools/call",
        "name": "send_email",
        "arguments": {"to": "a@example.com"},
        "protocol_version": V2026,
        "direction": "client_to_server",
    }
    assert doc["route"]["protocol"] == "mcp"
    assert doc["request"]["body_bytes"] == len(CALL)
    assert "model" not in doc
    assert doc["request"]["headers"]["mcp-method"] == "tools/call"


async def test_allowed_body_reaches_the_upstream_byte_for_byte(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    body = (
        b' \r\n{ "params" : {"arguments":{"z":1,"a":[1 ,2.50, "\\u00e9"],"\\u0042":null}, "name":"t\\/x"},\n'
        b'\t"method":"tools/call" ,"id":"\xc3\xa9-1",   "jsonrpc":"2.0" }\n\n'
    )
    reply = await send(mcp_pep, "/mcp?session=1", body)
    assert reply.status == 200
    (got,) = upstream.seen
    assert got.body == body
    assert got.target == "/mcp?session=1"
    assert got.headers["Content-Length"] == str(len(body))
    doc = policy_input(fault_pdp)
    assert doc["mcp"]["name"] == "t/x"
    assert doc["mcp"]["arguments"] == {"z": 1, "a": [1, 2.5, "\u00e9"], "B": None}


async def test_chunked_body_is_forwarded_whole(mcp_pep: RunningPep, upstream: RecordingUpstream) -> None:
    reply = await send(mcp_pep, "/mcp", chunks(CALL, 5))
    assert reply.status == 200
    (got,) = upstream.seen
    assert got.body == CALL
    assert got.headers["Content-Length"] == str(len(CALL))  # decided whole, sent whole


@pytest.mark.parametrize(
    ("body", "method", "denied_status"),
    [
        (orjson.dumps(rpc("notifications/initialized", None)), "notifications/initialized", 202),
        (orjson.dumps(rpc("initialize", 0, protocolVersion="2025-06-18", capabilities={})), "initialize", 200),
    ],
)
async def test_other_messages_are_decided(
    mcp_pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    body: bytes,
    method: str,
    denied_status: int,
) -> None:
    reply = await send(mcp_pep, "/mcp", body)
    assert reply.status in (200, 202)
    assert policy_input(fault_pdp)["mcp"]["method"] == method
    assert [r.body for r in upstream.seen] == [body]
    fault_pdp.set("deny")
    reply = await send(mcp_pep, "/mcp", body)
    assert reply.status == denied_status
    assert_denied(reply, "policy_denied")
    assert len(upstream.seen) == 1


async def test_a_reply_to_no_relayed_server_request_is_refused(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """A client reply names the server request it answers only by the id the PEP relayed; any other id (a plain
    server id, a guessed one) is refused before the PDP: an unknown reply is never forwarded."""
    for rpc_id in ("srv-1", 1, "pt1.AAAA"):
        reply = await send(mcp_pep, "/mcp", orjson.dumps(rpc(None, rpc_id)))
        assert reply.status == 403
        assert_denied(reply, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []


@pytest.mark.parametrize(("method", "action"), [("GET", "mcp/stream"), ("DELETE", "mcp/session/delete")])
async def test_get_and_delete_are_decided(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, method: str, action: str
) -> None:
    headers = {"Mcp-Session-Id": "s-1", "Accept": "text/event-stream"}
    reply = await send(mcp_pep, "/mcp", None, headers, method)
    assert reply.status == 200
    doc = policy_input(fault_pdp)
    assert doc["mcp"] == {
        "method": action,
        "name": None,
        "arguments": None,
        "protocol_version": None,
        "direction": "client_to_server",
    }
    assert [(r.method, r.target) for r in upstream.seen] == [(method, "/mcp")]
    fault_pdp.set("deny")
    reply = await send(mcp_pep, "/mcp", None, headers, method)
    assert reply.status == 403
    assert_denied(reply, "policy_denied")
    assert reply.json()["error"]["code"] == "access_denied"
    assert len(upstream.seen) == 1
    entries = await mcp_pep.log_entries()
    assert [(e["mcp_method"], e["decision"]) for e in entries] == [(action, "allow"), (action, "deny")]


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
async def test_a_body_on_a_non_post_request_is_refused(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, method: str
) -> None:
    # Only POST bodies are read: any other body would reach the upstream without being decided.
    reply = await send(mcp_pep, "/mcp", call("shell"), None, method)
    assert_denied(reply, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []


async def test_policy_deny_is_a_json_rpc_error(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    fault_pdp.set("deny_object")
    reply = await send(mcp_pep, "/mcp", call("send_email", "req-7"))
    assert reply.status == 200  # the default deny_status: every MCP SDK reads the JSON-RPC error from a 200
    assert_denied(reply, "policy_denied")
    assert_rpc_error(reply, "req-7", -32001, "policy_denied")
    assert upstream.seen == []


@pytest.mark.parametrize(("mode", "reason"), [("refuse", "pdp_unreachable"), ("status_500", "pdp_error_status")])
async def test_pdp_failure_is_32603(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, mode: str, reason: str
) -> None:
    await fault_pdp.apply(mode)
    reply = await send(mcp_pep, "/mcp", call("send_email", 42))
    assert reply.status == 200
    assert_denied(reply, reason)
    assert_rpc_error(reply, 42, -32603, reason)
    assert upstream.seen == []


async def test_deny_status_defaults_to_200(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = mcp_pep
    fault_pdp.set("deny")
    reply = await send(pep, "/mcp", call("send_email", 5))
    assert reply.status == 200
    assert_denied(reply, "policy_denied")
    assert_rpc_error(reply, 5, -32001, "policy_denied")
    reply = await send(pep, "/mcp", orjson.dumps(rpc("notifications/initialized", None)))  # no request to answer
    assert reply.status == 202
    assert reply.body == b""
    assert_denied(reply, "policy_denied")
    # A body that could not be read has no id to answer: still an HTTP 403.
    reply = await send(pep, "/mcp", b"{")
    assert reply.status == 403
    assert_denied(reply, "body_unreadable")
    await fault_pdp.apply("refuse")
    reply = await send(pep, "/mcp", call("send_email", 6))
    assert reply.status == 200
    assert_rpc_error(reply, 6, -32603, "pdp_unreachable")
    assert upstream.seen == []


async def test_deny_status_403(make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    """`deny_status: 403` (for clients that want an HTTP-level refusal): the same JSON-RPC error in a 403."""
    pep: RunningPep = await make_pep(mutate=routes(deny_status=403))
    fault_pdp.set("deny")
    reply = await send(pep, "/mcp", call("send_email", 5))
    assert reply.status == 403
    assert_rpc_error(reply, 5, -32001, "policy_denied")
    reply = await send(pep, "/mcp", orjson.dumps(rpc("notifications/initialized", None)))
    assert reply.status == 403
    assert reply.json()["error"]["reason"] == "policy_denied"
    assert upstream.seen == []


# --- batches ------------------------------------------------------------------------------------------------------


def batch(*messages: dict[str, Any]) -> bytes:
    return orjson.dumps(list(messages))


@pytest.mark.parametrize("version", [None, "2025-03-26"])
async def test_batch_with_one_denied_element_is_denied_whole(
    named_pep: RunningPep, name_pdp: NamePdp, upstream: RecordingUpstream, version: str | None
) -> None:
    body = batch(
        rpc("tools/call", 1, name="send_email", arguments={}),
        rpc("notifications/progress", None, progress=1),
        rpc("tools/call", "two", name="delete_all", arguments={"really": True}),
    )
    headers = {"MCP-Protocol-Version": version} if version else {}
    reply = await send(named_pep, "/mcp", body, headers)
    assert reply.status == 200
    assert_denied(reply, "policy_denied")
    errors = reply.json()
    assert isinstance(errors, list)
    assert [e["id"] for e in errors] == [1, "two"]  # the notification gets no answer
    assert all(e["error"]["code"] == -32001 for e in errors)
    assert upstream.seen == []
    assert sorted(str(d["mcp"]["name"]) for d in name_pdp.inputs) == ["None", "delete_all", "send_email"]
    (entry,) = await named_pep.log_entries()
    assert (entry["decision"], entry["reason"]) == ("deny", "policy_denied")
    assert (entry["mcp_method"], entry["mcp_name"]) == ("tools/call", "send_email")
    assert entry["messages"] == [
        {"mcp_method": "tools/call", "mcp_name": "send_email", "reason": "allowed"},
        {"mcp_method": "notifications/progress", "mcp_name": None, "reason": "allowed"},
        {"mcp_method": "tools/call", "mcp_name": "delete_all", "reason": "policy_denied"},
    ]


async def test_all_allowed_batch_is_forwarded_once(
    named_pep: RunningPep, name_pdp: NamePdp, upstream: RecordingUpstream
) -> None:
    body = (
        b' [ {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}} ,\n'
        + batch(rpc("resources/read", 2, uri="file:///x"))[1:]
    )
    reply = await send(named_pep, "/mcp", body)
    assert reply.status == 200
    assert [r.body for r in upstream.seen] == [body]
    assert sorted(d["mcp"]["name"] for d in name_pdp.inputs) == ["a", "file:///x"]
    (entry,) = await named_pep.log_entries()
    assert [m["reason"] for m in entry["messages"]] == ["allowed", "allowed"]


async def test_batch_with_pdp_down_is_32603_for_each(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=routes())
    await fault_pdp.apply("refuse")
    reply = await send(pep, "/mcp", batch(rpc("ping", 1), rpc("ping", 2)))
    assert_denied(reply, "pdp_unreachable")
    assert [(e["id"], e["error"]["code"]) for e in reply.json()] == [(1, -32603), (2, -32603)]
    assert upstream.seen == []


# --- the decision log ---------------------------------------------------------------------------------------------


async def test_decision_log_leaves_arguments_out_by_default(mcp_pep: RunningPep) -> None:
    await send(mcp_pep, "/mcp", call("send_email", 1, secret="hunter2"))
    (entry,) = await mcp_pep.log_entries()
    assert (entry["mcp_method"], entry["mcp_name"]) == ("tools/call", "send_email")
    assert "arguments" not in entry
    assert "hunter2" not in orjson.dumps(entry).decode()


async def test_decision_log_with_include_arguments(make_pep: MakePep) -> None:
    def include(cfg: dict[str, Any]) -> None:
        cfg["decision_log"]["include_arguments"] = True

    pep: RunningPep = await make_pep(mutate=also(routes(), include))
    await send(pep, "/mcp", call("send_email", 1, to="x@example.com"))
    await send(pep, "/mcp", batch(rpc("tools/call", 1, name="a", arguments={"k": 1}), rpc("ping", 2)))
    single, batched = await pep.log_entries()
    assert single["arguments"] == {"to": "x@example.com"}
    assert batched["arguments"] == {"k": 1}
    assert batched["messages"] == [
        {"mcp_method": "tools/call", "mcp_name": "a", "reason": "allowed", "arguments": {"k": 1}},
        {"mcp_method": "ping", "mcp_name": None, "reason": "allowed", "arguments": None},
    ]


# --- Expect: 100-continue -----------------------------------------------------------------------------------------


async def _expect(port: int, body: bytes, length: int | None = None) -> tuple[bytes, bytes]:
    """Send the head with `Expect: 100-continue`; return the first bytes, then the rest after sending the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: pep\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.read(65536), 5)
        if not first.startswith(b"HTTP/1.1 100 "):
            return first, b""
        writer.write(body)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)
        return first, rest
    finally:
        writer.close()


async def test_expect_continue_then_denial(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    fault_pdp.set("deny")
    first, rest = await _expect(mcp_pep.port, call("send_email", 3))
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"  # the body is needed for the decision
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert b"x-pep-reason: policy_denied" in rest
    body = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert (body["id"], body["error"]["code"]) == (3, -32001)
    assert upstream.seen == []
    assert len(fault_pdp.requests) == 1


async def test_expect_continue_then_allow(mcp_pep: RunningPep, upstream: RecordingUpstream) -> None:
    first, rest = await _expect(mcp_pep.port, CALL)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert b"100 Continue" not in rest  # once only
    assert [r.body for r in upstream.seen] == [CALL]


async def test_expect_continue_over_the_limit_is_denied_without_continue(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    first, _ = await _expect(mcp_pep.port, b"", length=MIB + 1)
    assert first.startswith(b"HTTP/1.1 403 ")
    assert b"x-pep-reason: body_too_large" in first
    assert fault_pdp.requests == []
    assert upstream.seen == []


# --- streaming responses ------------------------------------------------------------------------------------------


async def _stream(pep: RunningPep, path: str, body: bytes) -> tuple[list[bytes], list[float], float, float]:
    """POST and read the SSE answer event by event: the events, their arrival times, start and end."""
    events: list[bytes] = []
    arrivals: list[float] = []
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        started = time.monotonic()
        async with s.post(pep.url + path, data=body, headers=JSON_HEADERS) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            while event := await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5):
                events.append(event)
                arrivals.append(time.monotonic())
        ended = time.monotonic()
    return events, arrivals, started, ended


def assert_unbuffered(arrivals: list[float], started: float, ended: float, gap: float) -> None:
    assert arrivals[0] - started < 0.5 * (ended - started)
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] > gap * 0.4, gaps


async def test_mcp_sse_answer_streams_through(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    n, gap = 4, 0.15
    events, arrivals, started, ended = await _stream(mcp_pep, f"/mcpsse?n={n}&gap_ms={int(gap * 1000)}&rpc=1", CALL)
    assert len(events) == n
    for i, event in enumerate(events):
        id_line, data_line = event.rstrip(b"\n").split(b"\n")
        assert id_line.startswith(b"id: pt1.")  # the event id the client resumes with is sealed
        message = orjson.loads(data_line.removeprefix(b"data: "))
        assert message == (
            {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
            if i == n - 1
            else {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": i}}
        )
    assert_unbuffered(arrivals, started, ended, gap)
    assert [r.body for r in upstream.seen] == [CALL]
    assert policy_input(fault_pdp)["route"]["name"] == "mcp-sse"


# --- OpenAI routes ------------------------------------------------------------------------------------------------

CHAT = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
)


async def test_openai_model_facts(mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    body = b'{"stream":false,  "model":"gpt-4o-mini","tools":[{"type":"web_search"}],"input":"x"}\n'
    reply = await send(mcp_pep, "/v1/responses", body)
    assert reply.status == 200
    doc = policy_input(fault_pdp)
    assert doc["model"] == {
        "action": "model.invoke",
        "endpoint": "responses",
        "name": "gpt-4o-mini",
        "read": True,
        "stream": False,
        "n": 1,
        "tools": ["web_search"],
    }
    assert doc["route"]["protocol"] == "openai"
    assert "mcp" not in doc
    assert [(r.target, r.body) for r in upstream.seen] == [("/v1/responses", body)]
    reply = await send(mcp_pep, "/v1/chat/completions/", CHAT)
    assert reply.status == 200
    facts = policy_input(fault_pdp)["model"]
    assert (facts["endpoint"], facts["name"], facts["stream"], facts["tools"]) == (
        "chat.completions",
        "gpt-4o-mini",
        False,
        ["get_weather"],
    )
    entries = await mcp_pep.log_entries()
    assert [e["model"] for e in entries] == ["gpt-4o-mini", "gpt-4o-mini"]


async def test_openai_denial_shape(mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    fault_pdp.set("deny")
    reply = await send(mcp_pep, "/v1/chat/completions", CHAT)
    assert reply.status == 403
    assert_denied(reply, "policy_denied")
    assert reply.headers["x-should-retry"] == "false"
    body = reply.json()
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "permission_denied",
            "code": "policy_denied",
            "param": None,
        }
    }
    assert body["error"]["message"]
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b'{"messages":[]}', {}, "body_unreadable"),
        (b'{"model":"a","model":"b"}', {}, "body_unreadable"),
        (b'{"model":"m","stream":"yes"}', {}, "body_unreadable"),
        (gzip.compress(CHAT), {"Content-Encoding": "gzip"}, "body_unreadable"),
        (b'{"model":"' + b"m" * MIB + b'"}', {}, "body_too_large"),
    ],
    ids=["no model", "duplicate model", "stream not bool", "gzip", "too large"],
)
async def test_openai_refusals(
    mcp_pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    body: bytes,
    headers: dict[str, str],
    reason: str,
) -> None:
    reply = await send(mcp_pep, "/v1/chat/completions", body, headers)
    assert reply.status == 403
    assert_denied(reply, reason)
    assert reply.headers["x-should-retry"] == "false"
    assert reply.json()["error"]["code"] == reason
    assert reply.json()["error"]["type"] == "permission_denied"
    assert fault_pdp.requests == []
    assert upstream.seen == []


async def test_openai_stream_passes_through_to_done(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    n, gap = 3, 0.15
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []})
    path = f"/llm/sse/chat/completions?n={n}&gap_ms={int(gap * 1000)}&done=1&json=1"
    events, arrivals, started, ended = await _stream(mcp_pep, path, body)
    # Each event is read (it calls no tool, names no model) and relayed whole as it arrives.
    assert b"".join(events) == b"".join(f'id: {i}\ndata: {{"event": {i}}}\n\n'.encode() for i in range(n)) + (
        b"data: [DONE]\n\n"
    )
    assert events[-1] == b"data: [DONE]\n\n"
    assert_unbuffered(arrivals, started, ended, gap)
    facts = policy_input(fault_pdp)["model"]
    assert (facts["name"], facts["stream"], facts["tools"]) == ("gpt-4o-mini", True, [])
    assert len(fault_pdp.requests) == 1  # the answer asked nothing more
    assert [r.body for r in upstream.seen] == [body]


async def _post_bare(pep: RunningPep, path: str, body: bytes, content_type: str | None) -> Reply:
    """A POST with exactly this Content-Type, or none at all (aiohttp would add application/octet-stream)."""
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(pep.url + path, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as r,
    ):
        return Reply(r.status, r.headers, await asyncio.wait_for(r.read(), 5))


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/v1/files", b"purpose=batch&_method=DELETE", None),
        ("/v1/batches", b"a=1&%5Fmethod=PUT", "application/x-www-form-urlencoded"),
        ("/v1/chat/completions", b'{"model":"gpt-4o-mini","x":"&_method=DELETE&"}', None),
    ],
    ids=["unread-no-content-type", "unread-urlencoded", "read-no-content-type"],
)
async def test_a_method_override_field_in_a_model_call_is_ambiguous(
    mcp_pep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    path: str,
    body: bytes,
    content_type: str | None,
) -> None:
    """A body a framework may read as a form (no Content-Type, or urlencoded) must not carry `_method`: Rails
    would serve the POST the PEP decided as a DELETE. Unread endpoints are read for that field alone."""
    reply = await _post_bare(mcp_pep, path, body, content_type)
    assert reply.status == 403
    assert_denied(reply, "request_ambiguous")
    assert fault_pdp.requests == []
    assert upstream.seen == []


async def test_an_unread_model_call_with_a_form_body_is_forwarded_as_read(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    body = b"purpose=batch&method=x"
    reply = await _post_bare(mcp_pep, "/v1/files", body, None)
    assert reply.status == 200
    facts = policy_input(fault_pdp)["model"]
    assert (facts["endpoint"], facts["read"], facts["name"]) == ("files", False, None)
    assert [(r.method, r.target, r.body) for r in upstream.seen] == [("POST", "/v1/files", body)]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", "/v1/files")])
async def test_other_openai_requests_are_decided_without_reading_the_body(
    mcp_pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, method: str, path: str
) -> None:
    """A GET has HTTP facts only; a POST the PEP cannot read (a file upload) is an unread model call."""
    body = None if method == "GET" else b"not json at all"
    reply = await send(mcp_pep, path, body, method=method)
    assert reply.status == 200
    doc = policy_input(fault_pdp)
    if method == "GET":
        assert "model" not in doc
    else:
        assert (doc["model"]["endpoint"], doc["model"]["read"], doc["model"]["name"]) == ("files", False, None)
    assert doc["request"]["method"] == method
    assert doc["route"]["protocol"] == "openai"
    assert [(r.method, r.target) for r in upstream.seen] == [(method, path)]
    fault_pdp.set("deny")
    reply = await send(mcp_pep, path, body, method=method)
    assert_denied(reply, "policy_denied")
    assert reply.headers["x-should-retry"] == "false"
    assert len(upstream.seen) == 1
