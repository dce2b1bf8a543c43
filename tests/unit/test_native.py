"""The compiled request path (pep/native.py): the suite runs it, a stale build is never used, and the source
keeps clear of what mypyc compiles differently from the interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pep
from pep import native, proxy
from pep.transport import listener

ROOT = Path(__file__).resolve().parents[2]


def _functions(module: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse((ROOT / module).read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_a_build_of_these_sources_is_what_runs() -> None:
    """`make native` is a step of `make test`: the suite exercises the compiled modules, which are what `pep run`
    loads. A build left from other sources is not used (and this fails, so that it is rebuilt)."""
    if not native.SUMS.exists():
        assert not pep.COMPILED  # no build: everything from its source (pure Python is complete on its own)
        return
    assert pep.COMPILED, "the compiled modules are stale: run `make native`"
    for module in (proxy, listener):
        assert module.__file__ is not None
        assert module.__file__.endswith(".so")


def test_the_installed_package_loads_the_build_from_anywhere(tmp_path: Path) -> None:
    """`pep` from any directory (the console script, a deployment) loads what the checkout loads: mypyc's group
    libraries live inside the package, not beside it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PEP_PURE")}
    probe = "import pep, pep.proxy; print(pep.COMPILED)"
    run = [sys.executable, "-P", "-c", probe]
    out = subprocess.run(run, env=env, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert (out.returncode, out.stdout.strip()) == (0, str(pep.COMPILED)), out.stderr


def test_pure_and_stale_builds_load_every_module_from_its_source(tmp_path: Path) -> None:
    """PEP_PURE=1, or a digest that does not match the sources: all modules from source, none compiled."""
    probe = "import pep, pep.proxy, pep.http1.head; print(pep.COMPILED, pep.proxy.__file__, pep.http1.head.__file__)"
    env = {**os.environ, "PEP_PURE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    compiled, *files = out.stdout.split()
    assert compiled == "False"
    assert all(f.endswith(".py") for f in files)
    assert out.stderr == ""  # asked for: nothing to warn about


HOOKED = """
import importlib.abc, sys
seen = []
class Hook(importlib.abc.MetaPathFinder):  # as atheris's: first in line, and asks the finders after it
    def find_spec(self, name, path, target=None):
        seen.append(name)
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None
sys.meta_path.insert(0, Hook())
import pep.strictjson
print(pep.strictjson.__file__, "pep.strictjson" in seen)
"""


def test_the_sources_are_found_through_an_import_hook_ahead_of_them() -> None:
    """The fuzzers' coverage: atheris's import hook sits first and instruments what the finders after it find.
    With PEP_PURE=1 the sources-only finder is one of those, so the hook still sees (and instruments) every
    module, and the module comes from its source."""
    env = {**os.environ, "PEP_PURE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", HOOKED], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    source, seen = out.stdout.split()
    assert source.endswith("strictjson.py")
    assert seen == "True"


def test_the_sources_only_finder_finds_modules_and_packages(tmp_path: Path) -> None:
    package = tmp_path / "pep"
    (package / "sub").mkdir(parents=True)
    (package / "mod.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "mod.cpython-311-x86_64-linux-gnu.so").write_text("")
    finder = native._SourcesOnly()
    spec = finder.find_spec("pep.mod", [str(package)])
    assert spec is not None
    assert spec.origin == str(package / "mod.py")
    spec = finder.find_spec("pep.sub", [str(package)])
    assert spec is not None
    assert spec.submodule_search_locations == [str(package / "sub")]
    assert finder.find_spec("other.mod", [str(package)]) is None
    assert finder.find_spec("pep.missing", [str(package)]) is None


def test_the_digest_changes_with_any_compiled_source(tmp_path: Path) -> None:
    for name in ("pep/a.py", "pep/b.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    before = native.digest(tmp_path, ("pep/a.py", "pep/b.py"))
    (tmp_path / "pep/b.py").write_text("x = 2\n")
    assert native.digest(tmp_path, ("pep/a.py", "pep/b.py")) != before


def test_every_compiled_module_exists_and_nothing_else_is_listed_twice() -> None:
    assert len(set(native.MODULES)) == len(native.MODULES)
    assert all((ROOT / m).is_file() for m in native.MODULES)


def test_no_except_name_is_bound_to_two_types_in_one_function() -> None:
    """mypyc gives a local one type: `except A as exc` and `except B as exc` in one function made the second a
    TypeError at run time (a refusal answered as an internal error). Each handler names its own."""
    found = []
    for module in native.MODULES:
        for fn in _functions(module):
            types: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [f"{module}:{fn.lineno} {fn.name}: {n}" for n, t in types.items() if len(t) > 1]
    assert found == []


def test_no_compiled_module_reads_an_exception_cause() -> None:
    """mypyc drops `raise ... from exc`: a compiled module that needs the error behind another carries it in an
    attribute (ConnectFailed.error), never through `__cause__`."""
    found = [m for m in native.MODULES if "__cause__" in (ROOT / m).read_text()]
    assert found == []


def test_a_compiled_module_left_from_another_build_is_a_stray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module dropped from MODULES keeps its old extension until it is deleted: it would load, stale, before its
    source. `choose` then takes every module from its source."""
    package = tmp_path / "pep"
    (package / "http1").mkdir(parents=True)
    for name in ("proxy", "http1/__init__", "gone"):
        (package / f"{name}.cpython-311-x86_64-linux-gnu.so").write_text("")
    monkeypatch.setattr(native, "PACKAGE", package)
    monkeypatch.setattr(native, "MODULES", ("pep/proxy.py", "pep/http1/__init__.py"))
    assert native._strays() == ["pep/gone.py"]
