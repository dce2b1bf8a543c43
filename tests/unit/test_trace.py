"""W3C traceparent parsing: valid shapes are kept, anything else starts a new trace."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from pep.trace import MAX_TRACESTATE, from_headers, parse_traceparent

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
    assert from_headers(headers(*pairs)).trace_id != trace.trace_id


def test_an_overlong_tracestate_is_dropped_not_cut() -> None:
    trace = from_headers(headers(("traceparent", VALID), ("tracestate", "a=" + "x" * MAX_TRACESTATE)))
    assert trace.state is None
