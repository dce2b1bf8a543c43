"""The reliability run: start the stack, warm it, take a baseline, run the open-loop load while the chaos
schedules break the PDPs, settle, take the same measurements again, stop everything, check, report.

    python -m reliability --mode smoke|full [--seed N] [--out DIR]

Exit status 0 when every check passed, 1 when one failed, 2 when the run itself could not be done (a missing
tool, a process that did not start): it never skips.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from reliability import checks, load, plan, procfs, report, sensitivity
from reliability.stack import (
    Deadend,
    PepProcess,
    RunError,
    TimedFaultPdp,
    TrackingUpstream,
    cerbos_pep_config,
    fault_pep_config,
)
from tests.support.cerbos import POLICIES, CerbosServer, CerbosUnavailable, check_version, find_binary
from tests.support.fault_pdp import MODES
from tests.support.process import REPO, pep_env

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_S = 0.5
SETTLE_TIMEOUT_S = 20.0
LOAD_START_MARGIN_S = 3.0  # the load process imports, and opens its connections, before request 0 is due
BREAKING = frozenset({"kill", "freeze", "stop", "restart"})  # Cerbos actions that make it unhealthy


@dataclass
class Stack:
    out: Path
    cerbos: CerbosServer
    fault: TimedFaultPdp
    upstreams: dict[str, TrackingUpstream]
    deadend_port: int
    peps: dict[str, PepProcess] = field(default_factory=dict)

    def pdp_port(self, pep: str) -> int:
        return self.cerbos.http_port if pep == plan.CERBOS else self.fault.port

    def roles(self, pep: str) -> dict[str, tuple[str, int]]:
        p = self.peps[pep]
        return {
            "client": ("local", p.proxy_port),
            "admin": ("local", p.admin_port),
            "upstream": ("remote", self.upstreams[pep].port),
            "pdp": ("remote", self.pdp_port(pep)),
            "deadend": ("remote", self.deadend_port),
        }


def _metric_value(text: str, name: str) -> float | None:
    prefix = name + " "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def scrape(session: aiohttp.ClientSession, pep: PepProcess) -> str:
    async with session.get(f"{pep.admin_url}/metrics") as resp:
        resp.raise_for_status()
        return await resp.text()


def proc_snapshot(stack: Stack) -> dict[str, dict[str, Any]]:
    """Per PEP, what /proc says: memory, descriptors by role, and whether both ends agree on the upstream
    connections. Run in a thread: reading /proc/net/tcp walks the kernel's whole socket table, which took up to a
    second on a busy machine and held up the upstreams and the fault PDP that share this process's event loop."""
    table = procfs.tcp_table()
    mine = procfs.fd_snapshot(os.getpid(), table)
    out = {}
    for name, pep in stack.peps.items():
        snap = procfs.fd_snapshot(pep.pid, table)
        roles = stack.roles(name)
        by_role = procfs.classify(snap.sockets, roles)
        up_port = stack.upstreams[name].port
        pep_side = {s.local_port for s in snap.sockets if s.remote_port == up_port and s.state == "ESTABLISHED"}
        up_side = {s.remote_port for s in mine.sockets if s.local_port == up_port and s.state == "ESTABLISHED"}
        pooled = sum(n for k, n in by_role.items() if k.split(":")[0] in ("upstream", "pdp", "admin"))
        out[name] = {
            "rss_kib": procfs.rss_kib(pep.pid),
            "fds": snap.total,
            "non_socket_fds": snap.non_socket,
            "fds_without_pools": snap.total - pooled,
            "client_sockets": sum(n for k, n in by_role.items() if k.startswith("client:") and k != "client:LISTEN"),
            "close_wait": sum(n for k, n in by_role.items() if k.endswith(":CLOSE_WAIT")),
            "upstream_sockets": len(pep_side),
            "upstream_peer_sockets": len(pep_side & up_side),
            "pdp_pool": sum(n for k, n in by_role.items() if k.startswith("pdp:")),
            "upstream_pool": sum(n for k, n in by_role.items() if k.startswith("upstream:")),
            "sockets": by_role,
        }
    return out


