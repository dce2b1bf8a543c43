"""Go's encoding/json as a reference reader: tests/support/gojson/main.go, built with the machine's Go.

`make go-deps` installs Go from the distribution (`make test` depends on it). The build uses the standard library
only, so it needs no network: module downloads and toolchain switches are turned off, and the build cache lives in
the git-ignored `.gotest/` of the checkout, never in the user's home. Only the server process this helper started
is ever stopped, by closing its stdin (then killing its PID after a bound).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "tests/support/gojson/main.go"
WORK = REPO / ".gotest"
BINARY = WORK / "bin/gojson"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class GoUnavailable(RuntimeError):
    """No Go toolchain, or the program does not build."""


def go_env() -> dict[str, str]:
    """Offline and self-contained: no proxy, no toolchain download, caches under `.gotest/`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOCACHE=str(WORK / "cache"),
        GOPATH=str(WORK / "path"),
        GOMODCACHE=str(WORK / "path/pkg/mod"),
        GOPROXY="off",
        GOFLAGS="",
        GOTOOLCHAIN="local",
        GOTELEMETRY="off",
        GOENV="off",
        CGO_ENABLED="0",
    )
    return env


def build() -> Path:
    """The binary, rebuilt by `go build` (a no-op from the cache when nothing changed)."""
    go = shutil.which("go")
    if go is None:
        raise GoUnavailable("no `go` on PATH: run `make go-deps` (it installs golang-go; `make test` does it too)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [go, "build", "-o", str(BINARY), str(SOURCE)],
        cwd=WORK,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise GoUnavailable(f"go build failed: {done.stderr.strip()[:2000]}")
    return BINARY


def decode(binary: Path, mode: str, bodies: Sequence[bytes]) -> list[dict[str, Any]]:
    """What Go binds from each body (`mode` mcp, openai, or answer for a chat completion an agent reads): one
    result per body, in order."""
    sent = json.dumps([base64.b64encode(b).decode() for b in bodies]).encode()
    done = subprocess.run([str(binary), "decode", mode], input=sent, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"gojson decode failed: {done.stderr.decode(errors='replace')}")
    results: list[dict[str, Any]] = json.loads(done.stdout)
    assert len(results) == len(bodies)
    return results


def fold_orbits(binary: Path) -> list[list[int]]:
    """Every set of code points Go's simple folding makes equal."""
    done = subprocess.run([str(binary), "fold"], capture_output=True, timeout=60, check=True)
    orbits: list[list[int]] = json.loads(done.stdout)
    return orbits


class GoUpstream:
    """`gojson serve`: an MCP-like upstream that runs the tool its encoding/json bound (GET /calls lists them)."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.url = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        proc = self._proc = await asyncio.create_subprocess_exec(
            str(self.binary), "serve", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await proc.stdout.readline()
        if not line.startswith(b"http://127.0.0.1:"):
            raise AssertionError(f"gojson serve printed {line!r}")
        self.url = line.decode().strip()

    async def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.stdin is not None:
            proc.stdin.close()  # it exits when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
