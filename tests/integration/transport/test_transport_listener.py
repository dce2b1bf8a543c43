"""The listener on real loopback sockets: keep-alive, pipelining answered in order (and never read past a
refusal), protocol errors answered with their status, deadlines against slow clients, a departing client
cancelling its handler, 100-continue only when asked, framing of answers, and graceful shutdown.

Clients are raw sockets (exact bytes) and httpx (a real client)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from pep.http1 import BodyTooLarge, ProtocolError
from pep.transport import (
    BodyTimeout,
    ConnectionInfo,
    ErrorAnswer,
    Exchange,
    Handler,
    Listener,
    ListenerOptions,
    RequestLine,
    serve,
)
from tests.support.raw_client import RawClient, get, post

Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    listeners: list[Listener] = []

    async def make(handler: Handler, **kw: object) -> Listener:
        listener = await serve("127.0.0.1", 0, handler, **kw)  # type: ignore[arg-type]
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        await listener.close(0.5)


async def hello(exchange: Exchange) -> None:
    exchange.response.send(200, [(b"Content-Type", b"text/plain")], b"hello " + exchange.head.target)


def port(listener: Listener) -> int:
    return listener.address[1]


# --- keep-alive and pipelining -----------------------------------------------------------------------------------


async def test_keep_alive_requests_share_a_connection(start: Start) -> None:
    peers: list[object] = []

    async def handler(exchange: Exchange) -> None:
        peers.append(exchange.connection.peer)
        await hello(exchange)

    listener = await start(handler)
    async with httpx.AsyncClient() as client:
        for i in range(3):
            response = await client.get(f"http://127.0.0.1:{port(listener)}/{i}")
            assert (response.status_code, response.text) == (200, f"hello /{i}")
            assert "connection" not in response.headers
    assert len(peers) == 3
    assert len(set(peers)) == 1


async def test_pipelined_requests_are_handled_one_at_a_time_and_answered_in_order(start: Start) -> None:
    running: list[str] = []
    overlap = False

    async def handler(exchange: Exchange) -> None:
        nonlocal overlap
        overlap = overlap or bool(running)
        running.append(exchange.target)
        await asyncio.sleep({"/a": 0.15, "/b": 0.0, "/c": 0.05}[exchange.target])
        running.remove(exchange.target)
        await hello(exchange)

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(get("/a") + get("/b") + get("/c"))
    bodies = [(await client.answer()) for _ in range(3)]
    assert [a.body for a in bodies if a is not None] == [b"hello /a", b"hello /b", b"hello /c"]
    assert not overlap
    client.close()


async def test_a_request_pipelined_after_a_refused_one_is_never_read(start: Start) -> None:
    handled: list[str] = []

    async def handler(exchange: Exchange) -> None:
        handled.append(exchange.target)
        exchange.response.close_after()  # a refusal that ends the connection
        exchange.response.send(403, [], b"refused")

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(post("/refused", b"12345") + get("/smuggled"))
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (403, "close")
    assert await client.closed(2.0)
    assert handled == ["/refused"]


async def test_after_an_unread_body_the_connection_closes_and_the_next_request_is_not_read(start: Start) -> None:
    handled: list[str] = []

    async def handler(exchange: Exchange) -> None:
        handled.append(exchange.target)
        exchange.response.send(403, [], b"refused")  # without reading the body, which is not all here yet

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    head = b"POST /big HTTP/1.1\r\nHost: pep.test\r\nContent-Length: 100000\r\n\r\n"
    await client.send(head + b"x" * 10 + b"GET /smuggled HTTP/1.1\r\nHost: pep.test\r\n\r\n")
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (403, "close")
    assert await client.closed(3.0)
    assert handled == ["/big"]


async def test_an_unread_body_that_is_all_here_keeps_the_connection(start: Start) -> None:
    listener = await start(hello)
    client = await RawClient.open(port(listener))
    await client.send(post("/with-body", b"ignored") + get("/next"))
    first, second = await client.answer(), await client.answer()
    assert first is not None
    assert second is not None
    assert ("Connection" not in first.headers, second.body) == (True, b"hello /next")
    client.close()


async def test_http_1_0_keep_alive_is_said_and_kept(start: Start) -> None:
    listener = await start(hello)
    client = await RawClient.open(port(listener))
    await client.send(get("/1", "Connection: keep-alive", version="1.0") + get("/2", version="1.0"))
    first, second = await client.answer(), await client.answer()
    assert first is not None
    assert second is not None
    assert first.headers["Connection"] == "keep-alive"
    assert second.headers["Connection"] == "close"
    assert await client.closed(2.0)


# --- protocol errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400, id="bad-field-name"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="cl-te"
        ),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, id="long-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, id="many-fields"),
        pytest.param(b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n", 501, id="unknown-method"),
        pytest.param(b"GET /v HTTP/1.2\r\nHost: a\r\n\r\n", 505, id="http-1.2"),
    ],
)
async def test_a_protocol_error_is_answered_with_its_status_and_closes(start: Start, data: bytes, status: int) -> None:
    handled: list[str] = []

    async def handler(exchange: Exchange) -> None:
        handled.append(exchange.target)
        await hello(exchange)

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(data + get("/after"))
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (status, "close")
    assert await client.closed(3.0)
    assert handled == []


async def test_the_protocol_error_hook_sees_the_line_and_gives_the_answer(start: Start) -> None:
    seen: list[tuple[int, RequestLine | None, str]] = []

    def hook(error: ProtocolError, line: RequestLine | None, info: ConnectionInfo) -> ErrorAnswer:
        seen.append((error.status_hint, line, info.scheme))
        return [(b"Content-Type", b"application/json"), (b"X-PEP-Reason", b"request_ambiguous")], b'{"denied":1}'

    listener = await start(hello, on_protocol_error=hook)
    client = await RawClient.open(port(listener))
    await client.send(b"GET /tools/x?a=1 HTTP/2.0\r\nHost: a\r\n\r\n")
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["X-PEP-Reason"], answer.body) == (505, "request_ambiguous", b'{"denied":1}')
    assert seen == [(505, RequestLine(b"GET", b"/tools/x?a=1", b"HTTP/2.0"), "http")]


async def test_a_body_over_the_listeners_limit_is_refused_by_the_reader(start: Start) -> None:
    errors: list[BaseException] = []

    async def handler(exchange: Exchange) -> None:
        try:
            async for _ in exchange.body:
                pass
        except BodyTooLarge as exc:
            errors.append(exc)
            exchange.response.send(exc.status_hint, [], b"too large")
            return
        await hello(exchange)

    listener = await start(handler, options=ListenerOptions(max_body_bytes=10))
    client = await RawClient.open(port(listener))
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = head + b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
    await client.send(chunked)
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (413, "close")
    assert len(errors) == 1


# --- deadlines -----------------------------------------------------------------------------------------------------

FAST = ListenerOptions(idle_s=0.3, head_s=0.3, body_chunk_s=0.3)


async def test_a_head_that_trickles_past_its_deadline_is_closed(start: Start) -> None:
    handled: list[str] = []

    async def handler(exchange: Exchange) -> None:
        handled.append(exchange.target)
        await hello(exchange)

    listener = await start(handler, options=FAST)
    client = await RawClient.open(port(listener))
    loop = asyncio.get_running_loop()
    began = loop.time()
    data = b"GET /slow HTTP/1.1\r\nHost: pep.test\r\nX-Slow: " + b"a" * 40
    closed_at: float | None = None
    for i in range(len(data)):  # a byte every 50 ms: each is in time, the head never is
        try:
            await client.send(data[i : i + 1])
        except ConnectionError:
            break
        if client.reader.at_eof() or await client.closed(0.05):
            closed_at = loop.time()
            break
    assert closed_at is not None
    assert closed_at - began < 2.0  # generous: the deadline is 0.3 s from the first byte
    assert handled == []


async def test_an_idle_connection_is_closed_and_a_kept_alive_one_too(start: Start) -> None:
    listener = await start(hello, options=FAST)
    silent = await RawClient.open(port(listener))
    assert await silent.closed(2.0)
    kept = await RawClient.open(port(listener))
    await kept.send(get("/one"))
    assert (await kept.answer()) is not None
    assert await kept.closed(2.0)


async def test_a_body_that_stops_arriving_times_out(start: Start) -> None:
    caught: list[BaseException] = []

    async def handler(exchange: Exchange) -> None:
        try:
            async for _ in exchange.body:
                pass
        except BodyTimeout as exc:
            caught.append(exc)
            exchange.response.send(408, [], b"body too slow")

    listener = await start(handler, options=FAST)
    client = await RawClient.open(port(listener))
    await client.send(b"POST /stall HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (408, "close")
    assert len(caught) == 1
    assert await client.closed(3.0)


async def test_an_inspected_body_must_be_whole_within_its_deadline(start: Start) -> None:
    outcome: list[object] = []

    async def handler(exchange: Exchange) -> None:
        try:
            outcome.append(await exchange.body.read_all(1000, 0.4))
        except BodyTimeout as exc:
            outcome.append(exc)
        exchange.response.send(200, [], b"")

    listener = await start(handler, options=FAST)
    client = await RawClient.open(port(listener))
    await client.send(b"POST /trickle HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n")
    for i in range(20):  # every byte within the chunk deadline (0.3 s), the whole not within 0.4 s
        await asyncio.sleep(0.05)
        try:
            await client.send(b"%d" % (i % 10))
        except ConnectionError:
            break
        if outcome:
            break
    assert len(outcome) == 1
    assert isinstance(outcome[0], BodyTimeout)


# --- the client leaving --------------------------------------------------------------------------------------------


async def test_a_departing_client_cancels_its_handler(start: Start) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(exchange: Exchange) -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # an upstream call that takes long
        except asyncio.CancelledError:
            cancelled.set()
            raise

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(get("/long"))
    await asyncio.wait_for(started.wait(), 2.0)
    client.writer.close()
    await asyncio.wait_for(cancelled.wait(), 2.0)
    await asyncio.sleep(0.05)
    assert listener.connections == set()


async def test_a_handler_whose_answer_is_complete_is_not_cancelled(start: Start) -> None:
    finished = asyncio.Event()

    async def handler(exchange: Exchange) -> None:
        await hello(exchange)
        await asyncio.sleep(0.2)  # logging, metrics: after the answer, the client may be gone already
        finished.set()

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(get("/done"))
    assert (await client.answer()) is not None
    client.close()
    await asyncio.wait_for(finished.wait(), 2.0)


# --- 100-continue and answers --------------------------------------------------------------------------------------


async def test_100_continue_is_sent_only_when_the_handler_asks(start: Start) -> None:
    async def handler(exchange: Exchange) -> None:
        if exchange.target == "/allowed":
            exchange.send_continue()
            exchange.send_continue()  # once only
            body = await exchange.body.read_all(100, 2.0)
            exchange.response.send(200, [], body)
        else:
            exchange.response.send(403, [], b"denied")
            exchange.send_continue()  # too late: an answer is out

    listener = await start(handler)
    head = b"POST %s HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    client = await RawClient.open(port(listener))
    await client.send(head % b"/allowed")
    interim = await client.answer()
    assert interim is not None
    assert interim.status == 100
    await client.send(b"data")
    final = await client.answer()
    assert final is not None
    assert (final.status, final.body) == (200, b"data")
    await client.send(head % b"/denied")
    denied = await client.answer()
    assert denied is not None
    assert (denied.status, denied.headers["Connection"]) == (403, "close")  # the body was never sent
    assert await client.closed(3.0)


async def test_answers_are_framed_by_the_writer(start: Start) -> None:
    async def handler(exchange: Exchange) -> None:
        target, response = exchange.target, exchange.response
        if target == "/stream":
            response.start(200, [(b"Content-Type", b"text/event-stream")])
            for i in range(3):
                await response.write(b"data: %d\n\n" % i)
            response.end()
        elif target == "/sized":
            response.start(200, [], length=6)
            await response.write(b"abc")
            response.end(b"def")
        elif target == "/empty":
            response.send(204, [])
        else:
            response.send(200, [], b"twelve bytes")

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(get("/stream") + get("/sized") + get("/empty") + b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n")
    stream, sized, empty = await client.answer(), await client.answer(), await client.answer()
    head = await client.answer(no_body=True)
    assert stream is not None
    assert sized is not None
    assert empty is not None
    assert head is not None
    assert (stream.headers["Transfer-Encoding"], stream.body) == ("chunked", b"data: 0\n\ndata: 1\n\ndata: 2\n\n")
    assert (sized.headers["Content-Length"], sized.body) == ("6", b"abcdef")
    assert (empty.status, "Content-Length" in empty.headers) == (204, False)
    assert (head.headers["Content-Length"], head.body) == ("12", b"")
    await client.send(get("/after-head"))  # no body followed the HEAD answer: the next answer reads cleanly
    after = await client.answer()
    assert after is not None
    assert after.body == b"twelve bytes"
    client.close()


async def test_a_handler_without_an_answer_gets_a_500_and_a_closed_connection(start: Start) -> None:
    async def handler(exchange: Exchange) -> None:
        if exchange.target == "/raises":
            raise RuntimeError("a bug")

    listener = await start(handler)
    for target in ("/silent", "/raises"):
        client = await RawClient.open(port(listener))
        await client.send(get(target))
        answer = await client.answer()
        assert answer is not None
        assert (answer.status, answer.headers["Connection"]) == (500, "close")
        assert await client.closed(3.0)


async def test_a_refusal_reaches_a_client_that_is_still_sending(start: Start) -> None:
    """Lingering close: the answer is not destroyed by a reset when the client's body is still coming."""

    async def handler(exchange: Exchange) -> None:
        exchange.response.send(403, [], b"denied")

    listener = await start(handler)
    client = await RawClient.open(port(listener))
    await client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 50000000\r\n\r\n")

    async def keep_sending() -> None:
        try:
            for _ in range(200):
                await client.send(b"x" * 65536)
        except ConnectionError:
            pass

    sender = asyncio.create_task(keep_sending())
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.body) == (403, b"denied")
    sender.cancel()
    client.close()


