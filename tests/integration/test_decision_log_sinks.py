"""The decision log's file sink: reopened on SIGHUP for rotation; with `required: true`, an allow reaches the
upstream only after its line was written, and a line that cannot be written (a full device, a deleted file or
directory) denies `audit_unavailable` with nothing forwarded, on every way upstream."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import PepStarter, RunningPep
from tests.integration.test_forward_proxy import RawServer, connect, tunnel_route
from tests.support.fault_pdp import FaultPdp
from tests.support.log_writer import Gate
from tests.support.loopback import LoopbackServer
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def required_log(path: str | Path) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["decision_log"] = {"sink": "file", "path": str(path), "required": True}

    return mutate


async def scrape(pep: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        return await r.text()


def entries(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_reopened_on_sighup_after_rotation(make_pep: PepStarter, tmp_path: Path) -> None:
    pep: RunningPep = await make_pep()
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/a") as r:
        assert r.status == 200
    await pep.server.decision_log.flush()
    rotated = tmp_path / "rotated.jsonl"
    pep.log_path.rename(rotated)  # logrotate moves the file away ...
    pep.server.reload()  # ... and sends SIGHUP
    await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/b") as r:
        assert r.status == 200
    await pep.server.decision_log.flush()
    assert '"path":"/tools/a"' in rotated.read_text()
    assert '"path":"/tools/b"' in pep.log_path.read_text()


# --- an allow's line is written before the request goes upstream ---------------------------------------------------


@dataclass
class LogCheckingUpstream(LoopbackServer):
    """An upstream that, as each request arrives, looks for that request's allow line in the decision log file."""

    log: Path = Path()
    logged: list[bool] = field(default_factory=list)
    port: int = 0

    async def start(self) -> None:
        await self.serve(web.ServerRunner(web.Server(self._handle, access_log=None)))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        decision_id = request.headers["X-PEP-Decision-ID"]
        text = self.log.read_bytes() if self.log.exists() else b""
        lines = [orjson.loads(line) for line in text.splitlines()]
        self.logged.append(any(e["decision_id"] == decision_id and e["decision"] == "allow" for e in lines))
        return web.Response(text="ok")


@pytest.fixture
async def checking(tmp_path: Path) -> AsyncIterator[LogCheckingUpstream]:
    up = LogCheckingUpstream(log=tmp_path / "audit.jsonl")
    await up.start()
    yield up
    await up.stop()


async def test_an_allow_is_written_before_it_is_forwarded(make_pep: PepStarter, checking: LogCheckingUpstream) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        required_log(checking.log)(cfg)
        cfg["routes"][0]["upstream"] = checking.url

    pep = await make_pep(mutate=mutate)
    n = 30
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            async with s.get(f"{pep.url}/tools/{i}") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
    assert statuses == [200] * n
    assert checking.logged == [True] * n  # every one was in the log when it arrived
    assert pep.server.decision_log.writes <= n