async def snapshot(stack: Stack, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    """Per PEP: memory, descriptors by role, tasks; and whether both ends agree on the upstream connections."""
    out = await asyncio.to_thread(proc_snapshot, stack)
    for name, pep in stack.peps.items():
        try:
            text = await scrape(session, pep)
        except (aiohttp.ClientError, TimeoutError):
            text = ""
        tasks = _metric_value(text, "pep_event_loop_tasks")
        out[name]["tasks"] = int(tasks) if tasks is not None else None
        out[name]["circuit"] = _metric_value(text, "pep_circuit_state")
        out[name]["in_flight"] = _metric_value(text, "pep_requests_in_flight")
    return out


async def sampler(
    stack: Stack, session: aiohttp.ClientSession, samples: list[dict[str, Any]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        t = time.time()
        for name, snap in (await snapshot(stack, session)).items():
            samples.append({"t": t, "pep": name, **snap})
        for up in stack.upstreams.values():
            up.compact()
        stack.fault.compact()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def settle(stack: Stack, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    """Waits until no client connection is left and the task counts hold still, then takes a snapshot."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous: dict[str, dict[str, Any]] | None = None
    while True:
        snap = await snapshot(stack, session)
        quiet = all(s["client_sockets"] == 0 and s["close_wait"] == 0 for s in snap.values())
        still = previous is not None and all(previous[p]["tasks"] == snap[p]["tasks"] for p in snap)
        if (quiet and still) or time.monotonic() > deadline:
            return snap
        previous = snap
        await asyncio.sleep(0.5)


async def drain_pools(stack: Stack, session: aiohttp.ClientSession, seconds: float) -> dict[str, Any]:
    """Full run: wait (bounded) for the PEPs' idle upstream connections to be closed by their keep-alive timeout."""
    if seconds <= 0:
        return {"waited_s": 0, "left": {}}
    began = time.monotonic()
    while True:
        snap = await snapshot(stack, session)
        left = {p: s["upstream_sockets"] for p, s in snap.items()}
        if not any(left.values()) or time.monotonic() - began > seconds:
            return {
                "waited_s": round(time.monotonic() - began, 1),
                "left": left,
                "bound_s": seconds,
                "pdp_pool_then": {p: s["pdp_pool"] for p, s in snap.items()},
            }
        await asyncio.sleep(1.0)


LAG_TICK_S = 0.01


async def loop_lag(lags: list[float], stop: asyncio.Event) -> None:
    """How late this process's event loop runs (it serves the upstreams and the fault PDP): each tick's delay
    beyond LAG_TICK_S, in seconds. A late loop here is a late upstream or PDP, whatever the PEPs do."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        lags.append(loop.time() - before - LAG_TICK_S)


async def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def cerbos_chaos(cerbos: CerbosServer, profile: plan.Profile, t0: float, events: list[dict[str, Any]]) -> None:
    """Kills, freezes, resumes, stops and restarts Cerbos on the profile's schedule; healthy again at the end."""

    async def act(action: str) -> None:
        begin = time.time()
        if action == "kill":
            await cerbos.kill()
        elif action == "freeze":
            cerbos.freeze()
        elif action == "resume":
            cerbos.resume()
        elif action == "stop":
            await cerbos.stop()
        elif action in ("start", "restart"):
            await cerbos.restart()  # stop (a no-op when not running), start on the same ports, wait until healthy
        else:
            raise RunError(f"unknown cerbos action {action}")
        events.append({"action": action, "begin": begin, "end": time.time(), "pid": cerbos.pid})

    await _sleep_until(t0 + profile.chaos_from)
    end = t0 + profile.chaos_to
    n = 0
    while True:
        action, dwell = profile.cerbos_steps[n % len(profile.cerbos_steps)]
        n += 1
        if action in BREAKING and time.time() + dwell > end:
            break  # a fault starts only when it can last its whole time inside the chaos window
        await act(action)
        await _sleep_until(time.time() + dwell)
    if cerbos.frozen:
        await act("resume")
    if not cerbos.running:
        await act("start")


async def fault_chaos(fault: TimedFaultPdp, profile: plan.Profile, t0: float) -> None:
    await _sleep_until(t0 + profile.chaos_from)
    end = t0 + profile.chaos_to
    n = 0
    while True:
        mode, dwell = profile.fault_steps[n % len(profile.fault_steps)]
        n += 1
        if time.time() + dwell > end:
            break
        await fault.switch(mode)
        await _sleep_until(time.time() + dwell)
    if fault.mode is not MODES["allow"]:
        await fault.switch("allow")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": distro,
        "python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "failclosed_pep": metadata.version("failclosed-pep"),
        "load_average_at_start": os.getloadavg(),
    }


def chaos_table(data: checks.RunData) -> list[dict[str, Any]]:
    """What each fault did: the decisions its PEP made while it lasted (and until the next change)."""
    rows = []
    end = max((r["done"] for r in data.results), default=data.t0)
    for pep, spans in (
        (plan.FAULT, [(a, b, f"fault PDP {m}") for a, b, m in checks._periods(data.fault_timeline, end)]),
        (
            plan.CERBOS,
            [
                (ev["begin"], nxt["begin"] if nxt else end, f"cerbos {ev['action']}")
                for ev, nxt in zip(data.cerbos_events, [*data.cerbos_events[1:], None], strict=True)
            ],
        ),
    ):
        for a, b, label in spans:
            lines = [ln for ln in data.logs[pep] if a <= checks.log_time(ln["time"]) < b]
            rows.append(
                {
                    "pep": pep,
                    "what": label,
                    "at_s": round(a - data.t0, 2),
                    "for_s": round(b - a, 2),
                    "decisions": checks.reason_histogram(lines),
                }
            )
    return sorted(rows, key=lambda r: r["at_s"])


async def soak(profile: plan.Profile, out: Path, seed: int) -> dict[str, Any]:
    try:
        binary = find_binary()
        check_version(binary)
    except CerbosUnavailable as exc:
        raise RunError(str(exc)) from None
    started = time.time()
    info = machine()
    upstreams = {pep: TrackingUpstream() for pep in plan.PEPS}
    fault = TimedFaultPdp(hang_limit=10.0)
    cerbos = CerbosServer(binary, POLICIES, out / "cerbos.log")
    deadend = Deadend()
    stack = Stack(out, cerbos, fault, upstreams, deadend.port)
    samples: list[dict[str, Any]] = []
    cerbos_events: list[dict[str, Any]] = []
    stop_sampling = asyncio.Event()
    lags: list[float] = []
    load_proc: asyncio.subprocess.Process | None = None
    background: list[asyncio.Task[None]] = []
    try:
        try:
            for up in upstreams.values():
                await up.start()
            await fault.start()
            await fault.switch("allow")
            await cerbos.start()
        except (RuntimeError, OSError) as exc:
            raise RunError(f"the stack did not start: {type(exc).__name__}: {exc}") from None
        logs = {pep: out / f"decisions-{pep}.jsonl" for pep in plan.PEPS}
        configs = {
            plan.CERBOS: cerbos_pep_config(cerbos.url, upstreams[plan.CERBOS].url, logs[plan.CERBOS]),
            plan.FAULT: fault_pep_config(
                fault.url, upstreams[plan.FAULT].url, f"http://127.0.0.1:{stack.deadend_port}", logs[plan.FAULT]
            ),
        }
        for pep in plan.PEPS:
            stack.peps[pep] = await PepProcess.start(pep, configs[pep], out)
        ports = {pep: p.proxy_port for pep, p in stack.peps.items()}
        connector = aiohttp.TCPConnector(limit_per_host=1)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
            for running in stack.peps.values():
                if _metric_value(await scrape(session, running), "pep_event_loop_tasks") is None:
                    print(f"reliability: pep_event_loop_tasks is not exported by {running.name}", file=sys.stderr)
            background.append(asyncio.create_task(sampler(stack, session, samples, stop_sampling)))
            background.append(asyncio.create_task(loop_lag(lags, stop_sampling)))
            warm = await load.warm(ports)
            quiet_before = await settle(stack, session)

            t0 = time.time() + LOAD_START_MARGIN_S
            load_out = out / "load.json"
            argv = [sys.executable, "-m", "reliability.load", "--rate", str(profile.rate)]
            argv += ["--duration", str(profile.duration), "--t0", repr(t0), "--seed", str(seed), "--out", str(load_out)]
            for pep, port in ports.items():
                argv += ["--port", f"{pep}={port}"]
            with (out / "load.stderr").open("wb") as err:
                load_proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO, env=pep_env()
                )
            chaos = [
                asyncio.create_task(cerbos_chaos(cerbos, profile, t0, cerbos_events)),
                asyncio.create_task(fault_chaos(fault, profile, t0)),
            ]
            try:
                async with asyncio.timeout(profile.duration + LOAD_START_MARGIN_S + 60):
                    code = await load_proc.wait()
            except TimeoutError:
                raise RunError("the load process did not finish in time") from None
            try:
                await asyncio.gather(*chaos)
            except (RuntimeError, OSError) as exc:  # Cerbos that does not come back, a port taken meanwhile
                raise RunError(f"a chaos action failed: {type(exc).__name__}: {exc}") from None
            if code != 0:
                raise RunError(f"the load process failed ({code}): {(out / 'load.stderr').read_text()[-3000:]}")
            loaded = orjson.loads(load_out.read_bytes())

            quiet_after = await settle(stack, session)
            pool_drain = await drain_pools(stack, session, profile.pool_drain_s)
            metrics_final = {pep: await scrape(session, p) for pep, p in stack.peps.items()}
            stop_sampling.set()
            await asyncio.gather(*background)
        exits = {}
        for pep, p in stack.peps.items():
            code_, seconds = await p.stop()
            exits[pep] = {"code": code_, "seconds": round(seconds, 3)}
        for up in upstreams.values():
            up.compact()
        fault.compact()
        results = warm + loaded.pop("results")
        data = checks.RunData(
            profile=profile,
            t0=t0,
            load=loaded,
            results=results,
            logs={pep: [orjson.loads(line) for line in path.read_bytes().splitlines()] for pep, path in logs.items()},
            deliveries={pep: up.deliveries for pep, up in upstreams.items()},
            cut={pep: up.cut for pep, up in upstreams.items()},
            fault_timeline=fault.timeline,
            cerbos_events=cerbos_events,
            samples=samples,
            metrics_final=metrics_final,
            quiet_before=quiet_before,
            quiet_after=quiet_after,
            pool_drain=pool_drain,
            exits=exits,
            stderr={pep: p.stderr_path.read_text(errors="replace") for pep, p in stack.peps.items()},
            upstream_timing={pep: up.timing for pep, up in upstreams.items()},
            runner_lag_s=lags,
        )
        (out / "samples.json").write_bytes(orjson.dumps(samples))
        meta = {
            "profile": profile.name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
            "seed": seed,
            "machine": info,
            "settings": {
                "rate_per_s": profile.rate,
                "duration_s": profile.duration,
                "chaos_s": [profile.chaos_from, profile.chaos_to],
                "pdp_timeout_ms": plan.PDP_TIMEOUT_MS,
                "retries": 1,
                "breaker": [plan.FAILURE_THRESHOLD, plan.OPEN_MS, plan.HALF_OPEN_PROBES],
                "fault_route_timeout_ms": plan.FAULT_ROUTE_TIMEOUT_MS,
                "client_connections_per_pep": load.POOL_SIZE,
                "cerbos": checks_version(binary),
            },
            "inputs": {
                "requests": len(results),
                "per_pep": {pep: sum(1 for r in results if plan.BY_NAME[r["kind"]].pep == pep) for pep in plan.PEPS},
                "decision_log_lines": {pep: len(lines) for pep, lines in data.logs.items()},
                "upstream_requests": {pep: len(d) for pep, d in data.deliveries.items()},
                "fault_pdp_requests": fault.served,
                "cerbos_actions": [e["action"] for e in cerbos_events],
                "fault_pdp_modes": [m for _, _, m in fault.timeline],
            },
        }
        # Everything the checks read, to run them again without another soak (`--recheck`).
        (out / "rundata.pickle").write_bytes(pickle.dumps((data, meta)))
        return judge(data, meta)
    finally:
        stop_sampling.set()
        for task in background:
            task.cancel()
        if load_proc is not None and load_proc.returncode is None:
            load_proc.kill()
            await load_proc.wait()
        for p in stack.peps.values():
            if p.proc.returncode is None:
                await p.stop()
        await cerbos.stop()
        await fault.stop()
        for up in upstreams.values():
            await up.stop()
        deadend.close()


def judge(data: checks.RunData, meta: dict[str, Any]) -> dict[str, Any]:
    verdicts = checks.run_checks(data)
    verdicts.append(sensitivity.check_sensitivity(data, {c.name for c in verdicts if not c.passed}))
    return {
        **meta,
        "passed": all(c.passed for c in verdicts),
        "chaos": chaos_table(data),
        "runner_loop_lag_ms": lag_figures(data.runner_lag_s),
        "checks": [c.as_json() for c in verdicts],
    }


def lag_figures(lags: list[float]) -> dict[str, float | int | None]:
    """How late the run's own event loop (the upstreams, the fault PDP) ran: a busy machine shows here."""
    ordered = sorted(lags)
    if not ordered:
        return {"ticks": 0, "p99": None, "max": None, "over_100_ms": 0}
    return {
        "ticks": len(ordered),
        "p99": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
        "over_100_ms": sum(1 for lag in ordered if lag > 0.1),
    }


def checks_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    return out.splitlines()[0].strip() if out else "?"


def print_report(result: dict[str, Any], path: Path) -> None:
    verdict = "PASSED" if result["passed"] else "FAILED"
    print(f"reliability: {result['profile']} run {verdict} in {result['wall_s']} s ({path})")
    for c in result["checks"]:
        print(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['summary']}")
        for p in c["problems"]:
            print(f"        - {p}")
        if c["problem_count"] > len(c["problems"]):
            print(f"        ... and {c['problem_count'] - len(c['problems'])} more")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=sorted(plan.PROFILES), required=True)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: reliability/results)")
    parser.add_argument(
        "--recheck", action="store_true", help="run the checks again on the last run of this mode (no new soak)"
    )
    args = parser.parse_args()
    profile = plan.PROFILES[args.mode]
    out = args.out / profile.name
    if args.recheck:
        # Our own file, written by the run above in this directory: not data from elsewhere.
        data, meta = pickle.loads((out / "rundata.pickle").read_bytes())  # noqa: S301
        result = judge(data, meta)
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        try:
            import uvloop

            result = uvloop.run(soak(profile, out, args.seed))
        except RunError as exc:
            print(f"reliability: FAILED to run: {exc}", file=sys.stderr)
            return 2
    path = args.out / f"{profile.name}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (args.out / f"{profile.name}.md").write_text(report.markdown(result))
    print_report(result, path)
    return 0 if result["passed"] else 1