async def test_accepted_sockets_have_nodelay(start: Start) -> None:
    seen: list[int] = []

    async def handler(exchange: Exchange) -> None:
        sock = exchange._conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await hello(exchange)

    listener = await start(handler)
    async with httpx.AsyncClient() as client:
        await client.get(f"http://127.0.0.1:{port(listener)}/")
    assert seen == [1]


# --- shutdown ------------------------------------------------------------------------------------------------------


async def test_shutdown_closes_idle_connections_finishes_requests_then_aborts(start: Start) -> None:
    release = asyncio.Event()
    cancelled: list[str] = []

    async def handler(exchange: Exchange) -> None:
        try:
            if exchange.target == "/finishes":
                await release.wait()
            elif exchange.target == "/never":
                await asyncio.sleep(30)
            await hello(exchange)
        except asyncio.CancelledError:
            cancelled.append(exchange.target)
            raise

    listener = await start(handler)
    idle = await RawClient.open(port(listener))
    finishing = await RawClient.open(port(listener))
    never = await RawClient.open(port(listener))
    await finishing.send(get("/finishes"))
    await never.send(get("/never"))
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(listener.close(0.5))
    assert await idle.closed(1.0)
    with pytest.raises(OSError):
        await RawClient.open(port(listener))  # no longer accepting
    release.set()
    answer = await finishing.answer()
    assert answer is not None
    assert (answer.body, answer.headers["Connection"]) == (b"hello /finishes", "close")
    await asyncio.wait_for(closing, 3.0)
    assert cancelled == ["/never"]
    assert await never.closed(1.0)
