"""The listener's request reader (pep/http1 RequestReader), with bytes alone: every framing and integrity rule the
PEP applies at the HTTP layer, pipelining, keep-alive, CONNECT, and the reader's own state checks.

The refusal table is the bypass corpus's HTTP-layer half (tests/integration/test_bypass_corpus.py, "request
smuggling", "HTTP versions", "header count and size limits") plus what llhttp alone would let through. Every
refused case is also read one byte at a time and cut in two at every offset by test_http1_core_splits.py.
"""

from __future__ import annotations

import pytest

from fuzz.http1_oracles import check_requests, read_requests
from pep.http1 import (
    NEED_DATA,
    PAUSED,
    BodyTooLarge,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Framing,
    Limits,
    LocalProtocolError,
    ProtocolError,
    Request,
    RequestReader,
    RequestState,
    TargetForm,
)

SMUGGLED = b"GET /tools/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


def post(*fields: bytes, body: bytes = b"") -> bytes:
    return b"POST /tools/x HTTP/1.1\r\nHost: h\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def get(*fields: bytes, target: bytes = b"/tools/x", version: bytes = b"1.1") -> bytes:
    host = (b"Host: h\r\n",) if version == b"1.1" else ()
    lines = (*host, *(f + b"\r\n" for f in fields))
    return b"GET %s HTTP/%s\r\n" % (target, version) + b"".join(lines) + b"\r\n"


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def events(data: bytes, eof: bool = False, reader: RequestReader | None = None) -> list[object]:
    """Every event up to the first PAUSED or NEED_DATA (or the end), or the ProtocolError raised."""
    reader = reader or RequestReader()
    reader.receive_data(data)
    if eof:
        reader.receive_eof()
    out: list[object] = []
    while True:
        event = reader.next_event()
        out.append(event)
        if event is PAUSED or event is NEED_DATA or isinstance(event, ConnectionClosed):
            return out


def state(reader: RequestReader) -> RequestState:
    return reader.state  # read anew: mypy would keep an earlier assertion about `reader.state`


def refusal(data: bytes, eof: bool = False, limits: Limits | None = None) -> ProtocolError:
    reading = read_requests([data], eof, limits)
    assert reading.messages == () or not reading.messages[-1].complete, reading
    assert reading.error is not None, reading
    with pytest.raises(ProtocolError) as caught:
        events(data, eof, RequestReader(limits or Limits()))
    assert caught.value.status_hint == reading.error[1]
    return caught.value


def request_of(data: bytes) -> tuple[Request, bytes, EndOfMessage]:
    """The one request in `data`, its body and its end; checked against h11's reading of the same bytes."""
    check_requests(data, False, read_requests([data], False))
    seen = events(data)
    assert seen[-1] is PAUSED, seen
    request, *data_events, end = seen[:-1]
    assert isinstance(request, Request)
    assert isinstance(end, EndOfMessage)
    assert all(isinstance(d, Data) for d in data_events)
    return request, b"".join(d.data for d in data_events if isinstance(d, Data)), end


