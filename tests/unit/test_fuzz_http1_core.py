"""The sans-IO HTTP/1.1 core (pep/http1) for any bytes, read in any cuts: the hypothesis twin of the atheris
harness fuzz/fuzz_http1_core.py, checked by the same oracles (fuzz/http1_oracles.py):

- nothing but a ProtocolError leaves a reader, with a server (or, reading a response, client) status hint;
- the same bytes give the same reading however they are cut into reads;
- every request and response the core hands out, h11 (an independent parser) reads the same way from the same
  bytes: request line or status, fields, body, trailers, where the message ends, keep-alive; bytes after an
  answer are an error exactly when h11 finds some; a body limit is reported only for a longer body.

The PDP client's fuzzer (tests/unit/test_fuzz_http1.py) is pointed at the core too: its generated answers must
be read whole, as h11 reads them.

Messages are generated well-formed under the PEP's rules (pipelined requests, every framing, odd but valid
spacing, obs-text, trailers, 1xx answers), and then damaged: cut short, extended, or with a byte changed. The
well-formed ones must also be accepted whole: the core refuses nothing h11 and the rules allow.
"""

from __future__ import annotations

import itertools

from hypothesis import event, given, settings
from hypothesis import strategies as st

from fuzz.http1_oracles import (
    Reading,
    check_requests,
    check_response,
    check_same_for_any_cut,
    read_requests,
    read_response,
)
from fuzz.oracles import examples
from pep.http1 import Limits
from tests.unit.test_fuzz_http1 import responses as pdp_answers

TINY = Limits(
    max_line_bytes=40,
    max_field_bytes=40,
    max_fields=4,
    max_head_bytes=160,
    max_chunk_line_bytes=12,
    max_informational=1,
)

# Valid field lines under the rules, some with the spacing and bytes a careless reader gets wrong.
FIELDS = [
    b"Accept: */*",
    b"User-Agent: agent/1.0",
    b"X-Empty:",
    b"X-Spaces:   padded \t ",
    b"X-Tab:\tvalue",
    b"X-Obs-Text: caf\xc3\xa9",
    b"X-Colon: a:b: c",
    b"Authorization: Bearer abc.def.ghi",
    b"Connection: keep-alive",
    b"Connection: close",
    b"Connection: x, close",
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Expect: 100-continue",
    b"Content-Type: application/json",
    b"X-Request-ID: r-1",
]
TARGETS = [b"/", b"/tools/x?q=1", b"/a/b;p=1/c", b"//x", b"/%2e%2e/a", b"/a#b", b"http://h/x", b"http://h:8/"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"QUERY"]


