"""Serializing: request and response heads, and bodies in the framing their head announced.

Every field is checked before it is written (a CR or LF in a value would start a field of the caller's
choosing), and a BodyWriter refuses to send more or fewer bytes than its framing promised: a body that does not
match its head would make the peer read the rest as another message.
"""

from __future__ import annotations

import enum
from operator import itemgetter
from typing import Final

from pep.http1.errors import LocalProtocolError
from pep.http1.events import Fields, Framing
from pep.http1.fields import JOIN_LINES, KEEP_VALUE, TOKEN, VALUE, check_fields, keeping

LAST_CHUNK: Final = b"0\r\n\r\n"
_KEEP_VISIBLE: Final = keeping(bytes(range(0x21, 0x7F)))
_VERSIONS: Final = (b"1.1", b"1.0")
# Names already checked to be tokens: a process writes the same few dozen again and again, and a set lookup per
# name (in C, through map) is a fraction of checking it. Bounded: cleared when full.
_TOKENS: Final[set[bytes]] = set()
_TOKENS_MAX: Final = 1024
_NAME: Final = itemgetter(0)
_SEP: Final = b": "
_CRLF: Final = b"\r\n"
# Every byte that is not a value byte (CR, LF and NUL among them) as NUL, the value bytes as themselves: a block
# of n field lines has exactly its 2n line-end bytes marked, and one more byte of anything but a value byte (a CR or
# LF inside a field, a control character) makes it more.
_MARK_OTHERS: Final = bytes(byte if byte in VALUE else 0 for byte in range(256))


def _fields(fields: Fields, names_checked: bool = False) -> bytes:
    """The field lines, each ending in CRLF, every name a token (unless `names_checked`) and every value free of
    control characters: by the C join when compiled, else (or for anything it gives way on) `_careful_fields`."""
    if not fields:
        return b""
    if JOIN_LINES is not None:  # compiled: the C writes what needs no careful look, all but always
        block = JOIN_LINES(fields)
        if block is not None:
            return block
    return _careful_fields(fields, names_checked)


def _careful_fields(fields: Fields, names_checked: bool) -> bytes:
    """`_fields` without the C: what it falls back to, and what a property test holds the C to. One pass over
    the serialized block checks every value (and name) for control characters: with every byte that is not a
    value byte marked (a fixed table, one C pass), exactly the line ends joined in here must be marked, two bytes
    per line, so a CR or LF inside a field (which would start a line of the caller's choosing) cannot hide among
    the line ends, and no other control character is there."""
    if not names_checked and not _TOKENS.issuperset(map(_NAME, fields)):
        check_fields(fields)
        if len(_TOKENS) >= _TOKENS_MAX:
            _TOKENS.clear()
        _TOKENS.update(map(_NAME, fields))
    # One join of the pieces (compiled, a list of four appends per field is 23% faster than joining each field
    # and then the lines: 434 vs 566 ns for six fields, measured with mypyc).
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(name)
        parts.append(_SEP)
        parts.append(value)
        parts.append(_CRLF)
    block = b"".join(parts)
    count = len(fields)
    if block.translate(_MARK_OTHERS).count(0) != 2 * count:
        raise LocalProtocolError("a field value holds a control character")
    return block


class RequestStart:
    """A request line and the field lines that never change with it (Host, a client's fixed headers), checked
    and serialized once, then written as they are with each request's own fields: a PDP URL's or a route's
    fixed part. `names`: the fixed names, lower-cased."""

    __slots__ = ("data", "method", "names")

    def __init__(self, method: bytes, target: bytes, fixed: Fields) -> None:
        check_fields(fixed)
        self.method = method
        self.data = request_head(method, target, fixed)[:-2]  # without the empty line that ends the head
        self.names = frozenset(name.lower() for name, _ in fixed)

    def head(self, fields: Fields, length: int | None, *, names_checked: bool = False) -> bytes:
        """The whole head: the start, `fields` (checked as `request_head` checks them) and, for a `length`, a
        Content-Length field, then the empty line."""
        if length is None:
            return b"%s%s\r\n" % (self.data, _fields(fields, names_checked))
        return b"%s%sContent-Length: %d\r\n\r\n" % (self.data, _fields(fields, names_checked), length)


