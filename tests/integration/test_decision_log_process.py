"""A required decision log under a real `pep run` whose writes fail or block the way the kernel makes them:
a file size limit reached mid-run (EFBIG) and a stdout pipe nobody reads. An allow goes upstream only once its
line was written; after that, nothing is forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.support.process import REPO, cedar_config, ensure_stopped, pep_env, read_line
from tests.support.upstream import RecordingUpstream

_UP = re.compile(r"proxy on 127\.0\.0\.1:(\d+)")
PERMIT = "permit(principal, action, resource);\n"


async def start(config: Path, stdout: int | None = None, preexec: Callable[[], None] | None = None) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pep",
        "run",
        "-c",
        str(config),
        stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=pep_env(),
        preexec_fn=preexec,
    )


async def proxy_url(proc: Any) -> str:
    m = _UP.search(await read_line(proc.stderr, "proxy on", 20))
    assert m is not None
    return f"http://127.0.0.1:{m.group(1)}"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason", "")


async def stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)  # our child, by its PID
    async with asyncio.timeout(10):
        await proc.wait()


LIMIT = 1500  # bytes: a few lines fit, then a write is cut short and the next fails with EFBIG


def _file_size_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead


async def test_a_file_size_limit_reached_mid_run(tmp_path: Path, upstream: RecordingUpstream) -> None:
    log = tmp_path / "audit.jsonl"
    config = cedar_config(
        tmp_path, upstream.url, PERMIT, decision_log={"sink": "file", "path": str(log), "required": True}
    )
    proc = await start(config, preexec=_file_size_limit)
    try:
        url = await proxy_url(proc)
        results = [await get(f"{url}/tools/{i}") for i in range(12)]
        await stop(proc)
    finally:
        await ensure_stopped(proc)
    allowed = [i for i, r in enumerate(results) if r == (200, "")]
    first_denied = len(allowed)
    assert 0 < first_denied < 12  # some lines fit; the limit was reached mid-run
    assert allowed == list(range(first_denied))
    assert results[first_denied:] == [(403, "audit_unavailable")] * (12 - first_denied)
    assert [x.target for x in upstream.seen] == [f"/tools/{i}" for i in allowed]
    assert log.stat().st_size <= LIMIT
    complete = []
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):  # the write cut short by the limit left a torn line
            complete.append(orjson.loads(line))
    logged = {e["path"] for e in complete if e["decision"] == "allow"}
    assert logged >= {f"/tools/{i}" for i in allowed}  # everything forwarded is in the log, whole


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is already full: the first write to it blocks until someone reads."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for size in (65536, 4096, 512, 64, 8, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_end, b"\n" * size)  # empty lines: whatever reads the log later skips them
    os.set_blocking(write_end, True)
    return read_end, write_end


async def test_a_stdout_pipe_nobody_reads(tmp_path: Path, upstream: RecordingUpstream) -> None:
    config = cedar_config(tmp_path, upstream.url, PERMIT, decision_log={"sink": "stdout", "required": True})
    read_end, write_end = _full_pipe()
    proc = await start(config, stdout=write_end)
    os.close(write_end)
    out = bytearray()
    reading: asyncio.Future[None] | None = None
    try:
        url = await proxy_url(proc)
        for i in range(3):  # the write of the first line blocks: no allow gets its line written
            assert await get(f"{url}/tools/blocked{i}") == (403, "audit_unavailable")
        assert upstream.seen == []

        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, _read_all, read_end, out)  # someone reads the pipe at last
        async with asyncio.timeout(10):
            while await get(f"{url}/tools/later") != (200, ""):  # noqa: ASYNC110 - each try is a request
                await asyncio.sleep(0.1)
        await stop(proc)
        async with asyncio.timeout(10):
            await reading  # the pipe's end of file: the PEP has exited
    finally:
        await ensure_stopped(proc)
        if reading is None:
            os.close(read_end)
    assert [x.target for x in upstream.seen] == ["/tools/later"]
    lines = [orjson.loads(line) for line in bytes(out).splitlines() if line]
    last: dict[str, dict[str, Any]] = {}
    for e in lines:
        last[e["decision_id"]] = e  # a later line about a decision supersedes an earlier one
    final = {(e["path"], e["decision"], e["reason"]) for e in last.values()}
    assert {("/tools/blocked0", "deny", "audit_unavailable"), ("/tools/later", "allow", "allowed")} <= final
    assert not any(p.startswith("/tools/blocked") and d == "allow" for p, d, _ in final)


async def test_a_pep_whose_stdout_nobody_reads_still_stops(tmp_path: Path, upstream: RecordingUpstream) -> None:
    config = cedar_config(tmp_path, upstream.url, PERMIT, decision_log={"sink": "stdout", "required": True})
    read_end, write_end = _full_pipe()
    proc = await start(config, stdout=write_end)
    os.close(write_end)
    try:
        url = await proxy_url(proc)
        assert await get(f"{url}/tools/x") == (403, "audit_unavailable")
        await stop(proc)  # the write stays blocked: the process exits anyway, after a bounded wait for it
        assert proc.returncode == 0
    finally:
        await ensure_stopped(proc)
        os.close(read_end)
    assert upstream.seen == []


def _read_all(fd: int, into: bytearray) -> None:
    try:
        while chunk := os.read(fd, 65536):
            into += chunk
    finally:
        os.close(fd)
