"""`pep demo`: a tool API, a PDP and the PEP (a real `pep run` child process), all on free loopback ports.

It shows the three outcomes that matter: an allow, a policy deny, and a fail-closed deny when the PDP cannot
decide. It prints the metrics and the decision log, stops everything it started, and exits non-zero if any
outcome was not the expected one. PDPs: `cedar` (embedded, the default: nothing else to run), `cerbos` (the
real Cerbos binary that `make` installs) and `opa` (a small OPA-shaped PDP in this process that evaluates
config/policies/demo.rego with regorus, a Rego interpreter: no OPA binary is needed, and the policy the demo
names is the one that decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pep.admin import bound_address

POLICIES = Path(__file__).resolve().parent.parent / "config" / "policies"
CERBOS_DEFAULT = Path(".pdp/cerbos/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64")
OPA_PATH = "/v1/data/pep/authz"
WORKLOAD = "spiffe://demo.local/ns/agents/sa/support-bot"


class DemoError(Exception):
    """Something the demo needs is missing; the message says what to do."""


@dataclass(frozen=True)
class Step:
    title: str
    method: str
    path: str
    expect: tuple[int, str]


@dataclass
class Scenario:
    """One PDP kind: the `pdp:` and `routes:` YAML for it, and what the third step does to show fail-closed."""

    pdp_yaml: str
    routes_yaml: str
    steps: tuple[Step, Step, Step]
    before_third: Callable[[], Awaitable[None]] | None = None
    note: str = ""
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


REGO = POLICIES / "demo.rego"
REGO_QUERY = "data.pep.authz"  # the package of demo.rego, served at OPA_PATH as OPA would serve it


def rego_engine(policy: Path) -> Any:
    """A regorus engine holding `policy`. regorus (the Python package gordon-to-regorus) is a development
    dependency: `make demo` installs it into .venv."""
    try:
        import regorus
    except ImportError:
        raise DemoError(
            "the OPA demo evaluates config/policies/demo.rego with regorus: run `make demo PDP=opa` (it installs it"
            " into .venv), or pip install gordon-to-regorus"
        ) from None
    engine = regorus.Engine()
    engine.add_policy(policy.name, policy.read_text(encoding="utf-8"))
    return engine


def pdp_app(policy: Path = REGO) -> web.Application:
    """OPA's REST Data API for one package: `{"input": DOC}` in, `{"result": data.pep.authz}` out (`{}` when it is
    undefined), the Rego of `policy` evaluated for real."""
    engine = rego_engine(policy)

    async def decide(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        evaluation = engine.clone()  # an engine holds its input: one per request
        evaluation.set_input_json(orjson.dumps(body["input"]).decode())
        results = orjson.loads(evaluation.eval_query_as_json(REGO_QUERY)).get("result") or []
        answer = {"result": results[0]["expressions"][0]["value"]} if results else {}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post(OPA_PATH, decide)
    return app


def tool_app() -> web.Application:
    async def search(request: web.Request) -> web.Response:
        q = request.query.get("q", "")
        body = {
            "tool": "search",
            "query": q,
            "results": [f"article about {q}"],
            "decision_id": request.headers.get("X-PEP-Decision-ID"),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def other(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"tool": request.path.rsplit("/", 1)[-1], "ran": True}), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/tools/search", search)
    app.router.add_route("*", "/tools/{name}", other)
    return app


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, bound_address(site)[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _routes(*names: str, mapping: bool) -> str:
    lines = []
    for name in names:
        lines.append(f"  - name: {name}\n    match: {{path_prefix: /tools/{name}}}\n    upstream: {{tool}}")
        if mapping:
            lines.append(
                f"    mapping: {{action: {{name: tools/call}}, resource: {{type: tool, id: {name},"
                f" properties: {{name: {name}}}}}}}"
            )
    return "\n".join(lines)


# What every scenario shows first (the third step is each PDP kind's own way to fail closed).
ALLOWED_STEP = Step("1. allowed: the agent searches", "GET", "/tools/search?q=refunds", (200, "allowed"))
DENIED_STEP = Step("2. policy deny: the agent tries a shell", "POST", "/tools/shell", (403, "policy_denied"))
TOOLS_ROUTE = "  - name: tools\n    match: {path_prefix: /tools}\n    upstream: {tool}"


async def _cedar() -> Scenario:
    return Scenario(
        pdp_yaml=f"  kind: cedar\n  policies: {POLICIES / 'demo.cedar'}",
        routes_yaml=TOOLS_ROUTE,
        steps=(
            ALLOWED_STEP,
            DENIED_STEP,
            Step(
                "3. the PDP cannot decide (a policy fails to evaluate): fail closed",
                "GET",
                "/tools/lookup_order?id=42",
                (403, "pdp_error_status"),
            ),
        ),
        note="the embedded Cedar PDP evaluates config/policies/demo.cedar in process",
    )


async def _opa() -> Scenario:
    pdp, port = await _start(pdp_app())
    scenario = Scenario(
        pdp_yaml=f"  kind: opa\n  url: http://127.0.0.1:{port}{OPA_PATH}",
        routes_yaml=TOOLS_ROUTE,
        steps=(
            ALLOWED_STEP,
            DENIED_STEP,
            Step(
                "3. PDP outage (the PDP is stopped): fail closed",
                "GET",
                "/tools/search?q=refunds",
                (403, "pdp_unreachable"),
            ),
        ),
        before_third=pdp.cleanup,
        note=f"an OPA-shaped PDP on 127.0.0.1:{port}, evaluating config/policies/demo.rego with regorus",
    )
    scenario.cleanup.append(pdp.cleanup)
    return scenario


def _cerbos_binary() -> Path:
    binary = Path(os.environ.get("CERBOS_BIN", CERBOS_DEFAULT))
    if not binary.is_file():
        raise DemoError(f"the Cerbos binary is not at {binary}: run `make demo PDP=cerbos`, which installs it")
    return binary


async def _cerbos() -> Scenario:
    binary = _cerbos_binary()
    http, grpc = _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "server",
        f"--set=server.httpListenAddr=127.0.0.1:{http}",
        f"--set=server.grpcListenAddr=127.0.0.1:{grpc}",
        "--set=storage.driver=disk",
        f"--set=storage.disk.directory={POLICIES / 'cerbos'}",
        "--set=telemetry.disabled=true",
        "--set=audit.enabled=false",
        "--log-level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )

    async def stop() -> None:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{http}/_cerbos/health") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.05)
        else:
            await stop()
            raise DemoError("Cerbos did not become healthy")
    scenario = Scenario(
        pdp_yaml=f"  kind: authzen\n  url: http://127.0.0.1:{http}",
        routes_yaml=_routes("search", "shell", mapping=True),
        steps=(
            ALLOWED_STEP,
            DENIED_STEP,
            Step(
                "3. PDP outage (Cerbos is stopped): fail closed",
                "GET",
                "/tools/search?q=refunds",
                (403, "pdp_unreachable"),
            ),
        ),
        before_third=stop,
        note=f"the real Cerbos PDP (pid {proc.pid}) on 127.0.0.1:{http}, over AuthZEN (config/policies/cerbos)",
    )
    scenario.cleanup.append(stop)
    return scenario


SCENARIOS: dict[str, Callable[[], Awaitable[Scenario]]] = {"cedar": _cedar, "cerbos": _cerbos, "opa": _opa}

CONFIG = """\
version: 1
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
identity:
  workload: {workload}
  attributes: {{tenant: acme, company_domain: acme.example}}
