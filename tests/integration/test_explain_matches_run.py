"""`pep explain` says what `pep run` does (issue 15, item 3): both drive the one admission pipeline
(pep/admission.py), and this property holds them to it. For generated requests (odd path segments, hosts,
absolute forms, override headers, bodies for mcp, openai and http routes, bearer tokens, CONNECT), explain's
decision and reason equal the decision log line of the same request sent on a socket to a running PEP, and where
both asked the PDP, they asked it with the same document.

Both run in this process against the same OPA-shaped PDP stub, on an event loop of their own in a thread (the
hypothesis test itself is synchronous). Each request is built once, as explain reads it, and sent byte for byte
as the wire form of that request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.oracles import examples
from pep import explain
from pep.app import Server
from pep.config import Config, load
from tests.support.policy_pdp import PolicyPdp
from tests.support.raw_client import RawClient
from tests.support.spiffe_pki import JwtAuthority
from tests.support.upstream import RecordingUpstream

T = TypeVar("T")
ISSUER = "https://issuer.test"
AUDIENCE = "failclosed-pep"


class Policy(PolicyPdp):
    """Allows unless the request names something to deny: a `deny` segment, the `shell` tool, a `bad` model."""

    def decide(self, doc: dict[str, Any]) -> Any:
        if "deny" in doc["request"]["path"]:
            return {"allow": False, "reason": "path"}
        if (doc.get("mcp") or {}).get("name") == "shell":
            return False
        if "bad" in str((doc.get("model") or {}).get("name")):
            return False
        return {"allow": True}


class Stack:
    """The PDP stub, an upstream and a PEP, on a loop in a thread of their own."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.authority = JwtAuthority(tmp / "jwks.json", ISSUER, AUDIENCE)
        self.pdp = Policy()
        self.upstream = RecordingUpstream()
        self.log = tmp / "decisions.jsonl"
        self.offset = 0
        self.server: Server | None = None
        self.config: Config | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        await self.pdp.start()
        await self.upstream.start()
        secret = self.tmp / "secret"
        secret.write_text("s3cret\n")
        up = self.upstream.url
        routes: list[dict[str, Any]] = [
            {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": f"{up}/api/", "strip_prefix": True},
            {"name": "secure", "match": {"path_prefix": "/secure"}, "upstream": up, "require_identity": True},
            {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": f"{up}/mcp", "protocol": "mcp"},
            {"name": "models", "match": {"path_prefix": "/v1"}, "upstream": up, "protocol": "openai"},
            {"name": "params", "match": {"path_prefix": "/params"}, "upstream": up, "allow_path_parameters": True},
            {
                "name": "cred",
                "match": {"path_prefix": "/cred"},
                "upstream": up,
                "credential": {"header": "x-api-key", "format": "{}", "value_file": str(secret)},
            },
            {"name": "egress", "match": {"host": "api.example.com"}, "upstream": up},
            {"name": "tunnel", "match": {"host": f"127.0.0.1:{self.upstream.port}"}, "upstream": up, "tunnel": True},
        ]
        for route in routes[2:4]:
            route["max_body_bytes"] = 4096
        raw = {
            "version": 1,
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "identity": {
                "workload": "spiffe://test/agent",
                "agent_header": "x-agent-id",
                "jwt": self.authority.jwt_config(),
            },
            "pdp": {"kind": "opa", "url": self.pdp.url, "timeout_ms": 2000, "retries": 0},
            "decision_log": {"sink": "file", "path": str(self.log)},
            "routes": routes,
        }
        path = self.tmp / "pep.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.config = load(path)
        self.server = Server(self.config)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.upstream.stop()
        await self.pdp.stop()

    async def entry(self, request_id: str) -> dict[str, Any]:
        """The decision log line of `request_id` (each request is decided once)."""
        assert self.server is not None
        await self.server.decision_log.flush()
        data = self.log.read_bytes()
        lines = [orjson.loads(line) for line in data[self.offset :].splitlines()]
        self.offset = len(data)
        found: list[dict[str, Any]] = [e for e in lines if e["request_id"] == request_id]
        assert len(found) == 1, lines
        return found[0]

    async def send(self, method: str, target: str, fields: list[tuple[str, str]], body: bytes | None) -> None:
        """A request on the wire, byte for byte: the target and fields as given, the body with a Content-Length."""
        assert self.server is not None
        assert self.server.proxy_address is not None
        lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields)]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        wire = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
        client = await RawClient.open(self.server.proxy_address.port)
        try:
            await client.send(wire)
            answer = await client.answer(no_body=method in ("HEAD", "CONNECT"))
            assert answer is not None, wire
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("explain-run"))
    s.run(s.start())
    try:
        yield s
    finally:
        s.run(s.stop())
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(5)
        s.loop.close()


