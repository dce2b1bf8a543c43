"""The client's side: the response to each request this side sent, for the PDP client and the upstream client.

The reader must be told what it is reading an answer to (`start(method)`), because framing depends on it: a
response to HEAD has no body whatever its fields say, nor do 1xx, 204 and 304 answers; a 2xx to CONNECT opens a
tunnel. Other bodies are chunked, Content-Length or, failing both, end with the connection (never reused then).

Rules beyond llhttp's own checks: HTTP/1.0 and 1.1 only; a status 100-599; a reason phrase without control
characters; a Transfer-Encoding only as exactly `chunked` (the PEP undoes no other coding, so it would misread
the body), and never on HTTP/1.0; 101 only when asked for; at most `max_informational` 1xx answers; and no byte
after a complete answer: a server that sends more than one answer per request may be answering something else,
so the extra bytes are an error and the connection is not used again. The answer itself stands (it ended before
them, and bytes that had not yet arrived could not change it either): EndOfMessage is handed out, and the next
call raises. Every error has status hint 502.
"""

from __future__ import annotations

import enum
from typing import Final

import httptools

from pep.http1.body import ChunkedBody, CloseBody
from pep.http1.errors import LocalProtocolError, ProtocolError
from pep.http1.events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Fields,
    Framing,
    InformationalResponse,
    Response,
    Signal,
)
from pep.http1.fields import KEEP_VALUE, VALUE, persists
from pep.http1.head import FieldSink, HeadScanner
from pep.http1.limits import DEFAULT_LIMITS, Limits
from pep.http1.message_reader import MessageReader


class ResponseState(enum.Enum):
    IDLE = "idle"  # no request outstanding: a byte now is one nobody asked for
    HEAD = "head"  # a request was sent: reading its answer's head (1xx answers come and go)
    BODY = "body"  # the final head was handed out; its body (maybe empty) is being read
    DONE = "done"  # the answer is complete
    SWITCHED = "switched"  # a 2xx to CONNECT or an accepted 101: the bytes after the head are not HTTP
    CLOSED = "closed"  # the server closed the connection with no exchange under way
    ERROR = "error"  # a protocol error: the connection must be closed

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code, run per transition


# Module aliases: reading a member off an Enum class runs Python code on 3.11 (EnumType.__getattr__).
_IDLE: Final = ResponseState.IDLE
_HEAD: Final = ResponseState.HEAD
_BODY: Final = ResponseState.BODY
_DONE: Final = ResponseState.DONE
_SWITCHED: Final = ResponseState.SWITCHED
_CLOSED: Final = ResponseState.CLOSED
_ERROR: Final = ResponseState.ERROR
_NO_BODY: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED
_CLOSE: Final = Framing.CLOSE
_TUNNEL: Final = Framing.TUNNEL

_NEXT: Final[dict[ResponseState, frozenset[ResponseState]]] = {
    _IDLE: frozenset({_HEAD, _CLOSED, _ERROR}),
    _HEAD: frozenset({_BODY, _SWITCHED, _ERROR}),
    _BODY: frozenset({_DONE, _ERROR}),
    _DONE: frozenset({_HEAD, _CLOSED, _ERROR}),
    _SWITCHED: frozenset(),
    _CLOSED: frozenset(),
    _ERROR: frozenset(),
}

_FRAMING_NAMES: Final[tuple[bytes, ...]] = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive")
_VERSIONS: Final = {b"HTTP/1.1 ": b"1.1", b"HTTP/1.0 ": b"1.0"}
_DIGITS: Final = b"0123456789"
# Every status `_status_line` accepts, as its three digits: a lookup checks and converts it at once.
_STATUSES: Final = {b"%d" % status: status for status in range(100, 600)}


# Status lines already checked, and what they gave: a server sends the same few again and again, and a lookup of
# the whole line is a fifth of checking it (bounded: lines up to 64 bytes, cleared when full).
_GOOD_LINES: Final[dict[bytes, tuple[bytes, int, bytes]]] = {}
_GOOD_LINES_MAX: Final = 256
_GOOD_LINE_BYTES: Final = 64


