"""The PDP's HTTP/1.1 client against scripted servers, on asyncio's loop and on uvloop (what `pep run` uses):
framing, keep-alive reuse, limits, encodings, interim answers, and connections never reused after a failure."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from pep.pdp import http1
from pep.pdp.http1 import Answer, ExchangeError, Http1Client, NotAdmitted, RequestError
from pep.transport.connection import LinkState

LIMIT = 1024
Script = Callable[[bytes], list[bytes] | None]  # request bytes -> chunks to send (None: close without answering)
CLOSE = b""  # as the last chunk: close the connection after sending


class Scripted:
    """A loopback server answering each request with the next script; counts connections and requests."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.scripts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                chunks = self.scripts.pop(0)(request)
                if chunks is None:
                    break
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                if chunks and chunks[-1] == CLOSE:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/data/pep/authz?x=1"


def answer(body: bytes = b'{"result":true}', *headers: str, status: str = "200 OK") -> Script:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(h + "\r\n" for h in headers)
    return lambda _req: [head.encode() + b"\r\n", body]


LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"), pytest.param(uvloop.new_event_loop, id="uvloop")]


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


async def post(client: Http1Client, server: Scripted, **headers: str) -> Answer:
    return await client.exchange("POST", server.url, b'{"input":{}}', {"Content-Type": "application/json", **headers})


def client() -> Http1Client:
    return Http1Client(LIMIT, 8, None, "User-Agent: t\r\nAccept: application/json\r\n")


