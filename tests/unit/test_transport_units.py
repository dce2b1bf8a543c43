"""The transport's pure parts, without sockets: the header view, the answer's framing decisions, write flow
control, and what the core keeps of a refused head for the listener's log hook."""

from __future__ import annotations

import asyncio

import pytest

from pep.http1 import Fields, LocalProtocolError, ProtocolError, Request, RequestReader, ResponseReader
from pep.transport.body import RequestBody
from pep.transport.flow import WriteFlow
from pep.transport.headers import encode_fields, header_view
from pep.transport.response import Response, ResponseState

# --- the header view -----------------------------------------------------------------------------------------------


def test_the_header_view_is_case_insensitive_multi_valued_and_ordered() -> None:
    view = header_view([(b"Host", b"a"), (b"X-Tag", b"1"), (b"x-tag", b"2"), (b"Content-Type", b"text/plain")])
    assert view["host"] == "a"
    assert view.getall("X-TAG") == ["1", "2"]
    assert "content-type" in view
    assert view.get("missing") is None
    assert [k for k, _ in view.items()] == ["Host", "X-Tag", "x-tag", "Content-Type"]
    with pytest.raises(TypeError):
        view["Host"] = "b"  # type: ignore[index]


def test_any_byte_survives_the_view_and_back() -> None:
    raw: Fields = [(b"X-Latin", b"caf\xe9"), (b"X-Utf8", "café".encode()), (b"X-High", bytes(range(0x80, 0x100)))]
    view = header_view(raw)
    assert view["X-Utf8"] == "café"
    assert encode_fields(view.items()) == raw


