"""Forward-proxy mode: routes with `match.host` decide plain http:// requests per request (HTTP_PROXY), and
`tunnel: true` routes decide CONNECT host:port once per tunnel (HTTPS_PROXY), whose contents are not inspected.

Real loopback sockets throughout: httpx with `proxy=`, raw sockets for CONNECT, and raw asyncio servers that count
the connections they accept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from pep import transport as pep_transport
from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.loopback import refused_port
from tests.support.raw_upstream import RawUpstream, Seen, ok
from tests.support.upstream import RecordingUpstream

MakePep = Callable[..., Any]
WAIT = 3.0  # the longest any answer, or a close, may take


def policy_input(pdp: FaultPdp, index: int = -1) -> dict[str, Any]:
    body = pdp.requests[index].body
    assert isinstance(body, dict)
    doc = body["input"]
    assert isinstance(doc, dict)
    return doc


def add_routes(*routes: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["routes"].extend(routes)

    return mutate


@dataclass
class RawServer:
    """A plain TCP server: counts accepted connections, records what arrives, and runs `behaviour` per
    connection (default: keep the connection open, recording bytes until the peer closes)."""

    behaviour: str = "record"  # record | greet_and_close
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), WAIT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.behaviour == "greet_and_close":
                writer.write(b"bye")
                await writer.drain()
                return
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break
                self.received += chunk
            self.peer_closed.set()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.stop()


def tunnel_route(port: int, name: str = "tunnel", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"host": f"127.0.0.1:{port}"},
        "upstream": f"http://127.0.0.1:{port}",
        "tunnel": True,
        **extra,
    }


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and (with a Content-Length) the body of one HTTP/1.1 response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
    return status, headers, body


async def connect(
    pep: RunningPep, authority: str, host: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
    host_line = f"Host: {host if host is not None else authority}\r\n"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\n{host_line}\r\n".encode())
    await writer.drain()
    status, headers, body = await read_head(reader)
    return reader, writer, status, headers, body


async def closes(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closes within WAIT seconds (anything still buffered is drained first)."""
    try:
        async with asyncio.timeout(WAIT):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


# --- plain http:// requests through the proxy (HTTP_PROXY) -----------------------------------------------------


def host_route(upstream: RecordingUpstream) -> Callable[[dict[str, Any]], None]:
    return add_routes({"name": "egress-api", "match": {"host": "api.example.test"}, "upstream": upstream.url})


