"""A raw HTTP/1.1 client on a loopback socket, for tests that need exact bytes on the wire: pipelining, broken
requests, slow heads and bodies, half-read answers. Answers are read with Content-Length, chunked or
close-delimited framing; headers keep their order and case."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from multidict import CIMultiDict


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, limit: int = 2**20) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within_s: float = 5.0, no_body: bool = False) -> Answer | None:
        """The next answer; None if the connection closes before one (1xx answers are returned too). `no_body`:
        an answer to HEAD, or a 2xx to CONNECT."""
        async with asyncio.timeout(within_s):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers.add(name.strip(), value.strip())
            if no_body or status < 200 or status in (204, 304):
                return Answer(status, headers, b"")
            if headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = bytearray()
                while True:
                    size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")  # no trailers in these tests
                        break
                    body += await self.reader.readexactly(size)
                    await self.reader.readexactly(2)
                return Answer(status, headers, bytes(body))
            if "Content-Length" in headers:
                return Answer(status, headers, await self.reader.readexactly(int(headers["Content-Length"])))
            return Answer(status, headers, await self.reader.read())

    async def closed(self, patience: float) -> bool:
        """Whether the server closes within `patience` seconds, sending nothing more."""
        try:
            return await asyncio.wait_for(self.reader.read(1), patience) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def get(target: str = "/", *fields: str, version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", "Host: pep.test", *fields, "", ""]
    return "\r\n".join(lines).encode()


def post(target: str, body: bytes, *fields: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: pep.test", f"Content-Length: {len(body)}", *fields, "", ""]
    return "\r\n".join(lines).encode() + body


async def raw_get(port: int, target: bytes = b"/tools/x", extra: bytes = b"") -> tuple[int, str | None]:
    """One GET on a new connection with exactly this target and these extra header lines (bytes a client library
    would refuse or re-encode; `extra` may bring its own Host): the status and `x-pep-reason`."""
    host = b"" if extra.lower().startswith(b"host:") else b"Host: 127.0.0.1\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\n" + host + extra + b"Connection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers.get("x-pep-reason")
