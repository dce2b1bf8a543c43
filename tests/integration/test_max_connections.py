"""`max_connections`: a caller that opens connections without end cannot take the PEP's file descriptors and
memory from its PDP and upstream connections: one connection over the bound is reset as it arrives, counted, and
the connections already open (and new ones once some close) are served as before."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import RunningPep
from tests.support.raw_client import RawClient
from tests.support.upstream import RecordingUpstream

GET = b"GET /tools/search HTTP/1.1\r\nHost: pep.test\r\n\r\n"


async def _refused(port: int) -> bool:
    """Whether a new connection is closed by the PEP before it answers anything."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(GET)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionError:
        return True
    finally:
        writer.close()
    return data == b""


async def _metric(pep: RunningPep, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{pep.admin_url}/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, text
    return values[0]


async def test_a_connection_over_the_bound_is_reset_and_the_open_ones_are_served(
    make_pep: Callable[..., Any], upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=lambda c: c.update(max_connections=2))
    first, second = await RawClient.open(pep.port), await RawClient.open(pep.port)
    try:
        for _ in range(50):  # both counted once the listener has taken them
            if await _metric(pep, "pep_listener_connections") == 2:
                break
            await asyncio.sleep(0.02)
        assert await _refused(pep.port)
        assert await _refused(pep.port)
        assert await _metric(pep, "pep_listener_connections_refused_total") == 2
        assert len(upstream.seen) == 0  # the refused ones decided nothing and sent nothing
        for client in (first, second):  # the open connections still work, keep-alive
            await client.send(GET)
            assert (answer := await client.answer()) is not None
            assert answer.status == 200
    finally:
        first.close()
    for _ in range(100):  # a closed connection frees its place
        if await _metric(pep, "pep_listener_connections") < 2:
            break
        await asyncio.sleep(0.02)
    third = await RawClient.open(pep.port)
    try:
        await third.send(GET)
        assert (answer := await third.answer()) is not None
        assert answer.status == 200
    finally:
        third.close()
        second.close()
    assert len(upstream.seen) == 3
