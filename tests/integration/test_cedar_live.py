"""The embedded Cedar PDP in a running PEP: decisions by route and method, no circuit breaker for an in-process PDP,
and policy reloads (Server.reload_config, and SIGHUP to a real `pep run`) that keep the last good policies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import RunningPep
from tests.support.observe import metric
from tests.support.process import pep_env, read_line
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]
REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"failclosed-pep: proxy on ([0-9.]+):(\d+), admin on ([0-9.]+):(\d+)")

GET_TOOLS = 'permit(principal, action == Action::"GET", resource == Route::"tools");\n'
POST_TOOLS = 'permit(principal, action == Action::"POST", resource == Route::"tools");\n'
BROKEN = "permit(principal, action, resource) when {"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.cedar"
    path.write_text(GET_TOOLS)
    return path


def cedar(policies: Path, upstream_url: str) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"] = {"kind": "cedar", "policies": str(policies), "breaker": {"failure_threshold": 2}}
        raw["routes"].append({"name": "admin", "match": {"path_prefix": "/admin"}, "upstream": upstream_url})

    return mutate


def rewrite(path: Path, text: str | None) -> None:
    """Replace the policy file's text (None: delete it). Small and local, so done synchronously."""
    if text is None:
        path.unlink()
    else:
        path.write_text(text)


async def call(client: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, str | None]:
    async with client.request(method, url) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason")


