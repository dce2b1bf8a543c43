"""Write-side flow control: a transport's `pause_writing`/`resume_writing`, as something a writer awaits.

A transport calls `pause_writing` when its buffer passes the high-water mark and `resume_writing` when it drains
below the low-water mark; a writer that awaits `drain()` after each write never holds more than about the high
mark plus one chunk, whatever the peer's speed.
"""

from __future__ import annotations

import asyncio


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class WriteFlow:
    """The write state of one transport: open, paused (over the high-water mark), or lost. One writer at a time."""

    __slots__ = ("_error", "_waiter", "paused")

    def __init__(self) -> None:
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def lose(self, error: BaseException) -> None:
        """The connection is gone: a drain under way and every drain from now on raise `error`."""
        self._error = error
        self.paused = False
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def drain(self, within_s: float | None = None) -> None:
        """Return once the buffer is below the low-water mark. Raises the loss if the connection is gone, and
        TimeoutError if the peer took nothing for `within_s` seconds."""
        if self._error is not None:
            raise self._error
        if not self.paused:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(within_s, _expire, waiter) if within_s is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None
