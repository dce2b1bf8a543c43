"""A scripted upstream on a raw asyncio socket, for the pool's tests: h11 (an independent reader) reads each
request, and the test's `answer` function says what goes back, byte for byte: a well-formed answer, a broken
one, a close after the request, a reset, or nothing at all. Every request and every connection is recorded, so
a test can count exactly how many copies of a request arrived and on which connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11


@dataclass
class Seen:
    """One request as h11 read it, and the connection (in order of acceptance) it came on."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Action:
    """What the upstream does after reading a request: send `data`, then `close` (FIN) or `reset` (RST), or
    `hang` (send nothing more, keep the connection)."""

    data: bytes = b""
    close: bool = False
    reset: bool = False
    hang: bool = False


def ok(body: bytes = b"ok", *fields: bytes) -> Action:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + b"".join(f + b"\r\n" for f in fields)
    return Action(head + b"\r\n" + body)


Answer = Callable[[Seen], Action | Awaitable[Action]]


@dataclass
class RawUpstream:
    answer: Answer
    seen: list[Seen] = field(default_factory=list)
    accepted: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        index = self.accepted
        self._writers.append(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                seen = Seen(index, request.method, request.target, list(request.headers), bytes(body))
                self.seen.append(seen)
                action = self.answer(seen)
                if not isinstance(action, Action):
                    action = await action
                if action.data:
                    writer.write(action.data)
                    await writer.drain()
                if action.reset:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if action.close:
                    writer.close()
                    return
                if action.hang:
                    await asyncio.sleep(3600)
                trailing, _ = conn.trailing_data
                conn = h11.Connection(h11.SERVER)  # the answer went out raw: a fresh reader for the next request
                if trailing:
                    conn.receive_data(trailing)  # (b"" would mean the end of the stream to h11)
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            writer.transport.abort()
