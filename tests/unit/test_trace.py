"""W3C traceparent parsing: valid shapes are kept, anything else starts a new trace."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from pep.trace import MAX_TRACESTATE, from_headers, parse_traceparent, parse_tracestate

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_a_valid_traceparent_is_parsed() -> None:
    assert parse_traceparent(VALID) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("ff" + VALID[2:], id="version-ff"),
        pytest.param(VALID.upper(), id="upper-case-hex"),
        pytest.param("00-" + "0" * 32 + "-b7ad6b7169203331-01", id="zero-trace-id"),
        pytest.param("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", id="zero-parent-id"),
        pytest.param(VALID + "-extra", id="version-00-with-more-fields"),
        pytest.param(VALID[:-1], id="short"),
        pytest.param(VALID.replace("-", "_"), id="separators"),
        pytest.param("0g" + VALID[2:], id="non-hex-version"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_traceparents_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_may_append_fields() -> None:
    assert parse_traceparent("01" + VALID[2:] + "-what-comes-later") is not None
    assert parse_traceparent("01" + VALID[2:] + "x") is None


@given(st.text(max_size=80))
def test_anything_parses_to_none_or_the_exact_fields(value: str) -> None:
    found = parse_traceparent(value)
    if found is not None:
        trace_id, parent_id, flags = found
        assert value[3:35] == trace_id
        assert value[36:52] == parent_id
        assert value[53:55] == flags


def test_the_callers_trace_is_kept_with_its_state() -> None:
    trace = from_headers(headers(("traceparent", VALID), ("tracestate", "a=1"), ("tracestate", "b=2")))
    assert trace.remote
    assert trace.traceparent == VALID
    assert trace.headers() == {"traceparent": VALID, "tracestate": "a=1,b=2"}
    assert trace.fields() == [(b"traceparent", VALID.encode()), (b"tracestate", b"a=1,b=2")]


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param((), id="none"),
        pytest.param((("traceparent", "garbage"), ("tracestate", "a=1")), id="invalid"),
        pytest.param((("traceparent", VALID), ("traceparent", VALID)), id="repeated"),
    ],
)
def test_otherwise_a_new_trace_is_started_without_state(pairs: tuple[tuple[str, str], ...]) -> None:
    trace = from_headers(headers(*pairs))
    assert not trace.remote
    assert parse_traceparent(trace.traceparent) is not None
    assert trace.flags == "00"
    assert trace.headers() == {"traceparent": trace.traceparent}
    assert trace.fields() == [(b"traceparent", trace.traceparent.encode())]
    assert from_headers(headers(*pairs)).trace_id != trace.trace_id


def test_new_trace_ids_are_random_lower_hex_and_never_all_zeros() -> None:
    traces = [from_headers(headers()) for _ in range(200)]
    for trace in traces:
        assert parse_traceparent(trace.traceparent) == (trace.trace_id, trace.parent_id, "00")  # 32 + 16 hex, not 0
    assert len({t.trace_id for t in traces}) == len({t.parent_id for t in traces}) == 200
    assert len({t.trace_id[:16] for t in traces}) == 200  # the high half of a trace id is random too


def test_an_overlong_tracestate_is_dropped_not_cut() -> None:
    trace = from_headers(headers(("traceparent", VALID), ("tracestate", "a=" + "x" * MAX_TRACESTATE)))
    assert trace.state is None


# --- tracestate: the W3C grammar, or nothing ---------------------------------------------------------------------

EVERY_VALUE_CHARACTER = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")  # spec: chr / nblk-chr


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        pytest.param(["rojo=00f067aa0ba902b7"], "rojo=00f067aa0ba902b7", id="one-member"),
        pytest.param(["rojo=1,congo=t61rcWkgMzE"], "rojo=1,congo=t61rcWkgMzE", id="two-members"),
        pytest.param([" rojo=1 ,\tcongo=2\t"], "rojo=1,congo=2", id="optional-whitespace"),
        pytest.param(["rojo=1,,  ,congo=2"], "rojo=1,congo=2", id="empty-members-skipped"),
        pytest.param(["rojo=1", "congo=2"], "rojo=1,congo=2", id="repeated-fields-are-one-list"),
        pytest.param(["fw529a3039@dt=abc,0tenant@sys-1=x y"], "fw529a3039@dt=abc,0tenant@sys-1=x y", id="tenants"),
        pytest.param(["a_-*/9=" + EVERY_VALUE_CHARACTER], "a_-*/9=" + EVERY_VALUE_CHARACTER, id="every-character"),
        pytest.param(["a" * 256 + "=1"], "a" * 256 + "=1", id="longest-key"),
        pytest.param(["a=" + "x" * 256], "a=" + "x" * 256, id="longest-value"),
        pytest.param([",".join(f"k{i}=v" for i in range(32))], ",".join(f"k{i}=v" for i in range(32)), id="32-members"),
    ],
)
def test_a_valid_tracestate_is_kept(fields: list[str], kept: str) -> None:
    assert parse_tracestate(fields) == kept


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(["a=\u20ac"], id="outside-latin1"),  # made framing the PDP request fail
        pytest.param(["a=caf\u00e9"], id="latin1-but-not-ascii"),
        pytest.param(["a=\udcff"], id="a-byte-that-is-not-utf8"),  # as aiohttp hands it over
        pytest.param(["a=1\x00"], id="nul"),
        pytest.param(["a=1\x7f"], id="del"),
        pytest.param(["Rojo=1"], id="upper-case-key"),
        pytest.param(["1rojo=1"], id="simple-key-starts-with-a-digit"),
        pytest.param(["ro jo=1"], id="space-in-key"),
        pytest.param(["rojo =1"], id="space-before-equals"),
        pytest.param(["rojo=a=b"], id="equals-in-value"),
        pytest.param(["rojo="], id="empty-value"),
        pytest.param(["rojo"], id="no-equals"),
        pytest.param(["=1"], id="no-key"),
        pytest.param(["rojo=1,rojo=2"], id="duplicate-key"),
        pytest.param(["rojo=1", "rojo=2"], id="duplicate-key-across-fields"),
        pytest.param(["a" * 257 + "=1"], id="key-too-long"),
        pytest.param(["a=" + "x" * 257], id="value-too-long"),
        pytest.param(["t" * 242 + "@s=1"], id="tenant-too-long"),
        pytest.param(["t@" + "s" * 15 + "=1"], id="system-too-long"),
        pytest.param(["t@1s=1"], id="system-starts-with-a-digit"),
        pytest.param([",".join(f"k{i}=v" for i in range(33))], id="33-members"),
        pytest.param([",".join(f"k{i}=" + "v" * 20 for i in range(30))], id="valid-but-longer-than-512"),
        pytest.param([""], id="empty"),
        pytest.param([" , "], id="only-empty-members"),
    ],
)
def test_an_invalid_tracestate_is_dropped_whole(fields: list[str]) -> None:
    assert parse_tracestate(fields) is None


@given(st.lists(st.text(max_size=40), max_size=4))
def test_a_kept_tracestate_is_always_printable_ascii_and_fits_a_header(fields: list[str]) -> None:
    state = parse_tracestate(fields)
    if state is not None:
        assert all(0x20 <= ord(c) <= 0x7E for c in state)
        assert len(state) <= MAX_TRACESTATE
        state.encode("latin-1")


def test_an_invalid_tracestate_is_dropped_and_the_trace_kept() -> None:
    trace = from_headers(headers(("traceparent", VALID), ("tracestate", "a=\udcff")))
    assert trace.remote
    assert trace.headers() == {"traceparent": VALID}
