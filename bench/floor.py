"""The floor of a Python proxy with a PDP ask: what issue 15's "150-line prototype" costs in this harness.

Not the PEP and not a product path: `python -m bench.transport run --kinds floor_pdp,envoy_authz` serves it as
the kind `floor_pdp`. Per client connection it keeps one PDP connection and one upstream connection, parses with
httptools (llhttp) in callbacks, and never creates a coroutine or a future per request: a request is one
callback chain (client bytes -> PDP ask -> PDP answer -> upstream request -> upstream answer -> client bytes).
It has none of the PEP's checks (no routing, no policy input, no framing rules, no limits, no timeouts, no
metrics, no log): the PDP is asked with the method and target only, and the answer is forwarded as read.

What it is for: if even this costs more CPU per request than Envoy with ext_authz in the same run, no Python
design of the PEP reaches issue 15's "at least 1.0x Envoy per core"; whatever it costs is the least the
interpreter, uvloop and the kernel take for two HTTP exchanges per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools

_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
    | {b"content-length", b"host"}
)


class _Answer(asyncio.Protocol):
    """One kept-alive client connection to the PDP or the upstream; one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: Callable[[int, list[tuple[bytes, bytes]], bytes], None] | None = None
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        done, self.done = self.done, None
        fields, body = self.fields, b"".join(self.body)
        self.fields, self.body = [], []
        assert done is not None
        done(self.parser.get_status_code(), fields, body)

    def send(self, data: bytes, done: Callable[[int, list[tuple[bytes, bytes]], bytes], None]) -> None:
        assert self.transport is not None
        self.done = done
        self.transport.write(data)


class _Client(asyncio.Protocol):
    """One agent connection: requests answered one at a time, in order."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pdp: _Answer | None = None
        self.upstream: _Answer | None = None
        self.url = b""
        self.fields: list[bytes] = []
        self.body: list[bytes] = []
        self.method = b""
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, pdp = await loop.create_connection(_Answer, self.floor.host, self.floor.pdp_port)
        _, self.upstream = await loop.create_connection(_Answer, self.floor.host, self.floor.upstream_port)
        self.pdp = pdp  # requests wait in `early` until both connections are open
        if self.early:
            self.parser.feed_data(b"".join(self.early))
            self.early = []

    def connection_lost(self, exc: Exception | None) -> None:
        for conn in (self.pdp, self.upstream):
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.pdp is None:
            self.early.append(data)
        else:
            self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.fields += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.method = self.parser.get_method()
        ask = b'{"input":{"method":"%s","path":"%s"}}' % (self.method, self.url)
        assert self.pdp is not None
        self.pdp.send(self.floor.pdp_head % len(ask) + ask, self._decided)

    def _decided(self, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        assert self.transport is not None
        assert self.upstream is not None
        if status != 200 or body != self.floor.allow:
            self._reset()
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied")
            return
        payload = b"".join(self.body)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            self.method,
            self.url,
            self.floor.upstream_host,
            b"".join(self.fields),
            len(payload),
        )
        self._reset()
        self.upstream.send(head + payload, self._answered)

    def _answered(self, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        assert self.transport is not None
        out = b"".join(b"%s: %s\r\n" % (n, v) for n, v in fields if n.lower() not in _HOP)
        self.transport.write(b"HTTP/1.1 %d OK\r\n%sContent-Length: %d\r\n\r\n%s" % (status, out, len(body), body))

    def _reset(self) -> None:
        self.url, self.fields, self.body = b"", [], []


_Said = tuple[int, list[tuple[bytes, bytes]], bytes]


class _TaskClient(_Client):
    """The same, with what an async handler costs: a task per request awaiting a future per answer, each wait
    under a timer (as a deadline is)."""

    def on_message_complete(self) -> None:
        method, url, fields, body = self.parser.get_method(), self.url, self.fields, self.body
        self._reset()
        asyncio.get_running_loop().create_task(self._handle(method, url, fields, body))

    async def _handle(self, method: bytes, url: bytes, fields: list[bytes], body: list[bytes]) -> None:
        assert self.transport is not None
        assert self.pdp is not None
        assert self.upstream is not None
        ask = b'{"input":{"method":"%s","path":"%s"}}' % (method, url)
        status, _, said = await _wait(self.pdp, self.floor.pdp_head % len(ask) + ask)
        if status != 200 or said != self.floor.allow:
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied")
            return
        payload = b"".join(body)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            method,
            url,
            self.floor.upstream_host,
            b"".join(fields),
            len(payload),
        )
        self._answered(*await _wait(self.upstream, head + payload))


async def _wait(conn: _Answer, data: bytes) -> _Said:
    loop = asyncio.get_running_loop()
    said: asyncio.Future[_Said] = loop.create_future()
    timer = loop.call_later(30.0, said.cancel)
    conn.send(data, lambda *a: said.set_result(a))
    try:
        return await said
    finally:
        timer.cancel()


class Floor:
    """The listener's settings, shared by its connections."""

    def __init__(
        self, host: str, upstream_port: int, pdp_port: int, pdp_path: str, allow: bytes, tasks: bool = False
    ) -> None:
        self.client = _TaskClient if tasks else _Client
        self.host, self.upstream_port, self.pdp_port, self.allow = host, upstream_port, pdp_port, allow
        self.upstream_host = f"{host}:{upstream_port}".encode()
        self.pdp_head = (
            f"POST {pdp_path} HTTP/1.1\r\nHost: {host}:{pdp_port}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n"
        ).encode()

    async def serve(self, port: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self.client(self), self.host, port, backlog=1024)
        await stop.wait()
        server.close()
