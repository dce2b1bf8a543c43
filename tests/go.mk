# `make go-deps`: the Go toolchain of the tests that read bodies as Go services do (tests/support/gojson/).
# Included by the Makefile; `make test` depends on it.
# Go comes from the distribution by package name (golang-go; a mirror keeps only the current patch release, so an
# exact pin would break every new machine the day Debian moves), with a minimum version checked. The test program
# uses the standard library only: `go build` needs no module download, and its cache is .gotest/ (git-ignored).

GO_APT := golang-go
GO_MIN := 1.19

.PHONY: go-deps

# Installed only when `go` is missing. apt-get needs root: without it this fails with the command to run.
go-deps:
	@if ! command -v go >/dev/null; then \
		echo "go-deps: installing $(GO_APT) from the distribution"; \
		if [ "$$(id -u)" != 0 ]; then \
			echo "go-deps: FAILED: apt-get needs root to install $(GO_APT); run as root, or: sudo apt-get install $(GO_APT)" >&2; \
			exit 1; \
		fi; \
		command -v apt-get >/dev/null || { echo "go-deps: FAILED: apt-get not found (Debian 12 or newer is required for $(GO_APT))" >&2; exit 1; }; \
		{ apt-cache show $(GO_APT) >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(GO_APT) \
			|| { echo "go-deps: FAILED: apt-get install $(GO_APT)" >&2; exit 1; }; \
	fi
	@go_v=$$(GOTOOLCHAIN=local go env GOVERSION | sed 's/^go//'); \
	dpkg --compare-versions "$$go_v" ge $(GO_MIN) \
		|| { echo "go-deps: FAILED: go $$go_v is older than $(GO_MIN)" >&2; exit 1; }; \
	echo "go-deps: using go $$go_v"
