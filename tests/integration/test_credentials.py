"""Upstream credentials: injected by the PEP on allowed requests only, never the caller's, rotated without restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import PepStarter, RunningPep
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream

SECRET = "s3cr3t-token-value"


def credential_route(upstream: RecordingUpstream, **credential: Any) -> dict[str, Any]:
    return {
        "name": "crm",
        "match": {"path_prefix": "/crm"},
        "upstream": upstream.url,
        "credential": {"header": "authorization", "format": "Bearer {}", **credential},
    }


def swap_symlink(link: Path, target: Path) -> None:
    """Atomically point `link` at `target`, as Kubernetes does when it rotates a mounted secret."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


async def test_injected_on_allow_and_the_callers_copy_is_dropped(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_file=str(token)))
    )
    headers = {"Authorization": "Bearer caller-token", "Cookie": "c=1", "Proxy-Authorization": "Basic x"}
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/tickets", headers=headers) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    assert seen.getall("Authorization") == [f"Bearer {SECRET}"]
    assert "Cookie" not in seen
    doc = fault_pdp.requests[-1].body["input"]
    assert "authorization" not in doc["request"]["headers"]
    fault_pdp.set("deny")
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/tickets") as r:
        assert r.status == 403
    assert len(upstream.seen) == 1  # the credential goes out on allowed requests only
    await pep.log_entries()
    log = pep.log_path.read_text()
    assert SECRET not in log
    assert "caller-token" not in log
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        assert SECRET not in await r.text()


async def test_env_credential(make_pep: PepStarter, upstream: RecordingUpstream, monkeypatch: Any) -> None:
    monkeypatch.setenv("PEP_TEST_CRM_KEY", f"  {SECRET}  ")
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_env="PEP_TEST_CRM_KEY"))
    )
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/x") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {SECRET}"


async def test_missing_or_empty_credential_denies_that_route_only(
    make_pep: PepStarter, tmp_path: Path, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    token = tmp_path / "token"
    token.write_text("   \n")
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_file=str(token)))
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(pep.url + "/crm/x") as r:
            assert (r.status, r.headers["x-pep-reason"]) == (403, "credential_unavailable")
        async with s.get(pep.url + "/tools/x") as r:
            assert r.status == 200  # other routes are not affected
    assert [x.target for x in upstream.seen] == ["/tools/x"]
    token.write_text(SECRET)
    pep.server.reload()  # SIGHUP: looked at now, not at the next check
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/x") as r:
        assert r.status == 200
    token.unlink()
    pep.server.reload()
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/x") as r:
        assert r.headers["x-pep-reason"] == "credential_unavailable"
    assert len(upstream.seen) == 2


async def test_a_value_with_a_line_break_is_unavailable(
    make_pep: PepStarter, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    token = tmp_path / "token"
    token.write_text("abc\r\nX-Injected: 1")
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_file=str(token)))
    )
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/crm/x") as r:
        assert r.headers["x-pep-reason"] == "credential_unavailable"
    assert upstream.seen == []


async def test_rotation_while_requests_flow(make_pep: PepStarter, tmp_path: Path, upstream: RecordingUpstream) -> None:
    """Kubernetes swaps a symlink: every request carries the old or the new value, never none or the caller's."""
    (tmp_path / "v1").write_text("old-token")
    (tmp_path / "v2").write_text("new-token")
    link = tmp_path / "token"
    link.symlink_to(tmp_path / "v1")
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_file=str(link)))
    )
    statuses: list[int] = []
    stop = asyncio.Event()

    async def flow() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.get(pep.url + "/crm/x", headers={"Authorization": "Bearer caller"}) as r:
                    statuses.append(r.status)
                await asyncio.sleep(0.01)

    async with asyncio.timeout(20):
        task = asyncio.create_task(flow())
        await asyncio.sleep(0.3)
        swap_symlink(link, tmp_path / "v2")
        for _ in range(60):  # the new value must be in use within 2 s (the file is looked at once a second)
            await asyncio.sleep(0.05)
            if upstream.seen and upstream.seen[-1].headers.get("Authorization") == "Bearer new-token":
                break
        await asyncio.sleep(0.2)
        stop.set()
        await task
    values = [r.headers.getall("Authorization", []) for r in upstream.seen]
    assert statuses
    assert set(statuses) == {200}
    assert all(v in (["Bearer old-token"], ["Bearer new-token"]) for v in values), values
    assert values[0] == ["Bearer old-token"]
    assert values[-1] == ["Bearer new-token"]


async def test_a_missing_credential_is_said_on_stderr_once_per_change(
    make_pep: PepStarter, tmp_path: Path, upstream: RecordingUpstream, capsys: Any
) -> None:
    """Without a request: at start, when the file goes missing, and when it is back; never once per request."""
    token = tmp_path / "token"
    pep: RunningPep = await make_pep(
        mutate=lambda c: c["routes"].append(credential_route(upstream, value_file=str(token)))
    )
    warning = f"routes[1].credential.value_file: {str(token)!r} is missing, unreadable or empty"
    denied = "requests on route crm are denied (credential_unavailable)"
    err = capsys.readouterr().err
    assert f"failclosed-pep: warning: {pep.server.config.source}: {warning}: {denied}" in err
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(pep.url + "/crm/x") as r:
                assert r.headers["x-pep-reason"] == "credential_unavailable"
    assert upstream.seen == []

    async def said(text: str) -> str:
        """stderr until `text` appears, within 3 s (the files are looked at once a second)."""
        seen = ""
        async with asyncio.timeout(3):
            while text not in seen:
                await asyncio.sleep(0.1)
                seen += capsys.readouterr().err
        return seen

    token.write_text(SECRET)
    back = await said("route crm has its credential again")
    assert warning not in back
    token.unlink()
    gone = await said(warning)
    await asyncio.sleep(1.5)  # another check or two: nothing new to say
    assert (gone + capsys.readouterr().err).count(warning) == 1
    assert SECRET not in back + gone
