"""Instructions per request of a proxy process under valgrind's callgrind, while wrk keeps it busy.

CPU time on a shared 2-vCPU machine moves by 10-20% from one run to the next; an instruction count does not
(within about 1%), so a change of a few percent in the transport's own code is visible in one run of each
variant. The count is of user-space instructions in the proxy process only: the kernel's share of each socket
call (a fifth of the CPU time on loopback) is not in it, so compare counts with counts, never with CPU µs.

The window: after a warm-up, callgrind's counters are zeroed (`callgrind_control -z`) while wrk is running,
and dumped (`-d`) a fixed time later, still under load; the requests in between are read from nginx's
`stub_status` counter on both sides (so the PDP stub's requests count too: divide by the upstream exchanges per
proxied request).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench import procs
from bench.procs import LOOPBACK, BenchError
from bench.targets import LOAD_CORES, PROXY_CORES, Stubs, Workload

_TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


def _control(*args: str) -> None:
    out = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {out.stdout[-500:]} {out.stderr[-500:]}")


def _requests(stubs: Stubs) -> int:
    """Requests nginx has handled so far, both stubs together (stub_status)."""
    import urllib.request

    url = f"http://{LOOPBACK}:{stubs.status_port}/status"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return int(text.splitlines()[2].split()[2]) - 1  # the status request itself is counted too


def instructions(
    name: str,
    argv: Sequence[str],
    port: int,
    stubs: Stubs,
    workload: Workload,
    script: Path,
    work: Path,
    seconds: float,
) -> dict[str, float]:
    """Instructions and nginx requests over `seconds` of `wrk -c16` load on `argv` run under callgrind."""
    out_file = work / f"callgrind-{name}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", "--dump-instr=no"]
    proc = procs.start(name, procs.pinned(PROXY_CORES, [*valgrind, *argv]), work / f"callgrind-{name}.log")
    try:
        procs.wait_listening(proc, port, timeout=120)
        warmup = 4.0
        url = f"http://{LOOPBACK}:{port}{workload.path}"
        load_argv = [
            "wrk",
            "-t1",
            "-c16",
            f"-d{int(warmup + seconds + 4)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        load = subprocess.Popen(
            procs.pinned(LOAD_CORES, load_argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(warmup)
            _control("-z", str(proc.pid))
            first = _requests(stubs)
            time.sleep(seconds)
            _control("-d", str(proc.pid))
            last = _requests(stubs)
        finally:
            load.wait(warmup + seconds + 60)
        dumps = sorted(work.glob(f"callgrind-{name}.out.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise BenchError(f"callgrind wrote no dump for {name}:\n{proc.log_tail()}")
        found = _TOTALS.search(dumps[-1].read_bytes())
        if found is None:
            raise BenchError(f"no totals in {dumps[-1]}")
        return {"instructions": float(found.group(1)), "requests": float(last - first)}
    finally:
        proc.stop()
