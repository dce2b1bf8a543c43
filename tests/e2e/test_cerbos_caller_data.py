"""One caller's data must not make the real Cerbos 0.55 refuse requests in a way that opens the circuit for everyone.

Cerbos answers 429 to a request whose protobuf form is over 4 MiB (its gRPC message limit). A JSON array of small
numbers grows about twelvefold into protobuf, and an MCP `tools/call` carries its arguments into the policy input
twice (resource properties and context): one 600 KB body, under the default `max_body_bytes`, is enough. Each such
request was a `pdp_error_status` counted as a breaker failure, so `failure_threshold` of them opened the circuit
and every other caller was denied `circuit_open`. A 4xx answer (other than 408) is now the request's own denial:
still `pdp_error_status`, but the breaker is not told.

Cerbos also takes longer than the default 250 ms deadline to decide an input of a few hundred thousand small
values: a `pdp_timeout`, which must count (a PDP that does not answer in time is failing), so five such requests
opened the circuit too. An MCP body of more than the route's `max_json_values` is now `body_too_large`, refused
before the PDP is asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningPep
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

CerbosPepFactory = Callable[..., Any]

THRESHOLD = 5  # the Cerbos fixture's failure_threshold
MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def mcp_route(upstream_url: str, **settings: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        route = {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": upstream_url + "/mcp"}
        raw["routes"].append({**route, "protocol": "mcp", **settings})  # max_body_bytes: the default 1 MiB

    return mutate


async def tools_call(client: aiohttp.ClientSession, pep: RunningPep, query: Any) -> str | None:
    """A `search` call with `query` as its argument; the PEP's reason when it denied it, else None."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {"q": query}}}
    async with client.post(pep.url + "/mcp", data=orjson.dumps(body), headers=MCP_HEADERS) as r:
        await r.read()
        return r.headers.get("x-pep-reason")


async def circuit(client: aiohttp.ClientSession, pep: RunningPep) -> tuple[float, float]:
    async with client.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    return metric(text, "pep_circuit_state"), metric(text, "pep_circuit_transitions_total", to="open")


async def test_inputs_cerbos_refuses_are_denied_without_opening_the_circuit_for_everyone(
    make_cerbos_pep: CerbosPepFactory, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    # max_json_values raised (it would refuse this body before the PDP is asked): Cerbos's own refusal is tested
    pep: RunningPep = await make_cerbos_pep(mcp_route(upstream.url, max_json_values=1_000_000))
    assert await tools_call(client, pep, "shoes") is None  # Cerbos allows search
    zeros = [0] * 300_000  # a 600 KB body; its policy input is over Cerbos's limit once read as protobuf
    for _ in range(THRESHOLD + 1):
        assert await tools_call(client, pep, zeros) == "pdp_error_status"  # Cerbos's 429, denied
    assert await circuit(client, pep) == (0, 0)
    assert await tools_call(client, pep, "shoes") is None  # everyone else is still decided
    assert len(upstream.seen) == 2


def default_timeout(upstream_url: str) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        mcp_route(upstream_url)(raw)
        raw["pdp"]["timeout_ms"] = 250  # the default
        raw["pdp"]["retries"] = 0

    return mutate


async def test_arguments_slow_to_decide_are_refused_before_the_pdp_is_asked(
    make_cerbos_pep: CerbosPepFactory, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep: RunningPep = await make_cerbos_pep(default_timeout(upstream.url))
    assert await tools_call(client, pep, "shoes") is None
    many = [{"k": 0}] * 60_000  # a 600 KB body of small values: Cerbos took longer than 250 ms to decide it
    reasons = [await tools_call(client, pep, many) for _ in range(THRESHOLD + 1)]
    assert reasons == ["body_too_large"] * (THRESHOLD + 1)
    assert await circuit(client, pep) == (0, 0)
    assert await tools_call(client, pep, "shoes") is None
