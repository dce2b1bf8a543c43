"""The Prometheus metrics (README, "Metrics"), in a registry per runtime, with children bound once, not per request.

No label ever takes a value from the request: routes come from the config, reasons from the closed set.

The families updated on every request (decisions, decision and PDP and upstream durations, upstream responses
and failures) are `CounterFamily` and `HistogramFamily` below: an update is a float addition on a slotted
object, with no lock and no label lookup, and the samples are built at scrape time, the same text
prometheus-client's own Counter and Histogram render. They are updated only on the event loop's thread (the
proxy, the engine, the forwarder), the thread that also serves /metrics. The rare ones (reloads, transitions,
fetches, approvals) and the decision log's, whose write time is observed once per batch, stay prometheus-client
objects.
"""

from __future__ import annotations

import abc
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Generic, Protocol, TypeVar, cast

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from pep import __version__
from pep.breaker import State
from pep.decision import DENY_REASONS, Reason

UNMATCHED: Final = "_unmatched"
PDP_OUTCOMES: Final = ("ok", "error", "timeout", "unreachable")
UPSTREAM_FAILURES: Final = ("connect", "timeout", "reset", "body_limit", "body_timeout", "unreadable")
CODE_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
APPROVAL_RESULTS: Final = ("requested", "granted", "denied", "timeout", "unavailable", "invalid")
CREDENTIAL_FETCH_RESULTS: Final = ("success", "refused", "error")  # refused: the server answered with an OAuth error
_FAST: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_go_float: Final = cast(Callable[[float], str], floatToGoString)  # how prometheus-client writes `le` (untyped there)


class Count:
    """One counter series: `value` only ever grows."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class Timing:
    """One histogram series: a count per bucket (made cumulative at scrape time) and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # the finite upper bounds; counts has one more, for +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # bisect_left: a value equal to an upper bound falls in that bucket (`le` is inclusive).
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


S = TypeVar("S", Count, Timing)


