"""A lean HTTP/1.1 client for the PDP: pooled keep-alive connections, framing built once per URL, and
httptools (llhttp, the parser of Node.js, as uvicorn uses it) to read the answers.

Why not aiohttp's client here: a decision is one small POST and one small JSON answer, and the benchmark showed
aiohttp's general-purpose client (cookies, redirects, timers, tracing hooks, URL handling) costing a fifth of
the PEP's CPU per request on this call alone. What the PDP exchange needs is narrow and is all here: one
origin per URL, `Content-Length` or chunked or close-delimited answers, gzip/deflate bodies, a size limit, TLS,
and a connection that is never reused unless its answer was read to the end. A cancelled exchange (the decision
deadline) aborts its connection: its state is unknown, so it is never handed to the next decision.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

IDLE_S = 30.0  # an idle connection older than this is closed rather than reused
MAX_HEADER_BYTES = 65536
_BAD_VALUE = frozenset("\r\n\0")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Bytes a reason phrase may not hold (RFC 9112: HTAB, SP, VCHAR, obs-text): llhttp passes the other controls.
_BAD_REASON = bytes(b for b in range(32) if b != 9) + b"\x7f"


class ExchangeError(Exception):
    """The connection failed before a complete answer arrived (refused, reset, closed early, unparsable)."""


class RequestError(ValueError):
    """The request cannot be framed (a header value outside Latin-1 or with a line break): nothing was sent.
    A ValueError, as before it had its own name: callers that only need "nothing was sent" keep catching that."""


class NotAdmitted(Exception):
    """The caller's `admit` said no right before the request would have gone out: nothing was sent."""


