"""Fixtures shared by the suites: a fault PDP, a recording upstream and a PEP, all on loopback sockets."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from pep.app import Server
from pep.config import load
from tests.support.fault_pdp import FaultPdp
from tests.support.op import OpenIdProvider, running_op
from tests.support.upstream import RecordingUpstream


@pytest.fixture
async def fault_pdp() -> AsyncIterator[FaultPdp]:
    pdp = FaultPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    """The OpenID Provider of the approval tests, with no poll interval of its own: the client's min_interval_s
    paces the polls, so no test waits seconds. A module that wants the OP's own interval defines its own `op`."""
    async for running in running_op(tmp_path / "op"):
        await running.set_interval(0)
        yield running


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream()
    await up.start()
    yield up
    await up.stop()


def base_config(pdp_url: str, upstream_url: str, log_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "identity": {"workload": "spiffe://test/agent", "agent_header": "x-agent-id"},
        "pdp": {
            "kind": "opa",
            "url": pdp_url,
            "timeout_ms": 250,
            "retries": 1,
            "breaker": {"failure_threshold": 5, "open_ms": 5000, "half_open_probes": 1},
        },
        "decision_log": {"sink": "file", "path": str(log_path)},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": upstream_url}],
    }


class RunningPep:
    """A started PEP with helpers to reach it and read its decision log."""

    def __init__(self, server: Server, log_path: Path) -> None:
        self.server = server
        self.log_path = log_path

    @property
    def url(self) -> str:
        assert self.server.proxy_address is not None
        return f"http://127.0.0.1:{self.server.proxy_address.port}"

    @property
    def port(self) -> int:
        assert self.server.proxy_address is not None
        return self.server.proxy_address.port

    @property
    def admin_url(self) -> str:
        assert self.server.admin_address is not None
        return f"http://127.0.0.1:{self.server.admin_address.port}"

    async def log_entries(self) -> list[dict[str, Any]]:
        await self.server.decision_log.flush()
        if not self.log_path.exists():
            return []
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines()]


PepFactory = Callable[..., Any]


class PepStarter:
    """Starts PEPs from a config builder (a dict the test may change), stopping them all at `close()`."""

    def __init__(self, tmp_path: Path, build: Callable[[Path], dict[str, Any]], source: str) -> None:
        self._tmp_path = tmp_path
        self._build = build
        self._source = source
        self._started: list[Server] = []

    async def __call__(
        self, mutate: Callable[[dict[str, Any]], None] | None = None, clock: Callable[[], float] | None = None
    ) -> RunningPep:
        log_path = self._tmp_path / f"decisions-{len(self._started)}.jsonl"
        raw = copy.deepcopy(self._build(log_path))
        if mutate is not None:
            mutate(raw)
        # A real file, as `pep run` reads: a reload (SIGHUP, a file change) reads it again.
        path = self._tmp_path / f"{len(self._started)}-{self._source}"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        config = load(path)
        server = Server(config, clock=clock) if clock is not None else Server(config)
        await server.start()
        self._started.append(server)
        return RunningPep(server, log_path)

    async def close(self) -> None:
        for server in self._started:
            await server.stop()


@pytest.fixture
async def make_pep(
    tmp_path: Path, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> AsyncIterator[Callable[..., Any]]:
    """`await make_pep(mutate=lambda cfg: ..., clock=...)` starts a PEP against the fixtures' PDP and upstream."""
    starter = PepStarter(tmp_path, lambda log: base_config(fault_pdp.url, upstream.url, log), "test.yaml")
    yield starter
    await starter.close()


@pytest.fixture
async def pep(make_pep: Callable[..., Any]) -> RunningPep:
    running: RunningPep = await make_pep()
    return running
