"""Writes the seed corpora (fuzz/corpus/<harness>/): small valid and nearly valid inputs of each harness's input
format, so that the fuzzers start from the shapes that matter. Deterministic; the files are committed.

    python -m fuzz.seeds        (any interpreter: it needs only the standard library)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"

INTEGRITY = [
    "/tools/search\nq=1&x=%20\napi.example.com:443\naccept,user-agent",
    "/a/./b\n\n[::1]:8080\nx-http-method-override",
    "/a/%2e%2E/b\na=b#c\nexample.com\nX-Original-URL",
    "/a/%252e%252e/b;x\n\nEXAMPLE.com:0\nx-rewrite-url,X-HTTP-Method",
    "/a/%%32%65/%2%66\n%00\n[fe80::1]\nx-method-override",
    "/a/..;jsessionid=1/b\n\nhost:65536\n",
    "/%61dmin/%7e/%41\nx=\u00e9\n127.0.0.1:9901\naccept",
    "/mcp\n\n@evil.com\n",
    "/v1/chat/completions\nstream=true\nexample.com:443/path\n",
    "/a\\b/c%5c%00%0a%7f\n\n[v6]\n",
    "//tools//admin/;x/a%3Bb;c\n_method=DELETE&.method=x\n127.0.0.1\nx-forwarded-uri,X-Envoy-Original-Path",
    "/tools/x%3%62;v=1/\n%5Fmethod[]=PUT;a=1\nexample.com\nx-original-uri,x-forwarded-prefix",
]

MCP = [
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "send_email", "arguments": {"to": "a"}}},
    {"jsonrpc": "2.0", "id": "x", "method": "resources/read", "params": {"uri": "file:///etc/passwd"}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "result": {"content": []}},
    {"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": {"protocolVersion": "2025-03-26"}},
    [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"jsonrpc": "2.0", "id": 2, "method": "prompts/get"}],
    {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tools/call",
        "params": {"name": "t", "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
    },
]
MODEL = [
    {"model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "web_search"}]},
    {"model": "m", "functions": [{"name": "g"}], "input": "x"},
]
RAW_BODIES = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","\\u006eame":"b"}}',
    b'{"model":"m","max_tokens":100000000000000000001}',
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    b'\xef\xbb\xbf{"model":"m"}',
    b'{"model":"m"} {}',
    b'{"model":NaN}',
    b"[]",
]
# (byte 0, byte 1, byte 2) of fuzz_bodies: mcp POST plain; mcp POST with all mirrored headers; openai POST to a
# model endpoint; mcp GET with a body; openai with gzip; http route
BODY_CONFIGS = [
    bytes([0, 0, 0]),
    bytes([0, 7, 0b000101]),
    bytes([1, 0x40, 0]),
    bytes([0x68, 0, 0]),
    bytes([1, 0x48, 0]),
    bytes([2, 0x80, 0]),
]

OPA = [
    b'{"result":true}',
    # lone surrogate escapes (RFC 8259's grammar allows them, strict JSON refuses them): the first found by the fuzzer
    b'{"0\\ude70x":{"reason_admin":{"en":"no"}}}',
    b'{"result":true,"x":"\\ud800"}',
    b'{"result":false}',
    b'{"result":{"allow":true,"headers":{"x-tenant":"t"},"reason":"ok"}}',
    b'{"result":{"allow":"true"}}',
    b"{}",
    b'{"result":false,"result":true}',
    b'{"result":true} x',
    b'{"decision_id":"d","result":{"allow":1}}',
    b'{"result":{"allow":false,"approval":{"approver":"alice@example.com","message":"Refund over 100"}}}',
    b'{"result":{"allow":true,"approval":{"approver":"alice"}}}',
]
AUTHZEN = [
    b'{"decision":true}',
    b'{"decision":false,"context":{"reason_admin":{"en":"no"}}}',
    b'{"decision":true,"context":{"obligations":[{"id":"log"}]}}',
    b'{"evaluations":[{"decision":true},{"decision":false},{}]}',
    b'{"decision":1}',
    b'{"decision":false,"context":{"access_request":{"approver":"alice","expires_at":"2026-04-30T20:25:00Z",'
    b'"display":{"description":"Manager approval"}}}}',
    b'{"decision":false,"context":{"access_request":{"approver":"alice","expires_at":"2026-04-30T20:25:00"}}}',
]
# (byte 0, byte 1, byte 2) of fuzz_pdp_answers: a 200 JSON answer echoing nothing, echoing the id sent, a 503, a
# text/plain 200, an oversize one, a batch of three
ANSWER_CONFIGS = [
    bytes([0, 0, 0]),
    bytes([0, 0, 0x10]),
    bytes([29, 0, 0]),
    bytes([0, 9, 0]),
    bytes([0, 0, 3]),
    bytes([0, 0, 0x80]),
]

RESPONSES = [
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"result":true}',
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID: rid-1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"res\r\na\r\nult":true}\r\n0\r\n\r\n',
    b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n{"decision":true}',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nCache-Control: max-age=5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n{",
    b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"res',
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"HTTP/1.0 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n\r\n"
    + gzip.compress(b'{"result":true}', mtime=0),
    # a second gzip member after the first (trailing data), and Content-Encoding in two fields
    b"HTTP/1.0 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n\r\n"
    + gzip.compress(b'{"result":true}', mtime=0)
    + gzip.compress(b"{}", mtime=0),
    b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Encoding: deflate\r\nContent-Length: 17\r\n"
    b"Content-Type: application/json\r\n\r\n" + zlib.compress(b"{}") + b"x" * 7,
    # control characters in the reason phrase (llhttp passes them)
    b"HTTP/1.1 200 O\x01\x00K\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
]

REQUESTS = [
    b"GET /tools/search?q=1 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
    b"POST /mcp HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\nhi",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
    b"GET http://h/x HTTP/2.0\r\nHost: h\r\n\r\n",
]
# (byte 0, byte 1) of fuzz_http1_core: requests, no limit; requests in 3 reads with EOF and a 4-byte limit; a
# response to GET in one read; to HEAD with EOF; to CONNECT in 2 reads; to POST with tiny limits and a limit of 8
CORE_REQUESTS = [bytes([0, 255]), bytes([0b1010, 4])]
CORE_RESPONSES = [bytes([1, 255]), bytes([0b100011, 255]), bytes([0b1100101, 255]), bytes([0b11000001, 8])]


# fuzz_answers: a chunk-size byte, then an SSE stream (MCP answers and model answer streams are read by one reader).
SSE_STREAMS = [
    b': ping\n\nevent: message\nid: ev-1\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
    b'id: ev-2\ndata: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"shell"}]}}\n\n',
    b'\xef\xbb\xbfdata:{"jsonrpc":"2.0","id":"1","result":{}}\r\n\r\n',
    b'retry: 1000\rid: a\x00b\rdata: {"jsonrpc":"2.0",\rdata: "id":1,"result":{}}\r\r',
    b'event: other\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\ndata: [DONE]\n\n',
    b'data: {"jsonrpc":"2.0","id":7,"method":"elicitation/create","params":{"requestedSchema":{"properties":{}}}}\n',
    b'data: {"jsonrpc":"2.0","id":1,"result":{"Tools":[]}}\n\ndata: \xff\xfe\n\n',
    'data: {"choices":[{"delta":{"content":"é"}}]}\n\n'.encode(),
]


def write(harness: str, inputs: list[bytes]) -> None:
    folder = CORPUS / harness
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for data in inputs:
        (folder / hashlib.sha1(data, usedforsecurity=False).hexdigest()[:16]).write_bytes(data)


def main() -> None:
    write("integrity", [s.encode() for s in INTEGRITY])
    bodies = [json.dumps(v, separators=(",", ":")).encode() for v in MCP + MODEL] + RAW_BODIES
    write(
        "bodies",
        [config + body for config in BODY_CONFIGS for body in bodies[:: len(BODY_CONFIGS) - 1]]
        + [BODY_CONFIGS[i % 3] + body for i, body in enumerate(bodies)],
    )
    answers = OPA + AUTHZEN
    write(
        "pdp_answers",
        [config + body for config in ANSWER_CONFIGS[1:] for body in answers[::4]]
        + [ANSWER_CONFIGS[0] + body for body in answers],
    )
    write("pdp_http1", [bytes([b]) + r for r in RESPONSES for b in (0, 1)] + [bytes([0b1111]) + RESPONSES[1]])
    write(
        "http1_core",
        [c + r for c in CORE_REQUESTS for r in REQUESTS] + [c + r for c in CORE_RESPONSES for r in RESPONSES[::2]],
    )
    write("answers", [bytes([size]) + s for s in SSE_STREAMS for size in (0, 6)])


if __name__ == "__main__":
    main()