pdp:
{pdp}
  timeout_ms: 250
decision_log: {{sink: file, path: {log_path}}}
routes:
{routes}
"""

_LISTENING = re.compile(rb"proxy on ([0-9.]+):(\d+), admin on ([0-9.]+):(\d+)")


@contextlib.asynccontextmanager
async def _pep(config_path: Path) -> AsyncIterator[tuple[int, int]]:
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
    try:
        assert proc.stderr is not None
        said = b""
        m = None
        async with asyncio.timeout(15):
            while m is None and (line := await proc.stderr.readline()):  # warnings may come first
                said += line
                m = _LISTENING.search(line)
        if m is None:
            raise DemoError(f"the PEP did not start: {said.decode(errors='replace')}")
        print(
            f"failclosed-pep (pid {proc.pid}) on 127.0.0.1:{m.group(2).decode()}, admin on 127.0.0.1:"
            f"{m.group(4).decode()}"
        )
        yield int(m.group(2)), int(m.group(4))
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _show(session: aiohttp.ClientSession, base: str, step: Step) -> bool:
    async with session.request(step.method, base + step.path) as resp:
        body = await resp.read()
        reason = resp.headers.get("x-pep-reason", "allowed")
        ok = (resp.status, reason) == step.expect
        print(
            f"\n== {step.title}\n   {step.method} {step.path}\n   -> {resp.status} x-pep-reason={reason}"
            f"   [{'as expected' if ok else f'UNEXPECTED, wanted {step.expect}'}]"
        )
        print(f"   {body.decode(errors='replace')[:300]}")
        return ok


async def run_demo(pdp: str = "cedar") -> int:
    tools, tool_port = await _start(tool_app())
    workdir = Path(tempfile.mkdtemp(prefix="pep-demo-"))
    log_path = workdir / "decisions.jsonl"
    config_path = workdir / "pep.yaml"
    results: list[bool] = []
    scenario: Scenario | None = None
    try:
        scenario = await SCENARIOS[pdp]()
        routes = scenario.routes_yaml.replace("{tool}", f"http://127.0.0.1:{tool_port}")
        config_path.write_text(
            CONFIG.format(workload=WORKLOAD, pdp=scenario.pdp_yaml, log_path=log_path, routes=routes)
        )
        print(f"demo tool API on 127.0.0.1:{tool_port}; PDP: {scenario.note}\nconfig: {config_path}")
        async with _pep(config_path) as (proxy_port, admin_port), aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{proxy_port}"
            first, second, third = scenario.steps
            results.append(await _show(session, base, first))
            results.append(await _show(session, base, second))
            if scenario.before_third is not None:
                await scenario.before_third()
            results.append(await _show(session, base, third))
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                text = await resp.text()
            print("\n== metrics (pep_decisions_total, non-zero):")
            for line in text.splitlines():
                if line.startswith("pep_decisions_total{") and not line.endswith(" 0.0"):
                    print(f"   {line}")
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
    finally:
        for stop in scenario.cleanup if scenario else []:
            await stop()
        await tools.cleanup()
    ok = len(results) == 3 and all(results)
    await asyncio.to_thread(_report, log_path, workdir, ok)
    return 0 if ok else 1


def _report(log_path: Path, workdir: Path, ok: bool) -> None:
    print(f"\n== decision log ({log_path.name}):")
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            print(f"   {line}")
    print("\ndemo: " + ("all three outcomes as expected" if ok else "SOMETHING WAS NOT AS EXPECTED"))
    shutil.rmtree(workdir, ignore_errors=True)


def main(pdp: str = "cedar") -> int:
    return asyncio.run(run_demo(pdp))
