"""The pooled HTTP client to a PDP: one keep-alive pool, bounded answers, and transport errors classified."""

from __future__ import annotations

import ssl

from pep import __version__
from pep.decision import Reason
from pep.pdp import NOT_ADMITTED, UNSENT, Failure, admitted
from pep.pdp.http1 import ExchangeError, Http1Client, NotAdmitted, RequestError
from pep.records import record
from pep.secret_file import FileSecret
from pep.trace import CURRENT as CURRENT_TRACE


@record
class RawAnswer:
    status: int
    content_type: str
    body: bytes
    oversize: bool  # the answer was longer than max_response_bytes; `body` is incomplete
    undecodable: bool = False  # the body does not decode under its Content-Encoding; `body` is empty
    request_id: str | None = None  # the X-Request-ID the PDP echoed, if any
    cache_control: str | None = None


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
            return Failure(Reason.PDP_UNREACHABLE, "error", False, "pdp.auth.value_file is missing or empty")
        headers[auth_header] = value
    return headers


class HttpTransport:
    """Sends bytes and returns the status, content type and body (at most `max_response_bytes`).

    Time limits are the caller's (the engine wraps each attempt in the decision deadline), so the client has
    none of its own. Redirects are never followed: a 3xx is an error status like any other non-2xx.
    """

    def __init__(self, max_response_bytes: int, max_connections: int, tls: ssl.SSLContext | None = None) -> None:
        self.max_response_bytes = max_response_bytes
        fixed = f"User-Agent: failclosed-pep/{__version__}\r\nAccept: application/json\r\n"
        self._client = Http1Client(max_response_bytes, max_connections, tls, fixed)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> RawAnswer | Failure:
        return await self.exchange("POST", url, body, headers)

    async def get(self, url: str, headers: dict[str, str]) -> RawAnswer | Failure:
        return await self.exchange("GET", url, None, headers)

    async def exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> RawAnswer | Failure:
        """The answer, or a Failure. Only a call that went out can end in one of the PDP's failures: a request
        that cannot be framed is the PEP's problem, and one the breaker no longer admits is `circuit_open`."""
        try:
            a = await self._client.exchange(method, url, body, headers, admitted)
        except NotAdmitted:
            return NOT_ADMITTED
        except RequestError as exc:
            return Failure(Reason.INTERNAL_ERROR, UNSENT, False, f"the PDP request cannot be framed: {exc}")
        except (ExchangeError, OSError) as exc:  # ssl.SSLError is an OSError
            return Failure(Reason.PDP_UNREACHABLE, "unreachable", True, f"{type(exc).__name__}: {exc}")
        except ValueError as exc:  # a URL the client cannot use: nothing was sent
            return Failure(Reason.PDP_UNREACHABLE, "error", False, str(exc))
        body_out = b"" if a.oversize else a.body
        return RawAnswer(a.status, a.content_type, body_out, a.oversize, a.undecodable, a.request_id, a.cache_control)

    async def close(self) -> None:
        await self._client.close()
