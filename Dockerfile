# syntax=docker/dockerfile:1
# failclosed-pep container image: `pep run`, non-root, for a read-only root filesystem.
#
#   docker build -t failclosed-pep:0.1.0 .
#   docker run --rm --read-only --cap-drop ALL --security-opt no-new-privileges \
#     --add-host=host.docker.internal:host-gateway -p 127.0.0.1:8080:8080 -p 127.0.0.1:9901:9901 failclosed-pep:0.1.0
#
# That runs the image's own config (config/container.yaml): both listeners on 0.0.0.0 inside the container, the
# embedded Cedar PDP with config/policies/mcp.cedar, in front of an MCP server on the Docker host's port 9000.
# Point the agent's MCP client at http://127.0.0.1:8080/mcp. Your own config: add
# -v "$PWD/my-config.yaml:/etc/pep/config.yaml:ro" (listeners on 0.0.0.0, and a PDP the container can reach).
#
# The base image is pinned by tag. Pin it by digest as well (python:3.11.17-slim-bookworm@sha256:...) once you
# have checked the digest against your registry: no digest was written here because none could be verified
# where this file was made (no image registry, no Docker engine: this Dockerfile is linted with hadolint in
# `make test`, never built there).
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# Build stage: a virtualenv at /opt/pep holding the project and exactly the versions of
# requirements/constraints.txt (the same pins `make` uses). Every dependency ships a manylinux wheel for
# CPython 3.11; the project's own wheel is built here with its request path compiled by mypyc (pep/native.py,
# `make native`), which needs a C compiler in this stage only: the distribution's, by package name.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml setup.py README.md ./
COPY pep/ pep/
# pip and setuptools at the versions of the Makefile's PIP_PIN; the build backend is that setuptools, with mypy (the
# compiler, pinned in the constraints) in a build venv of its own, so that the image's venv does not carry it. The
# compiler reads the types of the dependencies, so the build venv has them too (the project itself, uncompiled,
# with the PyYAML stubs); without them the build fails rather than compile untyped code. The otel extra is
# included: `tracing` in the config then works without another image.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && /opt/build/bin/pip install --no-cache-dir --no-build-isolation -c requirements/constraints.txt \
        mypy types-PyYAML . \
    && PEP_NATIVE=1 /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/pep \
    && /opt/pep/bin/pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && /opt/pep/bin/pip install --no-cache-dir -c requirements/constraints.txt "$(ls /wheels/*.whl)[otel]" \
    && /opt/pep/bin/pip uninstall --yes pip setuptools

# Runtime stage: the same base (the venv's interpreter is /usr/local/bin/python3.11 in both), the venv, a
# numeric non-root user. Nothing is written at run time except to mounted volumes: bytecode was compiled at
# install, PYTHONDONTWRITEBYTECODE stops Python from trying again, the decision log goes to stdout by default
# (a `sink: file` path must be on a mounted volume).
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/pep/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 pep \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pep
COPY --from=build /opt/pep /opt/pep
# A config that works as it is (see the top of this file); mount yours over /etc/pep/config.yaml.
COPY config/container.yaml /etc/pep/config.yaml
COPY config/policies/mcp.cedar /etc/pep/policies/mcp.cedar
# Numeric, so Kubernetes can enforce runAsNonRoot without a passwd lookup.
USER 10001:10001
# 8080: the agent-facing listener, 9901: the admin listener (/healthz /readyz /metrics), as set in the config.
EXPOSE 8080 9901
# No HEALTHCHECK: the admin address depends on the config; orchestrators probe /healthz and /readyz on it.
ENTRYPOINT ["pep", "run"]
CMD ["--config", "/etc/pep/config.yaml"]
