"""The listener's side: requests read from a client's bytes, one at a time, with the PEP's framing rules.

Rules beyond llhttp's own checks (each refused with a ProtocolError and its status hint):
- HTTP/1.0 and HTTP/1.1 only: any other version, HTTP/0.9's version-less line and the HTTP/2 preface get 505;
- Content-Length and Transfer-Encoding together, two Content-Length fields (equal or not), a Content-Length that
  is not digits, and a Transfer-Encoding other than exactly `chunked` (in any case) are refused: the framing an
  upstream or another parser might read differently never reaches a handler;
- field lines: no obs-fold, no bare CR or LF, names are tokens, values hold no control character; at most
  `max_fields` of them, each at most `max_field_bytes`, the head at most `max_head_bytes`;
- the request line is `method SP target SP version` with single spaces, at most `max_line_bytes`; the method is
  one llhttp knows (501 otherwise); the target is in the form its method allows (RFC 9112 3.2);
- HTTP/1.1 needs exactly one Host, HTTP/1.0 at most one, and its value must be a host with an optional port;
- CONNECT carries no body; a chunked HTTP/1.0 request is read but closes the connection (RFC 9112 6.1).

Pipelining: the reader hands out one request, then PAUSED until `start_next()` (after the caller has answered);
later requests wait in the buffer, unparsed. Leading empty lines before a request line are skipped (RFC 9112 2.2).
"""

from __future__ import annotations

import enum
import re
from typing import Final

import httptools

from pep.http1.body import ChunkedBody
from pep.http1.errors import LocalProtocolError, ProtocolError
from pep.http1.events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Fields,
    Framing,
    Request,
    Signal,
    TargetForm,
)
from pep.http1.fields import TOKEN, comma_tokens, persists
from pep.http1.head import FieldSink, HeadScanner
from pep.http1.limits import DEFAULT_LIMITS, Limits
from pep.http1.message_reader import MessageReader


class RequestState(enum.Enum):
    IDLE = "idle"  # between requests: no byte of the next one yet
    HEAD = "head"  # part of a request head has arrived
    BODY = "body"  # the head was handed out; its body (maybe empty) is being read
    DONE = "done"  # the request is complete: paused until start_next() or switch()
    MUST_CLOSE = "must_close"  # the request was the connection's last: answer it, then close
    SWITCHED = "switched"  # an accepted CONNECT: the bytes after its head belong to the tunnel
    CLOSED = "closed"  # the client closed the connection between requests
    ERROR = "error"  # a protocol error: answer it (status_hint) and close

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code, run per transition


# Module aliases: reading a member off an Enum class runs Python code on 3.11 (EnumType.__getattr__).
_IDLE: Final = RequestState.IDLE
_HEAD: Final = RequestState.HEAD
_BODY: Final = RequestState.BODY
_DONE: Final = RequestState.DONE
_MUST_CLOSE: Final = RequestState.MUST_CLOSE
_SWITCHED: Final = RequestState.SWITCHED
_CLOSED: Final = RequestState.CLOSED
_ERROR: Final = RequestState.ERROR
_NO_BODY: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED
_ORIGIN_FORM: Final = TargetForm.ORIGIN
_ABSOLUTE_FORM: Final = TargetForm.ABSOLUTE
_AUTHORITY_FORM: Final = TargetForm.AUTHORITY
_ASTERISK_FORM: Final = TargetForm.ASTERISK

_NEXT: Final[dict[RequestState, frozenset[RequestState]]] = {
    _IDLE: frozenset({_HEAD, _CLOSED, _ERROR}),
    _HEAD: frozenset({_BODY, _ERROR}),
    _BODY: frozenset({_DONE, _ERROR}),
    _DONE: frozenset({_IDLE, _MUST_CLOSE, _SWITCHED}),
    _MUST_CLOSE: frozenset(),
    _SWITCHED: frozenset(),
    _CLOSED: frozenset(),
    _ERROR: frozenset(),
}

