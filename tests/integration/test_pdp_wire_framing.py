"""PDP answers whose framing could mislead a client, on the wire through a running PEP (found by fuzzing the PDP
client, and by review): an interim 1xx answer's headers, bytes after a complete answer, or data after the one
gzip member of a compressed answer must never make an allow of an answer the contract calls malformed. Every case
asserts that nothing reached the upstream."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import PepStarter, RunningPep
from tests.support.upstream import RecordingUpstream

# 1xx headers say JSON; the final 200 says nothing: a body without a JSON content type is malformed.
INTERIM_HEADERS = (
    b"HTTP/1.1 100 Continue\r\nContent-Type: application/json\r\n\r\n"
    b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"result":true}'
)
# A text/plain allow, then (same write) another answer's head that says JSON: the first answer is what counts.
TRAILING_BYTES = (
    b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n\r\n{"result":true}'
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


def gzipped(body: bytes, *codings: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += b"".join(b"Content-Encoding: %s\r\n" % c for c in codings or (b"gzip",))
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


# Decoded only to the end of the first gzip member, these were allows; uncompressed, the same JSON is trailing data.
GZIP_TWO_MEMBERS = gzipped(gzip.compress(b'{"result":true}') + gzip.compress(b'{"result":false}'))
GZIP_THEN_GARBAGE = gzipped(gzip.compress(b'{"result":true}') + b"garbage")
# Two fields are one list (gzip, gzip): the body is not gzipped twice, so it cannot be read as such.
GZIP_TWICE = gzipped(gzip.compress(b'{"result":true}'), b"gzip", b"gzip")


class RawPdp:
    """Answers every request on a connection with the same bytes, in one write, then closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")), 0
            )
            await reader.readexactly(length)
            self.requests += 1
            writer.write(self.answer)
            await writer.drain()
            await asyncio.sleep(0.05)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_pdp(request: pytest.FixtureRequest) -> AsyncIterator[RawPdp]:
    pdp = RawPdp(request.param)
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.mark.parametrize(
    ("raw_pdp", "reason"),
    [
        pytest.param(INTERIM_HEADERS, "pdp_malformed", id="interim-headers"),
        pytest.param(TRAILING_BYTES, "pdp_malformed", id="bytes-after-the-answer"),
        pytest.param(UPGRADE, "pdp_unreachable", id="upgrade"),
        pytest.param(GZIP_TWO_MEMBERS, "pdp_malformed", id="gzip-second-member"),
        pytest.param(GZIP_THEN_GARBAGE, "pdp_malformed", id="gzip-then-garbage"),
        pytest.param(GZIP_TWICE, "pdp_malformed", id="content-encoding-repeated"),
    ],
    indirect=["raw_pdp"],
)
async def test_misleading_framing_never_allows(
    make_pep: PepStarter, raw_pdp: RawPdp, upstream: RecordingUpstream, reason: str
) -> None:
    def to_raw_pdp(cfg: dict[str, Any]) -> None:
        cfg["pdp"]["url"] = f"http://127.0.0.1:{raw_pdp.port}/v1/data/pep/authz"
        cfg["pdp"]["retries"] = 0

    pep: RunningPep = await make_pep(to_raw_pdp)
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert (r.status, r.headers["x-pep-reason"]) == (403, reason)
    assert raw_pdp.requests == 1
    assert upstream.seen == []
