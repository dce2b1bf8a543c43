"""What the readers hand out: one event per call, in wire order, never a half-read head.

Events are plain slotted classes built once per message; field names and values are the bytes as sent (values
without the whitespace around them), so a transport can forward them without another parse.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final

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


class _Value:
    """Equality and a repr by field (events are values: the tests compare them with the ones expected).

    The events are plain classes with their own `__init__` rather than dataclasses: compiled by mypyc, that is a
    native class built in about 40 ns, where a dataclass keeps the `__init__` the dataclasses module writes in
    Python (about 180 ns; three events or more per exchange). Not hashable, as a dataclass with `eq` is not."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self._FIELDS)

    def __hash__(self) -> int:
        raise TypeError(f"unhashable type: {type(self).__name__!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{type(self).__name__}({shown})"


class Request(_Value):
    """A request head, checked: framing unambiguous, version 1.0 or 1.1, Host present once where required."""

    _FIELDS = (
        "method",
        "target",
        "version",
        "headers",
        "form",
        "host",
        "framing",
        "content_length",
        "keep_alive",
        "expect_continue",
    )
    __slots__ = _FIELDS

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,  # b"1.1" or b"1.0"
        headers: Fields,
        form: TargetForm,
        host: bytes | None,  # the Host field's value; None only on an HTTP/1.0 request without one
        framing: Framing,  # NONE, LENGTH or CHUNKED
        content_length: int | None,  # with Framing.LENGTH
        keep_alive: bool,  # another request may follow on this connection after the answer
        expect_continue: bool,  # HTTP/1.1 `Expect: 100-continue`: the client waits for a 100 before the body
    ) -> None:
        self.method: Final = method
        self.target: Final = target
        self.version: Final = version
        self.headers: Final = headers
        self.form: Final = form
        self.host: Final = host
        self.framing: Final = framing
        self.content_length: Final = content_length
        self.keep_alive: Final = keep_alive
        self.expect_continue: Final = expect_continue


class InformationalResponse(_Value):
    """A 1xx answer before the final one (100 Continue, 103 Early Hints; 101 only where asked for)."""

    _FIELDS = ("status", "reason", "version", "headers")
    __slots__ = _FIELDS

    def __init__(self, status: int, reason: bytes, version: bytes, headers: Fields) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.version: Final = version
        self.headers: Final = headers


class Response(_Value):
    """A final response head, checked, with how its body is framed for the request it answers."""

    _FIELDS = (
        "status",
        "reason",
        "version",
        "headers",
        "framing",
        "content_length",
        "keep_alive",
        "keep_alive_field",
    )
    __slots__ = _FIELDS

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Fields,
        framing: Framing,
        content_length: int | None,  # with Framing.LENGTH
        keep_alive: bool,  # the connection may carry another exchange after this body
        keep_alive_field: bytes | None = None,  # the Keep-Alive field's value (`timeout=N`), for a pool's idle bound
    ) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.version: Final = version
        self.headers: Final = headers
        self.framing: Final = framing
        self.content_length: Final = content_length
        self.keep_alive: Final = keep_alive
        self.keep_alive_field: Final = keep_alive_field


class Data(_Value):
    """Body bytes, transfer coding removed (content codings such as gzip are left to the caller)."""

    _FIELDS = ("data",)
    __slots__ = _FIELDS

    def __init__(self, data: bytes) -> None:
        self.data: Final = data


class EndOfMessage(_Value):
    """The body is complete; a chunked body's trailer fields, if it had any."""

    _FIELDS = ("trailers",)
    __slots__ = _FIELDS

    def __init__(self, trailers: Fields) -> None:
        self.trailers: Final = trailers


class ConnectionClosed(_Value):
    """The peer closed the connection between messages."""

    __slots__ = ()


Event = Request | InformationalResponse | Response | Data | EndOfMessage | ConnectionClosed