_VERSIONS: Final = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}
_ANY_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
# Tokens, and what most requests carry: `_request_line` takes them without a check of its own.
_USUAL_METHODS: Final = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"CONNECT"})
# RFC 3986 reg-name, IPv4 or IP-literal, then a port: a Host value (port optional and maybe empty) and
# CONNECT's authority-form (port required).
_HOST: Final = rb"(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]|[0-9A-Za-z.\-_~!$&'()*+,;=%]*)"
_HOST_VALUE: Final = re.compile(_HOST + rb"(?::[0-9]*)?")
_AUTHORITY: Final = re.compile(_HOST + rb":([0-9]{1,5})")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
_CONNECT: Final = b"CONNECT"
# Host values already found well-formed: a client sends the same one on every request (bounded: cleared when full)
_GOOD_HOSTS: Final[set[bytes]] = set()
_GOOD_HOSTS_MAX: Final = 256
_FRAMING_NAMES: Final[tuple[bytes, ...]] = (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect")


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """Method, target and version (b"1.1" or b"1.0") of a request line, checked before llhttp sees it."""
    parts = line.split(b" ")
    if len(parts) == 3:  # the usual line first: a method every client sends, a target, a version
        method, target, version = parts
        short = _VERSIONS.get(version)
        if short is not None and method in _USUAL_METHODS and target:
            return method, target, short
    if len(parts) == 3:
        method, target, version = parts
        short = _VERSIONS.get(version)
        if short is None:
            if _ANY_VERSION.fullmatch(version):
                raise ProtocolError(f"HTTP version {version[5:].decode()} is not supported", 505)
            raise ProtocolError("malformed request line (version)")
        if not method or method.translate(None, TOKEN):
            raise ProtocolError("malformed request line (method)")
        if not target:
            raise ProtocolError("malformed request line (target)")
        return method, target, short
    if len(parts) == 2 and parts[0] and not parts[0].translate(None, TOKEN) and parts[1]:
        raise ProtocolError("HTTP/0.9 request (no version)", 505)
    raise ProtocolError("malformed request line (not method SP target SP version)")


def _form(method: bytes, target: bytes) -> TargetForm:
    if method == _CONNECT:
        m = _AUTHORITY.fullmatch(target)
        if m is None or not 0 < int(m.group(1)) < 65536:
            raise ProtocolError("CONNECT needs a host:port target")
        return _AUTHORITY_FORM
    if target[:1] == b"/":
        return _ORIGIN_FORM
    if target == b"*":
        if method != b"OPTIONS":
            raise ProtocolError("asterisk-form target on a method other than OPTIONS")
        return _ASTERISK_FORM
    if _SCHEME.match(target) is None:
        raise ProtocolError("request target is not in origin, absolute, authority or asterisk form")
    return _ABSOLUTE_FORM


class _RequestFields(FieldSink):
    """A request's fields, and those the reader acts on (lists joined), noted as the head is handed over."""

    __slots__ = ("coding", "connection", "expect", "host", "hosts", "length")

    def __init__(self) -> None:
        super().__init__(_FRAMING_NAMES)
        self.note([], [])

    def note(self, fields: Fields, picked: Fields) -> None:
        self.fields = fields
        hosts = 0
        host = length = coding = connection = expect = None
        for key, value in picked:
            if key == b"host":
                hosts += 1
                host = value
            elif key == b"content-length":
                length = value  # llhttp refused a second one, and anything but digits
            elif key == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif key == b"connection":
                connection = value if connection is None else connection + b"," + value
            elif key == b"expect":
                expect = value if expect is None else expect + b"," + value
        self.hosts = hosts
        self.host: bytes | None = host
        self.length: bytes | None = length
        self.coding: bytes | None = coding
        self.connection: bytes | None = connection
        self.expect: bytes | None = expect


def _request(method: bytes, target: bytes, version: bytes, sink: _RequestFields, limits: Limits) -> Request:
    """The request a head makes (its syntax checked by llhttp), with the rules llhttp does not apply."""
    fields, host, hosts, length, coding = sink.fields, sink.host, sink.hosts, sink.length, sink.coding
    connection, expect = sink.connection, sink.expect
    if len(fields) > limits.max_fields:
        raise ProtocolError(f"more than {limits.max_fields} header fields", 431)
    if hosts > 1:
        raise ProtocolError("more than one Host field")
    if host is None:
        if version == b"1.1":
            raise ProtocolError("HTTP/1.1 request without Host")
    elif host not in _GOOD_HOSTS:
        if not _HOST_VALUE.fullmatch(host):
            raise ProtocolError("malformed Host field")
        if len(_GOOD_HOSTS) >= _GOOD_HOSTS_MAX:
            _GOOD_HOSTS.clear()
        _GOOD_HOSTS.add(host)
    form = _ORIGIN_FORM if target[:1] == b"/" and method != _CONNECT else _form(method, target)
    keep_alive = version == b"1.1" if connection is None else persists(version, connection)
    if coding is not None:
        if coding.lower() != b"chunked":
            raise ProtocolError("Transfer-Encoding other than chunked")
        framing, content_length = _CHUNKED, None
        if version == b"1.0":
            keep_alive = False  # RFC 9112 6.1: the sender may have meant other framing; close after it
    elif length is not None and int(length):
        framing, content_length = _LENGTH, int(length)
    else:
        framing, content_length = _NO_BODY, None
    if method == _CONNECT:
        if framing is not _NO_BODY:
            raise ProtocolError("CONNECT with a body")
        keep_alive = False  # what follows is a tunnel's if the caller accepts, and nobody's if it refuses
    expect_continue = expect is not None and version == b"1.1" and b"100-continue" in comma_tokens(expect)
    return Request(method, target, version, fields, form, host, framing, content_length, keep_alive, expect_continue)


class RequestReader(MessageReader[RequestState]):
    """Bytes from one client connection in, requests out: `receive_data`, `receive_eof`, then `next_event`
    until NEED_DATA or PAUSED. After answering a request, `start_next()` (or `switch()` for an accepted CONNECT).

    `max_body_bytes` bounds every request body (BodyTooLarge, 413); the PEP's per-route limits are applied by
    the caller, which sees the Request before any of its body (`take_body` and the body's events: MessageReader).
    """

    __slots__ = ("_error", "_error_line", "_fields", "_head", "_keep_alive", "_limits", "_method")

    _NEXT = _NEXT
    _TOO_LARGE_HINT = 413
    _CUT_SHORT_HINT = 400

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_body_bytes: int | None = None) -> None:
        super().__init__(_IDLE, _BODY, _DONE, max_body_bytes)
        self._limits = limits
        self._fields = _RequestFields()
        self._head = HeadScanner(limits, httptools.HttpRequestParser, _request_line, True, self._fields)
        self._error: ProtocolError | None = None
        self._error_line = b""
        self._keep_alive = False
        self._method = b""

    @property
    def state(self) -> RequestState:
        return self._state

    @property
    def error_line(self) -> bytes:
        """After a ProtocolError in a head: its first line as received (up to its CRLF, at most `max_line_bytes`),
        for the caller's log of a request it refused before it was whole; b"" otherwise."""
        return self._error_line

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        if self._eof:
            raise LocalProtocolError("data after the end of the stream")
        state = self._state
        if state is _MUST_CLOSE or state is _ERROR:
            return  # never read: the connection ends after the answer
        if state is _SWITCHED or state is _CLOSED:
            raise LocalProtocolError(f"data for a reader in state {state.name}")
        self.buf += data

    def next_event(self) -> Request | Data | EndOfMessage | ConnectionClosed | Signal:
        state = self._state
        try:
            if state is _BODY:
                return self._read_body()
            if state is _IDLE or state is _HEAD:
                return self._read_head()
        except ProtocolError as exc:
            if state is not _BODY and not self._error_line:  # the line is still at the front of the buffer
                buf = self.buf
                end = buf.find(b"\r\n", 0, self._limits.max_line_bytes)
                self._error_line = bytes(buf[: end if end >= 0 else self._limits.max_line_bytes])
            self._error = exc
            self._move(_ERROR)
            self.buf.clear()
            raise
        if state is _DONE or state is _MUST_CLOSE:
            return PAUSED
        if state is _CLOSED:
            return ConnectionClosed()
        if state is _ERROR:
            assert self._error is not None
            raise self._error
        raise LocalProtocolError(f"next_event in state {state.name}")

    def start_next(self) -> bool:
        """The answer to the last request is sent: read the next one (True), or the connection must close."""
        if self._state is not _DONE:
            raise LocalProtocolError(f"start_next in state {self._state.name}")
        if self._keep_alive:
            self._state = _IDLE  # DONE -> IDLE
            return True
        self._move(_MUST_CLOSE)
        self.buf.clear()
        return False

    def switch(self) -> bytes:
        """The caller accepted the CONNECT it was given: the bytes already received after its head, for the tunnel."""
        if self._state is not _DONE or self._method != _CONNECT:
            raise LocalProtocolError("switch() is for a complete CONNECT request")
        self._move(_SWITCHED)
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def _read_head(self) -> Request | ConnectionClosed | Signal:
        buf = self.buf
        if self._state is _IDLE:
            if buf[:1] == b"\r":
                while buf[:2] == b"\r\n":  # empty lines before a request line (RFC 9112 2.2)
                    del buf[:2]
            if not buf or buf == b"\r":
                if not self._eof:
                    return NEED_DATA
                if not buf:
                    self._move(_CLOSED)
                    return ConnectionClosed()
            self._state = _HEAD  # IDLE -> HEAD
        line = self._head.scan(buf)
        if line is None:
            if self._eof:
                raise ProtocolError("the connection closed inside a request head")
            return NEED_DATA
        method, target, version = line
        try:
            request = _request(method, target, version, self._fields, self._limits)
        except ProtocolError:
            self._error_line = b"%s %s HTTP/%s" % (method, target, version)  # the head has left the buffer
            raise
        self._method = method
        self._keep_alive = request.keep_alive
        framing = request.framing
        if framing is _CHUNKED:
            self._body = ChunkedBody(self._limits, self._max_body, server=True)
            self._remaining = -1
        else:
            self._remaining = request.content_length or 0
            if framing is _NO_BODY and request.keep_alive:
                self._head.recycle()  # llhttp has read this whole message: its parser can read the next head
        self._read = 0
        self._state = _BODY  # HEAD -> BODY
        return request
