"""pep.routing: whole-segment longest-prefix matching and the exact upstream URL of a request."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.config import RouteConfig
from pep.routing import Route, RouteTable


def cfg(name: str, prefix: str, upstream: str = "http://127.0.0.1:9000", strip: bool = False) -> RouteConfig:
    return RouteConfig(name=name, path_prefix=prefix, upstream=upstream, strip_prefix=strip)


def route(prefix: str, upstream: str = "http://127.0.0.1:9000", strip: bool = False) -> Route:
    return Route.build(cfg("r", prefix, upstream, strip))


def matched(table: RouteTable, path: str) -> str | None:
    found = table.match(path)
    return None if found is None else found.name


# --- matching -------------------------------------------------------------------------------------------------


def test_longest_prefix_wins_whatever_the_config_order() -> None:
    routes = (cfg("root", "/"), cfg("api", "/api"), cfg("api-v2", "/api/v2"), cfg("api-v2-admin", "/api/v2/admin"))
    for order in (routes, tuple(reversed(routes))):
        table = RouteTable(order)
        assert matched(table, "/api/v2/admin/users") == "api-v2-admin"
        assert matched(table, "/api/v2/adminx") == "api-v2"
        assert matched(table, "/api/v2") == "api-v2"
        assert matched(table, "/api/v1") == "api"
        assert matched(table, "/apis") == "root"
        assert matched(table, "/") == "root"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/mcp", True),
        ("/mcp/", True),
        ("/mcp/x", True),
        ("/mcp/x/y?z", True),
        ("/mcpx", False),
        ("/mcp.json", False),
        ("/mc", False),
        ("/MCP", False),  # paths are case-sensitive
        ("/%6dcp", False),  # nothing is decoded
        ("/x/mcp", False),
        ("", False),
    ],
)
def test_prefix_without_trailing_slash_matches_whole_segments(path: str, expected: bool) -> None:
    assert route("/mcp").matches(path) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/crm/", True), ("/crm/x", True), ("/crm//x", True), ("/crm", False), ("/crmx", False), ("/crm.x", False)],
)
def test_prefix_with_trailing_slash(path: str, expected: bool) -> None:
    assert route("/crm/").matches(path) is expected


def test_root_prefix_matches_every_path() -> None:
    r = route("/")
    assert all(r.matches(p) for p in ("/", "/a", "/a/b", "//"))


def test_no_match_is_none() -> None:
    table = RouteTable((cfg("mcp", "/mcp"), cfg("crm", "/crm/")))
    assert table.match("/other") is None
    assert table.match("/mcpx") is None
    assert table.match("/crm") is None
    assert table.match("/") is None


def test_trailing_slash_and_bare_prefix_routes_coexist() -> None:
    table = RouteTable((cfg("bare", "/crm"), cfg("slash", "/crm/")))
    assert matched(table, "/crm") == "bare"
    assert matched(table, "/crm/x") == "slash"


def test_route_precomputes_header_sets() -> None:
    r = route("/x")
    assert "authorization" in r.request_drop
    assert "x-pep-decision-id" in r.request_drop
    assert "authorization" in r.policy_drop
    assert "host" in r.obligation_forbidden
    kept = Route.build(
        RouteConfig(name="k", path_prefix="/k", upstream="http://h", keep_caller_credentials=True)
    ).request_drop
    assert "authorization" not in kept
    assert "x-pep-decision-id" in kept


# --- upstream URLs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "prefix", "strip", "path", "query", "expected"),
    [
        # without strip_prefix: the whole request path is appended
        ("http://127.0.0.1:9000", "/tools", False, "/tools/search", "", "http://127.0.0.1:9000/tools/search"),
        ("http://127.0.0.1:9000/", "/tools", False, "/tools/search", "", "http://127.0.0.1:9000/tools/search"),
        ("http://h/api", "/tools", False, "/tools/search", "", "http://h/api/tools/search"),
        ("http://h/api/", "/tools", False, "/tools/search", "", "http://h/api/tools/search"),
        ("http://h/api/", "/tools", False, "/tools", "", "http://h/api/tools"),
        # with strip_prefix: only the rest, joined with exactly one slash
        (
            "https://crm.internal:8443/api/",
            "/crm/",
            True,
            "/crm/tickets/42",
            "",
            "https://crm.internal:8443/api/tickets/42",
        ),
        (
            "https://crm.internal:8443/api",
            "/crm/",
            True,
            "/crm/tickets/42",
            "",
            "https://crm.internal:8443/api/tickets/42",
        ),
        ("http://h/api/", "/crm", True, "/crm/tickets", "", "http://h/api/tickets"),
        ("http://h/api", "/crm", True, "/crm/tickets", "", "http://h/api/tickets"),
        ("http://h", "/crm/", True, "/crm/x", "", "http://h/x"),
        ("http://h/api", "/crm", True, "/crm/", "", "http://h/api/"),
        ("http://h/api/", "/crm", True, "/crm/", "", "http://h/api/"),
        ("http://h/api", "/", True, "/a/b", "", "http://h/api/a/b"),
        # an empty remainder leaves the upstream exactly as written
        ("http://127.0.0.1:9000/mcp", "/mcp", True, "/mcp", "", "http://127.0.0.1:9000/mcp"),
        ("http://127.0.0.1:9000/mcp/", "/mcp", True, "/mcp", "", "http://127.0.0.1:9000/mcp/"),
        ("http://h/api/", "/crm/", True, "/crm/", "", "http://h/api/"),
        ("http://h", "/crm/", True, "/crm/", "", "http://h"),
        # the query as sent
        ("http://127.0.0.1:9000/mcp", "/mcp", True, "/mcp", "a=1&b=%20", "http://127.0.0.1:9000/mcp?a=1&b=%20"),
        ("http://h/api", "/crm", True, "/crm/x", "q=a+b&q=%2F&&x", "http://h/api/x?q=a+b&q=%2F&&x"),
        ("http://h", "/t", False, "/t/x", "=", "http://h/t/x?="),
        # nothing decoded or normalised
        ("http://h/api", "/crm", True, "/crm/%41/b%2Ec", "", "http://h/api/%41/b%2Ec"),
        ("http://h/api", "/crm", False, "/crm/%41", "x=%41", "http://h/api/crm/%41?x=%41"),
        ("http://h/api/", "/crm", True, "/crm//x", "", "http://h/api//x"),
        ("http://h/api", "/crm", True, "/crm/a;b=c/D", "", "http://h/api/a;b=c/D"),
    ],
)
def test_upstream_url(upstream: str, prefix: str, strip: bool, path: str, query: str, expected: str) -> None:
    r = route(prefix, upstream, strip)
    assert r.matches(path)
    assert r.upstream_url(path, query) == expected


def test_table_match_then_upstream_url() -> None:
    table = RouteTable(
        (
            cfg("all", "/", "http://default"),
            cfg("mcp", "/mcp", "http://127.0.0.1:9000/mcp", strip=True),
        )
    )
    found = table.match("/mcp/tools")
    assert found is not None
    assert found.upstream_url("/mcp/tools", "") == "http://127.0.0.1:9000/mcp/tools"
    found = table.match("/mcpx")
    assert found is not None
    assert found.upstream_url("/mcpx", "") == "http://default/mcpx"


# --- property -------------------------------------------------------------------------------------------------

SEGMENT = st.text(alphabet="abcXYZ019-._~%;=:@!$&'()*+,", min_size=0, max_size=6)
SEGMENTS = st.lists(SEGMENT, min_size=0, max_size=5)
PREFIX = st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=0, max_size=3)
UPSTREAM = st.sampled_from(
    ["http://127.0.0.1:9000", "http://127.0.0.1:9000/", "http://h/api", "http://h/api/", "https://h:8443/a/b/"]
)
QUERY = st.text(alphabet="ab=&%2F+", max_size=6)


@given(
    upstream=UPSTREAM,
    prefix_parts=PREFIX,
    trailing=st.booleans(),
    rest=SEGMENTS,
    strip=st.booleans(),
    query=QUERY,
)
def test_upstream_path_ends_with_the_remainder_unchanged(
    upstream: str, prefix_parts: list[str], trailing: bool, rest: list[str], strip: bool, query: str
) -> None:
    prefix = "/" + "/".join(prefix_parts)
    if trailing and not prefix.endswith("/"):
        prefix += "/"
    path = prefix.rstrip("/") + "/" + "/".join(rest) if rest else prefix
    r = route(prefix, upstream, strip)
    assert r.matches(path)
    url = r.upstream_url(path, query)
    remainder = path[len(prefix) :] if strip else path
    base, sep, got_query = url.partition("?")
    assert got_query == query
    assert bool(sep) == bool(query)
    if not remainder:
        assert base == upstream
        return
    assert base.startswith(upstream.rstrip("/"))
    assert base.endswith(remainder)
    # exactly one slash at the join
    joined = base[len(upstream.rstrip("/")) :]
    assert joined == remainder if remainder.startswith("/") else joined == "/" + remainder
    # the path part of the URL is the upstream's path plus the remainder, nothing decoded
    assert urlsplit(url).path.endswith(remainder)
