"""Streaming (issue 15): one large download and one large upload through each target, next to direct.

A plain `http` route forwards bodies without reading them whole, so a transfer far larger than any buffer shows
two things the request-rate runs cannot: the throughput a proxy keeps up on one core, and whether its memory stays
flat while the bytes go through (a proxy that buffered would grow by the transfer's size).

The client is curl on the load core (as wrk is). nginx serves the download from a generated file and takes the
upload with WebDAV `PUT`: it reads the whole body into a file before it answers 201, so the answer comes after the
last byte (an early `return 200` would let a proxy cut the upload short), and the stored file's size proves what
reached it. Throughput is bytes over curl's `time_total` (connect to last byte). The proxy's VmRSS is sampled every
20 ms during the transfer; its growth is the largest sample minus the one just before the transfer.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs, targets
from bench.procs import LOOPBACK, BenchError
from bench.targets import LOAD_CORES, Running, Stubs, Target

TARGETS: tuple[Target, ...] = (targets.DIRECT, targets.PEP, targets.ENVOY)
DIRECTIONS = ("download", "upload")
SAMPLE_S = 0.02
BLOB = "blob.bin"
UPLOAD_NAME = "upload/blob.bin"
MIB = 1 << 20
# Why Envoy's upload cannot be measured with the benchmark's ext_authz config (checked every run: the answer must
# be this status, or the upload is measured like any other).
ENVOY_REFUSES = 413
ENVOY_REFUSAL = "ext_authz `with_request_body` buffers the body for the PDP, at most 1 MiB, no partial message"
_WRITE_OUT = "%{http_code} %{size_download} %{size_upload} %{time_total}"


def make_blob(stubs: Stubs, size: int) -> Path:
    """The download: `size` bytes (a random 1 MiB block repeated) where nginx serves /stream/blob.bin."""
    block = os.urandom(MIB)
    path = stubs.stream_dir / BLOB
    with path.open("wb") as out:
        left = size
        while left > 0:
            out.write(block[: min(left, MIB)])
            left -= MIB
    return path


def rss_kib(pids: list[int]) -> int | None:
    """VmRSS summed over `pids` (None when none of them could be read)."""
    total, seen = 0, False
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                seen = True
                break
    return total if seen else None


class RssSampler:
    """Samples VmRSS of `pids` every `interval` seconds on a thread until `stop()`: the largest sample and how many."""

    def __init__(self, pids: list[int], interval: float = SAMPLE_S) -> None:
        self.pids = pids
        self.interval = interval
        self.max_kib = 0
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            value = rss_kib(self.pids)
            if value is not None:
                self.max_kib = max(self.max_kib, value)
                self.samples += 1
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()
        # One sample after the transfer, so a transfer shorter than the interval still has one from its end.
        value = rss_kib(self.pids)
        if value is not None:
            self.max_kib = max(self.max_kib, value)
            self.samples += 1


def curl(argv: list[str], timeout: float) -> dict[str, Any]:
    """curl on the load core; its `-w` summary: status, bytes down, bytes up, seconds from start to last byte."""
    full = ["curl", "--silent", "--show-error", "--output", "/dev/null", "--write-out", _WRITE_OUT, *argv]
    out = subprocess.run(procs.pinned(LOAD_CORES, full), capture_output=True, text=True, timeout=timeout, check=False)
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 4:
        raise BenchError(f"curl {' '.join(argv)} failed ({out.returncode}): {out.stdout[-300:]} {out.stderr[-500:]}")
    return {
        "status": int(fields[0]),
        "size_download": int(fields[1]),
        "size_upload": int(fields[2]),
        "seconds": float(fields[3]),
    }


def transfer(running: Running, stubs: Stubs, direction: str, blob: Path, size: int) -> dict[str, Any]:
    """One transfer of `size` bytes through `running`; fails unless every byte arrived (or Envoy refused)."""
    # direct: nginx's stream server itself (a direct Running points at the tool upstream's port).
    port = stubs.stream_port if running.proc is None else running.port
    base = f"http://{LOOPBACK}:{port}/stream/"
    stored = stubs.stream_dir / UPLOAD_NAME
    stored.unlink(missing_ok=True)
    if direction == "download":
        argv = [base + BLOB]
    else:
        # No `Expect: 100-continue`: the body follows the head at once, as from most clients.
        argv = ["--upload-file", str(blob), "--header", "Expect:", base + UPLOAD_NAME]
    pids = [] if running.proc is None else [running.proc.pid, *procs.descendants(running.proc.pid)]
    cpu_before = procs.tree_cpu_seconds(pids[0]) if pids else {}
    baseline = rss_kib(pids) if pids else None
    with RssSampler(pids) as sampler:
        got = curl(argv, timeout=120)
    cpu_s = procs.cpu_delta(cpu_before, procs.tree_cpu_seconds(pids[0])) if pids else None
    if running.target.kind == "envoy" and direction == "upload" and got["status"] == ENVOY_REFUSES:
        return {"refused": f"{ENVOY_REFUSES}: {ENVOY_REFUSAL}"}
    if direction == "download":
        ok = got["status"] == 200 and got["size_download"] == size
        arrived = got["size_download"]
    else:
        arrived = stored.stat().st_size if stored.exists() else 0
        ok = got["status"] == 201 and got["size_upload"] == size and arrived == size
        stored.unlink(missing_ok=True)
    if not ok:
        raise BenchError(
            f"stream {direction} through {running.target.key}: status {got['status']}, {arrived} of {size} bytes "
            f"arrived (curl sent {got['size_upload']}, received {got['size_download']})"
        )
    if running.proc is not None and not running.proc.alive():
        raise BenchError(f"{running.target.key} exited during the {direction}:\n{running.proc.log_tail()}")
    run: dict[str, Any] = {
        "bytes": size,
        "seconds": got["seconds"],
        "mib_s": size / MIB / got["seconds"],
        "proxy_cpu_s": cpu_s,
        "rss_baseline_kib": baseline,
        "rss_max_kib": sampler.max_kib if pids else None,
        "rss_growth_kib": sampler.max_kib - baseline if pids and baseline is not None else None,
        "rss_samples": sampler.samples if pids else 0,
    }
    return run


def summarize(case: dict[str, Any]) -> None:
    """The median throughput over the runs, and the largest RSS growth (the worst run is the one that matters)."""
    runs = case["runs"]
    if not runs:
        return

    def values(key: str) -> list[float]:
        return [r[key] for r in runs if r[key] is not None]

    growth, rss_max = values("rss_growth_kib"), values("rss_max_kib")
    cpu, baseline = values("proxy_cpu_s"), values("rss_baseline_kib")
    case["median"] = {
        "mib_s": statistics.median(r["mib_s"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "proxy_cpu_s": statistics.median(cpu) if cpu else None,
        "rss_baseline_kib": statistics.median(baseline) if baseline else None,
        "rss_max_kib": max(rss_max) if rss_max else None,
        "rss_growth_kib_max": max(growth) if growth else None,
    }


def ratios(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each proxy's median MiB/s over direct's and over Envoy's (None where either was not measured)."""

    def rate(key: str) -> float | None:
        value: float | None = (cases.get(key, {}).get("median") or {}).get("mib_s")
        return value

    direct, envoy = rate("direct"), rate("envoy")
    out: dict[str, dict[str, float | None]] = {}
    for key in cases:
        mine = rate(key)
        if key == "direct" or mine is None:
            continue
        out[key] = {
            "vs_direct": mine / direct if direct else None,
            "vs_envoy": mine / envoy if envoy and key != "envoy" else None,
        }
    return out