REFUSED = [
    # framing two parsers could read differently (request smuggling)
    ("cl-and-te", post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=chunked(SMUGGLED)), 400),
    ("te-and-cl", post(b"Transfer-Encoding: chunked", b"Content-Length: 48", body=b"0\r\n\r\n" + SMUGGLED), 400),
    ("duplicate-cl-differing", post(b"Content-Length: 5", b"Content-Length: 46", body=b"hello" + SMUGGLED), 400),
    ("duplicate-cl-same", post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    ("cl-list", post(b"Content-Length: 5, 5", body=b"hello"), 400),
    ("cl-with-sign", post(b"Content-Length: +5", body=b"hello"), 400),
    ("cl-negative", post(b"Content-Length: -1"), 400),
    ("cl-hex", post(b"Content-Length: 0x5", body=b"hello"), 400),
    ("cl-empty", post(b"Content-Length:"), 400),
    ("cl-overflow", post(b"Content-Length: 99999999999999999999999"), 400),
    ("te-not-chunked", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), 400),
    ("te-gzip", post(b"Transfer-Encoding: gzip", body=b"0\r\n\r\n"), 400),
    ("te-chunked-not-last", post(b"Transfer-Encoding: chunked, identity", body=chunked(b"hello")), 400),
    # llhttp reads these three as chunked; the rule is exactly `chunked`, as h11 has it
    ("te-identity-then-chunked", post(b"Transfer-Encoding: identity, chunked", body=chunked(b"hello")), 400),
    ("te-two-fields", post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked", body=chunked(b"x")), 400),
    ("te-empty-member", post(b"Transfer-Encoding: ,chunked", body=chunked(b"x")), 400),
    ("te-chunked-twice", post(b"Transfer-Encoding: chunked, chunked", body=chunked(b"x")), 400),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked", b"Content-Length: 3", body=b"abc"), 400),
    ("obs-fold", get(b"X-A: a", b" Transfer-Encoding: chunked"), 400),
    ("obs-fold-tab", get(b"X-A: a", b"\tb"), 400),
    ("bare-cr-in-field", b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n", 400),
    ("bare-lf-field", b"GET /tools/x HTTP/1.1\r\nHost: h\nX-A: a\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET /tools/x HTTP/1.1\nHost: h\n\n", 400),
    ("nul-in-value", get(b"X-A: a\x00b"), 400),
    ("del-in-value", get(b"X-A: a\x7fb"), 400),
    ("space-in-name", get(b"X A: b"), 400),
    ("empty-name", get(b": b"), 400),
    ("no-colon", get(b"X-A"), 400),
    # chunked bodies
    ("bad-chunk-size", post(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-space", post(b"Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-space-ext", post(b"Transfer-Encoding: chunked", body=b"5 ;a\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-sign", post(b"Transfer-Encoding: chunked", body=b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-17-digits", post(b"Transfer-Encoding: chunked", body=b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-bare-lf", post(b"Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n"), 400),
    ("chunk-data-overrun", post(b"Transfer-Encoding: chunked", body=b"5\r\nhelloXX0\r\n\r\n"), 400),
    ("chunk-ext-empty", post(b"Transfer-Encoding: chunked", body=b"5;\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-control", post(b"Transfer-Encoding: chunked", body=b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bad-quote", post(b"Transfer-Encoding: chunked", body=b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    ("trailer-obs-fold", post(b"Transfer-Encoding: chunked", body=b"0\r\nT: a\r\n b\r\n\r\n"), 400),
    ("trailer-bad-name", post(b"Transfer-Encoding: chunked", body=b"0\r\nT x: a\r\n\r\n"), 400),
    ("trailer-control", post(b"Transfer-Encoding: chunked", body=b"0\r\nT: a\x00\r\n\r\n"), 400),
    ("trailer-transfer-encoding", post(b"Transfer-Encoding: chunked", body=b"0\r\nTransfer-Encoding: x\r\n\r\n"), 400),
    ("trailer-content-length", post(b"Transfer-Encoding: chunked", body=b"0\r\ncontent-length: 5\r\n\r\n"), 400),
    ("trailer-host", post(b"Transfer-Encoding: chunked", body=b"0\r\nHost: evil\r\n\r\n"), 400),
    ("trailer-bare-lf", post(b"Transfer-Encoding: chunked", body=b"0\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), 400),
    # versions
    ("http-0.9", b"GET /tools/x\r\n\r\n", 505),
    ("http-0.9-versioned", get(target=b"/tools/x", version=b"0.9"), 505),
    ("http-1.2", get(version=b"1.2"), 505),
    ("http-2.0", get(version=b"2.0"), 505),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("http-1.10", get(version=b"1.10"), 400),
    ("http-lower-case", b"GET /tools/x http/1.1\r\nHost: h\r\n\r\n", 400),
    ("request-line-trailing-space", b"GET /tools/x HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    # request line and targets
    ("double-space", b"GET  /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("space-in-target", b"GET /tools/x /admin HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("tab-in-target", get(target=b"/a\tb"), 400),
    ("non-ascii-target", get(target=b"/caf\xc3\xa9"), 400),
    ("unknown-method", b"FOO /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    ("lower-case-method", b"get /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    ("method-not-a-token", b"G@T /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("cr-before-method", b"\r\rGET /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("lf-before-method", b"\nGET /tools/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("asterisk-on-get", get(target=b"*"), 400),
    ("asterisk-prefix", b"OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("authority-form-on-get", get(target=b"h:80"), 400),
    ("connect-origin-form", b"CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-no-port", b"CONNECT h HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-port-0", b"CONNECT h:0 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-port-too-big", b"CONNECT h:65536 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-userinfo", b"CONNECT a@h:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-path", b"CONNECT h:80/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("connect-with-body", b"CONNECT h:80 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", 400),
    # Host
    ("no-host", b"GET /tools/x HTTP/1.1\r\n\r\n", 400),
    ("absolute-form-without-host", b"GET http://127.0.0.1:1/tools/x HTTP/1.1\r\n\r\n", 400),
    ("duplicate-host", b"GET /tools/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400),
    ("duplicate-host-on-1.0", b"GET /tools/x HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-with-space", b"GET /tools/x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-with-userinfo", b"GET /tools/x HTTP/1.1\r\nHost: u@h\r\n\r\n", 400),
    ("host-with-path", b"GET /tools/x HTTP/1.1\r\nHost: h/x\r\n\r\n", 400),
    ("host-port-not-digits", b"GET /tools/x HTTP/1.1\r\nHost: h:x\r\n\r\n", 400),
    # sizes
    ("129-fields", get(*(b"X-H%d: v" % i for i in range(128))), 431),
    ("field-over-8190-bytes", get(b"X-Big: " + b"a" * 8184), 431),
    ("request-line-over-8190-bytes", get(target=b"/" + b"a" * 8190), 414),
    ("head-over-64-kib", get(*(b"X-H%d: " % i + b"a" * 600 for i in range(110))), 431),
]


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_its_status(data: bytes, status: int) -> None:
    error = refusal(data)
    assert error.status_hint == status
    assert error.reason


def test_the_refusal_table_is_large_and_unique() -> None:
    assert len(REFUSED) >= 60
    assert len({c[0] for c in REFUSED}) == len(REFUSED)


def test_limits_sit_exactly_at_their_bounds() -> None:
    # 128 fields and an 8190-byte field line are fine; one more of either is not (aiohttp's bounds, kept)
    assert request_of(get(*(b"X-H%d: v" % i for i in range(127))))[0].headers[-1] == (b"X-H126", b"v")
    request_of(get(b"X-Big: " + b"a" * 8183))
    line = len(b"GET / HTTP/1.1")
    request_of(get(target=b"/" + b"a" * (8190 - line)))
    assert refusal(get(target=b"/" + b"a" * (8191 - line))).status_hint == 414
    assert refusal(get(b"X: " + b"a" * 40), limits=Limits(max_head_bytes=64)).status_hint == 431
    reader = RequestReader(Limits(max_head_bytes=64))
    request, *_ = events(get(b"X: " + b"a" * (64 - len(get(b"X: ")))), reader=reader)
    assert isinstance(request, Request)


def test_a_head_that_never_ends_is_refused_at_its_limit_not_held() -> None:
    reader = RequestReader(Limits(max_head_bytes=1024))
    reader.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX: ")
    for _ in range(99):  # 28 + 990 bytes: still within 1024
        reader.receive_data(b"a" * 10)
        assert reader.next_event() is NEED_DATA
    reader.receive_data(b"a" * 1000)
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert caught.value.status_hint == 431
    assert reader.state is RequestState.ERROR
    assert reader.buffered == 0


def test_a_request_line_without_its_end_is_refused_at_its_limit() -> None:
    reader = RequestReader()
    reader.receive_data(b"GET /" + b"a" * 8186)
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"a")
    with pytest.raises(ProtocolError) as caught:
        reader.next_event()
    assert caught.value.status_hint == 414


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET /tools/x HTTP/1.1\r\nHost: h\r\nX-A: ", "in a head"),
        (post(b"Content-Length: 10", body=b"hello"), "in a body"),
        (post(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n"), "in a chunked body"),
        (post(b"Transfer-Encoding: chunked", body=b"0\r\nT: 1\r\n"), "in a trailer section"),
        (b"\r", "after a lone CR"),
    ],
)
def test_the_end_of_the_stream_inside_a_request_is_an_error(data: bytes, why: str) -> None:
    assert refusal(data, eof=True).status_hint == 400, why


def test_fields_are_kept_as_sent_with_values_trimmed() -> None:
    request, body, end = request_of(
        b"GET /tools/x?q=1 HTTP/1.1\r\nhost: h:8080\r\nX-Spaces:   a  b \t\r\nX-Empty:\r\nX-Obs: caf\xc3\xa9\r\n"
        b"X-Colon:a:b\r\n\r\n"
    )
    assert (request.method, request.target, request.version) == (b"GET", b"/tools/x?q=1", b"1.1")
    assert request.headers == [
        (b"host", b"h:8080"),
        (b"X-Spaces", b"a  b"),
        (b"X-Empty", b""),
        (b"X-Obs", b"caf\xc3\xa9"),
        (b"X-Colon", b"a:b"),
    ]
    assert (request.host, request.form, request.framing, request.content_length) == (
        b"h:8080",
        TargetForm.ORIGIN,
        Framing.NONE,
        None,
    )
    assert (request.keep_alive, request.expect_continue, body, end.trailers) == (True, False, b"", [])


def test_a_length_body_and_a_chunked_body_with_extensions_and_trailers() -> None:
    request, body, _ = request_of(post(b"Content-Length: 5", body=b"hello"))
    assert (request.framing, request.content_length, body) == (Framing.LENGTH, 5, b"hello")
    request, body, end = request_of(
        post(b"Transfer-Encoding: Chunked", body=b'5;a=b;c="d \\" e"\r\nhello\r\n1; x = y\r\n!\r\n0\r\nT: 1\r\n\r\n')
    )
    assert (request.framing, request.content_length, body) == (Framing.CHUNKED, None, b"hello!")
    assert end.trailers == [(b"T", b"1")]
    request, body, _ = request_of(post(b"Content-Length: 0"))
    assert (request.framing, body) == (Framing.NONE, b"")


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (get(), True),
        (get(b"Connection: keep-alive"), True),
        (get(b"Connection: close"), False),
        (get(b"Connection: CLOSE"), False),
        (get(b"Connection: keep-alive, close"), False),  # llhttp says keep-alive
        (get(b"Connection: x,close"), False),  # llhttp says keep-alive
        (get(b"Connection: x", b"Connection: close"), False),
        (get(b"Connection: closed"), True),
        (get(version=b"1.0"), False),
        (get(b"Connection: keep-alive", version=b"1.0"), True),
        (get(b"Connection: Keep-Alive, x", version=b"1.0"), True),
        (get(b"Connection: keep-alive, close", version=b"1.0"), False),
        # RFC 9112 6.1: a chunked HTTP/1.0 request is read, but the connection closes after it
        (b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hi"), False),
    ],
)
def test_keep_alive(data: bytes, keep_alive: bool) -> None:
    request, _, _ = request_of(data)
    assert request.keep_alive is keep_alive


def test_a_request_that_closes_the_connection_is_the_last_one_read() -> None:
    reader = RequestReader()
    seen = events(get(b"Connection: close") + get(target=b"/tools/next"), reader=reader)
    assert [type(e).__name__ for e in seen] == ["Request", "EndOfMessage", "Signal"]
    assert reader.start_next() is False
    assert reader.state is RequestState.MUST_CLOSE
    assert reader.buffered == 0  # the pipelined request is dropped, never parsed
    reader.receive_data(get())
    assert reader.buffered == 0
    assert reader.next_event() is PAUSED


def test_pipelined_requests_come_one_at_a_time() -> None:
    reader = RequestReader()
    reader.receive_data(post(b"Content-Length: 5", body=b"hello") + get(target=b"/2") + b"GET /3 HTTP/1.1\r\nHo")
    first = events(b"", reader=reader)
    assert [type(e).__name__ for e in first] == ["Request", "Data", "EndOfMessage", "Signal"]
    assert state(reader) is RequestState.DONE
    assert reader.next_event() is PAUSED  # nothing more until the answer is sent
    assert reader.buffered == len(get(target=b"/2") + b"GET /3 HTTP/1.1\r\nHo")
    assert reader.start_next() is True
    second = events(b"", reader=reader)
    assert isinstance(second[0], Request)
    assert second[0].target == b"/2"
    assert reader.start_next() is True
    assert reader.next_event() is NEED_DATA
    assert state(reader) is RequestState.HEAD
    third = events(b"st: h\r\n\r\n", reader=reader)
    assert isinstance(third[0], Request)
    assert third[0].target == b"/3"


def test_a_malformed_pipelined_request_does_not_touch_the_one_before() -> None:
    reader = RequestReader()
    reader.receive_data(get(target=b"/ok") + post(b"Content-Length: 1", b"Content-Length: 2", body=b"xy"))
    first = events(b"", reader=reader)
    assert isinstance(first[0], Request)
    assert first[0].target == b"/ok"
    assert first[-1] is PAUSED
    assert reader.start_next() is True
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_leading_empty_lines_are_skipped() -> None:
    reader = RequestReader()
    reader.receive_data(b"\r\n\r\n")
    assert reader.next_event() is NEED_DATA
    assert reader.state is RequestState.IDLE
    reader.receive_data(b"\r")
    assert reader.next_event() is NEED_DATA
    request, *_ = events(b"\n" + get(), reader=reader)
    assert isinstance(request, Request)
    # between pipelined requests too (a client that ends a body with an extra CRLF)
    request, _, _ = request_of(post(b"Content-Length: 2", body=b"hi"))
    reader = RequestReader()
    events(post(b"Content-Length: 2", body=b"hi") + b"\r\n" + get(target=b"/2"), reader=reader)
    assert reader.start_next()
    second = events(b"", reader=reader)
    assert isinstance(second[0], Request)
    assert second[0].target == b"/2"


def test_an_upgrade_request_is_read_as_a_request_and_its_body_is_not_the_next_one() -> None:
    """llhttp (through httptools) skips the body of an Upgrade request and hands it over as the new protocol's
    bytes: a listener that read on would take the body for the next request. The core reads it as the body."""
    data = post(b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED)
    reader = RequestReader()
    seen = events(data + get(target=b"/tools/next"), reader=reader)
    request, body = seen[0], seen[1]
    assert isinstance(request, Request)
    assert isinstance(body, Data)
    assert body.data == SMUGGLED
    assert reader.start_next()
    (nxt, *_) = events(b"", reader=reader)
    assert isinstance(nxt, Request)
    assert nxt.target == b"/tools/next"


def test_expect_100_continue_is_a_flag_on_http_1_1_only() -> None:
    assert request_of(post(b"Expect: 100-continue", b"Content-Length: 2", body=b"hi"))[0].expect_continue
    assert request_of(post(b"Expect: 100-Continue", b"Content-Length: 2", body=b"hi"))[0].expect_continue
    data = b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    assert not request_of(data)[0].expect_continue  # RFC 9110 10.1.1: ignored on HTTP/1.0
    assert not request_of(post(b"Expect: something-else"))[0].expect_continue
    # the body is not waited for before the head is handed out: the caller decides, then sends the 100
    reader = RequestReader()
    request, need = events(post(b"Expect: 100-continue", b"Content-Length: 2"), reader=reader)
    assert isinstance(request, Request)
    assert need is NEED_DATA
    assert request.expect_continue


@pytest.mark.parametrize(
    ("data", "form"),
    [
        (get(target=b"/a/b;p=1?q=%2F"), TargetForm.ORIGIN),
        (get(target=b"//double"), TargetForm.ORIGIN),
        (get(target=b"http://127.0.0.1:8080/tools/x"), TargetForm.ABSOLUTE),
        (get(target=b"HTTPS://h"), TargetForm.ABSOLUTE),
        (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", TargetForm.ASTERISK),
        (b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n", TargetForm.AUTHORITY),
        (b"CONNECT api.example:65535 HTTP/1.1\r\nHost: api.example:65535\r\n\r\n", TargetForm.AUTHORITY),
    ],
)
def test_target_forms(data: bytes, form: TargetForm) -> None:
    assert request_of(data)[0].form is form


def test_ambiguous_paths_and_fragments_are_left_to_the_integrity_checks() -> None:
    """Dot segments, encodings and fragments are valid HTTP/1.1: pep/integrity.py refuses them with a decision
    logged (request_ambiguous), so the reader hands them over byte for byte."""
    for target in (b"/tools/../admin", b"/tools/%2e%2e/admin", b"/tools/x#/../admin", b"/a\\b", b"/a%zz"):
        assert request_of(get(target=target))[0].target == target


def test_http_1_0_without_host_is_read() -> None:
    request, _, _ = request_of(b"GET /tools/x HTTP/1.0\r\n\r\n")
    assert (request.version, request.host, request.keep_alive) == (b"1.0", None, False)


def test_connect_switches_to_a_tunnel_with_the_bytes_already_received() -> None:
    reader = RequestReader()
    request, end, paused = events(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01", reader=reader)
    assert isinstance(request, Request)
    assert (request.method, request.form, request.keep_alive) == (b"CONNECT", TargetForm.AUTHORITY, False)
    assert isinstance(end, EndOfMessage)
    assert paused is PAUSED
    assert reader.switch() == b"\x16\x03\x01"
    assert reader.state is RequestState.SWITCHED
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")


def test_a_refused_connect_is_the_last_request() -> None:
    reader = RequestReader()
    events(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n" + get(), reader=reader)
    assert reader.start_next() is False  # what follows may be tunnel bytes: never read as HTTP


def test_a_body_limit_is_413_and_hands_out_no_byte_past_it() -> None:
    reader = RequestReader(max_body_bytes=4)
    reader.receive_data(post(b"Content-Length: 5"))
    assert isinstance(reader.next_event(), Request)
    with pytest.raises(BodyTooLarge) as caught:
        reader.next_event()  # known from Content-Length, before any body byte
    assert caught.value.status_hint == 413
    reader = RequestReader(max_body_bytes=4)
    reader.receive_data(post(b"Transfer-Encoding: chunked", body=b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"))
    assert isinstance(reader.next_event(), Request)
    assert [reader.next_event(), reader.next_event()] == [
        Data(b"abc"),
        Data(b"d"),
    ]  # up to the limit, whatever the reads
    with pytest.raises(BodyTooLarge):
        reader.next_event()


def test_an_error_is_raised_again_and_the_reader_reads_nothing_more() -> None:
    reader = RequestReader()
    reader.receive_data(b"GET / HTTP/2.0\r\n\r\n")
    with pytest.raises(ProtocolError) as first:
        reader.next_event()
    with pytest.raises(ProtocolError) as again:
        reader.next_event()
    assert again.value is first.value
    assert reader.state is RequestState.ERROR
    reader.receive_data(get())
    assert reader.buffered == 0


def test_the_client_closing_between_requests_is_connection_closed() -> None:
    reader = RequestReader()
    reader.receive_data(get())
    reader.receive_eof()
    assert [type(e).__name__ for e in events(b"", reader=reader)] == ["Request", "EndOfMessage", "Signal"]
    assert reader.start_next()
    assert isinstance(reader.next_event(), ConnectionClosed)
    assert reader.state is RequestState.CLOSED
    assert isinstance(reader.next_event(), ConnectionClosed)


def test_state_transitions_are_checked() -> None:
    reader = RequestReader()
    with pytest.raises(LocalProtocolError):
        reader.start_next()  # nothing read yet
    with pytest.raises(LocalProtocolError):
        reader.switch()
    events(get(), reader=reader)
    with pytest.raises(LocalProtocolError):
        reader.switch()  # not a CONNECT
    reader.receive_eof()
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x")


def test_limits_must_allow_something() -> None:
    with pytest.raises(ValueError, match="max_fields"):
        Limits(max_fields=0)
