"""`pep demo`: a tool API and an OPA-shaped PDP in this process, the PEP as a real `pep run` child process.

It shows the three outcomes that matter (an allow, a policy deny, a PDP outage deny), prints the decision
log, stops everything it started, and exits non-zero if any outcome is not the expected one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pep.app import bound_address

# The demo policy, as it would read in Rego (config/policies/demo.rego holds the same rules):
#   allow if { input.route.name == "tools"; input.request.method == "GET"
#              startswith(input.request.path, "/tools/search") }
DEMO_POLICY_PATH = "/v1/data/pep/authz"


def demo_policy(doc: dict[str, Any]) -> dict[str, Any]:
    req = doc.get("request", {})
    if doc.get("route", {}).get("name") != "tools":
        return {"allow": False, "reason": "unknown route"}
    if req.get("method") == "GET" and str(req.get("path", "")).startswith("/tools/search"):
        return {"allow": True}
    return {"allow": False, "reason": "only search is allowed for this agent"}


def pdp_app() -> web.Application:
    async def decide(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        return web.json_response({"result": demo_policy(body["input"])}, dumps=lambda o: orjson.dumps(o).decode())

    app = web.Application()
    app.router.add_post(DEMO_POLICY_PATH, decide)
    return app


def tool_app() -> web.Application:
    async def search(request: web.Request) -> web.Response:
        q = request.query.get("q", "")
        return web.json_response(
            {
                "tool": "search",
                "query": q,
                "results": [f"article about {q}"],
                "decision_id": request.headers.get("X-PEP-Decision-ID"),
            }
        )

    async def shell(_request: web.Request) -> web.Response:
        return web.json_response({"tool": "shell", "ran": True})

    app = web.Application()
    app.router.add_get("/tools/search", search)
    app.router.add_post("/tools/shell", shell)
    return app


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, bound_address(site)[1]


CONFIG = """\
version: 1
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
identity:
  workload: spiffe://demo.local/ns/agents/sa/support-bot
pdp:
  kind: opa
  url: http://127.0.0.1:{pdp_port}{policy_path}
  timeout_ms: 250
decision_log: {{sink: file, path: {log_path}}}
routes:
  - name: tools
    match: {{path_prefix: /tools}}
    upstream: http://127.0.0.1:{tool_port}
"""

_LISTENING = re.compile(rb"proxy on ([0-9.]+):(\d+), admin on ([0-9.]+):(\d+)")


async def _start_pep(config_path: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pep",
        "run",
        "-c",
        str(config_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 15)
    m = _LISTENING.search(line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"the PEP did not start: {line.decode(errors='replace')}")
    return proc, int(m.group(2)), int(m.group(4))


async def _show(session: aiohttp.ClientSession, title: str, method: str, url: str, expect: tuple[int, str]) -> bool:
    async with session.request(method, url) as resp:
        body = await resp.read()
        reason = resp.headers.get("x-pep-reason", "allowed")
        ok = (resp.status, reason) == expect
        print(
            f"\n== {title}\n   {method} {url}\n   -> {resp.status} x-pep-reason={reason}"
            f"   [{'as expected' if ok else f'UNEXPECTED, wanted {expect}'}]"
        )
        print(f"   {body.decode(errors='replace')[:300]}")
        return ok


async def run_demo() -> int:
    tools, tool_port = await _start(tool_app())
    pdp, pdp_port = await _start(pdp_app())
    workdir = Path(tempfile.mkdtemp(prefix="pep-demo-"))
    log_path = workdir / "decisions.jsonl"
    config_path = workdir / "pep.yaml"
    config_path.write_text(
        CONFIG.format(pdp_port=pdp_port, policy_path=DEMO_POLICY_PATH, log_path=log_path, tool_port=tool_port)
    )
    print(f"demo tool API on 127.0.0.1:{tool_port}, demo OPA-shaped PDP on 127.0.0.1:{pdp_port}")
    print(f"config: {config_path}")
    proc, proxy_port, admin_port = await _start_pep(config_path)
    print(f"failclosed-pep (pid {proc.pid}) on 127.0.0.1:{proxy_port}, admin on 127.0.0.1:{admin_port}")
    base = f"http://127.0.0.1:{proxy_port}"
    results = []
    try:
        async with aiohttp.ClientSession() as session:
            results.append(
                await _show(
                    session,
                    "1. allowed: the agent searches",
                    "GET",
                    f"{base}/tools/search?q=refunds",
                    (200, "allowed"),
                )
            )
            results.append(
                await _show(
                    session,
                    "2. policy deny: the agent tries a shell",
                    "POST",
                    f"{base}/tools/shell",
                    (403, "policy_denied"),
                )
            )
            await pdp.cleanup()
            print("\n   (the PDP is now stopped)")
            results.append(
                await _show(
                    session,
                    "3. PDP outage: fail closed",
                    "GET",
                    f"{base}/tools/search?q=refunds",
                    (403, "pdp_unreachable"),
                )
            )
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                text = await resp.text()
            print("\n== metrics (pep_decisions_total, non-zero):")
            for line in text.splitlines():
                if line.startswith("pep_decisions_total{") and not line.endswith(" 0.0"):
                    print(f"   {line}")
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await pdp.cleanup()
        await tools.cleanup()
    ok = all(results) and len(results) == 3
    await asyncio.to_thread(_report, log_path, config_path, workdir, ok)
    return 0 if ok else 1


def _report(log_path: Path, config_path: Path, workdir: Path, ok: bool) -> None:
    print(f"\n== decision log ({log_path}):")
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            print(f"   {line}")
    print("\ndemo: " + ("all three outcomes as expected" if ok else "SOMETHING WAS NOT AS EXPECTED"))
    for path in (log_path, config_path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        workdir.rmdir()


def main() -> int:
    return asyncio.run(run_demo())
