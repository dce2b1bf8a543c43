"""The pooled client to upstreams. It sends only what an `Allow` names, and relays the answer as it streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from pep import redirects
from pep.decision import Allow
from pep.headers import end_to_end, response_headers
from pep.metrics import Metrics
from pep.protocols import body as request_body
from pep.responses import upstream_failure
from pep.routing import Route
from pep.trace import CURRENT as CURRENT_TRACE

_CHUNK = 65536
WHOLE_ANSWER_LIMIT = 8 * 1048576  # the largest answer read whole to be decided (a JSON answer an AnswerCheck reads)

# Reads a streamed answer as it arrives (None once it has ended): the bytes to relay now, and True when the stream
# ends there (a refused event is never relayed: the gate returns an error event instead and ends the stream).
Gate = Callable[[bytes | None], Awaitable[tuple[bytes, bool]]]


class AnswerCheck(Protocol):
    """Inspects an answer before any byte of it reaches the caller: the one mechanism for every protocol whose
    answers are decided (MCP: pep/mcp_answers.py, model answers: pep/answers.py). The checks read and decide;
    this module only moves the bytes they return."""

    def mode(self, status: int, content_types: list[str], encodings: list[str]) -> str:
        """`pass` (relay unchanged), `whole` (read whole, then `whole`), `events` (through `gate`), or
        `unreadable` (a 502, nothing relayed). Given every `Content-Type` and `Content-Encoding` field value."""
        ...

    async def whole(self, body: bytes, content_type: str) -> bytes | web.StreamResponse | None:
        """What to send for a whole answer: its (maybe rewritten) body, a response of its own, or None when it
        cannot be read (a 502)."""
        ...

    async def gate(self, chunk: bytes | None) -> tuple[bytes, bool]: ...


class _BodyStream:
    """Streams a request body to the upstream. Each chunk must arrive within BODY_READ_TIMEOUT_S (`stalled`);
    with a `limit` (a body without a Content-Length), it stops once the body exceeds it (`exceeded`)."""

    __slots__ = ("_content", "_limit", "exceeded", "sent", "stalled")

    def __init__(self, content: aiohttp.StreamReader, limit: int | None, sent: Callable[[], None]) -> None:
        self._content = content
        self._limit = limit
        self.sent = sent  # called once the whole body has been handed to the upstream connection
        self.exceeded = False
        self.stalled = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                async with asyncio.timeout(request_body.BODY_READ_TIMEOUT_S):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.stalled = True
                raise
            if not chunk:
                self.sent()
                return
            seen += len(chunk)
            if self._limit is not None and seen > self._limit:
                self.exceeded = True
                raise ValueError("request body over max_body_bytes")
            yield chunk


class Upstream:
    """One keep-alive pool for all routes; per-route timeouts; no decompression, cookies or proxy env."""

    def __init__(self, metrics: Metrics, max_connections: int = 1000) -> None:
        self._metrics = metrics
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30, ttl_dns_cache=60),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp silently resends GET/HEAD/PUT/DELETE/... once when the connection drops before a response,
        # even after the upstream read (and maybe acted on) the request. One allow is one delivery: a drop is a
        # 502 `reset`, never a second copy. There is no public switch; aiohttp's own test client sets this too.
        self._session._retry_connection = False

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        """Connecting is bounded by aiohttp; the waits for data (headers, then every body chunk) by `forward` and
        `_relay` themselves, with `asyncio.timeout`. Not aiohttp's `sock_read`: aiohttp 3.14.5 re-arms that timer
        when the rest of a response read under back-pressure is drained, after its connection went back to the
        pool, and the timer then marks the idle connection failed; the next request on it, to a healthy
        upstream, failed at once with a 504 `timeout` (seen in the soak after 8 MiB streamed to a slow client;
        aiohttp issue 12953 fixed the case without back-pressure only)."""
        t = self._timeouts.get(route.name)
        if t is None:
            seconds = route.config.timeout_ms / 1000
            t = self._timeouts[route.name] = aiohttp.ClientTimeout(total=None, sock_connect=seconds)
        return t

    def headers_for(
        self, request: web.BaseRequest, allow: Allow, route: Route, credential: tuple[str, str] | None = None
    ) -> CIMultiDict[str]:
        """Caller headers that may cross, plus the ones the PEP alone sets: PDP obligations, the credential."""
        headers = CIMultiDict(end_to_end(request.headers, route.request_drop))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        headers["X-Forwarded-For"] = peer[0] if peer else "unknown"
        headers["X-Forwarded-Proto"] = request.scheme
        host = request.headers.get("Host")
        if host is not None:
            headers["X-Forwarded-Host"] = host
        headers["X-Request-ID"] = allow.request_id
        headers["X-PEP-Decision-ID"] = allow.decision_id
        trace = CURRENT_TRACE.get()
        if trace is not None:
            headers.update(trace.headers())
        for name, value in allow.headers:
            headers.popall(name, None)
            headers[name] = value
        if credential is not None:
            headers.popall(credential[0], None)
            headers[credential[0]] = credential[1]
        return headers

    async def forward(
        self,
        request: web.BaseRequest,
        allow: Allow,
        route: Route,
        credential: tuple[str, str] | None = None,
        answers: AnswerCheck | None = None,
        replaced: tuple[tuple[str, str], ...] = (),
    ) -> web.StreamResponse:
        """Send the allowed request and stream the response back; 502/504 when no response comes.

        With `answers`, the answer is inspected as `answers.mode` says (a whole answer is read up to
        WHOLE_ANSWER_LIMIT bytes), and what is unreadable is a 502 `unreadable`. `replaced` are caller headers
        sent with another value (a sealed `Last-Event-ID` opened, pep/protocols/mcp_tokens.py).
        """
        metrics = self._metrics
        headers = self.headers_for(request, allow, route, credential)
        for name, value in replaced:
            headers.popall(name, None)
            headers[name] = value
        if answers is not None:
            headers.popall("Accept-Encoding", None)  # the answer must be readable to be inspected
        wait = route.config.timeout_ms / 1000  # for the headers once the request is sent, then for each chunk
        loop = asyncio.get_running_loop()
        headers_due = asyncio.timeout(None)  # armed once the request, body and all, has gone out
        awaiting_headers = False

        def sent() -> None:
            if awaiting_headers:  # a body may end after an early answer: nothing to arm then
                headers_due.reschedule(loop.time() + wait)

        stream: _BodyStream | None = None
        data: object = None
        if allow.body is not None:
            data = allow.body
            # The decided bytes frame themselves: they may differ from what the caller sent (an MCP reply with the
            # server's own id put back, pep/protocols/mcp_replies.py).
            headers.popall("Content-Length", None)
            headers["Content-Length"] = str(len(allow.body))
        elif request.body_exists:
            # A Content-Length over the limit was denied before the PDP; only a chunked body is counted here.
            limit = route.config.max_body_bytes if request.content_length is None else None
            stream = _BodyStream(request.content, limit, sent)
            data = stream.chunks()
        if (
            allow.body is None
            and request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # Only now, after the allow: a denied client is answered before it ever sends its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        started = time.perf_counter()
        try:
            async with headers_due:
                awaiting_headers = True
                if stream is None:
                    sent()  # nothing to stream: it goes out at once
                try:
                    up = await self._session.request(
                        allow.method,
                        URL(allow.upstream_url, encoded=True),
                        headers=headers,
                        data=data,
                        allow_redirects=False,
                        timeout=self._timeout(route),
                    )
                finally:
                    awaiting_headers = False
            async with up:
                metrics.upstream_duration[route.name].observe(time.perf_counter() - started)
                metrics.upstream_responses[route.name, f"{min(up.status // 100, 5)}xx"].inc()
                headers_out = _answer_headers(up, route)
                mode = "pass"
                if answers is not None:
                    types = list(up.headers.getall("Content-Type", ()))
                    mode = answers.mode(up.status, types, list(up.headers.getall("Content-Encoding", ())))
                if mode == "whole":
                    rewritten = await _whole(up, answers.whole, headers_out, wait)  # type: ignore[union-attr]
                    if rewritten is not None:
                        return rewritten
                if mode in ("whole", "unreadable"):
                    metrics.upstream_failures[route.name, "unreadable"].inc()
                    return upstream_failure("unreadable", allow.request_id, allow.decision_id)
                gate = answers.gate if mode == "events" and answers is not None else None
                if gate is None and _whole_body_fits(request, up):
                    # Small and announced: read it all, then answer in one write (no chunk-by-chunk relay). A
                    # cut here is a clean 502 `reset`, since nothing has been sent to the caller yet.
                    async with asyncio.timeout(wait):
                        body = await up.read()
                    headers_out.popall("Content-Length", None)
                    return web.Response(status=up.status, reason=up.reason, headers=headers_out, body=body)
                response, complete = await _relay(request, up, headers_out, wait, gate)
                if not complete:
                    metrics.upstream_failures[route.name, "reset"].inc()
                if stream is not None and stream.stalled:  # the upstream answered before the body stalled
                    request_body.end_connection(request)
                return response
        except (TimeoutError, aiohttp.ServerTimeoutError):
            kind = "timeout"
        except aiohttp.ClientConnectorError:
            kind = "connect"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if stream is not None and stream.exceeded:
                kind = "body_limit"
            elif isinstance(exc, ValueError):
                raise
            else:
                kind = "reset"
        if stream is not None and stream.stalled:
            # The caller stopped sending its body: the upstream request is aborted, the caller's connection ends.
            kind = "body_timeout"
            request_body.end_connection(request)
        metrics.upstream_failures[route.name, kind].inc()
        response = upstream_failure(kind, allow.request_id, allow.decision_id)
        if kind == "body_timeout":
            response.force_close()
        return response

    async def close(self) -> None:
        await self._session.close()


WHOLE_BODY_LIMIT = 65536  # responses up to this size (with Content-Length) are read whole, then sent at once


def _whole_body_fits(request: web.BaseRequest, up: aiohttp.ClientResponse) -> bool:
    length = up.content_length
    if length is None or length > WHOLE_BODY_LIMIT or request.method == "HEAD":
        return False
    return not up.headers.get("Content-Type", "").lower().startswith("text/event-stream")


async def _next_chunk(up: aiohttp.ClientResponse, wait: float) -> bytes:
    """The next part of the response body as it arrives (b"" at its end); TimeoutError after `wait` seconds
    without one."""
    async with asyncio.timeout(wait):
        return await up.content.readany()


def _answer_headers(up: aiohttp.ClientResponse, route: Route) -> CIMultiDict[str]:
    """The upstream's response headers as the caller gets them: hop-by-hop ones dropped, and no header naming
    the upstream's own address (pep/redirects.py)."""
    headers = response_headers(up.headers)
    redirects.rewrite(headers, route)
    return headers