@pytest.mark.parametrize("loop", LOOPS)
def test_framing_and_keep_alive_reuse(loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        c = client()
        async with Scripted(answer(b'{"result":true}', "X-Request-ID: r1"), answer(b"{}")) as server:
            first = await post(c, server, **{"X-Request-ID": "r1"})
            second = await post(c, server)
            assert (first.status, first.body, first.request_id) == (200, b'{"result":true}', "r1")
            assert first.content_type == "application/json"
            assert second.body == b"{}"
            assert server.connections == 1  # reused
            request = server.requests[0]
            assert request.startswith(b"POST /v1/data/pep/authz?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b'\r\nContent-Length: 12\r\n\r\n{"input":{}}' in request
            assert b"X-Request-ID: r1\r\n" in request
        await c.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_chunked_gzip_and_close_delimited_bodies(loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    zipped = gzip.compress(b'{"result":true}')
    chunked: Script = lambda _r: [  # noqa: E731
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n",
        b'5\r\n{"res\r\n',
        b'a\r\nult":true}\r\n0\r\n\r\n',
    ]
    closing: Script = lambda _r: [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b'{"result":', b"false}"]  # noqa: E731

    async def main() -> None:
        c = client()
        async with Scripted(chunked, answer(zipped, "Content-Encoding: gzip"), closing) as server:
            assert (await post(c, server)).body == b'{"result":true}'
            assert (await post(c, server)).body == b'{"result":true}'
            assert (await post(c, server)).body == b'{"result":false}'
        await c.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_limits_and_bad_encodings_are_reported_not_trusted(loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    big = b"x" * (LIMIT + 1)
    bomb = zlib.compress(b"0" * (LIMIT * 50))

    async def main() -> None:
        c = client()
        async with Scripted(
            answer(big),
            answer(bomb, "Content-Encoding: deflate"),
            answer(b"not gzip", "Content-Encoding: gzip"),
            answer(b"x", "Content-Encoding: br"),
            answer(),
        ) as server:
            oversize = await post(c, server)
            assert oversize.oversize
            assert oversize.body == b""
            assert (await post(c, server)).oversize  # decompressed past the limit
            assert (await post(c, server)).undecodable
            assert (await post(c, server)).undecodable
            assert (await post(c, server)).body == b'{"result":true}'
            assert server.connections == 2  # the oversize answer's connection was not reused
        await c.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_interim_answer_is_skipped(loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    final = answer()
    interim: Script = lambda r: [b"HTTP/1.1 100 Continue\r\n\r\n", *(final(r) or [])]  # noqa: E731

    async def main() -> None:
        c = client()
        async with Scripted(interim) as server:
            assert (await post(c, server)).status == 200
        await c.close()

    run(loop, main)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(lambda _r: None, id="closed-without-answer"),
        pytest.param(lambda _r: [b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"res', CLOSE], id="short-body"),
        pytest.param(lambda _r: [b"garbage\r\n\r\n", CLOSE], id="garbage"),
        pytest.param(
            lambda _r: [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", CLOSE], id="two-lengths"
        ),
        # llhttp passes control characters in the reason phrase; h11 (and RFC 9112) refuse such a status line.
        pytest.param(lambda _r: [b"HTTP/1.1 200 O\x00K\r\nContent-Length: 1\r\n\r\nx", CLOSE], id="nul-in-reason"),
        pytest.param(lambda _r: [b"HTTP/1.1 200 O\x01K\r\nContent-Length: 1\r\n\r\nx", CLOSE], id="ctl-in-reason"),
    ],
)
@pytest.mark.parametrize("loop", LOOPS)
def test_an_incomplete_or_unparsable_answer_is_an_error(
    loop: Callable[[], asyncio.AbstractEventLoop], script: Script
) -> None:
    async def main() -> None:
        c = client()
        async with Scripted(script, answer()) as server:
            with pytest.raises(ExchangeError):
                await post(c, server)
            assert (await post(c, server)).status == 200
            assert server.connections == 2  # never reused after the failure
        await c.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancelled_exchange_aborts_its_connection(loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    late = answer()

    async def main() -> None:
        c = client()
        async with Scripted(lambda r: [b"HTTP/1.1 200 OK\r\n"], late) as server:  # headers never finish
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await post(c, server)
            assert (await post(c, server)).status == 200
            assert server.connections == 2
        await c.close()

    run(loop, main)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a\r\nInjected: 1", "line break or NUL"),
        ("a\nb", "line break or NUL"),
        ("a\0b", "line break or NUL"),
        ("a=\u20ac", "outside Latin-1"),
        ("a=\udcff", "outside Latin-1"),  # a byte that is not UTF-8, as aiohttp hands it over
    ],
)
def test_a_header_value_that_cannot_be_framed_is_refused_before_anything_is_sent(value: str, problem: str) -> None:
    async def main() -> None:
        c = client()
        async with Scripted(answer()) as server:
            with pytest.raises(RequestError, match=problem):
                await c.exchange("POST", server.url, b"{}", {"Tracestate": value})
            assert server.connections == 0
        await c.close()

    run(asyncio.new_event_loop, main)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Bad Name", "not a token"),
        ("", "not a token"),
        ("Content-Length", "the client's to write"),  # a second length would let the PDP read another request
        ("transfer-encoding", "the client's to write"),
    ],
)
def test_a_header_name_that_cannot_be_written_is_refused_before_anything_is_sent(name: str, problem: str) -> None:
    async def main() -> None:
        c = client()
        async with Scripted(answer()) as server:
            with pytest.raises(RequestError, match=problem):
                await c.exchange("POST", server.url, b"{}", {name: "1"})
            assert server.connections == 0
        await c.close()

    run(asyncio.new_event_loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_admit_is_asked_before_connecting_and_right_before_writing(
    loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A no before connecting: no connection. A no once the connection is ready (the circuit opened while it was
    made): nothing is written, and the unused connection serves the next exchange."""

    async def main() -> None:
        c = client()
        answers: list[bool] = []

        def admit(*script: bool) -> Callable[[], bool]:
            pending = list(script)

            def ask() -> bool:
                answers.append(pending[0])
                return pending.pop(0)

            return ask

        async with Scripted(answer(b'{"result":true}')) as server:
            with pytest.raises(NotAdmitted):
                await c.exchange("POST", server.url, b"{}", {}, admit(False))
            assert server.connections == 0
            with pytest.raises(NotAdmitted):
                await c.exchange("POST", server.url, b"{}", {}, admit(True, False))
            await asyncio.sleep(0.01)
            assert (server.connections, server.requests) == (1, [])
            got = await c.exchange("POST", server.url, b"{}", {}, admit(True, True))
            assert got.body == b'{"result":true}'
            assert answers == [False, True, False, True, True]
            assert (server.connections, len(server.requests)) == (1, 1)  # the connection made for the refused call
        await c.close()

    run(loop, main)


def test_a_refused_connection_is_an_os_error() -> None:
    async def main() -> None:
        c = client()
        async with Scripted() as server:
            port = server.port
        with pytest.raises(OSError):
            await c.exchange("GET", f"http://127.0.0.1:{port}/", None, {})
        await c.close()

    run(asyncio.new_event_loop, main)


def test_idle_connections_past_the_idle_limit_are_closed_when_one_is_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "IDLE_S", 0.05)

    async def main() -> None:
        c = client()
        async with Scripted(*(answer() for _ in range(4))) as server:
            await asyncio.gather(post(c, server), post(c, server))  # a burst: two connections, both kept idle
            idle = next(iter(c._pool._origins.values())).idle  # the pool's idle connections to the one origin
            older = idle[0]
            for _ in range(2):  # the newer one keeps being reused; the older one only ages
                await asyncio.sleep(0.03)
                await post(c, server)
            assert len(idle) == 1
            assert older not in idle  # closed when the newer one came back
            assert older.state is LinkState.CLOSED
            assert server.connections == 2  # nothing new was opened
        await c.close()

    run(asyncio.new_event_loop, main)
