"""pep.headers: hop-by-hop hygiene both ways and what a PDP obligation may set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

import pep
from pep.headers import (
    ANSWER_DROP,
    CALLER_CREDENTIALS,
    HOP_BY_HOP,
    HOP_BY_HOP_FIELDS,
    PEP_OWNED,
    connection_named,
    connection_named_fields,
    end_to_end,
    end_to_end_fields,
    first_field,
    obligation_forbidden,
    obligation_problem,
    policy_drop_set,
    request_drop_set,
)


def ci(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_hop_by_hop_headers_are_removed_in_any_case() -> None:
    headers = ci(
        ("Host", "h"),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Authorization", "Basic x"),
        ("Trailer", "x-checksum"),
        ("tRaNsFeR-eNcOdInG", "chunked"),
        ("Accept", "*/*"),
    )
    assert end_to_end(headers) == [("Host", "h"), ("Accept", "*/*")]


def test_connection_named_headers_are_removed() -> None:
    headers = ci(
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "s"),
        ("x-secret", "s2"),
        ("X-Public", "p"),
    )
    assert connection_named(headers) == frozenset({"keep-alive", "x-secret"})
    assert end_to_end(headers) == [("X-Public", "p")]


def test_connection_tokens_from_several_fields_and_odd_spacing() -> None:
    headers = ci(
        ("Connection", " X-A ,,x-b"),
        ("connection", "X-C"),
        ("X-A", "1"),
        ("X-B", "2"),
        ("X-C", "3"),
        ("X-D", "4"),
    )
    assert connection_named(headers) == frozenset({"x-a", "x-b", "x-c"})
    assert end_to_end(headers) == [("X-D", "4")]


def test_no_connection_header() -> None:
    assert connection_named(ci(("Accept", "*/*"))) == frozenset()


def test_also_drop_removes_more() -> None:
    headers = ci(("Authorization", "Bearer t"), ("Cookie", "c"), ("X-Pep-Decision-Id", "forged"), ("A", "1"))
    assert end_to_end(headers, frozenset({"authorization", "cookie", "x-pep-decision-id"})) == [("A", "1")]


def test_answer_fields_keep_duplicates_and_leave_framing_to_the_writer() -> None:
    upstream = [
        (b"Content-Length", b"3"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Internal"),
        (b"x-internal", b"1"),
    ]
    out = end_to_end_fields(upstream, ANSWER_DROP)
    assert out == [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
    if not pep.COMPILED:  # compiled (pep/native.py), a typed pair is unpacked and built again: equal, not the same
        assert out[0] is upstream[1]  # the fields received, not copies


@given(st.lists(st.tuples(st.sampled_from(["Connection", "A", "b", "Keep-Alive", "TE", "x-c"]), st.text("abcAB, "))))
def test_fields_and_strings_are_held_to_the_same_rules(pairs: list[tuple[str, str]]) -> None:
    fields = [(n.encode(), v.encode()) for n, v in pairs]
    drop = frozenset({"x-c"})
    expected = [(n.encode(), v.encode()) for n, v in end_to_end(ci(*pairs), drop)]
    assert end_to_end_fields(fields, HOP_BY_HOP_FIELDS | {b"x-c"}) == expected


def test_request_drop_set() -> None:
    drop = request_drop_set(None, keep_caller_credentials=False)
    assert drop >= PEP_OWNED
    assert drop >= CALLER_CREDENTIALS
    assert {"host", "expect"} <= drop
    assert "content-length" not in drop
    kept = request_drop_set("X-Api-Key", keep_caller_credentials=True)
    assert not CALLER_CREDENTIALS & kept
    assert "x-api-key" in kept
    assert kept >= PEP_OWNED


def test_policy_drop_set_hides_credentials_but_shows_host() -> None:
    drop = policy_drop_set("X-Api-Key")
    assert drop >= CALLER_CREDENTIALS
    assert "x-api-key" in drop
    assert "x-request-id" in drop
    assert "host" not in drop


# --- obligations ----------------------------------------------------------------------------------------------

FORBIDDEN = obligation_forbidden(None)


@pytest.mark.parametrize(
    "name",
    [
        *sorted(HOP_BY_HOP),
        "Connection",
        "Transfer-Encoding",
        "host",
        "Host",
        "content-length",
        "Content-Length",
        "expect",
        "x-request-id",
        "X-Request-ID",
        "x-pep-decision-id",
        "x-forwarded-for",
        "X-Forwarded-Proto",
        "x-forwarded-host",
        "forwarded",
    ],
)
def test_obligation_may_not_set_reserved_headers(name: str) -> None:
    problem = obligation_problem([("x-ok", "1"), (name, "v")], FORBIDDEN)
    assert problem == f"header {name.lower()!r} may not be set by the PDP"


def test_obligation_may_not_set_the_credential_header() -> None:
    forbidden = obligation_forbidden("X-Api-Key")
    assert obligation_problem([("x-api-key", "k")], forbidden) is not None
    assert obligation_problem([("x-api-key", "k")], FORBIDDEN) is None


@pytest.mark.parametrize("name", ["", "x y", "x:y", "x\r\ny", "x\ny", "é", "x/y", "(x)", "x\x00", "x@y", "[x]"])
def test_obligation_header_names_must_be_tokens(name: str) -> None:
    problem = obligation_problem([(name, "v")], FORBIDDEN)
    assert problem is not None
    assert "is not a valid token" in problem


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "\x00", "a\x1fb", "a\x7f", "\x08"])
def test_obligation_values_may_not_hold_control_characters(value: str) -> None:
    problem = obligation_problem([("x-tenant", value)], FORBIDDEN)
    assert problem == "header 'x-tenant' has a control character in its value"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-tenant", "acme"),
        ("X-Tenant", "acme corp"),
        ("x-policy-version", ""),
        ("x-tab", "a\tb"),
        ("x-a.b_c~d!#$%&'*+^`|", "v"),
        ("authorization", "Bearer x"),  # not the route's credential header here
    ],
)
def test_ordinary_obligation_headers_are_allowed(name: str, value: str) -> None:
    assert obligation_problem([(name, value)], FORBIDDEN) is None


def test_empty_obligation_is_fine() -> None:
    assert obligation_problem([], FORBIDDEN) is None


# --- property -------------------------------------------------------------------------------------------------

BASE_NAMES = ["connection", "keep-alive", "te", "transfer-encoding", "upgrade", "x-a", "x-b", "accept", "trailer"]


@st.composite
def header_name(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(BASE_NAMES))
    upper = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))


@st.composite
def header_value(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from([*BASE_NAMES, "close", " ", "X-A", "X-b"]), max_size=3))
    return ",".join(tokens) if draw(st.booleans()) else draw(st.text(alphabet="abc 1", max_size=4))


HEADER_LISTS = st.lists(st.tuples(header_name(), header_value()), max_size=12)


@given(HEADER_LISTS)
def test_end_to_end_never_forwards_hop_by_hop_and_keeps_the_rest_in_order(pairs: list[tuple[str, str]]) -> None:
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    named = {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",") if t.strip()}
    out = end_to_end(headers)
    for name, _ in out:
        assert name.lower() not in HOP_BY_HOP
        assert name.lower() not in named
    expected = [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]
    assert out == expected


def test_first_field_is_the_first_of_that_name_in_any_case() -> None:
    fields = [(b"X-A", b"1"), (b"Content-TYPE", b"text/plain"), (b"content-type", b"text/html")]
    assert first_field(fields, b"content-type") == b"text/plain"
    assert first_field(fields, b"content-length") is None


@pytest.mark.parametrize(
    "pairs",
    [
        [("X-A", "1"), ("Connection", "x-a, X-B"), ("x-b", "2"), ("X-C", "3")],  # named before and after
        [("Connection", "keep-alive"), ("Keep-Alive", "5"), ("X-Keep", "k")],
        [("connection", ""), ("Connection", " , X-D ,"), ("x-d", "d"), ("X-E", "e")],
        [("X-F", "f"), ("X-G", "g")],
        [("X-H", "h"), ("Connection", " X-H "), ("X-I", "i")],  # one token, naming a field before it
        [("Connection", "close"), ("Close", "c"), ("X-J", "j")],
    ],
)
@pytest.mark.parametrize("drop", [ANSWER_DROP, HOP_BY_HOP_FIELDS | {b"x-c"}, frozenset({b"x-c"}), frozenset()])
def test_fields_in_one_pass_are_the_connection_rule_applied(
    pairs: list[tuple[str, str]], drop: frozenset[bytes]
) -> None:
    """Whatever `drop` holds (even no `connection`): the fields not in it and not named by a Connection field."""
    fields = [(n.encode(), v.encode()) for n, v in pairs]
    named = connection_named_fields(fields)
    expected = [f for f in fields if f[0].lower() not in drop | named]
    assert end_to_end_fields(fields, drop) == expected
