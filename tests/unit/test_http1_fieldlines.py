"""A head's bounds and its field lines: the C of a compiled build (pep/http1/_fieldlines.c) answers as the
pure-Python twins in pep/http1/fields.py do, and the split is what llhttp itself hands over field by field
(`on_header`, the way the readers took the fields before)."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pep
from pep.headers import end_to_end_fields
from pep.http1 import LocalProtocolError, fields, writer
from pep.http1.fields import TOKEN, VALUE


def test_the_c_is_what_a_compiled_build_uses() -> None:
    """With the request path compiled, the readers use the C (so the properties below compare it with the
    twins); pure Python uses the twins."""
    assert (fields.BOUNDS is not fields.head_bounds) == pep.COMPILED
    assert (fields.SPLIT_LINES is not fields.split_lines) == pep.COMPILED
    assert (fields.JOIN_LINES is not None) == pep.COMPILED
    assert (fields.KEEP_FIELDS is not fields.keep_fields) == pep.COMPILED


_PIECES = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b":", b" ", b"\n\r\n", b"\r\r\n"])


@given(st.lists(_PIECES, max_size=24), st.integers(0, 80), st.integers(0, 80))
def test_bounds_are_the_finds_they_replace(pieces: list[bytes], max_head: int, max_line: int) -> None:
    buf = bytearray(b"".join(pieces))
    assert fields.BOUNDS(buf, max_head, max_line) == fields.head_bounds(buf, max_head, max_line)
    end = buf.find(b"\r\n\r\n", 0, max_head)
    expected = None if end < 0 else (end, buf.find(b"\n", 0, max_line + 2))
    assert fields.head_bounds(buf, max_head, max_line) == expected


class _Llhttp:
    """llhttp's own split of the fields, as the readers took them before: names as sent, the value without the
    whitespace llhttp drops before it and the whitespace after it."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value.rstrip(b" \t")))


_NAMES = st.text(alphabet=st.sampled_from(sorted(TOKEN.decode())), min_size=1, max_size=8).map(str.encode)
_OWS = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "])
_VALUE_BYTES = st.sampled_from([b"a", b"Z", b" ", b"\t", b":", b",", b"\x80", b"\xff", b'"', b"="])
_VALUES = st.lists(_VALUE_BYTES, max_size=8).map(b"".join)


_WANTED = st.lists(st.sampled_from([b"host", b"content-length", b"x", b"a-b", b"connection", b""]), max_size=4)


@given(st.lists(st.tuples(_NAMES, _OWS, _VALUES, _OWS), max_size=8), st.binary(max_size=8), _WANTED)
def test_the_split_of_an_accepted_head_is_llhttps(
    lines: list[tuple[bytes, bytes, bytes, bytes]], after: bytes, wanted: list[bytes]
) -> None:
    block = b"".join(name + b":" + before + value + trail + b"\r\n" for name, before, value, trail in lines)
    head = b"GET / HTTP/1.1\r\n" + block + b"\r\n"
    llhttp = _Llhttp()
    try:
        httptools.HttpRequestParser(llhttp).feed_data(head)
    except httptools.HttpParserError:
        return  # not an accepted head: the split is never asked for one
    buf = bytearray(head + after)
    found = fields.BOUNDS(buf, len(buf), 100)
    assert found is not None
    end, lf = found
    assert buf[: end + 4] == head
    names = tuple(wanted)
    split = fields.SPLIT_LINES(buf, lf + 1, end, names)
    assert split == fields.split_lines(buf, lf + 1, end, names)
    assert split[0] == llhttp.fields
    assert split[1] == [(name.lower(), value) for name, value in llhttp.fields if name.lower() in names]


@pytest.mark.parametrize("split", [fields.SPLIT_LINES, fields.split_lines])
def test_a_line_without_a_colon_is_an_error_not_a_field(split: fields.SplitLines) -> None:
    with pytest.raises(ValueError, match="without a colon"):
        split(bytearray(b"A: 1\r\nB"), 0, 7, ())


@pytest.mark.parametrize("split", [fields.SPLIT_LINES, fields.split_lines])
def test_the_split_stays_within_the_buffer(split: fields.SplitLines) -> None:
    buf = bytearray(b"A: 1\r\nB:2")
    assert split(buf, 0, 1000, (b"b",)) == ([(b"A", b"1"), (b"B", b"2")], [(b"b", b"2")])
    assert split(buf, 6, 2, (b"b",)) == ([], [])


