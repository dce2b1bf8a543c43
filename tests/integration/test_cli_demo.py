"""The command line as a user runs it: `python -m pep demo` and `pep run -c`, in child processes.

Only processes started here are signalled, by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from pep.admin import bound_address
from pep.demo import OPA_PATH, REGO, pdp_app
from tests.support.process import pep_env

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"failclosed-pep: proxy on ([0-9.]+):(\d+), admin on ([0-9.]+):(\d+)")


async def _pep(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pep",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=pep_env(),
    )


async def _finish(proc: asyncio.subprocess.Process, seconds: float) -> tuple[int, str, str]:
    """Wait for our child; kill it (by its own PID, via the Process object) if it overstays."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"pep did not exit within {seconds} s: {err.decode(errors='replace')}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _config(tmp_path: Path, log_path: Path) -> Path:
    config = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "pdp": {"kind": "opa", "url": "http://127.0.0.1:9/v1/data/pep/authz", "timeout_ms": 100},
        "decision_log": {"sink": "file", "path": str(log_path)},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("args", "third"),
    [
        ((), "pdp_error_status"),  # the default: embedded Cedar, a policy that cannot be evaluated
        (("--pdp", "opa"), "pdp_unreachable"),
        (("--pdp", "cerbos"), "pdp_unreachable"),  # the real Cerbos binary that `make test` installs
    ],
    ids=["cedar", "opa", "cerbos"],
)
async def test_demo_shows_allow_deny_and_fail_closed(args: tuple[str, ...], third: str) -> None:
    proc = await _pep("demo", *args)
    code, out, err = await _finish(proc, 60)
    assert code == 0, out + err
    assert re.search(r"-> 200 x-pep-reason=allowed\s+\[as expected\]", out), out
    assert re.search(r"-> 403 x-pep-reason=policy_denied\s+\[as expected\]", out), out
    assert re.search(rf"-> 403 x-pep-reason={third}\s+\[as expected\]", out), out
    assert "UNEXPECTED" not in out
    assert "demo: all three outcomes as expected" in out


async def test_run_refuses_a_decision_log_in_a_missing_directory(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "no-such-dir" / "decisions.jsonl")
    proc = await _pep("run", "-c", str(config))
    code, _, err = await _finish(proc, 20)
    assert code == 2, err
    assert "decision_log.path" in err
    assert str(config) in err
    assert "failclosed-pep: proxy on" not in err  # it never started listening


async def test_run_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "decisions.jsonl"
    config = _config(tmp_path, log_path)
    proc = await _pep("run", "-c", str(config))
    try:
        assert proc.stderr is not None
        # The PDP of this config is not there: said first, then the listening line.
        warning = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode(errors="replace")
        assert warning.startswith("failclosed-pep: warning: PDP http://127.0.0.1:9 unreachable: "), warning
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode(errors="replace")
        m = _LISTENING.search(line)
        assert m is not None, line
        proxy_port, admin_port = int(m.group(2)), int(m.group(4))
        assert proxy_port != admin_port
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
                assert r.status == 200
            # The PDP in this config is unreachable: the proxy is up and fails closed.
            async with s.get(f"http://127.0.0.1:{proxy_port}/tools/x") as r:
                assert r.status == 403
                assert r.headers["x-pep-reason"] in ("pdp_unreachable", "pdp_timeout")
        os.kill(proc.pid, signal.SIGTERM)  # only the PID started above
        code, _, err = await _finish(proc, 15)
        assert code == 0, err
        assert "Traceback" not in err
        assert b'"decision":"deny"' in log_path.read_bytes()  # the log was flushed on the way out
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)


async def test_the_opa_demo_decides_with_the_rego_it_names(tmp_path: Path) -> None:
    """`make demo PDP=opa` names config/policies/demo.rego: that file, evaluated, is what decides (a copy that
    also allows the shell allows it)."""
    loosened = tmp_path / "demo.rego"
    loosened.write_text(REGO.read_text().replace('input.request.method == "GET"', 'input.request.method != ""'))

    async def ask(policy: Path, method: str, path: str) -> object:
        runner = web.AppRunner(pdp_app(policy))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        doc = {"route": {"name": "tools"}, "request": {"method": method, "path": path}}
        try:
            url = f"http://127.0.0.1:{bound_address(site)[1]}{OPA_PATH}"
            async with aiohttp.ClientSession() as s, s.post(url, json={"input": doc}) as r:
                return await r.json()
        finally:
            await runner.cleanup()

    assert await ask(REGO, "GET", "/tools/search") == {"result": {"allow": True}}
    denied = {"result": {"allow": False, "reason": "only search is allowed for this agent"}}
    assert await ask(REGO, "POST", "/tools/search") == denied
    assert await ask(loosened, "POST", "/tools/search") == {"result": {"allow": True}}