# Mostly plain segments, so that most requests get as far as the PDP; odd ones (ambiguous to some reader) often.
SEGMENTS = st.one_of(
    st.sampled_from(["x", "deny", "chat", "completions", "search", "responses", "A%20b"]),
    st.sampled_from(["x", "deny", "chat", "completions", "search", "responses", "A%20b"]),
    st.sampled_from(["a;b", "%3B", "..", ".", "%2e%2e", "%2F", "%5C", ""]),
)
PREFIXES = st.sampled_from(["/tools", "/secure", "/mcp", "/v1", "/params", "/cred", "/other", ""])
QUERIES = st.sampled_from(["", "", "?q=1", "?_method=DELETE", "?a=1&a=2", "?x=%2e%2e"])
MCP_CALLS = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"q":"x"}}}',
    b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shell","arguments":{}}}',
    b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"ping"}]',
    b'{"jsonrpc":"2.0","id":3,"result":{}}',
    b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"search","Name":"shell"}}',
]
MODEL_CALLS = [
    b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"bad-model","messages":[]}',
    b'{"model":"gpt-4o","stream":true,"tools":[{"type":"function","function":{"name":"f"}}]}',
]
BODIES = st.one_of(
    st.none(),
    st.sampled_from([*MCP_CALLS, *MODEL_CALLS, b"a=1", b"a=1&_method=DELETE", b"{not json", b"x" * 5000, b""]),
)
PLAIN_FIELDS = [
    ("x-agent-id", "a"),
    ("Content-Type", "application/json"),
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("Accept", "application/json, text/event-stream"),
    ("Cookie", "session=1"),
    ("MCP-Protocol-Version", "2025-06-18"),
]
ODD_FIELDS = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Original-URL", "/tools/admin"),
    ("x-agent-id", "b"),
    ("Mcp-Method", "tools/call"),
    ("Content-Encoding", "gzip"),
    ("Last-Event-ID", "e-1"),
]
EXTRA = st.lists(
    st.one_of(st.sampled_from(PLAIN_FIELDS), st.sampled_from(PLAIN_FIELDS), st.sampled_from(ODD_FIELDS)),
    max_size=3,
)
HOSTS = st.one_of(
    st.none(), st.none(), st.sampled_from(["api.example.com", "API.example.com:80", "other.example:1234", "pep.test"])
)


@st.composite
def requests(draw: st.DrawFn, stack: Stack) -> tuple[str, str, list[tuple[str, str]], bytes | None]:
    """(method, URL as explain takes it and as the request target, fields, body)."""
    up = f"127.0.0.1:{stack.upstream.port}"
    if draw(st.integers(0, 15)) == 0:
        target = draw(st.sampled_from([up, "api.example.com:443", "127.0.0.1:1"]))
        return "CONNECT", target, [("Host", target), ("X-Request-ID", draw(st.uuids()).hex)], None
    path = draw(PREFIXES) + "".join("/" + s for s in draw(st.lists(SEGMENTS, max_size=2))) or "/"
    url = path + draw(QUERIES)
    if draw(st.integers(0, 3)) == 0:
        url = f"http://{draw(st.sampled_from(['api.example.com', '127.0.0.1:8080', 'API.example.com:80']))}{url}"
    body = draw(BODIES)
    method = draw(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH"]))
    fields = draw(EXTRA)
    host = draw(HOSTS)
    # Host as explain defaults it: the URL's authority, or the listener's for a path.
    fields.append(("Host", host or (url.split("/")[2] if url.startswith("http://") else "pep.test")))
    token = draw(st.sampled_from([None, None, "valid", "forged", "garbage"]))
    if token is not None:
        if token == "valid":
            value = stack.authority.mint("user-1", azp="bot")
        elif token == "forged":
            value = stack.authority.forger().mint("user-1")
        else:
            value = "not.a.token"
        fields.append(("Authorization", f"Bearer {value}"))
    fields.append(("X-Request-ID", draw(st.uuids()).hex))
    return method, url, fields, body


def _without_time(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "request": {**document["request"], "time": None}}


@settings(
    max_examples=examples(120),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_explain_says_what_run_does(stack: Stack, data: st.DataObject) -> None:
    method, url, fields, body = data.draw(requests(stack))
    assert stack.config is not None
    arguments = [f"{name}: {value}" for name, value in fields]
    request = explain.parse_request(url, method, arguments, BytesIO(body) if body is not None else None, "pep.test")
    report = stack.run(explain.explain(stack.config, request))
    asked = len(stack.pdp.inputs)
    stack.run(stack.send(method, url, fields, body))
    rid = fields[-1][1]
    entry = stack.run(stack.entry(rid))
    assert (report["decision"], report["reason"]) == (entry["decision"], entry["reason"]), (report, entry)
    assert report["route"] == (entry["route"] if entry["route"] != "_unmatched" else None)
    if report["document"] is not None and entry["attempts"]:
        seen = [d for d in stack.pdp.inputs[asked:] if d["request"]["id"] == rid]
        assert seen, "the running PEP asked the PDP about another request"
        assert _without_time(seen[0]) == _without_time(report["document"])
