"""`Expect: 100-continue`: the PEP sends 100 Continue only after an allow, so a denied client never uploads."""

from __future__ import annotations

import asyncio

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream

# Not a form (those are read before the decision, to find a `_method` field): the body is streamed after it.
REQUEST = (
    b"POST /tools/upload HTTP/1.1\r\nHost: pep\r\nContent-Type: application/octet-stream\r\nContent-Length: 5\r\n"
    b"Expect: 100-continue\r\n\r\n"
)


async def _first_bytes(port: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await writer.drain()
    return await asyncio.wait_for(reader.read(200), 5), reader, writer


async def test_continue_only_after_allow(pep: RunningPep, upstream: RecordingUpstream) -> None:
    first, reader, writer = await _first_bytes(pep.port)
    try:
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        await writer.drain()
        final = await asyncio.wait_for(reader.read(300), 5)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert [(r.method, r.body) for r in upstream.seen] == [("POST", b"hello")]


async def test_denied_before_body(pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    fault_pdp.set("deny")
    first, _, writer = await _first_bytes(pep.port)
    writer.close()
    assert first.startswith(b"HTTP/1.1 403 ")
    assert b"x-pep-reason: policy_denied" in first
    assert upstream.seen == []
