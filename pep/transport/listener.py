"""The agent-facing listener: an asyncio protocol per connection that feeds the core's RequestReader and hands
each complete request head to the handler, one at a time.

Per connection, in order: wait for a head (idle deadline until its first byte, head deadline from there to its
end, against slowloris), hand it to the handler in a task of its own, and read the next head only once that
task has returned with its answer complete. Pipelined requests wait unparsed in the reader's buffer meanwhile,
and the socket stops being read when that buffer passes the high-water mark, as it does while a handler is not
reading a body: a client can make the listener hold at most about `read_high_water` bytes (plus one read).
Answers are bounded the same way: while the client has not taken the last ones (the transport's buffer is over
`write_high_water`), no pipelined request is read, a streamed answer's writer waits at most `send_s`, and a
deadline that passes with answer bytes still unsent drops them (an abort) rather than wait on a close.

A protocol error answers its status hint (400, 414, 431, 501, 505) and closes; `on_protocol_error` lets the
caller log and count it, and give the answer's fields and body. The client going away cancels a handler whose
answer is not complete, so that its upstream call is cancelled too. An answer that closes the connection ends
with a lingering close: the write side is shut, what the client still sends is read and dropped for up to
`linger_s`, so that an unread body does not turn the close into a reset that destroys the answer in flight.

uvloop or asyncio: both set TCP_NODELAY on accepted sockets. Every write goes through the connection's `Outbox`:
held until the loop has run the callbacks ready now, then sent in one system call with whatever else this pass
wrote to the connection, so a small answer is one segment and a streamed event is held for one loop pass at most.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

from multidict import CIMultiDictProxy

from pep.http1 import (
    DEFAULT_LIMITS,
    NEED_DATA,
    ConnectionClosed,
    Fields,
    Limits,
    LocalProtocolError,
    ProtocolError,
    Request,
    RequestReader,
    RequestState,
    response_head,
)
from pep.transport.body import RequestBody
from pep.transport.errors import BodyTimeout, ClientGone
from pep.transport.flow import WriteFlow
from pep.transport.headers import header_view
from pep.transport.outbox import Outbox
from pep.transport.response import Response, ResponseState
from pep.transport.tunnel import Pipe

log: Final = logging.getLogger("pep.transport")

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
ESTABLISHED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    """Bounds of the listener; the defaults are what the PEP's aiohttp listener applied."""

    limits: Limits = DEFAULT_LIMITS  # request line, fields, head size (the core's)
    max_body_bytes: int | None = None  # every request body (413); routes apply their own limits on top
    idle_s: float = 75.0  # a kept-alive connection waits this long for the first byte of its next request
    head_s: float = 75.0  # from a head's first byte to its end (slowloris)
    body_chunk_s: float = 10.0  # each wait for request body bytes (BodyTimeout)
    handshake_s: float = 10.0  # a TLS handshake
    linger_s: float = 2.0  # after a closing answer, how long the client's further bytes are read and dropped
    read_high_water: int = 262144  # unread request bytes held before the socket is paused
    write_high_water: int = 65536  # unsent answer bytes before a writer waits
    write_low_water: int = 16384
    send_s: float = 75.0  # how long a writer waits for the client to take answer bytes (then: reset)
    max_connections: int | None = None  # open at once; one more is reset as it arrives (`on_refused` told)


DEFAULT_OPTIONS: Final = ListenerOptions()


class RequestLine(NamedTuple):
    """The first line of a head refused before it was whole, as far as it could be split (for a log)."""

    method: bytes
    target: bytes
    version: bytes


class ConnectionInfo:
    """What a connection's exchanges share: the peer, the scheme, and the TLS object (mTLS identity)."""

    __slots__ = ("local", "peer", "scheme", "ssl_object")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.peer: tuple[Any, ...] | None = transport.get_extra_info("peername")
        self.local: tuple[Any, ...] | None = transport.get_extra_info("sockname")
        ssl_object = transport.get_extra_info("ssl_object")
        self.ssl_object: ssl.SSLObject | None = ssl_object if isinstance(ssl_object, ssl.SSLObject) else None
        self.scheme = "https" if ssl_object is not None else "http"


