"""The pooled client to upstreams. It sends only what an `Allow` names, and relays the answer as it streams.

The connections are pep/transport's `Pool`: kept alive per origin, never reused after anything but a clean and
complete exchange, and never used to send a request twice (one allow, at most one delivery). Each route's
origin, the part of its upstream URL before the path, and its Host value are worked out once per upstream URL,
not per request.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

from pep import redirects
from pep.authority import DEFAULT_PORTS
from pep.decision import Allow
from pep.headers import ANSWER_DROP, Fields, end_to_end_fields
from pep.http1 import Framing, ProtocolError
from pep.metrics import Metrics
from pep.responses import Reply, unreadable_request, upstream_failure
from pep.routing import Route
from pep.trace import CURRENT as CURRENT_TRACE
from pep.transport import (
    BodyTimeout,
    ClientGone,
    ClientResponse,
    Exchange,
    Origin,
    Pool,
    RequestBody,
    ResponseTooLarge,
    UpstreamError,
    encode_fields,
)

WHOLE_ANSWER_LIMIT = 8 * 1048576  # the largest answer read whole to be decided (a JSON answer an AnswerCheck reads)
WHOLE_BODY_LIMIT: Final = 65536  # responses up to this size (with Content-Length) are read whole, then sent at once
_NO_BODY: Final = Framing.NONE

# Reads a streamed answer as it arrives (None once it has ended): the bytes to relay now, and True when the stream
# ends there (a refused event is never relayed: the gate returns an error event instead and ends the stream).
Gate = Callable[[bytes | None], Awaitable[tuple[bytes, bool]]]


class AnswerCheck(Protocol):
    """Inspects an answer before any byte of it reaches the caller: the one mechanism for every protocol whose
    answers are decided (MCP: pep/mcp_answers.py, model answers: pep/answers.py). The checks read and decide;
    this module only moves the bytes they return."""

    def mode(self, status: int, content_types: list[str], encodings: list[str], located: bool) -> str:
        """`pass` (relay unchanged), `whole` (read whole, then `whole`), `events` (through `gate`), or
        `unreadable` (a 502, nothing relayed). Given every `Content-Type` and `Content-Encoding` field value, and
        whether the answer has a `Location`."""
        ...

    async def whole(self, body: bytes, content_type: str) -> bytes | Reply | None:
        """What to send for a whole answer: its (maybe rewritten) body, a reply of its own, or None when it
        cannot be read (a 502)."""
        ...

    async def gate(self, chunk: bytes | None) -> tuple[bytes, bool]: ...


class _BodyLimit(Exception):
    """A chunked request body grew past the route's `max_body_bytes` while it streamed."""


class _BodySource:
    """Streams a request body to the upstream, each chunk within the listener's body deadline (BodyTimeout); with
    a `limit` (a body without a Content-Length), it stops once the body exceeds it."""

    __slots__ = ("_body", "_limit")

    def __init__(self, body: RequestBody, limit: int | None) -> None:
        self._body = body
        self._limit = limit

    def chunks(self) -> AsyncIterator[bytes]:
        return _Chunks(self._body, self._limit)


