"""The bypass corpus: known ways around a reverse-proxy PEP, each written as raw bytes to a real socket.

One table, `CORPUS`. Each case says what the caller sees (the status, and `x-pep-reason` where the PEP itself
denies) and what the upstream sees: nothing at all, unless the case is marked forwarded, and then exactly that
request (method, target, body bytes) once, carrying the id of the allow decision in the log. The PDP behind it
(`CorpusPdp`) has a real policy: tools `search`, `send_email` and `résumé` (NFC), model `gpt-ok`, and any GET or
POST on `/tools/...` except under `/tools/admin`. It compares names byte for byte, as the PEP passes them.

Slow cases shrink the PEP's deadlines (`BODY_READ_TIMEOUT_S`, `KEEPALIVE_S`) to DEADLINE_S before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

import pep.app
import pep.protocols.body
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.observe import metric
from tests.support.policy_pdp import PolicyPdp
from tests.support.upstream import Received, RecordingUpstream

READ_TIMEOUT = 3.0  # the longest any answer (or the connection closing) may take
DEADLINE_S = 0.3  # body-read deadline and keep-alive (header) timeout in the slow cases
TRICKLE_GAP = 0.07  # between the bytes of a trickled body: each is in time, the whole body is not

ALLOWED_TOOLS = frozenset({"search", "send_email", "r\u00e9sum\u00e9"})
ALLOWED_MODELS = frozenset({"gpt-ok"})
# Denials the PEP makes before asking the PDP.
EARLY = frozenset({"request_ambiguous", "body_unreadable", "body_too_large", "no_route"})


# --- the PDP, the PEP and the wire ---------------------------------------------------------------------------------


def policy(doc: dict[str, Any]) -> bool:
    mcp = doc.get("mcp")
    if mcp is not None:
        return mcp.get("name") in ALLOWED_TOOLS
    model = doc.get("model")
    if model is not None:
        return model.get("name") in ALLOWED_MODELS
    request = doc["request"]
    return request["method"] in ("GET", "POST") and not request["path"].startswith("/tools/admin")


class CorpusPdp(PolicyPdp):
    """An OPA-shaped PDP applying `policy`, keeping every input document."""

    def decide(self, doc: dict[str, Any]) -> Any:
        return policy(doc)


def corpus_routes(cfg: dict[str, Any]) -> None:
    up = cfg["routes"][0]["upstream"]
    cfg["routes"] = [
        {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": up},
        {"name": "small", "match": {"path_prefix": "/small"}, "upstream": up, "max_body_bytes": 16},
        {
            "name": "mcp",
            "match": {"path_prefix": "/mcp"},
            "upstream": up + "/mcp",
            "strip_prefix": True,
            "protocol": "mcp",
            "max_body_bytes": 512,
        },
        {"name": "params", "match": {"path_prefix": "/params"}, "upstream": up, "allow_path_parameters": True},
        {
            "name": "openai",
            "match": {"path_prefix": "/v1"},
            "upstream": up + "/v1",
            "strip_prefix": True,
            "protocol": "openai",
        },
    ]


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """One response (Content-Length framed, as the PEP and the echo upstream send them); None when the
    connection closes first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return Answer(status, headers, body)


async def closes(reader: asyncio.StreamReader, patience: float) -> bool:
    """Whether the peer closes the connection within `patience` seconds, sending nothing more."""
    try:
        return await asyncio.wait_for(reader.read(1), patience) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            await asyncio.sleep(TRICKLE_GAP)
            writer.write(data[i : i + 1])
            await writer.drain()


# --- the cases ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forwarded:
    """The one request the upstream must see: method, target and body, byte for byte."""

    method: str
    target: str
    body: bytes = b""