# --- writing: the C join against the writer's own checks ---------------------------------------------------------

_ANY_NAMES = st.one_of(_NAMES, st.binary(max_size=4), st.sampled_from([b"A B", b"A:", b"\xe9", b"A\r\n", b""]))
_ANY_VALUES = st.one_of(_VALUES, st.binary(max_size=6), st.sampled_from([b"a\r\nX: y", b"\x00", b"\x7f", b"\t"]))


def _written(lines: list[tuple[bytes, bytes]], names_checked: bool) -> bytes | str:
    try:
        return writer._fields(lines, names_checked)
    except LocalProtocolError:
        return "refused"


@given(st.lists(st.tuples(_ANY_NAMES, _ANY_VALUES), max_size=6), st.booleans())
def test_the_join_writes_what_the_writer_writes_and_refuses_nothing_it_accepts(
    lines: list[tuple[bytes, bytes]], names_checked: bool
) -> None:
    """The writer's outcome is the one the careful checks give (`check_fields` and the marking of control
    bytes), with or without the C join in front of them; and the join only ever gives way (None) to a field a
    careful check would look at twice: a name that is not a token, or a value byte that is not allowed."""
    try:
        careful: bytes | str = writer._careful_fields(lines, names_checked)
    except LocalProtocolError:
        careful = "refused"
    assert _written(lines, names_checked) == careful
    if fields.JOIN_LINES is None:  # pure Python: the careful checks are the writer
        return
    joined = fields.JOIN_LINES(lines)
    every_name_a_token = all(name and not name.translate(None, TOKEN) for name, _ in lines)
    every_value_clean = all(not value.translate(None, VALUE) for _, value in lines)
    if every_name_a_token and every_value_clean:
        assert joined == careful
    else:
        assert joined is None


# --- the end-to-end fields: the C keep against the Python one ---------------------------------------------------

_SOME_NAMES = st.sampled_from(
    [b"Connection", b"connection", b"CONNECTION", b"Keep-Alive", b"X-A", b"x-a", b"Te", b"\xc9"]
)
_DROPS = st.frozensets(st.sampled_from([b"connection", b"keep-alive", b"x-a", b"te", b"X-A", b"\xe9"]), max_size=4)


@given(st.lists(st.tuples(st.one_of(_SOME_NAMES, _NAMES), _VALUES), max_size=8), _DROPS)
def test_keep_is_the_python_loop(lines: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> None:
    """The same fields kept (the same pairs, in order) and the same Connection values: names compared in ASCII
    lower case only, as `bytes.lower` does (a name with bytes beyond ASCII is never folded)."""
    found = fields.KEEP_FIELDS(lines, drop)
    assert found is not None
    assert found == fields.keep_fields(lines, drop)
    kept, connection = found
    assert all(a is b for a, b in zip(kept, [f for f in lines if f[0].lower() not in drop], strict=True))
    assert connection == [value for name, value in lines if name.lower() == b"connection"]


def test_keep_gives_way_on_anything_but_pairs_of_bytes() -> None:
    if fields.KEEP_FIELDS is fields.keep_fields:
        return  # pure Python: the loop is all there is
    assert fields.KEEP_FIELDS([(b"a", "b")], frozenset()) is None  # type: ignore[list-item]
    assert fields.KEEP_FIELDS([(b"a", b"b", b"c")], frozenset()) is None  # type: ignore[list-item]
    assert fields.KEEP_FIELDS([(b"a", b"b")], {b"a"}) is None  # type: ignore[arg-type]


def test_fields_a_connection_field_names_go_too_whatever_the_size_of_the_drop_set() -> None:
    lines = [(b"X-1", b"a"), (b"Connection", b"x-2, close"), (b"x-2", b"b"), (b"X-3", b"c")]
    for drop in (
        frozenset({b"connection", b"x-1"}),
        frozenset({b"connection", b"x-1"} | {b"y-%d" % i for i in range(80)}),
    ):
        assert end_to_end_fields(lines, drop) == [(b"X-3", b"c")]
