# The two commands a new machine needs: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP_PIN := pip==26.3 setuptools==84.2.1

# Cerbos, the real third-party AuthZEN PDP of the e2e suite: the platform binary from npm, pinned and checked.
CERBOS_VERSION := 0.55.0
CERBOS_SHA256  := 1bb7264706e49f868551b355ef0a8e3b57947cccfe0551fb3dfae503f458ff7b
CERBOS_DIR     := .pdp/cerbos
CERBOS_BIN     := $(CURDIR)/$(CERBOS_DIR)/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64
export CERBOS_BIN

.PHONY: venv test lint typecheck unit demo clean cerbos cerbos-policies

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check pep tests
	$(BIN)/ruff format --check pep tests

typecheck: venv
	$(BIN)/mypy

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

test: lint typecheck cerbos-policies
	$(BIN)/pytest -q

# PDP=cedar (default: embedded, nothing else to run), PDP=cerbos (the real Cerbos binary) or PDP=opa.
PDP ?= cedar
demo: venv $(if $(filter cerbos,$(PDP)),$(CERBOS_BIN))
	$(BIN)/pep demo --pdp $(PDP)

clean:
	rm -rf $(VENV) .pdp .mypy_cache .pytest_cache .ruff_cache build *.egg-info
