"""The fixed translate tables (`keeping`) accept exactly what deleting the allowed bytes accepted, and a status
line's cached reading is the reading it was checked to have: the cheaper checks are the same rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.http1 import LocalProtocolError, ProtocolError, ResponseReader, request_head, response_head
from pep.http1.fields import KEEP_VALUE, TOKEN, VALUE, keeping
from pep.http1.response_reader import _status_line

_KEEP_TOKEN = keeping(TOKEN)


@pytest.mark.parametrize("byte", range(256))
def test_each_byte_is_kept_exactly_when_it_is_allowed(byte: int) -> None:
    data = b"a" + bytes([byte]) + b"b"
    assert (data.translate(KEEP_VALUE) == data) == (not data.translate(None, VALUE))
    assert (data.translate(_KEEP_TOKEN) == data) == (not data.translate(None, TOKEN))


@given(st.binary(max_size=64))
def test_a_value_is_kept_exactly_when_deleting_the_allowed_bytes_leaves_nothing(data: bytes) -> None:
    assert (data.translate(KEEP_VALUE) == data) == (not data.translate(None, VALUE))


@given(st.binary(max_size=16))
def test_a_written_field_value_holds_no_control_character_but_a_tab(value: bytes) -> None:
    fields = [(b"A", b"1"), (b"X", value), (b"B", b"2")]
    if value.translate(None, VALUE):
        with pytest.raises(LocalProtocolError):
            request_head(b"GET", b"/", fields)
    else:
        assert request_head(b"GET", b"/", fields).count(b"\r\n") == 5


@given(st.lists(st.binary(max_size=6), min_size=1, max_size=4))
def test_written_fields_are_refused_exactly_when_a_value_holds_a_control_character(values: list[bytes]) -> None:
    # The block check counts CRs and LFs instead of deleting the allowed bytes: a CR in one field and a LF in
    # another (or any order of them) must still be refused, wherever they stand.
    fields = [(b"X-%d" % i, value) for i, value in enumerate(values)]
    if any(value.translate(None, VALUE) for value in values):
        with pytest.raises(LocalProtocolError):
            request_head(b"GET", b"/", fields)
    else:
        assert request_head(b"GET", b"/", fields).count(b"\r\n") == len(values) + 2


@given(st.binary(max_size=8))
def test_a_written_target_is_visible_ascii_only(target: bytes) -> None:
    visible = bool(target) and not target.translate(None, bytes(range(0x21, 0x7F)))
    if visible:
        assert request_head(b"GET", target, []).startswith(b"GET " + target + b" ")
    else:
        with pytest.raises(LocalProtocolError):
            request_head(b"GET", target, [])


@given(st.binary(max_size=8))
def test_a_written_reason_holds_no_control_character_but_a_tab(reason: bytes) -> None:
    if reason.translate(None, VALUE):
        with pytest.raises(LocalProtocolError):
            response_head(200, [], reason)
    else:
        assert response_head(200, [], reason).startswith(b"HTTP/1.1 200 " + reason + b"\r\n")


def test_a_status_line_read_again_reads_the_same() -> None:
    line = b"HTTP/1.1 299 Fine By Me"
    assert _status_line(line) == (b"1.1", 299, b"Fine By Me")
    assert _status_line(line) == (b"1.1", 299, b"Fine By Me")


@pytest.mark.parametrize("line", [b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 099 Low", b"HTTP/2.0 200 OK", b"HTTP/1.1 20x OK"])
def test_a_refused_status_line_is_refused_every_time(line: bytes) -> None:
    for _ in range(2):
        with pytest.raises(ProtocolError):
            _status_line(line)


def test_an_answer_after_a_cached_status_line_has_its_own_fields() -> None:
    reader = ResponseReader()
    for length in (b"2", b"3"):
        reader.start(b"GET")
        reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\nX-N: " + length + b"\r\n\r\n")
        head = reader.next_event()
        assert head.headers == [(b"Content-Length", length), (b"X-N", length)]  # type: ignore[union-attr]
        reader.receive_data(b"ok!"[: int(length)])
        assert reader.take_body() == b"ok!"[: int(length)]


def test_a_long_status_line_is_read_but_not_kept() -> None:
    from pep.http1.response_reader import _GOOD_LINES

    line = b"HTTP/1.1 200 " + b"x" * 80
    assert _status_line(line) == (b"1.1", 200, b"x" * 80)
    assert line not in _GOOD_LINES
