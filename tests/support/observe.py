"""What an operator can observe, as test helpers: decision log keys and metric values from /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# The keys of every decision log line (README, "Decision log").
LOG_KEYS = frozenset(
    {
        "time",
        "request_id",
        "decision_id",
        "route",
        "method",
        "path",
        "subject",
        "mcp_method",
        "mcp_name",
        "decision",
        "reason",
        "pdp_ms",
        "attempts",
        "circuit",
        "trace_id",
    }
)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0.0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
