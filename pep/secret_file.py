"""A secret read from a file and re-read when the file changes (Kubernetes swaps a symlink to rotate secrets).

The file is looked at (one `stat`) at most once per `CHECK_S`, so a rotation takes effect within that time
without a syscall per request. The value never appears in logs, metrics or errors: only the path does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

CHECK_S = 1.0

Stamp = tuple[int, int, int]


def file_stamp(path: str) -> Stamp | None:
    """What changes when a file is rewritten or swapped (inode, mtime, size); None when it cannot be looked at.
    Shared by everything that re-reads a file when it changes: secrets, JWKS, certificates, the config."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileSecret:
    def __init__(self, path: str, fmt: str = "{}", clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._format = fmt
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: Stamp | None = None
        self._value: str | None = None

    def value(self) -> str | None:
        """The formatted secret, or None when the file is missing, unreadable or empty."""
        now = self._clock()
        if now - self._checked >= CHECK_S:
            self._checked = now
            self._refresh()
        return self._value

    def refresh(self) -> None:
        """Look at the file now (SIGHUP), not at the next check."""
        self._checked = self._clock()
        self._refresh()

    def _refresh(self) -> None:
        stamp = file_stamp(self.path)
        if stamp is None:
            self._stamp, self._value = None, None
            return
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = f.read().strip()
        except (OSError, UnicodeDecodeError):
            self._stamp, self._value = None, None
            return
        self._stamp = stamp
        self._value = self._format.replace("{}", raw, 1) if raw else None
