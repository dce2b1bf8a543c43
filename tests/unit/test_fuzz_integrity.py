"""Request integrity for any path, query, header set and authority, against fuzz/oracles.py (the invariants the
atheris harness fuzz/fuzz_integrity.py checks too).

Paths are built from the pieces that make encodings ambiguous (`%`, hex digits, encoded percents, dots, `;`,
separators, control and non-ASCII characters), so most examples land near the boundary. The oracle decodes each
segment byte by byte, as often as an upstream might (up to 4 rounds), and requires that an accepted path shows
no dot segment, no separator and no control character at any layer.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from fuzz.oracles import (
    PATH_OVERRIDES,
    check_authority,
    check_method_field,
    check_override,
    check_parameters,
    check_path,
    check_query,
    examples,
)
from pep.authority import format_authority, resolve_authority, split_authority
from pep.integrity import (
    bearer_token_field,
    method_override_field,
    override_header,
    parameter_problem,
    path_problem,
    query_problem,
)

PIECES = st.sampled_from(
    [
        "%",
        "%25",
        "%2",
        "2",
        "5",
        "e",
        "E",
        "f",
        "F",
        "c",
        "3",
        "6",
        "0",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%5C",
        "%00",
        "%0a",
        "%1f",
        "%7f",
        "%3b",
        "%3B",
        "%253b",
        "%3%62",
        "",
        "%41",
        "%c0%ae",
        "%e2%80%ae",
        "%%32%65",
        "%25%32%65",
        ".",
        "..",
        ";",
        ";x",
        "/",
        "\\",
        "#",
        "a",
        "Z",
        "~",
        "-",
        "\x00",
        "\x7f",
        " ",
        "é",
    ]
)
SEGMENT = st.lists(PIECES, max_size=6).map("".join) | st.text(alphabet="%25eEfFc.;/a\\", max_size=8)
PATH = st.lists(SEGMENT, min_size=1, max_size=4).map(lambda segments: "/" + "/".join(segments))


@settings(max_examples=examples(1000))
@given(PATH)
@example("/a/%2%65")
@example("/a/%%32%65%%32%65")
@example("/a/%252%65/b")
@example("/a/%25252e%25252e/b")
@example("/a/%2525252e/b")
@example("/a/..;x/b")
@example("/a/%2e%2e%3bx/b")
@example("/%25%25%32%65")
@example("/a//b")
@example("//a")
@example("/a/;x/b")
@example("/a/%3%62")
def test_an_accepted_path_decodes_to_no_dot_segment_separator_or_control(path: str) -> None:
    problem = path_problem(path)
    check_path(path, problem)
    if problem is None:
        check_parameters(path, parameter_problem(path))


@settings(max_examples=examples(200))
@given(st.text(max_size=24))
def test_any_text_as_a_path(text: str) -> None:
    check_path("/" + text, path_problem("/" + text))
    check_path(text, path_problem(text))


@settings(max_examples=examples(200))
@given(st.text(max_size=16) | st.lists(PIECES, max_size=6).map("".join))
def test_an_accepted_query_is_visible_ascii_without_a_fragment(query: str) -> None:
    check_query(query, query_problem(query))


OVERRIDES = ["x-http-method-override", "x-http-method", "x-method-override", *sorted(PATH_OVERRIDES)]


@st.composite
def header_names(draw: st.DrawFn) -> list[str]:
    names = draw(
        st.lists(st.sampled_from([*OVERRIDES, "x-http", "x-original", "accept", "x-rewrite-urls"]), max_size=4)
    )
    return ["".join(c.upper() if draw(st.booleans()) else c for c in n) for n in names]


@given(header_names())
def test_override_headers_are_refused_in_any_case(names: list[str]) -> None:
    check_override(names, override_header(CIMultiDict((n, "v") for n in names)))


FIELD_PIECES = st.sampled_from(
    ["_method", "_", "method", "%5F", "%5f", "%6D", "METHOD", ".", "+", " ", "%20", "[", "]", "=", "&", ";", "%00", "a"]
)


@settings(max_examples=examples(500))
@given(st.lists(FIELD_PIECES, max_size=8).map("".join))
@example("_method=DELETE")
@example("a=1&%5Fmethod=PUT")
@example("a=1;_method=PUT")
@example(".method=PUT")
@example("+_method=PUT")
@example("_method[]=PUT")
@example("_method%00x=PUT")
def test_a_method_override_field_is_found_however_it_is_spelled(fields: str) -> None:
    check_method_field(fields, method_override_field(fields))


TOKEN_PIECES = st.sampled_from(
    ["access_token", "access", "_", "token", "%5F", "%61", "%74", "ACCESS", ".", "+", " ", "[", "]", "=", "&", ";", "a"]
)


@settings(max_examples=examples(500))
@given(st.lists(TOKEN_PIECES, max_size=8).map("".join))
@example("access_token=x")
@example("a=1&%61ccess_token=x")
@example("a=1;access_token=x")
@example("access.token=x")
@example("Access_Token[]=x")
@example("token=x&access=y")
def test_a_bearer_token_field_is_found_however_it_is_spelled(fields: str) -> None:
    check_method_field(fields, bearer_token_field(fields), "access_token")


AUTHORITY = st.lists(
    st.sampled_from(["a", "Example", ".", "-", "_", "[", "]", ":", "::1", "0", "443", "65535", "65536", "@", "/", " "]),
    max_size=6,
).map("".join)


@given(AUTHORITY, st.sampled_from([None, 80, 443]))
def test_authorities_split_into_lower_case_hosts_and_ports_in_range(text: str, default_port: int | None) -> None:
    check_authority(
        text,
        split_authority(text),
        resolve_authority(text, default_port),
        default_port,
        format_authority,
        split_authority,
    )


@pytest.mark.parametrize("path", ["/%2561dmin/users", "/api/x%2541", "/%252561dmin"])
def test_an_unreserved_character_behind_an_encoded_percent_is_refused(path: str) -> None:
    assert path_problem(path) is not None
