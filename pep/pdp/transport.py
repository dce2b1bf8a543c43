"""The pooled HTTP client to a PDP: one keep-alive pool, bounded answers, and transport errors classified."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from pep import __version__
from pep.decision import Reason
from pep.http1 import Fields, LocalProtocolError
from pep.pdp import GATE, NOT_ADMITTED, UNSENT, Failure
from pep.pdp.http1 import (
    Answer,
    ExchangeError,
    Http1Client,
    NotAdmitted,
    RequestError,
    Target,
    exchange_error,
    to_fields,
    unframed,
)
from pep.secret_file import FileSecret
from pep.trace import CURRENT as CURRENT_TRACE
from pep.transport import UpstreamError

T = TypeVar("T")

# What a PDP answered: status, content type, body (at most `max_response_bytes`, decoded), what went wrong with it,
# the X-Request-ID it echoed and its Cache-Control. The HTTP client's own answer, passed on as it is.
RawAnswer = Answer

# The one content type of every decision request: a fixed field of the decision endpoint's request head.
_JSON: Final[tuple[tuple[bytes, bytes], ...]] = ((b"Content-Type", b"application/json"),)
# Names `request_headers` writes itself: an auth header of one of these names is merged into it (the general path).
_WRITTEN: Final = frozenset({"Content-Type", "X-Request-ID", "traceparent", "tracestate"})
# What a send raises instead of answering (see `_send_failure`).
_SEND_ERRORS: Final = (NotAdmitted, LocalProtocolError, UpstreamError, OSError, ValueError)
_NO_AUTH: Final = Failure(Reason.PDP_UNREACHABLE, "error", False, "pdp.auth.value_file is missing or empty")


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """Verifying client context: the CA file (or the system's CAs), and a client certificate for mTLS."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def request_headers(request_id: str, auth: FileSecret | None, auth_header: str) -> dict[str, str] | Failure:
    """Headers of a decision request: JSON, the request id, and the PEP's credential for the PDP if any."""
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
    trace = CURRENT_TRACE.get()
    if trace is not None:
        headers.update(trace.headers())
    if auth is not None:
        value = auth.value()
        if value is None:
            return _NO_AUTH
        headers[auth_header] = value
    return headers


def _failure(exc: Exception) -> Failure:
    """A request that could not be sent, or an exchange that failed, classified (see `HttpTransport.exchange`)."""
    if isinstance(exc, RequestError):
        return Failure(Reason.INTERNAL_ERROR, UNSENT, False, f"the PDP request cannot be framed: {exc}")
    if isinstance(exc, ExchangeError | OSError):  # ssl.SSLError is an OSError
        return Failure(Reason.PDP_UNREACHABLE, "unreachable", True, f"{type(exc).__name__}: {exc}")
    return Failure(Reason.PDP_UNREACHABLE, "error", False, str(exc))  # a URL the client cannot use: nothing sent


def _send_failure(exc: Exception, headers: Callable[[], dict[str, str]]) -> Failure:
    """A send that did not end in an answer, classified: not admitted (`circuit_open`), a field the writer refused
    or a failed exchange (`headers()`: the request's headers, for the explanation), a refused connection or an
    unusable URL. One place for `exchange` and `ask`, so that both fail alike."""
    if isinstance(exc, NotAdmitted):
        return NOT_ADMITTED
    if isinstance(exc, LocalProtocolError | UpstreamError):
        return _failure(exchange_error(exc, headers()))
    return _failure(exc)


def _as_headers(fields: Fields) -> dict[str, str]:
    """A decision request's fields as `request_headers` has them (for the error path's explanation)."""
    return {"Content-Type": "application/json", **{n.decode("latin-1"): v.decode("latin-1") for n, v in fields}}


class HttpTransport:
    """Sends bytes and returns the status, content type and body (at most `max_response_bytes`).

    Time limits are the caller's (the engine wraps each attempt in the decision deadline), so the client has
    none of its own. Redirects are never followed: a 3xx is an error status like any other non-2xx.
    """

    def __init__(self, max_response_bytes: int, max_connections: int, tls: ssl.SSLContext | None = None) -> None:
        self.max_response_bytes = max_response_bytes
        fixed = f"User-Agent: failclosed-pep/{__version__}\r\nAccept: application/json\r\n"
        self._client = Http1Client(max_response_bytes, max_connections, tls, fixed)
        self._asks: dict[str, Target] = {}  # per decision URL: its request head's constant part, JSON included

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Coroutine[Any, Any, RawAnswer | Failure]:
        return self.exchange("POST", url, body, headers)

    def get(self, url: str, headers: dict[str, str]) -> Coroutine[Any, Any, RawAnswer | Failure]:
        return self.exchange("GET", url, None, headers)

    async def exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> RawAnswer | Failure:
        """The answer, or a Failure. Only a call that went out can end in one of the PDP's failures: a request
        that cannot be framed is the PEP's problem, and one the breaker no longer admits is `circuit_open`.

        The pool asks the decision's gate itself (`pep.pdp.admitted` without the look-up per question: the gate
        is the task's, and stays the same while it waits), or nothing without one."""
        client = self._client
        try:
            target = client.target(method, url)
            response, data = await client.send(target, to_fields(headers), body, GATE.get())
        except _SEND_ERRORS as exc:
            return _send_failure(exc, lambda: headers)
        return client.read(response, data)

    async def ask(
        self,
        url: str,
        body: bytes,
        request_id: str,
        auth: FileSecret | None,
        auth_header: str,
        parse: Callable[[RawAnswer], T],
    ) -> T | Failure:
        """A decision request, its answer read by `parse`: `post(url, body, request_headers(...))`, the same
        bytes on the wire and the same failures in the same order, but the head's constant part (JSON included)
        built once per URL and this request's fields made as bytes at once. (An auth header that
        `request_headers` would merge with one of its own takes that path, as it is.) `parse` is called here so
        that a PDP's `ask` can hand this coroutine to the engine as its own: one level less on each wake-up."""
        if auth_header in _WRITTEN:
            headers = request_headers(request_id, auth, auth_header)
            if isinstance(headers, Failure):
                return headers
            answer = await self.exchange("POST", url, body, headers)
            return answer if isinstance(answer, Failure) else parse(answer)
        value = None
        if auth is not None:
            value = auth.value()
            if value is None:
                return _NO_AUTH
        client = self._client
        try:
            target = self._asks.get(url)
            if target is None:
                if len(self._asks) > 64:
                    self._asks.clear()
                target = self._asks[url] = client.target("POST", url, _JSON)
        except ValueError as exc:
            return _failure(exc)
        trace = CURRENT_TRACE.get()
        try:
            fields = [(b"X-Request-ID", request_id.encode("latin-1"))]
            if trace is not None:
                fields += trace.fields()  # ASCII by construction: no dict and no encode per field
            if value is not None:
                fields.append((auth_header.encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
            if trace is not None:
                headers.update(trace.headers())
            if value is not None:
                headers[auth_header] = value
            return _failure(unframed(headers))
        try:
            response, data = await client.send(target, fields, body, GATE.get())
        except _SEND_ERRORS as send_error:
            return _send_failure(send_error, lambda: _as_headers(fields))
        return parse(client.read(response, data))

    async def close(self) -> None:
        await self._client.close()
