"""The answer to one request, as the handler writes it: whole in one write, or streamed with backpressure.

The writer owns the framing fields: it writes `Content-Length`, `Transfer-Encoding` and `Connection` itself
and refuses them from the caller, so an answer's head and body can never disagree (the client would read the
rest as another answer). Whether the connection closes after the answer is decided when its head is written:
when asked (`close_after`), when the request was its connection's last, when the listener is shutting down,
and when the request's body is not complete by then (where the next request would begin is unknown).
"""

from __future__ import annotations

import enum
import http
from operator import itemgetter, methodcaller
from typing import Final, Protocol

from pep.http1 import BodyWriter, Fields, Framing, LocalProtocolError, Request, response_head
from pep.transport.body import BodyState, RequestBody
from pep.transport.errors import ClientGone
from pep.transport.flow import WriteFlow

_NONE: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED_FRAMING: Final = Framing.CHUNKED
_CLOSE_FRAMING: Final = Framing.CLOSE
_REASONS: Final = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}
_BODY_DONE: Final = BodyState.DONE
_NO_BODY_STATUS: Final = frozenset({204, 304})
_RESERVED: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_RESERVED_LENGTHS: Final = frozenset(len(n) for n in _RESERVED)
_CLOSE: Final = (b"Connection", b"close")
_KEEP_ALIVE: Final = (b"Connection", b"keep-alive")
_CHUNKED: Final = (b"Transfer-Encoding", b"chunked")
_NAME: Final = itemgetter(0)
_LOWER: Final = methodcaller("lower")
_CLOSE_LINE: Final = b"Connection: close\r\n\r\n"
_KEEP_ALIVE_LINE: Final = b"Connection: keep-alive\r\n\r\n"


