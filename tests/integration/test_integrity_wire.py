"""Request integrity on the wire: exact bytes written to a raw socket, the answer read back under a timeout.

For every ambiguous or malformed request the recording upstream must have seen nothing at all (and where the
PEP itself answered, the PDP was not asked either). Legitimate look-alikes are forwarded byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream

READ_TIMEOUT = 5.0


@dataclass
class Answer:
    version: str
    status: int
    headers: CIMultiDict[str]
    body: bytes
    closed: bool  # the PEP closed the connection after this answer


async def _read_body(reader: asyncio.StreamReader, headers: CIMultiDict[str]) -> bytes:
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = headers.get("Content-Length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read()


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """One response off the connection; None when it closes before a complete head."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    body = await _read_body(reader, headers)
    return Answer(version, int(status), headers, body, headers.get("Connection", "").lower() == "close")


async def exchange(port: int, data: bytes) -> Answer | None:
    """Send `data` on a fresh connection and read one response; None when the connection closes without one."""
    answers = await exchange_many(port, data, 1)
    return answers[0] if answers else None


async def exchange_many(port: int, data: bytes, count: int, *, patience: float | None = None) -> list[Answer]:
    """Send `data` (possibly several pipelined requests) and read up to `count` responses.

    The last answer's `closed` tells whether the PEP closed the connection after it. With `patience`, answers
    that have not arrived after that many seconds are given up on (the ones read so far are returned);
    without it, a missing answer fails the test after READ_TIMEOUT.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[Answer] = []
    try:
        writer.write(data)
        await writer.drain()
        with contextlib.suppress(*(() if patience is None else (TimeoutError,))):
            async with asyncio.timeout(READ_TIMEOUT if patience is None else patience):
                while len(answers) < count:
                    answer = await read_answer(reader)
                    if answer is None:
                        break
                    answers.append(answer)
                if answers and not answers[-1].closed:
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        answers[-1].closed = await asyncio.wait_for(reader.read(1), 0.05) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answers


async def assert_every_delivery_was_allowed(pep: RunningPep, upstream: RecordingUpstream) -> None:
    """Each request the upstream received carries the id of an allow decision in the log, each id once."""
    allowed = {e["decision_id"] for e in await pep.log_entries() if e["decision"] == "allow"}
    delivered = [x.headers.get("X-PEP-Decision-ID") for x in upstream.seen]
    assert len(delivered) == len(set(delivered))
    assert set(delivered) <= allowed


def request(target: bytes, pep: RunningPep, *, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % pep.port + extra + b"\r\n"


def json_body(answer: Answer) -> Any:
    return orjson.loads(answer.body)


async def assert_denied(
    answer: Answer | None,
    reason: str,
    upstream: RecordingUpstream,
    fault_pdp: FaultPdp,
    status: int = 403,
) -> None:
    assert answer is not None
    assert answer.status == status
    assert answer.headers["x-pep-decision"] == "deny"
    assert answer.headers["x-pep-reason"] == reason
    error = json_body(answer)["error"]
    assert error["reason"] == reason
    assert error["request_id"] == answer.headers["x-request-id"]
    assert upstream.seen == []
    assert fault_pdp.requests == []


# --- HTTP versions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /tools/x\r\n\r\n",  # HTTP/0.9: no version at all
        b"GET /tools/x HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /tools/x HTTP/0.9\r\nHost: x\r\n\r\n",
    ],
    ids=["http0.9-bare", "http2.0", "http0.9-versioned"],
)
async def test_http_versions_other_than_1x_are_refused(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, data: bytes
) -> None:
    answer = await exchange(pep.port, data)
    if answer is None:
        # A closed connection is acceptable only where no status line is possible (HTTP/0.9).
        assert data.endswith(b"/tools/x\r\n\r\n")
    else:
        await assert_denied(answer, "request_ambiguous", upstream, fault_pdp, status=505)
        assert answer.closed
    assert upstream.seen == []
    assert fault_pdp.requests == []
    entries = await pep.log_entries()
    assert all(e["decision"] == "deny" for e in entries)


async def test_unknown_minor_version_is_refused_by_the_parser(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    answer = await exchange(pep.port, b"GET /tools/x HTTP/1.2\r\nHost: x\r\n\r\n")
    assert answer is not None
    assert answer.status in (400, 505)
    assert answer.closed
    assert upstream.seen == []
    assert fault_pdp.requests == []


async def test_http_1_0_is_served(pep: RunningPep, upstream: RecordingUpstream) -> None:
    answer = await exchange(pep.port, b"GET /tools/x HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer is not None
    assert answer.status == 200
    assert [x.target for x in upstream.seen] == ["/tools/x"]


# --- ambiguous paths --------------------------------------------------------------------------------------------

AMBIGUOUS_TARGETS = [
    b"/tools/../admin",
    b"/tools/%2e%2e/admin",
    b"/tools/%2E%2e/x",
    b"/tools/.%2E/x",
    b"/tools/%252e%252e/x",
    b"/tools/./x",
    b"/tools/%2e/x",
    b"/tools/x/..",
    b"/tools/x/.",
    b"/tools/x/..?a=1",
    b"/tools/a%2fb",
    b"/tools/a%2Fb",
    b"/tools/a%252fb",
    b"/tools/a%5cb",
    b"/tools/a%5Cb",
    b"/tools/a\\b",
    b"/tools\\..\\admin",
    b"/tools/a%00b",
    b"/tools/a%0ab",
    b"/tools/a%0Db",
    b"/tools/a%7fb",
    b"/tools/x#fragment",
    b"/tools/x?a=1#fragment",
    b"/tools/v1%2E2",
    b"/%74ools/x",
    b"/tools/%7Euser",
    b"/tools/a%zzb",
    b"/tools/a%2",
    # empty segments: nginx (merge_slashes), Tomcat and Spring serve these as /tools/admin
    b"/tools//admin",
    b"//tools/admin",
    b"/tools/admin//",
    b"/tools/;x/admin",
    # path parameters on a route that does not accept them: Tomcat, Jetty and Spring drop them
    b"/tools/admin;x",
    b"/tools/admin;",
    b"/tools/admin%3Bx",
    b"/tools/admin%253bx",
]


@pytest.mark.parametrize("target", AMBIGUOUS_TARGETS, ids=[t.decode() for t in AMBIGUOUS_TARGETS])
async def test_ambiguous_paths_are_denied_before_the_pdp(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await exchange(pep.port, request(target, pep))
    await assert_denied(answer, "request_ambiguous", upstream, fault_pdp)
    assert answer is not None
    assert not answer.closed  # a denial is an ordinary answer; the connection stays usable
    entries = await pep.log_entries()
    assert [(e["decision"], e["reason"]) for e in entries] == [("deny", "request_ambiguous")]


RAW_BYTE_TARGETS = [
    b"/tools/\xc3\xa9",
    b"/tools/\xff",
    b"/tools/a\tb",
    b"/tools/a\x00b",
    b"/tools/a\x01b",
    b"/tools/a\x7fb",
    b"/tools/x?\xc3\xa9",
    b"/tools/x?a\x7fb",
]


@pytest.mark.parametrize("target", RAW_BYTE_TARGETS, ids=[repr(t)[2:-1] for t in RAW_BYTE_TARGETS])
async def test_raw_control_and_non_ascii_bytes_never_pass(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await exchange(pep.port, request(target, pep))
    assert answer is not None
    if answer.status == 403:  # a lenient parser let it through to the PEP's own checks
        assert answer.headers["x-pep-reason"] == "request_ambiguous"
    else:
        assert answer.status == 400
    assert upstream.seen == []
    assert fault_pdp.requests == []


LEGITIMATE_TARGETS = [
    b"/tools/v1.2",
    b"/tools/...",
    b"/tools/..foo",
    b"/tools/.well-known/x",
    b"/tools/a%20b",
    b"/tools/x/",
    b"/tools/x?path=%2F..%2Fadmin",
    b"/tools/x?a=1%3Bb=2",
    b"/tools/x?_method=DELETE",  # on a GET: no framework overrides it
]


@pytest.mark.parametrize("target", LEGITIMATE_TARGETS, ids=[t.decode() for t in LEGITIMATE_TARGETS])
async def test_legitimate_look_alikes_are_forwarded_byte_for_byte(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await exchange(pep.port, request(target, pep))
    assert answer is not None
    assert answer.status == 200
    assert [x.target for x in upstream.seen] == [target.decode()]
    assert json_body(answer)["target"] == target.decode()
    path = target.decode().partition("?")[0]
    doc = fault_pdp.requests[-1].body["input"]
    assert doc["request"]["path"] == path
    assert doc["route"]["upstream_url"] == upstream.url + target.decode()


# --- absolute-form targets, CONNECT and method overrides --------------------------------------------------------


async def test_absolute_form_that_disagrees_with_host_is_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    for target in (
        b"http://evil.example/tools/x",
        b"http://127.0.0.1:1/tools/x",
        b"http://127.0.0.1:%d@evil.example/tools/x" % pep.port,
        b"http://127.0.0.1:%d/tools/../admin" % pep.port,
        b"http://127.0.0.1:%d/tools/a%%2fb" % pep.port,
    ):
        answer = await exchange(pep.port, request(target, pep))
        await assert_denied(answer, "request_ambiguous", upstream, fault_pdp)
    # Absolute form without any Host header cannot be compared: ambiguous too.
    answer = await exchange(pep.port, b"GET http://127.0.0.1:%d/tools/x HTTP/1.1\r\n\r\n" % pep.port)
    assert answer is not None
    assert answer.status in (400, 403)
    assert upstream.seen == []
    assert fault_pdp.requests == []


async def test_absolute_form_that_matches_host_is_forwarded(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    answer = await exchange(pep.port, request(b"http://127.0.0.1:%d/tools/x?a=%%2F" % pep.port, pep))
    assert answer is not None
    assert answer.status == 200
    assert [x.target for x in upstream.seen] == ["/tools/x?a=%2F"]
    doc = fault_pdp.requests[-1].body["input"]
    assert doc["request"]["path"] == "/tools/x"
    assert doc["route"]["upstream_url"] == upstream.url + "/tools/x?a=%2F"


@pytest.mark.parametrize(
    "header", [b"X-HTTP-Method-Override: DELETE", b"x-http-method: DELETE", b"X-Method-Override: PUT"]
)
async def test_method_override_headers_are_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, header: bytes
) -> None:
    answer = await exchange(pep.port, request(b"/tools/x", pep, method=b"POST", extra=header + b"\r\n"))
    await assert_denied(answer, "request_ambiguous", upstream, fault_pdp)


PATH_OVERRIDE_HEADERS = [
    b"X-Original-URL: /tools/admin",
    b"X-Rewrite-URL: /tools/admin",
    b"X-Original-URI: /tools/admin",
    b"X-Forwarded-Uri: /tools/admin",
    b"X-Forwarded-Path: /tools/admin",
    b"X-Envoy-Original-Path: /tools/admin",
]


@pytest.mark.parametrize(
    "header", PATH_OVERRIDE_HEADERS, ids=[h.split(b":")[0].decode() for h in PATH_OVERRIDE_HEADERS]
)
async def test_path_override_headers_are_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, header: bytes
) -> None:
    answer = await exchange(pep.port, request(b"/tools/x", pep, extra=header + b"\r\n"))
    await assert_denied(answer, "request_ambiguous", upstream, fault_pdp)


FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


@pytest.mark.parametrize(
    ("target", "head", "body"),
    [
        (b"/tools/x?_method=DELETE", b"", b""),
        (b"/tools/x?a=1&%5Fmethod=PUT", b"", b""),
        (b"/tools/x", b"", b"_method=DELETE&"),
        (b"/tools/x", FORM, b"a=1&.method=DELETE"),
        (b"/tools/x", FORM + b"Transfer-Encoding: chunked\r\n", b"e\r\n_method=DELETE\r\n0\r\n\r\n"),
    ],
    ids=["query", "query-encoded", "body-without-content-type", "form-body", "form-body-chunked"],
)
async def test_a_method_override_field_on_a_post_is_ambiguous(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, target: bytes, head: bytes, body: bytes
) -> None:
    """Rails, Laravel, Symfony and Spring serve a POST carrying `_method=DELETE` as a DELETE."""
    if b"chunked" not in head:
        head += b"Content-Length: %d\r\n" % len(body)
    answer = await exchange(pep.port, request(target, pep, method=b"POST", extra=head) + body)
    await assert_denied(answer, "request_ambiguous", upstream, fault_pdp)


async def test_a_form_post_without_a_method_field_is_forwarded_as_read(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    body = b"a=1&method=x&q=_method"
    head = b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n" % len(body)
    answer = await exchange(pep.port, request(b"/tools/x", pep, method=b"POST", extra=head) + body)
    assert answer is not None
    assert answer.status == 200
    assert [(x.method, x.target, x.body) for x in upstream.seen] == [("POST", "/tools/x", body)]
    assert fault_pdp.requests[-1].body["input"]["request"]["body_bytes"] == len(body)


async def test_connect_is_no_route(pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    data = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (upstream.port, upstream.port)
    answer = await exchange(pep.port, data)
    await assert_denied(answer, "no_route", upstream, fault_pdp)
    assert upstream.connections == set()


# --- request smuggling: the parser refuses before any handler runs ----------------------------------------------

SMUGGLING = {
    "cl-and-te": (
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5c\r\nGET /tools/smuggled HTTP/1.1\r\nHost: h\r\n\r\n0\r\n\r\n"
    ),
    "te-and-cl": (
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n"
        b"0\r\n\r\nGET /tools/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
    ),
    "duplicate-content-length": (
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "bad-chunk-size": (
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "negative-content-length": b"POST /tools/x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    "space-before-colon": (
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc"
    ),
}


@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_attempts_get_400_from_the_parser(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, data: bytes
) -> None:
    answer = await exchange(pep.port, data)
    assert answer is not None
    assert answer.status == 400
    assert "x-pep-decision" not in answer.headers  # no handler ran: nothing was decided
    assert answer.closed
    await asyncio.sleep(0.05)  # give a (wrongly) forwarded request time to land
    assert upstream.seen == []
    assert fault_pdp.requests == []
    assert await pep.log_entries() == []


async def test_a_pipelined_second_request_is_decided_on_its_own(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Two requests in one write: each gets its own decision, the denied one never reaches the upstream."""
    data = request(b"/tools/ok", pep) + request(b"/tools/../admin", pep) + request(b"/tools/ok2", pep)
    answers = await exchange_many(pep.port, data, 3)
    assert [a.status for a in answers] == [200, 403, 200]
    assert answers[1].headers["x-pep-reason"] == "request_ambiguous"
    assert [x.target for x in upstream.seen] == ["/tools/ok", "/tools/ok2"]
    assert len(fault_pdp.requests) == 2
    await assert_every_delivery_was_allowed(pep, upstream)


