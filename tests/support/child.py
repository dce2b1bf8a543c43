"""A server process a test started: its liveness, and freezing it (SIGSTOP) as a hung server, by its own PID."""

from __future__ import annotations

import asyncio
import signal


class ChildProcess:
    """What the test doubles that run a real server process (Cerbos, the OpenID Provider) share."""

    def __init__(self) -> None:
        self.frozen = False
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _signal(self, sig: signal.Signals) -> None:
        # Only the child this object started, and only while it has not been reaped (its PID cannot be reused).
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers (a hung server)."""
        assert self.running, "not running"
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False
