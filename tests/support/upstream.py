"""A recording upstream on a real socket. Every request it sees is kept, so tests can prove nothing arrived.

Paths choose the behaviour: `/sse?n=N&gap_ms=G` streams events (`&done=1`: then `data: [DONE]`, as OpenAI ends
a stream; `&json=1`: each event's data is a JSON object, as a model answer's chunks are; `&rpc=ID`: each is an
MCP progress notification and the last the JSON-RPC response to request ID), `/slow?ms=M` answers
late, `/hang` never answers,
`/reset` resets mid-response (`?length=N`: the Content-Length it announces, default 100000),
`/drop` resets after reading the request without answering at all,
`/big?bytes=N[&piece=P]` sends a large body (P bytes per write), `/status/N` answers N, anything else echoes: under
`/mcp`, as an MCP server answers (a JSON-RPC request gets a response whose result is the echo, a notification or
response 202).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.support.loopback import LoopbackServer


@dataclass
class Received:
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class RecordingUpstream(LoopbackServer):
    seen: list[Received] = field(default_factory=list)
    port: int = 0
    disconnects: int = 0
    # Largest request body the upstream reads (aiohttp's default is 1 MiB); raise it for big-upload tests.
    client_max_size: int = 1024**2
    connections: set[tuple[str, int]] = field(default_factory=set)

    async def start(self) -> None:
        server = web.Server(self._handle, handler_cancellation=True, access_log=None, auto_decompress=False)
        await self.serve(web.ServerRunner(server))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.client_max_size != request.client_max_size:
            request = request.clone(client_max_size=self.client_max_size)
        body = await request.read()
        self.seen.append(Received(request.method, request.raw_path, CIMultiDict(request.headers), body))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.connections.add(peer[:2])
        path = request.rel_url.path
        q = request.rel_url.query
        try:
            if path.startswith("/sse"):
                gap = int(q.get("gap_ms", "50")) / 1000
                n = int(q.get("n", "3"))
                if "rpc" in q:
                    return await self._rpc_sse(request, n, gap, int(q["rpc"]))
                return await self._sse(request, n, gap, q.get("done") == "1", q.get("json") == "1")
            if path.startswith("/slow"):
                await asyncio.sleep(int(q.get("ms", "100")) / 1000)
            elif path.startswith("/hang"):
                await asyncio.sleep(30)
            elif path.startswith("/reset"):
                return await self._reset(request, int(q.get("length", "100000")))
            elif path.startswith("/drop"):
                return self._drop(request)
            elif path.startswith("/big"):
                resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                await resp.prepare(request)
                left = int(q.get("bytes", "1000000"))
                piece = int(q.get("piece", "65536"))  # bytes per write
                while left > 0:
                    n = min(left, piece)
                    await resp.write(b"x" * n)
                    left -= n
                await resp.write_eof()
                return resp
            elif path.startswith("/status/"):
                return web.Response(status=int(path.rsplit("/", 1)[1]), body=b"status")
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        echo = {
            "method": request.method,
            "target": request.raw_path,
            "headers": {str(k): v for k, v in request.headers.items()},
            "body_len": len(body),
        }
        answer = orjson.dumps(echo)
        if path.startswith("/mcp") and request.method == "GET":  # the server stream: open, nothing to say yet
            return web.Response(body=b": open\n\n", content_type="text/event-stream")
        if path.startswith("/mcp") and request.method == "POST":
            answer = _rpc_answer(body, echo)
            if not answer:
                return web.Response(status=202)
        return web.Response(
            body=answer,
            content_type="application/json",
            headers={
                "Connection": "keep-alive, x-upstream-secret",
                "X-Upstream-Secret": "s",
                "Keep-Alive": "timeout=5",
                "X-Upstream": "yes",
            },
        )

    async def _sse(
        self, request: web.BaseRequest, n: int, gap: float, done: bool = False, as_json: bool = False
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i in range(n):
                data = f'{{"event": {i}}}' if as_json else f"event {i}"
                await resp.write(f"id: {i}\ndata: {data}\n\n".encode())
                await asyncio.sleep(gap)
            if done:
                await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            self.disconnects += 1
            raise
        await resp.write_eof()
        return resp

    async def _rpc_sse(self, request: web.BaseRequest, n: int, gap: float, rpc_id: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(n):
            last = i == n - 1
            message: dict[str, object] = {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progress": i},
            }
            if last:
                message = {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": []}}
            await resp.write(b"id: %d\ndata: %s\n\n" % (i, orjson.dumps(message)))
            if not last:
                await asyncio.sleep(gap)
        await resp.write_eof()
        return resp

    def _drop(self, request: web.BaseRequest) -> web.StreamResponse:
        """The whole request was read (and recorded); the connection is reset before any response byte."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=599)  # never sent: the transport is gone

    async def _reset(self, request: web.BaseRequest, length: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(length)})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return resp


def _rpc_answer(body: bytes, echo: dict[str, object]) -> bytes:
    """What an MCP server answers a POST: a response (result: the echo) to each request, nothing to the rest; a body
    that is not JSON-RPC gets the plain echo."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return orjson.dumps(echo)
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(m, dict) for m in items):
        return orjson.dumps(echo)
    answers = [{"jsonrpc": "2.0", "id": m["id"], "result": echo} for m in items if "method" in m and "id" in m]
    if not answers:
        return b""
    return orjson.dumps(answers if isinstance(value, list) else answers[0])
