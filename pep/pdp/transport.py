"""The pooled HTTP client to a PDP: one keep-alive pool, bounded answers, and transport errors classified."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError

from pep import __version__
from pep.decision import Reason
from pep.pdp import Failure
from pep.secret_file import FileSecret
from pep.trace import CURRENT as CURRENT_TRACE

_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
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

    Time limits are the caller's (the engine wraps each attempt in the decision deadline), so the session has
    none of its own. Redirects are never followed: a 3xx is an error status like any other non-2xx.
    """

    def __init__(self, max_response_bytes: int, max_connections: int, tls: ssl.SSLContext | None = None) -> None:
        self.max_response_bytes = max_response_bytes
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections, keepalive_timeout=30, ttl_dns_cache=60, ssl=tls if tls is not None else True
            ),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            skip_auto_headers=("Accept-Encoding",),
            headers={"User-Agent": f"failclosed-pep/{__version__}", "Accept": "application/json"},
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> RawAnswer | Failure:
        return await self.exchange("POST", url, body, headers)

    async def get(self, url: str, headers: dict[str, str]) -> RawAnswer | Failure:
        return await self.exchange("GET", url, None, headers)

    async def exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> RawAnswer | Failure:
        limit = self.max_response_bytes
        try:
            async with self._session.request(method, url, data=body, headers=headers, allow_redirects=False) as resp:
                h = resp.headers
                content_type = h.get("Content-Type", "")
                echoed = h.get("X-Request-ID")
                cache = h.get("Cache-Control")
                if resp.content_length is not None and resp.content_length > limit:
                    resp.close()
                    return RawAnswer(resp.status, content_type, b"", True, False, echoed, cache)
                chunks: list[bytes] = []
                size = 0
                try:
                    while chunk := await resp.content.read(_READ_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            resp.close()
                            return RawAnswer(resp.status, content_type, b"", True, False, echoed, cache)
                        chunks.append(chunk)
                except aiohttp.ClientPayloadError as exc:
                    # Bytes arrived but do not decode (a corrupt gzip body): a malformed answer, not a transport
                    # error, so it is neither reported as unreachable nor retried.
                    if not isinstance(exc.__cause__, ContentEncodingError):
                        raise
                    resp.close()
                    return RawAnswer(resp.status, content_type, b"", False, True, echoed, cache)
                return RawAnswer(resp.status, content_type, b"".join(chunks), False, False, echoed, cache)
        except (aiohttp.ClientError, OSError) as exc:
            return Failure(Reason.PDP_UNREACHABLE, "unreachable", True, f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        await self._session.close()
