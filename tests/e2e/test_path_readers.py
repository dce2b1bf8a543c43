"""Differential: whatever the PEP forwards, a real upstream routes to the path the PDP was asked about.

Behind the PEP sit nginx (default `merge_slashes on`), Express 5 (default router) and Tomcat 10.1 (the servlet
container under Spring MVC), each answering with the path it routed on (tests/support/path_readers.py). The PDP
allows everything and keeps each input document, so every request the PEP does not refuse itself is forwarded.
For each target of the corpus, either the PEP refuses it before the PDP (and the server saw nothing), or the
server routed on exactly the path of the decided `route.upstream_url` (decoded once where the server decodes):
`request.path` itself on a route without `strip_prefix`, the prefix swapped for the upstream's path with it.

`test_the_refused_shapes_would_be_served_as_another_path` sends the refused shapes to the servers directly: each
is routed somewhere the policy never saw, which is why the PEP refuses them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.path_readers import KINDS, Reader, exchange, serving
from tests.support.policy_pdp import PolicyPdp

# Forwarded as sent (the policy sees them as they are, and so does every server).
FORWARDED = [
    "/tools/admin",
    "/tools/x",
    "/tools/x/",
    "/tools/a%20b",
    "/tools/%C3%A9",
    "/tools/v1.2",
    "/tools/...",
    "/tools/..x",
    "/tools/.well-known/x",
    "/tools/a%25b",
    "/tools/a%3Fb",
    "/tools/x?a=1%3Bb=2",
    "/tools/x?next=//admin/../x",
    "/api/admin",  # strip_prefix: /api/... is the upstream's /tools/...
    "/api/x/",
    "/api",
    "/api/",
]
# Refused by the PEP (request_ambiguous before the PDP, or no route): no server sees them.
REFUSED = [
    "/tools//admin",
    "//tools/admin",
    "/tools/admin//",
    "/tools///admin",
    "/tools/;x/admin",
    "/tools;x/admin",
    "/tools/admin;x",
    "/tools/admin;jsessionid=1",
    "/tools/x;p/../admin",
    "/tools/..;/admin",
    "/tools/admin%3Bx",
    "/tools/admin%253Bx",
    "/tools/%2F%2Fadmin",
    "/tools/%2e%2e/admin",
    "/tools/./admin",
    "/api//admin",
    "/api/;x/admin",
    "/api/admin;x",
    "//api/admin",
]
# The shapes refused above, sent straight to each server: it serves them as this path instead (decoded).
SERVED_AS = {
    "nginx": {"/tools//admin": "/tools/admin", "//tools/admin": "/tools/admin", "/tools///admin": "/tools/admin"},
    "tomcat": {
        "/tools//admin": "/tools/admin",
        "//tools/admin": "/tools/admin",
        "/tools;x/admin": "/tools/admin",
        "/tools/admin;x": "/tools/admin",
        "/tools/;x/admin": "/tools/admin",
        "/tools/..;/admin": "/admin",
        "/tools/x;p/../admin": "/tools/admin",
    },
    "express": {},  # Express routes on the raw path: `//` and `;` stay what they are (case is another matter)
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def reader(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    """Each real server once per module. Missing is a failure, never a skip: `make test` installs them."""
    kind = KINDS[request.param]
    server = kind(tmp_path_factory.mktemp(request.param))
    yield from serving(server)


class AllowAll(PolicyPdp):
    def decide(self, doc: dict[str, Any]) -> Any:
        return True


@pytest.fixture
async def pdp() -> AsyncIterator[AllowAll]:
    server = AllowAll()
    await server.start()
    yield server
    await server.stop()


def routes_to(reader: Reader, **extra: Any) -> Any:
    up = f"http://127.0.0.1:{reader.port}"

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["routes"] = [
            {"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": up, **extra},
            {"name": "api", "match": {"path_prefix": "/api"}, "upstream": up + "/tools/", "strip_prefix": True},
        ]

    return mutate


@pytest.fixture
async def pep(tmp_path: Path, pdp: AllowAll, reader: Reader) -> AsyncIterator[RunningPep]:
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, "http://127.0.0.1:9", log), "readers.yaml")
    try:
        yield await starter(mutate=routes_to(reader))
    finally:
        await starter.close()


async def through(pep: RunningPep, target: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(exchange, pep.port, target.encode(), f"127.0.0.1:{pep.port}".encode())


async def test_forwarded_paths_are_routed_as_the_pdp_saw_them(pep: RunningPep, pdp: AllowAll, reader: Reader) -> None:
    for target in FORWARDED:
        asked = len(pdp.inputs)
        status, headers, body = await through(pep, target)
        assert headers.get("x-pep-decision") != "deny", (reader.name, target, body)
        assert status == 200, (reader.name, target, status, body)
        (doc,) = pdp.inputs[asked:]
        assert doc["request"]["path"] == target.partition("?")[0]
        decided = urlsplit(doc["route"]["upstream_url"]).path
        assert reader.routed(body) == reader.expected(decided), (reader.name, target, decided, body)


async def test_refused_paths_never_reach_the_server(pep: RunningPep, pdp: AllowAll, reader: Reader) -> None:
    before = await asyncio.to_thread(reader.seen)
    for target in [*REFUSED, f"http://127.0.0.1:{pep.port}//tools/admin"]:
        status, headers, body = await through(pep, target)
        assert (status, headers.get("x-pep-decision")) == (403, "deny"), (reader.name, target, status, body)
        assert headers["x-pep-reason"] in ("request_ambiguous", "no_route"), (target, headers)
    assert pdp.inputs == []
    assert await asyncio.to_thread(reader.seen) == before


def test_the_refused_shapes_would_be_served_as_another_path(reader: Reader) -> None:
    for target, served in SERVED_AS[reader.name].items():
        status, _, body = exchange(reader.port, target.encode())
        assert status == 200, (reader.name, target, status)
        assert reader.routed(body) == served.encode(), (reader.name, target, body)
        assert reader.routed(body) != reader.expected(target)


async def test_allow_path_parameters_is_for_servers_that_keep_them(
    tmp_path: Path, pdp: AllowAll, reader: Reader
) -> None:
    """nginx and Express route on `/tools/x;v=1/y` as sent; Tomcat (and Spring) drop `;v=1`: that is why path
    parameters are refused unless the route says its upstream keeps them. A dot or empty segment hidden behind
    parameters is refused even then."""
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, "http://127.0.0.1:9", log), "params.yaml")
    try:
        running = await starter(mutate=routes_to(reader, allow_path_parameters=True))
        status, _, body = await through(running, "/tools/x;v=1/y")
        assert status == 200
        assert pdp.inputs[-1]["request"]["path"] == "/tools/x;v=1/y"
        keeps = reader.routed(body) == reader.expected("/tools/x;v=1/y")
        assert keeps == (reader.name != "tomcat"), (reader.name, body)
        for target in ("/tools/..;/admin", "/tools/;x/admin", "/tools/x;v=1//y"):
            status, headers, _ = await through(running, target)
            assert (status, headers.get("x-pep-reason")) == (403, "request_ambiguous"), target
    finally:
        await starter.close()
    assert len(pdp.inputs) == 1


@pytest.mark.parametrize("reader", ["express"], indirect=True)
def test_express_routes_case_insensitively_by_default(reader: Reader) -> None:
    """Express's default router matches `/TOOLS/Admin` to a `/tools/admin` route (and ignores a trailing slash):
    the PEP forwards the path as sent, so a policy for an Express upstream compares paths without case (see
    README, Security model)."""
    for target in (b"/TOOLS/Admin", b"/tools/admin/"):
        status, _, body = exchange(reader.port, target)
        assert status == 200
        assert body.split(b"\n")[1] == b"/tools/admin", (target, body)
