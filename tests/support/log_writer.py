"""Holding the decision log's writer thread, as a slow disk or a write under way would."""

from __future__ import annotations

import threading

from pep.decision_log import DecisionLog


class Gate:
    """Submits a job that blocks the writer thread until `open()`: every write queued after it waits."""

    def __init__(self, log: DecisionLog, hold_s: float = 10.0) -> None:
        assert log._writer is not None
        self._event = threading.Event()
        self.held = log._writer.submit(lambda: self._event.wait(hold_s))

    async def open(self) -> None:
        self._event.set()
        await self.held
