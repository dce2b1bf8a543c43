"""pep.routing: whole-segment longest-prefix matching and the exact upstream URL of a request."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.config import RouteConfig
from pep.integrity import path_problem
from pep.routing import Route, RouteTable


def cfg(name: str, prefix: str, upstream: str = "http://127.0.0.1:9000", strip: bool = False) -> RouteConfig:
    return RouteConfig(name=name, path_prefix=prefix, upstream=upstream, strip_prefix=strip)


def route(prefix: str, upstream: str = "http://127.0.0.1:9000", strip: bool = False) -> Route:
    return Route.build(cfg("r", prefix, upstream, strip))


def matched(table: RouteTable, path: str, authority: str | None = None, scheme: str = "http") -> str | None:
    found = table.match(path, authority, scheme)
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


# --- host matching (forward-proxy mode) -------------------------------------------------------------------------


def hcfg(
    name: str, host: str | None, prefix: str = "/", upstream: str = "http://u", tunnel: bool = False
) -> RouteConfig:
    return RouteConfig(name=name, path_prefix=prefix, upstream=upstream, host=host, tunnel=tunnel)


@pytest.mark.parametrize(
    ("route_host", "authority", "scheme", "expected"),
    [
        ("api.example.com", "api.example.com", "http", True),
        ("api.example.com", "API.Example.COM", "http", True),  # case-insensitive
        ("API.example.com", "api.example.com", "http", True),
        ("api.example.com", "api.example.com:80", "http", True),  # the default port is implied
        ("api.example.com:80", "api.example.com", "http", True),
        ("api.example.com", "api.example.com:443", "https", True),
        ("api.example.com", "api.example.com:443", "http", False),
        ("api.example.com", "api.example.com:8080", "http", False),
        ("api.example.com:8080", "api.example.com:8080", "http", True),
        ("api.example.com:8080", "api.example.com", "http", False),
        ("api.example.com", "api.example.com.evil", "http", False),
        ("api.example.com", "evil.api.example.com", "http", False),
        ("api.example.com", "xapi.example.com", "http", False),
        ("api.example.com", "api.example.com/x", "http", False),  # not an authority
        ("api.example.com", "user@api.example.com", "http", False),
        ("api.example.com", None, "http", False),  # no Host: host routes never match
        ("[::1]:8080", "[::1]:8080", "http", True),
        ("127.0.0.1:9000", "127.0.0.1:9000", "http", True),
        ("127.0.0.1:9000", "127.0.0.1:9001", "http", False),
    ],
)
def test_host_route_matches_authority(route_host: str, authority: str | None, scheme: str, expected: bool) -> None:
    table = RouteTable((hcfg("h", route_host),))
    assert (matched(table, "/any/path", authority, scheme) == "h") is expected


def test_longest_prefix_first_then_host() -> None:
    routes = (
        hcfg("any-root", None),
        hcfg("api-root", "api.example.com"),
        hcfg("any-v1", None, "/v1"),
        hcfg("api-v1", "api.example.com", "/v1"),
        hcfg("other-v1-admin", "other.example", "/v1/admin"),
    )
    for order in (routes, tuple(reversed(routes))):
        table = RouteTable(order)
        assert matched(table, "/x", "api.example.com") == "api-root"
        assert matched(table, "/x", "other.example") == "any-root"
        assert matched(table, "/x", None) == "any-root"
        assert matched(table, "/v1/x", "api.example.com") == "api-v1"
        assert matched(table, "/v1/x", "other.example") == "any-v1"
        assert matched(table, "/v1/admin", "other.example") == "other-v1-admin"
        # A longer prefix without host wins over a host route with a shorter prefix.
        assert matched(table, "/v1/admin", "api.example.com") == "api-v1"


def test_host_routes_only_no_route_for_other_hosts() -> None:
    table = RouteTable((hcfg("api", "api.example.com"),))
    assert matched(table, "/", "api.example.com") == "api"
    assert matched(table, "/", "api.example.org") is None
    assert matched(table, "/", "") is None


def tunnel_name(table: RouteTable, authority: str) -> str | None:
    found = table.tunnel(authority)
    return None if found is None else found.name


def test_tunnel_needs_a_tunnel_route_with_that_host_and_port() -> None:
    table = RouteTable(
        (
            hcfg("plain", "plain.example:443", upstream="https://plain.example"),
            hcfg("api", "api.example.com", upstream="https://api.example.com", tunnel=True),
            hcfg("local", "127.0.0.1:9000", upstream="http://127.0.0.1:9000", tunnel=True),
            hcfg("any", None),
        )
    )
    assert tunnel_name(table, "api.example.com:443") == "api"  # no port on the route: 443
    assert tunnel_name(table, "API.EXAMPLE.COM:443") == "api"
    assert tunnel_name(table, "api.example.com:80") is None
    assert tunnel_name(table, "api.example.com") is None  # CONNECT needs a port
    assert tunnel_name(table, "plain.example:443") is None  # tunnel: false
    assert tunnel_name(table, "127.0.0.1:9000") == "local"
    assert tunnel_name(table, "127.0.0.1:9001") is None
    assert tunnel_name(table, "evil.example:443") is None
    assert tunnel_name(table, "/x") is None
    found = table.tunnel("api.example.com:443")
    assert found is not None
    assert found.tunnel_target == "api.example.com:443"
    local = table.tunnel("127.0.0.1:9000")
    assert local is not None
    assert local.tunnel_target == "127.0.0.1:9000"


@given(
    upstream=UPSTREAM,
    prefix_parts=PREFIX,
    trailing=st.booleans(),
    rest=SEGMENTS,
    strip=st.booleans(),
)
def test_an_accepted_path_gives_an_upstream_path_without_empty_or_dot_segments(
    upstream: str, prefix_parts: list[str], trailing: bool, rest: list[str], strip: bool
) -> None:
    """With the whole path, or a strip_prefix remainder, joined to any upstream the config accepts: what the
    integrity checks let through stays free of `//`, `/;` and dot segments in the URL the upstream reads."""
    prefix = "/" + "/".join(prefix_parts)
    if trailing and not prefix.endswith("/"):
        prefix += "/"
    path = prefix.rstrip("/") + "/" + "/".join(rest) if rest else prefix
    if path_problem(path) is not None:
        return
    r = route(prefix, upstream, strip)
    forwarded = urlsplit(r.upstream_url(path, "")).path
    assert "//" not in forwarded, (path, forwarded)
    assert "/;" not in forwarded, (path, forwarded)
    assert not any(seg in (".", "..") for seg in forwarded.split("/")), (path, forwarded)