@pytest.mark.parametrize(
    "first",
    [
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"POST /tools/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        b"GET /tools/x HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    ],
    ids=["websocket-get", "websocket-post", "h2c"],
)
async def test_an_upgrade_request_does_not_open_a_tunnel(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, first: bytes
) -> None:
    """Bytes after an Upgrade request are never relayed raw: a following request is decided (and denied) alone.

    aiohttp discards bytes pipelined behind an upgrade it does not support (h2c), so that second request may get
    no answer at all; either way nothing of it reaches the upstream.
    """
    data = first + b"GET /tools/../admin HTTP/1.1\r\nHost: h\r\n\r\n"
    answers = await exchange_many(pep.port, data, 2, patience=1.0)
    assert answers
    assert answers[0].status == 200
    assert answers[0].status != 101
    if len(answers) == 2:
        assert answers[1].status == 403
        assert answers[1].headers["x-pep-reason"] == "request_ambiguous"
    assert [x.target for x in upstream.seen] == ["/tools/x"]
    sent = upstream.seen[0]
    assert "Upgrade" not in sent.headers
    assert "Connection" not in sent.headers
    assert "HTTP2-Settings" not in sent.headers
    assert b"/admin" not in sent.body
    assert [x.body["input"]["request"]["path"] for x in fault_pdp.requests] == ["/tools/x"]
    await assert_every_delivery_was_allowed(pep, upstream)
