"""One keep-alive connection to an upstream (or the PDP): one exchange at a time, read by the core's
ResponseReader, with backpressure both ways and every wait bounded.

An exchange writes a head (and a bytes body with it, in one system call when the loop pass ends: `Outbox`),
then reads the answer's head (100 Continue is consumed, other 1xx answers kept for the caller) and its body
chunk by chunk. A body given as an async iterator is sent by a writer task while the answer is read, as
aiohttp's client did: an upstream may answer before it has read the whole body (an error, or a full-duplex
stream), and each write waits until the upstream has taken enough of the ones before. An early final answer
that refuses (4xx, 5xx) stops the sending.

The connection is reusable only when the request went out whole, the answer was read to its end, may be
followed by another, and nothing else arrived; anything else (a failure, a cancellation, an early answer,
bytes nobody asked for while idle) closes it. Nothing is ever sent twice.

Waits cost no timer of their own: each sets its deadline, and the connection's one timer (armed at the first
deadline, moved only when it fires early) expires whatever wait has run out. A wait is a bare future, awaited
by the caller, and resolved by the protocol callbacks.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
from collections.abc import AsyncIterable, Callable
from typing import Final, cast

from pep.http1 import (
    NEED_DATA,
    BodyTooLarge,
    BodyWriter,
    Data,
    EndOfMessage,
    Framing,
    InformationalResponse,
    Limits,
    ProtocolError,
    Response,
    ResponseReader,
)
from pep.transport.errors import BadResponse, ResponseTooLarge, UpstreamReset, UpstreamTimeout
from pep.transport.outbox import Outbox

Body = bytes | AsyncIterable[bytes] | None
_KEEP_ALIVE_TIMEOUT: Final = re.compile(rb"(?:^|[,;\s])timeout\s*=\s*([0-9]{1,6})", re.IGNORECASE)


class LinkState(enum.Enum):
    IDLE = "idle"  # in the pool, no exchange: any byte that arrives now breaks it
    ACTIVE = "active"  # an exchange is under way
    CLOSED = "closed"  # failed, closed by either side, or not reusable

    __hash__ = object.__hash__


_IDLE: Final = LinkState.IDLE
_ACTIVE: Final = LinkState.ACTIVE
_CLOSED: Final = LinkState.CLOSED
_CHUNKED: Final = Framing.CHUNKED
_LENGTH: Final = Framing.LENGTH


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class UpstreamConnection(asyncio.Protocol):
    """See the module docstring. `on_close` is called once, when the connection is gone."""

    __slots__ = (
        "_eof",
        "_fetch",
        "_fetch_chunks",
        "_fetch_head",
        "_fetch_limit",
        "_fetch_size",
        "_high",
        "_loop",
        "_on_close",
        "_read_deadline",
        "_read_paused",
        "_read_s",
        "_reader_waiter",
        "_timer",
        "_write_deadline",
        "_write_paused",
        "_write_s",
        "_writer_waiter",
        "expires",
        "keep_alive_s",
        "outbox",
        "reader",
        "sent_whole",
        "state",
        "transport",
        "writer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limits: Limits,
        max_body: int | None,
        high_water: int,
        on_close: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.reader = ResponseReader(limits, max_body)
        self._high = high_water
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.outbox: Outbox | None = None  # every write to the transport, held until the loop pass ends
        self.state = _ACTIVE  # made for an exchange
        self._reader_waiter: asyncio.Future[None] | None = None
        self._writer_waiter: asyncio.Future[None] | None = None
        self._read_deadline = self._write_deadline = math.inf
        self._read_s = self._write_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._write_paused = False
        self._eof = False
        self.sent_whole = False
        self.writer: asyncio.Task[None] | None = None  # sends an iterated body while the answer is read
        self.expires = math.inf  # loop time after which an idle connection is not reused
        self.keep_alive_s: float | None = None  # the server's `Keep-Alive: timeout=N`, if it said
        # a whole answer being gathered in the callbacks (`fetch`): its future, limit, head and body so far
        self._fetch: asyncio.Future[tuple[Response, bytes | None]] | None = None
        self._fetch_limit = 0
        self._fetch_head: Response | None = None
        self._fetch_chunks: list[bytes] = []
        self._fetch_size = 0

    # --- asyncio.Protocol ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.outbox = Outbox(self._loop, t)
        t.set_write_buffer_limits(self._high, self._high // 4)

    def data_received(self, data: bytes) -> None:
        if self.state is not _ACTIVE:
            self.close()  # bytes nobody asked for: this connection cannot be trusted with another exchange
            return
        reader = self.reader
        reader.receive_data(data)
        if self._fetch is not None:
            if self._read_s != math.inf:
                self._read_deadline = self._loop.time() + self._read_s  # neither answered nor closed for read_s
            self._gather()
            return
        if not self._read_paused and len(reader.buf) > self._high:
            self._read_paused = True  # read on when the caller takes the bytes (`_taken`)
            self.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self._reader_waiter
        if waiter is not None:
            self._reader_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self._eof = True
        self.reader.receive_eof()
        if self._fetch is not None:
            self._gather()
        self._wake_both()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._eof:
            self._eof = True
            self.reader.receive_eof()
        self.state = _CLOSED
        if self._fetch is not None:
            self._gather()
        self._wake_both()
        self._closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._writer_waiter = self._writer_waiter, None
        _wake(waiter)

    def _wake_both(self) -> None:
        reader, self._reader_waiter = self._reader_waiter, None
        writer, self._writer_waiter = self._writer_waiter, None
        _wake(reader)
        _wake(writer)

    # --- state -------------------------------------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return self.state is _ACTIVE and self.sent_whole and self.reader.reusable and not self._eof

    def close(self) -> None:
        """Abort: never reused, whatever its state (a closed connection has no state to trust). A body still
        being sent stops."""
        self.state = _CLOSED
        writer = self.writer
        if writer is not None and not writer.done():
            writer.cancel()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(Outbox, self.outbox).drop()
            transport.abort()
        self._closed()

    def _closed(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        on_close, self._on_close = self._on_close, _nothing
        on_close()

    def park(self, expires: float) -> None:
        """Back in the pool after a complete exchange, until `expires` (loop time)."""
        self.state = _IDLE
        self.expires = expires
        self.writer = None

    def repark(self, expires: float) -> bool:
        """After an exchange: back in the pool until `expires` if the connection is `reusable` (True), else
        nothing changed (False: the caller closes it). One call where the pool made two."""
        if self.state is _ACTIVE and self.sent_whole and not self._eof and self.reader.reusable:
            self.state = _IDLE
            self.expires = expires
            self.writer = None
            return True
        return False

    def open(self) -> bool:
        """Still usable for the exchange it was made or taken for: the server has not closed it."""
        transport = self.transport
        return self.state is _ACTIVE and not self._eof and transport is not None and not transport.is_closing()

    def unpark(self) -> bool:
        """Taken from the pool for an exchange: False if it closed (or broke) while idle."""
        transport = self.transport
        if self.state is not _IDLE or self._eof or transport is None or transport.is_closing():
            return False
        self.state = _ACTIVE
        return True

    # --- waits -------------------------------------------------------------------------------------------------------

    def wait_read(self, read_s: float) -> asyncio.Future[None]:
        """A future resolved when something happens to the reading side (bytes, the end, the loss, the writer's
        end); UpstreamTimeout after `read_s` with nothing (never, for math.inf: the caller's own deadline). While
        the request body is still being sent the wait for the answer has not started: the writer's own waits are
        bounded, and its end wakes the reader, which then waits `read_s` afresh."""
        loop = self._loop
        waiter = self._reader_waiter = loop.create_future()
        self._read_s = read_s
        writer = self.writer
        sending = writer is not None and not writer.done()
        self._read_deadline = deadline = math.inf if sending else loop.time() + read_s
        timer = self._timer
        if (timer is None or timer.when() > deadline) and deadline != math.inf:
            self._arm(deadline)
        return waiter

    def _wait_write(self, write_s: float) -> asyncio.Future[None]:
        """As `wait_read`, for the writing side (the buffer drained, the loss)."""
        loop = self._loop
        waiter = self._writer_waiter = loop.create_future()
        self._write_s = write_s
        self._write_deadline = deadline = loop.time() + write_s
        timer = self._timer
        if (timer is None or timer.when() > deadline) and deadline != math.inf:
            self._arm(deadline)
        return waiter

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        pending = math.inf
        fetch = self._fetch
        if fetch is not None:
            if now >= self._read_deadline:
                self._fetched(UpstreamTimeout(f"the upstream neither answered nor closed for {self._read_s:g} s"))
            else:
                pending = self._read_deadline
        waiter = self._reader_waiter
        if waiter is not None and not waiter.done():
            if now >= self._read_deadline:
                self._reader_waiter = None
                waiter.set_exception(
                    UpstreamTimeout(f"the upstream neither answered nor closed for {self._read_s:g} s")
                )
            else:
                pending = self._read_deadline
        waiter = self._writer_waiter
        if waiter is not None and not waiter.done():
            if now >= self._write_deadline:
                self._writer_waiter = None
                waiter.set_exception(
                    UpstreamTimeout(
                        f"the upstream neither took more of the request body nor closed for {self._write_s:g} s"
                    )
                )
            else:
                pending = min(pending, self._write_deadline)
        if pending < math.inf and self.state is not _CLOSED:
            self._timer = self._loop.call_at(pending, self._on_timer)

    def _taken(self) -> None:
        if self._read_paused and self.state is _ACTIVE and len(self.reader.buf) <= self._high // 2:
            self._read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        if self.state is not _ACTIVE or self._eof:
            raise UpstreamReset("the upstream closed the connection while the request was being sent")
        cast(Outbox, self.outbox).write(data)

    # --- the exchange ------------------------------------------------------------------------------------------------

    def send(self, method: bytes, head: bytes, body: Body, length: int | None, read_s: float) -> None:
        """Start one request (the reader is told its method first): the head and a bytes body are written now,
        an iterated body by the writer task. `length` frames an iterated body with Content-Length (the head
        says so); without it the head says chunked."""
        if self.state is not _ACTIVE or self._eof:  # before the reader: a closed connection is the upstream's doing
            raise UpstreamReset("the upstream closed the connection before the request was sent")
        self.reader.start(method)
        self.sent_whole = False
        if body is None or type(body) is bytes:
            outbox = cast(Outbox, self.outbox)
            outbox.write(head)
            if body:
                outbox.write(body)  # with the head, in one writev at the end of the loop pass (or at once if large)
            self.sent_whole = True  # the transport sends what it holds while the answer is awaited
            return
        self._write(head)
        self.writer = writer = self._loop.create_task(self._pump(cast(AsyncIterable[bytes], body), length, read_s))
        writer.add_done_callback(self._pumped)

    async def _pump(self, body: AsyncIterable[bytes], length: int | None, read_s: float) -> None:
        frame = BodyWriter(_CHUNKED) if length is None else BodyWriter(_LENGTH, length)
        async for chunk in body:
            if chunk:
                self._write(frame.write(chunk))
            while self._write_paused and self.state is _ACTIVE:
                await self._wait_write(read_s)
        self._write(frame.end())
        self.sent_whole = True

    def _pumped(self, writer: asyncio.Task[None]) -> None:
        """The writer ended: on a failure (the caller's body broke, the upstream stopped taking it), the
        connection is closed and the reading side learns of it."""
        if not writer.cancelled() and writer.exception() is not None and self.state is not _CLOSED:
            self.state = _CLOSED  # (a cancelled writer was stopped on purpose: the answer is still read)
            transport = self.transport
            if transport is not None and not transport.is_closing():
                cast(Outbox, self.outbox).drop()
                transport.abort()
        waiter, self._reader_waiter = self._reader_waiter, None
        _wake(waiter)

    def _raise_writer_failure(self) -> None:
        """If the writer failed, its error is what the caller gets (a stalled client body is `body_timeout`,
        not an upstream `reset`)."""
        writer = self.writer
        if writer is not None and writer.done() and not writer.cancelled():
            exc = writer.exception()
            if exc is not None:
                raise exc

    def _failed(self, exc: ProtocolError) -> BadResponse | UpstreamReset:
        """What the caller gets for an answer that broke the core's rules (the connection is closed)."""
        if isinstance(exc, BodyTooLarge):
            self.close()
            return ResponseTooLarge(exc.reason)
        self._raise_writer_failure()
        self.close()
        if self._eof:
            return UpstreamReset(f"the upstream closed the connection: {exc.reason}")
        return BadResponse(exc.reason)

    async def read_head(self, read_s: float) -> tuple[Response, list[InformationalResponse]]:
        """The final answer's head; 100 Continue dropped, other 1xx answers (103) returned beside it."""
        informational: list[InformationalResponse] = []
        reader = self.reader
        while True:
            if not reader.buf and self.state is _ACTIVE and not self._eof:
                await self.wait_read(read_s)  # nothing to parse yet (the usual case, just after sending)
                if self.writer is not None:
                    self._raise_writer_failure()
            try:
                event = reader.next_event()
            except ProtocolError as exc:
                raise self._failed(exc) from None
            if type(event) is Response:
                writer = self.writer
                if writer is not None and not writer.done() and event.status >= 400:
                    writer.cancel()  # refused before the whole body arrived: the rest is not sent
                if event.keep_alive_field is not None:
                    self._keep_alive_hint(event)
                return event, informational
            if isinstance(event, InformationalResponse):
                if event.status != 100:
                    informational.append(event)
                continue
            if event is NEED_DATA:
                self._raise_writer_failure()
                if self.state is _CLOSED:
                    raise UpstreamReset("the connection was closed before the answer")
                self._taken()
                await self.wait_read(read_s)
                self._raise_writer_failure()
                continue
            self.close()
            raise UpstreamReset("the upstream closed the connection before answering")

    def fetch(
        self, method: bytes, head: bytes, body: bytes | None, limit: int, read_s: float
    ) -> asyncio.Future[tuple[Response, bytes | None]]:
        """Send one request with a bytes body (or none) and gather its whole answer in the protocol's callbacks,
        as the bytes arrive, so that the caller wakes once: a future of the final head and the body, or of None
        for a body longer than `limit` (known at the head for a Content-Length; the connection is then closed).
        1xx answers are dropped. Failures as `read_head` and `next_chunk` raise them; `read_s` bounds each
        wait for the upstream's bytes."""
        self.send(method, head, body, None, read_s)
        loop = self._loop
        fetch = self._fetch = loop.create_future()
        self._fetch_limit = limit
        self._fetch_head = None
        self._fetch_chunks = []
        self._fetch_size = 0
        self._read_s = read_s
        self._read_deadline = deadline = loop.time() + read_s
        timer = self._timer
        if (timer is None or timer.when() > deadline) and deadline != math.inf:
            self._arm(deadline)
        if self.reader.buf or self._eof:
            self._gather()
        return fetch

    def _gather(self) -> None:
        """Read on as far as the bytes go; complete the fetch at the end of the answer, or fail it."""
        reader = self.reader
        try:
            head = self._fetch_head
            while head is None:
                event = reader.next_event()
                if type(event) is Response:
                    head = self._fetch_head = event
                    if event.keep_alive_field is not None:
                        self._keep_alive_hint(event)
                    length = event.content_length
                    if length is not None and length > self._fetch_limit:
                        self.close()
                        self._fetched((event, None))
                        return
                elif isinstance(event, InformationalResponse):
                    continue
                elif event is NEED_DATA:
                    return
                else:
                    self.close()
                    raise UpstreamReset("the upstream closed the connection before answering")
            body = reader.take_body()
            if body is not None:
                chunks = self._fetch_chunks
                if chunks:
                    chunks.append(body)
                    body = b"".join(chunks)
                self._fetched((head, body))
                return
            while True:
                event = reader.next_event()
                if type(event) is Data:
                    data = event.data
                    self._fetch_size += len(data)
                    if self._fetch_size > self._fetch_limit:
                        self.close()
                        self._fetched((head, None))
                        return
                    self._fetch_chunks.append(data)
                elif type(event) is EndOfMessage:
                    self._fetched((head, b"".join(self._fetch_chunks)))
                    return
                elif event is NEED_DATA:
                    return
                else:  # pragma: no cover - the reader gives Data, EndOfMessage or NEED_DATA inside a body
                    self.close()
                    raise UpstreamReset(f"unexpected {event!r} inside a body")
        except ProtocolError as exc:
            self._fetched(self._failed(exc))
        except UpstreamReset as upstream_reset:
            self._fetched(upstream_reset)

    def _fetched(self, outcome: tuple[Response, bytes | None] | BaseException) -> None:
        fetch = self._fetch
        self._fetch = None
        self._fetch_chunks = []
        if fetch is None or fetch.done():
            return
        if isinstance(outcome, BaseException):
            fetch.set_exception(outcome)
        else:
            fetch.set_result(outcome)

    def take_body(self) -> bytes | None:
        """The rest of the body at once, if it is all here and framed by Content-Length (or absent): see
        ResponseReader.take_body. None otherwise (read on with `next_chunk`)."""
        body = self.reader.take_body()
        if body is not None:
            if self._read_paused:
                self._taken()
            writer = self.writer
            if writer is not None and not writer.done():
                self.close()  # the answer ended before the request did: not reusable
        return body

    def _keep_alive_hint(self, response: Response) -> None:
        field = response.keep_alive_field
        if field is not None and response.keep_alive:
            m = _KEEP_ALIVE_TIMEOUT.search(field)
            if m is not None:
                self.keep_alive_s = max(0.0, int(m.group(1)) - 1.0)  # its timer started before ours

    def next_chunk(self) -> bytes | None:
        """The next body chunk if one is here: b"" at the end of the body, None until more bytes arrive (then
        `wait_read`). Raises the caller's UpstreamError for a broken answer, the connection closed."""
        try:
            event = self.reader.next_event()
        except ProtocolError as exc:
            raise self._failed(exc) from None
        kind = type(event)
        if kind is Data:
            if self._read_paused:
                self._taken()
            return event.data  # type: ignore[union-attr]
        if kind is EndOfMessage:
            if self._read_paused:
                self._taken()
            writer = self.writer
            if writer is not None and not writer.done():
                self.close()  # the answer ended before the request did: not reusable
            return b""
        if event is NEED_DATA:
            if self.writer is not None:
                self._raise_writer_failure()
            self._taken()
            return None
        self.close()  # pragma: no cover - the reader gives Data, EndOfMessage or NEED_DATA inside a body
        raise UpstreamReset(f"unexpected {event!r} inside a body")

    async def read_chunk(self, read_s: float) -> bytes:
        """The next body chunk, b"" at the end of the body."""
        while True:
            chunk = self.next_chunk()
            if chunk is not None:
                return chunk
            await self.wait_read(read_s)


def _nothing() -> None:
    return None
