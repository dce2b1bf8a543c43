"""Redirects through a running PEP with httpx: the upstream's own address never reaches the agent, and following a
redirect goes through the PEP (decided again), never around it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.loopback import LoopbackServer


@dataclass
class RedirectingUpstream(LoopbackServer):
    """An aiohttp app under /v2 that answers with its own absolute address, as frameworks do."""

    port: int = 0
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, X-PEP-Decision-ID)
    elsewhere_to: str = "https://login.example/authorize?client=pep"  # where /v2/elsewhere redirects

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def record(request: web.Request) -> None:
            self.seen.append((request.path_qs, request.headers.get("X-PEP-Decision-ID")))

        async def old(request: web.Request) -> web.Response:
            await record(request)
            raise web.HTTPFound(f"{self.origin}/v2/new?x=1")

        async def new(request: web.Request) -> web.Response:
            await record(request)
            return web.json_response({"new": True})

        async def create(request: web.Request) -> web.StreamResponse:
            await record(request)
            response = web.StreamResponse(
                status=201,
                headers={
                    "Location": f"{self.origin}/v2/items/7",
                    "Content-Location": f"{self.origin}/v2/items/7",
                    "Refresh": f"0; url={self.origin}/v2/new",
                },
            )
            await response.prepare(request)  # streamed: no Content-Length, the relayed path
            await response.write(b'{"id": 7}')
            await response.write_eof()
            return response

        async def elsewhere(request: web.Request) -> web.Response:
            await record(request)
            raise web.HTTPFound(self.elsewhere_to)

        async def outside(request: web.Request) -> web.Response:
            await record(request)
            raise web.HTTPFound(f"{self.origin}/admin")

        async def secure(request: web.Request) -> web.Response:
            await record(request)
            # An https-only app (Django's SECURE_SSL_REDIRECT): https on the Host it was sent, its own address.
            raise web.HTTPMovedPermanently(f"https://{request.host}{request.path_qs.replace('secure', 'new')}")

        async def listing(request: web.Request) -> web.Response:
            await record(request)
            # RFC 8288 pagination, as GitHub-style APIs answer: clients follow rel="next" on their own.
            links = f'<{self.origin}/v2/items?page=2>; rel="next", <{self.origin}/v2/items?page=9>; rel="last"'
            return web.json_response([{"id": 1}], headers={"Link": links})

        app = web.Application()
        app.router.add_get("/v2/items", listing)
        app.router.add_get("/v2/old", old)
        app.router.add_get("/v2/new", new)
        app.router.add_post("/v2/items", create)
        app.router.add_get("/v2/elsewhere", elsewhere)
        app.router.add_get("/v2/outside", outside)
        app.router.add_get("/v2/secure", secure)
        await self.serve(web.AppRunner(app, access_log=None))


@pytest.fixture
async def redirecting() -> AsyncIterator[RedirectingUpstream]:
    up = RedirectingUpstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def pep(make_pep: PepStarter, redirecting: RedirectingUpstream) -> RunningPep:
    upstream = f"{redirecting.origin}/v2"
    api = {"name": "api", "match": {"path_prefix": "/api"}, "upstream": upstream, "strip_prefix": True}
    running: RunningPep = await make_pep(lambda c: c["routes"].append(api))
    return running


def assert_no_upstream_address(response: httpx.Response, upstream: RedirectingUpstream) -> None:
    for name, value in response.headers.multi_items():
        assert f":{upstream.port}" not in value, (name, value)


async def test_a_redirect_names_the_pep_and_following_it_is_decided_again(
    pep: RunningPep, redirecting: RedirectingUpstream, fault_pdp: FaultPdp
) -> None:
    async with httpx.AsyncClient(base_url=pep.url) as client:
        first = await client.get("/api/old")
        assert first.status_code == 302
        assert first.headers["location"] == "/api/new?x=1"
        assert_no_upstream_address(first, redirecting)

        followed = await client.get("/api/old", follow_redirects=True)
    assert followed.status_code == 200
    assert followed.json() == {"new": True}
    assert str(followed.url) == f"{pep.url}/api/new?x=1"  # it stayed on the PEP
    assert [path for path, _ in redirecting.seen] == ["/v2/old", "/v2/old", "/v2/new?x=1"]
    assert all(decision for _, decision in redirecting.seen)  # every one arrived through the PEP, allowed
    assert len(fault_pdp.requests) == 3  # and every one was decided


async def test_following_a_redirect_that_the_pdp_denies_reaches_nothing(
    pep: RunningPep, redirecting: RedirectingUpstream, fault_pdp: FaultPdp
) -> None:
    async with httpx.AsyncClient(base_url=pep.url) as client:
        first = await client.get("/api/old")
        fault_pdp.set("deny")
        second = await client.get(first.headers["location"])
    assert second.status_code == 403
    assert second.headers["x-pep-reason"] == "policy_denied"
    assert [path for path, _ in redirecting.seen] == ["/v2/old"]


async def test_a_streamed_201_with_content_location_and_refresh(
    pep: RunningPep, redirecting: RedirectingUpstream
) -> None:
    async with httpx.AsyncClient(base_url=pep.url) as client:
        created = await client.post("/api/items", json={"name": "x"})
    assert created.status_code == 201
    assert "content-length" not in created.headers  # relayed as it streamed
    assert created.headers["location"] == "/api/items/7"
    assert created.headers["content-location"] == "/api/items/7"
    assert created.headers["refresh"] == "0; url=/api/new"
    assert_no_upstream_address(created, redirecting)


async def test_other_origins_are_left_and_the_upstreams_origin_never_shows(
    pep: RunningPep, redirecting: RedirectingUpstream
) -> None:
    async with httpx.AsyncClient(base_url=pep.url) as client:
        elsewhere = await client.get("/api/elsewhere")
        outside = await client.get("/api/outside")
    assert elsewhere.headers["location"] == "https://login.example/authorize?client=pep"
    assert outside.headers["location"] == "/admin"  # no PEP path leads there: the path alone, decided if followed
    assert_no_upstream_address(outside, redirecting)


async def test_a_redirect_to_https_on_the_upstreams_own_host_names_the_pep(
    pep: RunningPep, redirecting: RedirectingUpstream
) -> None:
    """The upstream's host and port under another scheme are still its address: a client that followed them would
    reach the upstream's socket, not the PEP."""
    async with httpx.AsyncClient(base_url=pep.url) as client:
        moved = await client.get("/api/secure?x=1")
    assert moved.status_code == 301
    assert moved.headers["location"] == "/api/new?x=1"
    assert_no_upstream_address(moved, redirecting)


