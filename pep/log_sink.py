"""Where decision log lines go: a descriptor, written by one thread of its own so the event loop never blocks.

The thread is a daemon thread, not a ThreadPoolExecutor worker: those are joined when the interpreter exits,
and a write that never returns (a stdout pipe nobody reads) must not keep the process from exiting.

A file the log writes to can be deleted under it (`rm`, a removed directory): the descriptor still takes writes,
into an inode nobody can read any more. The sink checks the file's link count around every batch: a deleted
file is opened again at its path before the write (which fails if the directory is gone), and a batch that
went into a deleted file is a failed write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import select
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from pep.config import DecisionLogConfig

T = TypeVar("T")

_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT
_MODE: Final = 0o640


class DecisionLogError(Exception):
    """The log cannot be opened; the message names `decision_log.path`."""


class Sink:
    """The open descriptor. Once the writer thread runs, only that thread writes, reopens or checks it."""

    def __init__(self, config: DecisionLogConfig) -> None:
        self.path = config.path if config.sink == "file" else None
        self._fd: int | None = None
        # stdout may be a pipe shared by several workers: writes of whole lines within PIPE_BUF never
        # interleave there. A file opened O_APPEND takes each batch in one write.
        self._pipe_safe = config.sink == "stdout"
        self._torn = False  # the last failed write stopped inside a line: the next write starts a new one

    def open(self) -> None:
        """Open now, so a bad path stops `pep run` at start rather than at the first decision."""
        if self.path is None:
            self._fd = sys.stdout.fileno()
            return
        try:
            self._fd = os.open(self.path, _FLAGS, _MODE)
        except OSError as exc:
            raise DecisionLogError(f"decision_log.path: cannot open {self.path!r}: {exc.strerror}") from None

    @property
    def opened(self) -> bool:
        return self._fd is not None

    def write(self, lines: list[bytes]) -> None:
        """Write one batch. Returns only when every byte was written to a file that still exists; raises
        OSError otherwise (ENOSPC, EFBIG, EPIPE, EAGAIN, a deleted file)."""
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, "the decision log is not open")
        if not lines:
            return
        if self.path is not None and _deleted(fd):
            fd = self._replace_deleted()
        pieces = _chunks(lines, select.PIPE_BUF) if self._pipe_safe else [b"".join(lines)]
        if self._torn:
            pieces[0] = b"\n" + pieces[0]
        for piece in pieces:
            view = memoryview(piece)
            while view:
                try:
                    written = os.write(fd, view)
                except OSError:
                    if len(view) != len(piece):
                        self._torn = True
                    raise
                view = view[written:]
        self._torn = False
        if _deleted(fd):
            raise OSError(errno.ENOENT, "the decision log file was deleted while being written")

    def _replace_deleted(self) -> int:
        problem = self.reopen()
        if problem is not None:
            raise OSError(errno.ENOENT, f"the decision log file was deleted and {problem}")
        assert self._fd is not None
        return self._fd

    def reopen(self) -> str | None:
        """Open the path again (SIGHUP after log rotation, or the file was deleted). On failure the old
        descriptor stays in use and the reason is returned."""
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, _FLAGS, _MODE)
        except OSError as exc:
            return f"cannot open {self.path!r} again: {exc.strerror}"
        old, self._fd = self._fd, fd
        self._torn = False
        if old is not None:
            os.close(old)
        return None

    def close(self) -> None:
        if self.path is not None and self._fd is not None:
            os.close(self._fd)
        self._fd = None


def _deleted(fd: int) -> bool:
    """A regular file whose last name is gone: what is written to it can never be read."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 0


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


_Job = tuple[
    Callable[..., Any], tuple[Any, ...], Callable[[Any, BaseException | None], None], asyncio.AbstractEventLoop
]


class Writer:
    """Runs blocking jobs one at a time, in order, on its own daemon thread, and hands each outcome back to the
    submitting event loop.

    `post` is the hot path (one batch write per call): the thread calls the loop back with the outcome directly,
    so a write costs one wake-up each way and one turn of the loop, not a future's chain of callbacks.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="pep-decision-log", daemon=True)
        self._worker.start()

    def post(
        self, job: Callable[..., T], args: tuple[Any, ...], done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """Run `job(*args)` on the thread; then `done(result, None)` or `done(None, error)` on this event loop."""
        self._jobs.put((job, args, done, asyncio.get_running_loop()))

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Run `job()` on the thread; its result (or error) as a future of this event loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.post(job, (), lambda result, error: _settle(future, result, error))
        return future

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after its jobs; True if it did within `timeout` (False: a job is stuck)."""
        self._jobs.put(None)
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _run(self) -> None:
        get = self._jobs.get
        while (item := get()) is not None:
            job, args, done, loop = item
            try:
                result, error = job(*args), None
            except BaseException as exc:  # handed to the loop, never lost
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(done, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
