# Fuzzing (issue 9): atheris (libFuzzer for Python) over the request-integrity checks, the body readers, the PDP
# answer readers and the PDP client's HTTP/1.1 reader, each input checked by the oracles of fuzz/oracles.py (the
# same invariants the hypothesis properties tests/unit/test_fuzz_*.py check).
# Included by the top-level Makefile, which defines PYTHON, VENV, BIN, PIP_PIN and the `venv` target.
#   make fuzz        every harness for FUZZ_SECONDS (60) each: a table of inputs tried, corpus size, crashes and
#                    known-bug inputs per harness, also in fuzz/out/summary.md; the work corpus (fuzz/out/corpus/)
#                    grows from run to run (make fuzz-clean starts over)
#   make fuzz-smoke  every harness for FUZZ_SMOKE_SECONDS (10) each, from the committed seeds alone and with a
#                    fixed random seed, so that CI tries the same inputs each time (make fuzz explores anew);
#                    also lints and type-checks fuzz/. Fails on any crash.
#   make fuzz-lint   ruff, and mypy --strict against .venv-fuzz (where atheris and its stubs are)
# A crash is kept in fuzz/out/crashes/HARNESS/; `.venv-fuzz/bin/python -m fuzz.fuzz_HARNESS --replay FILE` shows it.
# atheris runs in its own virtualenv, .venv-fuzz: every package pinned in requirements/constraints-fuzz.txt and
# checked against pip freeze, the project's runtime dependencies at the versions of requirements/constraints.txt.

FUZZ_VENV  := .venv-fuzz
FUZZ_BIN   := $(FUZZ_VENV)/bin
FUZZ_STAMP := $(FUZZ_VENV)/.installed
FUZZ_OUT   := fuzz/out
FUZZ_SECONDS       ?= 60
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_ARGS ?=

.PHONY: fuzz fuzz-smoke fuzz-venv fuzz-lint fuzz-clean

fuzz-venv: $(FUZZ_STAMP)

# A file target like $(STAMP): exactly the pins of requirements/constraints-fuzz.txt (checked), rebuilt when they
# change. The pins shared with requirements/constraints.txt must agree with it: the harnesses run the same code.
$(FUZZ_STAMP): pyproject.toml requirements/constraints-fuzz.txt requirements/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	@awk -F'==' 'NR == FNR { if (!/^#/) pin[tolower($$1)] = $$2; next } \
		!/^#/ && (tolower($$1) in pin) && pin[tolower($$1)] != $$2 { \
			print "requirements/constraints-fuzz.txt pins " $$1 "==" $$2 ", requirements/constraints.txt " \
				pin[tolower($$1)] > "/dev/stderr"; bad = 1 } \
		END { exit bad }' requirements/constraints.txt requirements/constraints-fuzz.txt
	test -x $(FUZZ_BIN)/python || $(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(FUZZ_BIN)/python -m pip install --quiet --disable-pip-version-check --no-build-isolation \
		-c requirements/constraints-fuzz.txt -e . atheris types-atheris types-PyYAML h11
	$(FUZZ_BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check > $(FUZZ_VENV)/freeze.txt
	grep -v '^#' requirements/constraints-fuzz.txt | diff - $(FUZZ_VENV)/freeze.txt \
		|| { echo "$(FUZZ_VENV) differs from requirements/constraints-fuzz.txt (above); pin every package" >&2; exit 1; }
	touch $(FUZZ_STAMP)

# PEP_PURE=1: the harnesses run the sources, not the compiled request path (make native): atheris's coverage is
# Python's, and compiled modules would be blind spots to it. The test suite runs the compiled modules. The build
# is still a prerequisite for the modules written in C, which the harnesses load from it by path: fuzz_bodies
# compares strictjson with and without its C scan (pep/_jsonscan.c), and fuzz_http1_core's readers find heads and
# split field lines with pep/http1/_fieldlines.c, as `pep run` does.
fuzz: native $(FUZZ_STAMP)
	PEP_PURE=1 $(FUZZ_BIN)/python -m fuzz.run --python $(FUZZ_BIN)/python --seconds $(FUZZ_SECONDS) --out $(FUZZ_OUT) $(FUZZ_ARGS)

fuzz-smoke: fuzz-lint native $(FUZZ_STAMP)
	PEP_PURE=1 $(FUZZ_BIN)/python -m fuzz.run --python $(FUZZ_BIN)/python --seconds $(FUZZ_SMOKE_SECONDS) \
		--out $(FUZZ_OUT)/smoke --fresh --seed 1 $(FUZZ_ARGS)

# fuzz/oracles.py is also checked by `make typecheck` (the unit tests import it); the harnesses import atheris,
# which only .venv-fuzz has.
fuzz-lint: venv $(FUZZ_STAMP)
	$(BIN)/ruff check fuzz
	$(BIN)/ruff format --check fuzz
	$(BIN)/mypy --strict --python-executable $(FUZZ_BIN)/python fuzz

fuzz-clean:
	rm -rf $(FUZZ_VENV) $(FUZZ_OUT)

# `make clean` removes the fuzzing venv and output too.
clean: fuzz-clean
