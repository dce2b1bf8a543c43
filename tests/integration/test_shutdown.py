"""Graceful shutdown of a real `pep run` with real signals: SIGTERM makes /readyz 503, stops accepting, lets
requests in flight finish within `shutdown_grace_ms`, closes what is left after it, and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.process import cedar_config, ensure_stopped, read_line, start_pep
from tests.support.upstream import RecordingUpstream

_UP = re.compile(r"proxy on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")


def config(tmp_path: Path, upstream: RecordingUpstream, grace_ms: int) -> Path:
    path = cedar_config(tmp_path, upstream.url, "permit(principal, action, resource);\n", shutdown_grace_ms=grace_ms)
    raw = yaml.safe_load(path.read_text())
    raw["routes"][0]["strip_prefix"] = True  # /tools/slow reaches the upstream as /slow
    path.write_text(yaml.safe_dump(raw))
    return path


async def in_flight(upstream: RecordingUpstream, n: int) -> None:
    async with asyncio.timeout(10):
        while len(upstream.seen) < n:  # noqa: ASYNC110 - the upstream records in this loop
            await asyncio.sleep(0.01)


async def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path: Path, upstream: RecordingUpstream) -> None:
    proc = await start_pep("run", "-c", str(config(tmp_path, upstream, 10000)))
    try:
        assert proc.stderr is not None
        m = _UP.search(await read_line(proc.stderr, "proxy on", 20))
        assert m is not None
        proxy, admin = f"http://127.0.0.1:{m.group(1)}", f"http://127.0.0.1:{m.group(2)}"
        async with aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(s.get(proxy + "/tools/slow?ms=1500"))
            await in_flight(upstream, 1)
            os.kill(proc.pid, signal.SIGTERM)  # only the PID started above
            await read_line(proc.stderr, "shutting down", 10)

            async with s.get(admin + "/readyz") as r:  # the admin port stays up while the proxy drains
                assert r.status == 503
                assert (await r.json())["reasons"] == ["shutting_down"]
            with pytest.raises(aiohttp.ClientConnectionError):  # no new connections
                async with aiohttp.ClientSession() as fresh, fresh.get(proxy + "/tools/x"):
                    pass

            response = await slow
            assert response.status == 200  # the request in flight finished
            await response.read()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
        assert len(upstream.seen) == 1
        assert b'"decision":"allow"' in (tmp_path / "decisions.jsonl").read_bytes()
    finally:
        await ensure_stopped(proc)


async def test_what_outlasts_the_grace_period_is_closed_and_the_exit_is_still_0(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    proc = await start_pep("run", "-c", str(config(tmp_path, upstream, 300)))
    try:
        assert proc.stderr is not None
        m = _UP.search(await read_line(proc.stderr, "proxy on", 20))
        assert m is not None
        async with aiohttp.ClientSession() as s:

            async def fetch() -> bytes:
                async with s.get(f"http://127.0.0.1:{m.group(1)}/tools/hang") as response:
                    return await response.read()

            stream = asyncio.ensure_future(fetch())
            await in_flight(upstream, 1)
            os.kill(proc.pid, signal.SIGTERM)
            async with asyncio.timeout(20):
                assert await proc.wait() == 0
            with pytest.raises(aiohttp.ClientError):  # cut, never a made-up answer
                await stream
        assert upstream.disconnects == 1  # the upstream call was cancelled with it
    finally:
        await ensure_stopped(proc)
