"""The decision log's queue: no queued line is lost to flush() or close() racing a write under way; allows that
must be logged wait for the write of their batch (one write for many lines), never longer than their budget;
the queue is bounded in bytes, whatever the lines carry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from pep import decision_log
from pep.config import DecisionLogConfig
from pep.decision_log import FLUSH_S, DecisionLog
from pep.metrics import Metrics
from tests.support.log_writer import Gate
from tests.support.observe import metric

MIB = 1024 * 1024


def make_log(path: Path, **config: Any) -> DecisionLog:
    return DecisionLog(DecisionLogConfig(sink="file", path=str(path), **config), Metrics(("r",)))


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[DecisionLog]:
    log = make_log(tmp_path / "d.jsonl", required=True)
    await log.start()
    yield log
    await log.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def _busy_log(path: Path) -> tuple[DecisionLog, Gate]:
    log = make_log(path)
    await log.start()
    gate = Gate(log)
    for i in range(5):
        assert log.record({"n": i})
    await asyncio.sleep(FLUSH_S + 0.05)  # the flusher has taken the lines; its write waits behind the busy thread
    return log, gate


async def test_flush_waits_for_a_write_under_way(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log, gate = await _busy_log(path)
    flushed = asyncio.ensure_future(log.flush())
    await asyncio.sleep(0.05)
    assert not flushed.done()
    await gate.open()
    await flushed
    assert path.read_text().count("\n") == 5
    await log.close()


async def test_close_writes_every_queued_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    log, gate = await _busy_log(path)
    log.record({"n": 5})
    closed = asyncio.ensure_future(log.close())
    await gate.open()
    await closed
    assert lines(path) == [{"n": i} for i in range(6)]


async def test_concurrent_allows_share_one_write(log: DecisionLog, tmp_path: Path) -> None:
    n = 50
    problems = await asyncio.gather(*(log.commit({"n": i}, 5.0) for i in range(n)))
    assert problems == [None] * n
    # Each returned after its own line was written: the first write took one line, the next all the others.
    assert [e["n"] for e in lines(tmp_path / "d.jsonl")] == list(range(n))
    assert log.writes <= 2 < n


async def test_a_commit_returns_only_after_its_line_was_written(log: DecisionLog, tmp_path: Path) -> None:
    gate = Gate(log)
    commit = asyncio.ensure_future(log.commit({"n": 1}, 5.0))
    await asyncio.sleep(0.1)
    assert not commit.done()  # the write has not happened: the allow must still wait
    await gate.open()
    assert await commit is None
    assert lines(tmp_path / "d.jsonl") == [{"n": 1}]


async def test_a_write_that_does_not_return_in_time_fails_the_commit(log: DecisionLog) -> None:
    gate = Gate(log)
    assert await log.commit({"n": 1}, 0.05) == "the decision log write did not return in time"
    assert await log.commit({"n": 2}, 0.0) == "no time was left to write the decision log"
    await gate.open()


async def test_a_stuck_write_fails_later_commits_at_once(log: DecisionLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decision_log, "STALL_S", 0.05)
    gate = Gate(log)
    assert await log.commit({"n": 1}, 0.01) is not None  # its write is queued behind the stuck one
    await asyncio.sleep(0.1)
    # The write under way started too long ago: no waiting out the whole budget behind it.
    assert await asyncio.wait_for(log.commit({"n": 2}, 60.0), 1.0) == (
        "a decision log write has not returned for over 0.05 s"
    )
    await gate.open()


async def test_a_failed_write_fails_every_commit_of_its_batch(tmp_path: Path) -> None:
    log = DecisionLog(DecisionLogConfig(sink="file", path="/dev/full", required=True), Metrics(("r",)))
    await log.start()
    problems = await asyncio.gather(*(log.commit({"n": i}, 5.0) for i in range(3)))
    assert problems == ["the decision log write failed: No space left on device"] * 3
    await log.close()


async def test_the_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    metrics = Metrics(("r",))
    log = DecisionLog(DecisionLogConfig(sink="file", path=str(tmp_path / "d"), max_pending_bytes=64 * 1024), metrics)
    await log.start()
    gate = Gate(log)
    big = "x" * MIB  # a 1 MiB tool name: capped, so each line holds about a kilobyte of it
    kept = sum(log.record({"mcp_name": big, "i": i}) for i in range(200))
    held = log._held
    assert 32 < kept < 64  # the bound is bytes: not 200 lines, nor one
    assert held <= 64 * 1024
    assert metric(generate_latest(metrics.registry).decode(), "pep_decision_log_pending_bytes") == held
    assert metric(generate_latest(metrics.registry).decode(), "pep_decision_log_dropped_total") == 200 - kept
    assert await log.commit({"mcp_name": big}, 1.0) == "the decision log queue is full"
    await gate.open()
    await log.close()
    assert len(lines(tmp_path / "d")) == kept
    assert log._held == 0


async def test_denials_cannot_crowd_out_the_allows_of_a_required_log(tmp_path: Path) -> None:
    config = DecisionLogConfig(sink="file", path=str(tmp_path / "d"), required=True, max_pending_bytes=64 * 1024)
    log = DecisionLog(config, Metrics(("r",)))
    await log.start()
    gate = Gate(log)  # the sink is slower than a flood of denied requests
    line = {"decision": "deny", "mcp_name": "x" * MIB}
    kept = sum(log.record(line) for _ in range(200))
    assert log._held <= 48 * 1024 < log._held + 1100  # best-effort lines stopped at three quarters
    allowed = asyncio.ensure_future(log.commit({"decision": "allow", "mcp_name": "x" * MIB}, 5.0))
    await asyncio.sleep(0.05)
    await gate.open()
    assert await allowed is None  # the allow still had room
    await log.close()
    assert len(lines(tmp_path / "d")) == kept + 1


async def test_a_caller_that_leaves_never_cancels_the_write_of_its_batch(log: DecisionLog, tmp_path: Path) -> None:
    gate = Gate(log)
    leaving = asyncio.ensure_future(log.commit({"n": 1}, 5.0))
    staying = asyncio.ensure_future(log.commit({"n": 2}, 5.0))
    await asyncio.sleep(0.05)
    leaving.cancel()  # its caller went away while both lines wait for one write
    await gate.open()
    assert await staying is None
    assert leaving.cancelled()
    assert lines(tmp_path / "d.jsonl") == [{"n": 1}, {"n": 2}]  # the line of an allow decided is still written
