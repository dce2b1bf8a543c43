"""The proxy on real loopback sockets: routing, exact forwarding, streaming both ways, header hygiene,
the policy input document, client disconnects, pooling, and failures after an allow.

Every test runs a real PEP (the `make_pep` fixture) in front of the recording upstream and the fault PDP, and
talks to it with aiohttp or httpx over TCP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.loopback import refused_port
from tests.support.observe import metric
from tests.support.raw_upstream import Action, RawUpstream
from tests.support.upstream import RecordingUpstream

Mutate = Callable[[dict[str, Any]], None]
MakePep = Callable[..., Any]


# --- helpers ------------------------------------------------------------------------------------------------


def strip(cfg: dict[str, Any]) -> None:
    """The default route with `strip_prefix: true`, so `/tools/sse` reaches the upstream's `/sse` behaviour."""
    cfg["routes"][0]["strip_prefix"] = True


def route_opts(**opts: Any) -> Mutate:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["routes"][0].update(opts)

    return mutate


def policy_input(pdp: FaultPdp, index: int = -1) -> dict[str, Any]:
    body = pdp.requests[index].body
    assert isinstance(body, dict)
    doc = body["input"]
    assert isinstance(doc, dict)
    return doc


async def scrape(pep: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def wait_for(predicate: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Poll `predicate` every 20 ms until it holds (True) or `seconds` pass (False)."""
    for _ in range(int(seconds / 0.02) + 1):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def raw(url: str) -> URL:
    """A URL sent exactly as written: no requoting, no normalisation by the client."""
    return URL(url, encoded=True)


# --- routing and exact forwarding ------------------------------------------------------------------------------


async def test_no_route_is_denied_and_counted_as_unmatched(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/nothing", "/toolsx", "/"):
            async with s.get(pep.url + path) as r:
                assert r.status == 403
                assert r.headers["x-pep-decision"] == "deny"
                assert r.headers["x-pep-reason"] == "no_route"
                body = await r.json()
                assert body["error"]["code"] == "access_denied"
                assert body["error"]["reason"] == "no_route"
                assert body["error"]["request_id"] == r.headers["x-request-id"]
    assert upstream.seen == []
    assert fault_pdp.requests == []
    text = await scrape(pep)
    assert metric(text, "pep_decisions_total", route="_unmatched", decision="deny", reason="no_route") == 3
    assert metric(text, "pep_decisions_total", route="tools") == 0
    entries = await pep.log_entries()
    assert [(e["route"], e["reason"]) for e in entries] == [("_unmatched", "no_route")] * 3


async def test_longest_prefix_wins_on_whole_segments(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    def two_routes(cfg: dict[str, Any]) -> None:
        cfg["routes"].append(
            {
                "name": "deep",
                "match": {"path_prefix": "/tools/deep"},
                "upstream": upstream.url + "/deep-up",
                "strip_prefix": True,
            }
        )

    pep: RunningPep = await make_pep(mutate=two_routes)
    cases = [
        ("/tools/deep/x", "deep", "/deep-up/x"),
        ("/tools/deep", "deep", "/deep-up"),
        ("/tools/deeper", "tools", "/tools/deeper"),
        ("/tools/x", "tools", "/tools/x"),
    ]
    async with aiohttp.ClientSession() as s:
        for path, route, target in cases:
            async with s.get(pep.url + path) as r:
                assert r.status == 200, path
            assert upstream.seen[-1].target == target, path
            assert policy_input(fault_pdp)["route"]["name"] == route, path
    entries = await pep.log_entries()
    assert [e["route"] for e in entries] == [c[1] for c in cases]


async def test_strip_prefix_joins_with_exactly_one_slash(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    def routes(cfg: dict[str, Any]) -> None:
        cfg["routes"] = [
            {
                "name": "api",
                "match": {"path_prefix": "/tools"},
                "upstream": upstream.url + "/api/",
                "strip_prefix": True,
            },
            {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": upstream.url + "/mcp", "strip_prefix": True},
            {"name": "slash", "match": {"path_prefix": "/s/"}, "upstream": upstream.url + "/up", "strip_prefix": True},
        ]

    pep: RunningPep = await make_pep(mutate=routes)
    cases = [
        ("/tools/x", "/api/x"),
        ("/tools/x/y/", "/api/x/y/"),
        ("/tools", "/api/"),  # empty remainder: the upstream URL exactly as written
        ("/tools?q=1", "/api/?q=1"),
        ("/mcp", "/mcp"),  # no slash added
        ("/mcp/", "/mcp/"),
        ("/mcp/tools/call", "/mcp/tools/call"),
        ("/s/a", "/up/a"),  # prefix ends in "/", upstream does not: still exactly one slash
    ]
    async with aiohttp.ClientSession() as s:
        for path, target in cases:
            async with s.get(raw(pep.url + path)) as r:
                assert r.status == 200, path
            assert upstream.seen[-1].target == target, path
            assert policy_input(fault_pdp)["route"]["upstream_url"] == upstream.url + target, path


async def test_path_and_query_are_forwarded_byte_for_byte(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    path = "/tools/a%20b/c%2Bd/~user/%C3%A9"
    query = "a=%2F&b=%20&c&d=1&d=2&e=x+y&f=%2e%2e"
    async with aiohttp.ClientSession() as s, s.get(raw(f"{pep.url}{path}?{query}")) as r:
        assert r.status == 200
        echo = await r.json()
    assert upstream.seen[-1].target == f"{path}?{query}"
    assert echo["target"] == f"{path}?{query}"
    doc = policy_input(fault_pdp)
    assert doc["request"]["path"] == path
    assert doc["route"]["upstream_url"] == f"{upstream.url}{path}?{query}"
    assert doc["request"]["query"] == {
        "a": ["/"],
        "b": [" "],
        "c": [""],
        "d": ["1", "2"],
        "e": ["x y"],
        "f": [".."],
    }
    entries = await pep.log_entries()
    assert entries[-1]["path"] == path


# --- request bodies ---------------------------------------------------------------------------------------------


async def test_large_body_with_content_length_arrives_intact(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    upstream.client_max_size = 16 * 1024 * 1024
    body = bytes(range(256)) * (5_000_000 // 256) + b"end"
    async with aiohttp.ClientSession() as s, s.post(pep.url + "/tools/upload", data=body) as r:
        assert r.status == 200
        echo = await r.json()
    got = upstream.seen[-1]
    assert got.body == body
    assert got.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in got.headers
    assert echo["body_len"] == len(body)
    assert policy_input(fault_pdp)["request"]["body_bytes"] == len(body)


async def _chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield bytes([65 + i % 26]) * size
        await asyncio.sleep(0)


async def test_chunked_body_arrives_intact(pep: RunningPep, upstream: RecordingUpstream) -> None:
    async with aiohttp.ClientSession() as s, s.post(pep.url + "/tools/upload", data=_chunks(40, 10_000)) as r:
        assert r.status == 200
    got = upstream.seen[-1]
    assert got.body == b"".join(bytes([65 + i % 26]) * 10_000 for i in range(40))
    assert got.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in got.headers


async def test_content_length_over_the_limit_is_denied_before_the_pdp(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=route_opts(max_body_bytes=1000))
    async with aiohttp.ClientSession() as s:
        async with s.post(pep.url + "/tools/x", data=b"a" * 1001) as r:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == "body_too_large"
        assert fault_pdp.requests == []
        assert upstream.seen == []
        # At the limit is fine.
        async with s.post(pep.url + "/tools/x", data=b"a" * 1000) as r:
            assert r.status == 200
    assert [x.body for x in upstream.seen] == [b"a" * 1000]
    entries = await pep.log_entries()
    assert [(e["decision"], e["reason"]) for e in entries] == [("deny", "body_too_large"), ("allow", "allowed")]


async def test_chunked_body_over_the_limit_is_cut_with_413(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=route_opts(max_body_bytes=2500))
    async with aiohttp.ClientSession() as s:
        async with s.post(pep.url + "/tools/x", data=_chunks(5, 1000)) as r:
            assert r.status == 413
            assert r.headers["x-pep-decision"] == "allow"
            assert r.headers["x-pep-upstream-error"] == "body_limit"
            assert (await r.json())["error"]["code"] == "body_too_large"
        assert upstream.seen == []  # the upstream never got a complete request
        async with s.post(pep.url + "/tools/x", data=_chunks(2, 1000)) as r:
            assert r.status == 200
    assert [len(x.body) for x in upstream.seen] == [2000]
    text = await scrape(pep)
    assert metric(text, "pep_upstream_failures_total", route="tools", kind="body_limit") == 1


# --- response streaming -----------------------------------------------------------------------------------------


async def test_large_response_streams_through_intact(make_pep: MakePep) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    size = 20_000_000
    received = 0
    async with aiohttp.ClientSession() as s, s.get(pep.url + f"/tools/big?bytes={size}") as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            assert chunk.count(b"x") == len(chunk)
            received += len(chunk)
    assert received == size


async def test_server_sent_events_arrive_one_by_one(make_pep: MakePep) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    n, gap = 5, 0.2
    arrivals: list[float] = []
    events: list[bytes] = []
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.get(pep.url + f"/tools/sse?n={n}&gap_ms={int(gap * 1000)}") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            for _ in range(n):
                events.append(await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5))
                arrivals.append(time.monotonic())
            assert await asyncio.wait_for(r.content.read(), 5) == b""
        ended = time.monotonic()
    assert events == [f"id: {i}\ndata: event {i}\n\n".encode() for i in range(n)]
    # Each event is relayed when written, not when the stream ends. Bounds are loose (correctness, not speed),
    # and the median gap tolerates one stall of the shared event loop bunching two events together.
    assert arrivals[0] - started < 0.5 * (ended - started)
    assert arrivals[-1] - arrivals[0] > gap * (n - 1) * 0.5
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] > gap * 0.4, gaps


# --- header hygiene ---------------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_removed_both_ways(pep: RunningPep, upstream: RecordingUpstream) -> None:
    headers = {
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "Trailer": "X-Checksum",
        "X-Kept": "kept",
    }
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers=headers) as r:
        assert r.status == 200
        await r.read()
        assert r.headers.get("X-Upstream") == "yes"
        assert "Keep-Alive" not in r.headers
        assert "X-Upstream-Secret" not in r.headers
        assert "x-upstream-secret" not in r.headers.get("Connection", "").lower()
    sent = upstream.seen[-1].headers
    for name in (
        "Connection",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Trailer",
        "X-Secret",
    ):
        assert name not in sent, name
    assert sent["X-Kept"] == "kept"


async def test_forwarding_headers_are_set_by_the_pep_alone(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    headers = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
        "X-PEP-Decision-ID": "forged-decision",
    }
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers=headers) as r:
        assert r.status == 200
    sent = upstream.seen[-1].headers
    assert sent.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert sent.getall("X-Forwarded-Proto") == ["http"]
    assert sent.getall("X-Forwarded-Host") == [f"127.0.0.1:{pep.port}"]
    assert "Forwarded" not in sent
    entries = await pep.log_entries()
    assert sent.getall("X-PEP-Decision-ID") == [entries[-1]["decision_id"]]
    assert entries[-1]["decision_id"] != "forged-decision"
    shown = policy_input(fault_pdp)["request"]["headers"]
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-pep-decision-id"):
        assert name not in shown, name


@pytest.mark.parametrize(
    ("sent_id", "kept"),
    [
        ("abc-123_~!", True),
        ("r" * 200, True),
        ("!~", True),
        ("r" * 201, False),
        ("has space", False),
        ("", False),
        ("caf\u00e9", False),
    ],
)
async def test_request_id_is_kept_only_when_valid(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, sent_id: str, kept: bool
) -> None:
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers={"X-Request-ID": sent_id}) as r:
        assert r.status == 200
    upstream_id = upstream.seen[-1].headers.getall("X-Request-ID")
    assert len(upstream_id) == 1
    rid = upstream_id[0]
    if kept:
        assert rid == sent_id
    else:
        assert rid != sent_id
        assert 1 <= len(rid) <= 200
        assert rid.isascii()
        assert rid.isprintable()
        assert " " not in rid
    assert policy_input(fault_pdp)["request"]["id"] == rid
    entries = await pep.log_entries()
    assert entries[-1]["request_id"] == rid


async def test_request_id_on_a_denial_matches_the_log(pep: RunningPep, fault_pdp: FaultPdp) -> None:
    fault_pdp.set("deny")
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/tools/x", headers={"X-Request-ID": "deny-me-1"}) as r:
            assert r.status == 403
            assert r.headers["x-request-id"] == "deny-me-1"
        async with s.get(pep.url + "/tools/x", headers={"X-Request-ID": "bad id"}) as r:
            assert r.status == 403
            replaced = r.headers["x-request-id"]
            assert (await r.json())["error"]["request_id"] == replaced
    entries = await pep.log_entries()
    assert [e["request_id"] for e in entries] == ["deny-me-1", replaced]
    assert policy_input(fault_pdp)["request"]["id"] == replaced


CREDENTIALS = {
    "Authorization": "Bearer caller-secret",
    "Cookie": "session=caller-secret",
    "Proxy-Authorization": "Basic caller-secret",
}


async def test_caller_credentials_are_hidden_from_the_pdp_and_not_forwarded(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers=CREDENTIALS) as r:
        assert r.status == 200
    sent = upstream.seen[-1].headers
    for name in CREDENTIALS:
        assert name not in sent, name
    shown = policy_input(fault_pdp)["request"]["headers"]
    for name in CREDENTIALS:
        assert name.lower() not in shown, name
    assert b"caller-secret" not in orjson.dumps(policy_input(fault_pdp))
    assert len(await pep.log_entries()) == 1
    assert b"caller-secret" not in pep.log_path.read_bytes()


async def test_keep_caller_credentials_forwards_them_but_still_hides_them_from_the_pdp(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=route_opts(keep_caller_credentials=True))
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers=CREDENTIALS) as r:
        assert r.status == 200
    sent = upstream.seen[-1].headers
    assert sent["Authorization"] == CREDENTIALS["Authorization"]
    assert sent["Cookie"] == CREDENTIALS["Cookie"]
    assert "Proxy-Authorization" not in sent  # hop-by-hop: it is for this proxy, never the upstream
    assert b"caller-secret" not in orjson.dumps(policy_input(fault_pdp))


# --- the policy input document ----------------------------------------------------------------------------------


async def test_a_repeated_agent_header_is_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    # The PDP would decide for one agent while the upstream sees both: refuse instead.
    headers = CIMultiDict([("X-Agent-ID", "agent-1"), ("X-Agent-ID", "agent-2")])
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers=headers) as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == "request_ambiguous"
    assert fault_pdp.requests == []
    assert upstream.seen == []


async def test_policy_input_has_the_pep_v1_shape(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    body = b'{"hello": "world"}'
    headers = {"X-Agent-ID": "agent-7", "User-Agent": "test-agent/1.0", "X-Custom": "A", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as s:
        async with s.post(pep.url + "/tools/run?a=1&a=2&b", data=body, headers=headers) as r:
            assert r.status == 200
        doc = policy_input(fault_pdp)
        async with s.get(pep.url + "/tools/other") as r:
            assert r.status == 200
        anonymous = policy_input(fault_pdp)

    assert set(doc) == {"version", "request", "route", "subject"}  # no mcp/model/body on an http route
    assert doc["version"] == "pep/v1"
    req = doc["request"]
    assert set(req) == {"id", "time", "method", "scheme", "host", "path", "query", "headers", "body_bytes"}
    assert isinstance(req["id"], str)
    assert req["id"]
    stamp = datetime.fromisoformat(req["time"].replace("Z", "+00:00"))
    assert stamp.utcoffset() is not None
    assert req["method"] == "POST"
    assert req["scheme"] == "http"
    assert req["host"] == f"127.0.0.1:{pep.port}"
    assert req["path"] == "/tools/run"
    assert req["query"] == {"a": ["1", "2"], "b": [""]}
    assert req["body_bytes"] == len(body)
    shown = req["headers"]
    assert all(name == name.lower() for name in shown)
    assert shown["user-agent"] == "test-agent/1.0"
    assert shown["x-custom"] == "A"
    assert shown["x-agent-id"] == "agent-7"
    assert doc["route"] == {
        "name": "tools",
        "protocol": "http",
        "upstream": upstream.url,
        "upstream_url": f"{upstream.url}/tools/run?a=1&a=2&b",
    }
    assert doc["subject"] == {"workload": "spiffe://test/agent", "agent": "agent-7"}
    assert anonymous["subject"] == {"workload": "spiffe://test/agent", "agent": None}
    assert anonymous["request"]["body_bytes"] == 0
    assert anonymous["request"]["id"] != req["id"]
    # The PDP is asked with the OPA shape: POST {url} {"input": DOC}.
    assert fault_pdp.requests[-1].path == "/v1/data/pep/authz"
    entries = await pep.log_entries()
    assert entries[0]["subject"] == doc["subject"]
    assert entries[0]["request_id"] == req["id"]


# --- the client goes away ---------------------------------------------------------------------------------------


async def test_client_closing_a_stream_cancels_the_upstream_request(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    async with aiohttp.ClientSession() as s:
        r = await s.get(pep.url + "/tools/sse?n=100&gap_ms=100")
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b"id: 0\ndata: event 0\n\n"
        r.close()  # drops the connection mid-stream
    assert await wait_for(lambda: upstream.disconnects >= 1, 2.0), "the upstream stream was not cancelled"
    assert upstream.disconnects == 1
    assert len(upstream.seen) == 1
    assert await wait_for(lambda: _in_flight_zero(pep), 2.0)


def _in_flight_zero(pep: RunningPep) -> bool:
    # The proxy's in-flight gauge is read from the metrics registry (no HTTP round trip inside a predicate).
    value = pep.server.metrics.registry.get_sample_value("pep_requests_in_flight")
    return value == 0


async def test_client_timeout_cancels_a_hanging_upstream_request(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(pep.url + "/tools/hang") as r:
                await r.read()
    assert time.monotonic() - started < 5
    assert await wait_for(lambda: upstream.disconnects >= 1, 2.0), "the hanging upstream request was not cancelled"
    assert upstream.disconnects == 1
    assert [x.target for x in upstream.seen] == ["/hang"]
    assert await wait_for(lambda: _in_flight_zero(pep), 2.0)


async def test_client_leaving_while_the_pdp_decides_means_nothing_is_forwarded(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    fault_pdp.set(Mode(delay=0.2))  # an allow, but late
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.05)) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(pep.url + "/tools/x") as r:
                await r.read()
    assert await wait_for(lambda: len(fault_pdp.requests) == 1, 2.0)
    await asyncio.sleep(0.4)  # the PDP's allow has arrived by now (or the question was abandoned)
    assert upstream.seen == []
    assert await wait_for(lambda: _in_flight_zero(pep), 2.0)


# --- pooling ----------------------------------------------------------------------------------------------------


async def test_upstream_connections_are_pooled(pep: RunningPep, upstream: RecordingUpstream) -> None:
    # A new client connection per request: any reuse seen by the upstream is the PEP's own pool.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for i in range(20):
            async with s.get(pep.url + f"/tools/n{i}") as r:
                assert r.status == 200
                await r.read()
    assert len(upstream.seen) == 20
    assert 1 <= len(upstream.connections) <= 2


# --- failures after an allow ------------------------------------------------------------------------------------


async def test_upstream_down_is_502_connect(make_pep: MakePep) -> None:
    with refused_port() as port:  # refused for the whole test
        pep: RunningPep = await make_pep(mutate=route_opts(upstream=f"http://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x", headers={"X-Request-ID": "down-1"}) as r:
            assert r.status == 502
            assert r.headers["x-pep-decision"] == "allow"
            assert r.headers["x-pep-upstream-error"] == "connect"
            assert r.headers["x-request-id"] == "down-1"
            assert (await r.json())["error"]["code"] == "upstream_unavailable"
        entries = await pep.log_entries()
        assert r.headers["x-pep-decision-id"] == entries[-1]["decision_id"]
        text = await scrape(pep)
        assert metric(text, "pep_upstream_failures_total", route="tools", kind="connect") == 1
        assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 1
        assert metric(text, "pep_decisions_total", decision="deny") == 0


async def test_upstream_timeout_is_504(make_pep: MakePep, upstream: RecordingUpstream) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        strip(cfg)
        cfg["routes"][0]["timeout_ms"] = 200

    pep: RunningPep = await make_pep(mutate=mutate)
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/hang") as r:
        assert r.status == 504
        assert r.headers["x-pep-decision"] == "allow"
        assert r.headers["x-pep-upstream-error"] == "timeout"
        assert (await r.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 5
    text = await scrape(pep)
    assert metric(text, "pep_upstream_failures_total", route="tools", kind="timeout") == 1
    assert metric(text, "pep_decisions_total", decision="deny") == 0


async def test_a_small_response_cut_mid_body_is_a_clean_502(make_pep: MakePep) -> None:
    """Up to 64 KiB with a Content-Length is read whole before anything is sent: a cut is answered 502 `reset`."""
    pep: RunningPep = await make_pep(mutate=strip)
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/reset?length=5000") as r:
        assert r.status == 502
        assert r.headers["x-pep-upstream-error"] == "reset"
        assert r.headers["x-pep-decision"] == "allow"
    assert metric(await scrape(pep), "pep_upstream_failures_total", route="tools", kind="reset") == 1


async def test_upstream_reset_mid_body_reaches_the_client_as_a_truncated_response(make_pep: MakePep) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    body = b""
    failed = False
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(pep.url + "/tools/reset") as r:
                assert r.status == 200
                body = await r.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            failed = True
    # Never a clean, complete 200: the upstream announced 100000 bytes and sent 1000.
    assert failed or len(body) < 100_000
    text = await scrape(pep)
    assert metric(text, "pep_decisions_total", decision="deny") == 0
    for _ in range(40):  # the handler counts the cut after the client has already seen it
        text = await scrape(pep)
        if metric(text, "pep_upstream_failures_total", route="tools", kind="reset") == 1:
            break
        await asyncio.sleep(0.05)
    assert metric(text, "pep_upstream_failures_total", route="tools", kind="reset") == 1
    # The PEP itself stays healthy for the next request.
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("HEAD", None), ("DELETE", None), ("PUT", b"payload"), ("POST", b"payload")]
)
async def test_upstream_dropping_the_connection_is_502_and_the_request_is_sent_once(
    make_pep: MakePep, upstream: RecordingUpstream, method: str, body: bytes | None
) -> None:
    """One allow, one delivery: the PEP never resends an allowed request the upstream may have acted on."""
    pep: RunningPep = await make_pep(mutate=strip)
    async with aiohttp.ClientSession() as s, s.request(method, pep.url + "/tools/drop", data=body) as r:
        assert r.status == 502
        assert r.headers["x-pep-decision"] == "allow"
        assert r.headers["x-pep-upstream-error"] == "reset"
    await asyncio.sleep(0.05)
    assert [(x.method, x.target) for x in upstream.seen] == [(method, "/drop")]
    entries = await pep.log_entries()
    assert [e["decision"] for e in entries] == ["allow"]
    text = await scrape(pep)
    assert metric(text, "pep_upstream_failures_total", route="tools", kind="reset") == 1
    assert metric(text, "pep_decisions_total", decision="deny") == 0


async def test_upstream_error_status_is_passed_through(make_pep: MakePep) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/tools/status/503") as r:
            assert r.status == 503
            assert await r.read() == b"status"
            assert "x-pep-upstream-error" not in r.headers
            assert "x-pep-reason" not in r.headers
        async with s.get(pep.url + "/tools/status/404") as r:
            assert r.status == 404
        async with s.get(pep.url + "/tools/x") as r:
            assert r.status == 200
    text = await scrape(pep)
    assert metric(text, "pep_upstream_responses_total", route="tools", code_class="5xx") == 1
    assert metric(text, "pep_upstream_responses_total", route="tools", code_class="4xx") == 1
    assert metric(text, "pep_upstream_responses_total", route="tools", code_class="2xx") == 1
    assert metric(text, "pep_upstream_failures_total") == 0
    assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 3
    assert metric(text, "pep_decisions_total", decision="deny") == 0
    assert metric(text, "pep_upstream_request_duration_seconds_count", route="tools") == 3


async def test_the_peps_own_answer_fields_never_come_from_the_upstream(make_pep: MakePep) -> None:
    """`x-pep-decision`, `x-pep-reason` and `x-pep-upstream-error` say what the PEP did: an upstream (a third-party
    API through HTTP_PROXY, an MCP server the PEP guards the agent from) that sends them would pass its own answer
    off as a PEP denial or a failed connection, and an `x-pep-decision-id` as a decision the PEP never made."""
    forged = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nX-PEP-Decision: deny\r\n"
        b"x-pep-reason: policy_denied\r\nX-Pep-Upstream-Error: connect\r\nX-PEP-Decision-ID: forged\r\n"
        b"X-Kept: 1\r\n\r\nno"
    )
    up = RawUpstream(lambda _seen: Action(forged))
    await up.start()
    try:
        pep: RunningPep = await make_pep(mutate=route_opts(upstream=f"http://127.0.0.1:{up.port}"))
        async with httpx.AsyncClient(base_url=pep.url) as client:
            r = await client.get("/tools/x")
    finally:
        await up.stop()
    assert (r.status_code, r.text, r.headers["x-kept"]) == (503, "no", "1")
    for name in ("x-pep-decision", "x-pep-reason", "x-pep-upstream-error", "x-pep-decision-id"):
        assert name not in r.headers, name


async def test_head_and_204_pass_through_and_keep_the_connection_usable(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    # One client connection for all three, so a framing mistake would corrupt the next response.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.head(pep.url + "/tools/x") as r:
            assert r.status == 200
            assert await r.read() == b""
            assert r.headers.get("X-Upstream") == "yes"
        async with s.get(pep.url + "/tools/status/204") as r:
            assert r.status == 204
            assert await r.read() == b""
        async with s.get(pep.url + "/tools/after") as r:
            assert r.status == 200
            assert (await r.json())["target"] == "/after"
    assert [(x.method, x.target) for x in upstream.seen] == [("HEAD", "/x"), ("GET", "/status/204"), ("GET", "/after")]


# --- httpx, including forward-proxy (absolute-form) requests ----------------------------------------------------


async def test_httpx_client_streams_through(make_pep: MakePep, upstream: RecordingUpstream) -> None:
    pep: RunningPep = await make_pep(mutate=strip)
    async with httpx.AsyncClient(base_url=pep.url, timeout=10) as client:
        r = await client.post("/tools/echo", content=b"x" * 100_000, headers={"X-Request-ID": "httpx-1"})
        assert r.status_code == 200
        assert r.json()["body_len"] == 100_000
        events: list[str] = []
        async with client.stream("GET", "/tools/sse?n=3&gap_ms=50") as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    events.append(line)
    assert events == ["data: event 0", "data: event 1", "data: event 2"]
    assert upstream.seen[0].headers["X-Request-ID"] == "httpx-1"


async def test_httpx_absolute_form_matching_host_is_allowed(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        r = await client.get(f"{pep.url}/tools/x?q=1")
    assert r.status_code == 200
    assert [x.target for x in upstream.seen] == ["/tools/x?q=1"]
    doc = policy_input(fault_pdp)
    assert doc["request"]["path"] == "/tools/x"
    assert doc["request"]["host"] == f"127.0.0.1:{pep.port}"
    assert doc["route"]["upstream_url"] == f"{upstream.url}/tools/x?q=1"


async def test_httpx_absolute_form_disagreeing_with_host_is_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        r = await client.get("http://evil.example/tools/x", headers={"Host": f"127.0.0.1:{pep.port}"})
        assert r.status_code == 403
        assert r.headers["x-pep-reason"] == "request_ambiguous"
        r = await client.get(
            f"http://127.0.0.1:{pep.port + 1 if pep.port < 65535 else 1}/tools/x",
            headers={"Host": f"127.0.0.1:{pep.port}"},
        )
        assert r.status_code == 403
        assert r.headers["x-pep-reason"] == "request_ambiguous"
    assert upstream.seen == []
    assert fault_pdp.requests == []
