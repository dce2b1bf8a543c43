"""`pep` as a real child process: start it, read its stderr, and stop it, by its own PID only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def pep_env() -> dict[str, str]:
    """The environment for a child `pep`: this checkout importable, no proxy variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        env.pop(key, None)
    return env


async def start_pep(*args: str, stdout: int = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pep", *args, stdout=stdout, stderr=asyncio.subprocess.PIPE, cwd=REPO, env=pep_env()
    )


async def read_line(stream: asyncio.StreamReader, want: str, seconds: float) -> str:
    """The next stderr line holding `want`, read within `seconds` (the lines passed over are in the error)."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                line = (await stream.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError(f"pep closed stderr before printing {want!r}; it printed: {seen}")
                if want in line:
                    return line
                seen.append(line.rstrip())
    except TimeoutError:
        raise AssertionError(f"pep did not print {want!r} within {seconds} s; it printed: {seen}") from None


async def ensure_stopped(proc: asyncio.subprocess.Process) -> None:
    """Kill our child if a test left it running (its PID only)."""
    if proc.returncode is None:
        proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)


def children(pid: int) -> list[int]:
    """The PIDs of `pid`'s direct children (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cedar_config(tmp_path: Path, upstream_url: str, policy: str, **top: Any) -> Path:
    """A config file for `pep run`: one `/tools` route to `upstream_url`, the embedded Cedar PDP with `policy`,
    ports chosen by the OS, a decision log file; `top` adds or replaces top-level keys."""
    policy_file = tmp_path / "policy.cedar"
    policy_file.write_text(policy)
    raw: dict[str, Any] = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "pdp": {"kind": "cedar", "policies": str(policy_file)},
        "decision_log": {"sink": "file", "path": str(tmp_path / "decisions.jsonl")},
        "routes": [{"name": "tools", "match": {"path_prefix": "/tools"}, "upstream": upstream_url}],
        **top,
    }
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
