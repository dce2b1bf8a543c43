"""py-spy on the PEP under closed-loop load: the functions where its CPU time goes (not part of the numbers)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import LOOPBACK, BenchError
from bench.targets import LOAD_CORES, Running, Workload

_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    """`Proxy._handle (pep/proxy.py:150)` -> `Proxy._handle (pep/proxy.py)`: lines of one function together."""
    return _LINE.sub(")", frame.strip())


def top_frames(raw: str, limit: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the samples in py-spy's raw (folded) output, per function."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if total == 0:
        raise BenchError("py-spy recorded no samples")

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 4)} for f, n in counter.most_common(limit)]

    # Frames every sample goes through (the entry point, the event loop) say nothing: leave them out.
    busy = Counter({f: n for f, n in inclusive.items() if n < total * 0.98})
    return {"samples": total, "self": share(own), "inclusive": share(busy)}


def profile(
    running: Running, workload: Workload, script: Path, pyspy: Path, seconds: int, work: Path
) -> dict[str, Any]:
    """Samples the PEP with py-spy (100 Hz) while wrk keeps 16 connections busy."""
    if running.proc is None:
        raise ValueError("only a proxy process can be profiled")
    out = work / f"pyspy-{workload.name}.txt"
    argv = [str(pyspy), "record", "--pid", str(running.proc.pid), "--duration", str(seconds)]
    spy = under_load(
        running, workload, script, seconds, [*argv, "--rate", "100", "--format", "raw", "--output", str(out)]
    )
    if spy.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {spy.stderr[-1500:]}")
    return {"workload": workload.name, "seconds": seconds, **top_frames(out.read_text())}


def under_load(
    running: Running, workload: Workload, script: Path, seconds: int, sampler: list[str]
) -> subprocess.CompletedProcess[str]:
    """Runs `sampler` (a profiler attached to the proxy for `seconds`) while wrk keeps 16 connections busy."""
    url = f"http://{LOOPBACK}:{running.port}{workload.path}"
    load_argv = ["wrk", "-t1", "-c16", f"-d{seconds + 2}s", "-s", str(script), url]
    load = subprocess.Popen(procs.pinned(LOAD_CORES, load_argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return subprocess.run(sampler, capture_output=True, text=True, timeout=seconds + 60, check=False)
    finally:
        load.wait(seconds + 30)
