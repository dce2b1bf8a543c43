"""The PDP's HTTP/1.1 client: the transport's pool, with what a decision exchange needs on top.

The pool (pep/transport/pool.py) keeps the connections: keep-alive per origin, reused only after a clean and
complete exchange, never after a failure, an oversize answer or a cancellation (the decision deadline), and no
request ever sent twice; every answer is read by the core's ResponseReader (pep/http1), the same reader and
rules as the listener's and the upstreams'. This module adds: the request head's fixed part built once per URL
(request line values, Host, the PEP's fixed fields), the per-call fields checked by the core's writer, an
answer read whole up to a size limit (on the wire and once decoded), a gzip or deflate body undone as one whole
stream, and the breaker's admission asked before a connection is taken and again right before the request is
written.

Why not aiohttp's client here: a decision is one small POST and one small JSON answer, and aiohttp's
general-purpose client (cookies, redirects, timers, tracing hooks, URL handling) cost a fifth of the PEP's CPU
per request on this call alone.
"""

from __future__ import annotations

import math
import ssl
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, Final
from urllib.parse import urlsplit

from pep.http1 import Fields, LocalProtocolError, RequestStart, Response
from pep.http1.fields import VALUE
from pep.transport import ConnectFailed, NotAdmitted, Origin, Pool, UpstreamError

IDLE_S = 30.0  # an idle connection older than this is closed rather than reused
_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# The answer's fields the PEP reads, by the length of their names (most fields are skipped without lower()).
_READ_LENGTHS: Final = frozenset({12, 13, 16})  # content-type and x-request-id, cache-control, content-encoding

__all__ = [
    "IDLE_S",
    "Answer",
    "ExchangeError",
    "Http1Client",
    "NotAdmitted",
    "RequestError",
    "exchange_error",
    "to_fields",
    "unframed",
]


class ExchangeError(Exception):
    """The connection failed before a complete answer arrived (refused, reset, closed early, unparsable)."""


class RequestError(ValueError):
    """The request cannot be framed (a header value outside Latin-1 or with a control character): nothing was
    sent. A ValueError, as before it had its own name: callers that only need "nothing was sent" keep catching
    that."""


