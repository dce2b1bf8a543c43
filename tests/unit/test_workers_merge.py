"""The supervisor's merge of worker scrapes, and the decision log's line-preserving chunks for a shared pipe."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from pep.decision import Reason
from pep.log_sink import _chunks
from pep.metrics import Metrics
from pep.workers import _Scraped, merge
from tests.support.observe import metric


def scrape(allowed: int) -> str:
    metrics = Metrics(("tools",))
    metrics.decisions["tools", Reason.ALLOWED].inc(allowed)
    return generate_latest(metrics.registry).decode()


def test_merge_labels_every_sample_with_its_worker_and_drops_created() -> None:
    registry = CollectorRegistry()
    registry.register(_Scraped(merge([(0, scrape(3)), (1, scrape(4))])))
    text = generate_latest(registry).decode()
    assert metric(text, "pep_decisions_total", route="tools", reason="allowed", worker="0") == 3
    assert metric(text, "pep_decisions_total", route="tools", reason="allowed", worker="1") == 4
    assert text.count("# TYPE pep_decisions_total counter") == 1  # one family, not one per worker
    assert "_created" not in text
    assert 'pep_decision_duration_seconds_bucket{le="+Inf",route="tools",worker="1"}' in text


def test_chunks_keep_whole_lines_within_the_limit() -> None:
    lines = [b"a" * 10 + b"\n", b"b" * 10 + b"\n", b"c" * 30 + b"\n", b"d\n"]
    chunks = _chunks(lines, 24)
    assert b"".join(chunks) == b"".join(lines)
    assert chunks == [lines[0] + lines[1], lines[2], lines[3]]  # a long line is a chunk of its own
    assert _chunks([], 24) == []