async def test_pagination_links_name_the_pep(pep: RunningPep, redirecting: RedirectingUpstream) -> None:
    """A `Link` to the next page is followed by clients as a redirect is: it must not lead around the PEP."""
    async with httpx.AsyncClient(base_url=pep.url) as client:
        page = await client.get("/api/items")
        assert page.status_code == 200
        assert page.headers["link"] == '</api/items?page=2>; rel="next", </api/items?page=9>; rel="last"'
        assert_no_upstream_address(page, redirecting)
        following = await client.get(page.links["next"]["url"])
    assert following.status_code == 200
    assert [path for path, _ in redirecting.seen] == ["/v2/items", "/v2/items?page=2"]


async def test_a_redirect_to_another_routes_upstream_names_that_route_on_the_pep(
    make_pep: PepStarter, redirecting: RedirectingUpstream
) -> None:
    """Services behind one PEP redirect to each other by their own addresses (a login service, a file store): the
    agent must not learn those either, and following the redirect goes through the PEP to that route."""
    other = RedirectingUpstream()
    await other.start()
    try:
        routes = [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "upstream": f"{redirecting.origin}/v2",
                "strip_prefix": True,
            },
            {
                "name": "files",
                "match": {"path_prefix": "/files"},
                "upstream": f"{other.origin}/v2",
                "strip_prefix": True,
            },
        ]
        pep = await make_pep(lambda c: c["routes"].extend(routes))
        redirecting.elsewhere_to = f"{other.origin}/v2/new?x=2"
        async with httpx.AsyncClient(base_url=pep.url) as client:
            moved = await client.get("/api/elsewhere")
            assert moved.headers["location"] == "/files/new?x=2"
            assert f":{other.port}" not in moved.headers["location"]
            followed = await client.get(moved.headers["location"])
        assert followed.json() == {"new": True}
        assert [path for path, _ in other.seen] == ["/v2/new?x=2"]
    finally:
        await other.stop()


async def test_a_redirect_to_a_forward_proxy_routes_upstream_names_the_host_the_agent_knows(
    make_pep: PepStarter, redirecting: RedirectingUpstream
) -> None:
    """A forward-proxy route may send `api.example.test` to an address of its own (a gateway): a URL naming that
    address becomes the route's host, which the agent reaches through the PEP as an HTTP proxy."""
    gateway = RedirectingUpstream()
    await gateway.start()
    try:
        routes = [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "upstream": f"{redirecting.origin}/v2",
                "strip_prefix": True,
            },
            {"name": "egress", "match": {"host": "api.example.test"}, "upstream": gateway.origin},
        ]
        pep = await make_pep(lambda c: c["routes"].extend(routes))
        redirecting.elsewhere_to = f"{gateway.origin}/v2/new?x=3"
        async with httpx.AsyncClient(base_url=pep.url) as client:
            moved = await client.get("/api/elsewhere")
        assert moved.headers["location"] == "http://api.example.test/v2/new?x=3"
        assert_no_upstream_address(moved, gateway)
        async with httpx.AsyncClient(proxy=pep.url) as client:
            followed = await client.get(moved.headers["location"])
        assert followed.json() == {"new": True}
        assert [path for path, _ in gateway.seen] == ["/v2/new?x=3"]
    finally:
        await gateway.stop()
