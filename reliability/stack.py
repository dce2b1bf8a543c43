"""The pieces of a run: two real `pep run` processes, the recording upstreams and the fault PDP (from
tests/support, with timestamps added), and the PEPs' configs. Every process here is our own child; it is
signalled by its PID only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from reliability import plan
from tests.conftest import base_config
from tests.e2e.conftest import cerbos_config
from tests.support.fault_pdp import FaultPdp
from tests.support.process import REPO, pep_env
from tests.support.upstream import RecordingUpstream

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
SHUTDOWN_GRACE_MS = 3000
_LISTENING = re.compile(r"proxy on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")


class Deadend:
    """A loopback port where nothing listens, held for the whole run: a socket bound to it and never listening
    refuses every connection, and no other process can take the port meanwhile (with a port that was merely
    free at the start, another program's server once answered the deadend route's requests with a 200)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()


class RunError(RuntimeError):
    """Something the run needs did not work: it fails with this message, it never skips."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request as the upstream received it."""

    method: str
    target: str
    request_id: str
    decision_id: str | None


@dataclass
class TrackingUpstream(RecordingUpstream):
    """RecordingUpstream, plus which requests were cut off (the handler cancelled or
    its connection reset: the PEP let go of it). `compact()` moves the records into `deliveries` so that a
    long run does not keep every header and body."""

    deliveries: list[Delivery] = field(default_factory=list)
    cut: dict[str, float] = field(default_factory=dict)
    # request id -> (when its handler began, when it returned): a 504 is judged against these (checks.py)
    timing: dict[str, tuple[float, float]] = field(default_factory=dict)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rid = request.headers.get("X-Request-ID", "")
        began = time.time()
        try:
            response = await super()._handle(request)
        except (asyncio.CancelledError, ConnectionError):
            self.cut[rid] = time.time()
            raise
        self.timing[rid] = (began, time.time())
        return response

    def compact(self) -> None:
        for r in self.seen:
            self.deliveries.append(
                Delivery(r.method, r.target, r.headers.get("X-Request-ID", ""), r.headers.get("X-PEP-Decision-ID"))
            )
        self.seen.clear()


@dataclass
class TimedFaultPdp(FaultPdp):
    """FaultPdp whose mode switches are recorded: (before, after, mode) in wall-clock seconds."""

    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    served: int = 0

    async def switch(self, name: str) -> None:
        before = time.time()
        await self.apply(name)
        self.timeline.append((before, time.time(), name))

    def compact(self) -> None:
        self.served += len(self.requests)
        self.requests.clear()


@dataclass
class PepProcess:
    """`pep run --config FILE` as a child process; its stderr goes to `stderr_path`."""

    name: str
    config_path: Path
    stderr_path: Path
    proc: asyncio.subprocess.Process
    proxy_port: int
    admin_port: int
    _drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @classmethod
    async def start(cls, name: str, config: dict[str, Any], out: Path) -> PepProcess:
        config_path = out / f"pep-{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        stderr_path = out / f"pep-{name}.stderr"
        pep = Path(sys.executable).parent / "pep"
        if not pep.is_file():
            raise RunError(f"{pep} not found: the project is not installed in this virtualenv (make venv)")
        proc = await asyncio.create_subprocess_exec(
            str(pep),
            "run",
            "--config",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=pep_env(),
        )
        seen: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                found = await _listening(proc, seen, name)
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if isinstance(exc, TimeoutError):
                raise RunError(f"pep ({name}) did not listen within {START_TIMEOUT_S:g} s: {''.join(seen)}") from None
            raise
        stderr_path.write_text("".join(seen))
        pep_proc = cls(name, config_path, stderr_path, proc, int(found.group(1)), int(found.group(2)))
        pep_proc._drain = asyncio.get_running_loop().create_task(pep_proc._keep_reading())
        return pep_proc

    async def _keep_reading(self) -> None:
        assert self.proc.stderr is not None
        with self.stderr_path.open("a") as out:
            while line := await self.proc.stderr.readline():
                out.write(line.decode(errors="replace"))
                out.flush()

    async def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then wait (SIGKILL after STOP_TIMEOUT_S). Returns (exit code, seconds it took)."""
        began = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                if self._drain is not None:
                    await self._drain
                return None, time.monotonic() - began
        if self._drain is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._drain
        return self.proc.returncode, time.monotonic() - began

    def kill_now(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def _listening(proc: asyncio.subprocess.Process, seen: list[str], name: str) -> re.Match[str]:
    """Reads stderr up to the line that names the bound ports."""
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode(errors="replace")
        if not line:
            raise RunError(f"pep ({name}) exited before listening: {''.join(seen)[-2000:]}")
        seen.append(line)
        found = _LISTENING.search(line)
        if found:
            return found


def _pdp_settings(config: dict[str, Any]) -> None:
    pdp = config["pdp"]
    pdp["timeout_ms"] = plan.PDP_TIMEOUT_MS
    pdp["retries"] = 1
    pdp["breaker"] = {
        "failure_threshold": plan.FAILURE_THRESHOLD,
        "open_ms": plan.OPEN_MS,
        "half_open_probes": plan.HALF_OPEN_PROBES,
    }
    config["shutdown_grace_ms"] = SHUTDOWN_GRACE_MS


def cerbos_pep_config(cerbos_url: str, upstream_url: str, log_path: Path) -> dict[str, Any]:
    """The e2e suite's AuthZEN config for Cerbos (tests/e2e/conftest.py), with this run's PDP settings."""
    config = cerbos_config(cerbos_url, upstream_url, log_path)
    _pdp_settings(config)
    return config


def fault_pep_config(pdp_url: str, upstream_url: str, deadend_url: str, log_path: Path) -> dict[str, Any]:
    """The suite's OPA config (tests/conftest.py) with two more routes: `faults` (the upstream's misbehaving
    paths, prefix stripped, a small timeout) and `deadend` (an upstream where nothing listens)."""
    config = base_config(pdp_url, upstream_url, log_path)
    _pdp_settings(config)
    config["routes"] += [
        {
            "name": "faults",
            "match": {"path_prefix": "/faults"},
            "upstream": upstream_url,
            "strip_prefix": True,
            "timeout_ms": plan.FAULT_ROUTE_TIMEOUT_MS,
        },
        {
            "name": "deadend",
            "match": {"path_prefix": "/deadend"},
            "upstream": deadend_url,
            "timeout_ms": plan.FAULT_ROUTE_TIMEOUT_MS,
        },
    ]
    return config


# How each route turns the caller's path into the upstream's (strip_prefix): for matching deliveries to
# decisions.
STRIPPED_PREFIXES = {"faults": "/faults"}
