"""Attacks on the transport from a raw socket: what one caller can make the listener hold, and for how long.

A client that pipelines requests and never reads the answers, one that stops reading the last answer of a
connection, and one that stops reading a streamed answer: each is held to the listener's high-water marks and
cut off at a deadline, so that it cannot take the memory, the connections or the upstream connections of the
others. Sizes are asserted, never times (a deadline is only shrunk so that the test ends soon).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from pep.transport import ClientGone, Exchange, Listener, ListenerOptions, serve

HIGH = ListenerOptions().read_high_water
WRITE_HIGH = ListenerOptions().write_high_water
ONE_READ = 262144  # the most a transport reads at once (uvloop and asyncio alike)
ANSWER = b"a" * 4096
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
PATIENCE_S = 5.0  # the longest a connection may take to be cut off once its deadline (shrunk) has passed


@pytest.fixture
async def listeners() -> AsyncIterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for listener in made:
        await listener.close(0.5)


def deaf_socket(port: int) -> socket.socket:
    """A client that reads nothing: a small receive buffer, so that its answers pile up on the listener's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def flood(sock: socket.socket, data: bytes) -> int:
    """Send `data` again and again until the listener stops taking it (nothing sent for 0.3 s); bytes sent."""
    sent = stalled = 0
    while sent < 1 << 30:
        try:
            sent += sock.send(data[sent % len(data) :])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            if stalled > 30:
                return sent
            await asyncio.sleep(0.01)
    raise AssertionError("the listener took a GiB of requests from a client that reads nothing")


async def gone(listener: Listener) -> bool:
    """Whether the listener's one connection, once there, closes within PATIENCE_S."""
    seen = False
    for _ in range(int(PATIENCE_S / 0.05)):
        seen = seen or bool(listener.connections)
        if seen and not listener.connections:
            return True
        await asyncio.sleep(0.05)
    return False


async def answer_small(exchange: Exchange) -> None:
    exchange.response.send(200, [], ANSWER)


async def test_a_client_that_pipelines_and_never_reads_is_held_to_the_high_water_marks(
    listeners: list[Listener],
) -> None:
    """Each answer is ~150 times its request: without a bound on what waits to be sent, a few KiB of requests
    would make the listener hold MiB of answers (and read on into its buffer after each one)."""
    listener = await serve("127.0.0.1", 0, answer_small)
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sent = await flood(sock, GET * 1000)
        (conn,) = listener.connections
        assert conn.transport is not None
        assert conn.reader.buffered <= HIGH + ONE_READ
        assert conn.transport.get_write_buffer_size() <= WRITE_HIGH + len(ANSWER) + 200
        # The client reads at last: its requests are answered, in order (the first thousand are read).
        assert sent > 1000 * len(GET)
        one = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
        expected = 1000 * len(one)
        received = bytearray()
        loop = asyncio.get_running_loop()
        while len(received) < expected:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), PATIENCE_S)
            assert data, f"closed after {len(received)} of {expected} bytes"
            received += data
        assert received[:expected] == one * 1000
    finally:
        sock.close()


async def test_a_client_that_stops_reading_is_cut_off_at_the_idle_deadline(listeners: list[Listener]) -> None:
    """Answers it has not taken are dropped: a close would wait for them for as long as it reads nothing."""
    listener = await serve("127.0.0.1", 0, answer_small, options=ListenerOptions(idle_s=0.2, linger_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        await flood(sock, GET * 1000)
        assert await gone(listener)
    finally:
        sock.close()


async def test_a_client_that_does_not_read_its_last_answer_is_cut_off_after_the_linger(
    listeners: list[Listener],
) -> None:
    async def answer_large(exchange: Exchange) -> None:
        exchange.response.send(200, [], b"l" * (16 << 20))

    listener = await serve("127.0.0.1", 0, answer_large, options=ListenerOptions(linger_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sock.send(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert await gone(listener)
    finally:
        sock.close()


async def test_a_client_that_stops_reading_a_stream_ends_its_handler(listeners: list[Listener]) -> None:
    """The handler's write fails after `send_s` (the upstream answer it relays is then closed), instead of
    waiting for ever with the upstream connection it holds."""
    ended: list[BaseException] = []

    async def stream(exchange: Exchange) -> None:
        exchange.response.start(200, [])
        try:
            while True:
                await exchange.response.write(b"s" * 65536)
                await asyncio.sleep(0)  # as a relay waits for the upstream between writes
        except ClientGone as exc:
            ended.append(exc)

    listener = await serve("127.0.0.1", 0, stream, options=ListenerOptions(send_s=0.2))
    listeners.append(listener)
    sock = deaf_socket(listener.address[1])
    try:
        sock.send(GET)
        assert await gone(listener)
        assert len(ended) == 1
    finally:
        sock.close()