async def test_denials_never_wait_for_a_required_log(
    make_pep: PepStarter, fault_pdp: FaultPdp, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    pep = await make_pep(mutate=required_log(tmp_path / "audit.jsonl"))
    fault_pdp.set("deny")
    gate = Gate(pep.server.decision_log)  # the writer is busy until the denial has been answered
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert (r.status, r.headers["x-pep-reason"]) == (403, "policy_denied")
    await gate.open()
    await pep.server.decision_log.flush()
    assert [(e["decision"], e["reason"]) for e in entries(tmp_path / "audit.jsonl")] == [("deny", "policy_denied")]
    assert upstream.seen == []


# --- a line that cannot be written denies, on every way upstream -------------------------------------------------


async def test_required_log_on_a_full_device_forwards_nothing(
    make_pep: PepStarter, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=required_log("/dev/full"))  # every write: ENOSPC
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(pep.url + "/tools/x") as r:
                assert (r.status, r.headers["x-pep-reason"]) == (403, "audit_unavailable")
    assert upstream.seen == []  # the first allow too: its line was never written
    text = await scrape(pep)
    assert metric(text, "pep_decisions_total", reason="audit_unavailable", route="tools") == 3
    assert metric(text, "pep_decisions_total", reason="allowed") == 0
    assert metric(text, "pep_decision_log_dropped_total") >= 3


async def test_an_optional_log_that_fails_still_forwards(make_pep: PepStarter, upstream: RecordingUpstream) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["decision_log"] = {"sink": "file", "path": "/dev/full"}  # required: false (the default)

    pep: RunningPep = await make_pep(mutate=mutate)
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert r.status == 200
    await pep.server.decision_log.flush()
    assert [x.target for x in upstream.seen] == ["/tools/x"]
    assert metric(await scrape(pep), "pep_decision_log_dropped_total") == 1


def _with_routes(log: str, upstream: str, raw_port: int) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        required_log(log)(cfg)
        # The PDP must allow for the log to be what denies: a deadline a loaded CI machine cannot miss (250 ms
        # did, once, for the batch's two asks: pdp_timeout instead of audit_unavailable).
        cfg["pdp"]["timeout_ms"] = 5000
        cfg["routes"] += [
            # deny_status 403: every way answers the same status here (the JSON-RPC denial in a 200 is the default).
            {
                "name": "mcp",
                "match": {"path_prefix": "/mcp"},
                "upstream": upstream,
                "protocol": "mcp",
                "deny_status": 403,
            },
            {"name": "llm", "match": {"path_prefix": "/v1"}, "upstream": upstream, "protocol": "openai"},
            {"name": "egress", "match": {"host": "api.example.test"}, "upstream": upstream},
            tunnel_route(raw_port),
        ]

    return mutate


CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {}}}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def _send(way: str, pep: RunningPep, raw: RawServer) -> tuple[int, str]:
    if way == "connect":
        _, writer, status, headers, _ = await connect(pep, f"127.0.0.1:{raw.port}")
        writer.close()
        return status, headers["x-pep-reason"]
    async with httpx.AsyncClient(timeout=10, proxy=pep.url if way == "forward_proxy" else None) as client:
        if way == "http":
            r = await client.get(pep.url + "/tools/x")
        elif way == "mcp":
            r = await client.post(pep.url + "/mcp", content=orjson.dumps(CALL), headers=JSON)
        elif way == "mcp_batch":
            batch = [CALL, {**CALL, "id": 2}]
            r = await client.post(pep.url + "/mcp", content=orjson.dumps(batch), headers=JSON)
        elif way == "openai":
            r = await client.post(pep.url + "/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
        else:
            r = await client.get("http://api.example.test/v1/items")
    return r.status_code, r.headers["x-pep-reason"]


@pytest.mark.parametrize("way", ["http", "mcp", "mcp_batch", "openai", "forward_proxy", "connect"])
async def test_every_way_upstream_waits_for_the_log(
    make_pep: PepStarter, upstream: RecordingUpstream, way: str
) -> None:
    raw = RawServer()
    await raw.start()
    try:
        pep: RunningPep = await make_pep(mutate=_with_routes("/dev/full", upstream.url, raw.port))
        status, reason = await _send(way, pep, raw)
    finally:
        await raw.stop()
    # The routes deny with 403 on every way (`deny_status`); nothing is forwarded either way.
    assert (status, reason) == (403, "audit_unavailable")
    assert upstream.seen == []
    assert raw.accepted == 0  # no tunnel was opened either


async def test_a_log_directory_removed_under_a_running_pep(
    make_pep: PepStarter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log = directory / "audit.jsonl"
    pep: RunningPep = await make_pep(mutate=required_log(log))

    async def get(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(pep.url + path) as r:
            return r.status, r.headers.get("x-pep-reason", "")

    assert await get("/tools/before") == (200, "")
    shutil.rmtree(directory)  # the open descriptor still takes writes, into a file nobody can read
    assert await get("/tools/gone") == (403, "audit_unavailable")
    pep.server.reload()  # SIGHUP: the path cannot be opened again either
    await asyncio.sleep(0.1)
    assert await get("/tools/after-sighup") == (403, "audit_unavailable")
    directory.mkdir()  # once the path can be created again, the next write does so by itself
    assert await get("/tools/back") == (200, "")
    assert [x.target for x in upstream.seen] == ["/tools/before", "/tools/back"]
    await pep.server.decision_log.flush()
    found = [(e["path"], e["decision"], e["reason"]) for e in entries(log)]
    assert ("/tools/back", "allow", "allowed") in found  # in the new file
    # Denials queued meanwhile (best-effort) may be there too; no other allow is.
    assert {f for f in found if f[0] != "/tools/back"} <= {("/tools/after-sighup", "deny", "audit_unavailable")}
