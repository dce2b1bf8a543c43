"""Backpressure both ways, and streaming in constant memory.

A handler that does not read a body leaves the client blocked on a full TCP window while the listener holds
at most its high-water mark; a client that does not read an answer makes the handler's writes wait. 256 MiB
go up and come back through an echo handler, sent and read by the pool, with the process's resident memory
flat: a memory bound (generous), never a speed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from pep.transport import ClientGone, Exchange, Listener, ListenerOptions, Origin, Pool, serve
from tests.support.raw_client import RawClient

HIGH = ListenerOptions().read_high_water
ONE_READ = 262144  # the most a transport reads at once (uvloop and asyncio alike)


async def until_stalled(count: list[int], within_s: float = 5.0) -> int:
    """Wait until count[0] stops growing (checked every 0.1 s); its value then."""
    before = -1
    for _ in range(int(within_s / 0.1)):
        await asyncio.sleep(0.1)
        if count[0] == before:
            return before
        before = count[0]
    raise AssertionError(f"still moving after {within_s} s: {count[0]}")


async def test_a_handler_that_does_not_read_leaves_the_client_blocked(listeners: list[Listener]) -> None:
    release = asyncio.Event()
    held: list[Exchange] = []

    async def handler(exchange: Exchange) -> None:
        held.append(exchange)
        await release.wait()  # deciding, say: the body is not read meanwhile
        exchange.response.send(403, [], b"not read")

    listener = await serve("127.0.0.1", 0, handler)
    listeners.append(listener)
    client = await RawClient.open(listener.address[1])
    declared = 1 << 30
    await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % declared)
    sent = [0]

    async def flood() -> None:
        block = b"b" * 65536
        while True:
            await client.send(block)
            sent[0] += len(block)

    flooding = asyncio.create_task(flood())
    try:
        stalled = await until_stalled(sent)
        assert stalled < declared
        conn = held[0]._conn
        assert conn.reader.buffered <= HIGH + ONE_READ  # the rest waits in the kernel's buffers
        release.set()
        answer = await client.answer()
        assert answer is not None
        assert (answer.status, answer.headers["Connection"]) == (403, "close")
    finally:
        flooding.cancel()
        client.close()


async def test_a_client_that_does_not_read_makes_the_writes_wait(listeners: list[Listener]) -> None:
    written = [0]
    ended: list[BaseException] = []

    async def handler(exchange: Exchange) -> None:
        exchange.response.start(200, [(b"Content-Type", b"application/octet-stream")])
        block = b"d" * 65536
        try:
            while True:
                await exchange.response.write(block)
                written[0] += len(block)
        except (ClientGone, asyncio.CancelledError) as exc:
            ended.append(exc)
            raise

    listener = await serve("127.0.0.1", 0, handler)
    listeners.append(listener)
    client = await RawClient.open(listener.address[1], limit=65536)
    cast(asyncio.Transport, client.writer.transport).pause_reading()  # takes nothing (uvloop's: not a subclass)
    await client.send(b"GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
    stalled = await until_stalled(written)
    assert stalled < 256 * 1048576
    (conn,) = listener.connections
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() <= ListenerOptions().write_high_water + 65536 + 32
    client.close()
    for _ in range(50):
        if ended:
            break
        await asyncio.sleep(0.05)
    assert len(ended) == 1  # the departed client ended the handler (cancelled, or its write refused)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_256_mib_each_way_in_constant_memory(listeners: list[Listener]) -> None:
    async def echo(exchange: Exchange) -> None:
        exchange.response.start(200, [], length=exchange.body.length)
        async for chunk in exchange.body:
            await exchange.response.write(chunk)
        exchange.response.end()

    listener = await serve("127.0.0.1", 0, echo)
    listeners.append(listener)
    total = 256 * 1048576
    pattern = bytes(range(256)) * 1024  # 256 KiB; every chunk read back is checked against it
    expected = pattern * 3  # a chunk is at most the reader's buffer: the high-water mark and one read
    peak = [0]
    sampling = True

    async def sample() -> None:
        while sampling:
            peak[0] = max(peak[0], rss_kib())
            await asyncio.sleep(0.02)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(total // len(pattern)):
            yield pattern

    pool = Pool()
    sampler = asyncio.create_task(sample())
    try:
        origin = Origin("http", "127.0.0.1", listener.address[1])
        response = await pool.request(origin, b"POST", b"/echo", [(b"Host", b"a")], upload(), length=total, read_s=10)
        received = 0
        baseline = 0
        async for chunk in response:
            offset = received % 256
            assert chunk == expected[offset : offset + len(chunk)]
            received += len(chunk)
            if not baseline and received >= 16 * 1048576:
                baseline = rss_kib()  # buffers and the code paths warmed up
                peak[0] = baseline
        assert received == total
    finally:
        sampling = False
        await sampler
        await pool.close()
    growth_mib = (peak[0] - baseline) / 1024
    assert growth_mib < 32, f"resident memory grew {growth_mib:.1f} MiB while 256 MiB went each way"
