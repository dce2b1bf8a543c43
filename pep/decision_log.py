"""The decision log: one JSON line per decision, written in batches by a thread of its own (pep/log_sink.py).

Lines are queued, bounded in bytes (`max_pending_bytes`, counting the batch being written), and written at
least every `FLUSH_S`. Most lines are best-effort: queuing never waits, and a line that does not fit is dropped
and counted. With `required: true` an allow is different: `commit` queues its line and waits until the write of
the batch holding it has returned (group commit: every line queued while one write is under way goes out in
the next single write), within the request's time budget. Only then may the request go upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

from pep.config import DecisionLogConfig
from pep.log_line import encode
from pep.log_sink import DecisionLogError, Sink, Writer
from pep.metrics import Metrics

__all__ = ["CLOSE_WAIT_S", "FLUSH_S", "STALL_S", "DecisionLog", "DecisionLogError", "unaudited"]

FLUSH_S: Final = 0.2
# A write under way for longer than this is stuck (a pipe nobody reads, a hung disk): allows are denied at once
# instead of each waiting out its budget. Lines are meant to be written within a second.
STALL_S = 1.0
CLOSE_WAIT_S: Final = 2.0  # at shutdown, how long the last writes are waited for


class _Batch:
    """Lines written together by one write; `waiting`: someone waits for it, so it goes out without delay.

    Each waiter has a future of its own, settled when the write returned: one that gives up (its budget ran out,
    its caller left) only drops its own future, never the write of the batch, so no shield is needed.
    """

    __slots__ = ("error", "finished", "lines", "size", "waiters", "waiting")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.size = 0
        self.waiting = False
        self.finished = False
        self.error: BaseException | None = None
        self.waiters: list[asyncio.Future[bool]] = []

    def done(self) -> asyncio.Future[bool]:
        """Resolved (True) when the batch's write returned, successfully or not (see `error`)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.finished:
            future.set_result(True)
        else:
            self.waiters.append(future)
        return future

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.finished = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(True)
        self.waiters.clear()


def _expire(waiter: asyncio.Future[bool]) -> None:
    """A commit's budget ran out before its batch's write returned."""
    if not waiter.done():
        waiter.set_result(False)