def run(
    stubs: Stubs,
    work: Path,
    bins: dict[str, Path],
    size: int,
    repetitions: int,
    before_each: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """`repetitions` rounds of (direct, pep, envoy), each target freshly started: a download, then an upload."""
    started = time.monotonic()
    blob = make_blob(stubs, size)
    result: dict[str, Any] = {
        "size_bytes": size,
        "repetitions": repetitions,
        "client": "curl (load core), --output /dev/null / --upload-file",
        "sample_interval_ms": SAMPLE_S * 1000,
    }
    cases: dict[str, dict[str, dict[str, Any]]] = {
        d: {t.key: {"status": "ok", "runs": []} for t in TARGETS} for d in DIRECTIONS
    }
    try:
        _rounds(stubs, work, bins, blob, size, repetitions, cases, before_each, log)
    finally:
        blob.unlink(missing_ok=True)  # 256 MiB that nothing reads after the run
    for per_target in cases.values():
        for case in per_target.values():
            summarize(case)
    result.update(cases)
    result["ratios"] = {d: ratios(cases[d]) for d in DIRECTIONS}
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _rounds(
    stubs: Stubs,
    work: Path,
    bins: dict[str, Path],
    blob: Path,
    size: int,
    repetitions: int,
    cases: dict[str, dict[str, dict[str, Any]]],
    before_each: Callable[[], None],
    log: Callable[[str], None],
) -> None:
    for rep in range(1, repetitions + 1):
        for target in TARGETS:
            before_each()
            running = targets.start_target(target, stubs, work, bins["pep"], bins["envoy"])
            try:
                targets.check_answer(running, targets.GET)
                for direction in DIRECTIONS:
                    case = cases[direction][target.key]
                    if case["status"] != "ok":
                        continue
                    started = time.monotonic()
                    one = transfer(running, stubs, direction, blob, size)
                    if "refused" in one:
                        case["status"] = f"refused: {one['refused']}"
                        log(f"[{rep}/{repetitions}] stream {direction}/{target.key}: refused ({one['refused']})")
                        continue
                    case["runs"].append(one)
                    growth = one["rss_growth_kib"]
                    rss = f", RSS +{growth / 1024:.1f} MiB ({one['rss_samples']} samples)" if growth is not None else ""
                    log(
                        f"[{rep}/{repetitions}] stream {direction}/{target.key}: {size / MIB:.0f} MiB at "
                        f"{one['mib_s']:,.0f} MiB/s{rss} ({time.monotonic() - started:.1f} s)"
                    )
            finally:
                running.stop()
