"""One measurement run against a started target: closed loop (wrk), 1 connection (wrk), open loop, CPU, RSS."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import LOOPBACK, BenchError
from bench.targets import LOAD_CORES, Running, Stubs, Workload

# wrk prints this line from the script's done(): exact counts and microsecond percentiles, no text to scrape.
ROOT = Path(__file__).resolve().parent.parent

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Durations:
    """Seconds per phase of one run, and the open-loop rate (requests per second)."""

    warmup: int
    closed: int
    single: int
    open: float
    rate: float
    connections: int = 16


def wrk_script(workload: Workload, work: Path) -> Path:
    """The wrk Lua script of a workload: its method, headers and body, and the JSON summary."""
    path = work / f"wrk-{workload.name}.lua"
    lines = [f'wrk.method = "{workload.method}"']
    for name, value in workload.headers:
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    if workload.body:
        body_file = work / f"body-{workload.name}.bin"
        body_file.write_bytes(workload.body)
        lines.append(f'local f = assert(io.open("{body_file}", "rb")); wrk.body = f:read("*a"); f:close()')
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def wrk(port: int, workload: Workload, script: Path, connections: int, seconds: int) -> dict[str, Any]:
    """wrk on the load core: `connections` connections, one thread, `seconds` long. Fails on any error."""
    url = f"http://{LOOPBACK}:{port}{workload.path}"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url]
    out = subprocess.run(
        procs.pinned(LOAD_CORES, argv), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]} {out.stderr[-1000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    errors = {k: result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")}
    if result["requests"] <= 0 or any(errors.values()):
        raise BenchError(f"wrk against {url}: {result['requests']} requests, errors {errors} (non-2xx or socket)")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def open_loop(port: int, workload: Workload, work: Path, d: Durations) -> dict[str, Any]:
    """The open-loop generator (bench/openloop.py) on the load core at `d.rate` for `d.open` seconds."""
    request = work / f"request-{workload.name}-{port}.bin"
    request.write_bytes(workload.raw_request(port))
    out_file = work / f"openloop-{workload.name}-{port}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.openloop",
        "--port",
        str(port),
        "--request",
        str(request),
        "--rate",
        str(d.rate),
        "--duration",
        str(d.open),
        "--out",
        str(out_file),
    ]
    run = subprocess.run(
        procs.pinned(LOAD_CORES, argv), capture_output=True, text=True, timeout=d.open + 60, check=False, cwd=ROOT
    )
    if run.returncode != 0:
        raise BenchError(f"the open-loop generator failed ({run.returncode}): {run.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out_file.read_text())
    failed = result["non_2xx"] + result["closed"] + result["unanswered"]
    if failed or result["completed"] == 0:
        raise BenchError(
            f"open loop at {d.rate:g}/s: {result['completed']} answered, {result['non_2xx']} non-2xx, "
            f"{result['closed']} closed connections, {result['unanswered']} unanswered"
        )
    return result


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (wrk, taskset)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _wakeups(before: list[int], after: list[int]) -> float:
    cores = [int(c) for c in LOAD_CORES.split(",")]
    return float(sum(after[c] - before[c] for c in cores if c < min(len(before), len(after))))


def measure(
    running: Running, workload: Workload, script: Path, work: Path, d: Durations, stubs: Stubs
) -> dict[str, Any]:
    """All measurements of one repetition. CPU and peak RSS are the proxy process's (and its workers').

    `foreign_cpu_cores`: CPU time the machine spent during the closed-loop run outside the proxy, nginx, wrk and
    this harness, per second of wall time: anything else running (a test suite, a build) skews the numbers.
    """
    port = running.port
    pid = running.proc.pid if running.proc is not None else None
    if d.warmup > 0:
        wrk(port, workload, script, d.connections, d.warmup)

    cpu_before = procs.tree_cpu_seconds(pid) if pid is not None else {}
    kernel_before = procs.tree_kernel_seconds(pid) if pid is not None else {}
    stub_pid = stubs.proc.pid
    stub_before = procs.cpu_seconds(stub_pid)
    accepted_before = stubs.accepted()
    own_before = _own_cpu()
    cores_before = procs.cpu_times()
    wakeups_before = procs.wakeup_interrupts()
    t0 = time.monotonic()
    closed = wrk(port, workload, script, d.connections, d.closed)
    wall = time.monotonic() - t0
    cores_after = procs.cpu_times()
    wakeups_after = procs.wakeup_interrupts()
    accepted = stubs.accepted() - accepted_before - 1  # the status request itself
    cpu_s = procs.cpu_delta(cpu_before, procs.tree_cpu_seconds(pid)) if pid is not None else None
    kernel_s = procs.cpu_delta(kernel_before, procs.tree_kernel_seconds(pid)) if pid is not None else None
    stub_s = procs.cpu_seconds(stub_pid) - stub_before
    own_s = _own_cpu() - own_before
    cores = procs.core_busy(cores_before, cores_after)
    busy_s = procs.busy_seconds(cores_before, cores_after)
    foreign = max(0.0, busy_s - (cpu_s or 0.0) - stub_s - own_s) / wall

    single = wrk(port, workload, script, 1, d.single)
    loop = open_loop(port, workload, work, d)
    rss = procs.peak_rss_kib(pid) if pid is not None else None
    if running.proc is not None and not running.proc.alive():
        raise BenchError(f"{running.target.key} exited during the run:\n{running.proc.log_tail()}")
    latencies = loop.pop("latencies_us")
    return {
        "closed_rps": closed["rps"],
        "closed_requests": closed["requests"],
        "closed_p50_us": closed["p50_us"],
        "closed_p99_us": closed["p99_us"],
        "closed_wall_s": round(wall, 3),
        "core_busy": [round(c, 3) for c in cores],
        "foreign_cpu_cores": round(foreign, 3),
        # New connections to the upstream and PDP per 1,000 requests: 0 when the proxy's pools keep them alive.
        "stub_connections_per_1k": accepted * 1000 / closed["requests"],
        "load_side_cpu_us_per_request": (stub_s + own_s) * 1e6 / closed["requests"],
        "c1_rps": single["rps"],
        "c1_p50_us": single["p50_us"],
        "c1_p99_us": single["p99_us"],
        "open_p50_us": loop["latency_us"]["p50"],
        "open_p99_us": loop["latency_us"]["p99"],
        "open_p999_us": loop["latency_us"]["p99.9"],
        "open_max_us": loop["latency_us"]["max"],
        "open_achieved_rate": loop["achieved_rate"],
        "open_send_lag_p99_us": loop["send_lag_us"]["p99"],
        "open_max_queued": loop["max_queued"],
        "cpu_us_per_request": (cpu_s * 1e6 / closed["requests"]) if cpu_s is not None else None,
        # The kernel's part of it (stime): system calls, and on loopback the peer's TCP input and wake-up.
        "kernel_cpu_us_per_request": (kernel_s * 1e6 / closed["requests"]) if kernel_s is not None else None,
        # Wake-up interrupts the load core took per request (`procs.wakeup_interrupts`): the peers woken from sleep.
        "load_core_wakeups_per_request": _wakeups(wakeups_before, wakeups_after) / closed["requests"],
        # Requests per second of the proxy's CPU time: throughput per core even where a core was not saturated.
        "requests_per_cpu_s": (closed["requests"] / cpu_s) if cpu_s else None,
        "proxy_cpu_s": cpu_s,
        "peak_rss_kib": rss,
        "_open_latencies_us": latencies,
    }
