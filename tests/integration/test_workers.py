"""`workers: 2`: two `pep run` processes share one port (SO_REUSEPORT) under a supervisor that merges their
metrics, reports readiness for all, forwards signals and restarts a worker that dies. A real process tree."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import orjson

from tests.support.mcp_servers import RogueMcpServer
from tests.support.observe import metric
from tests.support.process import alive, cedar_config, children, ensure_stopped, read_line, start_pep
from tests.support.upstream import RecordingUpstream

_UP = re.compile(r"(\d+) workers on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")
REQUESTS = 60
REPLIES = 16  # on fresh connections: both workers receive some (all on one: once in 2**15 runs)


def config(tmp_path: Path, upstream: RecordingUpstream) -> Path:
    return cedar_config(tmp_path, upstream.url, 'permit(principal, action == Action::"GET", resource);\n', workers=2)


async def fresh_connection_gets(url: str, n: int) -> list[int]:
    """`n` GETs, each on its own connection (the kernel spreads connections, not requests, over workers)."""
    statuses = []
    for _ in range(n):
        async with aiohttp.ClientSession() as s, s.get(url, headers={"connection": "close"}) as r:
            statuses.append(r.status)
    return statuses


async def test_two_workers_share_the_port_merge_metrics_and_survive_a_crash(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    proc = await start_pep("run", "-c", str(config(tmp_path, upstream)))
    try:
        assert proc.stderr is not None
        m = _UP.search(await read_line(proc.stderr, "workers on", 30))
        assert m is not None
        assert m.group(1) == "2"
        url, admin = f"http://127.0.0.1:{m.group(2)}/tools/x", f"http://127.0.0.1:{m.group(3)}"
        workers = children(proc.pid)
        assert len(workers) == 2

        assert await fresh_connection_gets(url, REQUESTS) == [200] * REQUESTS
        assert len(upstream.seen) == REQUESTS
        async with aiohttp.ClientSession() as s:
            async with s.get(admin + "/metrics") as r:
                text = await r.text()
            async with s.get(admin + "/readyz") as r:
                assert (r.status, await r.json()) == (200, {"ready": True, "reasons": []})
        per_worker = [metric(text, "pep_decisions_total", reason="allowed", route="tools", worker=w) for w in "01"]
        assert sum(per_worker) == REQUESTS
        assert min(per_worker) > 0, per_worker  # both took connections
        assert metric(text, "pep_workers") == 2
        assert "_created" not in text.replace("pep_worker_restarts_created", "")

        # SIGHUP reaches both workers (each re-reads its config and Cedar policies).
        os.kill(proc.pid, signal.SIGHUP)
        await read_line(proc.stderr, "config reloaded", 10)
        await read_line(proc.stderr, "config reloaded", 10)

        os.kill(workers[0], signal.SIGKILL)  # a child of the process this test started
        await read_line(proc.stderr, "restarting", 10)
        await read_line(proc.stderr, "worker ", 30)  # the replacement is listening
        assert await fresh_connection_gets(url, 10) == [200] * 10
        async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as r:
            text = await r.text()
        assert metric(text, "pep_worker_restarts_total") == 1

        survivors = children(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
        assert not [pid for pid in survivors if alive(pid)]  # no worker outlives the supervisor
    finally:
        await ensure_stopped(proc)


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, upstream: RecordingUpstream) -> None:
    proc = await start_pep("run", "-c", str(config(tmp_path, upstream)))
    workers: list[int] = []
    try:
        assert proc.stderr is not None
        await read_line(proc.stderr, "workers on", 30)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)  # nothing is forwarded: each worker must notice on its own
        await proc.wait()
        async with asyncio.timeout(15):
            while [pid for pid in workers if alive(pid)]:  # noqa: ASYNC110 - other processes' state, polled
                await asyncio.sleep(0.1)
    finally:
        await ensure_stopped(proc)
        for pid in workers:  # only the children of the process this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_reply_is_opened_by_whichever_worker_receives_it(tmp_path: Path) -> None:
    """A server request relayed by one worker is answered on another connection, which the kernel may give to the
    other worker: the token the agent answers under opens in both (the supervisor hands its workers one seal
    key), so every reply is decided and forwarded with the server's own id, none refused."""
    rogue = RogueMcpServer()
    await rogue.start()
    route = {"name": "mcp", "match": {"path_prefix": "/mcp"}, "upstream": rogue.url, "protocol": "mcp"}
    path = cedar_config(tmp_path, rogue.url, "permit(principal, action, resource);\n", workers=2, routes=[route])
    proc = await start_pep("run", "-c", str(path))
    try:
        assert proc.stderr is not None
        m = _UP.search(await read_line(proc.stderr, "workers on", 30))
        assert m is not None
        url = f"http://127.0.0.1:{m.group(2)}/mcp"
        session = {"Mcp-Session-Id": "s-1"}
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={**session, "Accept": "text/event-stream"}) as stream:
                assert stream.status == 200
                await rogue.push({"jsonrpc": "2.0", "id": 41, "method": "ping"})
                event = b""
                while b"data:" not in event:
                    event = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
            token = orjson.loads(event.split(b"data: ", 1)[1])["id"]
            assert isinstance(token, str)
            assert token.startswith("pt1.")
            reply = orjson.dumps({"jsonrpc": "2.0", "id": token, "result": {}})
            headers = {**session, "Content-Type": "application/json", "connection": "close"}
            statuses = []
            for _ in range(REPLIES):
                async with aiohttp.ClientSession() as fresh, fresh.post(url, data=reply, headers=headers) as r:
                    statuses.append(r.status)
        assert statuses == [202] * REPLIES
        assert [r["id"] for r in rogue.replies] == [41] * REPLIES  # the server's own id, from either worker
    finally:
        await ensure_stopped(proc)
        await rogue.stop()