class Answer:
    """A complete answer: status, the headers the PEP reads, the body (decoded), and what went wrong with it."""

    __slots__ = ("body", "cache_control", "content_type", "oversize", "request_id", "status", "undecodable")

    def __init__(self) -> None:
        self.status = 0
        self.content_type = ""
        self.request_id: str | None = None
        self.cache_control: str | None = None
        self.body = b""
        self.oversize = False
        self.undecodable = False


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = time.monotonic()
        self._waiter: asyncio.Future[Answer] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._answer = Answer()
        self._chunks: list[bytes] = []
        self._size = 0
        self._header_bytes = 0
        self._codings: list[str] = []  # Content-Encoding, every field, in order
        self._framed = False  # Content-Length or chunked: the end of the body is known without EOF
        self._headers_done = False
        self._keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ExchangeError(f"unparsable answer: {exc}"))
        except httptools.HttpParserUpgrade:  # not an HttpParserError: a 101 answer switching protocols
            self._fail(ExchangeError("unparsable answer: a protocol upgrade"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._framed and not self._answer.oversize:
                self._complete()  # a body delimited by the end of the connection
            else:
                self._fail(ExchangeError("connection closed before a complete answer"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._parser is None:  # another message after the answer, in the same read: nobody asked for it
            raise httptools.HttpParserError("data after the answer")

    def on_status(self, reason: bytes) -> None:
        if reason.translate(None, _BAD_REASON) != reason:
            raise httptools.HttpParserError("a control character in the status line")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("answer headers too large")
        key = name.lower()
        if key == b"content-type":
            self._answer.content_type = value.decode("latin-1")
        elif key == b"x-request-id":
            self._answer.request_id = value.decode("latin-1")
        elif key == b"cache-control":
            self._answer.cache_control = value.decode("latin-1")
        elif key == b"content-encoding":  # repeated fields are one list (RFC 9110 5.3): codings in order
            self._codings += [c for c in value.decode("latin-1").lower().split(",") if c.strip(" \t")]
        elif key == b"content-length":
            self._framed = True
            if value.strip().isdigit() and int(value) > self._limit:
                self._answer.oversize = True
        elif key == b"transfer-encoding":
            self._framed = True
            if value.strip().lower() != b"chunked":  # a coding under the chunks that is not undone here
                self._answer.undecodable = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the final one follows on the same connection
            self._answer = Answer()  # none of its headers describe the final answer
            self._codings, self._framed = [], False
            return
        self._answer.status = status
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._answer.oversize:
            self._finish_now()

    def on_body(self, body: bytes) -> None:
        if self._answer.oversize:
            return
        self._size += len(body)
        if self._size > self._limit:  # compressed or not: the bytes on the wire are bounded too
            self._answer.oversize = True
            self._finish_now()
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._headers_done or self._parser is None:  # an interim 1xx answer's end, or an answer handed over
            return
        self._complete()

    # the exchange
    async def exchange(self, data: bytes) -> Answer:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._answer = Answer()
        self._chunks, self._size, self._header_bytes = [], 0, 0
        self._codings, self._framed, self._headers_done, self._keep_alive = [], False, False, False
        self.transport.write(data)
        answer: Answer = await waiter
        return answer

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and self._parser is None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _complete(self) -> None:
        answer = self._answer
        body = b"".join(self._chunks)
        if self._codings and not answer.oversize:
            body = self._decode(body, answer)
        answer.body = body
        self._parser = None
        self.used = time.monotonic()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    def _decode(self, body: bytes, answer: Answer) -> bytes:
        """The body under its one content coding, whole: gzip (one member) or deflate (one zlib stream) and
        nothing after it. A second gzip member, or any byte after the end of the stream, is trailing data (the
        body is undecodable, so `pdp_malformed`): read as one member, `gzip(allow) + gzip(deny)` allowed. So is a
        coding not listed here, or several codings (the client asks for none; a PDP has no reason to stack
        them). The output is bounded by the limit too, whatever the ratio (a decompression bomb is oversize)."""
        codings = [c.strip(" \t") for c in self._codings]
        codings = [c for c in codings if c != "identity"]
        if not codings:
            return body
        wbits = _WBITS.get(codings[0]) if len(codings) == 1 else None
        if wbits is None:
            answer.undecodable = True
            return b""
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, self._limit + 1)
            if len(out) > self._limit:
                answer.oversize = True
                return b""
            if not d.eof or d.unused_data or d.unconsumed_tail:
                raise zlib.error("incomplete compressed body, or data after its end")
            return out
        except zlib.error:
            answer.undecodable = True
            return b""

    def _finish_now(self) -> None:
        """An answer over the limit: report it without reading the rest, and never reuse the connection."""
        self._keep_alive = False
        answer = self._answer
        self._parser = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)
        self.abort()

    def _fail(self, exc: Exception) -> None:
        self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()


class _Target:
    """What is constant for one URL: where to connect, and the request's first lines."""

    __slots__ = ("head", "host", "key", "port", "tls_name")

    def __init__(self, method: str, url: str, fixed: bytes, tls: bool) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host, self.port = host, port
        self.tls_name = host if tls else None
        self.key = (parts.scheme, host, port)
        default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
        shown = f"[{host}]" if ":" in host else host
        authority = shown if default else f"{shown}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.head = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii") + fixed


class Http1Client:
    """Keep-alive connections per origin, at most `max_connections` exchanges at once."""

    def __init__(
        self, max_response_bytes: int, max_connections: int, tls: ssl.SSLContext | None, fixed_headers: str
    ) -> None:
        self._limit = max_response_bytes
        self._tls = tls if tls is not None else ssl.create_default_context()  # https: verified either way
        self._fixed = fixed_headers.encode("ascii")
        self._targets: dict[tuple[str, str], _Target] = {}
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._all: set[_Connection] = set()

    def _target(self, method: str, url: str) -> _Target:
        target = self._targets.get((method, url))
        if target is None:
            if len(self._targets) > 64:
                self._targets.clear()
            target = self._targets[method, url] = _Target(method, url, self._fixed, url.startswith("https://"))
        return target

    async def exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        admit: Callable[[], bool] | None = None,
    ) -> Answer:
        """One request and its complete answer. Raises ExchangeError or OSError (the exchange failed),
        RequestError (a header value) or ValueError (the URL) before anything is sent, and NotAdmitted when
        `admit` says no: it is asked before a connection is made or taken, and again right before the request
        is written."""
        target = self._target(method, url)
        lines = [target.head]
        for name, value in headers.items():
            if _BAD_VALUE.intersection(value):
                raise RequestError(f"header {name} holds a line break or NUL")
            try:
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            except UnicodeEncodeError:
                raise RequestError(f"header {name} holds a character outside Latin-1") from None
        lines.append(f"Content-Length: {len(body)}\r\n\r\n".encode("ascii") if body is not None else b"\r\n")
        if body is not None:
            lines.append(body)
        data = b"".join(lines)
        async with self._slots:
            # Asked before connecting (a refused or failed connect is the PDP's failure, so the call must count)
            # and again right before the request is written, with nothing awaited in between: a new connection
            # takes a round trip, during which the circuit may have opened.
            if admit is not None and not admit():
                raise NotAdmitted
            conn = await self._connection(target)
            if admit is not None and not admit():
                self._idle.setdefault(target.key, deque()).append(conn)  # unused: still good for the next one
                raise NotAdmitted
            try:
                answer = await conn.exchange(data)
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: its state is unknown
                self._all.discard(conn)
                raise
            if conn.reusable:
                idle = self._idle.setdefault(target.key, deque())
                idle.append(conn)
                # Reuse is last-in first-out, so the oldest idle connections sit at the left: close those past
                # IDLE_S here, or a burst would keep its high-water mark of connections open for good.
                while idle and conn.used - idle[0].used >= IDLE_S:
                    stale = idle.popleft()
                    stale.abort()
                    self._all.discard(stale)
            else:
                conn.abort()
                self._all.discard(conn)
            return answer

    async def _connection(self, target: _Target) -> _Connection:
        idle = self._idle.get(target.key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.used < IDLE_S:
                return conn
            conn.abort()
            self._all.discard(conn)
        loop = asyncio.get_running_loop()
        limit = self._limit
        _, protocol = await loop.create_connection(
            lambda: _Connection(limit),
            target.host,
            target.port,
            ssl=self._tls if target.tls_name else None,
            server_hostname=target.tls_name,
        )
        self._all.add(protocol)
        return protocol

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
