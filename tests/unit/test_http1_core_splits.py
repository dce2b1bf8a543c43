"""The same bytes, however they are cut into reads: one byte at a time, and in two pieces at every offset, each
reading must be identical to the reading in one piece (events, bodies, trailers, how it ended, which error).

Every case of the request and response tables (accepted and refused), plus pipelined sequences, is cut; each is
also checked against h11's reading of the same bytes (fuzz/http1_oracles.py).
"""

from __future__ import annotations

import pytest

from fuzz.http1_oracles import (
    check_requests,
    check_response,
    check_same_for_any_cut,
    read_requests,
    read_response,
    splits,
)
from tests.unit.test_http1_core_requests import REFUSED as REFUSED_REQUESTS
from tests.unit.test_http1_core_requests import SMUGGLED, chunked, get, post
from tests.unit.test_http1_core_responses import OK
from tests.unit.test_http1_core_responses import REFUSED as REFUSED_RESPONSES

ACCEPTED_REQUESTS = [
    get(b"Connection: keep-alive", target=b"/tools/search?q=1"),
    b"\r\n\r\n" + get() + b"\r\n" + get(target=b"/2"),
    post(b"Content-Length: 5", body=b"hello") + get(target=b"/2") + b"GET /3 HTTP/1.1\r\nHo",
    post(b"Transfer-Encoding: chunked", body=b'5;a="x"\r\nhello\r\n1\r\n!\r\n0\r\nT: 1\r\nU:\r\n\r\n') + get(),
    post(b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED),
    get(b"Connection: close") + get(target=b"/never-read"),
    b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hi") + get(),
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
    get(b"X-Spaces:   a  b \t", b"X-Obs: caf\xc3\xa9", b"X-Empty:"),
    post(b"Content-Length: 10", body=b"hello"),  # waiting for the rest
]
RESPONSES = [
    (OK, b"GET"),
    (b"HTTP/1.1 100 Continue\r\nX: 1\r\n\r\nHTTP/1.1 103 Hints\r\n\r\n" + OK, b"POST"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nT: v\r\n\r\n", b"GET"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nhi", b"GET"),
    (OK + OK, b"GET"),
    (b"HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes", b"CONNECT"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort", b"GET"),
]
LIMITED = [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 OK\r\n\r\nabcdefghijkl", b"GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nabcdefghijkl", b"GET"),
]
# the long ones are cut only where it matters: their limits are the rule under test, not the cutting
REQUEST_CASES = [data for _, data, _ in REFUSED_REQUESTS if len(data) < 2048] + ACCEPTED_REQUESTS


@pytest.mark.parametrize("eof", [False, True])
@pytest.mark.parametrize("data", REQUEST_CASES)
def test_requests_read_the_same_in_any_cut(data: bytes, eof: bool) -> None:
    whole = read_requests([data], eof)
    check_requests(data, eof, whole)
    for chunks in splits(data):
        check_same_for_any_cut(whole, read_requests(chunks, eof), data, chunks)


@pytest.mark.parametrize("eof", [False, True])
@pytest.mark.parametrize(("data", "method"), [(d, b"GET") for _, d in REFUSED_RESPONSES if len(d) < 2048] + RESPONSES)
def test_responses_read_the_same_in_any_cut(data: bytes, method: bytes, eof: bool) -> None:
    whole = read_response([data], eof, method)
    check_response(data, eof, method, whole)
    for chunks in splits(data):
        check_same_for_any_cut(whole, read_response(chunks, eof, method), data, chunks)


@pytest.mark.parametrize(("data", "method"), LIMITED)
def test_a_body_limit_is_reached_at_the_same_byte_in_any_cut(data: bytes, method: bytes) -> None:
    whole = read_response([data], True, method, max_body=10)
    assert whole.error is not None
    assert whole.error[0] == "BodyTooLarge"
    check_response(data, True, method, whole, 10)
    for chunks in splits(data):
        check_same_for_any_cut(whole, read_response(chunks, True, method, max_body=10), data, chunks)
    request = post(b"Content-Length: 12", body=b"abcdefghijkl")
    whole = read_requests([request], True, max_body=10)
    for chunks in splits(request):
        check_same_for_any_cut(whole, read_requests(chunks, True, max_body=10), request, chunks)


def test_the_long_cases_read_the_same_one_byte_at_a_time() -> None:
    for _, data, _ in REFUSED_REQUESTS:
        if len(data) >= 2048:
            whole = read_requests([data], False)
            chunks = [data[i : i + 1] for i in range(len(data))]
            check_same_for_any_cut(whole, read_requests(chunks, False), data, chunks[:1])


@pytest.mark.parametrize("eof", [False, True])
@pytest.mark.parametrize("data", REQUEST_CASES)
def test_taking_request_bodies_whole_reads_the_same(data: bytes, eof: bool) -> None:
    """`take_body` (a Content-Length body all in the buffer, at once) gives what the events give, in any cut."""
    whole = read_requests([data], eof)
    for chunks in [[data], *splits(data)]:
        check_same_for_any_cut(whole, read_requests(chunks, eof, take=True), data, chunks)


@pytest.mark.parametrize("eof", [False, True])
@pytest.mark.parametrize(("data", "method"), [(d, b"GET") for _, d in REFUSED_RESPONSES if len(d) < 2048] + RESPONSES)
def test_taking_response_bodies_whole_reads_the_same(data: bytes, method: bytes, eof: bool) -> None:
    whole = read_response([data], eof, method)
    for chunks in [[data], *splits(data)]:
        check_same_for_any_cut(whole, read_response(chunks, eof, method, take=True), data, chunks)


@pytest.mark.parametrize(("data", "method"), LIMITED)
def test_taking_a_body_whole_never_passes_the_limit(data: bytes, method: bytes) -> None:
    whole = read_response([data], True, method, max_body=10)
    for chunks in [[data], *splits(data)]:
        check_same_for_any_cut(whole, read_response(chunks, True, method, max_body=10, take=True), data, chunks)
