"""The real Cerbos PDP (a third-party AuthZEN server) as a child process on free loopback ports.

`make test` installs the pinned binary (see the Makefile's `cerbos` target) and exports CERBOS_BIN. Only the
process this helper started is ever signalled: stop (SIGTERM, then SIGKILL after a bound), freeze (SIGSTOP),
resume (SIGCONT) and restart on the same ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp

from tests.support.child import ChildProcess

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.55.0"
DEFAULT_BIN = REPO / ".pdp/cerbos/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64"
POLICIES = REPO / "config/policies/cerbos"

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02  # health polling


class CerbosUnavailable(RuntimeError):
    """The binary is missing, not executable or not the pinned version."""


class CerbosExited(RuntimeError):
    """The server process ended during start-up (e.g. a port taken meanwhile, or a policy that does not compile)."""


def find_binary() -> Path:
    """$CERBOS_BIN, else the path `make test` installs to. Raises CerbosUnavailable with what to do."""
    configured = os.environ.get("CERBOS_BIN")
    path = Path(configured) if configured else DEFAULT_BIN
    if not path.is_file() or not os.access(path, os.X_OK):
        where = f"CERBOS_BIN={configured}" if configured else str(path)
        raise CerbosUnavailable(
            f"the Cerbos {VERSION} binary is not at {where}; run `make test` (it installs and checks it)"
        )
    return path


def check_version(binary: Path) -> None:
    """The suite is written against one Cerbos release; another one is an error, not a silent difference."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CerbosUnavailable(f"{binary} --version failed: {exc}; run `make test`") from None
    first = out.splitlines()[0].strip() if out else ""
    if first != VERSION:
        raise CerbosUnavailable(f"{binary} is Cerbos {first or '?'}, the suite needs {VERSION}; run `make test`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CerbosServer(ChildProcess):
    """One Cerbos server process. `url` is its AuthZEN base URL (Cerbos derives `policy_decision_point` from the
    Host header, so it is exactly this)."""

    def __init__(self, binary: Path, policies: Path, log_path: Path) -> None:
        self.binary = binary
        self.policies = policies
        self.log_path = log_path
        self.http_port = 0
        self.grpc_port = 0
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            "server",
            f"--set=server.httpListenAddr=127.0.0.1:{self.http_port}",
            f"--set=server.grpcListenAddr=127.0.0.1:{self.grpc_port}",
            "--set=storage.driver=disk",
            f"--set=storage.disk.directory={self.policies}",
            "--set=storage.disk.watchForChanges=false",
            "--set=telemetry.disabled=true",
            "--set=audit.enabled=false",
            "--log-level=warn",
        ]

    async def start(self) -> None:
        """First start: pick free ports (trying again if another process took one meanwhile), wait until healthy."""
        for attempt in range(3):
            self.http_port, self.grpc_port = free_port(), free_port()
            try:
                await self._launch()
                return
            except CerbosExited:
                if attempt == 2:
                    raise

    async def restart(self) -> None:
        """Stop (if running) and start again on the same ports."""
        await self.stop()
        await self._launch()

    async def _launch(self) -> None:
        assert not self.running, "already running"
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent
            )
        self.frozen = False
        try:
            await self._wait_healthy()
        except BaseException:
            await self.stop()
            raise

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                if not self.running:
                    raise CerbosExited(f"cerbos exited during start-up: {self.log_tail()}")
                try:
                    # Healthy, and the AuthZEN gateway answers too (it may come up a moment after the health check).
                    async with session.get(f"{self.url}/_cerbos/health") as resp:
                        healthy = resp.status == 200 and (await resp.json()).get("status") == "SERVING"
                    if healthy:
                        async with session.get(f"{self.url}/.well-known/authzen-configuration") as resp:
                            if resp.status == 200:
                                return
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass
                await asyncio.sleep(_POLL_S)
        raise RuntimeError(f"cerbos was not healthy within {START_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (and SIGCONT, so a frozen server can act on it), wait for the PID; SIGKILL after `grace_s`."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal(signal.SIGTERM)
            if self.frozen:
                self.resume()
            if not await _exited(proc, grace_s):
                self._signal(signal.SIGKILL)
                await _exited(proc, STOP_TIMEOUT_S)
        self.frozen = False
        self._proc = None

    async def kill(self) -> None:
        """SIGKILL at once and reap: an abrupt crash, no graceful shutdown."""
        proc = self._proc
        if proc is None:
            return
        self._signal(signal.SIGKILL)
        await _exited(proc, STOP_TIMEOUT_S)
        self.frozen = False
        self._proc = None


async def _exited(proc: asyncio.subprocess.Process, within_s: float) -> bool:
    try:
        async with asyncio.timeout(within_s):
            await proc.wait()
    except TimeoutError:
        return False
    return True
