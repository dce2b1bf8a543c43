from __future__ import annotations

import aiohttp

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream


async def test_allow_then_deny(pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/tools/search?q=1") as r:
            assert r.status == 200
        fault_pdp.set("deny")
        async with s.get(pep.url + "/tools/search?q=2") as r:
            assert r.status == 403
            assert r.headers["x-pep-reason"] == "policy_denied"
    assert [x.target for x in upstream.seen] == ["/tools/search?q=1"]
    entries = await pep.log_entries()
    assert [e["decision"] for e in entries] == ["allow", "deny"]
