"""The stack the real-SDK tests run through: a PDP of each kind serving the shipped policies plus the session
plumbing of tests/e2e/policies, and a PEP config with an MCP route and a model route, all on loopback.

The test policies are served *together with* the shipped files (copied into one directory), so the tool rules,
the argument-level send_email rule included, are exactly the ones under config/policies.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import RunningPep
from tests.support.cerbos import CerbosServer
from tests.support.rego_pdp import RegoPdp

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "policies"
EXTRAS = REPO / "tests" / "e2e" / "policies"
PDP_KINDS = ("opa", "cerbos", "cedar")
_SUFFIX = {"opa": ".rego", "cerbos": ".yaml", "cedar": ".cedar"}
_DIR = {"opa": "rego", "cerbos": "cerbos", "cedar": "cedar"}

AGENT = "support-bot"
COMPANY_DOMAIN = "acme.example"
ALLOWED_MODEL = "gpt-test-allowed"
DENIED_MODEL = "gpt-test-denied"


def policy_dir(kind: str, into: Path) -> Path:
    """One directory with the shipped policies of `kind` and the test additions (Cerbos test suites left out)."""
    target = into / f"policies-{kind}"
    target.mkdir(parents=True, exist_ok=False)
    sources = [SHIPPED / _DIR[kind], EXTRAS / _DIR[kind]]
    for source in sources:
        for path in sorted(source.iterdir()):
            if path.suffix != _SUFFIX[kind] or path.name.endswith("_test.yaml"):
                continue
            assert not (target / path.name).exists(), f"{path.name} is both shipped and a test addition"
            shutil.copyfile(path, target / path.name)
    return target


@dataclass
class PdpUnderTest:
    """A running PDP of one kind. `config` is the PEP's `pdp` section; `down()` takes it away (not for Cedar,
    which is embedded: there is nothing to take down)."""

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    rego: RegoPdp | None = None
    cerbos: CerbosServer | None = None

    @classmethod
    async def start(cls, kind: str, tmp_path: Path, cerbos_binary: Path | None = None) -> PdpUnderTest:
        policies = policy_dir(kind, tmp_path)
        common = {"timeout_ms": 1000, "retries": 1}
        if kind == "opa":
            rego = RegoPdp(policy_dir=policies)
            await rego.start()
            return cls(kind, {"kind": "opa", "url": rego.url, **common}, rego=rego)
        if kind == "cerbos":
            assert cerbos_binary is not None
            cerbos = CerbosServer(cerbos_binary, policies, tmp_path / "cerbos.log")
            await cerbos.start()
            return cls(kind, {"kind": "authzen", "url": cerbos.url, **common}, cerbos=cerbos)
        assert kind == "cedar", kind
        return cls(kind, {"kind": "cedar", "policies": str(policies), **common})

    async def down(self) -> None:
        """The PDP goes away: OPA's port is closed, Cerbos is stopped (connections refused either way)."""
        if self.rego is not None:
            await self.rego.stop()
        elif self.cerbos is not None:
            await self.cerbos.stop()
        else:
            raise AssertionError(f"{self.kind} is embedded: it cannot be taken down")

    async def stop(self) -> None:
        if self.rego is not None:
            await self.rego.stop()  # it also drops its regorus engine on this thread
        if self.cerbos is not None:
            await self.cerbos.stop()


def pep_config(
    pdp: dict[str, Any],
    log_path: Path,
    *,
    mcp_upstream: str | None = None,
    models_upstream: str | None = None,
    deny_status: int | None = None,
    filter_tools_list: bool = False,
    mcp_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A PEP with an `mcp` route (/mcp, protocol mcp; `deny_status` left to its default unless given, more route
    keys in `mcp_options`) and a `models` route (/v1, protocol openai)."""
    routes: list[dict[str, Any]] = []
    if mcp_upstream is not None:
        route: dict[str, Any] = {
            "name": "mcp",
            "match": {"path_prefix": "/mcp"},
            "upstream": mcp_upstream,
            "strip_prefix": True,
            "protocol": "mcp",
            **(mcp_options or {}),
        }
        if deny_status is not None:
            route["deny_status"] = deny_status
        if filter_tools_list:
            route["filter_tools_list"] = True
        routes.append(route)
    if models_upstream is not None:
        routes.append(
            {
                "name": "models",
                "match": {"path_prefix": "/v1"},
                "upstream": models_upstream,
                "strip_prefix": True,
                "protocol": "openai",
            }
        )
    return {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "identity": {
            "workload": "spiffe://cluster.local/ns/agents/sa/support-bot",
            "agent_header": "x-agent-id",
            "attributes": {"company_domain": COMPANY_DOMAIN, "tenant": "acme"},
        },
        "pdp": {**pdp, "breaker": {"failure_threshold": 5, "open_ms": 5000, "half_open_probes": 1}},
        "decision_log": {"sink": "file", "path": str(log_path)},
        "routes": routes,
    }


async def settled_log(
    pep: RunningPep, ready: Callable[[list[dict[str, Any]]], bool], within_s: float = 2.0
) -> list[dict[str, Any]]:
    """The decision log once `ready(entries)` holds (or whatever it holds after `within_s`).

    `RunningPep.log_entries()` alone can come back short: `DecisionLog.flush()` returns at once when the periodic
    flusher has just taken the queue and is still writing it."""
    deadline = time.monotonic() + within_s
    while True:
        entries = await pep.log_entries()
        if ready(entries) or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(0.02)


def at_least(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda entries: len(entries) >= count
