"""Runs the atheris harnesses one after another and says, per harness, how many inputs were tried, how large the
corpus grew, how many crashes were found and how many inputs showed a known pep/ bug.

    python -m fuzz.run --python .venv-fuzz/bin/python --seconds 60 [--fresh] [--seed N] [--out fuzz/out] [HARNESS ...]

Each harness fuzzes for `--seconds` from its committed seeds (fuzz/corpus/NAME, never written to) and its work
corpus (OUT/corpus/NAME, kept between runs unless `--fresh`). A crash is an input on which an oracle failed (or
the harness raised, timed out or ran out of memory): libFuzzer writes it to OUT/crashes/NAME/ and stops that
harness; `python -m fuzz.fuzz_NAME --replay FILE` shows it again. The summary goes to stdout and to OUT/summary.md
and OUT/summary.json. The exit status is 1 when any harness crashed or failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HARNESSES = ("integrity", "bodies", "pdp_answers", "pdp_http1", "http1_core", "answers")
ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
DICTS = ROOT / "fuzz" / "dict"


@dataclass
class Result:
    harness: str
    seconds: float
    executions: int
    exec_per_s: int
    seeds: int
    corpus: int
    new_units: int
    coverage: int
    crashes: list[str]
    known_bugs: dict[str, int]
    exit_code: int


def _stat(log: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s+(\d+)", log)
    return int(m.group(1)) if m else 0


def fuzz(python: str, harness: str, seconds: int, out: Path, fresh: bool, seed: int | None) -> Result:
    corpus, crashes, logs = out / "corpus" / harness, out / "crashes" / harness, out / "logs"
    if fresh:
        shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(crashes, ignore_errors=True)
    for folder in (corpus, crashes, logs):
        folder.mkdir(parents=True, exist_ok=True)
    known = out / f"known-{harness}.json"
    known.unlink(missing_ok=True)
    seeds = SEEDS / harness
    flags = [
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        "-use_value_profile=1",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={crashes}/",
    ]
    if seed is not None:
        flags.append(f"-seed={seed}")
    if (DICTS / f"{harness}.dict").exists():
        flags.append(f"-dict={DICTS / harness}.dict")
    command = [python, "-m", f"fuzz.fuzz_{harness}", *flags, str(corpus), str(seeds)]
    env = {**os.environ, "PEP_FUZZ_KNOWN": str(known), "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace", check=False)
    took = time.monotonic() - started
    log = done.stdout + done.stderr
    (logs / f"{harness}.log").write_text(log)
    coverage = [int(c) for c in re.findall(r" cov: (\d+)", log)]
    return Result(
        harness=harness,
        seconds=round(took, 1),
        executions=_stat(log, "number_of_executed_units"),
        exec_per_s=_stat(log, "average_exec_per_sec"),
        seeds=sum(1 for _ in seeds.iterdir()),
        corpus=sum(1 for _ in corpus.iterdir()),
        new_units=_stat(log, "new_units_added"),
        coverage=max(coverage, default=0),
        crashes=sorted(os.path.relpath(p, ROOT) if p.is_relative_to(ROOT) else str(p) for p in crashes.iterdir()),
        known_bugs=json.loads(known.read_text()) if known.exists() else {},
        exit_code=done.returncode,
    )


def table(results: list[Result]) -> str:
    lines = [
        "| harness | seconds | inputs tried | inputs/s | corpus (seeds + found) | coverage | crashes "
        "| known-bug inputs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        known = ", ".join(f"{k}: {v}" for k, v in sorted(r.known_bugs.items())) or "none"
        lines.append(
            f"| {r.harness} | {r.seconds:.0f} | {r.executions:,} | {r.exec_per_s:,} | {r.seeds} + {r.corpus} "
            f"| {r.coverage} | {len(r.crashes)} | {known} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("harnesses", nargs="*", metavar="HARNESS", help=f"default: all of {', '.join(HARNESSES)}")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with atheris (.venv-fuzz)")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness")
    parser.add_argument("--out", type=Path, default=ROOT / "fuzz" / "out")
    parser.add_argument("--fresh", action="store_true", help="start from the seeds alone (drop the work corpus)")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: a new one each run)")
    args = parser.parse_args()
    if unknown := set(args.harnesses) - set(HARNESSES):
        parser.error(f"unknown harness {', '.join(sorted(unknown))}")
    results: list[Result] = []
    for harness in args.harnesses or HARNESSES:
        print(f"fuzz: {harness} for {args.seconds} s ...", flush=True)
        result = fuzz(args.python, harness, args.seconds, args.out, args.fresh, args.seed)
        results.append(result)
        print(
            f"fuzz: {harness}: {result.executions:,} inputs tried, corpus {result.seeds} seeds + {result.corpus} "
            f"found, {len(result.crashes)} crashes, known-bug inputs {result.known_bugs or 'none'}",
            flush=True,
        )
        if result.crashes or result.exit_code != 0 or result.executions == 0:
            tail = (args.out / "logs" / f"{harness}.log").read_text().splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            for crash in result.crashes:
                print(f"fuzz: {harness}: CRASH {crash} (replay: python -m fuzz.fuzz_{harness} --replay {crash})")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    summary = table(results)
    print(summary)
    (args.out / "summary.md").write_text(f"{summary}\n\nMachine: {machine}.\n")
    (args.out / "summary.json").write_text(
        json.dumps({"machine": machine, "results": [asdict(r) for r in results]}, indent=2)
    )
    failed = [r.harness for r in results if r.crashes or r.exit_code != 0 or r.executions == 0]
    if failed:
        print(f"fuzz: FAILED: {', '.join(failed)} (see {args.out}/logs/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
