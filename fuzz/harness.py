"""What every atheris harness shares: run under libFuzzer, or replay inputs (a crash, a corpus) without it.

    python -m fuzz.fuzz_NAME [libFuzzer flags] [CORPUS_DIR ...]    fuzz (see fuzz/run.py for the flags used)
    python -m fuzz.fuzz_NAME --replay FILE_OR_DIR ...             run the oracles once on each input, and say
                                                                  which input fails, with the traceback

While fuzzing, the counts of inputs that show a known pep/ bug (fuzz/oracles.py KNOWN_BUGS) are written at most
once a second to the JSON file named by PEP_FUZZ_KNOWN: libFuzzer ends the process without running Python's exit
handlers, so the last second of counts may be missing.

This module is imported before the harness instruments the project, so it imports nothing from pep/ or from
fuzz/oracles.py at load time (that would load those modules uninstrumented).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import atheris


def load_built(directory: Path, name: str) -> ModuleType:
    """A module of pep/ written in C (pep/native.py C_MODULES), loaded from the build beside its source by path:
    the harnesses run the sources (PEP_PURE=1: atheris's coverage is Python's), which leaves C modules out, and
    the C must still be held to the oracles. `name` is the dotted name, e.g. "pep._jsonscan"."""
    short = name.rpartition(".")[2]
    path = next(directory.glob(f"{short}.*.so"), None)
    if path is None:
        raise SystemExit(f"no build of {name} in {directory} (make native)")
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _inputs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def replay(test_one_input: Callable[[bytes], None], paths: list[str]) -> int:
    from fuzz import oracles

    failed = 0
    inputs = _inputs(paths)
    for path in inputs:
        try:
            test_one_input(path.read_bytes())
        except Exception:
            failed += 1
            print(f"FAILED {path}", file=sys.stderr)
            traceback.print_exc()
    print(f"replayed {len(inputs)} inputs, {failed} failed; known bugs: {dict(oracles.known_hits)}", file=sys.stderr)
    return 1 if failed else 0


def run(test_one_input: Callable[[bytes], None]) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        sys.exit(replay(test_one_input, sys.argv[2:]))
    from fuzz import oracles

    known_file = os.environ.get("PEP_FUZZ_KNOWN")
    written: dict[str, int] = {}
    next_write = 0.0

    def one_input(data: bytes) -> None:
        nonlocal next_write
        test_one_input(data)
        if known_file and oracles.known_hits != written and time.monotonic() >= next_write:
            written.clear()
            written.update(oracles.known_hits)
            Path(known_file).write_text(json.dumps(written, sort_keys=True))
            next_write = time.monotonic() + 1.0

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
