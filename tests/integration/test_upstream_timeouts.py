"""The route's `timeout_ms` on a running PEP: for the upstream's headers once the request has gone out, then for
each silence between body chunks; and never for a request that has not waited at all.

The soak (issue 13, 3.11) once got a 504 `timeout` from a healthy upstream in about a millisecond: aiohttp's own
`sock_read` timer, re-armed while the end of a large answer read under back-pressure was drained, fired on the
connection after it had gone back to the pool and marked it failed; the next request on it failed at once, after
its bytes had reached the upstream. The PEP now times these waits itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

MakePep = Callable[..., Any]
TIMEOUT_MS = 200


def route(cfg: dict[str, Any]) -> None:
    cfg["routes"][0]["strip_prefix"] = True
    cfg["routes"][0]["timeout_ms"] = TIMEOUT_MS


async def scrape(pep: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        return await r.text()


def test_a_large_answer_read_slowly_leaves_a_connection_the_next_request_can_use(tmp_path: Path) -> None:
    """A large answer, written at once by the upstream and read slowly by the caller, then an idle pause longer
    than `timeout_ms`, then the next request on the same upstream connection: it must be answered. Before, with
    aiohttp's `sock_read`, it failed in a millisecond with 504 `timeout`, every time on uvloop (what `pep run`
    uses; the PEP, the upstream and the caller share one uvloop loop here; on asyncio's loop it happened at
    times)."""

    async def main() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        policies = tmp_path / "p.cedar"
        policies.write_text("permit(principal, action, resource);\n")

        def build(log: Path) -> dict[str, Any]:
            cfg = base_config("http://127.0.0.1:9/unused", upstream.url, log)
            cfg["pdp"] = {"kind": "cedar", "policies": str(policies)}
            route(cfg)
            return cfg

        starter = PepStarter(tmp_path, build, "pep.yaml")
        try:
            pep: RunningPep = await starter()
            async with aiohttp.ClientSession() as s:
                for size in (3_000_000, 1_000_000):
                    got = 0
                    async with s.get(pep.url + f"/tools/big?bytes={size}&piece={size}") as r:  # in one write
                        assert r.status == 200
                        async for chunk in r.content.iter_any():
                            got += len(chunk)
                            await asyncio.sleep(0.002)  # a slow caller: back-pressure reaches the upstream
                    assert got == size
                    await asyncio.sleep(TIMEOUT_MS / 1000 * 2)  # longer than the route's timeout, idle meanwhile
                    async with s.get(pep.url + "/tools/x") as r:
                        assert (r.status, r.headers.get("x-pep-upstream-error")) == (200, None), size
            assert len(upstream.seen) == 4
            assert len(upstream.connections) == 1  # the same upstream connection served them all
            assert metric(await scrape(pep), "pep_upstream_failures_total", route="tools", kind="timeout") == 0
        finally:
            await starter.close()
            await upstream.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_the_wait_for_headers_starts_once_a_streamed_body_has_gone_out(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    """A chunked upload taking longer than `timeout_ms` in all (each chunk in time) is not a timeout."""
    pep: RunningPep = await make_pep(mutate=route)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 100
            await asyncio.sleep(TIMEOUT_MS / 1000 / 2)

    async with aiohttp.ClientSession() as s, s.post(pep.url + "/tools/echo", data=body()) as r:
        assert (r.status, r.headers.get("x-pep-upstream-error")) == (200, None)
        assert (await r.json())["body_len"] == 400


async def test_a_silence_between_chunks_longer_than_the_timeout_cuts_the_answer(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(mutate=route)
    events = 0
    async with aiohttp.ClientSession() as s, s.get(pep.url + f"/tools/sse?n=3&gap_ms={TIMEOUT_MS * 3}") as r:
        assert r.status == 200
        try:
            async for line in r.content:
                events += line.startswith(b"data:")
        except aiohttp.ClientPayloadError:
            pass
    assert events == 1  # the first event, then the silence: cut
    assert metric(await scrape(pep), "pep_upstream_failures_total", route="tools", kind="reset") == 1
