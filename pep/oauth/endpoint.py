"""One exchange with an authorization server endpoint (a form POST, or a GET of a JSON document), classified.

It uses the PDP's HTTP/1.1 client (`pep.pdp.http1.Http1Client`): pooled keep-alive connections that are never
reused after a failure or a cancellation, a bound on the answer's size, verified TLS, redirects never followed.
The deadline is the caller's (`asyncio.timeout` around the exchange): a server that accepts the connection and
never answers (a frozen process) costs the deadline and nothing more.

Answers:
- `Reply`: a 2xx with one strict JSON object (`pep.strictjson`: no duplicate keys, nothing after it);
- `OAuthError`: a 400 or 401 with a JSON object whose `error` is a string (RFC 6749 5.2), a normal outcome;
- `Unavailable`: anything else, with `kind` (`unreachable`, `timeout`, `error`, `malformed`) and a detail that
  never quotes the body.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from pep import __version__, strictjson
from pep.pdp.answer import is_json_content_type
from pep.pdp.http1 import ExchangeError, Http1Client

MAX_ANSWER_BYTES = 256 * 1024
_DESCRIPTION_MAX = 200


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OAuthError:
    status: int
    error: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    kind: str  # "unreachable" | "timeout" | "error" | "malformed"
    detail: str


Answer = Reply | OAuthError | Unavailable


def _printable(text: str, limit: int = _DESCRIPTION_MAX) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def classify(status: int, content_type: str, body: bytes, oversize: bool, undecodable: bool) -> Answer:
    """Pure: what an answer means, from its status, content type and bytes."""
    if oversize:
        return Unavailable("malformed", f"answer larger than {MAX_ANSWER_BYTES} bytes")
    if undecodable:
        return Unavailable("malformed", "answer body could not be decoded (Content-Encoding)")
    json_type = is_json_content_type(content_type)
    obj: dict[str, Any] | None = None
    problem = ""
    if json_type:
        try:
            obj = strictjson.loads_object(body)
        except strictjson.JsonError as exc:
            problem = str(exc)[:100]
    if 200 <= status < 300:
        if obj is None:
            return Unavailable("malformed", f"status {status}: not one JSON object ({problem or 'content type'})")
        return Reply(status, obj)
    if status in (400, 401) and obj is not None and isinstance(obj.get("error"), str) and obj["error"]:
        description = obj.get("error_description")
        text = _printable(description) if isinstance(description, str) else None
        return OAuthError(status, _printable(obj["error"], 64), text)
    return Unavailable("error", f"status {status}")


class Endpoint:
    """Exchanges with one authorization server (any of its endpoints), over one pool."""

    def __init__(self, tls: ssl.SSLContext | None, max_connections: int = 16) -> None:
        fixed = f"User-Agent: failclosed-pep/{__version__}\r\nAccept: application/json\r\n"
        self._client = Http1Client(MAX_ANSWER_BYTES, max_connections, tls, fixed)

    async def post_form(self, url: str, form: dict[str, str], headers: dict[str, str], timeout_s: float) -> Answer:
        body = urlencode(form).encode("ascii")
        sent = {"Content-Type": "application/x-www-form-urlencoded", "Cache-Control": "no-store", **headers}
        return await self._exchange("POST", url, body, sent, timeout_s)

    async def get_json(self, url: str, timeout_s: float) -> Answer:
        return await self._exchange("GET", url, None, {}, timeout_s)

    async def _exchange(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float
    ) -> Answer:
        if timeout_s <= 0:
            return Unavailable("timeout", "no time left")
        try:
            async with asyncio.timeout(timeout_s):
                a = await self._client.exchange(method, url, body, headers)
        except TimeoutError:
            return Unavailable("timeout", f"no answer within {round(timeout_s * 1000)} ms")
        except (ExchangeError, OSError) as exc:  # ssl.SSLError is an OSError
            return Unavailable("unreachable", f"{type(exc).__name__}: {_printable(str(exc), 120)}")
        except ValueError as exc:  # a header value with a line break (a secret file holding one)
            return Unavailable("error", _printable(str(exc), 120))
        return classify(a.status, a.content_type, a.body, a.oversize, a.undecodable)

    async def close(self) -> None:
        await self._client.close()