class Sink(Protocol):
    """What an answer needs from its connection (the listener's protocol)."""

    @property
    def flow(self) -> WriteFlow: ...

    @property
    def closing(self) -> bool:
        """The listener is shutting down: this answer is the connection's last."""

    @property
    def send_s(self) -> float:
        """How long a write waits for the client to take what was written before."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class ResponseState(enum.Enum):
    NEW = "new"  # nothing written yet
    STREAMING = "streaming"  # the head is out, body bytes may follow
    DONE = "done"  # the whole answer is written
    ABORTED = "aborted"  # the connection was reset instead


_NEW: Final = ResponseState.NEW
_STREAMING: Final = ResponseState.STREAMING
_DONE: Final = ResponseState.DONE
_ABORTED: Final = ResponseState.ABORTED


def _check_fields(fields: Fields) -> None:
    if _RESERVED_LENGTHS.isdisjoint(map(len, map(_NAME, fields))):  # in C: most answers have none
        return
    if _RESERVED.isdisjoint(map(_LOWER, map(_NAME, fields))):  # in C: a name of one of the lengths, not reserved
        return
    for name, _ in fields:
        if len(name) in _RESERVED_LENGTHS and name.lower() in _RESERVED:
            raise LocalProtocolError(f"{name.decode()} is written by the transport, not the caller")


class Response:
    """`send` a whole answer in one write; or `start`, `write` (awaits the client's pace) and `end`."""

    __slots__ = ("_body", "_close", "_head_only", "_keep_alive", "_sink", "_state", "_version", "_writer", "closes")

    def __init__(self, sink: Sink, request: Request, body: RequestBody) -> None:
        self._sink = sink
        self._body = body
        self._head_only = request.method == b"HEAD"
        self._version = request.version
        self._keep_alive = request.keep_alive
        self._close = False
        self._state = _NEW
        self._writer: BodyWriter | None = None
        self.closes = False  # decided with the head: the connection ends after this answer

    @property
    def state(self) -> ResponseState:
        return self._state

    @property
    def started(self) -> bool:
        return self._state is not _NEW

    @property
    def done(self) -> bool:
        return self._state is _DONE

    def close_after(self) -> None:
        """End the connection after this answer (`Connection: close` if the head is not out yet)."""
        self._close = True
        self.closes = self.closes or self._state is not _NEW

    def _closes(self, framing_closes: bool) -> bool:
        closes = framing_closes or self._close or not self._keep_alive or self._sink.closing or not self._body.settle()
        self.closes = closes
        return closes

    def _connection(self, closes: bool) -> tuple[bytes, bytes] | None:
        if closes:
            return _CLOSE
        return _KEEP_ALIVE if self._version == b"1.0" else None

    def send(self, status: int, fields: Fields, body: bytes = b"", reason: bytes = b"") -> None:
        """The whole answer in one write: head, `Content-Length`, body (none to HEAD, 204 or 304)."""
        if self._state is not _NEW:
            raise LocalProtocolError(f"send in state {self._state.name}")
        if status < 200:
            raise LocalProtocolError("a final answer needs a status of 200 or more")
        if not _RESERVED_LENGTHS.isdisjoint(map(len, map(_NAME, fields))) and not _RESERVED.isdisjoint(
            map(_LOWER, map(_NAME, fields))
        ):  # `_check_fields`'s tests, without its frame
            _check_fields(fields)
        head = response_head(status, fields, reason or _REASONS.get(status, b""))
        # the framing lines are the writer's own, added to the checked head before its empty line
        if status in _NO_BODY_STATUS:
            if body:
                raise LocalProtocolError(f"a {status} answer has no body")
            framing = b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
            if self._head_only:
                body = b""
        request_body = self._body
        closes = (
            self._close
            or not self._keep_alive
            or self._sink.closing
            or (request_body._state is not _BODY_DONE and not request_body.settle())  # (settle: True once done)
        )
        self.closes = closes
        if closes:
            end = _CLOSE_LINE
        elif self._version == b"1.0":
            end = _KEEP_ALIVE_LINE
        else:
            end = b"\r\n"
        self._state = _DONE
        self._sink.write(b"".join((head[:-2], framing, end, body)))  # one write, one copy

    def start(self, status: int, fields: Fields, length: int | None = None, reason: bytes = b"") -> None:
        """Write the head of a streamed answer: `length` bytes will follow (Content-Length), or, with None, a
        chunked body (an HTTP/1.0 client: a body that ends when the connection closes)."""
        if self._state is not _NEW:
            raise LocalProtocolError(f"start in state {self._state.name}")
        if status < 200:
            raise LocalProtocolError("a final answer needs a status of 200 or more")
        _check_fields(fields)
        extra = []
        framing_closes = False
        if status == 204:
            if length:
                raise LocalProtocolError("a 204 answer has no body")
            writer = BodyWriter(_NONE)
        elif self._head_only or status == 304:
            if length is not None:
                extra.append((b"Content-Length", b"%d" % length))  # what a GET would have had
            writer = BodyWriter(_NONE)
        elif length is not None:
            extra.append((b"Content-Length", b"%d" % length))
            writer = BodyWriter(_LENGTH, length)
        elif self._version == b"1.1":
            extra.append(_CHUNKED)
            writer = BodyWriter(_CHUNKED_FRAMING)
        else:
            framing_closes = True
            writer = BodyWriter(_CLOSE_FRAMING)
        connection = self._connection(self._closes(framing_closes))
        if connection is not None:
            extra.append(connection)
        head = response_head(status, fields + extra, reason or _REASONS.get(status, b""))
        self._writer = writer
        self._state = _STREAMING
        self._sink.write(head)

    async def write(self, data: bytes) -> None:
        """Body bytes, sent at once (an SSE event reaches the client as soon as it is written); returns when the
        client has taken enough of what was written before. Raises ClientGone when the client left, or took too
        little for `send_s` (the connection is then reset: a client that stops reading must not hold the
        answer's upstream connection for ever)."""
        writer = self._writer
        if self._state is not _STREAMING or writer is None:
            raise LocalProtocolError(f"write in state {self._state.name}")
        if not data:
            return
        out = writer.write(data)
        sink = self._sink
        flow = sink.flow
        if flow.error is not None:
            raise flow.error
        sink.write(out)
        if flow.paused:
            try:
                await flow.drain(sink.send_s)
            except TimeoutError:
                self.abort()
                raise ClientGone(f"the client took too little of the answer for {sink.send_s:g} s") from None

    def end(self, data: bytes = b"", trailers: Fields | None = None) -> None:
        """The last body bytes (if any) and the end of the body, in one write."""
        writer = self._writer
        if self._state is not _STREAMING or writer is None:
            raise LocalProtocolError(f"end in state {self._state.name}")
        out = writer.write(data) if data else b""
        out += writer.end(trailers)
        self._state = _DONE
        if out:
            self._sink.write(out)

    def switched(self) -> None:
        """The connection became a tunnel (the listener wrote its answer): nothing more is written here."""
        self._state = _DONE
        self.closes = True

    def abort(self) -> None:
        """Reset the connection now, mid-answer or after it: the client sees an answer cut short (a streamed
        body that broke), and a TLS connection ends without close_notify, so its session cannot be resumed.
        Bytes already handed to the kernel are still delivered."""
        if self._state is not _DONE:
            self._state = _ABORTED
        self.closes = True
        self._sink.abort()