# What a protocol error is answered with: its fields and body (the status is the error's hint). None: the default.
ErrorAnswer = tuple[Fields, bytes]
ProtocolErrorHook = Callable[[ProtocolError, RequestLine | None, ConnectionInfo], ErrorAnswer | None]
Handler = Callable[["Exchange"], Coroutine[Any, Any, None]]


class Exchange:
    """One request and its answer, handed to the handler: the checked head, the body, the response writer."""

    __slots__ = ("_conn", "_continued", "_headers", "body", "connection", "head", "response")

    def __init__(self, conn: _Connection, head: Request) -> None:
        self._conn = conn
        self.head = head
        self.connection = conn.info
        self.body = RequestBody(conn, head, conn.options.body_chunk_s)
        self.response = Response(conn, head, self.body)
        self._headers: CIMultiDictProxy[str] | None = None
        self._continued = False

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The fields as a case-insensitive multi-valued view (built on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = header_view(self.head.headers)
        return headers

    @property
    def method(self) -> str:
        return self.head.method.decode("ascii")

    @property
    def target(self) -> str:
        """The request target as sent (aiohttp's `raw_path`)."""
        return self.head.target.decode("utf-8", "surrogateescape")

    def send_continue(self) -> None:
        """`100 Continue`, once, if the client asked for it (`Expect: 100-continue`) and no answer has started:
        sent only when the caller decides the body is wanted (after the allow, or to inspect it)."""
        if self.head.expect_continue and not self._continued and not self.response.started:
            self._continued = True
            self._conn.write(CONTINUE)

    def switch(self, answer: bytes = ESTABLISHED) -> Pipe:
        """An accepted CONNECT: write `answer` and hand over the connection as a Pipe for `tunnel.splice`, with
        the bytes the client sent after its head already in it. Nothing more is read as HTTP."""
        return self._conn.switch(self, answer)


class ConnState(enum.Enum):
    WAITING = "waiting"  # for (the rest of) a request head
    BUSY = "busy"  # a handler has the current request
    SWITCHED = "switched"  # handed over to a tunnel
    LINGERING = "lingering"  # the last answer is written; dropping what the client still sends
    CLOSED = "closed"

    __hash__ = object.__hash__


_WAITING: Final = ConnState.WAITING
_BUSY: Final = ConnState.BUSY
_SWITCHED: Final = ConnState.SWITCHED
_LINGERING: Final = ConnState.LINGERING
_CLOSED: Final = ConnState.CLOSED
_Request = Request
_ANSWERED: Final = ResponseState.DONE
_UNANSWERED: Final = ResponseState.NEW
_HEAD_STARTED: Final = RequestState.HEAD
_INF: Final = math.inf


class _Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    info: ConnectionInfo  # set when the connection is made, before any request

    __slots__ = (
        "_backlog",
        "_body_timer",
        "_body_waiter",
        "_deadline",
        "_handler",
        "_held",
        "_listener",
        "_read_paused",
        "_timer",
        "closing",
        "exchange",
        "flow",
        "info",
        "loop",
        "options",
        "outbox",
        "reader",
        "state",
        "task",
        "transport",
    )

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self.options = options = listener.options
        self.loop = listener.loop
        self.reader = RequestReader(options.limits, options.max_body_bytes)
        self.state = _WAITING
        self.flow = WriteFlow()
        self.transport: asyncio.Transport | None = None
        self.outbox: Outbox | None = None  # every write to the transport, held until the loop pass ends
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self._read_paused = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = math.inf
        self._held = False  # waiting for the client to take the answers so far before reading the next request
        self._backlog = math.inf  # answer bytes unsent at the last deadline (`_expire`)
        self._handler = listener.handler
        self.closing = listener.closing  # the listener is shutting down: the next answer is the last (shutdown)

    # --- asyncio.Protocol ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.outbox = Outbox(self.loop, t)
        self.info = ConnectionInfo(t)
        options = self.options
        t.set_write_buffer_limits(options.write_high_water, options.write_low_water)
        listener = self._listener
        if options.max_connections is not None and len(listener.connections) >= options.max_connections:
            self.state = _CLOSED
            t.abort()  # at once, before anything is read: a reset tells the client, and costs nothing held
            if listener.on_refused is not None:
                listener.on_refused()
            return
        listener.connections.add(self)
        if listener.closing:
            t.close()
            return
        self._arm(self.loop.time() + options.idle_s)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _LINGERING:
            return
        self.reader.receive_data(data)
        if state is _WAITING:
            if not self._held:  # else the answers before are not taken yet: the next request waits
                self._next_request()
                if self.state is not _BUSY and self.state is not _WAITING:
                    return  # refused (lingering) or closed: what comes now is dropped, not held
        else:
            waiter = self._body_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if not self._read_paused and len(self.reader.buf) > self.options.read_high_water:
            self._read_paused = True
            cast(asyncio.Transport, self.transport).pause_reading()

    def eof_received(self) -> bool | None:
        # The client closed its side: like aiohttp, that is the client leaving (its handler is cancelled when
        # the transport closes, below). A body read under way sees the end first.
        self.reader.receive_eof()
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self._disarm()
        self.flow.lose(ClientGone("the client closed the connection"))
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientGone("the client closed the connection"))
        self._listener.forget(self)
        task = self.task
        exchange = self.exchange
        if task is not None and exchange is not None and exchange.response.state is not _ANSWERED:
            task.cancel()  # a departing caller cancels the upstream call

    @property
    def send_s(self) -> float:
        return self.options.send_s

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()
        if self._held and self.state is _WAITING:
            self._held = False
            self._read_on()

    # --- requests ----------------------------------------------------------------------------------------------------

    def _next_request(self) -> None:
        reader = self.reader
        try:
            event = reader.next_event()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if type(event) is _Request:
            # The handler's task: one per request, so that the client leaving cancels only its own request.
            self.state = _BUSY
            self._deadline = _INF
            self.exchange = exchange = Exchange(self, event)
            self.task = task = self.loop.create_task(self._handler(exchange))
            # (bound anew each time: kept on the connection, the bound method would make the connection a reference
            # cycle, freed only by the collector, and a TLS session is dropped only when its connection is freed)
            task.add_done_callback(self._handler_done)
        elif event is NEED_DATA:
            if reader.state is _HEAD_STARTED and self._deadline - self.loop.time() > self.options.head_s:
                self._arm(self.loop.time() + self.options.head_s)  # the head has begun: its own deadline
        elif type(event) is ConnectionClosed:
            self._close()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        exchange = self.exchange
        self.task = self.exchange = None
        if task.cancelled():
            pass
        elif (exc := task.exception()) is not None:
            log.error("request handler failed", exc_info=exc)
        state = self.state
        if state is _SWITCHED:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.abort()  # the handler is done with its tunnel (or failed before splicing): it ends here
            return
        if state is _CLOSED or exchange is None:
            return
        response = exchange.response
        if response._state is not _ANSWERED:
            if response._state is _UNANSWERED:
                log.error("request handler returned without an answer")
                response.close_after()
                response.send(500, [(b"Content-Type", b"text/plain")], b"no answer\n")
            else:
                self.abort()  # an answer cut short: only a reset says so
                return
        if response.closes:
            self._linger()
            return
        if not self.reader.start_next():  # pragma: no cover - `closes` is set whenever the request was the last
            self._linger()
            return
        self.state = _WAITING
        self._deadline = deadline = self.loop.time() + self.options.idle_s
        timer = self._timer
        if timer is None or timer.when() > deadline:  # else the timer comes earlier and moves on (`_arm`)
            self._arm(deadline)
        if self.flow.paused:
            # The client has not taken the answers so far: a pipelined request is neither read nor answered
            # until it does (`resume_writing`), or the idle deadline cuts it off. Otherwise a client that sends
            # requests and never reads would make the listener buffer every answer.
            self._held = True
            if not self._read_paused:
                self._read_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self._read_paused:
            self._read_on()
        elif self.reader.buf:  # the next request came while this one was answered: `_read_on`'s first step
            self._next_request()

    def _read_on(self) -> None:
        """Waiting for the next request: read from the socket again unless enough is buffered already (a
        pipelining client is held to `read_high_water`, as a body is), and take a pipelined request."""
        if self.reader.buf:
            self._next_request()  # a pipelined request (read only now, after the answer before it)
        state = self.state
        if self._read_paused and (
            state is _WAITING or (state is _BUSY and len(self.reader.buf) <= self.options.read_high_water // 2)
        ):
            self._read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _protocol_error(self, exc: ProtocolError) -> None:
        line = self.reader.error_line
        parts = line.split(b" ")
        partial = RequestLine(*parts) if len(parts) == 3 else None
        hook = self._listener.on_protocol_error
        answer: ErrorAnswer | None = None
        if hook is not None:
            try:
                answer = hook(exc, partial, self.info)
            except Exception:
                log.exception("on_protocol_error failed")
        fields, body = answer if answer is not None else ([(b"Content-Type", b"text/plain")], exc.reason.encode())
        status = exc.status_hint
        try:
            head = response_head(
                status, [*fields, (b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")], b""
            )
        except LocalProtocolError:
            log.exception("on_protocol_error gave fields that cannot be sent")
            head, body = response_head(status, [(b"Content-Length", b"0"), (b"Connection", b"close")], b""), b""
        self.write(head + body)
        self._linger()

    # --- what the body and the answer use ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        outbox = self.outbox
        if outbox is not None and self.state is not _CLOSED:
            outbox.write(data)

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and self.state is not _CLOSED:
            self.state = _LINGERING  # nothing more is read; connection_lost follows
            cast(Outbox, self.outbox).flush()  # an answer written is sent before the reset (answer, then abort)
            transport.abort()

    async def wait_body(self, seconds: float) -> None:
        if self.state is _CLOSED:
            raise ClientGone("the client closed the connection")
        loop = self.loop
        self._body_waiter = waiter = loop.create_future()
        self._body_timer = loop.call_later(seconds, self._body_timeout, waiter)
        if self._read_paused:
            self._read_paused = False
            cast(asyncio.Transport, self.transport).resume_reading()
        try:
            await waiter
        finally:
            self._body_timer.cancel()
            self._body_waiter = None

    @staticmethod
    def _body_timeout(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(BodyTimeout("no request body bytes within the deadline"))

    def body_taken(self) -> None:
        if self._read_paused and len(self.reader.buf) <= self.options.read_high_water // 2:
            self._read_paused = False
            cast(asyncio.Transport, self.transport).resume_reading()

    def body_failed(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response.close_after()

    def switch(self, exchange: Exchange, answer: bytes) -> Pipe:
        if exchange is not self.exchange or exchange.head.method != b"CONNECT" or exchange.response.started:
            raise LocalProtocolError("switch() is for the current CONNECT request, before any answer")
        if exchange.body.settle() is not True:  # pragma: no cover - CONNECT has no body
            raise LocalProtocolError("the CONNECT request is not complete")
        early = self.reader.switch()
        transport = cast(asyncio.Transport, self.transport)
        self.state = _SWITCHED
        self._disarm()
        exchange.response.switched()
        cast(Outbox, self.outbox).flush()  # the tunnel writes to the transport itself from now on
        transport.write(answer)
        pipe = Pipe(transport, self.options.read_high_water, on_lost=lambda: self._listener.forget(self))
        pipe.take_over(early, paused=self._read_paused)
        self._read_paused = False
        return pipe

    # --- timers and closing ------------------------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        """The connection's one deadline timer (idle, then head): re-armed lazily, so a kept-alive request that
        arrives in one read costs no timer churn."""
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)
        elif timer.when() > deadline:
            timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _disarm(self) -> None:
        self._deadline = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        state = self.state
        if state is _LINGERING:
            self._expire()
            return
        if state is not _WAITING or self._deadline == math.inf:
            return  # busy: re-armed when the connection waits again
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._expire()  # idle, a head too slow, or answers not taken: closed without an answer, as aiohttp did

    def _expire(self) -> None:
        """A deadline passed: close. A close waits until the client has taken every answer byte, for ever if it
        reads nothing; so bytes still unsent are dropped (an abort), unless the client is still taking them (fewer
        than at the last deadline): then it gets another `linger_s`."""
        transport = self.transport
        if transport is None or self.state is _CLOSED:
            return
        unsent = transport.get_write_buffer_size() + cast(Outbox, self.outbox).held
        if not unsent:
            self._close()
            return
        self.state = _LINGERING
        if unsent < self._backlog:
            self._backlog = float(unsent)
            self._timer = self.loop.call_later(self.options.linger_s, self._on_timer)
            return
        cast(Outbox, self.outbox).drop()  # as the transport's own unsent bytes are
        transport.abort()

    def _linger(self) -> None:
        transport = self.transport
        if transport is None or self.state is _CLOSED or self.state is _LINGERING:
            return
        self.state = _LINGERING
        self._deadline = math.inf
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        cast(Outbox, self.outbox).flush()
        if self.info.ssl_object is None and transport.can_write_eof():
            transport.write_eof()  # sends what is buffered, then FIN: the answer is complete for the client
        else:
            transport.close()  # (TLS: close_notify after what is buffered)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.options.linger_s, self._on_timer)

    def _close(self) -> None:
        transport = self.transport
        if transport is not None and self.state is not _CLOSED:
            self.state = _LINGERING
            cast(Outbox, self.outbox).flush()
            transport.close()

    def shutdown(self) -> None:
        """The listener is closing: an idle connection closes now; a busy one after its answer."""
        self.closing = True
        if self.state is _WAITING:
            self._close()


class Listener:
    """A started listener: its address, its connections, and `close(grace)`."""

    def __init__(
        self,
        handler: Handler,
        options: ListenerOptions,
        on_protocol_error: ProtocolErrorHook | None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.handler = handler
        self.options = options
        self.on_protocol_error = on_protocol_error
        self.on_refused = on_refused
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._address = ("", 0)
        self._idle: asyncio.Event | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (port 0 asked the system for a free one)."""
        return self._address

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._idle is not None:
            self._idle.set()

    async def close(self, grace: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for up to `grace` seconds
        (their answers close their connections), then abort what is left and cancel its handlers."""
        self.closing = True
        server = self._server
        if server is not None:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            transport = conn.transport
            if transport is not None:
                cast(Outbox, conn.outbox).flush()
                transport.abort()
        if server is not None:
            await server.wait_closed()


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    ssl: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    backlog: int = 1024,
    options: ListenerOptions = DEFAULT_OPTIONS,
    on_protocol_error: ProtocolErrorHook | None = None,
    on_refused: Callable[[], None] | None = None,
) -> Listener:
    """Listen on host:port and hand each request to `handler` (an `async def handler(exchange)` that answers
    through `exchange.response`). With `ssl`, TLS (and mTLS, as the context requires) before any HTTP."""
    listener = Listener(handler, options, on_protocol_error, on_refused)
    listener._server = server = await listener.loop.create_server(
        lambda: _Connection(listener),
        host,
        port,
        ssl=ssl,
        reuse_port=reuse_port or None,
        backlog=backlog,
        ssl_handshake_timeout=options.handshake_s if ssl is not None else None,
    )
    sockets = cast(Any, server).sockets  # uvloop's is a list, not the tuple of typeshed (compiled code checks it)
    if not sockets:
        server.close()
        raise RuntimeError("the listener has no socket")
    bound = sockets[0].getsockname()
    listener._address = (str(bound[0]), int(bound[1]))
    return listener
