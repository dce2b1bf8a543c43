# The real path readers of tests/e2e/test_path_readers.py: nginx (from bench-deps), Tomcat 10.1 and Express.
# Included by the top-level Makefile. Tomcat comes from Debian by package name with a minimum version checked
# (tomcat10-common: catalina.sh, the jars and the JSP compiler; no system service is installed or started), as
# bench-deps takes nginx; Express is pinned exactly by tests/support/readers/package-lock.json (npm ci).
# `make express` installs Express alone: the one install serves the path readers and the model API upstream of
# tests/e2e/test_openai_answers.py (tests/support/readers/openai_express.js).

READERS_DIR       := tests/support/readers
READERS_STAMP     := $(READERS_DIR)/node_modules/.package-lock.json
READERS_APT       := tomcat10-common
READERS_TOMCAT_MIN := 10.1

.PHONY: readers readers-tomcat readers-clean express

readers: bench-deps readers-tomcat express

express: $(READERS_STAMP)

# Installed only when missing; apt-get needs root (without it this fails with the command to run).
readers-tomcat:
	@if ! dpkg-query -W -f='$${Status}\n' $(READERS_APT) 2>/dev/null | grep -q '^install ok installed'; then \
		echo "readers: installing $(READERS_APT) from the distribution"; \
		if [ "$$(id -u)" != 0 ]; then \
			echo "readers: FAILED: apt-get needs root to install $(READERS_APT); run as root, or: sudo apt-get install $(READERS_APT)" >&2; \
			exit 1; \
		fi; \
		command -v apt-get >/dev/null || { echo "readers: FAILED: apt-get not found (Debian 12 or newer is required for $(READERS_APT))" >&2; exit 1; }; \
		{ apt-cache show $(READERS_APT) >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(READERS_APT) \
			|| { echo "readers: FAILED: apt-get install $(READERS_APT)" >&2; exit 1; }; \
	fi
	@tomcat_v=$$(dpkg-query -W -f='$${Version}' $(READERS_APT)); \
	dpkg --compare-versions "$$tomcat_v" ge $(READERS_TOMCAT_MIN) \
		|| { echo "readers: FAILED: $(READERS_APT) $$tomcat_v is older than $(READERS_TOMCAT_MIN)" >&2; exit 1; }; \
	echo "readers: using $(READERS_APT) $$tomcat_v"

# A file target: npm ci installs exactly the lockfile, again whenever it changes.
$(READERS_STAMP): $(READERS_DIR)/package.json $(READERS_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is required to install Express (the path differential and model API tests)" >&2; exit 1; }
	npm ci --prefix $(READERS_DIR) --no-audit --no-fund
	touch $@

readers-clean:
	rm -rf $(READERS_DIR)/node_modules
