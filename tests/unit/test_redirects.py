"""pep.redirects: an upstream's own address in `Location`, `Content-Location`, `Refresh` or a `Link` target becomes
the route's path on the PEP (nginx's `proxy_redirect default`), another route's upstream that route's path; other
origins and relative references are left alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from pep.config import RouteConfig
from pep.redirects import public_reference, public_value, rewrite
from pep.routing import Route, RouteTable

UP = "http://127.0.0.1:9000"


def route(upstream: str, prefix: str, strip: bool) -> Route:
    return Route.build(RouteConfig(name="r", path_prefix=prefix, upstream=upstream, strip_prefix=strip))


MCP = route(f"{UP}/mcp", "/mcp", True)
CRM = route("https://crm.internal:8443/api/", "/crm/", True)
TOOLS = route(UP, "/tools", False)
NESTED = route(f"{UP}/base", "/tools", False)


@pytest.mark.parametrize(
    ("r", "value", "expected"),
    [
        # the upstream's origin, under its path: the route's path on the PEP
        (MCP, f"{UP}/mcp/", "/mcp/"),
        (MCP, f"{UP}/mcp", "/mcp"),
        (MCP, f"{UP}/mcp/s/1?a=b#f", "/mcp/s/1?a=b#f"),
        (MCP, "HTTP://127.0.0.1:9000/mcp/x", "/mcp/x"),  # scheme and host case
        (CRM, "https://crm.internal:8443/api/tickets/7", "/crm/tickets/7"),
        (CRM, "https://CRM.internal/api/x", "https://CRM.internal/api/x"),  # another port: another origin
        (CRM, "https://crm.internal:8443/api", "/crm/"),
        (route("https://crm.internal/api", "/crm", True), "https://crm.internal:443/api/x", "/crm/x"),  # default port
        (TOOLS, f"{UP}/tools/new", "/tools/new"),
        (TOOLS, f"{UP}/", "/"),
        (NESTED, f"{UP}/base/tools/x", "/tools/x"),
        (route(UP, "/mcp", True), f"{UP}/x", "/mcp/x"),
        (route(UP, "/", True), f"{UP}/x", "/x"),
        (MCP, "//127.0.0.1:9000/mcp/x", "/mcp/x"),  # a network-path reference to the upstream
        # the upstream's origin outside its path: the origin goes, the path stays (the PEP decides it)
        (MCP, f"{UP}/admin", "/admin"),
        (NESTED, f"{UP}/other", "/other"),
        # a path on the upstream: mapped when a PEP path leads there, else left (it names no address)
        (MCP, "/mcp/x", "/mcp/x"),
        (route(UP, "/mcp", True), "/x", "/mcp/x"),
        (NESTED, "/base/y", "/y"),
        (NESTED, "/elsewhere", "/elsewhere"),
        # not the upstream: left as it is
        # the upstream's host and port under another scheme (an app redirecting to https on the Host it was sent)
        (MCP, "https://127.0.0.1:9000/mcp/x", "/mcp/x"),
        (MCP, "ws://127.0.0.1:9000/mcp/x", "/mcp/x"),
        (route("http://svc.internal/api", "/api", True), "https://svc.internal/api/x", "/api/x"),  # both defaults
        (route("http://svc.internal/api", "/api", True), "https://SVC.internal.:443/api/x", "/api/x"),
        (route("http://bücher.internal/api", "/api", True), "https://xn--bcher-kva.internal/api/x", "/api/x"),
        (route("http://svc.internal/api", "/api", True), "https://svc.internal:8443/x", "https://svc.internal:8443/x"),
        (CRM, "http://crm.internal:8443/api/x", "/crm/x"),
        (CRM, "http://crm.internal/api/x", "http://crm.internal/api/x"),  # port 80: not the upstream's
        (MCP, "http://127.0.0.1:9001/mcp/x", "http://127.0.0.1:9001/mcp/x"),
        (MCP, "https://login.example/authorize?x=1", "https://login.example/authorize?x=1"),
        (MCP, "next", "next"),
        (MCP, "../x", "../x"),
        (MCP, "mailto:a@example.com", "mailto:a@example.com"),
        (MCP, "http://127.0.0.1:notaport/x", "http://127.0.0.1:notaport/x"),
    ],
)
def test_public_reference(r: Route, value: str, expected: str) -> None:
    assert public_reference(value, r) == expected


def test_every_header_that_can_carry_the_address() -> None:
    headers = CIMultiDict(
        [
            ("Location", f"{UP}/mcp/a"),
            ("Content-Location", f"{UP}/mcp/b"),
            ("Refresh", f"5; url={UP}/mcp/c"),
            ("Refresh", f"0;URL='{UP}/mcp/d'"),
            ("Refresh", "10"),
            ("Link", "<https://other.example/x>; rel=next"),
            ("Link", f'<{UP}/mcp/e>; rel="next", <https://other.example/y>; title="a, <{UP}/q>", <{UP}/mcp/f>'),
            ("X-Other", f"{UP}/mcp/kept"),  # not a URL header of HTTP: not touched
        ]
    )
    fields = [(n.encode(), v.encode()) for n, v in headers.items()]
    out = rewrite(fields, MCP)
    headers = CIMultiDict((n.decode(), v.decode()) for n, v in out)
    assert [n for n, _ in out] == [n for n, _ in fields]  # in place, in order
    assert rewrite(fields[-1:], MCP) == fields[-1:]  # nothing to rewrite: the fields as they came
    assert rewrite(fields[-3:-2], MCP) == fields[-3:-2]
    assert headers.getall("Location") == ["/mcp/a"]
    assert headers.getall("Content-Location") == ["/mcp/b"]
    assert headers.getall("Refresh") == ["5; url=/mcp/c", "0;URL='/mcp/d'", "10"]
    # Each link's target, not what a quoted parameter says.
    assert headers.getall("Link") == [
        "<https://other.example/x>; rel=next",
        f'</mcp/e>; rel="next", <https://other.example/y>; title="a, <{UP}/q>", </mcp/f>',
    ]
    assert headers["X-Other"] == f"{UP}/mcp/kept"


@given(
    st.sampled_from([MCP, CRM, TOOLS, NESTED, route(UP, "/", True), route(f"{UP}/a/", "/p/", False)]),
    st.lists(st.text(alphabet="abz09-._~", min_size=1, max_size=5), max_size=4),
    st.booleans(),
)
def test_a_forwarded_url_maps_back_to_the_path_the_agent_called(r: Route, segments: list[str], slash: bool) -> None:
    prefix = r.prefix.rstrip("/")
    path = prefix + "".join(f"/{s}" for s in segments) + ("/" if slash and segments else "")
    path = path or "/"
    if not r.matches(path):
        return
    assert public_reference(r.upstream_url(path, ""), r) == path


def test_a_url_naming_another_routes_upstream_gets_that_routes_path() -> None:
    table = RouteTable(
        (
            RouteConfig(name="api", path_prefix="/api", upstream=f"{UP}/v2", strip_prefix=True),
            RouteConfig(
                name="files", path_prefix="/files", upstream="http://files.internal:8080/store", strip_prefix=True
            ),
            RouteConfig(
                name="egress", host="files.internal:8081", path_prefix="/", upstream="http://files.internal:8081"
            ),
            RouteConfig(
                name="tunnel", host="db.internal:5432", path_prefix="/", upstream="http://db.internal:5432", tunnel=True
            ),
            # forward-proxy routes to an address of their own: the agent knows them by their host alone
            RouteConfig(name="gateway", host="api.example.test", path_prefix="/", upstream="http://gw.internal:8080"),
            RouteConfig(name="v6", host="[::1]:8081", path_prefix="/v1", upstream="http://v6.internal/base"),
        )
    )
    api = next(r for r in table.routes if r.name == "api")
    assert public_reference("http://files.internal:8080/store/a?x=1#f", api) == "/files/a?x=1#f"
    assert public_reference("http://FILES.internal:8080/elsewhere", api) == "/elsewhere"  # the origin goes
    # A forward-proxy route is reached by that very host: its URL is the one the agent should follow.
    assert public_reference("http://files.internal:8081/x", api) == "http://files.internal:8081/x"
    assert public_reference("http://db.internal:5432/x", api) == "http://db.internal:5432/x"  # a tunnel: no URL
    assert public_reference("https://login.example/a", api) == "https://login.example/a"  # no route's upstream
    assert public_reference(f"{UP}/v2/y", api) == "/api/y"  # its own first
    # ... but one whose upstream is another address: the URL the agent reaches it by, through HTTP_PROXY.
    assert public_reference("http://gw.internal:8080/v1/x?q#f", api) == "http://api.example.test/v1/x?q#f"
    assert public_reference("https://gw.internal:8080/x", api) == "http://api.example.test/x"
    assert public_reference("http://v6.internal/base/v1/y", api) == "http://[::1]:8081/v1/y"
    assert public_reference("http://v6.internal/other", api) == "http://[::1]:8081/other"
    # Another route's host and port under another scheme is that route's address all the same.
    assert public_reference("https://files.internal:8080/store/b", api) == "/files/b"


def test_an_origin_named_exactly_wins_over_one_named_by_address() -> None:
    table = RouteTable(
        (
            RouteConfig(name="plain", path_prefix="/plain", upstream="http://svc.internal", strip_prefix=True),
            RouteConfig(name="tls", path_prefix="/tls", upstream="https://svc.internal", strip_prefix=True),
        )
    )
    plain = next(r for r in table.routes if r.name == "plain")
    assert public_reference("https://svc.internal/x", plain) == "/tls/x"
    assert public_reference("http://svc.internal/x", plain) == "/plain/x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"5; url={UP}/mcp/c", "5; url=/mcp/c"),
        (f"0;URL='{UP}/mcp/d'", "0;URL='/mcp/d'"),
        (f"0, {UP}/mcp/e", "0, /mcp/e"),
        ("10", "10"),
        # as browsers read it (HTML's declarative refresh): whitespace alone may separate the delay from the URL,
        (f"0 url={UP}/mcp/f", "0 url=/mcp/f"),
        (f"1.5\t{UP}/mcp/g", "1.5\t/mcp/g"),
        # a quote need not be closed, and what follows a closing one is not part of the URL
        (f'0; url="{UP}/mcp/h', '0; url="/mcp/h'),
        (f"0; url='{UP}/mcp/i' ignored", "0; url='/mcp/i' ignored"),
        (f"0;url = {UP}/mcp/j  ", "0;url = /mcp/j"),
        ("0x; url=http://127.0.0.1:9000/mcp/k", "0x; url=http://127.0.0.1:9000/mcp/k"),  # not a refresh: ignored
    ],
)
def test_refresh_urls_are_read_as_browsers_read_them(value: str, expected: str) -> None:
    assert public_value("refresh", value, MCP) == expected
