"""The last line of defence of just-in-time credentials: an allow that reached the forwarder without the route's
credential (a code path that skipped `Proxy._credential`, such as a decision taken again after an approval) is
denied, and the upstream sees nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import PepStarter
from tests.support.upstream import RecordingUpstream


async def test_an_allow_without_its_credential_is_never_forwarded(
    make_pep: PepStarter, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    secret = tmp_path / "as-secret"
    secret.write_text("s3cret")
    credential = {
        "kind": "client_credentials",
        "token_endpoint": "http://127.0.0.1:9/token",
        "client_id": "pep",
        "client_secret_file": str(secret),
        "resource": "https://reports.example/api",
    }

    def mutate(raw: dict[str, Any]) -> None:
        route = {"name": "reports", "match": {"path_prefix": "/reports"}, "upstream": upstream.url}
        raw["routes"].append({**route, "credential": credential})

    pep = await make_pep(mutate=mutate)
    # As a path that forgot to obtain the credential would: the route's source is gone, so the allow carries none.
    # (The runtime's, not a patched method: compiled (pep/native.py), the proxy calls its own methods directly.)
    proxy = pep.server.proxy
    assert proxy is not None
    proxy.runtime = dataclasses.replace(proxy.runtime, jit={})
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/reports/x", headers={"authorization": "Bearer caller"}) as r:
            assert (r.status, r.headers["x-pep-reason"]) == (403, "internal_error")
        async with s.get(pep.url + "/tools/x") as r:  # a route without a credential is not affected
            assert r.status == 200
    assert [u.target for u in upstream.seen] == ["/tools/x"]