class Answer:
    """A complete answer: status, the headers the PEP reads, the body (decoded), and what went wrong with it."""

    status: Final[int]
    content_type: Final[str]
    body: Final[bytes]
    oversize: Final[bool]  # the answer was longer than the limit (on the wire or decoded); `body` is empty
    undecodable: Final[bool]  # the body does not decode under its Content-Encoding; `body` is empty
    request_id: Final[str | None]  # the X-Request-ID the PDP echoed, if any
    cache_control: Final[str | None]

    def __init__(
        self,
        status: int,
        content_type: str,
        body: bytes,
        oversize: bool,
        undecodable: bool = False,
        request_id: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.oversize = oversize
        self.undecodable = undecodable
        self.request_id = request_id
        self.cache_control = cache_control


class Target:
    """What is constant for one URL: where to connect, and the request's fixed part, checked once."""

    __slots__ = ("origin", "start")

    def __init__(self, method: str, url: str, fixed: Fields, tls: ssl.SSLContext) -> None:
        """Raises ValueError for a URL the client cannot use."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"not an http or https URL: {url!r}")
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.origin = Origin(parts.scheme, host, port, tls if parts.scheme == "https" else None)
        default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
        shown = f"[{host}]" if ":" in host else host
        authority = shown if default else f"{shown}:{port}"
        try:
            target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("ascii")
            self.start = RequestStart(method.encode("ascii"), target, [(b"Host", authority.encode("ascii")), *fixed])
        except (UnicodeEncodeError, LocalProtocolError) as exc:
            raise ValueError(f"a URL the PDP client cannot use: {url!r}: {exc}") from None


def to_fields(headers: dict[str, str]) -> Fields:
    """The per-call fields as bytes (the writer checks names and values when it writes them)."""
    try:
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    except UnicodeEncodeError:
        raise unframed(headers) from None


def unframed(headers: dict[str, str]) -> RequestError:
    """Which header cannot be written, and why (the error path: the writer refused, or Latin-1 could not hold it)."""
    for name, value in headers.items():
        if name.lower() in ("content-length", "transfer-encoding"):
            return RequestError(f"header {name} is the client's to write (the body's framing)")
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            return RequestError(f"header {name} holds a character outside Latin-1")
        if raw.translate(None, VALUE):
            return RequestError(f"header {name} holds a line break or NUL, or another control character")
    return RequestError("a header name is not a token")


def exchange_error(exc: LocalProtocolError | UpstreamError, headers: dict[str, str]) -> Exception:
    """What a failed fetch is to a caller: a field the writer refused is a RequestError (nothing was sent), a
    refused or failed connection the system's error, anything else after that an ExchangeError."""
    if isinstance(exc, LocalProtocolError):
        return unframed(headers)
    if isinstance(exc, ConnectFailed) and exc.error is not None:
        return exc.error
    return ExchangeError(str(exc))


def _fixed(text: str) -> Fields:
    """`Name: value\\r\\n` lines (the caller's constant fields) as fields."""
    out: Fields = []
    for line in text.split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            out.append((name.encode("ascii"), value.strip(" \t").encode("ascii")))
    return out


class Http1Client:
    """Keep-alive connections per origin, at most `max_connections` exchanges at once per origin (a PDP is one
    origin)."""

    def __init__(
        self, max_response_bytes: int, max_connections: int, tls: ssl.SSLContext | None, fixed_headers: str
    ) -> None:
        self._limit = max_response_bytes
        self._tls = tls if tls is not None else ssl.create_default_context()  # https: verified either way
        self._fixed = _fixed(fixed_headers)
        self._targets: dict[tuple[str, str, tuple[tuple[bytes, bytes], ...]], Target] = {}
        self._pool = Pool(max_per_origin=max_connections, idle_s=IDLE_S)

    def target(self, method: str, url: str, more: tuple[tuple[bytes, bytes], ...] = ()) -> Target:
        """The constant part of requests to `url` (ValueError for a URL the client cannot use): the request line,
        Host, the client's fixed fields, then `more` fixed fields. Built once, cached."""
        key = (method, url, more)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) > 64:
                self._targets.clear()
            target = self._targets[key] = Target(method, url, [*self._fixed, *more], self._tls)
        return target

    def send(
        self, target: Target, fields: Fields, body: bytes | None, admit: Callable[[], bool] | None
    ) -> Coroutine[Any, Any, tuple[Response, bytes | None]]:
        """The pool's fetch of one request (the coroutine itself, so that a caller awaits the pool directly, one
        level less on each wake-up): `exchange` without its error mapping and answer reading."""
        return self._pool.fetch(
            target.origin,
            target.start,
            fields,
            body,
            limit=self._limit,  # compressed or not: the bytes on the wire are bounded too
            connect_s=math.inf,
            read_s=math.inf,
            pool_s=math.inf,
            admit=admit,
        )

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
        is written. No deadline of its own: the caller's (a cancellation closes the connection)."""
        target = self.target(method, url)
        try:
            response, data = await self.send(target, to_fields(headers), body, admit)
        except (LocalProtocolError, UpstreamError) as exc:
            raise exchange_error(exc, headers) from None
        return self.read(response, data)

    def read(self, response: Response, data: bytes | None) -> Answer:
        """The answer of a `send`: the fields the PEP reads, the body decoded (None: longer than the limit)."""
        content_type = ""
        request_id = cache_control = None
        codings: list[str] = []
        for name, value in response.headers:
            if len(name) in _READ_LENGTHS:
                key = name.lower()
                if key == b"content-type":
                    content_type = value.decode("latin-1")
                elif key == b"x-request-id":
                    request_id = value.decode("latin-1")
                elif key == b"cache-control":
                    cache_control = value.decode("latin-1")
                elif key == b"content-encoding":  # repeated fields are one list (RFC 9110 5.3): codings in order
                    codings += [c for c in value.decode("latin-1").lower().split(",") if c.strip(" \t")]
        status = response.status
        if data is None:  # reported without reading the rest; the connection is not reused
            return Answer(status, content_type, b"", True, False, request_id, cache_control)
        if codings:
            body = self._decode(data, codings)
            if body is None:
                return Answer(status, content_type, b"", False, True, request_id, cache_control)
            if len(body) > self._limit:
                return Answer(status, content_type, b"", True, False, request_id, cache_control)
            data = body
        return Answer(status, content_type, data, False, False, request_id, cache_control)

    def _decode(self, body: bytes, codings: list[str]) -> bytes | None:
        """The body under its one content coding, whole: gzip (one member) or deflate (one zlib stream) and
        nothing after it; None when it is undecodable. A second gzip member, or any byte after the end of the
        stream, is trailing data (so `pdp_malformed`): read as one member, `gzip(allow) + gzip(deny)` allowed.
        So is a coding not listed here, or several codings (the client asks for none; a PDP has no reason to
        stack them). The output is bounded by the limit too, whatever the ratio: at most one byte past it is
        decoded (a decompression bomb is oversize)."""
        codings = [c.strip(" \t") for c in codings]
        codings = [c for c in codings if c != "identity"]
        if not codings:
            return body
        wbits = _WBITS.get(codings[0]) if len(codings) == 1 else None
        if wbits is None:
            return None
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, self._limit + 1)
            if len(out) > self._limit:
                return out  # oversize: the caller reports it
            if not d.eof or d.unused_data or d.unconsumed_tail:
                raise zlib.error("incomplete compressed body, or data after its end")
            return out
        except zlib.error:
            return None

    async def close(self) -> None:
        await self._pool.close()