def _status_line(line: bytes) -> tuple[bytes, int, bytes]:
    """Version (b"1.1" or b"1.0"), status and reason phrase of a status line, checked before llhttp sees it."""
    known = _GOOD_LINES.get(line)
    if known is not None:
        return known
    version = _VERSIONS.get(line[:9])
    code = _STATUSES.get(line[9:12])
    if version is not None and code is not None and line[12:13] in (b" ", b""):  # the usual line
        reason = line[13:]
        if reason.translate(KEEP_VALUE) == reason:
            known = (version, code, reason)
            if len(line) <= _GOOD_LINE_BYTES:
                if len(_GOOD_LINES) >= _GOOD_LINES_MAX:
                    _GOOD_LINES.clear()
                _GOOD_LINES[line] = known
            return known
    if version is None:
        raise ProtocolError("not an HTTP/1.0 or HTTP/1.1 status line", 502)
    status = line[9:12]
    if len(status) != 3 or status.translate(None, _DIGITS) or not 100 <= int(status) <= 599:
        raise ProtocolError("malformed status code", 502)
    if line[12:13] not in (b"", b" ") or line[13:].translate(None, VALUE):
        raise ProtocolError("malformed reason phrase", 502)
    return version, int(status), line[13:]


class _ResponseFields(FieldSink):
    """An answer's fields, and its Content-Length, Transfer-Encoding, Connection and Keep-Alive (lists joined),
    noted as the head is handed over."""

    __slots__ = ("coding", "connection", "keep_alive", "length")

    def __init__(self) -> None:
        super().__init__(_FRAMING_NAMES)
        self.note([], [])

    def note(self, fields: Fields, picked: Fields) -> None:
        self.fields = fields
        length = coding = connection = keep_alive = None
        for key, value in picked:
            if key == b"content-length":
                length = value  # llhttp refused a second one, and anything but digits
            elif key == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif key == b"connection":
                connection = value if connection is None else connection + b"," + value
            elif key == b"keep-alive":
                keep_alive = value if keep_alive is None else keep_alive + b"," + value
        self.length: bytes | None = length
        self.coding: bytes | None = coding
        self.connection: bytes | None = connection
        self.keep_alive: bytes | None = keep_alive


