"""pep.attributes: the query map the policy input shows is parse_qs's, whatever the query."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.attributes import query_map

QUERY = st.text(alphabet="ab=&%+2 0é;?", max_size=24)


@given(QUERY)
def test_query_map_is_parse_qs(query: str) -> None:
    assert query_map(query) == parse_qs(query, keep_blank_values=True)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("q=refunds", {"q": ["refunds"]}),
        ("a=1&a=2&b", {"a": ["1", "2"], "b": [""]}),
        ("a==1&&=x&", {"a": ["=1"], "": ["x"]}),
        ("a=%41+b", {"a": ["A b"]}),
        ("", {}),
    ],
)
def test_query_map(query: str, expected: dict[str, list[str]]) -> None:
    assert query_map(query) == expected
