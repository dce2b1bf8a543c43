"""Fixtures for suites against real third-party PDPs: a Cerbos server (AuthZEN) and a PEP configured for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PepStarter
from tests.support.cerbos import POLICIES, CerbosServer, CerbosUnavailable, check_version, find_binary
from tests.support.upstream import RecordingUpstream


@pytest.fixture(scope="session")
def cerbos_binary() -> Path:
    """The pinned Cerbos binary. Missing is a failure, never a skip: `make test` installs it."""
    try:
        binary = find_binary()
        check_version(binary)
    except CerbosUnavailable as exc:
        problem = str(exc)
    else:
        return binary
    pytest.fail(problem, pytrace=False)


@pytest.fixture
def cerbos_policies() -> Path:
    """The policy directory Cerbos serves; a test module overrides this fixture to serve its own."""
    return POLICIES


@pytest.fixture
async def cerbos(cerbos_binary: Path, cerbos_policies: Path, tmp_path: Path) -> AsyncIterator[CerbosServer]:
    """A started Cerbos serving `cerbos_policies`; stopped (resumed first if frozen) whatever the test did."""
    server = CerbosServer(cerbos_binary, cerbos_policies, tmp_path / "cerbos.log")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def tool_route(tool: str, upstream_url: str) -> dict[str, Any]:
    """One route per tool: `/tools/<tool>` is a `tools/call` of that tool, as an MCP gateway would decide it."""
    return {
        "name": tool.replace("_", "-"),
        "match": {"path_prefix": f"/tools/{tool}"},
        "upstream": upstream_url,
        "mapping": {
            "action": {"name": "tools/call"},
            "resource": {"type": "tool", "id": tool, "properties": {"name": tool}},
        },
    }


def cerbos_config(pdp_url: str, upstream_url: str, log_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "identity": {
            "workload": "spiffe://test/agent",
            "agent_header": "x-agent-id",
            "attributes": {"tenant": "acme", "company_domain": "example.com"},
        },
        "pdp": {
            "kind": "authzen",
            "url": pdp_url,
            "timeout_ms": 1000,
            "retries": 1,
            "breaker": {"failure_threshold": 5, "open_ms": 5000, "half_open_probes": 1},
        },
        "decision_log": {"sink": "file", "path": str(log_path)},
        "routes": [
            *(tool_route(tool, upstream_url) for tool in ("search", "lookup_order", "shell", "send_email")),
            {
                "name": "orders",
                "match": {"path_prefix": "/orders"},
                "upstream": upstream_url,
                "mapping": {
                    "resource": {
                        "type": "order",
                        "id": "$request.path",
                        "properties": {"tenant": "$request.query.tenant.0"},
                    }
                },
            },
        ],
    }


CerbosPepFactory = Callable[..., Any]


@pytest.fixture
async def make_cerbos_pep(
    tmp_path: Path, cerbos: CerbosServer, upstream: RecordingUpstream
) -> AsyncIterator[CerbosPepFactory]:
    """`await make_cerbos_pep(mutate=..., clock=...)`: a PEP on loopback deciding with the Cerbos fixture."""
    starter = PepStarter(tmp_path, lambda log: cerbos_config(cerbos.url, upstream.url, log), "cerbos-test.yaml")
    yield starter
    await starter.close()