class _Family(abc.ABC, Generic[S]):
    """A labelled family of series with its own collector, registered where a prometheus-client metric would be."""

    def __init__(
        self, registry: CollectorRegistry, name: str, documentation: str, typ: str, labelnames: Sequence[str]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._type = typ
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        registry.register(self)

    def labels(self, *values: object) -> S:
        """The series of these label values, made at 0 the first time (as prometheus-client's `labels`)."""
        if len(values) != len(self._labelnames):
            raise ValueError("Incorrect label count")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new()
        return series

    @abc.abstractmethod
    def _new(self) -> S:
        """A new series at zero."""

    @abc.abstractmethod
    def collect(self) -> Iterator[Metric]:
        """The family's samples now (a scrape)."""

    def describe(self) -> list[Metric]:
        """The family's name and type, without samples: the registry checks duplicates and `name[]` with it."""
        return [Metric(self._name, self._documentation, self._type)]

    def _each(self) -> Iterator[tuple[dict[str, str], S]]:
        # A snapshot: a reload binding a route's series while something iterates cannot break the scrape.
        for values, series in tuple(self._series.items()):
            yield dict(zip(self._labelnames, values, strict=True)), series


class CounterFamily(_Family[Count]):
    """Samples as prometheus-client's Counter: `<name>_total`, and `<name>_created` unless disabled."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(registry, name.removesuffix("_total"), documentation, "counter", labelnames)

    def _new(self) -> Count:
        return Count()

    def collect(self) -> Iterator[Metric]:
        created = prometheus_client.metrics._use_created  # its switch for `_created`, read as its metrics do
        family = Metric(self._name, self._documentation, "counter")
        total, since = self._name + "_total", self._name + "_created"
        for labels, series in self._each():
            family.add_sample(total, labels, series.value)
            if created:
                family.add_sample(since, labels, series.created)
        yield family


class HistogramFamily(_Family[Timing]):
    """Samples as prometheus-client's Histogram: cumulative `_bucket`s up to `+Inf`, `_count`, `_sum`,
    `_created`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if not bounds or list(bounds) != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        self._bounds = bounds
        self._le = [_go_float(b) for b in (*bounds, float("inf"))]
        super().__init__(registry, name, documentation, "histogram", labelnames)

    def _new(self) -> Timing:
        return Timing(self._bounds)

    def collect(self) -> Iterator[Metric]:
        created = prometheus_client.metrics._use_created
        name = self._name
        family = Metric(name, self._documentation, "histogram")
        with_sum = self._bounds[0] >= 0  # as prometheus-client: no _sum when a bucket is negative
        for labels, series in self._each():
            cumulative = 0.0
            for le, count in zip(self._le, series.counts, strict=True):
                cumulative += count
                family.add_sample(name + "_bucket", {**labels, "le": le}, cumulative)
            family.add_sample(name + "_count", labels, cumulative)
            if with_sum:
                family.add_sample(name + "_sum", labels, series.sum)
            if created:
                family.add_sample(name + "_created", labels, series.created)
        yield family


class _EngineView(Protocol):
    in_flight: int

    @property
    def circuit(self) -> State: ...


class Metrics:
    """All metric families, and pre-bound children for every label combination the PEP can produce."""

    def __init__(self, routes: tuple[str, ...]) -> None:
        self.registry = r = CollectorRegistry()
        decisions = CounterFamily(
            "pep_decisions_total",
            "Decisions by route, outcome and reason.",
            ["route", "decision", "reason"],
            registry=r,
        )
        self.decisions: dict[tuple[str, Reason], Count] = {}
        duration = HistogramFamily(
            "pep_decision_duration_seconds",
            "Time from request to decision, by route.",
            ["route"],
            registry=r,
            buckets=_FAST,
        )
        self.decision_duration: dict[str, Timing] = {}
        pdp = HistogramFamily(
            "pep_pdp_request_duration_seconds",
            "PDP attempts by outcome.",
            ["outcome"],
            registry=r,
            buckets=_FAST,
        )
        self.pdp_duration = {o: pdp.labels(o) for o in PDP_OUTCOMES}
        self.pdp_in_flight = Gauge(
            "pep_pdp_in_flight", "Slots of max_in_flight taken by decisions waiting for the PDP.", registry=r
        )
        self.circuit_state = Gauge("pep_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r)
        self.pdp_reachable = Gauge(
            "pep_pdp_reachable", "1 when the last connection probe reached the PDP (always 1 for Cedar).", registry=r
        )
        transitions = Counter("pep_circuit_transitions_total", "Circuit breaker transitions.", ["to"], registry=r)
        self.transitions = {s: transitions.labels(s.name.lower()) for s in State}
        up = HistogramFamily(
            "pep_upstream_request_duration_seconds",
            "Upstream time to response headers, by route.",
            ["route"],
            registry=r,
            buckets=_SLOW,
        )
        self.upstream_duration: dict[str, Timing] = {}
        responses = CounterFamily(
            "pep_upstream_responses_total",
            "Upstream responses by route and status class.",
            ["route", "code_class"],
            registry=r,
        )
        self.upstream_responses: dict[tuple[str, str], Count] = {}
        failures = CounterFamily(
            "pep_upstream_failures_total",
            "Allowed requests whose upstream exchange failed: no response (502/504/413/408) or cut mid-body.",
            ["route", "kind"],
            registry=r,
        )
        self.upstream_failures: dict[tuple[str, str], Count] = {}
        self._route_families = (decisions, duration, up, responses, failures)
        self.bind_routes((*routes, UNMATCHED))
        self.requests_in_flight = Gauge("pep_requests_in_flight", "Requests being handled.", registry=r)
        self.listener_connections = Gauge(
            "pep_listener_connections",
            "Agent-facing connections open (TLS ones once their handshake is done).",
            registry=r,
        )
        self.listener_refused = Counter(
            "pep_listener_connections_refused_total",
            "Agent-facing connections reset as they arrived because max_connections were open.",
            registry=r,
        )
        # Read at scrape time: a leak of tasks (a stream or a fetch never finished) shows as growth here.
        self.event_loop_tasks = Gauge("pep_event_loop_tasks", "Tasks alive in the event loop.", registry=r)
        self.decision_log_dropped = Counter(
            "pep_decision_log_dropped_total",
            "Decision log lines dropped (queue full or write error).",
            registry=r,
        )
        # Read at scrape time: lines queued or being written; growth means the sink is slower than the decisions.
        self.decision_log_pending_bytes = Gauge(
            "pep_decision_log_pending_bytes", "Decision log bytes queued or being written.", registry=r
        )
        # A prometheus-client Histogram (locked): once per batch write, not per request; the writer thread hands
        # each write's end back to the event loop, which observes it.
        self.decision_log_write_seconds = Histogram(
            "pep_decision_log_write_duration_seconds",
            "Decision log batch writes, from start to return; with required: true, allows wait for them.",
            registry=r,
            buckets=_FAST,
        )
        reloads = Counter("pep_config_reloads_total", "Config reloads by result.", ["result"], registry=r)
        self.config_reloads = {res: reloads.labels(res) for res in ("success", "error")}
        fetches = Counter(
            "pep_jwks_fetches_total", "Fetches of identity.jwt.jwks_url by result.", ["result"], registry=r
        )
        self.jwks_fetches = {ok: fetches.labels("success" if ok else "error") for ok in (True, False)}
        approvals = Counter(
            "pep_approvals_total",
            "Approvals asked of a person (requested) and how they ended.",
            ["result"],
            registry=r,
        )
        self.approvals = {res: approvals.labels(res) for res in APPROVAL_RESULTS}
        # Read at scrape time from the approval engine in force (0 without an `approvals` section).
        self.approvals_circuit_state = Gauge(
            "pep_approvals_circuit_state",
            "The OpenID Provider's circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.approvals_held = Gauge(
            "pep_approvals_held", "Requests held waiting for a person (hold mode; approvals.max_held).", registry=r
        )
        credential_fetches = Counter(
            "pep_credential_fetches_total",
            "Just-in-time credential requests to token endpoints, by result (cache hits are not fetches).",
            ["result"],
            registry=r,
        )
        self.credential_fetches = {res: credential_fetches.labels(res) for res in CREDENTIAL_FETCH_RESULTS}
        self._credential_circuit = Gauge(
            "pep_credential_circuit_state",
            "The breaker of a route's just-in-time credential token endpoint: 0 closed, 1 half-open, 2 open.",
            ["route"],
            registry=r,
        )
        self._credential_transitions = Counter(
            "pep_credential_circuit_transitions_total",
            "Transitions of the breakers of just-in-time credential token endpoints.",
            ["route", "to"],
            registry=r,
        )
        Gauge("pep_build_info", "Build information.", ["version"], registry=r).labels(__version__).set(1)

    def bind_routes(self, routes: tuple[str, ...]) -> None:
        """Children for every label combination of these routes (at start, and for routes a reload adds).
        Children of routes a reload removed stay, with their counts: series never go backwards."""
        decisions, duration, up, responses, failures = self._route_families
        for route in routes:
            if route in self.decision_duration:
                continue
            self.decision_duration[route] = duration.labels(route)
            for reason in DENY_REASONS:
                self.decisions[route, reason] = decisions.labels(route, "deny", reason.value)
            if route == UNMATCHED:
                continue
            self.decisions[route, Reason.ALLOWED] = decisions.labels(route, "allow", Reason.ALLOWED.value)
            self.upstream_duration[route] = up.labels(route)
            for c in CODE_CLASSES:
                self.upstream_responses[route, c] = responses.labels(route, c)
            for k in UPSTREAM_FAILURES:
                self.upstream_failures[route, k] = failures.labels(route, k)

    def bind_engine(self, engine: _EngineView) -> None:
        """Gauges read live from the engine at scrape time instead of being updated per request."""
        self.pdp_in_flight.set_function(lambda: engine.in_flight)
        self.circuit_state.set_function(lambda: int(engine.circuit))

    def credential_transitions(self, route: str) -> Callable[[State, State], None]:
        """Counts the transitions of the route's token endpoint breaker."""
        transitions = {s: self._credential_transitions.labels(route, s.name.lower()) for s in State}
        return lambda _old, new: transitions[new].inc()

    def bind_credential_circuit(self, route: str, state: Callable[[], State]) -> None:
        """The route's token endpoint breaker, read live at scrape time (a reload rebinds it)."""
        self._credential_circuit.labels(route).set_function(lambda: int(state()))

    def circuit_transition(self, _old: State, new: State) -> None:
        self.transitions[new].inc()
