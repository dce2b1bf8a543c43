# The reliability run of issue 9: an open-loop soak through two real `pep run` processes while the real Cerbos PDP
# is killed, frozen, resumed and restarted, a fault PDP switches modes and the upstream misbehaves (resets, hangs,
# slow and huge answers, clients dropping SSE streams). Included by the top-level Makefile, which defines PYTHON,
# VENV, BIN, the `venv` target, CERBOS_BIN (exported) and the `cerbos` target that installs Cerbos.
#   make reliability        the full run: 300 requests/s for 5 minutes (about 7 minutes in all);
#                           reliability/results/full.json, the figures of docs/reliability.md
#   make reliability-smoke  the CI version: 22 s of load, about 30 s in all; reliability/results/smoke.json
#   make reliability-lint   ruff and mypy --strict on reliability/
# Each exits non-zero when a check fails (1) or the run cannot be done (2: Cerbos missing, a process that does not
# start): nothing is ever skipped. RELIABILITY_ARGS passes more options (--seed N, --recheck).

RELIABILITY_ARGS ?=

.PHONY: reliability reliability-smoke reliability-lint reliability-clean

reliability: venv native cerbos
	$(BIN)/python -m reliability --mode full $(RELIABILITY_ARGS)

reliability-smoke: venv native cerbos
	$(BIN)/python -m reliability --mode smoke $(RELIABILITY_ARGS)

reliability-lint: venv
	$(BIN)/ruff check reliability
	$(BIN)/ruff format --check reliability
	$(BIN)/mypy --strict reliability

reliability-clean:
	rm -rf reliability/results
