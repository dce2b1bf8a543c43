"""Microbenchmark of pep/http1's request reader next to aiohttp's and h11's (issue 15, item 1). Not a test.

    .venv/bin/python -m bench.http1_core [--rounds N]

Two requests as an agent sends them: a 300-byte GET head, and a 2 KB MCP `tools/call` POST (Content-Length).
Each parser reads N copies of the request over one keep-alive connection, one complete request per read, body
included, the way a listener receives them; the figure is CPU time (the process's, so that other work on a
shared machine counts less), the best of 7 runs, in µs per request.
- pep.http1: RequestReader, head through llhttp (no Python callbacks), body sliced from the buffer;
- aiohttp: the C parser behind aiohttp's server (llhttp with callbacks, CIMultiDict headers, a yarl URL, the
  body fed into a StreamReader), as the listener uses it today;
- h11: pure Python; its connection must answer each request before reading the next, so a minimal response is
  serialized per request too (h11's floor for a keep-alive server);
- httptools callbacks: llhttp calling a Python method per URL, header and body piece (the way uvicorn uses it),
  the floor of any parser that collects fields through callbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import h11
import httptools
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser as AiohttpParser

from pep.http1 import PAUSED, Data, EndOfMessage, RequestReader

GET = (
    b"GET /tools/search?q=refunds&limit=10 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"User-Agent: python-httpx/0.28.1\r\n"
    b"Accept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Agent-ID: agent-7\r\n"
    b"Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2lnbmF0dXJl\r\n"
    b"Traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
)
_ARGUMENTS = b'{"query":"' + b"x" * 1900 + b'"}'
_BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":' + _ARGUMENTS + b"}}"
POST = (
    b"POST /mcp HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Content-Type: application/json\r\n"
    b"Accept: application/json, text/event-stream\r\n"
    b"Mcp-Session-Id: 3f2c1d8e-5b6a-4c7d-9e8f-0a1b2c3d4e5f\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_BODY)
) + _BODY


def core(data: bytes, n: int) -> int:
    reader = RequestReader()
    body = 0
    for _ in range(n):
        reader.receive_data(data)
        while (event := reader.next_event()) is not PAUSED:
            if type(event) is Data:
                body += len(event.data)
        reader.start_next()
    return body


def aiohttp_c(data: bytes, n: int) -> int:
    loop = asyncio.new_event_loop()
    try:
        protocol = BaseProtocol(loop)
        parser = AiohttpParser(protocol, loop, 2**16)
        body = 0
        for _ in range(n):
            messages, _, _ = parser.feed_data(data)
            for _, payload in messages:
                body += payload.total_bytes
        return body
    finally:
        loop.close()


def h11_server(data: bytes, n: int) -> int:
    conn = h11.Connection(h11.SERVER)
    body = 0
    for _ in range(n):
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += len(event.data)
            elif isinstance(event, EndOfMessage | h11.EndOfMessage):
                break
        conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    return body


class _Callbacks:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = 0

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.fields = []


def httptools_callbacks(data: bytes, n: int) -> int:
    callbacks = _Callbacks()
    parser = httptools.HttpRequestParser(callbacks)
    for _ in range(n):
        parser.feed_data(data)
    return callbacks.body


PARSERS: dict[str, Callable[[bytes, int], int]] = {
    "pep.http1": core,
    "aiohttp (C)": aiohttp_c,
    "h11": h11_server,
    "httptools callbacks": httptools_callbacks,
}


def measure(parse: Callable[[bytes, int], int], data: bytes, rounds: int) -> float:
    runs = []
    for _ in range(7):
        started = time.process_time()
        parse(data, rounds)
        runs.append((time.process_time() - started) / rounds * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20000, help="requests per run")
    args = parser.parse_args()
    body = len(POST) - POST.index(b"\r\n\r\n") - 4
    for name, parse in PARSERS.items():  # every parser reads the same body
        assert parse(POST, 3) == 3 * body, name
    print(f"| parser | GET head, {len(GET)} B (µs) | POST, {len(POST)} B (µs) |")
    print("|---|---:|---:|")
    for name, parse in PARSERS.items():
        print(f"| {name} | {measure(parse, GET, args.rounds):.2f} | {measure(parse, POST, args.rounds):.2f} |")


if __name__ == "__main__":
    main()
