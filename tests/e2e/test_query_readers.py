"""Differential: a query field the policy was shown by one name is what a real qs reader acts on under that name.

Behind the PEP sits Express with the `extended` query parser (qs: Express 4's default, the setting Express 5 apps
use to keep it), answering the query as it read it (tests/support/readers/express_reader.js). The PDP allows
everything and keeps each input. A query whose field names the policy saw apart but qs (like PHP and Rack) reads
as one variable (`tenant` beside `tenant[]`) is refused before the PDP; anything else is forwarded, and for every
plain name the PDP saw, qs read the same values.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.path_readers import Express, Reader, exchange, serving
from tests.support.policy_pdp import PolicyPdp

TWINS = [
    "tenant=acme&tenant[]=evil",
    "tenant[]=evil&tenant=acme",
    "tenant=acme&tenant[0]=evil",
    "tenant=acme&tenant[x]=evil",
    "tenant=acme&tenant%5B%5D=evil",
]
FORWARDED = [
    "tenant=acme",
    "tenant=acme&other=1",
    "filter[status]=open&filter[kind]=bug",
    "ids[]=1&ids[]=2",
    "v=1.2&tenant=acme",
]


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    """Missing is a failure, never a skip: `make test` installs it."""
    server = Express(tmp_path_factory.mktemp("express"))
    yield from serving(server)


@pytest.fixture
async def pdp() -> AsyncIterator[PolicyPdp]:
    server = PolicyPdp()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def pep(tmp_path: Path, pdp: PolicyPdp, reader: Reader) -> AsyncIterator[RunningPep]:
    up = f"http://127.0.0.1:{reader.port}"
    starter = PepStarter(tmp_path, lambda log: base_config(pdp.url, up, log), "query.yaml")
    try:
        yield await starter()
    finally:
        await starter.close()


async def through(pep: RunningPep, query: str) -> tuple[int, dict[str, str], bytes]:
    target = f"/tools/__query?{query}".encode()
    return await asyncio.to_thread(exchange, pep.port, target, f"127.0.0.1:{pep.port}".encode())


@pytest.mark.parametrize("query", TWINS)
async def test_names_qs_reads_as_one_variable_are_refused(
    query: str, pep: RunningPep, pdp: PolicyPdp, reader: Reader
) -> None:
    """Sent straight to Express, `tenant=acme&tenant[]=evil` is `tenant: [acme, evil]`; the policy saw `tenant:
    [acme]` (and a `tenant[]` no rule names)."""
    before = await asyncio.to_thread(reader.seen)
    status, headers, _ = await through(pep, query)
    assert (status, headers.get("x-pep-reason")) == (403, "request_ambiguous")
    assert pdp.inputs == []
    assert await asyncio.to_thread(reader.seen) == before
    status, _, body = await asyncio.to_thread(exchange, reader.port, f"/tools/__query?{query}".encode())
    assert status == 200
    assert "evil" in json.dumps(json.loads(body)["tenant"])  # what the policy would not have seen as the tenant


@pytest.mark.parametrize("query", FORWARDED)
async def test_forwarded_queries_are_read_as_the_pdp_saw_them(query: str, pep: RunningPep, pdp: PolicyPdp) -> None:
    status, _, body = await through(pep, query)
    assert status == 200, body
    (doc,) = pdp.inputs
    read = json.loads(body)
    for name, values in doc["request"]["query"].items():
        if "[" not in name:
            assert read[name] == (values[0] if len(values) == 1 else values), (query, name)