class DecisionLog:
    """The queue and its writer: `record` queues a best-effort line, `commit` an allow that must be written first."""

    def __init__(self, config: DecisionLogConfig, metrics: Metrics) -> None:
        self.config = config
        self.required = config.required
        self.enabled = config.sink != "none"
        self._max_bytes = config.max_pending_bytes
        # With a required log, best-effort lines (denials) may fill only part of the queue: a flood of denied
        # requests must not leave the allows of other callers no room, and deny them.
        self._best_effort_max = self._max_bytes * 3 // 4 if config.required else self._max_bytes
        self._dropped = metrics.decision_log_dropped
        self._write_seconds = metrics.decision_log_write_seconds
        self._sink = Sink(config)
        self._writer: Writer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._open = _Batch()  # collecting lines
        self._inflight: _Batch | None = None  # being written
        self._since = 0.0  # when the write under way began
        self._held = 0  # bytes queued or being written
        self.writes = 0  # batch writes that returned (group commit makes this far fewer than lines)
        metrics.decision_log_pending_bytes.set_function(lambda: self._held)

    def open(self) -> None:
        """Open the sink now, so a bad path stops `pep run` at start rather than at the first decision."""
        if self.enabled:
            self._sink.open()

    async def start(self) -> None:
        if not self.enabled:
            return
        if not self._sink.opened:
            self.open()
        self._writer = Writer()
        self._task = asyncio.get_running_loop().create_task(self._flusher())

    def record(self, entry: dict[str, Any]) -> bool:
        """Queue one line, best-effort: never waits. False when it was dropped (the queue is full)."""
        if not self.enabled:
            return True
        return self._queue(encode(entry), wait=False) is not None

    async def commit(self, entry: dict[str, Any], budget_s: float) -> str | None:
        """Queue an allow's line and wait until the write of its batch has returned. None when it returned
        successfully within `budget_s`; otherwise why not, and the allow must not be carried out."""
        if not self.enabled:
            return None
        if budget_s <= 0:
            return "no time was left to write the decision log"
        if self._inflight is not None and time.monotonic() - self._since > STALL_S:
            return f"a decision log write has not returned for over {STALL_S:g} s"
        batch = self._queue(encode(entry), wait=True)
        if batch is None:
            return "the decision log queue is full"
        # One future and one timer per commit (cheaper than asyncio.timeout around a shielded shared future).
        waiter = batch.done()
        timer = asyncio.get_running_loop().call_later(budget_s, _expire, waiter)
        try:
            written = await waiter
        finally:
            timer.cancel()
        if not written:
            return "the decision log write did not return in time"
        if batch.error is not None:
            return f"the decision log write failed: {_why(batch.error)}"
        return None

    def _queue(self, line: bytes, wait: bool) -> _Batch | None:
        size = len(line)
        if self._held + size > (self._max_bytes if wait else self._best_effort_max):
            self._dropped.inc()
            return None
        self._held += size
        batch = self._open
        batch.lines.append(line)
        batch.size += size
        if wait and not batch.waiting:
            batch.waiting = True
            # At the end of this turn of the event loop: every allow decided in it shares the write.
            asyncio.get_running_loop().call_soon(self._kick)
        return batch

    def _kick(self) -> None:
        """Start writing the collecting batch, unless a write is under way (it starts when that one returns)."""
        writer = self._writer
        if writer is None or self._inflight is not None or not self._open.lines:
            return
        batch, self._open = self._open, _Batch()
        self._inflight = batch
        self._since = time.monotonic()
        writer.post(self._sink.write, (batch.lines,), lambda _, error: self._written(batch, error))

    def _written(self, batch: _Batch, error: BaseException | None) -> None:
        self._write_seconds.observe(time.monotonic() - self._since)
        self._inflight = None
        self._held -= batch.size
        self.writes += 1
        if error is not None:
            self._dropped.inc(len(batch.lines))
        batch.finish(error)
        if self._open.waiting:
            self._kick()

    async def _flusher(self) -> None:
        stopping = self._stopping
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), FLUSH_S)
            if self._open.lines:
                self._open.waiting = True
                self._kick()

    async def flush(self) -> None:
        """Write what is queued now, after any write already under way (lines keep their order); returns when
        that write returned."""
        batch = self._open if self._open.lines else self._inflight
        if batch is None:
            return
        if batch is self._open:
            batch.waiting = True
            self._kick()
        await batch.done()

    async def reopen(self) -> str | None:
        """SIGHUP: open the file sink again (log rotation moved the old file away), on the writer thread, so no
        write goes to a closed descriptor. On failure the old file stays in use and the reason is returned."""
        if self._sink.path is None or self._writer is None:
            return None
        problem = await self._writer.submit(self._sink.reopen)
        if problem is None:
            return None
        return f"decision_log.path: {problem}; still writing to the old file"

    async def close(self) -> None:
        """Stop the flusher, then write everything still queued, waiting at most CLOSE_WAIT_S for the writes."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                while self._open.lines or self._inflight is not None:
                    await self.flush()
        self._writer = None  # nothing more is written
        left = len(self._open.lines) + (len(self._inflight.lines) if self._inflight is not None else 0)
        if left:
            self._dropped.inc(left)
        stuck = self._inflight is not None
        # A write stuck in the kernel keeps its descriptor: closing it under the thread could hand the number to
        # another file. The daemon thread then ends with the process.
        if writer.stop(0.0 if stuck else CLOSE_WAIT_S) and not stuck:
            self._sink.close()


def unaudited(entry: dict[str, Any], problem: str) -> dict[str, Any]:
    """The line of an allow that could not be logged in time, as the denial it became (same decision_id)."""
    return {**entry, "decision": "deny", "reason": "audit_unavailable", "detail": problem}


def _why(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__
