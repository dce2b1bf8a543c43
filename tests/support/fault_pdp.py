"""A PDP that speaks OPA's REST shapes at the byte level, and misbehaves on demand like real servers do.

It is a raw asyncio server, not an aiohttp app, so it can do what a framework would not: close without a
word, reset mid-body, announce more bytes than it sends, hang, or send garbage with a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

JSON = "application/json"


@dataclass(frozen=True)
class Mode:
    """One behaviour. `action`: respond | close (accept, read, close) | reset (RST after part of the body) |
    hang (never answer) | refuse (nothing listens)."""

    status: int = 200
    body: bytes = b'{"result":true}'
    content_type: str | None = JSON
    action: str = "respond"
    delay: float = 0.0
    content_length: int | None = None  # announce a different length than the body has
    extra_headers: tuple[tuple[str, str], ...] = ()


OPA_ERROR = orjson.dumps(
    {
        "code": "invalid_parameter",
        "message": "error(s) occurred while parsing input",
        "errors": [
            {
                "code": "rego_parse_error",
                "message": "unexpected eof token",
                "location": {"file": "", "row": 1, "col": 1},
            }
        ],
    }
)

MODES: dict[str, Mode] = {
    "allow": Mode(),
    "allow_object": Mode(body=b'{"result":{"allow":true,"reason":"ok"}}'),
    "allow_with_header": Mode(body=b'{"result":{"allow":true,"headers":{"x-tenant":"acme"}}}'),
    "deny": Mode(body=b'{"result":false}'),
    "deny_object": Mode(body=b'{"result":{"allow":false,"reason":"tool not allowed"}}'),
    "undefined": Mode(body=b"{}"),
    "undefined_allow": Mode(body=b'{"result":{"reason":"no allow rule"}}'),
    "string_true": Mode(body=b'{"result":"true"}'),
    "one": Mode(body=b'{"result":1}'),
    "allow_yes": Mode(body=b'{"result":{"allow":"yes"}}'),
    "result_null": Mode(body=b'{"result":null}'),
    "result_list": Mode(body=b'{"result":[true]}'),
    "status_400": Mode(status=400, body=OPA_ERROR),
    "status_404": Mode(status=404, body=b'{"code":"resource_not_found","message":"not found"}'),
    "status_500": Mode(status=500, body=b'{"code":"internal_error","message":"boom"}'),
    "status_503": Mode(status=503, body=b"unavailable", content_type="text/plain"),
    "redirect": Mode(status=302, body=b"", extra_headers=(("Location", "http://127.0.0.1:1/allow"),)),
    "status_500_allow": Mode(status=500, body=b'{"result":true}'),
    "not_json": Mode(body=b"allow"),
    "html": Mode(body=b"<html><body>true</body></html>", content_type="text/html"),
    "truncated": Mode(body=b'{"result":tr'),
    "array": Mode(body=b"[true]"),
    "wrong_content_type": Mode(body=b'{"result":true}', content_type="text/plain"),
    "no_content_type": Mode(body=b'{"result":true}', content_type=None),
    "duplicate_keys": Mode(body=b'{"result":false,"result":true}'),
    "duplicate_nested": Mode(body=b'{"result":{"allow":false,"allow":true}}'),
    "trailing_data": Mode(body=b'{"result":true}{"result":true}'),
    "huge": Mode(body=b'{"result":true,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'),
    "short_body": Mode(body=b'{"result":true}', content_length=40),
    "close": Mode(action="close"),
    "reset": Mode(action="reset", body=b'{"result":true,"pad":"' + b"x" * 4096 + b'"}'),
    "hang": Mode(action="hang"),
    "refuse": Mode(action="refuse"),
    "slow_allow": Mode(delay=0.05),
    "slow_deny": Mode(delay=0.05, body=b'{"result":false}'),
}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FaultPdp:
    """Serves `mode` on 127.0.0.1:`port`. Change `mode` at any time; `requests` records what arrived."""

    mode: Mode = field(default_factory=Mode)
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    hang_limit: float = 30.0
    tls: ssl.SSLContext | None = None  # a server context: serve HTTPS instead of HTTP
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1/data/pep/authz"

    def set(self, name_or_mode: str | Mode) -> None:
        mode = MODES[name_or_mode] if isinstance(name_or_mode, str) else name_or_mode
        self.mode = mode

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def apply(self, name_or_mode: str | Mode) -> None:
        """Switch mode, starting or stopping the listener for `refuse`."""
        self.set(name_or_mode)
        if self.mode.action == "refuse":
            await self.stop_listening()
        elif self._server is None:
            await self.start()

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.close()

    async def stop(self) -> None:
        await self.stop_listening()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                try:
                    parsed = orjson.loads(body)
                except orjson.JSONDecodeError:
                    parsed = body
                self.requests.append(Seen(path, headers, parsed))
                if not await self._act(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _act(self, writer: asyncio.StreamWriter) -> bool:
        mode = self.mode
        if mode.delay:
            await asyncio.sleep(mode.delay)
        if mode.action == "close":
            return False
        if mode.action == "hang":
            await asyncio.sleep(self.hang_limit)
            return False
        body = mode.body
        length = len(body) if mode.content_length is None else mode.content_length
        head = [f"HTTP/1.1 {mode.status} X", f"Content-Length: {length}"]
        if mode.content_type:
            head.append(f"Content-Type: {mode.content_type}")
        head.extend(f"{k}: {v}" for k, v in mode.extra_headers)
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        if mode.action == "reset":
            writer.write(raw[: len(raw) // 2])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        writer.write(raw)
        await writer.drain()
        return mode.content_length is None
