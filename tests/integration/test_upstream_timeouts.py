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
import httpx
import orjson
import pytest
import uvloop
from aiohttp import web

from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.loopback import LoopbackServer
from tests.support.observe import metric
from tests.support.sdk_stack import AGENT, ALLOWED_MODEL, PdpUnderTest, pep_config
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


# --- model answers read through the answer gate (pep/answers.py): the same waits on its paths --------------------


class FallingSilentModel(LoopbackServer):
    """Answers every model call with a 200 of `content_type`, sends `first`, then says nothing until `release`."""

    def __init__(self, content_type: str, first: bytes) -> None:
        self.content_type = content_type
        self.first = first
        self.release = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": self.content_type})  # no Content-Length: streamed
            await resp.prepare(request)
            await resp.write(self.first)
            await self.release.wait()
            return resp

        app = web.Application()
        app.router.add_post("/{rest:.*}", answer)
        await self.serve(web.AppRunner(app, access_log=None))

    async def stop(self) -> None:
        self.release.set()
        await super().stop()


def allowed_event() -> bytes:
    call = {"index": 0, "type": "function", "function": {"name": "search", "arguments": ""}}
    chunk = {"model": ALLOWED_MODEL, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def model_pep(tmp_path: Path, upstream: FallingSilentModel) -> PepStarter:
    pdp = await PdpUnderTest.start("cedar", tmp_path)

    def build(log: Path) -> dict[str, Any]:
        cfg = pep_config(pdp.config, log, models_upstream=upstream.url)
        cfg["routes"][0]["timeout_ms"] = TIMEOUT_MS
        return cfg

    return PepStarter(tmp_path, build, "models.yaml")


async def test_a_model_answer_read_whole_that_falls_silent_is_a_timeout(tmp_path: Path) -> None:
    """A JSON answer is read whole through the gate before any byte reaches the agent: a silence longer than
    `timeout_ms` while reading it is a 504 `timeout` (nothing relayed), not a request that waits forever."""
    upstream = FallingSilentModel("application/json", b'{"model": "' + ALLOWED_MODEL.encode() + b'", "choices": [')
    await upstream.start()
    starter = await model_pep(tmp_path, upstream)
    try:
        pep = await starter()
        async with httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=10) as http:
            got = await http.post("/v1/chat/completions", json={"model": ALLOWED_MODEL, "messages": []})
        assert (got.status_code, got.headers.get("x-pep-upstream-error")) == (504, "timeout")
        assert b"choices" not in got.content
    finally:
        await starter.close()
        await upstream.stop()


async def test_a_gated_model_stream_that_falls_silent_is_cut(tmp_path: Path) -> None:
    """A streamed answer goes through the gate event by event: the allowed first event reaches the agent, then a
    silence longer than `timeout_ms` cuts the stream (an unfinished body, `reset`), as on an ungated route."""
    upstream = FallingSilentModel("text/event-stream", allowed_event())
    await upstream.start()
    starter = await model_pep(tmp_path, upstream)
    try:
        pep = await starter()
        body = {"model": ALLOWED_MODEL, "messages": [], "stream": True}
        received: list[bytes] = []

        async def read_all(got: httpx.Response) -> None:
            async for part in got.aiter_bytes():
                received.append(part)

        async with (
            httpx.AsyncClient(base_url=pep.url, headers={"x-agent-id": AGENT}, timeout=10) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as got,
        ):
            assert got.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await read_all(got)
        assert b"".join(received) == allowed_event()
        assert metric(await scrape(pep), "pep_upstream_failures_total", route="models", kind="reset") == 1
    finally:
        await starter.close()
        await upstream.stop()
