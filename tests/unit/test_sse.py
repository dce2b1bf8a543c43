"""The one SSE reader (pep/protocols/sse.py) and the answer media check (pep/protocols/media.py).

Events must come out as the WHATWG EventSource algorithm reads fields, whatever the chunking; what a client would
decode differently (another charset, invalid UTF-8, an encoding behind `identity`) is unreadable.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pep.protocols import media
from pep.protocols.sse import SseError, SseEvent, SseReader, encode, field


def read(stream: bytes, sizes: list[int] | None = None) -> list[SseEvent]:
    reader = SseReader()
    events: list[SseEvent] = []
    at = 0
    for size in sizes or [len(stream)]:
        events += reader.feed(stream[at : at + size])
        at += size
    events += reader.feed(stream[at:])
    return events + reader.finish()


@pytest.mark.parametrize(
    ("stream", "data", "kind", "event_id", "retry"),
    [
        (b"data: x\n\n", b"x", "message", None, None),
        (b"data:x\n\n", b"x", "message", None, None),  # the space after the colon is optional
        (b"data:  x\n\n", b" x", "message", None, None),  # only one space goes
        (b"data: a\ndata: b\n\n", b"a\nb", "message", None, None),  # data lines joined with LF
        (b"data\n\n", b"", "message", None, None),  # a field name without a colon: an empty value
        (b"data: x\r\n\r\n", b"x", "message", None, None),
        (b"data: x\r\rdata: y\r\r", b"x", "message", None, None),  # lone CRs end lines
        (b"\xef\xbb\xbfdata: x\n\n", b"x", "message", None, None),  # a leading BOM is skipped
        (b"event: ping\ndata: x\n\n", b"x", "ping", None, None),
        (b"event:\ndata: x\n\n", b"x", "message", None, None),  # an empty type is `message`
        (b"id: 7\ndata: x\n\n", b"x", "message", "7", None),
        (b"id: a\x00b\ndata: x\n\n", b"x", "message", None, None),  # an id with NUL is ignored
        (b"retry: 500\ndata: x\n\n", b"x", "message", None, 500),
        (b"retry: 5s\ndata: x\n\n", b"x", "message", None, None),  # not all digits: ignored
        (b": comment\ndata: x\n\n", b"x", "message", None, None),
        (b"Data: x\n\n", None, "message", None, None),  # field names are case-sensitive
        (b"id: 1\n\n", None, "message", "1", None),  # a priming event: an id, no data
    ],
)
def test_fields_as_the_eventsource_algorithm_reads_them(
    stream: bytes, data: bytes | None, kind: str, event_id: str | None, retry: int | None
) -> None:
    (event, *_) = read(stream)
    assert (event.data, event.event, event.id, event.retry) == (data, kind, event_id, retry)


def test_a_bom_later_in_the_stream_is_part_of_the_line() -> None:
    (first, second) = read(b"data: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert first.data == b"a"
    assert second.data is None  # the field is named "\ufeffdata", which no reader knows


def test_the_raw_event_is_its_lines_with_lf() -> None:
    (event,) = read(b": c\r\nid: 1\r\ndata: x\r\n\r\n")
    assert event.raw == b": c\nid: 1\ndata: x\n\n"
    assert [field(line) for line in event.lines] == [(b"", b" c"), (b"id", b"1"), (b"data", b"x")]


def test_an_unfinished_last_event_is_read() -> None:
    (event,) = read(b"data: x")
    assert event.data == b"x"


def test_invalid_utf8_is_an_error_with_the_events_before() -> None:
    reader = SseReader()
    with pytest.raises(SseError) as caught:
        reader.feed(b"data: ok\n\ndata: \xff\xfe\n\n")
    assert [e.data for e in caught.value.before] == [b"ok"]


def test_an_event_over_the_limit_is_an_error() -> None:
    reader = SseReader(max_event=16)
    with pytest.raises(SseError):
        reader.feed(b"data: " + b"x" * 32)


def test_encode_reads_back() -> None:
    raw = encode(b'{"a":1}\n{"b":2}', event="message", event_id="t-1", others=(b": keep",))
    (event,) = read(raw)
    assert (event.data, event.id, event.lines[0]) == (b'{"a":1}\n{"b":2}', "t-1", b": keep")


STREAMS = st.lists(
    st.sampled_from(
        [b"data: x", b"data:y", b"id: 3", b": c", b"event: e", b"retry: 9", b"", b"\xef\xbb\xbf", b"data: \xc3\xa9"]
    ),
    max_size=12,
).map(lambda lines: b"".join(line + end for line, end in zip(lines, [b"\n", b"\r\n", b"\r"] * 8, strict=False)))


@settings(max_examples=300, deadline=None)
@given(STREAMS, st.lists(st.integers(min_value=0, max_value=8), max_size=12))
def test_chunking_never_changes_the_events(stream: bytes, sizes: list[int]) -> None:
    assert read(stream, sizes) == read(stream)


@pytest.mark.parametrize(
    ("types", "encodings", "problem"),
    [
        (["text/event-stream"], [], None),
        (["application/json; charset=utf-8"], ["identity"], None),
        (["application/json; charset=UTF8"], [], None),
        (['text/event-stream; charset="utf-8"'], [""], None),
        (["text/event-stream; charset=utf-16"], [], "charset"),
        (["text/event-stream; charset=utf-32"], [], "charset"),
        (["application/json; charset=cp500"], [], "charset"),  # EBCDIC
        (["application/json; charset=utf-8-sig"], [], "charset"),
        (["application/json; charset=nonsense"], [], "charset"),
        # httpx decodes by the first copy, utf-7, where `+ACI-` is a quote
        (["text/event-stream; charset=utf-7; charset=utf-8"], [], "charset"),
        (['text/event-stream; charset=utf-7; x="a;charset=utf-8"'], [], "charset"),
        (["text/event-stream; charset=utf-8; charset=utf-8"], [], "charset"),
        (["application/json"], ["identity", "gzip"], "content-encoding"),  # every value counts
        (["application/json"], ["identity, br"], "content-encoding"),
        (["application/json"], ["gzip"], "content-encoding"),
        (["application/json", "text/event-stream"], [], "Content-Type"),
    ],
)
def test_what_an_answer_may_be_read_in(types: list[str], encodings: list[str], problem: str | None) -> None:
    found = media.problem(types, encodings)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("status", "types", "encodings", "mode"),
    [
        (200, ["text/event-stream"], [], "events"),
        (200, [" Text/Event-Stream ; charset=utf-8"], ["identity"], "events"),
        (200, ["application/json"], [], "whole"),
        (200, [], [], "whole"),
        (204, ["text/event-stream; charset=utf-16"], [], "unreadable"),
        (200, ["text/event-stream"], ["gzip"], "unreadable"),
        (200, ["text/event-stream", "application/json"], [], "unreadable"),
        (404, ["text/event-stream"], ["gzip"], "pass"),  # an error status is relayed as it is
        (301, ["application/json"], [], "pass"),
    ],
)
def test_how_an_answer_is_read(status: int, types: list[str], encodings: list[str], mode: str) -> None:
    told: list[str] = []
    assert media.answer_mode(status, types, encodings, told.append) == mode
    assert told == ([media.problem(types, encodings)] if mode == "unreadable" else [])


@pytest.mark.parametrize(
    ("status", "located", "reads"),
    [
        (200, False, True),
        (202, False, True),
        (300, False, True),  # not a redirect to httpx: the SDK parses the body
        (300, True, True),
        (305, True, True),
        (307, False, True),  # no Location: no redirect either
        (399, False, True),
        (301, True, False),  # a redirect: followed within the origin, else turned away, the body never read
        (307, True, False),
        (308, True, False),
        (400, False, False),  # a JSON-RPC error alone is kept
        (500, False, False),
        (199, False, False),
    ],
)
def test_which_statuses_the_mcp_sdk_reads(status: int, located: bool, reads: bool) -> None:
    assert media.mcp_reads(status, located) is reads
    told: list[str] = []
    mode = media.answer_mode(status, ["application/json"], [], told.append, media.mcp_reads(status, located))
    assert mode == ("whole" if reads else "pass")
