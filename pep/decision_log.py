"""The decision log: one JSON line per decision, written off the event loop, never blocking a request.

Lines are queued (bounded) and written by one background thread at least every `FLUSH_S`, so a slow or
blocked stdout costs queued memory up to the bound and then dropped lines (counted), never request latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from pep.config import DecisionLogConfig
from pep.metrics import Metrics

FLUSH_S = 0.2
MAX_PENDING = 10_000


class DecisionLogError(Exception):
    """The log cannot be opened; the message names `decision_log.path`."""


class DecisionLog:
    def __init__(self, config: DecisionLogConfig, metrics: Metrics, max_pending: int = MAX_PENDING) -> None:
        self.config = config
        self.required = config.required
        self._dropped = metrics.decision_log_dropped
        self._max = max_pending
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._own_fd = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self.failing = False  # the last write failed
        self._stopping = asyncio.Event()
        self.enabled = config.sink != "none"

    def open(self) -> None:
        """Open the sink now, so a bad path stops `pep run` at start rather than at the first decision."""
        if self.config.sink == "stdout":
            self._fd = sys.stdout.fileno()
        elif self.config.sink == "file":
            path = self.config.path or ""
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise DecisionLogError(f"decision_log.path: cannot open {path!r}: {exc.strerror}") from None
            self._own_fd = True

    async def start(self) -> None:
        if self._fd is None and self.enabled:
            self.open()
        if self.enabled:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pep-decision-log")
            self._task = asyncio.get_running_loop().create_task(self._flusher())

    def record(self, entry: dict[str, Any]) -> bool:
        """Queue one line. False when it cannot be relied on to be written (the queue is full, or the last
        write failed): a `required` log then means deny. After a failure, lines are still queued, so the next
        successful write clears the failure."""
        if not self.enabled:
            return True
        if len(self._pending) >= self._max:
            self._dropped.inc()
            return False
        self._pending.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
        return not self.failing

    async def _flusher(self) -> None:
        stopping = self._stopping
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        """Write what is queued now, after any write already under way (lines keep their order)."""
        async with self._lock:
            if not self._pending or self._fd is None:
                return
            lines, self._pending = self._pending, []
            # A shared stdout (a pipe, with `workers`) keeps each write within PIPE_BUF and on line boundaries,
            # so lines from several processes never interleave; a file opened O_APPEND takes one write.
            chunks = _chunks(lines, select.PIPE_BUF) if not self._own_fd else [b"".join(lines)]
            write = asyncio.get_running_loop().run_in_executor(self._executor, _write_all, self._fd, chunks)
            try:
                # Shielded: a caller that is cancelled must not cancel lines already taken from the queue.
                await asyncio.shield(write)
            except OSError:
                self._dropped.inc(len(lines))
                self.failing = True
            else:
                self.failing = False

    async def reopen(self) -> str | None:
        """SIGHUP: open the file sink again (log rotation moved the old file away). Under the writer lock, so
        no write goes to a closed descriptor. On failure the old file stays in use and the reason is returned."""
        if self.config.sink != "file" or not self._own_fd:
            return None
        path = self.config.path or ""
        async with self._lock:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                return f"decision_log.path: cannot reopen {path!r}: {exc.strerror}; still writing to the old file"
            old, self._fd = self._fd, fd
            if old is not None:
                os.close(old)
        return None

    async def close(self) -> None:
        """Stop the flusher without cancelling a write, then write everything still queued."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _chunks(lines: list[bytes], limit: int) -> list[bytes]:
    """Whole lines joined into pieces of at most `limit` bytes (a longer line is a piece of its own)."""
    out: list[bytes] = []
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > limit:
            out.append(b"".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        out.append(b"".join(piece))
    return out


def _write_all(fd: int, chunks: list[bytes]) -> None:
    for data in chunks:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
