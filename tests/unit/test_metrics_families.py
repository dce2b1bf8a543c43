"""The lock-free families render exactly what prometheus-client's own Counter and Histogram render for the same
updates: a scrape cannot tell which one counted (only `_created`'s time stamps differ)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from pep.metrics import CounterFamily, HistogramFamily, Metrics

BOUNDS = (0.0005, 0.001, 0.0025, 0.1, 1.0, 2.5)
ROUTES = ("a", "b", "_unmatched")
# Every bound, the floats either side of it, and values below and above them all: a bucket off by one differs.
NEAR = [v for b in BOUNDS for v in (math.nextafter(b, -math.inf), b, math.nextafter(b, math.inf))]
EDGES = (*NEAR, 0.0, -0.25, 3.0, 1e9, math.inf)
CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)

Render = Callable[[CollectorRegistry], bytes]


def _without_created_times(text: bytes) -> str:
    return CREATED.sub(r"\1 <created>", text.decode())


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


def _both_render_the_same(theirs: CollectorRegistry, ours: CollectorRegistry, names: list[str]) -> None:
    for render in (generate_latest, generate_openmetrics):
        text = _without_created_times(render(ours))
        assert text == _without_created_times(render(theirs))
        assert "_created" in text  # emitted by both, at the same places
    restricted = (generate_latest(r.restricted_registry(names)) for r in (theirs, ours))
    assert _without_created_times(next(restricted)) == _without_created_times(next(restricted))


def _histograms(observations: list[tuple[str, float]]) -> None:
    theirs, ours = _pair()
    reference = Histogram("t_seconds", "Help of t.", ["route"], registry=theirs, buckets=BOUNDS)
    family = HistogramFamily("t_seconds", "Help of t.", ["route"], registry=ours, buckets=BOUNDS)
    for route in ROUTES:  # bound at start, in this order, as Metrics binds them
        reference.labels(route)
        family.labels(route)
    for route, value in observations:
        reference.labels(route).observe(value)
        family.labels(route).observe(value)
    _both_render_the_same(theirs, ours, ["t_seconds_bucket", "t_seconds_count"])


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    _histograms([(route, v) for route in ROUTES for v in EDGES])


@given(st.lists(st.tuples(st.sampled_from(ROUTES), st.sampled_from(EDGES) | st.floats(0, 40)), max_size=40))
def test_histograms_render_as_prometheus_client_does(observations: list[tuple[str, float]]) -> None:
    _histograms(observations)


@given(st.lists(st.tuples(st.sampled_from(ROUTES), st.sampled_from(("allow", "deny")), st.integers(0, 3))))
def test_counters_render_as_prometheus_client_does(increments: list[tuple[str, str, int]]) -> None:
    theirs, ours = _pair()
    reference = Counter("t_total", "Help of t.", ["route", "decision"], registry=theirs)
    family = CounterFamily("t_total", "Help of t.", ["route", "decision"], registry=ours)
    for route in ROUTES:
        for decision in ("deny", "allow"):
            reference.labels(route, decision)
            family.labels(route, decision)
    for route, decision, amount in increments:
        if amount == 1:
            reference.labels(route, decision).inc()
            family.labels(route, decision).inc()
        else:
            reference.labels(route, decision).inc(amount)
            family.labels(route, decision).inc(amount)
    _both_render_the_same(theirs, ours, ["t_total"])


def test_a_counter_never_goes_down() -> None:
    family = CounterFamily("t_total", "Help of t.", ["route"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        family.labels("a").inc(-1)
    assert family.labels("a").value == 0


def test_a_family_registered_twice_is_refused_like_a_metric() -> None:
    registry = CollectorRegistry()
    Counter("t_total", "Help of t.", ["route"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        CounterFamily("t_total", "Help of t.", ["route"], registry=registry)


def test_routes_a_reload_adds_appear_after_the_first_ones() -> None:
    metrics = Metrics(("a",))
    metrics.bind_routes(("b", "a"))
    text = generate_latest(metrics.registry).decode()
    first, added = (text.index(f'pep_decision_duration_seconds_count{{route="{r}"}}') for r in ("a", "b"))
    assert first < added
    assert 'pep_decisions_total{decision="allow",reason="allowed",route="b"} 0.0' in text
