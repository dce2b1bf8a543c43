# `make op`: the real OpenID Provider of the approval and just-in-time credential tests (tests/support/op/op.mjs):
# oidc-provider and jose pinned exactly by tests/support/op/package-lock.json, installed with npm ci (the lockfile
# records no registry host: see tests/support/op/.npmrc). Included by the Makefile; `make test` depends on it.
# oidc-provider 9 asks for Node.js 22 or newer; it runs on Node.js 20 (20.19 or newer) with a warning.

OP_DIR      := tests/support/op
OP_STAMP    := $(OP_DIR)/node_modules/.package-lock.json
OP_NODE_MIN := 20.19.0

.PHONY: op op-clean

op: $(OP_STAMP)

# A file target: npm ci installs exactly the lockfile, again whenever it changes.
$(OP_STAMP): $(OP_DIR)/package.json $(OP_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "op: npm is required to install oidc-provider (the tests' OpenID Provider)" >&2; exit 1; }
	@node -e 'const [a,b,c]=process.versions.node.split(".").map(Number),[x,y,z]="$(OP_NODE_MIN)".split(".").map(Number);process.exit(a>x||(a==x&&(b>y||(b==y&&c>=z)))?0:1)' \
		|| { echo "op: Node.js $$(node --version) is older than $(OP_NODE_MIN) (oidc-provider 9)" >&2; exit 1; }
	cd $(OP_DIR) && npm ci --no-audit --no-fund
	touch $@

op-clean:
	rm -rf $(OP_DIR)/node_modules