async def test_http_proxy_host_route_allowed_reaches_upstream(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(host_route(upstream))
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        r = await client.get("http://api.example.test/v1/items?q=1")
    assert r.status_code == 200
    assert [x.target for x in upstream.seen] == ["/v1/items?q=1"]
    doc = policy_input(fault_pdp)
    assert doc["route"]["name"] == "egress-api"
    assert doc["request"]["host"] == "api.example.test"
    assert doc["request"]["path"] == "/v1/items"
    assert doc["route"]["upstream_url"] == f"{upstream.url}/v1/items?q=1"
    (entry,) = await pep.log_entries()
    assert (entry["route"], entry["decision"]) == ("egress-api", "allow")


async def test_alt_svc_never_reaches_the_agent(make_pep: MakePep, fault_pdp: FaultPdp) -> None:
    """`Alt-Svc: h3=":443"` tells a client that the origin it called also serves HTTP/3 on UDP 443: through
    HTTP_PROXY, that origin is the upstream itself, and a client that takes up the offer talks QUIC to it
    directly, around the PEP (a proxy of TCP connections cannot carry it); on a path route it names an endpoint
    on the PEP's own host that the PEP does not serve."""

    def answer(_seen: Seen) -> Any:
        return ok(b"ok", b'Alt-Svc: h3=":443"; ma=86400, h2="api.example.test:8443"', b"X-Kept: 1")

    up = RawUpstream(answer)
    await up.start()
    try:
        route = {"name": "egress-api", "match": {"host": "api.example.test"}, "upstream": f"http://127.0.0.1:{up.port}"}
        pep = await make_pep(add_routes(route))
        async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
            r = await client.get("http://api.example.test/v1/items")
    finally:
        await up.stop()
    assert (r.status_code, r.text, r.headers["x-kept"]) == (200, "ok", "1")
    assert "alt-svc" not in r.headers


async def test_http_proxy_host_route_denied(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(host_route(upstream))
    fault_pdp.set("deny")
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        r = await client.post("http://API.Example.test:80/v1/items", content=b"secret")
    assert r.status_code == 403
    assert r.headers["x-pep-reason"] == "policy_denied"
    assert r.json()["error"]["reason"] == "policy_denied"
    assert upstream.seen == []
    assert policy_input(fault_pdp)["route"]["name"] == "egress-api"


async def test_http_proxy_unrouted_host_is_no_route(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(host_route(upstream))
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        for url in ("http://other.example.test/v1/items", "http://api.example.test:8080/v1/items"):
            r = await client.get(url)
            assert r.status_code == 403
            assert r.headers["x-pep-reason"] == "no_route"
    assert upstream.seen == []
    assert fault_pdp.requests == []


async def test_http_proxy_path_routes_still_match_any_host(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(host_route(upstream))
    async with httpx.AsyncClient(proxy=pep.url, timeout=10) as client:
        r = await client.get("http://api.example.test/tools/x")  # the longer /tools prefix wins
        assert r.status_code == 200
        r = await client.get("http://elsewhere.test/tools/x")
        assert r.status_code == 200
    assert [policy_input(fault_pdp, i)["route"]["name"] for i in range(2)] == ["tools", "tools"]


async def test_origin_form_with_matching_host_header(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(host_route(upstream))
    async with httpx.AsyncClient(base_url=pep.url, timeout=10) as client:
        r = await client.get("/v1/x", headers={"Host": "api.example.test"})
        assert r.status_code == 200
        r = await client.get("/v1/x", headers={"Host": "other.example.test"})
        assert r.status_code == 403
        assert r.headers["x-pep-reason"] == "no_route"
    assert [x.target for x in upstream.seen] == ["/v1/x"]
    assert policy_input(fault_pdp)["route"]["name"] == "egress-api"


# --- CONNECT tunnels (HTTPS_PROXY) -----------------------------------------------------------------------------


async def test_connect_without_tunnel_route_is_no_route(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    plain = {"name": "plain", "match": {"host": f"127.0.0.1:{raw_server.port}"}, "upstream": "http://127.0.0.1:1"}
    pep = await make_pep(add_routes(plain))
    reader, writer, status, headers, body = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 403
    assert headers["x-pep-reason"] == "no_route"
    assert orjson.loads(body)["error"]["reason"] == "no_route"
    assert await closes(reader)
    writer.close()
    assert raw_server.accepted == 0
    assert fault_pdp.requests == []
    (entry,) = await pep.log_entries()
    assert (entry["route"], entry["decision"], entry["reason"]) == ("_unmatched", "deny", "no_route")


async def test_connect_allowed_tunnels_http_to_the_upstream(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep = await make_pep(add_routes(tunnel_route(upstream.port)))
    authority = f"127.0.0.1:{upstream.port}"
    reader, writer, status, _, body = await connect(pep, authority)
    assert status == 200
    assert body == b""
    writer.write(f"GET /through/tunnel?x=1 HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status, headers, body = await read_head(reader)
    assert status == 200
    assert headers["x-upstream"] == "yes"
    assert orjson.loads(body)["target"] == "/through/tunnel?x=1"
    assert await closes(reader)  # the upstream closed (Connection: close): so does the tunnel
    writer.close()
    assert [x.target for x in upstream.seen] == ["/through/tunnel?x=1"]
    # One decision, for the tunnel, on host:port: the request inside it was not decided.
    assert len(fault_pdp.requests) == 1
    doc = policy_input(fault_pdp)
    assert doc["request"]["method"] == "CONNECT"
    assert doc["request"]["host"] == authority
    assert doc["request"]["path"] == ""
    assert doc["route"]["name"] == "tunnel"
    assert doc["route"]["upstream_url"] == authority
    (entry,) = await pep.log_entries()
    assert (entry["route"], entry["method"], entry["decision"]) == ("tunnel", "CONNECT", "allow")


async def test_connect_denied_makes_no_upstream_connection(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    fault_pdp.set("deny")
    reader, writer, status, headers, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 403
    assert headers["x-pep-reason"] == "policy_denied"
    assert headers["connection"].lower() == "close"
    assert await closes(reader)
    writer.close()
    await asyncio.sleep(0.1)
    assert raw_server.accepted == 0
    (entry,) = await pep.log_entries()
    assert (entry["route"], entry["decision"], entry["reason"]) == ("tunnel", "deny", "policy_denied")


async def test_connect_pdp_down_is_pdp_unreachable(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    await fault_pdp.apply("refuse")
    _reader, writer, status, headers, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 403
    assert headers["x-pep-reason"] == "pdp_unreachable"
    writer.close()
    assert raw_server.accepted == 0


async def test_connect_obligations_cannot_be_applied(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    fault_pdp.set("allow_with_header")
    _, writer, status, headers, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 403
    assert headers["x-pep-reason"] == "obligation_unsupported"
    writer.close()
    assert raw_server.accepted == 0


@pytest.mark.parametrize(
    ("target", "host", "reason"),
    [
        ("127.0.0.1", None, "request_ambiguous"),  # CONNECT needs a port
        ("http://127.0.0.1:{port}/", None, "request_ambiguous"),
        ("127.0.0.1:{port}", "127.0.0.1:1", "request_ambiguous"),  # Host disagrees with the target
        ("127.0.0.2:{port}", None, "no_route"),
    ],
)
async def test_connect_target_must_be_the_routed_authority(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer, target: str, host: str | None, reason: str
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    authority = target.format(port=raw_server.port)
    _, writer, status, headers, _ = await connect(pep, authority, host)
    assert status in (400, 403)
    if status == 403:
        assert headers["x-pep-reason"] == reason
    writer.close()
    assert raw_server.accepted == 0
    assert fault_pdp.requests == []


async def test_tunnel_closes_when_the_upstream_closes(make_pep: MakePep, fault_pdp: FaultPdp) -> None:
    server = RawServer(behaviour="greet_and_close")
    await server.start()
    try:
        pep = await make_pep(add_routes(tunnel_route(server.port)))
        reader, writer, status, _, _ = await connect(pep, f"127.0.0.1:{server.port}")
        assert status == 200
        assert await asyncio.wait_for(reader.readexactly(3), WAIT) == b"bye"
        assert await closes(reader)
        writer.close()
        assert server.accepted == 1
    finally:
        await server.stop()


async def test_tunnel_closes_when_the_client_closes(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    _reader, writer, status, _, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 200
    writer.write(b"opaque \x00\x01 bytes")
    await writer.drain()
    writer.close()
    await asyncio.wait_for(raw_server.peer_closed.wait(), WAIT)
    assert bytes(raw_server.received) == b"opaque \x00\x01 bytes"
    assert raw_server.accepted == 1


async def test_tunnel_idle_timeout_closes_both_sides(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    pep = await make_pep(add_routes(tunnel_route(raw_server.port, timeout_ms=300)))
    reader, writer, status, _, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
    assert status == 200
    assert await closes(reader)
    writer.close()
    await asyncio.wait_for(raw_server.peer_closed.wait(), WAIT)


async def test_connect_allowed_but_upstream_down_is_502(make_pep: MakePep, fault_pdp: FaultPdp) -> None:
    with refused_port() as port:
        pep = await make_pep(add_routes(tunnel_route(port)))
        reader, writer, status, headers, _ = await connect(pep, f"127.0.0.1:{port}")
        assert status == 502
        assert headers["x-pep-decision"] == "allow"
        assert await closes(reader)
        writer.close()


def drop_route(source: str, name: str) -> None:
    path = Path(source)
    cfg = yaml.safe_load(path.read_text())
    cfg["routes"] = [r for r in cfg["routes"] if r["name"] != name]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


async def test_a_reload_that_takes_the_tunnel_route_away_closes_its_tunnels(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer
) -> None:
    """A tunnel was decided once, under its route: an operator who removes (or changes) that route to cut the
    agent off from the host cuts the tunnels already open too, not only the next CONNECT. One whose route the
    reload keeps as it was goes on."""
    other = RawServer()
    await other.start()
    try:
        pep = await make_pep(add_routes(tunnel_route(raw_server.port), tunnel_route(other.port, "kept")))
        reader, writer, status, _, _ = await connect(pep, f"127.0.0.1:{raw_server.port}")
        kept_reader, kept_writer, kept_status, _, _ = await connect(pep, f"127.0.0.1:{other.port}")
        assert (status, kept_status) == (200, 200)
        drop_route(pep.server.config.source, "tunnel")
        assert await pep.server.reload_config()
        assert await closes(reader)
        assert await asyncio.wait_for(raw_server.peer_closed.wait(), WAIT) is True
        kept_writer.write(b"still here")
        await kept_writer.drain()
        for _ in range(100):
            if bytes(other.received) == b"still here":
                break
            await asyncio.sleep(0.02)
        assert bytes(other.received) == b"still here"
        assert not other.peer_closed.is_set()
        writer.close()
        kept_writer.close()
        del kept_reader
    finally:
        await other.stop()


async def test_a_tunnel_whose_route_a_reload_took_away_while_it_connected_is_closed(
    make_pep: MakePep, fault_pdp: FaultPdp, raw_server: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload came after the allow and before the tunnel was open: it is closed as it opens, both sides."""
    connecting, go_on = asyncio.Event(), asyncio.Event()
    connect_upstream = pep_transport.connect

    async def held(host: str, port: int, connect_s: float) -> Any:
        connecting.set()
        await go_on.wait()
        return await connect_upstream(host, port, connect_s)

    monkeypatch.setattr(pep_transport, "connect", held)
    pep = await make_pep(add_routes(tunnel_route(raw_server.port)))
    opening = asyncio.ensure_future(connect(pep, f"127.0.0.1:{raw_server.port}"))
    await asyncio.wait_for(connecting.wait(), WAIT)
    drop_route(pep.server.config.source, "tunnel")
    assert await pep.server.reload_config()
    go_on.set()
    reader, writer, _status, _, _ = await opening
    assert await closes(reader)
    assert await asyncio.wait_for(raw_server.peer_closed.wait(), WAIT) is True
    writer.close()
