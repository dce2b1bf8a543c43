# The two commands a new machine needs: `make demo` and `make test`. Both build .venv from nothing.
# The interpreter: the distribution's python3 when it is 3.11 or later and can build (venv and Python.h; Debian 12:
# 3.11, built with PGO and LTO, as the image's python:3.11 is), else the first python3 on PATH. A toolchain shim
# first on PATH (pyenv) is often built without those optimisations: it cost 3-7% more CPU per proxied
# request (bench/README). PYTHON=... chooses another.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell /usr/bin/python3 -c 'import ensurepip, os, sys, sysconfig; \
	sys.exit(sys.version_info < (3, 11) or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
endif
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP_PIN := pip==26.3 setuptools==84.2.1

# A second venv with the last MCP SDK 1.x: it cannot share .venv with the 2.x SDK. The e2e tests run its
# client and server scripts (tests/support/mcp1/) as child processes with this interpreter.
MCP1_VENV  := .venv-mcp1
MCP1_BIN   := $(MCP1_VENV)/bin
MCP1_STAMP := $(MCP1_VENV)/.installed
MCP1_PIN   := mcp==1.30.0

# Cerbos, the real third-party AuthZEN PDP of the e2e suite: the platform binary from npm, pinned and checked.
CERBOS_VERSION := 0.55.0
CERBOS_SHA256  := 1bb7264706e49f868551b355ef0a8e3b57947cccfe0551fb3dfae503f458ff7b
CERBOS_DIR     := .pdp/cerbos
CERBOS_BIN     := $(CURDIR)/$(CERBOS_DIR)/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64
export CERBOS_BIN

.PHONY: venv venv-mcp1 native test lint typecheck unit demo clean cerbos cerbos-policies

venv: $(STAMP)

venv-mcp1: $(MCP1_STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c requirements/constraints.txt -e '.[dev]'
	@# The checkout on the venv's path, for the top-level libraries of `make native` (setup.py says why).
	$(BIN)/python -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "failclosed-pep-checkout.pth").write_text("$(CURDIR)\n")'
	touch $(STAMP)

# A file target like $(STAMP): exactly the pins of requirements/constraints-mcp1.txt (checked), rebuilt when they change.
$(MCP1_STAMP): requirements/constraints-mcp1.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	test -x $(MCP1_BIN)/python || $(PYTHON) -m venv $(MCP1_VENV)
	$(MCP1_BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(MCP1_BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints-mcp1.txt '$(MCP1_PIN)'
	$(MCP1_BIN)/python -m pip freeze --disable-pip-version-check > $(MCP1_VENV)/freeze.txt
	grep -v '^#' requirements/constraints-mcp1.txt | diff - $(MCP1_VENV)/freeze.txt \
		|| { echo "$(MCP1_VENV) differs from requirements/constraints-mcp1.txt (above); pin every package" >&2; exit 1; }
	touch $(MCP1_STAMP)

# The request path compiled to C with mypyc, in place (pep/native.py: why, which modules, and why a build is used
# only for the sources it was built from). Rebuilt when a compiled source changes; pep/native.sum is its stamp.
# A C compiler is taken from the distribution by name (gcc) when there is none; Python's headers must be there.
NATIVE_SUMS := pep/native.sum
# The compiled modules' sources (pep/native.py's MODULES and C_MODULES): an edit elsewhere (cli.py, tests) rebuilds nothing.
NATIVE_SOURCES := $(shell $(PYTHON) -c 'import runpy; n = runpy.run_path("pep/native.py"); print(*n["MODULES"], *n["C_MODULES"])')
native: $(NATIVE_SUMS)

$(NATIVE_SUMS): $(STAMP) setup.py pep/native.py $(NATIVE_SOURCES)
	@command -v cc >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "native: FAILED: no C compiler; as root: apt-get install gcc libc6-dev" >&2; exit 1; }; \
		{ apt-cache show gcc >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev; }
	@$(BIN)/python -c 'import os, sys, sysconfig; p = os.path.join(sysconfig.get_paths()["include"], "Python.h"); \
		sys.exit(0 if os.path.exists(p) else "native: FAILED: no " + p + " (Debian: apt-get install python3-dev)")'
	@rm -f $@
	@find pep -name '*.so' -delete; rm -f pep_native_*.so  # a module no longer compiled must not load stale
	@mkdir -p build
	@echo "native: compiling the request path with mypyc (build/native.log)"
	@PEP_NATIVE=1 $(BIN)/python setup.py build_ext --inplace --parallel 2 > build/native.log 2>&1 \
		|| { tail -40 build/native.log >&2; rm -f $@; echo "native: FAILED (build/native.log)" >&2; exit 1; }
	@test -f $@

lint: venv
	$(BIN)/ruff check pep tests bench reliability fuzz setup.py
	$(BIN)/ruff format --check pep tests bench reliability fuzz setup.py

# The 1.x scripts are excluded from the first run (they import the 1.x SDK) and checked against .venv-mcp1.
typecheck: venv $(MCP1_STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --python-executable $(MCP1_BIN)/python tests/support/mcp1/*.py

unit: venv
	$(BIN)/pytest -q tests/unit

cerbos: $(CERBOS_BIN)

# A file target: installed and verified once. A checksum mismatch removes the binary and fails the build.
$(CERBOS_BIN):
	@command -v npm >/dev/null || { echo "npm is required to install Cerbos $(CERBOS_VERSION) (tests, make demo PDP=cerbos)" >&2; exit 1; }
	npm install --prefix $(CERBOS_DIR) --no-save --no-audit --no-fund @cerbos/cerbos-linux-x64@$(CERBOS_VERSION)
	echo "$(CERBOS_SHA256)  $@" | sha256sum -c - || { rm -f "$@"; exit 1; }

# Compiles the Cerbos policies and runs their test suites (*_test.yaml).
cerbos-policies: $(CERBOS_BIN)
	$(CERBOS_BIN) compile config/policies/cerbos

# bench-smoke: every benchmark target and variant for a second or so, so the benchmark never rots (numbers: make bench).
# reliability-smoke: 22 s of open-loop load through two pep run processes under chaos (full: make reliability).
# fuzz-smoke: every atheris harness for 10 s from the committed seeds (full: make fuzz).
# readers: nginx, Tomcat and Express, the real upstreams of tests/e2e/test_path_readers.py.
# go-deps: the Go toolchain the tests build tests/support/gojson/ with (Go's encoding/json as a reference reader).
# op: oidc-provider, the real OpenID Provider of the approval and just-in-time credential tests.
test: lint typecheck native cerbos-policies deploy-check bench-smoke reliability-smoke fuzz-smoke readers go-deps op $(MCP1_STAMP)
	$(BIN)/pytest -q

# PDP=cedar (default: embedded, nothing else to run), PDP=cerbos (the real Cerbos binary) or PDP=opa.
PDP ?= cedar
demo: venv native $(if $(filter cerbos,$(PDP)),$(CERBOS_BIN))
	$(BIN)/pep demo --pdp $(PDP)

clean: deploy-clean reliability-clean readers-clean op-clean
	rm -rf $(VENV) $(MCP1_VENV) .venv-bench bench/results .pdp .gotest .mypy_cache .pytest_cache .ruff_cache build *.egg-info
	find pep -name '*.so' -delete
	rm -f pep_native_*.so $(NATIVE_SUMS)

include deploy/deploy.mk
include bench/bench.mk
include reliability/reliability.mk
include fuzz/fuzz.mk
include tests/readers.mk
include tests/go.mk
include tests/op.mk
