"""The request path compiled to C with mypyc, and the rule that compiled code is used only while it is the source.

Why compiled: after four rounds of work on the request path, what a request costs in the interpreter was spread
thin over ~480 Python calls of ~1k instructions each, with no function above ~3% (bench/README, "The whole PEP").
mypyc (part of mypy, which type-checks this code already) compiles the same typed modules to C extensions: calls
between them become C calls and attribute reads struct reads, so the dispatch loop and the frames go away where
they cost most. Nothing else changes: the modules below are the same source, and pure Python runs them too.

`make native` (a step of `make test`, `make demo` and `make bench`) builds them in place, next to their sources,
and writes SUMS: the digest of those sources. A compiled module is used only while SUMS matches the sources beside
it; otherwise (a source edited since the build, a build from another checkout) `pep` runs every module from its
source, all or none (compiled modules call each other directly, so a stale one cannot be replaced alone), and
says so once on stderr. `PEP_PURE=1` asks for the sources regardless (the fuzzers, whose coverage is Python's).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
SUMS = PACKAGE / "native.sum"  # written by setup.py as it builds

# What `make native` compiles: every module a request passes through, and what they import. Not here:
# `transport/errors` (exceptions that subclass builtin errors, which mypyc cannot compile) and what runs once
# (cli, app, demo, explain) or off the request path (approvals, oauth, admin). `config` is here for its classes,
# which every request reads. The per-request value classes (Check, Outcome, Admission, Allow, ...) are plain
# classes with their own `__init__` and `Final` fields: compiled, that is a native class (about 40 ns to build,
# and native attribute reads), where a dataclass keeps the `__init__` the dataclasses module writes, interpreted
# (180-340 ns, measured).
MODULES: tuple[str, ...] = (
    *(
        f"pep/http1/{m}.py"
        for m in (
            "__init__",
            "body",
            "errors",
            "events",
            "fields",
            "head",
            "limits",
            "message_reader",
            "request_reader",
            "response_reader",
            "writer",
        )
    ),
    *(
        f"pep/transport/{m}.py"
        for m in (
            "__init__",
            "body",
            "connection",
            "flow",
            "headers",
            "listener",
            "outbox",
            "pool",
            "response",
            "tunnel",
        )
    ),
    *(
        f"pep/pdp/{m}.py"
        for m in (
            "__init__",
            "answer",
            "approval",
            "authzen",
            "cedar",
            "credential",
            "http1",
            "mapping",
            "opa",
            "reachability",
            "transport",
        )
    ),
    *(f"pep/identity/{m}.py" for m in ("__init__", "keys", "spiffe", "subject", "tokens")),
    *(
        f"pep/protocols/{m}.py"
        for m in (
            "__init__",
            "body",
            "dispatch",
            "mcp",
            "mcp_answer",
            "mcp_replies",
            "mcp_tokens",
            "media",
            "model_answer",
            "multipart",
            "openai",
            "sse",
            "spelling",
        )
    ),
    *(
        f"pep/{m}.py"
        for m in (
            "admission",
            "answers",
            "approval_step",
            "attributes",
            "authority",
            "breaker",
            "cache_control",
            "config",
            "credentials",
            "decision",
            "decision_log",
            "engine",
            "headers",
            "ids",
            "integrity",
            "log_line",
            "log_sink",
            "mcp_answers",
            "metrics",
            "proxy",
            "redirects",
            "responses",
            "routing",
            "seal",
            "strictjson",
            "trace",
            "upstream",
        )
    ),
)


# Written in C where the profile asked for it (each says why), built with the compiled modules, and used only
# with them: pure Python has its own way to the same answer (a property test compares the two).
C_MODULES: tuple[str, ...] = ("pep/_jsonscan.c", "pep/http1/_fieldlines.c")


def digest(root: Path = PACKAGE.parent, modules: Sequence[str] = MODULES + C_MODULES) -> str:
    """The digest of the compiled modules' sources, as SUMS holds it for a build."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode())
        h.update(b"\0")
        h.update((root / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


_C_NAMES = frozenset(m.removesuffix(".c").replace("/", ".") for m in C_MODULES)


class _SourcesOnly(importlib.abc.MetaPathFinder):
    """Finds `pep.*` modules as sources only, never as extension modules (a stale or unwanted build)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("pep.") or path is None:
            return None
        if fullname in _C_NAMES:  # no source: not there, rather than the build's
            raise ModuleNotFoundError(f"{fullname} is compiled only (pure Python runs without it)", name=fullname)
        name = fullname.rpartition(".")[2]
        for entry in path:
            package = os.path.join(entry, name)
            init = os.path.join(package, "__init__.py")
            if os.path.isfile(init):
                return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[package])
            module = package + ".py"
            if os.path.isfile(module):
                return importlib.util.spec_from_file_location(fullname, module)
        return None


def _built() -> bool:
    return any(PACKAGE.glob("http1/__init__.*.so"))


def _strays() -> list[str]:
    """Compiled modules beside the package's sources that are in neither MODULES nor C_MODULES (left from
    another build)."""
    root = PACKAGE.parent
    found = {str(p.relative_to(root).with_name(p.name.split(".")[0])) for p in PACKAGE.rglob("*.so")}
    built = {m.rsplit(".", 1)[0] for m in MODULES + C_MODULES}
    return sorted(f"{name}.py" for name in found - built)


def choose() -> bool:
    """Whether MODULES are loaded compiled: a build is present, it is of these sources, and PEP_PURE does not ask
    for the sources. Otherwise the sources-only finder goes first. Called once, by the package as it is imported."""
    if not _built():
        return False
    reason = None
    if os.environ.get("PEP_PURE") == "1":
        reason = ""
    elif not SUMS.is_file():
        reason = "no native.sum beside the compiled modules"
    else:
        try:
            current = digest()
        except OSError as exc:
            reason = f"a source cannot be read ({exc})"
        else:
            if SUMS.read_text().strip() != current:
                reason = "sources changed since the build (run `make native`)"
            elif strays := _strays():
                reason = f"compiled modules from another build: {', '.join(strays)} (run `make native`)"
    if reason is None:
        return True
    if reason:
        sys.stderr.write(f"failclosed-pep: running pure Python, not the compiled modules: {reason}\n")
    # Just before the path finder, not first: an import hook ahead of it (atheris's, which instruments what it
    # loads for coverage) still sees every module and loads it from the spec this finder gives.
    finders = sys.meta_path
    at = next((i for i, f in enumerate(finders) if f is importlib.machinery.PathFinder), len(finders))
    finders.insert(at, _SourcesOnly())
    return False