Check = Callable[[Received, dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    id: str
    send: bytes  # `{port}` and `{up}` become the PEP's and the upstream's ports
    status: int | None  # None: the connection closes with no answer at all
    reason: str | None = None  # the x-pep-reason of a PEP denial; None where the PEP answers nothing of its own
    forwarded: Forwarded | None = None  # allowed: exactly this reaches the upstream
    upstream_error: str | None = None  # allowed, then failed: the x-pep-upstream-error kind (nothing forwarded)
    trickle: bytes = b""  # sent a byte at a time after `send`
    slow: bool = False  # run with the deadlines shrunk to DEADLINE_S (with `closed`: the deadline ends it)
    closed: bool = False  # the connection must close after the answer
    pdp_name: str | None = None  # the MCP name the PDP was asked about, exactly
    check: Check | None = None  # more checks on the forwarded request and the allow's log entry


def raw(method: str, target: str, *headers: str, body: bytes = b"", length: bool = True) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:{port}", *headers]
    if length and (body or method == "POST"):
        head.append(f"Content-Length: {len(body)}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def get(target: str, *headers: str) -> bytes:
    return raw("GET", target, *headers)


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


JSON = ("Content-Type: application/json", "Accept: application/json, text/event-stream")
# Plain http routes stream a body unless it may be a form (urlencoded, or no Content-Type): then it is read whole.
OCTETS = "Content-Type: application/octet-stream"


def mcp(body: bytes, *headers: str) -> bytes:
    return raw("POST", "/mcp", *JSON, *headers, body=body)


def call(name: str, rpc_id: int = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": {"name": name}})


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


def openai(body: bytes, *headers: str) -> bytes:
    return raw("POST", "/v1/chat/completions", *JSON, *headers, body=body)


def denied(id: str, send: bytes, reason: str, status: int = 403, **kw: Any) -> Case:
    return Case(id, send, status, reason, **kw)


def parser_400(id: str, send: bytes, status: int = 400) -> Case:
    """Refused by the listener's HTTP/1.1 reader (pep/http1) with its status hint: no handler ran, nothing was
    decided, the connection is closed."""
    return Case(id, send, status, closed=True)


def allowed(id: str, send: bytes, method: str, target: str, body: bytes = b"", **kw: Any) -> Case:
    return Case(id, send, 200, forwarded=Forwarded(method, target, body), **kw)


def headers_are_the_peps(sent: Received, entry: dict[str, Any]) -> None:
    """The PEP's own ids and forwarding headers reach the upstream, once each, whatever Connection named."""
    assert sent.headers.getall("X-Request-ID") == [entry["request_id"]]
    assert sent.headers.getall("X-PEP-Decision-ID") == [entry["decision_id"]]
    assert sent.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert "Connection" not in sent.headers


def no_caller_credentials(sent: Received, entry: dict[str, Any]) -> None:
    headers_are_the_peps(sent, entry)
    assert "Authorization" not in sent.headers


def caller_request_id_kept(sent: Received, entry: dict[str, Any]) -> None:
    headers_are_the_peps(sent, entry)
    assert entry["request_id"] == "caller-id-1"


CYRILLIC_S = "\u0455end_email"  # U+0455 CYRILLIC SMALL LETTER DZE, drawn like a Latin s
NFD_RESUME = "re\u0301sume\u0301"  # the NFD form of the allowed NFC "résumé"
FULLWIDTH = "\uff53\uff45\uff41\uff52\uff43\uff48"  # NFKC would make it "search"
GZIPPED_CALL = gzip.compress(call("search"))
BATCH_MIXED = b"[" + call("search", 1) + b"," + call("delete_all", 2) + b"]"
BATCH_ALLOWED = b"[" + call("search", 1) + b"," + call("send_email", 2) + b"]"
SMUGGLED = b"GET /tools/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"

CORPUS: list[Case] = [
    # --- dot segments, their encodings, double encoding, encoded slashes -----------------------------------------
    denied("dot-dot", get("/tools/../admin"), "request_ambiguous"),
    denied("dot", get("/tools/./admin"), "request_ambiguous"),
    denied("dot-dot-encoded", get("/tools/%2e%2e/admin"), "request_ambiguous"),
    denied("dot-dot-mixed-case-half-encoded", get("/tools/%2E./admin"), "request_ambiguous"),
    denied("dot-dot-double-encoded", get("/tools/%252e%252e/admin"), "request_ambiguous"),
    denied("dot-dot-triple-encoded", get("/tools/%25252e%25252e/admin"), "request_ambiguous"),
    denied("dot-dot-encoded-hex-digits", get("/tools/%2%65%2%65/admin"), "request_ambiguous"),
    denied("trailing-dot-dot", get("/tools/admin/x/.."), "request_ambiguous"),
    denied("encoded-slash", get("/tools/..%2fadmin"), "request_ambiguous"),
    denied("encoded-slash-upper", get("/tools/x%2F..%2F..%2Fadmin"), "request_ambiguous"),
    denied("double-encoded-slash", get("/tools/..%252fadmin"), "request_ambiguous"),
    denied("encoded-backslash", get("/tools/..%5cadmin"), "request_ambiguous"),
    denied("raw-backslash", get("/tools/..\\admin"), "request_ambiguous"),
    denied("encoded-unreserved", get("/tools/%61dmin"), "request_ambiguous"),
    denied("encoded-nul", get("/tools/admin%00.json"), "request_ambiguous"),
    denied("fragment", get("/tools/x#/../admin"), "request_ambiguous"),
    allowed("dots-in-the-query", get("/tools/x?next=/../admin&p=%2e%2e"), "GET", "/tools/x?next=/../admin&p=%2e%2e"),
    denied("policy-control-admin", get("/tools/admin"), "policy_denied"),
    # --- empty segments: nginx (merge_slashes), Tomcat and Spring serve `/tools//admin` as `/tools/admin` -------
    denied("empty-segment", get("/tools//admin"), "request_ambiguous"),
    denied("leading-double-slash", get("//tools/admin"), "request_ambiguous"),
    denied("trailing-double-slash", get("/tools/admin//"), "request_ambiguous"),
    denied("many-slashes", get("/tools///admin"), "request_ambiguous"),
    denied("encoded-double-slash", get("/tools/%2F%2Fadmin"), "request_ambiguous"),
    denied("empty-segment-absolute-form", get("http://127.0.0.1:{port}/tools//admin"), "request_ambiguous"),
    denied(
        "empty-segment-after-a-stripped-prefix", mcp(call("search")).replace(b"/mcp ", b"/mcp//x "), "request_ambiguous"
    ),
    denied("empty-segment-with-parameters", get("/tools/;x/admin"), "request_ambiguous"),
    allowed("one-trailing-slash", get("/tools/x/"), "GET", "/tools/x/"),
    # --- path parameters (`;`): Tomcat, Jetty and Spring drop them; refused unless the route accepts them ------
    denied("param-then-dot-dot", get("/tools;x/../admin"), "request_ambiguous"),
    denied("dot-dot-param", get("/tools/..;/admin"), "request_ambiguous"),
    denied("encoded-dot-dot-param", get("/tools/%2e%2e;x/admin"), "request_ambiguous"),
    denied("param-on-the-prefix", get("/tools;x/search"), "no_route"),
    denied("param-on-a-denied-path", get("/tools/admin;x"), "request_ambiguous"),
    denied("param-refused-by-default", get("/tools/x;p=1/y"), "request_ambiguous"),
    denied("encoded-param", get("/tools/admin%3Bx"), "request_ambiguous"),
    denied("double-encoded-param", get("/tools/admin%253Bx"), "request_ambiguous"),
    allowed("param-on-a-route-that-accepts-them", get("/params/x;p=1/y"), "GET", "/params/x;p=1/y"),
    denied("dot-dot-param-on-a-route-that-accepts-them", get("/params/..;/admin"), "request_ambiguous"),
    denied("empty-param-on-a-route-that-accepts-them", get("/params/;x/admin"), "request_ambiguous"),
    denied("semicolon-in-the-query", get("/tools/x?a=1;b=2"), "request_ambiguous"),
    denied("semicolon-hiding-a-second-field", get("/tools/x?tenant=acme&x=1;tenant=evil"), "request_ambiguous"),
    allowed("encoded-semicolon-in-the-query", get("/tools/x?a=1%3Bb=2"), "GET", "/tools/x?a=1%3Bb=2"),
    # --- absolute form, Host, CONNECT, asterisk form ------------------------------------------------------------
    denied("absolute-form-other-host", get("http://evil.example/tools/x"), "request_ambiguous"),
    denied("absolute-form-other-port", get("http://127.0.0.1:1/tools/x"), "request_ambiguous"),
    denied("absolute-form-userinfo", get("http://127.0.0.1:{port}@evil.example/tools/x"), "request_ambiguous"),
    # RFC 9110 4.2.4: user info in a target URI is an error; a reader that takes it for the host is led elsewhere.
    denied(
        "absolute-form-userinfo-same-host", get("http://evil.example@127.0.0.1:{port}/tools/x"), "request_ambiguous"
    ),
    denied("absolute-form-empty-userinfo", get("http://@127.0.0.1:{port}/tools/x"), "request_ambiguous"),
    allowed("absolute-form-same-host", get("http://127.0.0.1:{port}/tools/x"), "GET", "/tools/x"),
    parser_400("duplicate-host", b"GET /tools/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n"),
    parser_400("absolute-form-without-host", b"GET http://127.0.0.1:{port}/tools/x HTTP/1.1\r\n\r\n"),
    denied("connect", b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\n\r\n", "no_route"),
    denied("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "request_ambiguous"),
    # --- HTTP versions ------------------------------------------------------------------------------------------
    denied("http-0.9", b"GET /tools/x\r\n\r\n", "request_ambiguous", 505, closed=True),
    denied("http-2.0-request-line", b"GET /tools/x HTTP/2.0\r\nHost: h\r\n\r\n", "request_ambiguous", 505, closed=True),
    # A version other than 1.0 and 1.1 is refused by the reader, and logged and counted as a denial (505).
    denied("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "request_ambiguous", 505, closed=True),
    denied("http-1.2", b"GET /tools/x HTTP/1.2\r\nHost: h\r\n\r\n", "request_ambiguous", 505, closed=True),
    # --- request smuggling: ambiguous framing never reaches a handler ---------------------------------------------
    parser_400(
        "cl-and-te",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(SMUGGLED),
    ),
    parser_400(
        "te-and-cl",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
    ),
    parser_400(
        "duplicate-cl-differing",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 46\r\n\r\nhello" + SMUGGLED,
    ),
    parser_400(
        "duplicate-cl-same", b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    parser_400("cl-with-sign", b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello"),
    parser_400(
        "bad-chunk-size",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    parser_400(
        "chunk-bare-lf", b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"
    ),
    parser_400("te-not-chunked", b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    parser_400(
        "te-chunked-not-last",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    parser_400(
        "te-space-before-colon",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
    ),
    parser_400("obs-fold", b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n"),
    parser_400("bare-cr-in-header", b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n"),
    parser_400("space-in-target", b"GET /tools/x /admin HTTP/1.1\r\nHost: h\r\n\r\n"),
    # Transfer-Encoding is exactly `chunked` or refused: another reader may take `identity` as the framing.
    parser_400(
        "te-identity-then-chunked",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n" + chunked(b"hello"),
    ),
    # Chunked framing the reader accepts is decided as read and re-framed by the PEP towards the upstream.
    allowed(
        "te-chunked-on-http-1.0",
        b"POST /tools/x HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hello"),
        "POST",
        "/tools/x",
        b"hello",
    ),
    # --- method and path overrides ------------------------------------------------------------------------------
    denied("x-http-method-override", raw("POST", "/tools/x", "X-HTTP-Method-Override: DELETE"), "request_ambiguous"),
    denied("x-http-method", raw("POST", "/tools/x", "X-HTTP-Method: DELETE"), "request_ambiguous"),
    denied("x-method-override", raw("POST", "/tools/x", "X-Method-Override: PUT"), "request_ambiguous"),
    denied("x-original-url", get("/tools/x", "X-Original-URL: /tools/admin"), "request_ambiguous"),
    denied("x-rewrite-url", get("/tools/x", "X-Rewrite-URL: /tools/admin"), "request_ambiguous"),
    denied("x-original-uri", get("/tools/x", "X-Original-URI: /tools/admin"), "request_ambiguous"),
    denied("x-forwarded-uri", get("/tools/x", "X-Forwarded-Uri: /tools/admin"), "request_ambiguous"),
    denied("x-forwarded-path", get("/tools/x", "X-Forwarded-Path: /tools/admin"), "request_ambiguous"),
    denied("x-envoy-original-path", get("/tools/x", "X-Envoy-Original-Path: /tools/admin"), "request_ambiguous"),
    denied("method-field-in-the-query", raw("POST", "/tools/x?_method=DELETE"), "request_ambiguous"),
    denied(
        "method-field-in-a-form-body",
        raw("POST", "/tools/x", "Content-Type: application/x-www-form-urlencoded", body=b"a=1&_method=DELETE"),
        "request_ambiguous",
    ),
    denied("method-field-php-spelling", raw("POST", "/tools/x", body=b"a=1&.method=DELETE"), "request_ambiguous"),
    allowed("method-field-on-a-get", get("/tools/x?_method=DELETE"), "GET", "/tools/x?_method=DELETE"),
    allowed(
        "form-body-without-a-method-field",
        raw("POST", "/tools/x", "Content-Type: application/x-www-form-urlencoded", body=b"a=1&q=_method"),
        "POST",
        "/tools/x",
        b"a=1&q=_method",
    ),
    # --- Connection naming end-to-end headers -------------------------------------------------------------------
    allowed(
        "connection-names-x-request-id",
        get("/tools/x", "Connection: X-Request-ID", "X-Request-ID: caller-id-1"),
        "GET",
        "/tools/x",
        check=caller_request_id_kept,
    ),
    allowed(
        "connection-names-pep-headers",
        get(
            "/tools/x",
            "Connection: X-PEP-Decision-ID, X-Forwarded-For, X-Request-ID",
            "X-PEP-Decision-ID: forged",
            "X-Forwarded-For: 10.0.0.1",
        ),
        "GET",
        "/tools/x",
        check=headers_are_the_peps,
    ),
    allowed(
        "connection-names-authorization",
        get("/tools/x", "Connection: keep-alive, Authorization", "Authorization: Bearer caller-token"),
        "GET",
        "/tools/x",
        check=no_caller_credentials,
    ),
    allowed(
        "connection-names-content-length",
        raw("POST", "/tools/x", "Connection: Content-Length", body=b"hello"),
        "POST",
        "/tools/x",
        b"hello",
        check=headers_are_the_peps,
    ),
    # --- JSON bodies on MCP and model routes --------------------------------------------------------------------
    denied(
        "mcp-duplicate-name",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_all"}}'),
        "body_unreadable",
    ),
    denied(
        "mcp-duplicate-name-escaped-key",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","na\\u006de":"delete_all"}}'),
        "body_unreadable",
    ),
    denied(
        "mcp-duplicate-method",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"delete_all"}}'),
        "body_unreadable",
    ),
    # keys equal under case folding: a Go server (encoding/json) binds `Name` to name, and keeps the last
    denied(
        "mcp-name-in-two-cases",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","Name":"delete_all"}}'),
        "request_ambiguous",
    ),
    denied(
        "mcp-name-only-in-another-case",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"delete_all"}}'),
        "request_ambiguous",
    ),
    denied(
        "mcp-method-in-two-cases",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"delete_all"}}'),
        "request_ambiguous",
    ),
    denied(
        "mcp-argument-with-long-s",
        mcp(
            '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"s":"a","\u017f":"b"}}}'.encode()
        ),
        "request_ambiguous",
    ),
    denied(
        "mcp-key-with-kelvin-sign-in-a-batch",
        mcp(
            b"["
            + call("search")
            + b',{"jsonrpc":"2.0","id":2,"method":"tools/call",'
            + b'"params":{"name":"search","arguments":{"k":1,"\\u212a":2}}}]'
        ),
        "request_ambiguous",
    ),
    denied(
        "openai-model-in-two-cases", openai(b'{"model":"gpt-ok","Model":"gpt-evil","messages":[]}'), "request_ambiguous"
    ),
    denied(
        "openai-stream-in-another-case", openai(b'{"model":"gpt-ok","STREAM":true,"messages":[]}'), "request_ambiguous"
    ),
    denied("mcp-byte-order-mark", mcp(b"\xef\xbb\xbf" + call("search")), "body_unreadable"),
    denied("openai-duplicate-model", openai(b'{"model":"gpt-ok","model":"gpt-evil","messages":[]}'), "body_unreadable"),
    denied("mcp-batch-mixing-allowed-and-denied", mcp(BATCH_MIXED), "policy_denied", status=200),
    allowed("mcp-batch-all-allowed", mcp(BATCH_ALLOWED), "POST", "/mcp", BATCH_ALLOWED),
    denied(
        "mcp-header-names-another-tool",
        mcp(call("delete_all"), "Mcp-Method: tools/call", "Mcp-Name: search"),
        "request_ambiguous",
    ),
    denied(
        "mcp-header-names-another-method",
        mcp(call("delete_all"), "Mcp-Method: tools/list"),
        "request_ambiguous",
    ),
    denied("mcp-gzip", mcp(GZIPPED_CALL, "Content-Encoding: gzip"), "body_unreadable"),
    denied("mcp-gzip-behind-identity", mcp(GZIPPED_CALL, "Content-Encoding: identity, gzip"), "body_unreadable"),
    denied("openai-gzip", openai(gzip.compress(chat("gpt-ok")), "Content-Encoding: gzip"), "body_unreadable"),
    # --- bodies over the limit ----------------------------------------------------------------------------------
    denied("mcp-content-length-over-limit", mcp(call("search" + "x" * 600)), "body_too_large"),
    denied(
        "mcp-chunked-over-limit",
        raw("POST", "/mcp", *JSON, "Transfer-Encoding: chunked", length=False) + chunked(call("x" * 300), b" " * 300),
        "body_too_large",
    ),
    denied("http-content-length-over-limit", raw("POST", "/small/x", body=b"x" * 17), "body_too_large"),
    denied(
        "form-chunked-over-limit",
        raw("POST", "/small/x", "Transfer-Encoding: chunked", length=False) + chunked(b"x" * 10, b"x" * 10),
        "body_too_large",
    ),
    Case(
        "http-chunked-over-limit",
        raw("POST", "/small/x", OCTETS, "Transfer-Encoding: chunked", length=False) + chunked(b"x" * 10, b"x" * 10),
        413,
        upstream_error="body_limit",
    ),
    # --- slow headers and slow bodies: the deadline ends the connection -----------------------------------------
    Case("slow-headers", b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-Slow: ", None, slow=True, closed=True),
    denied(
        "mcp-body-stalls",
        raw("POST", "/mcp", *JSON, "Content-Length: 100", length=False) + b'{"jsonrpc"',
        "body_unreadable",
        slow=True,
        closed=True,
    ),
    denied(
        "mcp-chunked-body-stalls",
        raw("POST", "/mcp", *JSON, "Transfer-Encoding: chunked", length=False) + b"a\r\n" + b'{"jsonrpc"\r\n',
        "body_unreadable",
        slow=True,
        closed=True,
    ),
    # Every byte within the deadline of the one before, but an inspected body must be whole within it.
    denied(
        "mcp-body-trickles",
        raw("POST", "/mcp", *JSON, "Content-Length: 60", length=False),
        "body_unreadable",
        trickle=call("search")[:40],
        slow=True,
        closed=True,
    ),
    Case(
        "http-body-stalls",
        raw("POST", "/tools/x", OCTETS, "Content-Length: 100", length=False) + b"abc",
        408,
        upstream_error="body_timeout",
        slow=True,
        closed=True,
    ),
    Case(
        "http-chunked-body-stalls",
        raw("POST", "/tools/x", OCTETS, "Transfer-Encoding: chunked", length=False) + b"3\r\nabc\r\n",
        408,
        upstream_error="body_timeout",
        slow=True,
        closed=True,
    ),
    # A streamed body only needs each chunk in time: this one takes longer than the deadline and arrives whole.
    allowed(
        "http-body-trickles-in-time",
        raw("POST", "/tools/x", OCTETS, "Content-Length: 10", length=False),
        "POST",
        "/tools/x",
        b"0123456789",
        trickle=b"0123456789",
        slow=True,
    ),
    # --- header count and size limits ---------------------------------------------------------------------------
    parser_400("129-headers", get("/tools/x", *(f"X-H{i}: v" for i in range(128))), 431),
    parser_400("header-over-8190-bytes", get("/tools/x", "X-Big: " + "a" * 8200), 431),
    parser_400("request-line-over-8190-bytes", get("/tools/" + "a" * 8200), 414),
    # --- tool and model names are compared byte for byte, never normalised --------------------------------------
    denied("tool-cyrillic-s", mcp(call(CYRILLIC_S)), "policy_denied", pdp_name=CYRILLIC_S, status=200),
    denied(
        "tool-cyrillic-s-json-escaped",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\u0455end_email"}}'),
        "policy_denied",
        pdp_name=CYRILLIC_S,
        status=200,
    ),
    denied("tool-cyrillic-i", mcp(call("send_ema\u0456l")), "policy_denied", pdp_name="send_ema\u0456l", status=200),
    denied("tool-nfd-form", mcp(call(NFD_RESUME)), "policy_denied", pdp_name=NFD_RESUME, status=200),
    allowed(
        "tool-nfc-form",
        mcp(call("r\u00e9sum\u00e9")),
        "POST",
        "/mcp",
        call("r\u00e9sum\u00e9"),
        pdp_name="r\u00e9sum\u00e9",
    ),
    denied("tool-fullwidth", mcp(call(FULLWIDTH)), "policy_denied", pdp_name=FULLWIDTH, status=200),
    denied("tool-zero-width-space", mcp(call("sea\u200brch")), "policy_denied", pdp_name="sea\u200brch", status=200),
    denied("tool-other-case", mcp(call("Search")), "policy_denied", pdp_name="Search", status=200),
    denied("tool-trailing-space", mcp(call("search ")), "policy_denied", pdp_name="search ", status=200),
    allowed(
        "tool-json-escape-of-ascii",
        mcp(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\u0073earch"}}'),
        "POST",
        "/mcp",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\u0073earch"}}',
        pdp_name="search",
    ),
    denied("model-cyrillic-o", openai(chat("gpt-\u043ek")), "policy_denied"),
    allowed("model-allowed", openai(chat("gpt-ok")), "POST", "/v1/chat/completions", chat("gpt-ok")),
]


def test_the_corpus_is_large_and_unique() -> None:
    assert len(CORPUS) >= 40
    assert len({c.id for c in CORPUS}) == len(CORPUS)


# --- the test -----------------------------------------------------------------------------------------------------


@pytest.fixture
async def corpus_pdp() -> AsyncIterator[CorpusPdp]:
    pdp = CorpusPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
async def test_bypass(
    case: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    corpus_pdp: CorpusPdp,
    upstream: RecordingUpstream,
) -> None:
    if case.slow:
        monkeypatch.setattr(pep.protocols.body, "BODY_READ_TIMEOUT_S", DEADLINE_S)
        monkeypatch.setattr(pep.app, "KEEPALIVE_S", DEADLINE_S)
    starter = PepStarter(tmp_path, lambda log: base_config(corpus_pdp.url, upstream.url, log), "corpus.yaml")
    try:
        running: RunningPep = await starter(mutate=corpus_routes)
        await _run(case, running, corpus_pdp, upstream)
    finally:
        await starter.close()


async def _run(case: Case, running: RunningPep, pdp: CorpusPdp, upstream: RecordingUpstream) -> None:
    data = case.send.replace(b"{port}", b"%d" % running.port).replace(b"{up}", b"%d" % upstream.port)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    trickler: asyncio.Task[None] | None = None
    try:
        writer.write(data)
        await writer.drain()
        started = loop.time()
        if case.trickle:
            trickler = asyncio.create_task(trickle(writer, case.trickle))
        async with asyncio.timeout(READ_TIMEOUT):
            answer = await read_answer(reader)
        elapsed = loop.time() - started
        closed = answer is None or await closes(reader, READ_TIMEOUT if case.closed else 0.01)
    finally:
        if trickler is not None:
            trickler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickler
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    # What the caller saw.
    if case.status is None:
        assert answer is None
    else:
        assert answer is not None, "the connection closed without an answer"
        assert answer.status == case.status, answer
        if case.reason is not None:
            assert answer.headers["x-pep-decision"] == "deny"
            assert answer.headers["x-pep-reason"] == case.reason
        elif case.upstream_error is not None:
            assert answer.headers["x-pep-decision"] == "allow"
            assert answer.headers["x-pep-upstream-error"] == case.upstream_error
        else:
            assert "x-pep-reason" not in answer.headers
    if case.closed:
        assert closed
        if case.slow:  # ended by the deadline: not before it, and promptly after it
            assert DEADLINE_S * 0.8 <= elapsed < DEADLINE_S + 1.0, elapsed

    # What was decided.
    entries = await running.log_entries()
    if case.reason is not None:
        assert [(e["decision"], e["reason"]) for e in entries] == [("deny", case.reason)]
    elif case.forwarded is not None or case.upstream_error is not None:
        assert [(e["decision"], e["reason"]) for e in entries] == [("allow", "allowed")]
    else:
        assert entries == []  # no handler ran: the reader or the keep-alive timer refused
    if case.reason in EARLY or (case.reason is None and case.forwarded is None and case.upstream_error is None):
        assert pdp.inputs == []
    if case.upstream_error is not None:
        async with aiohttp.ClientSession() as s, s.get(running.admin_url + "/metrics") as r:
            text = await r.text()
        assert metric(text, "pep_upstream_failures_total", kind=case.upstream_error) == 1
    if case.pdp_name is not None:
        assert case.pdp_name in [(doc.get("mcp") or {}).get("name") for doc in pdp.inputs]

    # What the upstream saw.
    if case.forwarded is None:
        await asyncio.sleep(0.02)  # time for a wrongly forwarded request to land
        assert upstream.seen == []
        return
    assert [(r.method, r.target, r.body) for r in upstream.seen] == [
        (case.forwarded.method, case.forwarded.target, case.forwarded.body)
    ]
    (sent,) = upstream.seen
    (entry,) = entries
    assert sent.headers.getall("X-PEP-Decision-ID") == [entry["decision_id"]]
    assert sent.headers.getall("X-Request-ID") == [entry["request_id"]]
    if case.check is not None:
        case.check(sent, entry)