def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    parts = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)]) if b > a]
    out = b""
    for part in parts:
        size = b"%x" % len(part)
        size = draw(st.sampled_from([size, size.upper(), b"00" + size]))
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b';a="q \\" s"', b"; a = b", b";a=b;c"]))
        out += size + ext + b"\r\n" + part + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-Sum: 1\r\n", b"X-A: a\r\nX-B:\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One to three well-formed requests, pipelined, maybe after empty lines."""
    out = draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n"]))
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(METHODS))
        target = draw(st.sampled_from(TARGETS))
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
        fields = draw(st.lists(st.sampled_from(FIELDS), max_size=4))
        if version == b"1.1" or draw(st.booleans()):
            host = draw(st.sampled_from([b"Host: h", b"host: 127.0.0.1:8080", b"HOST: [::1]:1", b"Host:"]))
            fields.insert(draw(st.integers(0, len(fields))), host)
        body = draw(st.binary(max_size=40))
        framing = draw(st.sampled_from(["none", "length", "chunked"]))
        if framing == "length":
            fields.append(b"Content-Length: %d" % len(body))
        elif framing == "chunked":
            fields.append(draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked"])))
        head = b"%s %s HTTP/%s\r\n" % (method, target, version) + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
        out += head + (b"" if framing == "none" else chunked_body(draw, body) if framing == "chunked" else body)
    return out


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A well-formed answer (maybe after 1xx answers) and the method of the request it answers."""
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD", b"CONNECT"]))
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        status = draw(st.sampled_from([100, 102, 103]))
        fields = draw(st.lists(st.sampled_from([b"Link: </a>", b"X-A: 1"]), max_size=2))
        out += b"HTTP/1.1 %d Interim\r\n" % status + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    status = draw(st.sampled_from([200, 201, 204, 299, 304, 404, 500]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Very Fine \xff"]))
    fields = draw(st.lists(st.sampled_from(FIELDS[:11]), max_size=3))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked", "close"] if version == b"1.1" else ["length", "close"]))
    if framing == "length":
        fields.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        fields.append(b"Transfer-Encoding: chunked")
    head = b"HTTP/%s %d%s\r\n" % (version, status, reason) + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    no_body = method == b"HEAD" or status in (204, 304) or (method == b"CONNECT" and status < 300)
    payload = b"" if no_body else chunked_body(draw, body) if framing == "chunked" else body
    return out + head + payload, method


@st.composite
def reads(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The bytes as a socket might deliver them: in one read or cut anywhere."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if b > a] or [b""]


def damage(data: bytes, draw: st.DataObject) -> bytes:
    i = draw.draw(st.integers(0, max(0, len(data) - 1)))
    byte = bytes([draw.draw(st.sampled_from([0, 9, 10, 13, 32, 44, 48, 58, 59, 127, 255]) | st.integers(0, 255))])
    return draw.draw(
        st.sampled_from(
            [
                data[:i] + byte + data[i + 1 :],
                data[:i] + byte + data[i:],
                data[:i] + data[i + 1 :],
                data[:i],
                data + b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
            ]
        )
    )


def requests_hold(data: bytes, eof: bool, chunks: list[bytes], limits: Limits | None, max_body: int | None) -> Reading:
    whole = read_requests([data], eof, limits, max_body)
    check_same_for_any_cut(whole, read_requests(chunks, eof, limits, max_body), data, chunks)
    check_same_for_any_cut(whole, read_requests(chunks, eof, limits, max_body, take=True), data, chunks)
    check_requests(data, eof, whole, max_body)
    event(whole.end)
    return whole


def response_holds(
    data: bytes, eof: bool, method: bytes, chunks: list[bytes], limits: Limits | None, max_body: int | None
) -> Reading:
    whole = read_response([data], eof, method, limits, max_body)
    check_same_for_any_cut(whole, read_response(chunks, eof, method, limits, max_body), data, chunks)
    check_same_for_any_cut(whole, read_response(chunks, eof, method, limits, max_body, take=True), data, chunks)
    check_response(data, eof, method, whole, max_body)
    event(whole.end)
    return whole


@settings(max_examples=examples(200), deadline=None)
@given(requests(), st.booleans(), st.data())
def test_well_formed_requests_are_read_whole_as_h11_reads_them(data: bytes, eof: bool, draw: st.DataObject) -> None:
    reading = requests_hold(data, eof, draw.draw(reads(data)), None, None)
    assert reading.error is None, reading
    assert reading.messages, reading
    assert all(m.complete for m in reading.messages), reading


@settings(max_examples=examples(200), deadline=None)
@given(requests(), st.booleans(), st.booleans(), st.sampled_from([None, 0, 7, 40]), st.data())
def test_damaged_requests_are_refused_or_read_as_h11_reads_them(
    data: bytes, eof: bool, tiny: bool, max_body: int | None, draw: st.DataObject
) -> None:
    damaged = damage(data, draw)
    requests_hold(damaged, eof, draw.draw(reads(damaged)), TINY if tiny else None, max_body)


@settings(max_examples=examples(200), deadline=None)
@given(
    st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\nHost: h\r\n", b"GET / HTTP/1.0\r\n"]),
    st.binary(max_size=64),
    st.booleans(),
)
def test_any_bytes_are_refused_or_read_as_h11_reads_them(prefix: bytes, data: bytes, eof: bool) -> None:
    raw = prefix + data
    requests_hold(raw, eof, [raw[i : i + 1] for i in range(len(raw))] or [b""], None, None)


@settings(max_examples=examples(200), deadline=None)
@given(responses(), st.booleans(), st.data())
def test_well_formed_responses_are_read_whole_as_h11_reads_them(
    response: tuple[bytes, bytes], eof: bool, draw: st.DataObject
) -> None:
    data, method = response
    reading = response_holds(data, eof, method, draw.draw(reads(data)), None, None)
    assert reading.error is None, reading
    assert reading.messages, reading


@settings(max_examples=examples(100), deadline=None)
@given(pdp_answers(), st.booleans(), st.data())
def test_the_pdp_client_fuzzers_answers_are_read_as_h11_reads_them(
    answer: tuple[bytes, str], eof: bool, draw: st.DataObject
) -> None:
    """The answers the PDP client's own fuzzer generates (tests/unit/test_fuzz_http1.py), read by the core: the
    reader that is to replace the one in pep/pdp/http1.py reads them whole, as h11 does, with their codings
    left to the caller."""
    data, framing = answer
    reading = response_holds(data, eof, b"POST", draw.draw(reads(data)), None, None)
    assert reading.error is None, reading
    assert reading.messages[0].complete or (framing == "close" and not eof), reading


@settings(max_examples=examples(200), deadline=None)
@given(responses(), st.booleans(), st.booleans(), st.sampled_from([None, 0, 7, 40]), st.data())
def test_damaged_responses_are_refused_or_read_as_h11_reads_them(
    response: tuple[bytes, bytes], eof: bool, tiny: bool, max_body: int | None, draw: st.DataObject
) -> None:
    data, method = response
    damaged = damage(data, draw)
    response_holds(damaged, eof, method, draw.draw(reads(damaged)), TINY if tiny else None, max_body)


@settings(max_examples=examples(200), deadline=None)
@given(
    st.sampled_from([b"", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 100 C\r\n\r\n"]),
    st.binary(max_size=64),
    st.booleans(),
    st.sampled_from([b"GET", b"HEAD", b"CONNECT"]),
)
def test_any_bytes_are_an_answer_as_h11_reads_it_or_an_error(
    prefix: bytes, data: bytes, eof: bool, method: bytes
) -> None:
    raw = prefix + data
    response_holds(raw, eof, method, [raw[i : i + 1] for i in range(len(raw))] or [b""], None, None)
