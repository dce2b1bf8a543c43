"""Serializing with pep/http1's writer: heads byte for byte, no field that could start another line, bodies held
to the framing their head announced, and what it writes read back the same by the core's readers and by h11."""

from __future__ import annotations

import h11
import pytest

from fuzz.http1_oracles import norm, read_requests, read_response
from pep.http1 import (
    LAST_CHUNK,
    BodyWriter,
    Framing,
    LocalProtocolError,
    WriterState,
    chunk,
    request_head,
    response_head,
)


def test_heads_byte_for_byte() -> None:
    fields = [(b"Host", b"pdp:8181"), (b"Content-Type", b"application/json"), (b"X-Empty", b"")]
    assert request_head(b"POST", b"/v1/data/pep?x=1", fields) == (
        b"POST /v1/data/pep?x=1 HTTP/1.1\r\nHost: pdp:8181\r\nContent-Type: application/json\r\nX-Empty: \r\n\r\n"
    )
    assert request_head(b"GET", b"/", [], b"1.0") == b"GET / HTTP/1.0\r\n\r\n"
    assert request_head(b"POST", b"/x", [(b"Host", b"h")], length=5) == (
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
    )
    assert response_head(200, [(b"Content-Length", b"0")], b"OK") == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert response_head(403, [], version=b"1.0") == b"HTTP/1.0 403 \r\n\r\n"


@pytest.mark.parametrize(
    "fields",
    [
        [(b"X-A", b"a\r\nX-Injected: 1")],
        [(b"X-A", b"a\nb")],
        [(b"X-A", b"a\rb")],
        [(b"X-A", b"a\x00b")],
        [(b"X-A", b"a\x7fb")],
        [(b"X-A\r\nX-Injected", b"1")],
        [(b"Host: evil", b"x")],
        [(b"X A", b"1")],
        [(b"", b"1")],
        [(b"X-A", b"ok"), (b"X:B", b"1")],
        [(b"X-A", b"a\n"), (b"X-B", b"\rb")],  # a LF and a CR, each in its own field
        [(b"X-A", b"a\x1fb"), (b"X-B", b"\x0b")],
    ],
)
def test_a_field_that_could_start_another_is_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalProtocolError):
        request_head(b"GET", b"/", fields)
    with pytest.raises(LocalProtocolError):
        response_head(200, fields)


def test_tabs_and_bytes_over_0x7f_are_field_value_bytes() -> None:
    fields = [(b"X-A", b"a\tb"), (b"X-B", bytes(range(0x80, 0x100)))]
    assert request_head(b"GET", b"/", fields) == b"GET / HTTP/1.1\r\nX-A: a\tb\r\nX-B: " + bytes(range(0x80, 0x100)) + (
        b"\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "target", "version"),
    [
        (b"G T", b"/", b"1.1"),
        (b"", b"/", b"1.1"),
        (b"GET", b"/a b", b"1.1"),
        (b"GET", b"/a\r\nX: y", b"1.1"),
        (b"GET", b"", b"1.1"),
        (b"GET", b"/\xc3\xa9", b"1.1"),
        (b"GET", b"/", b"2.0"),
    ],
)
def test_a_bad_request_line_is_refused(method: bytes, target: bytes, version: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        request_head(method, target, [], version)


def test_a_bad_status_line_is_refused() -> None:
    for status, reason in ((99, b""), (600, b""), (200, b"O\r\nK")):
        with pytest.raises(LocalProtocolError):
            response_head(status, [], reason)


def test_chunks() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk(b"") == b""  # a zero-size chunk would end the body
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_a_length_body_is_exactly_its_length() -> None:
    writer = BodyWriter(Framing.LENGTH, 5)
    assert writer.write(b"hel") == b"hel"
    with pytest.raises(LocalProtocolError):
        writer.write(b"lo!")  # one byte too many would be the start of the next message
    with pytest.raises(LocalProtocolError):
        writer.end()  # two short: the peer would wait for them, or read the next message's start as them
    assert writer.write(b"lo") == b"lo"
    assert writer.end() == b""
    assert writer.state is WriterState.DONE
    with pytest.raises(LocalProtocolError):
        writer.write(b"")
    with pytest.raises(LocalProtocolError):
        writer.end()


def test_a_chunked_body_ends_with_the_last_chunk_and_its_trailers() -> None:
    writer = BodyWriter(Framing.CHUNKED)
    assert writer.write(b"abc") == b"3\r\nabc\r\n"
    assert writer.write(b"") == b""
    assert writer.end([(b"X-Sum", b"1")]) == b"0\r\nX-Sum: 1\r\n\r\n"
    with pytest.raises(LocalProtocolError):
        BodyWriter(Framing.CHUNKED).end([(b"X", b"a\r\nb")])


def test_framings_without_a_body_or_without_a_length() -> None:
    writer = BodyWriter(Framing.NONE)
    with pytest.raises(LocalProtocolError):
        writer.write(b"x")
    with pytest.raises(LocalProtocolError):
        writer.end([(b"T", b"1")])  # trailers need chunks
    assert writer.end() == b""
    assert BodyWriter(Framing.CLOSE).write(b"anything") == b"anything"
    for framing, length in ((Framing.TUNNEL, None), (Framing.LENGTH, None), (Framing.CHUNKED, 3)):
        with pytest.raises(LocalProtocolError):
            BodyWriter(framing, length)


def test_what_is_written_reads_back_the_same_here_and_in_h11() -> None:
    fields = [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"X-Obs", b"caf\xc3\xa9")]
    writer = BodyWriter(Framing.CHUNKED)
    data = (
        request_head(b"PUT", b"/x?y=1", fields)
        + writer.write(b"hello ")
        + writer.write(b"world")
        + writer.end([(b"T", b"v")])
    )
    (ours,) = read_requests([data], False).messages
    assert (ours.head, ours.fields, ours.body, ours.trailers) == (
        (b"PUT", b"/x?y=1", b"1.1"),
        norm(fields),
        b"hello world",
        ((b"t", b"v"),),
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert norm(request.headers) == ours.fields
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += bytes(event.data)
    assert (body, norm(event.headers)) == (b"hello world", ours.trailers)

    answer = response_head(200, [(b"Content-Length", b"2")], b"OK") + BodyWriter(Framing.LENGTH, 2).write(b"ok")
    (message,) = read_response([answer], False, b"GET").messages
    assert (message.head, message.body, message.complete) == ((200, b"1.1"), b"ok", True)
