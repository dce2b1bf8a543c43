"""Keep-alive connections to upstreams (and, later, the PDP), per origin, never reused after anything but a
clean, complete exchange, and never used to send a request twice.

Per origin (scheme, host, port, TLS context): idle connections are reused last-in first-out (the warmest
first; the coldest expire), at most `max_per_origin` are open at once, and a request that finds them all busy
waits for one no longer than its `pool_s`. A connection is returned to the pool only when its answer was read to
the end (see connection.py); everything else closes it. A connection that breaks after the request was
written is an UpstreamReset for the caller, whose request may have been delivered: it is not resent, here or
anywhere (one allow, at most one delivery). Failures come as the typed errors of errors.py, whose `kind` is
the proxy's metric label.

Why not aiohttp's or httpx's client: both resend some requests on a connection that dropped (aiohttp needs a
private switch to stop it), and their generality (cookies, redirects, URL objects, tracing hooks) was most of
the PEP's CPU per request. httpcore's pool is the model for the shape.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from operator import itemgetter
from types import TracebackType
from typing import Final, NamedTuple

from multidict import CIMultiDictProxy
from mypy_extensions import mypyc_attr

from pep.http1 import (
    DEFAULT_LIMITS,
    Fields,
    Framing,
    InformationalResponse,
    Limits,
    LocalProtocolError,
    RequestStart,
    Response,
    request_head,
)
from pep.transport.connection import Body, UpstreamConnection
from pep.transport.errors import ConnectFailed, ConnectTimeout, NotAdmitted, PoolTimeout, ResponseTooLarge
from pep.transport.headers import header_view

_NO_BODY: Final = Framing.NONE
SWEEP_SLACK_S = 1.0  # idle connections past their time are closed together, at most this late
_NAME: Final = itemgetter(0)
_RESERVED: Final = frozenset({b"content-length", b"transfer-encoding"})
_RESERVED_LENGTHS: Final = frozenset(len(n) for n in _RESERVED)
# Names already found to be tokens (the writer took them) and not one of those: a process sends the same few dozen
# again and again, and one set look-up per name (in C, through map) is a fraction of lower-casing each (a new bytes
# object, hashed), and spares the writer its own look-up of the names. Bounded: cleared when full, and only names
# up to _UNRESERVED_NAME_BYTES are kept (a caller's long names cost the checks).
_UNRESERVED: Final[set[bytes]] = set()
_UNRESERVED_MAX: Final = 1024
_UNRESERVED_NAME_BYTES: Final = 64


class Origin(NamedTuple):
    """Where a request goes: connections are pooled per origin. `tls` is compared by identity: requests with
    different contexts never share a connection. (A tuple: hashed and compared in C on every request.)"""

    scheme: str  # "http" or "https"
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # required for https: verification is the caller's choice, made explicit


def _check(origin: Origin) -> None:
    if (origin.scheme == "https") != (origin.tls is not None):
        raise ValueError("an https origin needs a TLS context, and only it")


class _Slots:
    """One origin's connections: the idle ones, how many are open, and who waits for one."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ClientResponse:
    """An answer's head, and its body as an async stream. Read the body to its end (or `close()`), else the
    connection is closed rather than reused; `async with` closes it."""

    __slots__ = (
        "_conn",
        "_headers",
        "_pool",
        "_read_s",
        "_slots",
        "content_length",
        "fields",
        "framing",
        "informational",
        "keep_alive",
        "reason",
        "status",
        "version",
    )

    def __init__(
        self,
        pool: Pool,
        slots: _Slots,
        conn: UpstreamConnection,
        head: Response,
        informational: list[InformationalResponse],
        read_s: float,
    ) -> None:
        self._pool = pool
        self._slots = slots
        self._conn: UpstreamConnection | None = conn
        self._read_s = read_s
        self._headers: CIMultiDictProxy[str] | None = None
        self.status = head.status
        self.reason = head.reason
        self.version = head.version
        self.fields = head.headers
        self.framing = head.framing
        self.content_length = head.content_length
        self.keep_alive = head.keep_alive
        # 1xx answers before this one, 100 Continue excepted (103 Early Hints): kept, not relayed (aiohttp's
        # client, which this replaces, dropped them as well)
        self.informational = informational

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = header_view(self.fields)
        return headers

    @property
    def complete(self) -> bool:
        """The body was read to its end (the connection is back in the pool or closed)."""
        return self._conn is None

    def _take(self) -> bytes | None:
        """The rest of the body if it is all here (the connection then goes back): see `take_body`."""
        conn = self._conn
        if conn is None:
            return b""
        body = conn.take_body()
        if body is not None:
            self._conn = None
            self._pool._release(self._slots, conn)
        return body

    async def read(self) -> bytes:
        """The next body chunk; b"" at the end. Each wait is bounded by the request's `read_s`."""
        conn = self._conn
        if conn is None:
            return b""
        body = conn.take_body()  # the rest at once if it is all here (`_take`, without its frame)
        if body is not None:
            self._conn = None
            self._pool._release(self._slots, conn)
            return body
        try:
            while (chunk := conn.next_chunk()) is None:
                await conn.wait_read(self._read_s)
        except BaseException:
            self._conn = None
            self._pool._discard(self._slots, conn)
            raise
        if not chunk:
            self._conn = None
            self._pool._release(self._slots, conn)
        return chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_all(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (ResponseTooLarge: at the head for a Content-Length)."""
        if self.content_length is not None and self.content_length > limit:
            self.close()
            raise ResponseTooLarge(f"Content-Length {self.content_length} over {limit} bytes")
        conn = self._conn
        if conn is None:
            return b""
        body = conn.take_body()  # the rest at once if it is all here (`_take`, without its frame)
        if body is not None:
            self._conn = None
            self._pool._release(self._slots, conn)
            return body
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = conn.next_chunk()
                if chunk is None:
                    await conn.wait_read(self._read_s)
                    continue
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"body over {limit} bytes")
                chunks.append(chunk)
        except BaseException:
            self._conn = None
            self._pool._discard(self._slots, conn)
            raise
        self._conn = None
        self._pool._release(self._slots, conn)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Done with this answer: a connection whose answer was not read to its end is closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._discard(self._slots, conn)

    async def __aenter__(self) -> ClientResponse:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _refuse_reserved(fields: Fields) -> None:
    """Raise for the first field the pool writes itself (the caller found a name not in `_UNRESERVED`)."""
    for name, _ in fields:
        if len(name) in _RESERVED_LENGTHS and name.lower() in _RESERVED:
            raise LocalProtocolError(f"{name.decode()} is written by the pool, not the caller")


def _remember(fields: Fields) -> None:
    """The names of a head the writer accepted and `_refuse_reserved` let through: tokens, not reserved."""
    if len(_UNRESERVED) >= _UNRESERVED_MAX:
        _UNRESERVED.clear()
    _UNRESERVED.update([name for name, _ in fields if len(name) <= _UNRESERVED_NAME_BYTES])


@mypyc_attr(allow_interpreted_subclasses=True)  # a test holds up its `_connect` in a subclass
class Pool:
    """Keep-alive HTTP/1.1 connections per origin (see the module docstring)."""

    def __init__(
        self,
        *,
        max_per_origin: int = 100,
        idle_s: float = 30.0,
        limits: Limits = DEFAULT_LIMITS,
        max_body_bytes: int | None = None,
        high_water: int = 262144,
    ) -> None:
        self.max_per_origin = max_per_origin
        self.idle_s = idle_s
        self._limits = limits
        self._max_body = max_body_bytes
        self._high = high_water
        self._origins: dict[Origin, _Slots] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # the running loop, at first use
        self._sweep: asyncio.TimerHandle | None = None  # closes idle connections past their time (one per pool)

    def idle_count(self, origin: Origin) -> int:
        slots = self._origins.get(origin)
        return len(slots.idle) if slots is not None else 0

    def open_count(self, origin: Origin) -> int:
        slots = self._origins.get(origin)
        return slots.open if slots is not None else 0

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: Body = None,
        *,
        length: int | None = None,
        connect_s: float = 10.0,
        read_s: float = 30.0,
        pool_s: float | None = None,
        admit: Callable[[], bool] | None = None,
    ) -> ClientResponse:
        """Send one request and return its answer's head, the body to be read from the ClientResponse.

        `fields` are the caller's (Host included); the framing is the pool's: bytes get a Content-Length, an
        async iterator of chunks is sent chunked, or with `length` as Content-Length (held to it exactly).
        Every wait is bounded: connecting by `connect_s`, a free connection by `pool_s` (default `connect_s`),
        each read and each wait to write by `read_s` (any of them math.inf: no bound of the pool's, the caller
        has its own deadline). Raises UpstreamError subclasses; an exception from the body iterator (the
        caller's side failed) propagates as it is. A cancellation closes the connection.

        `admit`, if given, is asked before a connection is taken or made, and again right before the request is
        written, with nothing awaited in between: a no raises NotAdmitted (nothing sent; a connection taken or
        made for the request goes back to the pool unused)."""
        known = _UNRESERVED.issuperset(map(_NAME, fields))  # in C: names seen before are not looked at again
        if not known:
            _refuse_reserved(fields)
        if type(body) is bytes:
            head = request_head(method, target, fields, length=len(body), names_checked=known)
        elif body is None:
            head = request_head(method, target, fields, names_checked=known)
            if length is not None:
                raise LocalProtocolError("a length without a body")
        elif length is not None:
            head = request_head(method, target, fields, length=length, names_checked=known)
        else:
            head = (
                request_head(method, target, fields, names_checked=known)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
            )
        if not known:
            _remember(fields)
        slots, conn = self._ready(origin, admit)
        if conn is None:
            conn = await self._made(origin, slots, connect_s, pool_s, admit)
        try:
            conn.send(method, head, body, length, read_s)
            response, informational = await conn.read_head(read_s)
        except BaseException:
            conn.close()
            raise
        answer = ClientResponse(self, slots, conn, response, informational, read_s)
        if response.framing is _NO_BODY:
            answer._take()  # nothing to read: the connection goes back now
        return answer

    async def fetch(
        self,
        origin: Origin,
        start: RequestStart,
        fields: Fields,
        body: bytes | None,
        *,
        limit: int,
        connect_s: float = 10.0,
        read_s: float = 30.0,
        pool_s: float | None = None,
        admit: Callable[[], bool] | None = None,
    ) -> tuple[Response, bytes | None]:
        """One request with a bytes body (or none) and its whole answer: the final head and the body, or None
        for a body longer than `limit` (the connection is closed then). For small answers read whole (a PDP's
        decision, a token endpoint's answer): the connection reads the answer as it arrives and the caller wakes
        once, without a ClientResponse or a wait per chunk. `start`: the request line and fixed fields, checked
        once by the caller; `fields`: this request's own. 1xx answers are dropped. Everything else as `request`:
        the bounds, `admit`, the errors, no resend, a cancellation closes the connection."""
        known = _UNRESERVED.issuperset(map(_NAME, fields))  # in C: names seen before are not looked at again
        if not known:
            _refuse_reserved(fields)
        if not _RESERVED.isdisjoint(start.names):
            raise LocalProtocolError("Content-Length and Transfer-Encoding are written by the pool, not the caller")
        head = start.head(fields, None if body is None else len(body), names_checked=known)
        if not known:
            _remember(fields)
        slots, conn = self._ready(origin, admit)
        if conn is None:
            conn = await self._made(origin, slots, connect_s, pool_s, admit)
        try:
            answer = await conn.fetch(start.method, head, body, limit, read_s)
        except BaseException:
            conn.close()
            raise
        self._release(slots, conn)
        return answer

    def _ready(self, origin: Origin, admit: Callable[[], bool] | None) -> tuple[_Slots, UpstreamConnection | None]:
        """The origin's slots and the warmest idle connection still usable, if any (the others are closed on the
        way), with `admit` asked before one is taken and again once it is there. None: one is to be waited for
        or made (`_made`). Not a coroutine: most requests find an idle connection, and await nothing here."""
        slots = self._origins.get(origin)
        if slots is None:
            _check(origin)
            slots = self._origins[origin] = _Slots()
            self._loop = asyncio.get_running_loop()
        if admit is not None and not admit():
            raise NotAdmitted("not admitted before a connection was taken")
        conn = self._idle(slots) if slots.idle else None
        if conn is not None and admit is not None and not admit():  # right before the first byte, as for a new one
            self._unused(slots, conn)
            raise NotAdmitted("not admitted when the request was about to be written")
        return slots, conn

    async def _made(
        self,
        origin: Origin,
        slots: _Slots,
        connect_s: float,
        pool_s: float | None,
        admit: Callable[[], bool] | None,
    ) -> UpstreamConnection:
        """A connection for one request when none was idle (freed by another within `pool_s`, or made), with
        `admit` asked again once it is there, nothing awaited between that and the caller's first byte."""
        conn = await self._acquire(origin, slots, connect_s, connect_s if pool_s is None else pool_s)
        if not conn.open():  # closed by the server between the connect and now: nothing was sent on it
            conn.close()
            raise ConnectFailed(f"{origin.host}:{origin.port}: closed by the server before the request")
        if admit is not None and not admit():  # right before the first byte: the circuit may have opened meanwhile
            self._unused(slots, conn)
            raise NotAdmitted("not admitted when the request was about to be written")
        return conn

    def _idle(self, slots: _Slots) -> UpstreamConnection | None:
        """The warmest idle connection still usable, if any (the others are closed on the way)."""
        idle = slots.idle
        if idle:
            now = self._loop.time()
            while idle:
                conn = idle.pop()
                if conn.expires > now and conn.unpark():
                    return conn
                conn.close()
        return None

    async def _acquire(self, origin: Origin, slots: _Slots, connect_s: float, pool_s: float) -> UpstreamConnection:
        loop = self._loop
        deadline = 0.0
        while True:
            conn = self._idle(slots)
            if conn is not None:
                return conn
            if slots.open < self.max_per_origin:
                break
            if not deadline:
                deadline = loop.time() + pool_s
            left = deadline - loop.time()
            if left <= 0:
                raise PoolTimeout(f"all {self.max_per_origin} connections to {origin.host}:{origin.port} busy")
            waiter = loop.create_future()
            slots.waiters.append(waiter)
            timer = loop.call_later(left, _expire, waiter) if left != math.inf else None
            try:
                await waiter
            except TimeoutError:
                raise PoolTimeout(
                    f"all {self.max_per_origin} connections to {origin.host}:{origin.port} busy for {pool_s:g} s"
                ) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    slots.wake()  # woken, but leaving: the wake goes to the next in line
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if not waiter.done():
                    waiter.cancel()
        return await self._connect(origin, slots, connect_s)

    async def _connect(self, origin: Origin, slots: _Slots, connect_s: float) -> UpstreamConnection:
        """A new connection, counted in `slots.open` until it is gone (its `on_close`)."""
        slots.open += 1
        loop = self._loop
        conn = UpstreamConnection(loop, self._limits, self._max_body, self._high, lambda: self._gone(slots, conn))
        bounded = connect_s != math.inf
        try:
            async with asyncio.timeout(connect_s if bounded else None):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=origin.tls,
                    server_hostname=origin.host if origin.tls is not None else None,
                    ssl_handshake_timeout=connect_s if origin.tls is not None and bounded else None,
                )
        except TimeoutError:
            conn.close()
            raise ConnectTimeout(f"no connection to {origin.host}:{origin.port} within {connect_s:g} s") from None
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            conn.close()
            raise ConnectFailed(f"{origin.host}:{origin.port}: {exc}", exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, slots: _Slots, conn: UpstreamConnection) -> None:
        """An exchange ended at the end of its answer: pooled if the connection may carry another."""
        if self._closed:
            conn.close()
            return
        loop_time = self._loop.time()
        keep = self.idle_s if conn.keep_alive_s is None else min(self.idle_s, conn.keep_alive_s)
        if keep <= 0 or not conn.repark(loop_time + keep):  # not reusable: closed
            conn.close()
            return
        idle = slots.idle
        idle.append(conn)
        while idle[0].expires <= loop_time:  # the coldest, past their time (never the one just parked)
            idle.popleft().close()
        if self._sweep is None and keep != math.inf:
            self._sweep = self._loop.call_at(loop_time + keep + SWEEP_SLACK_S, self._swept)
        if slots.waiters:
            slots.wake()

    def _swept(self) -> None:
        """Close the idle connections past their time, which nothing else would do once requests stop coming
        (an idle connection is otherwise looked at only when one is parked or taken); then come back at the
        next one's time. One timer per pool, not per request: a connection may outlive its time by up to
        SWEEP_SLACK_S."""
        self._sweep = None
        if self._closed:
            return
        now = self._loop.time()
        soonest = math.inf
        for slots in self._origins.values():
            idle = slots.idle
            if not idle:
                continue
            for conn in [conn for conn in idle if conn.expires <= now]:
                idle.remove(conn)
                conn.close()
            for conn in idle:
                soonest = min(soonest, conn.expires)
        if soonest != math.inf:
            self._sweep = self._loop.call_at(soonest + SWEEP_SLACK_S, self._swept)

    def _unused(self, slots: _Slots, conn: UpstreamConnection) -> None:
        """A connection taken or made for a request that was not sent after all: idle again, as it was."""
        if self._closed:
            conn.close()
            return
        conn.park(self._loop.time() + self.idle_s)
        slots.idle.append(conn)
        if self._sweep is None and self.idle_s != math.inf:
            self._sweep = self._loop.call_at(self._loop.time() + self.idle_s + SWEEP_SLACK_S, self._swept)
        if slots.waiters:
            slots.wake()

    def _discard(self, slots: _Slots, conn: UpstreamConnection) -> None:
        """Closed, never reused (its slot frees at once, through `_gone`)."""
        conn.close()

    def _gone(self, slots: _Slots, conn: UpstreamConnection) -> None:
        """Called once per connection, when it is closed by either side."""
        slots.open -= 1
        if conn in slots.idle:
            slots.idle.remove(conn)
        slots.wake()

    async def close(self) -> None:
        """Close every idle connection; those in use close when their exchange ends."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for slots in self._origins.values():
            while slots.idle:
                slots.idle.pop().close()