class ResponseReader(MessageReader[ResponseState]):
    """Bytes from one server connection in, responses out. Per exchange: `start(method)` before (or as) the
    request is sent, then `receive_data` / `receive_eof` and `next_event` until EndOfMessage.

    `max_body_bytes` bounds every body (BodyTooLarge as soon as it is known: at the head for a Content-Length).
    `take_body` and the body's events: MessageReader.
    """

    __slots__ = ("_error", "_fields", "_head", "_informational", "_keep_alive", "_limits", "_method", "_upgrade")

    _NEXT = _NEXT
    _TOO_LARGE_HINT = 502
    _CUT_SHORT_HINT = 502

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_body_bytes: int | None = None) -> None:
        super().__init__(_IDLE, _BODY, _DONE, max_body_bytes)
        self._limits = limits
        self._fields = _ResponseFields()
        self._head = HeadScanner(limits, httptools.HttpResponseParser, _status_line, False, self._fields)
        self._error: ProtocolError | None = None
        self._keep_alive = False
        self._method = b""
        self._upgrade = False
        self._informational = 0

    @property
    def state(self) -> ResponseState:
        return self._state

    @property
    def reusable(self) -> bool:
        """The last answer was read to its end, may be followed by another, and nothing else has arrived."""
        return self._state is _DONE and self._keep_alive and not self._eof and not self.buf

    def start(self, method: bytes, *, upgrade: bool = False) -> None:
        """A request with this method is (being) sent; `upgrade`: it asked for a protocol switch, so a 101 is an
        answer rather than an error."""
        state = self._state
        if state is not _IDLE and not (state is _DONE and self._keep_alive):
            raise LocalProtocolError(f"start in state {state.name}")
        if self._eof:
            raise LocalProtocolError("start after the server closed the connection")
        if self.buf:
            self._fail(ProtocolError("bytes from the server before the request", 502))
        self._method = method
        self._upgrade = upgrade
        self._informational = 0
        self._state = _HEAD  # IDLE or DONE -> HEAD

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        if self._eof:
            raise LocalProtocolError("data after the end of the stream")
        state = self._state
        if state is _ERROR:
            return
        if state is _SWITCHED or state is _CLOSED:
            raise LocalProtocolError(f"data for a reader in state {state.name}")
        self.buf += data

    def trailing_data(self) -> bytes:
        """After a switch (SWITCHED): the bytes received after the head, which belong to the new protocol."""
        if self._state is not _SWITCHED:
            raise LocalProtocolError("trailing_data is for a switched connection")
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def next_event(self) -> InformationalResponse | Response | Data | EndOfMessage | ConnectionClosed | Signal:
        state = self._state
        try:
            if state is _BODY:
                return self._read_body()
            if state is _HEAD:
                return self._read_head()
            if state is _IDLE or state is _DONE:
                if self.buf:
                    what = "after the answer" if state is _DONE else "nobody asked for"
                    raise ProtocolError(f"bytes {what}", 502)
                if self._eof:
                    self._move(_CLOSED)
                    return ConnectionClosed()
                return PAUSED
        except ProtocolError as exc:
            self._fail(exc)
        if state is _CLOSED:
            return ConnectionClosed()
        if state is _SWITCHED:
            return PAUSED
        assert self._error is not None
        raise self._error

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        if self._state is not _ERROR:
            self._move(_ERROR)
        self.buf.clear()
        raise exc

    def _read_head(self) -> InformationalResponse | Response | Signal:
        line = self._head.scan(self.buf)
        if line is None:
            if self._eof:
                raise ProtocolError("the connection closed before a complete answer", 502)
            return NEED_DATA
        version, status, reason = line
        sink = self._fields
        fields, length, coding = sink.fields, sink.length, sink.coding
        connection, keep_alive_field = sink.connection, sink.keep_alive
        if len(fields) > self._limits.max_fields:
            raise ProtocolError(f"more than {self._limits.max_fields} header fields", 502)
        if coding is not None and (coding.lower() != b"chunked" or version == b"1.0"):  # on a 1xx too
            raise ProtocolError("Transfer-Encoding other than chunked, or on HTTP/1.0", 502)
        if status < 200:
            return self._informational_response(status, reason, version, fields)
        if connection is None:
            keep_alive = version == b"1.1"
        elif len(connection) == 10 and connection.lower() == b"keep-alive":  # what most servers send
            keep_alive = True
        else:
            keep_alive = persists(version, connection)
        method = self._method
        content_length: int | None = None
        if status >= 300 or method != b"CONNECT":
            if status in {204, 304} or method == b"HEAD":
                framing = _NO_BODY
                self._remaining = 0
            elif coding is not None:
                framing = _CHUNKED
                self._body = ChunkedBody(self._limits, self._max_body, server=False)
            elif length is not None:
                framing = _LENGTH
                self._remaining = content_length = int(length)
            else:
                framing = _CLOSE
                keep_alive = False
                self._body = CloseBody(self._max_body, server=False)
            self._read = 0
            self._state = _BODY  # HEAD -> BODY
        else:
            framing = _TUNNEL
            keep_alive = False
            self._state = _SWITCHED  # HEAD -> SWITCHED
        self._keep_alive = keep_alive
        return Response(status, reason, version, fields, framing, content_length, keep_alive, keep_alive_field)

    def _informational_response(
        self, status: int, reason: bytes, version: bytes, fields: Fields
    ) -> InformationalResponse:
        if status == 101:
            if not self._upgrade:
                raise ProtocolError("101 Switching Protocols to a request that asked for no switch", 502)
            self._move(_SWITCHED)
        else:
            self._informational += 1
            if self._informational > self._limits.max_informational:
                raise ProtocolError(f"more than {self._limits.max_informational} 1xx answers", 502)
        return InformationalResponse(status, reason, version, fields)
