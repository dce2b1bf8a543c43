"""What the readers hand out: one event per call, in wire order, never a half-read head.

Events are plain slotted classes built once per message; field names and values are the bytes as sent (values
without the whitespace around them), so a transport can forward them without another parse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

Fields = list[tuple[bytes, bytes]]


class Signal(enum.Enum):
    """Not an event: what the reader needs before it can give the next one."""

    NEED_DATA = "need_data"  # feed more bytes (or the end of the stream)
    PAUSED = "paused"  # the message is complete: nothing more is read until the caller moves the reader on


NEED_DATA: Final = Signal.NEED_DATA
PAUSED: Final = Signal.PAUSED


class Framing(enum.Enum):
    """How the body of a message ends (RFC 9112 6.3)."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # exactly Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding, then trailer fields
    CLOSE = "close"  # until the server closes the connection (responses only)
    TUNNEL = "tunnel"  # the bytes after the head are not HTTP (a 2xx to CONNECT, an accepted 101)


class TargetForm(enum.Enum):
    """The request-target forms of RFC 9112 3.2, each allowed only with its methods."""

    ORIGIN = "origin"  # /path?query
    ABSOLUTE = "absolute"  # scheme://authority/path?query
    AUTHORITY = "authority"  # host:port, CONNECT only
    ASTERISK = "asterisk"  # *, OPTIONS only


@dataclass(slots=True)
class Request:
    """A request head, checked: framing unambiguous, version 1.0 or 1.1, Host present once where required."""

    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: Fields
    form: TargetForm
    host: bytes | None  # the Host field's value; None only on an HTTP/1.0 request without one
    framing: Framing  # NONE, LENGTH or CHUNKED
    content_length: int | None  # with Framing.LENGTH
    keep_alive: bool  # another request may follow on this connection after the answer
    expect_continue: bool  # HTTP/1.1 `Expect: 100-continue`: the client waits for a 100 before the body


@dataclass(slots=True)
class InformationalResponse:
    """A 1xx answer before the final one (100 Continue, 103 Early Hints; 101 only where asked for)."""

    status: int
    reason: bytes
    version: bytes
    headers: Fields


@dataclass(slots=True)
class Response:
    """A final response head, checked, with how its body is framed for the request it answers."""

    status: int
    reason: bytes
    version: bytes
    headers: Fields
    framing: Framing
    content_length: int | None  # with Framing.LENGTH
    keep_alive: bool  # the connection may carry another exchange after this body
    keep_alive_field: bytes | None = None  # the Keep-Alive field's value (`timeout=N`), for a pool's idle bound


@dataclass(slots=True)
class Data:
    """Body bytes, transfer coding removed (content codings such as gzip are left to the caller)."""

    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    """The body is complete; a chunked body's trailer fields, if it had any."""

    trailers: Fields


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed the connection between messages."""


Event = Request | InformationalResponse | Response | Data | EndOfMessage | ConnectionClosed
