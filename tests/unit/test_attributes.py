"""pep.attributes: the query map the policy input shows is parse_qs's, whatever the query; the headers it shows
are the end-to-end ones a route does not hide."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from pep.attributes import LIST_FIELDS, AmbiguousField, AmbiguousQuery, header_map, policy_headers, query_map
from pep.config import RouteConfig
from pep.headers import end_to_end
from pep.routing import Route

QUERY = st.text(alphabet="ab=&%+2 0é;?", max_size=24)


@given(QUERY)
def test_query_map_is_parse_qs(query: str) -> None:
    try:
        expected = parse_qs(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            query_map(query)
    else:
        try:
            got = query_map(query)
        except AmbiguousQuery:  # (` a` and `a` are one name to PHP): only where two names are one variable
            variables = [n.lstrip(" ").replace(" ", "_").partition("[")[0] for n in expected]
            assert len(set(variables)) < len(variables)
        else:
            assert got == expected


@pytest.mark.parametrize("query", ["n=caf%e9", "n=%ff", "n=%c0%ae", "%ff=1", "a=1&n=%ed%a0%80"])
def test_a_query_byte_that_is_not_utf8_is_never_shown_as_a_replacement_character(query: str) -> None:
    """Decoded with U+FFFD, `%e9` and `%ff` were one value to the policy; upstream they are two."""
    with pytest.raises(UnicodeDecodeError):
        query_map(query)


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


@pytest.mark.parametrize(
    "pairs",
    [
        [("Host", "a"), ("Accept", "x"), ("accept", "y"), ("X-Custom", "1")],
        [("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"), ("X-Other", "o"), ("Keep-Alive", "5")],
        [("Authorization", "Bearer t"), ("Cookie", "c"), ("TE", "trailers"), ("Upgrade", "h2c"), ("A", "b")],
        [("connection", "x-a"), ("Connection", "X-B"), ("X-A", "1"), ("x-b", "2"), ("X-C", "3")],
    ],
)
def test_policy_headers_are_the_end_to_end_header_map(pairs: list[tuple[str, str]]) -> None:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    route = Route.build(RouteConfig(name="r", path_prefix="/", upstream="http://up"))
    expected = header_map(end_to_end(headers, route.policy_drop))
    assert policy_headers(headers, route.policy_hidden) == expected


@pytest.mark.parametrize(
    "pairs",
    [
        [("X-Tenant", "evil"), ("X-Tenant", "acme")],
        [("X-Tenant", "evil"), ("x-tenant", "")],
        [("User-Agent", "a"), ("Accept", "x"), ("user-agent", "b")],
        [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
    ],
)
def test_a_field_that_is_no_list_sent_twice_is_refused(pairs: list[tuple[str, str]]) -> None:
    """Joined, two fields were the same to the policy as one holding `a, b`, and readers that take the first
    field act on another value than the joined one."""
    route = Route.build(RouteConfig(name="r", path_prefix="/", upstream="http://up"))
    with pytest.raises(AmbiguousField, match="sent more than once"):
        policy_headers(CIMultiDictProxy(CIMultiDict(pairs)), route.policy_hidden)


@pytest.mark.parametrize("name", sorted(LIST_FIELDS))
def test_a_list_field_sent_twice_is_joined(name: str) -> None:
    route = Route.build(RouteConfig(name="r", path_prefix="/", upstream="http://up"))
    headers = CIMultiDictProxy(CIMultiDict([(name, "a"), (name.upper(), "b")]))
    assert policy_headers(headers, route.policy_hidden) == {name: "a, b"}


@pytest.mark.parametrize(
    "pairs",
    [
        [("X-Tenant", "acme"), ("X_Tenant", "evil")],
        [("x_tenant", "evil"), ("Accept", "x"), ("X-TENANT", "acme")],
        [("X-Ten_ant", "acme"), ("X_Ten-ant", "evil")],
    ],
)
def test_names_that_are_one_cgi_variable_are_refused(pairs: list[tuple[str, str]]) -> None:
    route = Route.build(RouteConfig(name="r", path_prefix="/", upstream="http://up"))
    with pytest.raises(AmbiguousField, match="one field to CGI-style upstreams"):
        policy_headers(CIMultiDictProxy(CIMultiDict(pairs)), route.policy_hidden)


def test_an_underscore_name_alone_is_shown_by_its_own_name() -> None:
    route = Route.build(RouteConfig(name="r", path_prefix="/", upstream="http://up"))
    headers = CIMultiDictProxy(CIMultiDict([("X_Tenant", "evil"), ("X-Other", "1")]))
    assert policy_headers(headers, route.policy_hidden) == {"x_tenant": "evil", "x-other": "1"}


@pytest.mark.parametrize(
    "query",
    [
        "tenant=acme&tenant[]=evil",
        "tenant[0]=evil&tenant=acme",
        "tenant=acme&tenant%5Bx%5D=evil",
        "ten.ant=acme&ten_ant=evil",  # PHP reads `.` and ` ` as `_`
        "tenant=acme&+tenant=evil",  # and drops leading spaces
        "tenant=acme&tenant%00x=evil",  # and ends a name at a NUL
    ],
)
def test_query_names_that_are_one_variable_to_php_rack_or_qs_are_refused(query: str) -> None:
    with pytest.raises(AmbiguousQuery, match="one variable to PHP, Rack or qs"):
        query_map(query)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("filter[a]=1&filter[b]=2", {"filter[a]": ["1"], "filter[b]": ["2"]}),  # one object's keys everywhere
        ("ids[]=1&ids[]=2", {"ids[]": ["1", "2"]}),
        ("tenant[]=evil", {"tenant[]": ["evil"]}),  # alone: shown by its own name
        ("v=1.2&w=a.b", {"v": ["1.2"], "w": ["a.b"]}),
    ],
)
def test_bracketed_and_dotted_names_that_stand_alone_pass(query: str, expected: dict[str, list[str]]) -> None:
    assert query_map(query) == expected
