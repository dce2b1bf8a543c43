"""The decision log never loses a queued line to flush() or close() racing a write under way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pep.config import DecisionLogConfig
from pep.decision_log import FLUSH_S, DecisionLog
from pep.metrics import Metrics


async def _busy_log(path: Path) -> DecisionLog:
    log = DecisionLog(DecisionLogConfig(sink="file", path=str(path)), Metrics(("r",)))
    await log.start()
    assert log._executor is not None
    # The writer thread is busy (a slow disk, a previous write) when the flusher takes the queue.
    log._executor.submit(time.sleep, 0.3)
    for i in range(5):
        assert log.record({"n": i})
    await asyncio.sleep(FLUSH_S + 0.05)  # the flusher has taken the lines; its write waits behind the busy thread
    return log


async def test_flush_waits_for_a_write_under_way(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log = await _busy_log(path)
    await log.flush()
    assert path.read_text().count("\n") == 5
    await log.close()


async def test_close_writes_every_queued_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log = await _busy_log(path)
    log.record({"n": 5})
    await log.close()
    assert [line for line in path.read_text().splitlines()] == [f'{{"n":{i}}}' for i in range(6)]
