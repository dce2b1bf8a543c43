"""CONNECT tunnels: after an `Allow` for `CONNECT host:port`, bytes are spliced both ways, never inspected.

The PEP decides once per tunnel, on host:port; what flows through it (TLS, usually) is not looked at. The tunnel
goes to the host:port bound into the `Allow` (the route's upstream), closes as a whole when either side closes,
and closes when nothing moved either way for the route's `timeout_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web

from pep.authority import resolve_authority
from pep.decision import Allow
from pep.responses import upstream_failure
from pep.routing import Route

log = logging.getLogger("pep.tunnel")
_CHUNK = 65536
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class _Spliced(web.StreamResponse):
    """What the handler returns once a tunnel ended: aiohttp must write nothing more on that connection."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _Feed:
    """Takes the connection's bytes once the tunnel is open (aiohttp's `set_parser`, as WebSockets do) into a
    stream the splice reads; its flow control pauses the socket when the upstream is slower."""

    __slots__ = ("_stream",)

    def __init__(self, stream: aiohttp.StreamReader) -> None:
        self._stream = stream

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._stream.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self._stream.feed_eof()


class _Idle:
    """The last time a byte moved either way; a read that waited `limit` seconds with no traffic at all ends it."""

    __slots__ = ("last", "limit")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def left(self) -> float:
        return self.last + self.limit - time.monotonic()


async def _read(read: asyncio.Future[bytes] | asyncio.Task[bytes], idle: _Idle) -> bytes:
    """One read bounded by the shared idle timeout; b"" when the tunnel went idle."""
    try:
        while True:
            left = idle.left()
            if left <= 0:
                return b""
            done, _ = await asyncio.wait({read}, timeout=left)
            if done:
                return read.result()
    finally:
        if not read.done():
            read.cancel()


async def _client_to_upstream(content: aiohttp.StreamReader, writer: asyncio.StreamWriter, idle: _Idle) -> None:
    while True:
        chunk = await _read(asyncio.ensure_future(content.readany()), idle)
        if not chunk:
            return
        idle.touch()
        writer.write(chunk)
        await writer.drain()


async def _upstream_to_client(request: web.BaseRequest, reader: asyncio.StreamReader, idle: _Idle) -> None:
    out = request.writer
    while True:
        chunk = await _read(asyncio.ensure_future(reader.read(_CHUNK)), idle)
        if not chunk:
            return
        idle.touch()
        await out.write(chunk)


async def splice(request: web.BaseRequest, allow: Allow, route: Route) -> web.StreamResponse:
    """Open the tunnel the `Allow` names, answer 200, and move bytes until it ends.

    Once the 200 is sent nothing raises out of here: the connection is closed and aiohttp writes nothing more."""
    target = resolve_authority(allow.upstream_url, None)
    if allow.method != "CONNECT" or target is None:  # an Allow for something else is never a tunnel
        raise ValueError("not an allowed tunnel")
    timeout = route.config.timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target[0], target[1])
    except (OSError, TimeoutError):
        response = upstream_failure("connect", allow.request_id, allow.decision_id)
        response.force_close()
        return response
    try:
        await request.writer.write(ESTABLISHED)
        # Bytes the client sent before this point were held by aiohttp (never forwarded undecided); from here
        # on they go to `content`, and from there to the upstream.
        content = aiohttp.StreamReader(request.protocol, _CHUNK, loop=asyncio.get_running_loop())
        request.protocol.set_parser(_Feed(content))  # type: ignore[arg-type]
        idle = _Idle(timeout)
        pumps = [
            asyncio.ensure_future(_client_to_upstream(content, writer, idle)),
            asyncio.ensure_future(_upstream_to_client(request, reader, idle)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
    except (ConnectionError, OSError) as exc:
        log.debug("tunnel %s ended: %s", allow.request_id, exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("tunnel %s failed", allow.request_id)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        request.protocol.force_close()  # the connection was the tunnel: nothing more is read or written on it
    return _Spliced()
