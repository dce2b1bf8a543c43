# The benchmark of issue 7: failclosed-pep against Envoy's ext_authz filter and the upstream directly, on loopback.
# Included by the top-level Makefile, which defines PYTHON, VENV, BIN, PIP_PIN and the `venv` target.
#   make bench        the full run (about 10 minutes): bench/results/latest.md and latest.json
#   make bench-smoke  every target and variant once, briefly (CI): fails if any measurement did not run
# Everything is installed here at exact versions: nginx and wrk from Debian (apt-get, needs root), Envoy and
# py-spy from PyPI into .venv-bench (requirements/constraints-bench.txt, checked against pip freeze).

BENCH_VENV  := .venv-bench
BENCH_BIN   := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed
# Debian 12 (bookworm): nginx from bookworm-security, wrk from bookworm main.
BENCH_NGINX_VERSION := 1.22.1-9+deb12u11
BENCH_WRK_VERSION   := 4.1.0-3+b2
BENCH_APT := nginx=$(BENCH_NGINX_VERSION) nginx-common=$(BENCH_NGINX_VERSION) wrk=$(BENCH_WRK_VERSION)
BENCH_ARGS ?=

.PHONY: bench bench-smoke bench-deps bench-venv bench-lint

bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): requirements/constraints-bench.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	test -x $(BENCH_BIN)/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(BENCH_BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/constraints-bench.txt
	$(BENCH_BIN)/python -m pip freeze --disable-pip-version-check > $(BENCH_VENV)/freeze.txt
	grep -v '^#' requirements/constraints-bench.txt | diff - $(BENCH_VENV)/freeze.txt \
		|| { echo "$(BENCH_VENV) differs from requirements/constraints-bench.txt (above); pin every package" >&2; exit 1; }
	touch $(BENCH_STAMP)

# Installed only when the exact versions are not there already. apt-get needs root: without it this fails, with
# the command to run, rather than benchmarking whatever nginx or wrk happens to be on PATH. A policy-rc.d that
# forbids service starts is in place during the install (when the machine has none), so installing nginx never
# starts the system's nginx on port 80: the benchmark runs its own, as the current user, on loopback.
bench-deps:
	@nginx_v=$$(dpkg-query -W -f='$${Version}' nginx 2>/dev/null); wrk_v=$$(dpkg-query -W -f='$${Version}' wrk 2>/dev/null); \
	if [ "$$nginx_v" = "$(BENCH_NGINX_VERSION)" ] && [ "$$wrk_v" = "$(BENCH_WRK_VERSION)" ]; then exit 0; fi; \
	echo "bench: installing $(BENCH_APT) (found nginx '$$nginx_v', wrk '$$wrk_v')"; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "bench: FAILED: apt-get needs root to install $(BENCH_APT); run as root, or: sudo apt-get install $(BENCH_APT)" >&2; \
		exit 1; \
	fi; \
	command -v apt-get >/dev/null || { echo "bench: FAILED: apt-get not found (Debian 12 is required for $(BENCH_APT))" >&2; exit 1; }; \
	policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=/usr/sbin/policy-rc.d; \
	fi; \
	trap '[ -z "$$policy" ] || rm -f "$$policy"' EXIT; \
	{ apt-cache show nginx=$(BENCH_NGINX_VERSION) wrk=$(BENCH_WRK_VERSION) >/dev/null 2>&1 || apt-get update -q; } && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_APT) \
		|| { echo "bench: FAILED: apt-get install $(BENCH_APT)" >&2; exit 1; }

bench: venv $(BENCH_STAMP) bench-deps
	$(BIN)/python -m bench.run --mode full --envoy-venv $(BENCH_VENV) $(BENCH_ARGS)

bench-smoke: venv $(BENCH_STAMP) bench-deps
	$(BIN)/python -m bench.run --mode smoke --envoy-venv $(BENCH_VENV) $(BENCH_ARGS)

bench-lint: venv
	$(BIN)/ruff check bench
	$(BIN)/ruff format --check bench
	$(BIN)/mypy --strict bench
