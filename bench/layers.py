"""perf on a proxy under closed-loop load: where its CPU goes by layer, for the PEP and Envoy side by side.

py-spy (bench/profile.py) names the PEP's Python functions but cannot see below them: a socket write's cost is
charged to the Python line that made it, and it has misattributed time to cheap calls. perf samples the process's
CPU clock in both user space and the kernel, so its shares add up to the CPU time `cpu_us_per_request` counts:
the interpreter, each C extension, the C library and the kernel, and inside the kernel the part spent waking the
peers (`sock_def_readable`: on loopback a send runs the receiver's TCP input and its wake-up in the sender's
system call). Not part of the numbers: perf's sampling costs the process a little.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import BenchError
from bench.profile import under_load
from bench.targets import Running, Workload

# perf's shared-object names, as layers a reader recognizes (the first pattern that matches).
LAYERS = (
    ("CPython interpreter", re.compile(r"^libpython|^python3")),
    ("compiled request path (mypyc)", re.compile(r"^pep_native_")),
    ("kernel", re.compile(r"^\[kernel")),
    ("uvloop / libuv", re.compile(r"^loop\.cpython")),
    ("httptools / llhttp", re.compile(r"^parser\.cpython")),
    ("asyncio (C)", re.compile(r"^_asyncio\.cpython")),
    ("orjson", re.compile(r"^orjson\.cpython")),
    ("C library", re.compile(r"^libc\.so|^\[vdso\]|^libm\.so")),
    ("Envoy", re.compile(r"^envoy$")),
)
_SHARE = re.compile(r"^\s*([0-9.]+)%\s+(\S.*?)\s*$")


def perf_version() -> str:
    out = subprocess.run(["perf", "--version"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"perf is not usable ({out.returncode}): {out.stderr.strip()[-300:]}")
    return out.stdout.strip().removeprefix("perf version ")


def _report(data: Path, *args: str) -> list[tuple[float, str]]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "-q", "-g", "none", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise BenchError(f"perf report failed ({out.returncode}): {out.stderr[-500:]}")
    rows = []
    for line in out.stdout.splitlines():
        match = _SHARE.match(line)
        if match:
            rows.append((float(match.group(1)), match.group(2)))
    return rows


def by_layer(dsos: list[tuple[float, str]]) -> dict[str, float]:
    """Shares per shared object folded into LAYERS (anything else is `other`), in percent of the samples."""
    out: dict[str, float] = {name: 0.0 for name, _ in LAYERS}
    out["other"] = 0.0
    for share, dso in dsos:
        name = next((layer for layer, pattern in LAYERS if pattern.search(dso)), "other")
        out[name] += share
    return {k: round(v, 1) for k, v in out.items() if v > 0}


def wakeup_share(symbols: list[tuple[float, str]]) -> float:
    """The inclusive share of `sock_def_readable` (the peer's wake-up inside a send), in percent."""
    for share, symbol in symbols:
        if symbol.split()[-1] == "sock_def_readable":
            return share
    return 0.0


def layers(running: Running, workload: Workload, script: Path, seconds: int, work: Path) -> dict[str, Any]:
    """perf record (cpu-clock, 999 Hz, call graphs) of the proxy while wrk keeps 16 connections busy."""
    if running.proc is None:
        raise ValueError("only a proxy process can be profiled")
    data = work / f"perf-{running.target.key}-{workload.name}.data"
    argv = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(running.proc.pid)]
    record = under_load(running, workload, script, seconds, [*argv, "-o", str(data), "--", "sleep", str(seconds)])
    if record.returncode != 0 or not data.exists():
        raise BenchError(f"perf record failed ({record.returncode}): {record.stderr[-1500:]}")
    dsos = _report(data, "--no-children", "--sort", "dso")
    if not dsos:
        raise BenchError(f"perf recorded no samples of {running.target.key}")
    return {
        "target": running.target.key,
        "workload": workload.name,
        "seconds": seconds,
        "layers": by_layer(dsos),
        "wakeups": round(wakeup_share(_report(data, "--children", "--sort", "sym")), 1),
    }