class _Chunks:
    """`_BodySource.chunks`: an iterator class, not an async generator, which mypyc cannot compile."""

    __slots__ = ("_body", "_limit", "_seen")

    def __init__(self, body: RequestBody, limit: int | None) -> None:
        self._body = body
        self._limit = limit
        self._seen = 0

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.read()
        if not chunk:
            raise StopAsyncIteration
        limit = self._limit
        if limit is not None:
            self._seen += len(chunk)
            if self._seen > limit:
                raise _BodyLimit(f"request body over {limit} bytes")
        return chunk


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a route's upstream URL points: the pooled origin, the URL's text before its path, and Host."""

    origin: Origin
    prefix: str  # `scheme://authority`: an upstream URL minus this is the request target
    host: bytes  # the Host field: the authority without user info, the port only when not the scheme's default

    def request_target(self, upstream_url: str) -> bytes:
        if not upstream_url.startswith(self.prefix):
            raise ValueError("an upstream URL outside its route's upstream")
        rest = upstream_url[len(self.prefix) :]
        if not rest.startswith("/"):
            rest = "/" + rest
        return rest.encode("ascii")


def _target(upstream: str, tls: Callable[[], ssl.SSLContext]) -> _Target:
    parts = urlsplit(upstream)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[scheme]:
        shown = f"{shown}:{port}"
    prefix = f"{parts.scheme}://{parts.netloc}"
    encoded = shown.encode("ascii") if shown.isascii() else shown.encode("idna")  # as a client would send it
    return _Target(Origin(scheme, host, port, tls() if scheme == "https" else None), prefix, encoded)


def request_fields(
    fields: Fields,
    upstream_host: bytes,
    peer: str,
    scheme: str,
    host: bytes | None,
    allow: Allow,
    route: Route,
    credential: tuple[str, str] | None = None,
    replaced: tuple[tuple[str, str], ...] = (),
    unencoded: bool = False,
) -> Fields:
    """The fields sent upstream: Host (the upstream's), the caller's fields that may cross (as received, in
    order), then the ones the PEP alone sets: X-Forwarded-*, the request and decision ids, the trace context, PDP
    obligations, the credential, and `replaced` caller fields with their new value. `unencoded`: no
    Accept-Encoding, so that the answer can be read to be decided. Framing is the pool's."""
    drop = route.forward_drop_unencoded if unencoded else route.forward_drop
    if allow.headers or replaced:
        drop = drop | {n.lower().encode("latin-1") for n, _ in (*allow.headers, *replaced)}
    out: Fields = [(b"Host", upstream_host)]
    out += end_to_end_fields(fields, drop)
    out.append((b"X-Forwarded-For", peer.encode("latin-1")))
    out.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Request-ID", allow.request_id.encode("ascii")))
    out.append((b"X-PEP-Decision-ID", allow.decision_id.encode("ascii")))
    trace = CURRENT_TRACE.get()
    if trace is not None:
        out += trace.fields()
    if allow.headers:
        # One value per name, the last one (the PDP's obligation sets the header, it does not add to it).
        own = {n.lower(): (n, v) for n, v in allow.headers}
        if unencoded:
            own.pop("accept-encoding", None)
        out += encode_fields(own.values())
    if credential is not None:
        out += encode_fields((credential,))
    if replaced:
        out += encode_fields(replaced)
    return out


class Upstream:
    """One keep-alive pool for all routes; per-route timeouts; no decompression, cookies, redirects or resends."""

    def __init__(self, metrics: Metrics, max_connections: int = 1000) -> None:
        self._metrics = metrics
        self._pool = Pool(max_per_origin=max_connections, idle_s=30.0)
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    def _client_tls(self) -> ssl.SSLContext:
        """For https upstreams: the system's CAs and a hostname check, as aiohttp's client had by default."""
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def target(self, route: Route) -> _Target:
        found = self._targets.get(route.upstream)
        if found is None:
            found = self._targets[route.upstream] = _target(route.upstream, self._client_tls)
        return found

    async def forward(
        self,
        exchange: Exchange,
        allow: Allow,
        route: Route,
        credential: tuple[str, str] | None = None,
        answers: AnswerCheck | None = None,
        replaced: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """Send the allowed request and stream the response back; 502/504 when no response comes. Returns the
        status answered.

        With `answers`, the answer is inspected as `answers.mode` says (a whole answer is read up to
        WHOLE_ANSWER_LIMIT bytes), and what is unreadable is a 502 `unreadable`. `replaced` are caller headers
        sent with another value (a sealed `Last-Event-ID` opened, pep/protocols/mcp_tokens.py).
        """
        target = self.target(route)
        head = exchange.head
        connection = exchange.connection
        peer = connection.peer
        fields = request_fields(
            head.headers,
            target.host,
            str(peer[0]) if peer else "unknown",
            connection.scheme,
            head.host,
            allow,
            route,
            credential,
            replaced,
            unencoded=answers is not None,  # the answer must be readable to be inspected
        )
        if allow.body is not None:
            # The decided bytes frame themselves: they may differ from what the caller sent (an MCP reply with the
            # server's own id put back, pep/protocols/mcp_replies.py).
            body: bytes | AsyncIterator[bytes] | None = allow.body
            length = None
        elif head.framing is not _NO_BODY:
            # A Content-Length over the limit was denied before the PDP; only a chunked body is counted here.
            length = head.content_length
            limit = route.config.max_body_bytes if length is None else None
            body = _BodySource(exchange.body, limit).chunks()
            exchange.send_continue()  # only now, after the allow: a denied client never sends its body
        else:
            body = length = None
        wait = route.config.timeout_ms / 1000  # for the answer once the request is sent, then for each chunk
        metrics = self._metrics
        response = exchange.response
        started = time.perf_counter()
        try:
            up = await self._pool.request(
                target.origin,
                allow.method.encode("ascii"),
                target.request_target(allow.upstream_url),
                fields,
                body,
                length=length,
                connect_s=wait,
                read_s=wait,
            )
        except UpstreamError as exc:
            kind = exc.kind
        except BodyTimeout:
            kind = "body_timeout"  # the caller stopped sending its body: the upstream request is aborted
        except _BodyLimit:
            kind = "body_limit"
        except ProtocolError as protocol_error:
            # The caller's streamed body broke HTTP/1.1: the upstream request is aborted, the connection ends.
            reply = unreadable_request(protocol_error.status_hint, protocol_error.reason)
            response.send(reply.status, reply.fields(), reply.body)
            return reply.status
        except ClientGone:
            response.abort()  # nobody is left to answer
            return 0
        else:
            metrics.upstream_duration[route.name].observe(time.perf_counter() - started)
            try:
                # The upstream's answer, relayed (or decided, then relayed) to the caller: here, not in a coroutine
                # of its own, which would be one more level resumed on every wake-up of its reads.
                status = up.status
                metrics.upstream_responses[route.name, _CLASSES[min(status // 100, 5)]].inc()
                # Hop-by-hop fields and Content-Length dropped (the writer frames what is sent); the upstream's
                # address never reaches the agent (pep/redirects.py).
                fields = redirects.rewrite(end_to_end_fields(up.fields, ANSWER_DROP), route)
                mode = "pass"
                types: list[str] = []
                if answers is not None:
                    types, encodings = _media_values(up.fields)
                    located = 300 <= status < 400 and bool(_values(fields, b"location"))  # as relayed
                    mode = answers.mode(status, types, encodings, located)
                if mode == "whole":
                    assert answers is not None
                    try:
                        whole = await up.read_all(WHOLE_ANSWER_LIMIT)
                    except ResponseTooLarge:
                        whole = None
                    except UpstreamError as exc:
                        return self._failed(exchange, route, allow, exc.kind)
                    result = await answers.whole(whole, types[0] if types else "") if whole is not None else None
                    if isinstance(result, Reply):
                        response.send(result.status, result.fields(), result.body)
                        return result.status
                    if result is not None:
                        response.send(status, fields, result, up.reason)
                        return status
                if mode in ("whole", "unreadable"):
                    up.close()
                    return self._failed(exchange, route, allow, "unreadable")
                gate = answers.gate if mode == "events" and answers is not None else None
                method = exchange.head.method
                if gate is None and _whole_body_fits(method, up):
                    # Small and announced: read it all, then answer in one write (no chunk-by-chunk relay). A cut here
                    # is a clean 502 `reset`, since nothing has been sent to the caller yet.
                    try:
                        small = await up.read_all(WHOLE_BODY_LIMIT)
                    except UpstreamError as exc:
                        return self._failed(exchange, route, allow, exc.kind)
                    response.send(status, fields, small, up.reason)
                    return status
                length = _announced(up, method) if gate is None else None
                response.start(status, fields, length, up.reason)
                if not await _relay(exchange, up, gate):
                    metrics.upstream_failures[route.name, "reset"].inc()
                return status
            finally:
                up.close()  # a connection whose answer was not read to its end is closed, never reused
        metrics.upstream_failures[route.name, kind].inc()
        reply = upstream_failure(kind, allow.request_id, allow.decision_id)
        if kind == "body_timeout":
            response.close_after()
        response.send(reply.status, reply.fields(), reply.body)
        return reply.status

    def _failed(self, exchange: Exchange, route: Route, allow: Allow, kind: str) -> int:
        self._metrics.upstream_failures[route.name, kind].inc()
        reply = upstream_failure(kind, allow.request_id, allow.decision_id)
        exchange.response.send(reply.status, reply.fields(), reply.body)
        return reply.status

    async def close(self) -> None:
        await self._pool.close()


_CLASSES: Final = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def _whole_body_fits(method: bytes, up: ClientResponse) -> bool:
    length = up.content_length
    if length is None or length > WHOLE_BODY_LIMIT or method == b"HEAD":
        return False
    for name, value in up.fields:  # `first_field(up.fields, b"content-type")`, without its call
        if len(name) == 12 and name.lower() == b"content-type":
            return not value.lower().startswith(b"text/event-stream")
    return True


def _values(fields: Fields, name: bytes) -> list[str]:
    """The values of the fields called `name` (lower-case), in order, decoded as `ClientResponse.headers` decodes
    them: an answer's header view is not built for two lookups."""
    size = len(name)
    return [v.decode("utf-8", "surrogateescape") for n, v in fields if len(n) == size and n.lower() == name]


def _media_values(fields: Fields) -> tuple[list[str], list[str]]:
    """`_values` of Content-Type and of Content-Encoding, in one pass over the fields (a loop: a comprehension is a
    call of its own)."""
    types: list[str] = []
    encodings: list[str] = []
    for name, value in fields:
        size = len(name)
        if size == 12 and name.lower() == b"content-type":
            types.append(value.decode("utf-8", "surrogateescape"))
        elif size == 16 and name.lower() == b"content-encoding":
            encodings.append(value.decode("utf-8", "surrogateescape"))
    return types, encodings


def _announced(up: ClientResponse, method: bytes) -> int | None:
    """The length to announce: the upstream's Content-Length (for HEAD, the one a GET would have had), or None
    (a chunked answer, or one that ends with the connection)."""
    if method != b"HEAD":
        return up.content_length
    values = up.headers.getall("Content-Length", ())
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])
    return None


async def _relay(exchange: Exchange, up: ClientResponse, gate: Gate | None) -> bool:
    """Stream the upstream answer to the caller, its head already sent; False when the upstream broke off (or
    fell silent for the route's timeout) after that. The caller going away (a dropped stream) is not an upstream
    failure: the relay just stops. With a `gate`, only what it returns is relayed, and the stream ends where it
    says so."""
    response = exchange.response
    stop = False
    try:
        while True:
            try:
                chunk = await up.read()  # each wait bounded by the route's timeout
            except (UpstreamError, BodyTimeout, _BodyLimit, ProtocolError):
                # The status line is already out: the only honest signal left is an unfinished body.
                response.abort()
                return False
            if not chunk:
                break
            if gate is None:
                await response.write(chunk)  # awaits the caller's pace: back-pressure reaches the upstream
                continue
            out, stop = await gate(chunk)
            if out:
                await response.write(out)
            if stop:
                break
        if gate is not None and not stop:
            out, _ = await gate(None)
            response.end(out)
        else:
            response.end()
    except ClientGone:
        pass  # writing to the caller failed: it is gone; the upstream answer is closed, not read on
    return True