async def _whole(
    up: aiohttp.ClientResponse,
    decide: Callable[[bytes, str], Awaitable[bytes | web.StreamResponse | None]],
    headers: CIMultiDict[str],
    wait: float,
) -> web.StreamResponse | None:
    """The decided response, or None when the upstream's answer cannot be read whole (over WHOLE_ANSWER_LIMIT)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await _next_chunk(up, wait):
        size += len(chunk)
        if size > WHOLE_ANSWER_LIMIT:
            return None
        chunks.append(chunk)
    result = await decide(b"".join(chunks), up.headers.get("Content-Type", ""))
    if result is None or isinstance(result, web.StreamResponse):
        return result
    headers.popall("Content-Length", None)
    return web.Response(status=up.status, reason=up.reason, headers=headers, body=result)


async def _relay(
    request: web.BaseRequest,
    up: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    wait: float,
    gate: Gate | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Stream the upstream response to the caller; False when the upstream broke off (or fell silent for `wait`
    seconds) after the status line was sent. The caller going away (a dropped stream) is not an upstream
    failure: the relay just stops. With a `gate`, only what it returns is relayed, and the stream ends where it
    says so."""
    if gate is not None:
        headers.popall("Content-Length", None)  # the gate may end the body early or replace its end
    resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
    await resp.prepare(request)
    stop = False
    try:
        while True:
            try:
                chunk = await _next_chunk(up, wait)
            except (aiohttp.ClientError, OSError, TimeoutError):
                # The status line is already out: the only honest signal left is an unfinished body.
                if request.transport is not None:
                    request.transport.abort()
                return resp, False
            if not chunk:
                break
            if gate is None:
                await resp.write(chunk)  # awaits drain: back-pressure reaches the upstream
                continue
            out, stop = await gate(chunk)
            if out:
                await resp.write(out)
            if stop:
                break
        if gate is not None and not stop:
            out, _ = await gate(None)
            if out:
                await resp.write(out)
        await resp.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        pass  # writing to the caller failed: it is gone; leaving the `async with` closes the upstream response
    return resp, True
