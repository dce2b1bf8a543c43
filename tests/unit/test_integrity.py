"""pep.integrity: targets two parsers could read differently are refused (`request_ambiguous`)."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from pep.headers import PATH_OVERRIDE
from pep.integrity import (
    alias_problem,
    body_problem,
    method_override_field,
    override_header,
    parameter_problem,
    path_problem,
    query_problem,
    request_problem,
)

AMBIGUOUS_PATHS = [
    # raw dot segments
    "/.",
    "/..",
    "/a/./b",
    "/a/../b",
    "/a/..",
    "/a/.",
    "/./a",
    "/a/b/../../../etc/passwd",
    # percent-encoded dot segments, any case, mixed with raw dots
    "/a/%2e/b",
    "/a/%2E/b",
    "/a/%2e%2e/b",
    "/a/%2E%2e/b",
    "/a/%2e%2E",
    "/a/.%2e/b",
    "/a/%2e./b",
    "/%2E%2E/secret",
    # double (and deeper) encoded dots
    "/a/%252e/b",
    "/a/%252e%252e/b",
    "/a/%252E%252E",
    "/a/.%252e/b",
    "/a/%25252e%25252e/b",
    # encoded slash and backslash, any case, double encoded
    "/a/%2f/b",
    "/a/%2F..",
    "/a%2fb",
    "/a/%5c/b",
    "/a/%5C",
    "/a/%252f/b",
    "/a/%252F",
    "/a/%255c",
    "/a/%25252f",
    # raw backslash
    "/a\\b",
    "/a/..\\b",
    "/\\",
    # NUL and control characters, raw and encoded
    "/a\x00b",
    "/a\nb",
    "/a\rb",
    "/a\tb",
    "/a\x1fb",
    "/a\x7fb",
    "/a%00b",
    "/a%0ab",
    "/a%0Ab",
    "/a%0d%0aSet-Cookie:x",
    "/a%1F",
    "/a%1f",
    "/a%7f",
    "/a%7F",
    "/a%09b",
    "/a%2500",
    # spaces, fragments, non-ASCII
    "/a b",
    "/a#frag",
    "/a/#",
    "/caf\u00e9",
    "/a/\u2025",
    "/a/\uff0e\uff0e",
    "/a\u0085",
    # not a path at all
    "",
    "a/b",
    "*",
    "http://h/a",
]

# Encoded unreserved characters and malformed escapes: refused because parsers differ on them (routing here
# on `/%61dmin`, an upstream serving `/admin`).
ENCODED_UNRESERVED_OR_MALFORMED = [
    "/a/file%2Ename",
    "/a/file%2ename",
    "/a/%2e%2e%2e",
    "/a/x%2e",
    "/a/%41",
    "/%61dmin",
    "/a/%7Euser",
    "/a/%5F",
    "/a/%30",
    "/a/%zz",
    "/a/%2",
    "/a/100%",
    "/a/%g0",
]


@pytest.mark.parametrize("path", ENCODED_UNRESERVED_OR_MALFORMED)
def test_encoded_unreserved_and_malformed_escapes_are_refused(path: str) -> None:
    assert path_problem(path) is not None


CLEAN_PATHS = [
    "/",
    "/a/b",
    "/a/b/",
    "/a/.hidden",
    "/a/..hidden",
    "/a/...",
    "/a/..../b",
    "/a/v1.2/x",
    "/a/file.tar.gz",
    "/a/%25",
    "/a/100%25done",
    "/a/%C3%A9",
    "/a/%20b",
    "/a/%3F%23",
    "/a;v=1/b",  # path parameters are the route's business: parameter_problem
    "/a/b;jsessionid=1",
    "/a/~user/!$&'()*+,=:@",
    "/mcp",
]


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS)
def test_ambiguous_paths_are_refused(path: str) -> None:
    problem = path_problem(path)
    assert problem is not None
    assert isinstance(problem, str)
    assert problem


@pytest.mark.parametrize("path", CLEAN_PATHS)
def test_clean_paths_pass(path: str) -> None:
    assert path_problem(path) is None


@pytest.mark.parametrize(
    "path",
    [
        # the hex digits of an encoded character encoded themselves: a second decode yields `.`, `/` or NUL
        "/a/%2%65/b",
        "/a/%%32%65/b",
        "/a/%%32%45%2%65",
        "/a/%252%65",
        "/a/%2%66etc",
        "/a/%%35%63",
        "/a/%%30%30",
        "/a/%%37%66",
    ],
)
def test_nested_encodings_are_refused(path: str) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["/a/..;/admin", "/a/.;x/b", "/a/%2e%2e;jsessionid=1/b", "/..;"])
def test_dot_segments_with_path_parameters_are_refused(path: str) -> None:
    """Servlet containers drop `;params` from a segment before normalising: `/..;/` is `/../` to them."""
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["/a/..%3b/b", "/a/%2e%2e%3bx/b"])
def test_encoded_path_parameter_after_dots_is_refused(path: str) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize(
    "path",
    [
        "/tools//admin",
        "//tools/admin",  # a network-path reference to URL parsers (`//host/path`): the OPA-Envoy CVE-2026-26205 shape
        "///",
        "//",
        "/tools/x//",
        "/tools/admin//",
        "/a/b//c/d",
        "/tools/;x/admin",  # `/tools//admin` to a servlet container
        "/;x",
        "/tools/;",
        "/tools//..;/admin",
    ],
)
def test_empty_segments_are_refused(path: str) -> None:
    """nginx (merge_slashes on, its default), Tomcat and Spring serve `/tools//admin` as `/tools/admin`."""
    problem = path_problem(path)
    assert problem is not None
    assert "empty" in problem or "dot" in problem


@pytest.mark.parametrize("path", ["/", "/tools/", "/tools/x/", "/tools/x;p/"])
def test_one_trailing_slash_is_not_an_empty_segment(path: str) -> None:
    assert path_problem(path) is None


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/tools;x/admin", "path parameter (;) in the path"),
        ("/tools/admin;jsessionid=1", "path parameter (;) in the path"),
        ("/tools/admin;", "path parameter (;) in the path"),
        ("/tools/admin%3bx", "percent-encoded ; in the path"),
        ("/tools/admin%3Bx", "percent-encoded ; in the path"),
        ("/tools/admin%253Bx", "percent-encoded ; in the path"),
        ("/tools/admin%3%62x", "percent-encoded ; in the path"),  # encoded hex digit: %3b after one decode
        ("/tools/admin%25%33%62", "percent-encoded ; in the path"),
    ],
)
def test_path_parameters_are_found_raw_and_encoded(path: str, problem: str) -> None:
    """Refused unless the route accepts them (Tomcat, Jetty and Spring serve `/tools;x/admin` as `/tools/admin`)."""
    assert parameter_problem(path) == problem


@pytest.mark.parametrize("path", ["/tools/admin", "/tools/a%20b", "/tools/%3F", "/", "/tools/x%25y"])
def test_paths_without_parameters(path: str) -> None:
    assert parameter_problem(path) is None


@pytest.mark.parametrize(
    "fields",
    [
        "_method=DELETE",
        "a=1&_method=DELETE",
        "a=1;_method=DELETE",
        "%5Fmethod=DELETE",
        "%5f%6d%65%74%68%6f%64=PUT",
        "_METHOD=PUT",
        "_method[]=PUT",
        ".method=PUT",  # PHP reads `.` in a name as `_`
        "+_method=PUT",  # PHP drops leading spaces
        "%20_method=PUT",
        "_method",
        "_method%00x=PUT",
    ],
)
def test_method_override_fields_are_found(fields: str) -> None:
    problem = method_override_field(fields)
    assert problem is not None
    assert problem.startswith("method-override field")


@pytest.mark.parametrize("fields", ["", "method=DELETE", "a=_method", "x_method=1", "_methods=1", "q=%5Fmethod"])
def test_other_fields_are_not_method_overrides(fields: str) -> None:
    assert method_override_field(fields) is None


def test_method_override_field_reads_any_text() -> None:
    """Found by fuzzing: a lone surrogate (undecodable input bytes) in a name must not raise."""
    assert method_override_field("\udca9=1&_method=x") is not None
    assert method_override_field("\udca9\u00e9=1") is None


def test_a_method_field_in_the_query_is_refused_on_a_post_only() -> None:
    """Rails, Laravel, Symfony and Spring take `_method` as the method of a POST, never of another method."""
    assert request_problem("POST", "/tools/x", "_method=DELETE", CIMultiDict()) is not None
    assert request_problem("GET", "/tools/x", "_method=DELETE", CIMultiDict()) is None
    assert request_problem("PUT", "/tools/x", "_method=DELETE", CIMultiDict()) is None
    assert request_problem("POST", "/tools/x", "a=1", CIMultiDict()) is None


def test_request_problem_checks_the_path_query_and_headers_in_order() -> None:
    assert request_problem("GET", "/a//b", "a=#", CIMultiDict()) == "empty path segment (//) in the path"
    assert request_problem("GET", "/a", "a=#", CIMultiDict()) == "fragment, control or non-ASCII character in the query"
    problem = request_problem("GET", "/a", "", CIMultiDict([("X-Forwarded-Uri", "/admin")]))
    assert problem == "path-override header 'x-forwarded-uri'"
    assert request_problem("GET", "/a;x", "", CIMultiDict()) is None  # parameters: after routing


@pytest.mark.parametrize(
    "name",
    [
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Original-URI",
        "X-Forwarded-Uri",
        "X-Forwarded-Path",
        "X-Envoy-Original-Path",
        "x-original-path",
        "X-Override-URL",
    ],
)
def test_path_override_headers_are_found_case_insensitively(name: str) -> None:
    problem = override_header(CIMultiDict([(name, "/tools/admin")]))
    assert problem == f"path-override header {name.lower()!r}"
    assert name.lower() in PATH_OVERRIDE


def test_percent_encoding_nested_too_deeply_is_refused() -> None:
    assert path_problem("/a/%25252521") is None  # four layers decode to `!`
    assert path_problem("/a/%2525252521") == "percent-encoding nested too deeply in the path"
    assert path_problem("/" + "%" + "25" * 4000 + "41") is not None  # bounded work, whatever the depth


def test_problem_texts_say_what_is_wrong() -> None:
    assert path_problem("/a/../b") == "dot segment in the path"
    assert path_problem("/a/%2F") == "encoded '%2f' in the path"
    assert path_problem("a") == "the path does not start with /"
    assert "backslash" in (path_problem("/a\\b") or "")


@pytest.mark.parametrize(
    "query", ["", "a=1", "a=1&b=2", "q=%2e%2e%2f", "x=%00", "a=b?c", "a=/..\\", "a=%ZZ", "a=1%3Bb=2"]
)
def test_queries_are_forwarded_as_sent(query: str) -> None:
    assert query_problem(query) is None


@pytest.mark.parametrize("query", [";", "a=1;b=2", "tenant=acme&x=1;tenant=evil", "fields=a;b", "a;"])
def test_a_raw_semicolon_in_the_query_is_refused(query: str) -> None:
    """Rack 2 and old Python read `;` as `&`, Go drops the field, the policy input keeps it as data."""
    assert query_problem(query) == "a ; in the query (some upstreams split fields there)"


@pytest.mark.parametrize("query", ["a=#b", "#", "a= b", "a=\x00", "a=\r\n", "a=\x7f", "a=\u00e9", "a=\t"])
def test_queries_with_unsendable_characters_are_refused(query: str) -> None:
    assert query_problem(query) is not None


@pytest.mark.parametrize(
    "name", ["x-http-method-override", "X-HTTP-Method-Override", "x-http-method", "X-Method-Override"]
)
def test_method_override_headers_are_found_case_insensitively(name: str) -> None:
    headers: CIMultiDict[str] = CIMultiDict([("Accept", "*/*"), (name, "DELETE")])
    problem = override_header(headers)
    assert problem is not None
    assert name.lower() in problem


def test_no_override_header() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        [("Accept", "*/*"), ("X-HTTP-Method-Overrides", "x"), ("X-Method", "DELETE"), ("Method", "PUT")]
    )
    assert override_header(headers) is None
    assert override_header(CIMultiDict()) is None
    assert override_header({"x-http-method"}) is not None  # any container of lower-case names


# --- property -------------------------------------------------------------------------------------------------

# Tokens that build the tricky segments: dots, percent signs, and the hex digits of `.`, `/`, `\` and NUL,
# themselves percent-encoded (`%32` is `2`, `%65` is `e`, `%66` is `f`, `%35` is `5`, `%63` is `c`).
TOKENS = st.sampled_from(
    [
        ".",
        "..",
        "%",
        "%25",
        "2",
        "e",
        "E",
        "f",
        "5",
        "c",
        "0",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%00",
        "%32",
        "%35",
        "%30",
        "%65",
        "%45",
        "%66",
        "%63",
        "%41",
        "a",
        "x",
        ";",
        "\\",
    ]
)
TOKEN_SEGMENT = st.lists(TOKENS, min_size=0, max_size=6).map("".join)


@st.composite
def nested_segment(draw: st.DrawFn) -> str:
    """A dangerous or harmless segment percent-encoded 0-3 times, each time only some characters (any case)."""
    segment = draw(st.sampled_from([".", "..", "/", "\\", "\x00", "a.", ".a", "...", "a/b"]))
    for _ in range(draw(st.integers(0, 3))):
        segment = "".join(f"%{ord(c):02{draw(st.sampled_from('xX'))}}" if draw(st.booleans()) else c for c in segment)
    return segment


SEGMENT = st.one_of(TOKEN_SEGMENT, nested_segment())
PATH = st.lists(SEGMENT, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs))


def fully_decoded(segment: str) -> str:
    while (decoded := unquote(segment)) != segment:
        segment = decoded
    return segment


@given(PATH)
@example("/a/%2%65")
@example("/a/%%32%65%%32%65")
@example("/a/%2%66")
@example("/a/%252%65/b")
def test_accepted_paths_never_decode_to_dot_segments_or_separators(path: str) -> None:
    if path_problem(path) is not None:
        return
    for segment in path.split("/"):
        decoded = fully_decoded(segment)
        assert decoded not in (".", ".."), (path, segment)
        assert "/" not in decoded, (path, segment)
        assert "\\" not in decoded, (path, segment)
        assert "\x00" not in decoded, (path, segment)


@given(st.text(max_size=20))
def test_any_text_gets_an_answer(path: str) -> None:
    problem = path_problem("/" + path)
    assert problem is None or isinstance(problem, str)
    assert query_problem(path) is None or isinstance(query_problem(path), str)


@pytest.mark.parametrize("method", ["GET", "HEAD", "TRACE"])
def test_a_body_on_a_method_without_content_semantics_is_ambiguous(method: str) -> None:
    assert body_problem(method, True) is not None
    assert body_problem(method, False) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_a_body_on_other_methods_is_theirs(method: str) -> None:
    assert body_problem(method, True) is None


def test_another_spelling_of_a_field_the_pep_acts_on_is_ambiguous() -> None:
    for name in ("X_Forwarded_For", "x_request_id", "Transfer_Encoding", "X_HTTP_Method_Override", "Mcp_Name"):
        assert alias_problem([name]) is not None, name
    assert alias_problem(["X_Api_Key"], frozenset({"x-api-key"})) is not None  # a route's own (its credential)
    assert alias_problem(["X_Custom", "X-Forwarded-For", "Accept"]) is None
