"""Config reload: the file is read again and swapped in whole, or the last good config stays (with the reason,
counted). Requests in flight finish on the config they started with; the breaker survives a reload that keeps
the PDP; a changed file is picked up without a signal."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream


def config_file(pep: RunningPep) -> Path:
    return Path(pep.server.config.source)


def edit(pep: RunningPep, change: Any) -> None:
    path = config_file(pep)
    raw = yaml.safe_load(path.read_text())
    change(raw)
    staged = path.with_suffix(".staged")
    staged.write_text(yaml.safe_dump(raw, sort_keys=False))
    staged.replace(path)


async def get(url: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason")


async def scrape(pep: RunningPep) -> str:
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        return await r.text()


async def test_a_new_route_is_served_after_reload_and_counted(
    make_pep: PepStarter, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep()
    assert await get(pep.url + "/crm/x") == (403, "no_route")

    edit(pep, lambda c: c["routes"].append({"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": upstream.url}))
    assert await pep.server.reload_config()
    assert await get(pep.url + "/crm/x") == (200, None)
    assert await get(pep.url + "/tools/x") == (200, None)
    text = await scrape(pep)
    assert metric(text, "pep_decisions_total", route="crm", reason="allowed") == 1
    assert metric(text, "pep_config_reloads_total", result="success") == 1


@pytest.mark.parametrize(
    ("change", "said"),
    [
        pytest.param(lambda c: c["routes"][0].update(upstream="ftp://x"), "routes[0].upstream", id="bad-value"),
        pytest.param(lambda c: c.update(surprise=1), "surprise: unknown key", id="unknown-key"),
        pytest.param(lambda c: c.update(listen="127.0.0.1:1"), "listen cannot change without a restart", id="listen"),
        pytest.param(lambda c: c.update(workers=2), "workers cannot change", id="workers"),
        pytest.param(lambda c: c["decision_log"].update(include_arguments=True), "decision_log cannot", id="log"),
        pytest.param(lambda c: c["pdp"].update(kind="cedar", policies="/nonexistent.cedar"), "pdp", id="bad-file"),
    ],
)
async def test_a_bad_config_keeps_the_last_good_one(
    make_pep: PepStarter, upstream: RecordingUpstream, capsys: pytest.CaptureFixture[str], change: Any, said: str
) -> None:
    pep: RunningPep = await make_pep()
    engine = pep.server.engine
    edit(pep, change)
    assert not await pep.server.reload_config()
    err = capsys.readouterr().err
    assert "config reload failed, keeping the last good config" in err
    assert said in err
    assert pep.server.engine is engine
    assert await get(pep.url + "/tools/x") == (200, None)
    assert metric(await scrape(pep), "pep_config_reloads_total", result="error") == 1


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
    make_pep: PepStarter, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep(lambda c: c["pdp"].update(timeout_ms=3000))
    fault_pdp.set(Mode(delay=0.5))  # an allow that takes half a second
    pending = asyncio.ensure_future(get(pep.url + "/tools/x"))
    while not fault_pdp.requests:  # noqa: ASYNC110 - polling what a server in this loop records
        await asyncio.sleep(0.01)
    edit(pep, lambda c: c["routes"][0]["match"].update(path_prefix="/other"))
    assert await pep.server.reload_config()
    assert await pending == (200, None)  # decided and forwarded under the old route
    fault_pdp.set("allow")
    assert await get(pep.url + "/tools/x") == (403, "no_route")
    entries = await pep.log_entries()
    assert [e["route"] for e in entries] == ["tools", "_unmatched"]
    assert len(upstream.seen) == 1


async def test_the_breaker_survives_a_reload_that_keeps_the_pdp(make_pep: PepStarter, fault_pdp: FaultPdp) -> None:
    pep: RunningPep = await make_pep(lambda c: c["pdp"].update(breaker={"failure_threshold": 2, "open_ms": 60000}))
    await fault_pdp.apply("refuse")
    for _ in range(2):
        assert (await get(pep.url + "/tools/x"))[1] == "pdp_unreachable"
    assert await get(pep.url + "/tools/x") == (403, "circuit_open")

    edit(pep, lambda c: c["routes"][0].update(timeout_ms=1000))  # the PDP config is unchanged
    assert await pep.server.reload_config()
    assert await get(pep.url + "/tools/x") == (403, "circuit_open")

    await fault_pdp.apply("allow")
    edit(pep, lambda c: c["pdp"].update(timeout_ms=500))  # a changed PDP config: a new client, a new breaker
    assert await pep.server.reload_config()
    assert await get(pep.url + "/tools/x") == (200, None)
    assert metric(await scrape(pep), "pep_circuit_state") == 0


async def test_a_changed_file_is_reloaded_without_a_signal(make_pep: PepStarter, upstream: RecordingUpstream) -> None:
    pep: RunningPep = await make_pep()
    edit(pep, lambda c: c["routes"].append({"name": "crm", "match": {"path_prefix": "/crm"}, "upstream": upstream.url}))
    async with asyncio.timeout(10):
        while await get(pep.url + "/crm/x") != (200, None):  # noqa: ASYNC110 - the file is checked once a second
            await asyncio.sleep(0.2)
    assert metric(await scrape(pep), "pep_config_reloads_total", result="success") == 1