@pytest.mark.parametrize(
    "raw",
    [
        [(b"Host", b"a"), (b"X-Utf8", "café ☕".encode())],  # all UTF-8: the strict decode
        [(b"X-Surrogate", b"\xed\xa0\x80"), (b"X-Ok", b"b")],  # an encoded surrogate is not UTF-8 either
    ],
)
def test_the_view_decodes_as_surrogateescape_whichever_decode_ran(raw: Fields) -> None:
    view = header_view(raw)
    assert list(view.items()) == [
        (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in raw
    ]
    assert encode_fields(view.items()) == raw


# --- the answer's framing ----------------------------------------------------------------------------------------


class Sink:
    def __init__(self, closing: bool = False) -> None:
        self.flow = WriteFlow()
        self.closing = closing
        self.send_s = 1.0
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


class Source:
    def __init__(self, reader: RequestReader) -> None:
        self.reader = reader

    async def wait_body(self, seconds: float) -> None:
        raise AssertionError("no waiting in these tests")

    def body_taken(self) -> None:
        pass

    def body_failed(self) -> None:
        pass


def exchange(data: bytes, closing: bool = False) -> tuple[Response, Sink, RequestBody]:
    reader = RequestReader()
    reader.receive_data(data)
    head = reader.next_event()
    assert isinstance(head, Request)
    sink = Sink(closing)
    body = RequestBody(Source(reader), head, 1.0)
    return Response(sink, head, body), sink, body


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_a_whole_answer_is_one_write_with_its_length() -> None:
    response, sink, _ = exchange(GET)
    response.send(200, [(b"X-A", b"1")], b"body")
    assert sink.written == [b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 4\r\n\r\nbody"]
    assert (response.state, response.closes) == (ResponseState.DONE, False)


def test_head_204_and_304_answers_carry_no_body() -> None:
    response, sink, _ = exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    response.send(200, [], b"twelve bytes")
    assert sink.written == [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"]
    response, sink, _ = exchange(GET)
    response.send(204, [])
    assert sink.written == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    response, _, _ = exchange(GET)
    with pytest.raises(LocalProtocolError):
        response.send(304, [], b"no")


def test_a_stream_is_chunked_for_http_1_1_and_ends_the_connection_for_http_1_0() -> None:
    response, sink, _ = exchange(GET)
    response.start(200, [])
    response.end(b"last")
    assert b"".join(sink.written) == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nlast\r\n0\r\n\r\n"
    response, sink, _ = exchange(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response.start(200, [])
    response.end(b"last")
    assert b"".join(sink.written) == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nlast"
    assert response.closes


def test_the_connection_field_says_what_happens_next() -> None:
    response, sink, _ = exchange(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response.send(200, [])
    assert b"Connection: keep-alive\r\n" in sink.written[0]
    for data, closing in [(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False), (GET, True)]:
        response, sink, _ = exchange(data, closing)
        response.send(200, [])
        assert b"Connection: close\r\n" in sink.written[0]
        assert response.closes
    response, sink, _ = exchange(GET)
    response.close_after()
    response.send(200, [])
    assert b"Connection: close\r\n" in sink.written[0]


def test_an_answer_before_the_whole_body_closes_the_connection() -> None:
    response, sink, body = exchange(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
    response.send(403, [])
    assert b"Connection: close\r\n" in sink.written[0]
    assert not body.complete
    response, sink, body = exchange(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n12345")
    response.send(403, [])
    assert b"Connection" not in sink.written[0]
    assert body.complete


async def test_a_body_read_ahead_for_the_answer_is_still_there_to_read() -> None:
    response, _, body = exchange(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n12345")
    response.start(200, [])
    assert await body.read_all(10, 1.0) == b"12345"


@pytest.mark.parametrize("name", [b"Content-Length", b"transfer-encoding", b"CONNECTION"])
def test_framing_fields_are_the_writers_alone(name: bytes) -> None:
    response, sink, _ = exchange(GET)
    with pytest.raises(LocalProtocolError):
        response.send(200, [(name, b"1")], b"")
    with pytest.raises(LocalProtocolError):
        response.start(200, [(name, b"1")])
    assert sink.written == []


def test_a_field_that_would_start_another_line_is_refused() -> None:
    response, sink, _ = exchange(GET)
    with pytest.raises(LocalProtocolError):
        response.send(200, [(b"X-A", b"1\r\nSet-Cookie: x")], b"")
    assert sink.written == []


async def test_a_body_longer_or_shorter_than_its_length_is_refused() -> None:
    response, _, _ = exchange(GET)
    response.start(200, [], length=3)
    with pytest.raises(LocalProtocolError):
        await response.write(b"four")
    with pytest.raises(LocalProtocolError):
        response.end(b"ab")


# --- write flow control --------------------------------------------------------------------------------------------


async def test_drain_waits_while_paused_and_raises_once_lost() -> None:
    flow = WriteFlow()
    await flow.drain()  # not paused: at once
    flow.pause()
    waiting = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    assert not waiting.done()
    flow.resume()
    await waiting
    flow.pause()
    with pytest.raises(TimeoutError):
        await flow.drain(0.01)
    lost = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    flow.lose(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        await lost
    with pytest.raises(ConnectionResetError):
        await flow.drain()


# --- the core's additions for the transports -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"GET /x HTTP/1.2\r\nHost: a\r\n\r\n", b"GET /x HTTP/1.2"),  # refused at the line
        (b"\r\nGET /x HTTP/1.1\r\nBad Field: 1\r\n\r\n", b"GET /x HTTP/1.1"),  # by llhttp, in the fields
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"GET /x HTTP/1.1"),  # after the head was whole
        (b"GET /" + b"a" * 9000, b"GET /" + b"a" * 8185),  # a line too long: as much as the limit
    ],
)
def test_a_refused_head_keeps_its_first_line(data: bytes, line: bytes) -> None:
    reader = RequestReader()
    reader.receive_data(data)
    with pytest.raises(ProtocolError):
        reader.next_event()
    assert reader.error_line == line


def test_a_good_head_and_a_broken_body_keep_no_line() -> None:
    reader = RequestReader()
    reader.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert isinstance(reader.next_event(), Request)
    with pytest.raises(ProtocolError):
        reader.next_event()
    assert reader.error_line == b""


def test_the_response_reader_says_how_much_it_holds() -> None:
    reader = ResponseReader()
    reader.start(b"GET")
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert reader.buffered == 40
    reader.next_event()
    assert reader.buffered == 2