def request_head(
    method: bytes,
    target: bytes,
    fields: Fields,
    version: bytes = b"1.1",
    *,
    length: int | None = None,
    names_checked: bool = False,
) -> bytes:
    """`METHOD target HTTP/x.y`, the fields, and the empty line. Framing fields are the caller's to include, or
    for a `length` a Content-Length field after the others (in the same formatting step). `names_checked`: the
    caller knows every name to be a token (it saw this writer accept each before), so only the values are
    checked."""
    if method not in _TOKENS and (not method or method.translate(None, TOKEN)):
        raise LocalProtocolError(f"method {method!r} is not a token")
    if not target or target.translate(_KEEP_VISIBLE) != target:
        raise LocalProtocolError("request target is empty or holds a space or control character")
    if version not in _VERSIONS:
        raise LocalProtocolError(f"HTTP version {version!r}")
    if length is not None:
        block = _fields(fields, names_checked)
        return b"%s %s HTTP/%s\r\n%sContent-Length: %d\r\n\r\n" % (method, target, version, block, length)
    return b"%s %s HTTP/%s\r\n%s\r\n" % (method, target, version, _fields(fields, names_checked))


def response_head(status: int, fields: Fields, reason: bytes = b"", version: bytes = b"1.1") -> bytes:
    """`HTTP/x.y status reason`, the fields, and the empty line."""
    if not 100 <= status <= 599:
        raise LocalProtocolError(f"status {status}")
    if reason.translate(KEEP_VALUE) != reason:
        raise LocalProtocolError("reason phrase holds a control character")
    if version not in _VERSIONS:
        raise LocalProtocolError(f"HTTP version {version!r}")
    return b"HTTP/%s %d %s\r\n%s\r\n" % (version, status, reason, _fields(fields))


def chunk(data: bytes) -> bytes:
    """One chunk; nothing for no data (an empty chunk would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


class WriterState(enum.Enum):
    OPEN = "open"  # body bytes may follow
    DONE = "done"  # the body is complete


class BodyWriter:
    """The bytes to send for one body, held to the framing its head announced (NONE, LENGTH or CHUNKED; for
    CLOSE the caller ends the body by closing the connection)."""

    __slots__ = ("_framing", "_remaining", "_state")

    def __init__(self, framing: Framing, content_length: int | None = None) -> None:
        if framing is Framing.TUNNEL:
            raise LocalProtocolError("a tunnel has no HTTP body")
        if (framing is Framing.LENGTH) != (content_length is not None):
            raise LocalProtocolError("a Content-Length body needs its length, and only it")
        self._framing = framing
        self._remaining = content_length or 0
        self._state = WriterState.OPEN

    @property
    def state(self) -> WriterState:
        return self._state

    def write(self, data: bytes) -> bytes:
        if self._state is not WriterState.OPEN:
            raise LocalProtocolError("body data after the end of the body")
        framing = self._framing
        if framing is Framing.CHUNKED:
            return chunk(data)
        if framing is Framing.LENGTH:
            if len(data) > self._remaining:
                raise LocalProtocolError("more body bytes than the Content-Length")
            self._remaining -= len(data)
            return data
        if framing is Framing.NONE and data:
            raise LocalProtocolError("body bytes for a message without a body")
        return data

    def end(self, trailers: Fields | None = None) -> bytes:
        if self._state is not WriterState.OPEN:
            raise LocalProtocolError("the body is already complete")
        if trailers and self._framing is not Framing.CHUNKED:
            raise LocalProtocolError("trailer fields need a chunked body")
        if self._remaining:
            raise LocalProtocolError(f"the body ended {self._remaining} bytes short of its Content-Length")
        self._state = WriterState.DONE
        if self._framing is Framing.CHUNKED:
            return b"0\r\n" + (_fields(trailers) if trailers else b"") + b"\r\n"
        return b""
