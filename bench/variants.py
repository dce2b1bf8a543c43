"""The PEP's variants on the GET, before and after a change: `pep`, `pep_audit` (a required decision log) and
`pep_cedar` (the embedded Cedar PDP), each run by one or more `pep` executables, interleaved and repeated.

Not a test and not part of `make bench`: `python -m bench.variants --pep new=.venv/bin/pep --pep old=/path/to/pep`
(after `make bench-deps`). An "old" executable is any `pep` of another checkout (a git worktree of the commit
before the change, with its own venv), so both run against the same stubs in the same minutes: on a shared
machine only figures measured side by side compare.

Per run, as in `make bench` (bench/measure.py): wrk -t1 -c16 for the closed-loop throughput and the proxy's own
CPU per request (utime + stime of its process, its threads included), then wrk -c1 for the latency of one
connection; for `pep_audit` also group commit's lines per write. Medians over the repetitions are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import measure, procs, targets
from bench.procs import BenchError
from bench.targets import GET

VARIANTS = {t.key: t for t in (targets.PEP, targets.PEP_AUDIT, targets.PEP_CEDAR)}
ROOT = Path(__file__).resolve().parent.parent


def one_run(target: targets.Target, pep: Path, stubs: targets.Stubs, work: Path, seconds: int) -> dict[str, Any]:
    running = targets.start_target(target, stubs, work, pep, Path("/nonexistent-envoy"))
    try:
        assert running.proc is not None
        targets.check_answer(running, GET)
        script = measure.wrk_script(GET, work)
        measure.wrk(running.port, GET, script, 16, 1)  # warm-up
        before = procs.tree_cpu_seconds(running.proc.pid)
        closed = measure.wrk(running.port, GET, script, 16, seconds)
        cpu_s = procs.cpu_delta(before, procs.tree_cpu_seconds(running.proc.pid))
        single = measure.wrk(running.port, GET, script, 1, seconds)
        row = {
            "rps": closed["rps"],
            "cpu_us": cpu_s * 1e6 / closed["requests"],
            "c16_p99_us": closed["p99_us"],
            "c1_p50_us": single["p50_us"],
        }
        if target.audit:
            row["lines_per_write"] = targets.log_writes(running)["lines_per_write"]
        return row
    finally:
        running.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--pep", action="append", default=[], metavar="NAME=PATH", help="a pep executable (repeat)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args(argv)
    peps = dict(p.split("=", 1) for p in args.pep) or {"this": str(ROOT / ".venv" / "bin" / "pep")}
    cases = [(v, name) for v in args.variants.split(",") for name in peps]
    unknown = [v for v, _ in cases if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="pep-variants-"))
    stubs = targets.start_stubs(work)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {case: [] for case in cases}
    try:
        for rep in range(args.repetitions):
            for variant, name in cases:
                row = one_run(VARIANTS[variant], Path(peps[name]).resolve(), stubs, work, args.seconds)
                rows[variant, name].append(row)
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in row.items())
                print(f"[{rep + 1}/{args.repetitions}] {variant} ({name}): {shown}", flush=True)
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        stubs.proc.stop()
    print("\n| variant | pep | req/s c16 | CPU µs/req | p99 c16 µs | p50 c1 µs | lines/write |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (variant, name), runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lpw = f"{med['lines_per_write']:.1f}" if "lines_per_write" in med else ""
        print(
            f"| {variant} | {name} | {med['rps']:,.0f} | {med['cpu_us']:.0f} | {med['c16_p99_us']:,.0f} | "
            f"{med['c1_p50_us']:,.0f} | {lpw} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
