"""The decision log's file sink: reopened on SIGHUP for rotation; with `required: true`, failing writes deny."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.conftest import PepStarter, RunningPep
from tests.support.upstream import RecordingUpstream


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


async def test_required_log_that_cannot_be_written_denies(make_pep: PepStarter, upstream: RecordingUpstream) -> None:
    def unwritable(c: dict[str, object]) -> None:
        c["decision_log"] = {"sink": "file", "path": "/dev/full", "required": True}  # every write: ENOSPC

    pep: RunningPep = await make_pep(mutate=unwritable)
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/tools/first") as r:
            assert r.status == 200  # nothing has failed yet: a write is only tried after the decision
        await pep.server.decision_log.flush()
        assert pep.server.decision_log.failing
        for _ in range(3):
            async with s.get(pep.url + "/tools/next") as r:
                assert (r.status, r.headers["x-pep-reason"]) == (403, "audit_unavailable")
        async with s.get(pep.admin_url + "/metrics") as r:
            text = await r.text()
    assert [x.target for x in upstream.seen] == ["/tools/first"]
    assert 'pep_decisions_total{decision="deny",reason="audit_unavailable",route="tools"} 3.0' in text
    assert "pep_decision_log_dropped_total 1.0" in text
