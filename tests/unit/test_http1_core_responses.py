"""The clients' response reader (pep/http1 ResponseReader), with bytes alone: framing per the request it answers
(HEAD, 204, 304, CONNECT), Content-Length, chunked and close-delimited bodies, 1xx answers, 101, bytes after the
answer, size limits, keep-alive, and the reader's own state checks. Every error's status hint is 502.
"""

from __future__ import annotations

import pytest

from fuzz.http1_oracles import Reading, check_response, read_response
from pep.http1 import (
    NEED_DATA,
    PAUSED,
    BodyTooLarge,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Framing,
    InformationalResponse,
    Limits,
    LocalProtocolError,
    ProtocolError,
    Response,
    ResponseReader,
    ResponseState,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def answer(data: bytes, method: bytes = b"GET", eof: bool = False, max_body: int | None = None) -> Reading:
    """The reading of `data` as the answer to `method`, checked against h11's reading of the same bytes."""
    reading = read_response([data], eof, method, max_body=max_body)
    check_response(data, eof, method, reading, max_body)
    return reading


def started(method: bytes = b"GET", limits: Limits | None = None, max_body_bytes: int | None = None) -> ResponseReader:
    reader = ResponseReader(limits or Limits(), max_body_bytes)
    reader.start(method)
    return reader


REFUSED = [
    ("http-2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("http-1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("lower-case-version", b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("empty-line-first", b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),  # llhttp skips it
    ("status-099", b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"),  # llhttp reads it
    ("status-600", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n"),  # llhttp reads it
    ("status-4-digits", b"HTTP/1.1 2000 X\r\n\r\n"),
    ("status-not-digits", b"HTTP/1.1 2x0 X\r\n\r\n"),
    ("no-space-after-status", b"HTTP/1.1 200OK\r\n\r\n"),
    ("nul-in-reason", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),  # llhttp reads it
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
    ("duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"),
    ("te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),  # llhttp: chunked
    ("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),  # llhttp: until close
    ("te-on-a-1xx", b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: x\r\n\r\n" + OK),  # llhttp: ignored
    ("te-on-http-1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("101-not-asked-for", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"),
    ("101-without-upgrade", b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
    ("too-many-1xx", b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + OK),
    ("129-fields", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(129)) + b"\r\n"),
    ("status-line-over-8190", b"HTTP/1.1 200 " + b"a" * 8190 + b"\r\n\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_as_a_bad_gateway(data: bytes) -> None:
    reading = answer(data, eof=True)
    assert reading.end == "error", reading
    assert reading.error is not None
    assert reading.error[1] == 502
    assert not any(m.complete for m in reading.messages)


def test_a_length_body_keeps_the_connection() -> None:
    reader = started()
    reader.receive_data(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    response = reader.next_event()
    assert isinstance(response, Response)
    assert (response.status, response.reason, response.version) == (201, b"Created", b"1.1")
    assert response.headers == [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")]
    assert (response.framing, response.content_length, response.keep_alive) == (Framing.LENGTH, 2, True)
    assert reader.next_event() == Data(b"{}")
    assert reader.next_event() == EndOfMessage([])
    assert reader.next_event() is PAUSED
    assert reader.reusable
    reader.start(b"GET")  # the next exchange on the same connection
    reader.receive_data(OK)
    assert isinstance(reader.next_event(), Response)


def test_a_chunked_body_with_trailers() -> None:
    reading = answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\nT: v\r\n\r\n"
    )
    (message,) = reading.messages
    assert (message.body, message.trailers, message.complete, message.keep_alive) == (
        b"abcd",
        ((b"t", b"v"),),
        True,
        True,
    )


def test_a_body_until_the_server_closes_is_complete_only_then_and_never_reused() -> None:
    reader = started()
    reader.receive_data(b"HTTP/1.1 200 OK\r\n\r\nsome")
    response = reader.next_event()
    assert isinstance(response, Response)
    assert (response.framing, response.keep_alive) == (Framing.CLOSE, False)
    assert reader.next_event() == Data(b"some")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b" more")
    assert reader.next_event() == Data(b" more")
    reader.receive_eof()
    assert reader.next_event() == EndOfMessage([])
    assert not reader.reusable
    with pytest.raises(LocalProtocolError):
        reader.start(b"GET")


@pytest.mark.parametrize(
    ("data", "method"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", b"HEAD"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HEAD"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 50\r\n\r\n", b"GET"),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b"POST"),
    ],
)
def test_no_body_whatever_the_fields_say(data: bytes, method: bytes) -> None:
    reading = answer(data, method)
    (message,) = reading.messages
    assert (message.body, message.complete, message.keep_alive, reading.end) == (b"", True, True, "paused")


def test_bytes_after_an_answer_without_a_body_are_an_error() -> None:
    """llhttp would read the 204's announced body as the next answer's start; here it is a second answer to one
    request: the connection is not used again."""
    reading = answer(b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nhi", eof=True)
    assert reading.messages[0].complete
    assert reading.error == ("ProtocolError", 502, "bytes after the answer")


@pytest.mark.parametrize("later", [False, True])
def test_bytes_after_the_answer_end_the_connection_not_the_answer(later: bool) -> None:
    """The answer stands (the bytes after it could not change it); the connection is never reused."""
    extra = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    reader = started()
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi")
    if not later:
        reader.receive_data(extra)
    assert isinstance(reader.next_event(), Response)
    assert reader.next_event() == Data(b"hi")
    assert reader.next_event() == EndOfMessage([])
    if later:
        assert reader.next_event() is PAUSED
        assert reader.reusable
        reader.receive_data(extra)
    assert not reader.reusable
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert (caught.value.reason, caught.value.status_hint) == ("bytes after the answer", 502)
    assert reader.state is ResponseState.ERROR


def test_bytes_nobody_asked_for_are_an_error() -> None:
    reader = ResponseReader()
    reader.receive_data(OK)
    with pytest.raises(ProtocolError):
        reader.next_event()
    reader = ResponseReader()
    reader.receive_data(OK)
    with pytest.raises(ProtocolError):
        reader.start(b"GET")


def test_informational_answers_are_handed_out_and_their_fields_stay_theirs() -> None:
    reader = started(b"POST")
    reader.receive_data(
        b"HTTP/1.1 100 Continue\r\nContent-Type: application/json\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"result":true}'
    )
    first, second, final = reader.next_event(), reader.next_event(), reader.next_event()
    assert first == InformationalResponse(100, b"Continue", b"1.1", [(b"Content-Type", b"application/json")])
    assert second == InformationalResponse(103, b"Early Hints", b"1.1", [(b"Link", b"</a>; rel=preload")])
    assert isinstance(final, Response)
    assert final.headers == [(b"Content-Length", b"15")]
    assert (
        answer(b"HTTP/1.1 100 Continue\r\n\r\n" * 8 + OK).messages[0].complete
    )  # eight are fine, the ninth is not (the refusal table)


def test_a_switch_only_when_asked_for() -> None:
    reader = ResponseReader()
    reader.start(b"GET", upgrade=True)
    reader.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    switched = reader.next_event()
    assert isinstance(switched, InformationalResponse)
    assert switched.status == 101
    assert reader.state is ResponseState.SWITCHED
    assert reader.trailing_data() == b"\x81\x00"
    assert reader.next_event() is PAUSED


@pytest.mark.parametrize(("status", "tunnel"), [(200, True), (299, True), (407, False)])
def test_connect_opens_a_tunnel_on_2xx_only(status: int, tunnel: bool) -> None:
    data = b"HTTP/1.1 %d X\r\nContent-Length: 3\r\n\r\nabc" % status
    reading = answer(data, b"CONNECT")
    (message,) = reading.messages
    if tunnel:  # a 2xx to CONNECT has no body whatever it says: the bytes after the head are the tunnel's
        assert (reading.end, reading.tunnel, message.body) == ("switched", b"abc", b"")
    else:
        assert (reading.end, message.body, message.complete) == ("paused", b"abc", True)


def test_a_content_length_over_the_limit_is_refused_before_any_body_byte() -> None:
    reader = started(max_body_bytes=10)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    response = reader.next_event()
    assert isinstance(response, Response)  # the head is handed out: the status is known
    with pytest.raises(BodyTooLarge) as caught:
        reader.next_event()
    assert caught.value.status_hint == 502
    assert not reader.reusable


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nabcdefghijkl",
    ],
    ids=["chunked", "until-close"],
)
def test_a_longer_body_is_handed_out_up_to_the_limit_then_refused(data: bytes) -> None:
    reading = answer(data, eof=True, max_body=10)
    assert reading.messages[0].body == b"abcdefghij"
    assert reading.error is not None
    assert reading.error[0] == "BodyTooLarge"
    assert answer(data, eof=True, max_body=12).messages[0].complete


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (OK, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", False),  # until close: never reused
    ],
)
def test_keep_alive(data: bytes, keep_alive: bool) -> None:
    (message,) = answer(data, eof=False).messages
    assert message.keep_alive is keep_alive


def test_the_end_of_the_stream_before_a_complete_answer_is_an_error() -> None:
    for data in (b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"):
        reading = answer(data, eof=True)
        assert reading.end == "error", data
        assert reading.error is not None
        assert reading.error[1] == 502


def test_a_server_closing_an_idle_connection_is_connection_closed() -> None:
    reader = started()
    reader.receive_data(OK)
    assert [type(reader.next_event()).__name__ for _ in range(3)] == ["Response", "Data", "EndOfMessage"]
    reader.receive_eof()
    assert isinstance(reader.next_event(), ConnectionClosed)
    assert reader.state is ResponseState.CLOSED
    assert not reader.reusable


def test_field_limits_apply_to_answers_too() -> None:
    reader = started(limits=Limits(max_fields=2))
    reader.receive_data(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert caught.value.status_hint == 502


def test_state_transitions_are_checked() -> None:
    reader = started()
    with pytest.raises(LocalProtocolError):
        reader.start(b"GET")  # an exchange is under way
    with pytest.raises(LocalProtocolError):
        reader.trailing_data()
    reader.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert [type(reader.next_event()).__name__ for _ in range(2)] == ["Response", "EndOfMessage"]
    with pytest.raises(LocalProtocolError):
        reader.start(b"GET")  # the server said close
