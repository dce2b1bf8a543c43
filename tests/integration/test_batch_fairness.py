"""JSON-RPC batches through a running PEP: bounded in size, and never at the other callers' expense.

A batch is one decision per message. Over the route's `max_batch_messages` it is refused before the PDP is asked
(`body_too_large`), so a body of thousands of `ping`s costs no PDP call and cannot open the circuit for everyone.
A batch within the bound has at most its share of `max_in_flight` exchanges open, so other callers are decided
while it waits on the PDP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.fault_pdp import FaultPdp
from tests.support.loopback import LoopbackServer
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

MakePep = Callable[..., Any]
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
PING = b'{"jsonrpc":"2.0","method":"ping"}'
CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}'


def pings(count: int) -> bytes:
    return b"[" + b",".join([PING] * count) + b"]"


def mcp_route(**options: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        up = cfg["routes"][0]["upstream"]
        route = {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": up + "/mcp", "strip_prefix": True}
        cfg["routes"] = [{**route, "protocol": "mcp", **options}]

    return mutate


async def post(session: aiohttp.ClientSession, pep: RunningPep, body: bytes) -> tuple[int, str | None]:
    async with session.post(pep.url + "/mcp", data=body, headers=HEADERS) as response:
        await response.read()
        return response.status, response.headers.get("x-pep-reason")


async def test_thousands_of_pings_are_refused_before_the_pdp_and_never_open_the_circuit(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=mcp_route())
    body = pings(3000)
    assert len(body) < 110_000  # well under max_body_bytes: only the message count refuses it
    async with aiohttp.ClientSession() as session:
        for _ in range(6):  # more than the breaker's failure_threshold (5)
            assert await post(session, pep, body) == (403, "body_too_large")
        assert fault_pdp.requests == []
        assert upstream.seen == []
        async with session.get(pep.admin_url + "/metrics") as response:
            text = await response.text()
        assert metric(text, "pep_circuit_state") == 0
        assert metric(text, "pep_decisions_total", route="mcp", reason="body_too_large") == 6
        # Everyone else is still decided by the PDP.
        assert await post(session, pep, CALL) == (200, None)
    assert len(fault_pdp.requests) == 1
    assert [r.body for r in upstream.seen] == [CALL]
    (entry, *_) = [e for e in await pep.log_entries() if e["reason"] == "body_too_large"]
    assert "3000 messages" in entry["detail"]


async def test_a_batch_at_the_routes_bound_is_decided_one_over_it_is_not(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=mcp_route(max_batch_messages=4))
    async with aiohttp.ClientSession() as session:
        assert await post(session, pep, pings(5)) == (403, "body_too_large")
        assert fault_pdp.requests == []
        assert await post(session, pep, pings(4)) == (202, None)  # forwarded: an MCP server accepts notifications
    assert len(fault_pdp.requests) == 4
    assert [r.body for r in upstream.seen] == [pings(4)]


class HoldingPdp(LoopbackServer):
    """An OPA-shaped PDP that allows everything, but holds `ping` decisions until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = asyncio.Event()  # set when a decision starts being held
        self.held = 0
        self.most_held = 0
        self.decided: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/data/pep/authz"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/data/pep/authz", self._answer)
        await self.serve(web.AppRunner(app, access_log=None))

    async def _answer(self, request: web.Request) -> web.Response:
        method = (await request.json())["input"]["mcp"]["method"]
        if method == "ping":
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            self.holding.set()
            try:
                async with asyncio.timeout(10):  # bounded, whatever the test does
                    await self.release.wait()
            finally:
                self.held -= 1
        self.decided.append(method)
        return web.json_response({"result": True})


@pytest.fixture
async def holding_pdp() -> AsyncIterator[HoldingPdp]:
    pdp = HoldingPdp()
    await pdp.start()
    yield pdp
    pdp.release.set()
    await pdp.stop()


async def test_other_callers_are_served_while_a_batch_waits_on_the_pdp(
    tmp_path: Path, holding_pdp: HoldingPdp, upstream: RecordingUpstream
) -> None:
    def config(cfg: dict[str, Any]) -> None:
        mcp_route()(cfg)
        # A bulkhead of 8 (and a PDP pool of 8 connections): a batch may take 8 // 4 = 2 of them.
        cfg["pdp"].update(max_in_flight=8, timeout_ms=3000, retries=0)

    starter = PepStarter(tmp_path, lambda log: base_config(holding_pdp.url, upstream.url, log), "fair.yaml")
    try:
        pep = await starter(mutate=config)
        async with aiohttp.ClientSession() as session:
            batch = asyncio.create_task(post(session, pep, pings(16)))
            async with asyncio.timeout(5):
                while holding_pdp.held < 2:
                    holding_pdp.holding.clear()
                    await holding_pdp.holding.wait()
            for _ in range(3):  # decided now, while the batch waits on the PDP
                assert await post(session, pep, CALL) == (200, None)
            assert not batch.done()
            assert holding_pdp.held == 2
            holding_pdp.release.set()
            assert await batch == (202, None)  # forwarded; a batch of notifications is accepted
        assert holding_pdp.most_held == 2  # never more of the PDP than its share
        assert holding_pdp.decided.count("ping") == 16
        assert [r.body for r in upstream.seen] == [CALL] * 3 + [pings(16)]
    finally:
        await starter.close()
