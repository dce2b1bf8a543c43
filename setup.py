"""Compiles the request path (pep.native.MODULES) to C extensions with mypyc, when PEP_NATIVE=1, with the modules
written in C (pep.native.C_MODULES).

`make native` builds them in place (`setup.py build_ext --inplace`); the Dockerfile builds a wheel with them.
Without PEP_NATIVE=1 (`pip install -e .` in `make venv`) nothing is compiled and the package is pure Python.
Three groups of modules, one C library each, so that two cores build at once; calls inside a group are direct.
The libraries are top-level modules (`pep_native_*`): mypyc derives a compiled package's `__path__` from its
library's place, so inside `pep/` a package's uncompiled modules could not be found. `make venv` puts the checkout
on the venv's path (a .pth file) so that the checkout's libraries are found from anywhere; a wheel installs them
beside the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup  # type: ignore[import-untyped]

ext_modules = []
if os.environ.get("PEP_NATIVE") == "1":
    from mypyc.build import mypycify

    # pep/native.py by its path: importing the package here would choose between built modules and sources.
    spec = importlib.util.spec_from_file_location("pep_native_modules", Path("pep") / "native.py")
    assert spec is not None
    assert spec.loader is not None
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    modules: list[str] = list(native.MODULES)
    io = [m for m in modules if m.startswith(("pep/http1/", "pep/transport/"))]
    inspection = [m for m in modules if m.startswith("pep/protocols/") or m in ("pep/mcp_answers.py", "pep/answers.py")]
    policy = [m for m in modules if m not in io and m not in inspection]
    # The digest of what is compiled, beside it (in the wheel too): a build is used only for these sources.
    native.SUMS.write_text(native.digest() + "\n")
    groups: list[tuple[list[str], str | None]] = [
        (io, "pep_native_io"),
        (policy, "pep_native_policy"),
        (inspection, "pep_native_inspection"),
    ]
    ext_modules = mypycify(modules, separate=groups)
    # And the modules written in C (pep/strictjson.py's scan), built with the same compiler.
    ext_modules += [
        Extension(path.removesuffix(".c").replace("/", "."), [path], extra_compile_args=["-O2"])
        for path in native.C_MODULES
    ]

setup(ext_modules=ext_modules)
