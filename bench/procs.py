"""Processes the benchmark starts: free loopback ports, CPU pinning, /proc accounting, and stopping by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not work: the run fails loudly, it never skips."""


def free_port() -> int:
    """A port that was free on the loopback a moment ago (bound to port 0 and read back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def pinned(cores: str, argv: Sequence[str]) -> list[str]:
    """`argv` run on the given CPU list (taskset -c)."""
    return ["taskset", "-c", cores, *argv]


@dataclass
class Proc:
    """A child process started by the benchmark. `stop()` signals this PID (and its own children) only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _stopped: bool = field(default=False, init=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.popen.poll() is not None:
            return
        children = descendants(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        # Workers the process started (workers: N) are ours too: by PID, only those seen as its children.
        deadline = time.monotonic() + timeout
        for child in children:
            while _exists(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _exists(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def start(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return Proc(name, popen, log)


def wait_listening(proc: Proc, port: int, timeout: float = 15.0) -> None:
    """Until `port` accepts connections on the loopback; fails if `proc` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode} before listening:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on {LOOPBACK}:{port} within {timeout:.0f}s:\n{proc.log_tail()}")


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree = _children_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def kernel_seconds(pid: int) -> float:
    """stime of one process (all its threads), in seconds: its system calls, and on loopback the receiving side of
    every send it makes (the peer's TCP input and wake-up run in the sender's system call)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[12]) / CLK_TCK


def tree_kernel_seconds(pid: int) -> dict[int, float]:
    """Kernel CPU seconds per process of `pid` and its descendants."""
    out: dict[int, float] = {}
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            out[p] = kernel_seconds(p)
    return out


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds per process of `pid` and its descendants (worker processes)."""
    out: dict[int, float] = {}
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            out[p] = cpu_seconds(p)
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `tree_cpu_seconds` readings (processes present in the second one)."""
    return sum(after[p] - before.get(p, 0.0) for p in after)


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of `pid` plus its descendants, in KiB (shared pages are counted per process)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out: list[tuple[int, int]] = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]  # idle + iowait
            total = sum(values[:8])  # guest time is already counted in user
            out.append((total - idle, total))
    return out


def wakeup_interrupts() -> list[int]:
    """Per CPU, the inter-processor interrupts that wake it for another core's work (/proc/interrupts `CAL`:
    function calls, which a wake-up of a task sleeping on an idle core sends; `RES`: rescheduling). On loopback a
    sender's system call wakes its peer: counted on the load core, they say how often the proxy woke a sleeping
    nginx or wrk per request."""
    counts: list[int] = []
    for line in Path("/proc/interrupts").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("CAL:", "RES:"):
            values = [int(v) for v in parts[1:] if v.isdigit()]
            counts = [a + b for a, b in zip(counts, values, strict=False)] if counts else values
    return counts


def core_busy(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """Busy fraction per CPU between two `cpu_times` readings."""
    out: list[float] = []
    for (b0, t0), (b1, t1) in zip(before, after, strict=True):
        out.append((b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
    return out


def busy_seconds(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float:
    """CPU seconds spent busy on all CPUs between two `cpu_times` readings."""
    return sum(b1 - b0 for (b0, _), (b1, _) in zip(before, after, strict=True)) / CLK_TCK


def wait_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Waits (up to `max_wait` s) until the machine is busy with under `threshold` cores, sampled over 0.5 s.

    Returns (seconds waited, cores busy in the last sample). Other work on a 2-core machine (a test suite, a
    build) would be measured as the proxy's slowness. Call it while everything of the benchmark is idle.
    """
    started = time.monotonic()
    while True:
        before = cpu_times()
        time.sleep(0.5)
        cores = busy_seconds(before, cpu_times()) / 0.5
        waited = time.monotonic() - started
        if cores < threshold or waited >= max_wait:
            return waited, cores
