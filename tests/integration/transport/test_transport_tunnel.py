"""CONNECT tunnels: after the handler accepts, bytes move both ways (those the client sent with its CONNECT
head first), backpressure holds both ways, and the tunnel ends as a whole when either side closes or nothing
moved for the idle timeout. A refused CONNECT forwards nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from pep.transport import ConnectFailed, Exchange, Listener, Pipe, connect, serve, splice
from tests.support.raw_client import RawClient

IDLE_S = 0.4


@dataclass
class Far:
    """The tunnel's far end: echoes (unless `read` is cleared), records what it got, may close first."""

    port: int = 0
    got: bytearray = field(default_factory=bytearray)
    read: asyncio.Event = field(default_factory=asyncio.Event)
    close_after: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    pipes: tuple[Pipe, Pipe] = field(init=False)  # the client's side and the far side, once spliced

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                await self.read.wait()
                data = await reader.read(65536)
                if not data:
                    break
                self.got += data
                writer.write(data)
                await writer.drain()
                if self.close_after is not None and len(self.got) >= self.close_after:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()


Setup = Callable[[], Awaitable[tuple[Listener, Far]]]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    made: list[tuple[Listener, asyncio.Server, Far]] = []

    async def make() -> tuple[Listener, Far]:
        far = Far()
        far.read.set()
        server = await asyncio.start_server(far.serve, "127.0.0.1", 0)
        far.port = server.sockets[0].getsockname()[1]

        async def handler(exchange: Exchange) -> None:
            if exchange.head.method != b"CONNECT" or exchange.target.startswith("denied."):
                exchange.response.close_after()
                exchange.response.send(403, [], b"denied")
                return
            try:
                upstream = await connect("127.0.0.1", far.port, 1.0)
            except ConnectFailed:
                exchange.response.close_after()
                exchange.response.send(502, [], b"")
                return
            far.pipes = (exchange.switch(), upstream)
            await splice(*far.pipes, IDLE_S)

        listener = await serve("127.0.0.1", 0, handler)
        made.append((listener, server, far))
        return listener, far

    yield make
    for listener, server, far in made:
        for writer in far.writers:
            writer.transport.abort()
        await listener.close(0.5)
        server.close()


CONNECT = b"CONNECT far.test:443 HTTP/1.1\r\nHost: far.test:443\r\n\r\n"


async def test_an_accepted_tunnel_moves_bytes_both_ways_early_ones_first(setup: Setup) -> None:
    listener, far = await setup()
    client = await RawClient.open(listener.address[1])
    await client.send(CONNECT + b"early bytes|")
    answer = await client.answer(no_body=True)
    assert answer is not None
    assert answer.status == 200
    await client.send(b"later bytes")
    echoed = b""
    while len(echoed) < len(b"early bytes|later bytes"):
        echoed += await asyncio.wait_for(client.reader.read(100), 2.0)
    assert echoed == b"early bytes|later bytes"
    assert bytes(far.got) == b"early bytes|later bytes"
    client.close()


async def test_a_refused_connect_forwards_nothing_and_closes(setup: Setup) -> None:
    listener, far = await setup()
    client = await RawClient.open(listener.address[1])
    await client.send(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n\x16\x03\x01 a ClientHello")
    answer = await client.answer()
    assert answer is not None
    assert (answer.status, answer.headers["Connection"]) == (403, "close")
    assert await client.closed(2.0)
    assert far.writers == []


async def test_the_tunnel_ends_when_the_far_side_closes(setup: Setup) -> None:
    listener, far = await setup()
    far.close_after = 5
    client = await RawClient.open(listener.address[1])
    await client.send(CONNECT)
    assert (await client.answer(no_body=True)) is not None
    await client.send(b"12345")
    assert await asyncio.wait_for(client.reader.read(5), 2.0) == b"12345"
    assert await client.closed(2.0)
    await asyncio.sleep(0.05)
    assert listener.connections == set()


async def test_the_tunnel_ends_when_the_client_closes(setup: Setup) -> None:
    listener, far = await setup()
    client = await RawClient.open(listener.address[1])
    await client.send(CONNECT + b"x")
    assert (await client.answer(no_body=True)) is not None
    client.writer.close()
    await asyncio.wait_for(far.closed.wait(), 2.0)


async def test_an_idle_tunnel_is_closed(setup: Setup) -> None:
    listener, far = await setup()
    client = await RawClient.open(listener.address[1])
    await client.send(CONNECT)
    assert (await client.answer(no_body=True)) is not None
    for _ in range(3):  # traffic keeps it open past the idle timeout
        await asyncio.sleep(IDLE_S / 2)
        await client.send(b"ping")
        assert await asyncio.wait_for(client.reader.readexactly(4), 2.0) == b"ping"
    assert await client.closed(IDLE_S * 5)
    await asyncio.wait_for(far.closed.wait(), 2.0)


async def test_a_far_side_that_does_not_read_stops_the_client_side(setup: Setup) -> None:
    listener, far = await setup()
    far.read.clear()  # the far side takes nothing
    client = await RawClient.open(listener.address[1])
    await client.send(CONNECT)
    assert (await client.answer(no_body=True)) is not None
    sent = 0
    flood = 256 * 1048576

    async def send_all() -> None:
        nonlocal sent
        block = b"f" * 65536
        while sent < flood:
            await client.send(block)
            sent += len(block)

    flooding = asyncio.create_task(send_all())
    try:
        before = -1
        for _ in range(50):  # until the client is blocked: every buffer on the way is full
            await asyncio.sleep(0.1)
            if sent == before:
                break
            before = sent
        assert sent == before
        assert sent < flood
        client_pipe, far_pipe = far.pipes
        assert far_pipe.transport is not None
        assert client_pipe.transport is not None
        # What the PEP holds is its write buffer toward the far side: bounded by the high-water mark (plus the
        # one read that crossed it); the rest waits in kernel buffers, as TCP's flow control intends.
        assert far_pipe.transport.get_write_buffer_size() <= 65536 + 262144
    finally:
        flooding.cancel()
        client.close()


async def test_a_switched_connection_ends_with_its_handler() -> None:
    async def handler(exchange: Exchange) -> None:
        exchange.switch()
        raise RuntimeError("a bug between the switch and the splice")

    listener = await serve("127.0.0.1", 0, handler)
    try:
        client = await RawClient.open(listener.address[1])
        await client.send(CONNECT)
        assert (await client.answer(no_body=True)) is not None
        assert await client.closed(2.0)
        await asyncio.sleep(0.05)
        assert listener.connections == set()
    finally:
        await listener.close(0.5)


async def test_a_far_end_that_refuses_is_a_connect_failure() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed):
        await connect("127.0.0.1", port, 1.0)
