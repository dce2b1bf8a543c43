"""The decision log: one JSON line per decision, written off the event loop, never blocking a request.

Lines are queued (bounded) and written by one background thread at least every `FLUSH_S`, so a slow or
blocked stdout costs queued memory up to the bound and then dropped lines (counted), never request latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
        """Queue one line. False when the line was dropped (queue full): a `required` log then means deny."""
        if not self.enabled:
            return True
        if len(self._pending) >= self._max:
            self._dropped.inc()
            return False
        self._pending.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
        return True

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush(loop)

    async def flush(self) -> None:
        """Write what is queued now (tests and shutdown; the flusher does this every FLUSH_S)."""
        await self._flush(asyncio.get_running_loop())

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending or self._fd is None:
            return
        lines, self._pending = self._pending, []
        try:
            await loop.run_in_executor(self._executor, _write_all, self._fd, b"".join(lines))
        except OSError:
            self._dropped.inc(len(lines))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush(asyncio.get_running_loop())
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