async def scrape(client: aiohttp.ClientSession, pep: RunningPep) -> str:
    async with client.get(pep.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_allow_and_deny_by_route_and_method(
    make_pep: PepFactory, policy_file: Path, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep: RunningPep = await make_pep(cedar(policy_file, upstream.url))
    assert await call(client, pep.url + "/tools/search?q=1") == (200, None)
    assert await call(client, pep.url + "/tools/search", "POST") == (403, "policy_denied")
    assert await call(client, pep.url + "/admin/users") == (403, "policy_denied")
    assert await call(client, pep.url + "/elsewhere") == (403, "no_route")
    assert [s.target for s in upstream.seen] == ["/tools/search?q=1"]
    entries = await pep.log_entries()
    assert [(e["route"], e["decision"], e["reason"]) for e in entries] == [
        ("tools", "allow", "allowed"),
        ("tools", "deny", "policy_denied"),
        ("admin", "deny", "policy_denied"),
        ("_unmatched", "deny", "no_route"),
    ]
    assert entries[0]["detail"] == "policy0"  # the permitting policy
    text = await scrape(client, pep)
    assert metric(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 1
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="ok") == 3


async def test_evaluation_errors_never_open_a_circuit(
    make_pep: PepFactory, policy_file: Path, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    rewrite(policy_file, GET_TOOLS + "permit(principal, action, resource) when { context.missing == 1 };\n")
    pep: RunningPep = await make_pep(cedar(policy_file, upstream.url))  # failure_threshold: 2, if there were one
    assert pep.server.engine is not None
    assert pep.server.engine.breaker is None
    for _ in range(12):
        assert await call(client, pep.url + "/tools/search") == (403, "pdp_error_status")
    assert upstream.seen == []
    async with client.get(pep.admin_url + "/readyz") as r:
        assert r.status == 200
        assert orjson.loads(await r.read())["ready"] is True
    text = await scrape(client, pep)
    assert metric(text, "pep_circuit_state") == 0
    assert metric(text, "pep_circuit_transitions_total") == 0
    assert metric(text, "pep_decisions_total", reason="circuit_open") == 0
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason="pdp_error_status") == 12
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="error") == 12  # never retried
    entries = await pep.log_entries()
    assert {e["circuit"] for e in entries} == {"closed"}
    assert all(e["attempts"] == 1 for e in entries)
    assert "missing" in entries[0]["detail"]


async def test_reload_rereads_policies_and_keeps_the_last_good_ones(
    make_pep: PepFactory,
    policy_file: Path,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pep: RunningPep = await make_pep(cedar(policy_file, upstream.url))
    assert await call(client, pep.url + "/tools/x", "POST") == (403, "policy_denied")

    rewrite(policy_file, POST_TOOLS)
    assert await pep.server.reload_config()
    assert await call(client, pep.url + "/tools/x", "POST") == (200, None)
    assert await call(client, pep.url + "/tools/x") == (403, "policy_denied")
    text = await scrape(client, pep)
    assert metric(text, "pep_config_reloads_total", result="success") == 1
    assert metric(text, "pep_config_reloads_total", result="error") == 0
    assert "config reloaded" in capsys.readouterr().err

    rewrite(policy_file, BROKEN)
    assert not await pep.server.reload_config()
    assert await call(client, pep.url + "/tools/x", "POST") == (200, None)  # still the last good policies
    text = await scrape(client, pep)
    assert metric(text, "pep_config_reloads_total", result="success") == 1
    assert metric(text, "pep_config_reloads_total", result="error") == 1
    err = capsys.readouterr().err
    assert "config reload failed, keeping the last good config" in err
    assert "pdp.policies" in err

    rewrite(policy_file, None)
    assert not await pep.server.reload_config()
    assert await call(client, pep.url + "/tools/x", "POST") == (200, None)
    assert metric(await scrape(client, pep), "pep_config_reloads_total", result="error") == 2
    assert len(upstream.seen) == 3


async def decided_within(
    client: aiohttp.ClientSession, url: str, method: str, want: tuple[int, str | None], seconds: float = 2.5
) -> None:
    """The request gets `want` within `seconds` (the files are looked at once a second)."""
    got = None
    for _ in range(int(seconds / 0.1)):
        got = await call(client, url, method)
        if got == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{method} {url}: {got}, not {want}, after {seconds} s")


async def test_a_changed_policy_file_is_in_force_without_a_signal(
    make_pep: PepFactory,
    policy_file: Path,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Like the config, JWKS and credential files: no SIGHUP needed. A broken file keeps the last good policies."""
    pep: RunningPep = await make_pep(cedar(policy_file, upstream.url))
    assert await call(client, pep.url + "/tools/x", "POST") == (403, "policy_denied")

    rewrite(policy_file, POST_TOOLS)
    await decided_within(client, pep.url + "/tools/x", "POST", (200, None))
    assert await call(client, pep.url + "/tools/x") == (403, "policy_denied")
    assert f"config reloaded ({policy_file} changed)" in capsys.readouterr().err

    rewrite(policy_file, BROKEN)
    for _ in range(25):  # looked at once a second
        await asyncio.sleep(0.1)
        if metric(await scrape(client, pep), "pep_config_reloads_total", result="error") == 1:
            break
    err = capsys.readouterr().err
    assert f"config reload failed ({policy_file} changed), keeping the last good config" in err
    assert "pdp.policies" in err
    assert await call(client, pep.url + "/tools/x", "POST") == (200, None)  # the last good policies
    assert await call(client, pep.url + "/tools/x") == (403, "policy_denied")
    assert [s.method for s in upstream.seen] == ["POST", "POST"]


async def test_a_policy_directory_and_an_entities_file_are_watched(
    make_pep: PepFactory, tmp_path: Path, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "a.cedar").write_text('permit(principal in Team::"support", action, resource == Route::"tools");\n')
    entities = tmp_path / "entities.json"
    team = [{"uid": {"type": "Team", "id": "support"}, "attrs": {}, "parents": []}]
    agent: dict[str, Any] = {"uid": {"type": "Agent", "id": "spiffe://test/agent"}, "attrs": {}, "parents": []}
    entities.write_text(orjson.dumps([*team, agent]).decode())

    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"] = {"kind": "cedar", "policies": str(directory), "entities": str(entities)}

    pep: RunningPep = await make_pep(mutate)
    assert await call(client, pep.url + "/tools/x") == (403, "policy_denied")  # the agent is in no team yet

    agent["parents"] = [{"type": "Team", "id": "support"}]
    entities.write_text(orjson.dumps([*team, agent]).decode())
    await decided_within(client, pep.url + "/tools/x", "GET", (200, None))

    (directory / "b.cedar").write_text('forbid(principal, action == Action::"GET", resource);\n')  # a new file
    await decided_within(client, pep.url + "/tools/x", "GET", (403, "policy_denied"))
    (directory / "b.cedar").unlink()
    await decided_within(client, pep.url + "/tools/x", "GET", (200, None))
    allowed = [e for e in await pep.log_entries() if e["decision"] == "allow"]
    assert len(upstream.seen) == len(allowed)  # nothing went on without an allow, whatever was in force


async def test_reload_keeps_a_remote_pdp_client_and_its_breaker(
    make_pep: PepFactory, client: aiohttp.ClientSession
) -> None:
    pep: RunningPep = await make_pep()  # OPA: the same pdp config, so the same engine
    engine = pep.server.engine
    assert await pep.server.reload_config()
    assert pep.server.engine is engine
    text = await scrape(client, pep)
    assert metric(text, "pep_config_reloads_total", result="success") == 1


# --- SIGHUP to a real `pep run` -----------------------------------------------------------------------------------


async def test_sighup_reloads_the_policies_of_a_running_pep(
    tmp_path: Path, policy_file: Path, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    config = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "pdp": {"kind": "cedar", "policies": str(policy_file)},
        "decision_log": {"sink": "file", "path": str(tmp_path / "decisions.jsonl")},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": upstream.url}],
    }
    config_path = tmp_path / "pep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pep",
        "run",
        "-c",
        str(config_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=pep_env(),
    )
    try:
        assert proc.stderr is not None
        m = _LISTENING.search(await read_line(proc.stderr, "proxy on", 20))
        assert m is not None
        url = f"http://127.0.0.1:{m.group(2)}"
        admin = f"http://127.0.0.1:{m.group(4)}"
        assert await call(client, url + "/tools/x", "POST") == (403, "policy_denied")

        rewrite(policy_file, POST_TOOLS)
        os.kill(proc.pid, signal.SIGHUP)  # only the PID started above
        await read_line(proc.stderr, "config reloaded", 10)
        assert await call(client, url + "/tools/x", "POST") == (200, None)
        assert await call(client, url + "/tools/x") == (403, "policy_denied")

        rewrite(policy_file, BROKEN)
        os.kill(proc.pid, signal.SIGHUP)
        line = await read_line(proc.stderr, "config reload failed", 10)
        assert "pdp.policies" in line
        assert await call(client, url + "/tools/x", "POST") == (200, None)
        async with client.get(admin + "/metrics") as r:
            text = await r.text()
        assert metric(text, "pep_config_reloads_total", result="success") == 1
        assert metric(text, "pep_config_reloads_total", result="error") == 1
        assert len(upstream.seen) == 2

        os.kill(proc.pid, signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
