"""The verdicts of a run, each from evidence the PEP does not control: what the load client got, what the
upstreams received, what the decision logs say, what /proc and /metrics show, and when the harness broke what.

Every check returns its figures and, when it fails, the first problems it found.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from reliability import plan
from reliability.plan import Kind
from reliability.stack import STRIPPED_PREFIXES, Delivery

# README, "Denials": the closed set of reasons.
CLOSED_REASONS = frozenset(
    {
        "policy_denied",
        "pdp_undefined",
        "pdp_malformed",
        "pdp_error_status",
        "pdp_timeout",
        "pdp_unreachable",
        "pdp_overloaded",
        "circuit_open",
        "obligation_unsupported",
        "body_too_large",
        "body_unreadable",
        "request_ambiguous",
        "no_route",
        "credential_unavailable",
        "audit_unavailable",
        "identity_missing",
        "identity_invalid",
        "identity_unavailable",
        "internal_error",
    }
)
# README, "PDPs" and "The decision engine" (circuit breaker): failures and successes of one decision.
BREAKER_FAILURES = frozenset({"pdp_unreachable", "pdp_timeout", "pdp_error_status", "pdp_malformed"})
BREAKER_SUCCESSES = frozenset({"allowed", "policy_denied", "pdp_undefined", "obligation_unsupported"})
TOLERANCE_S = 0.005  # log times are truncated to the millisecond
TRUNCATION_S = 0.001  # how much later than its log time a decision may have started
RECOVERY_SLACK_S = 0.3  # on top of open_ms and one probe's deadline: the next request's arrival, the probe itself
MAX_PROBLEMS = 12


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "summary": self.summary,
            "figures": self.figures,
            "problems": self.problems[:MAX_PROBLEMS],
            "problem_count": len(self.problems),
        }


@dataclass
class RunData:
    profile: plan.Profile
    t0: float  # wall-clock time of request 0
    load: dict[str, Any]  # the load process's summary (without its results)
    results: list[dict[str, Any]]  # load and warm-up requests, wall-clock times
    logs: dict[str, list[dict[str, Any]]]
    deliveries: dict[str, list[Delivery]]
    cut: dict[str, dict[str, float]]
    fault_timeline: list[tuple[float, float, str]]
    cerbos_events: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    metrics_final: dict[str, str]
    quiet_before: dict[str, dict[str, Any]]
    quiet_after: dict[str, dict[str, Any]]
    pool_drain: dict[str, Any]
    exits: dict[str, dict[str, Any]]
    stderr: dict[str, str]
    # per PEP, request id -> (when the upstream's handler began, when it returned), wall clock
    upstream_timing: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    runner_lag_s: list[float] = field(default_factory=list)  # how late the run's own event loop ran, per tick


def log_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@dataclass(frozen=True, slots=True)
class Decision:
    start: float
    end: float
    reason: str
    asked: bool  # the PDP was asked (attempts > 0)
    rid: str
    stalled: bool = False  # a pdp_timeout the PEP noticed half a deadline late or more: its own stall

    @property
    def failure(self) -> bool:
        """A failure of the PDP, as the breaker counts it (a timeout the PEP was too held up to notice in time
        is not one: pep/engine.py `STALL_SHARE`)."""
        return self.reason in BREAKER_FAILURES and not self.stalled

    @property
    def success(self) -> bool:
        return self.reason in BREAKER_SUCCESSES


def decisions_of(lines: list[dict[str, Any]]) -> list[Decision]:
    out = []
    for line in lines:
        start = log_time(line["time"])
        pdp_ms = line.get("pdp_ms") or 0.0
        attempts = line.get("attempts") or 0
        stalled = line["reason"] == "pdp_timeout" and plan.STALLED_DETAIL in line.get("detail", "")
        out.append(Decision(start, start + pdp_ms / 1000, line["reason"], attempts > 0, line["request_id"], stalled))
    return out


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found.append((dict(s.labels), s.value))
    return found


class Index:
    """Lookups shared by the checks."""

    def __init__(self, data: RunData) -> None:
        self.kind: dict[str, Kind] = {}
        self.index: dict[str, int] = {}
        self.result: dict[str, dict[str, Any]] = {}
        for r in data.results:
            self.kind[r["rid"]] = plan.BY_NAME[r["kind"]]
            self.index[r["rid"]] = r["i"]
            self.result[r["rid"]] = r
        self.lines_by_rid: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.allow_by_decision: dict[str, dict[str, dict[str, Any]]] = {}
        for pep, lines in data.logs.items():
            by_rid: dict[str, list[dict[str, Any]]] = defaultdict(list)
            allows: dict[str, dict[str, Any]] = {}
            for line in lines:
                by_rid[line["request_id"]].append(line)
                if line["decision"] == "allow":
                    allows[line["decision_id"]] = line
            self.lines_by_rid[pep] = by_rid
            self.allow_by_decision[pep] = allows

    def line(self, pep: str, rid: str) -> dict[str, Any] | None:
        lines = self.lines_by_rid.get(pep, {}).get(rid)
        return lines[0] if lines else None

    def expected_target(self, rid: str) -> str | None:
        kind = self.kind.get(rid)
        if kind is None:
            return None
        target = kind.raw_target(self.index[rid])
        for route, prefix in STRIPPED_PREFIXES.items():
            if kind.path(self.index[rid]).startswith(prefix + "/") and route == "faults":
                target = target[len(prefix) :]
        return target


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def latency_by_class(data: RunData, ix: Index) -> dict[str, dict[str, float | int | None]]:
    """Milliseconds from each request's due time to its last byte, by what happened to it: allowed requests
    answered by the echoing upstream, and denials by reason (the PEP must answer quickly while it denies)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in data.results:
        if r["i"] < 0 or r["outcome"] != "complete":
            continue
        kind = ix.kind[r["rid"]]
        line = ix.line(kind.pep, r["rid"])
        if line is None:
            continue
        if line["decision"] == "allow":
            if kind.allowed == plan.ECHO and kind.name != "up_slow_ok":
                groups["allowed (upstream echo)"].append((r["done"] - r["due"]) * 1000)
        else:
            groups[f"denied {line['reason']}"].append((r["done"] - r["due"]) * 1000)
    return {
        name: {
            "count": len(v),
            "p50": _round(_pct(v, 0.5)),
            "p99": _round(_pct(v, 0.99)),
            "max": _round(max(v)),
        }
        for name, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    }


def check_load_held(data: RunData, ix: Index) -> Check:
    load = data.load
    intended = load["intended"]
    sent = load["sent"]
    duration = data.profile.duration
    problems = []
    if sent != intended:
        problems.append(f"{intended - sent} of {intended} requests were never sent")
    if load["sending_s"] > duration * 1.05:
        problems.append(f"sending took {load['sending_s']} s for a {duration:g} s schedule")
    load_results = [r for r in data.results if r["i"] >= 0]
    latencies = [(r["done"] - r["due"]) * 1000 for r in load_results if r["outcome"] == "complete"]
    figures = {
        "target_rate_per_s": data.profile.rate,
        "duration_s": duration,
        "intended": intended,
        "sent": sent,
        "achieved_rate_per_s": round(sent / load["sending_s"], 1) if load["sending_s"] else None,
        "send_lag_ms": load["send_lag_ms"],
        "latency_ms_from_due_time": {
            "p50": _round(_pct(latencies, 0.5)),
            "p99": _round(_pct(latencies, 0.99)),
            "p999": _round(_pct(latencies, 0.999)),
            "max": _round(max(latencies) if latencies else None),
        },
        "latency_ms_by_class": latency_by_class(data, ix),
        "client_pools": load["pools"],
    }
    summary = f"{sent}/{intended} requests sent at {figures['achieved_rate_per_s']}/s (target {data.profile.rate:g}/s)"
    return Check("load_held", not problems, summary, figures, problems)


def _round(v: float | None, n: int = 3) -> float | None:
    return None if v is None else round(v, n)


def check_all_answered(data: RunData, ix: Index) -> Check:
    problems = []
    outcomes: Counter[str] = Counter()
    explained: Counter[str] = Counter()
    answered = {r["i"] for r in data.results if r["i"] >= 0}
    missing = data.load["intended"] - len(answered)
    if missing:
        problems.append(f"{missing} requests have no result at all (unanswered when the load ended)")
    for r in data.results:
        outcome = r["outcome"]
        outcomes[outcome] += 1
        kind = ix.kind[r["rid"]]
        line = ix.line(kind.pep, r["rid"])
        allowed = line is not None and line["decision"] == "allow"
        if outcome == "complete":
            continue
        if outcome == "client_drop" and kind.allowed == plan.SSE_DROP and r["status"] == 200:
            explained["client dropped an SSE stream on purpose"] += 1
        elif outcome == "truncated" and kind.allowed == plan.TRUNCATED and allowed and r["status"] == 200:
            explained["upstream reset mid-body after the status line (relayed as a cut body)"] += 1
        else:
            problems.append(f"{r['rid']} ({kind.name}): {outcome} {r['detail']} status={r['status']}")
    figures = {
        "requests": len(data.results),
        "warm_up_requests": sum(1 for r in data.results if r["i"] < 0),
        "outcomes": dict(outcomes),
        "explained_connection_ends": dict(explained),
        "unexplained": len(problems),
        "unanswered": missing + outcomes["timeout"],
    }
    summary = (
        f"{outcomes['complete']} complete answers, {sum(explained.values())} explained connection ends, "
        f"{len(problems)} unexplained or unanswered"
    )
    return Check("all_answered", not problems, summary, figures, problems)


def _expected_problem(kind: Kind, r: dict[str, Any]) -> str | None:
    status, outcome, uerr = r["status"], r["outcome"], r["uerr"]
    want = kind.allowed
    ok = {
        plan.ECHO: status == 200 and outcome == "complete" and r["bytes"] > 0,
        plan.BIG: status == 200 and outcome == "complete" and r["bytes"] == plan.BIG_BYTES,
        plan.SSE_FULL: status == 200 and outcome == "complete" and r["events"] == 6,
        plan.SSE_DROP: status == 200 and outcome == "client_drop",
        plan.TRUNCATED: status == 200 and outcome == "truncated" and r["bytes"] < 300000,
        plan.UPSTREAM_RESET: status == 502 and uerr == "reset" and outcome == "complete",
        plan.UPSTREAM_TIMEOUT: status == 504 and uerr == "timeout" and outcome == "complete",
        plan.UPSTREAM_CONNECT: status == 502 and uerr == "connect" and outcome == "complete",
        plan.PASSED_503: status == 503 and uerr is None and outcome == "complete",
    }[want]
    if ok:
        return None
    return f"allowed {kind.name}: want {want}, got status={status} outcome={outcome} uerr={uerr} bytes={r['bytes']}"


def decision_end(line: dict[str, Any]) -> float:
    """When a decision was known (its log time, when the engine took it up, plus `pdp_ms`)."""
    return log_time(line["time"]) + (line.get("pdp_ms") or 0.0) / 1000


def _timed_out_in_full(kind: Kind, r: dict[str, Any], line: dict[str, Any]) -> bool:
    """A 504 `timeout` on a route with the short timeout that came no sooner than timeout_ms after the request
    could go out: on a busy machine the upstream (or the PEP itself) may be that late, and then 504 is the
    answer. One that came sooner is a PEP bug (a connection spoiled by aiohttp's read timer answered 504 in a
    millisecond)."""
    if (r["status"], r["uerr"]) != (504, "timeout") or not kind.target.startswith(("/faults", "/deadend")):
        return False
    return bool(r["done"] - decision_end(line) >= plan.FAULT_ROUTE_TIMEOUT_MS / 1000 - TOLERANCE_S)


def check_answers(data: RunData, ix: Index) -> Check:
    """Each answer is what its decision and the upstream's behaviour make it: 403 + reason for a denial, and
    for an allow the upstream's answer or the right 502/504 with `x-pep-upstream-error`."""
    problems = []
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    late: Counter[str] = Counter()
    for r in data.results:
        kind = ix.kind[r["rid"]]
        if r["outcome"] in ("conn_error", "timeout"):
            continue
        line = ix.line(kind.pep, r["rid"])
        if line is None:
            problems.append(f"{r['rid']} ({kind.name}): answered {r['status']} but no decision log line")
            continue
        if line["decision"] == "deny":
            per_kind[kind.name]["denied"] += 1
            if r["status"] != 403 or r["decision"] != "deny":
                problems.append(f"{r['rid']} ({kind.name}): denied, answered {r['status']} {r['decision']}")
            if kind.fixed_reason is not None and line["reason"] != kind.fixed_reason:
                problems.append(f"{r['rid']} ({kind.name}): reason {line['reason']}, want {kind.fixed_reason}")
            continue
        per_kind[kind.name]["allowed"] += 1
        per_kind[kind.name][f"{r['status']}/{r['outcome']}" + (f"/{r['uerr']}" if r["uerr"] else "")] += 1
        problem = _expected_problem(kind, r)
        if problem is not None and _timed_out_in_full(kind, r, line):
            # Not the answer its kind has when all goes to plan, but the one the contract gives when the answer
            # did not come within timeout_ms: the PEP waited that long. Whose lateness it was is counted.
            timing = data.upstream_timing.get(kind.pep, {}).get(r["rid"])
            sent = decision_end(line)
            upstream_late = timing is None or timing[1] >= sent + plan.FAULT_ROUTE_TIMEOUT_MS / 1000
            late[f"{kind.pep}: {'the upstream' if upstream_late else 'the PEP'} was late"] += 1
            continue
        if problem is not None:
            problems.append(f"{r['rid']}: {problem}")
    allowed_faults = {
        k: dict(c) for k, c in per_kind.items() if k.startswith("up_") and c["allowed"]
    }  # the upstream-fault kinds
    figures = {
        "by_kind": {k: dict(c) for k, c in sorted(per_kind.items())},
        "upstream_faults_allowed": allowed_faults,
        "timed_out_in_full": dict(late),
    }
    allowed = sum(c["allowed"] for c in per_kind.values())
    summary = f"{allowed} allowed and {sum(c['denied'] for c in per_kind.values())} denied answers as expected"
    if late:
        summary += f" ({sum(late.values())} of them 504 after the full timeout_ms: {dict(late)})"
    if problems:
        summary = f"{len(problems)} answers not as expected"
    return Check("answers_as_expected", not problems, summary, figures, problems)


def check_upstream_allowed(data: RunData, ix: Index) -> Check:
    """Every request an upstream received carries the id of an allow decision in its own PEP's log, for the
    same request id, method and path; no decision is delivered twice, and no request id twice."""
    problems = []
    figures: dict[str, Any] = {}
    for pep, deliveries in data.deliveries.items():
        allows = ix.allow_by_decision[pep]
        per_decision: Counter[str | None] = Counter(d.decision_id for d in deliveries)
        per_rid: Counter[str] = Counter(d.request_id for d in deliveries)
        matched = 0
        for d in deliveries:
            line = allows.get(d.decision_id or "")
            if line is None:
                problems.append(f"{pep}: {d.method} {d.target} ({d.request_id}) has no allow {d.decision_id!r}")
                continue
            path = d.target.split("?", 1)[0]
            want_path = line["path"]
            prefix = STRIPPED_PREFIXES.get(line["route"])
            if prefix is not None:
                want_path = want_path[len(prefix) :] or "/"
            if line["method"] != d.method or want_path != path or line["request_id"] != d.request_id:
                problems.append(f"{pep}: {d.method} {d.target} ({d.request_id}) differs from its allow {line}")
                continue
            expected = ix.expected_target(d.request_id)
            if expected is not None and expected != d.target:
                problems.append(f"{pep}: {d.request_id} reached the upstream as {d.target}, sent as {expected}")
                continue
            matched += 1
        problems += [f"{pep}: decision {k} delivered {n} times" for k, n in per_decision.items() if n > 1]
        problems += [f"{pep}: request id {k} delivered {n} times" for k, n in per_rid.items() if n > 1]
        posts = [d for d in deliveries if d.method == "POST"]
        figures[pep] = {
            "upstream_requests": len(deliveries),
            "matched_to_an_allow": matched,
            "post_requests": len(posts),
            "max_deliveries_per_request_id": max(per_rid.values(), default=0),
            "allows_logged": len(allows),
        }
    total = sum(f["upstream_requests"] for f in figures.values())
    summary = f"{total} upstream requests, each matched to exactly one allow; none delivered twice"
    if problems:
        summary = f"{len(problems)} upstream requests without a matching allow or delivered twice"
    return Check("no_upstream_request_without_allow", not problems, summary, figures, problems)


def _periods(timeline: list[tuple[float, float, str]], end: float) -> list[tuple[float, float, str]]:
    """(from, to, mode): each mode from just before it was set until just after the next one was."""
    out = []
    for n, (before, _after, mode) in enumerate(timeline):
        until = timeline[n + 1][1] if n + 1 < len(timeline) else end
        out.append((before, until, mode))
    return out


def check_allow_only_on_allow(data: RunData, ix: Index) -> Check:
    """No allow the PDP did not give: on the Cerbos PEP only the kinds its policies allow; on the fault PEP
    only decisions that overlap a time when the fault PDP answered with an allow shape."""
    problems = []
    end = max((r["done"] for r in data.results), default=data.t0) + 60
    periods = _periods(data.fault_timeline, end)
    allow_periods = [(a, b) for a, b, m in periods if m in plan.ALLOW_MODES]
    counts: Counter[str] = Counter()
    for pep, lines in data.logs.items():
        for line in lines:
            rid = line["request_id"]
            kind = ix.kind.get(rid)
            if kind is None:
                problems.append(f"{pep}: a decision for a request this run did not send: {rid}")
                continue
            if line["decision"] != "allow":
                continue
            counts[pep] += 1
            if not kind.may_allow:
                problems.append(f"{pep}: {rid} ({kind.name}) was allowed; its policy never allows it")
            if pep == plan.FAULT:
                d = decisions_of([line])[0]
                if not any(a - TOLERANCE_S <= d.end and d.start <= b + TOLERANCE_S for a, b in allow_periods):
                    problems.append(f"{pep}: {rid} allowed at {d.start:.3f} while the fault PDP was not allowing")
    summary = f"{sum(counts.values())} allows, each backed by a PDP allow"
    if problems:
        summary = f"{len(problems)} allows the PDP did not give"
    return Check("allow_only_on_pdp_allow", not problems, summary, {"allows": dict(counts)}, problems)


def check_denials(data: RunData, ix: Index) -> Check:
    """Every denial the client saw has `x-pep-reason` from the closed set and a decision log line with the
    same request id, method, path and reason; every request has exactly one log line."""
    problems = []
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    denials = 0
    for r in data.results:
        kind = ix.kind[r["rid"]]
        lines = ix.lines_by_rid[kind.pep].get(r["rid"], [])
        if len(lines) > 1:
            problems.append(f"{r['rid']}: {len(lines)} decision log lines")
        if r["outcome"] not in ("conn_error", "timeout") and not lines:
            problems.append(f"{r['rid']} ({kind.name}): no decision log line")
        if r["status"] != 403 and r["decision"] != "deny":
            continue
        denials += 1
        reason = r["reason"]
        reasons[kind.pep][str(reason)] += 1
        if r["status"] != 403 or r["decision"] != "deny":
            problems.append(f"{r['rid']}: status {r['status']} with x-pep-decision {r['decision']}")
        if reason not in CLOSED_REASONS:
            problems.append(f"{r['rid']}: x-pep-reason {reason!r} is not in the closed set")
        if r["answer_rid"] != r["rid"]:
            problems.append(f"{r['rid']}: denial carries x-request-id {r['answer_rid']!r}")
        line = lines[0] if lines else None
        if line is None:
            continue
        i = ix.index[r["rid"]]
        want = ("deny", reason, kind.method, kind.path(i))
        got = (line["decision"], line["reason"], line["method"], line["path"])
        if got != want:
            problems.append(f"{r['rid']}: client saw {want}, the log has {got}")
    summary = f"{denials} denials, each with a reason from the closed set and its log line"
    if problems:
        summary = f"{len(problems)} denials without a reason or log line"
    figures = {"denials": denials, "by_reason": {p: dict(c.most_common()) for p, c in reasons.items()}}
    return Check("every_denial_has_a_reason", not problems, summary, figures, problems)


@dataclass
class Episode:
    pep: str
    label: str
    fail_at: float
    healthy_at: float | None  # None: an outage the chaos did not cause (`unscheduled`), its end unknown


UNSCHEDULED = "unscheduled (the PDP failed outside the chaos)"


def episodes(data: RunData) -> list[Episode]:
    out = []
    down: tuple[float, str] | None = None
    for ev in data.cerbos_events:
        action = ev["action"]
        if action in ("kill", "freeze", "stop", "restart") and down is None:
            down = (ev["begin"], action)
        if action in ("start", "resume", "restart") and down is not None:
            out.append(Episode(plan.CERBOS, f"cerbos {down[1]}", down[0], ev["end"]))
            down = None
    fault_down: tuple[float, str] | None = None
    for before, after, mode in data.fault_timeline:
        healthy = mode in plan.HEALTHY_MODES
        if not healthy and fault_down is None:
            fault_down = (before, mode)
        elif not healthy and fault_down is not None:
            fault_down = (fault_down[0], f"{fault_down[1]}+{mode}")
        elif healthy and fault_down is not None:
            out.append(Episode(plan.FAULT, f"fault PDP {fault_down[1]}", fault_down[0], after))
            fault_down = None
    return out


_SHIFTS = (-TRUNCATION_S, 0.0, TRUNCATION_S)  # a success against the failures near it: before, as logged, after


def _opening(asked: list[Decision], threshold: int, success_shift: float) -> float | None:
    """When `threshold` consecutive failures had completed, replaying the answers in the order they completed
    (successes moved by `success_shift` against the failures), or None."""
    order = sorted(asked, key=lambda d: d.end + (success_shift if d.success else 0.0))
    count = 0
    for d in order:
        if d.failure:
            count += 1
            if count >= threshold:
                return d.end
        elif d.success:
            count = 0
    return None


def analyse_episode(ep: Episode, decs: list[Decision], next_fail: float) -> dict[str, Any]:
    """Breaker behaviour in one outage, from the decision log alone (see docs/reliability.md)."""
    threshold = plan.FAILURE_THRESHOLD
    open_s = plan.OPEN_MS / 1000
    # Log times are truncated to the millisecond: a decision that ended just after the fault began can look as
    # if it ended just before.
    begin = ep.fail_at - TOLERANCE_S
    asked = sorted((d for d in decs if d.asked and d.end >= begin and d.start < next_fail), key=lambda d: d.end)
    # The order in which answers completed is known to the millisecond only (log times are truncated): a success
    # and a failure less than that apart may have reached the breaker either way. Each check takes the order
    # that favours the PEP: the earliest possible opening for "no circuit_open before it", the latest for "no
    # PDP call after it".
    openings = [o for shift in _SHIFTS if (o := _opening(asked, threshold, shift)) is not None]
    opened_early = min(openings, default=None)
    opened = max(openings, default=None)
    if ep.healthy_at is not None:
        recovered = next(
            (d.end for d in asked if d.success and d.end >= ep.healthy_at and d.start < next_fail),
            None,
        )
    else:  # no known healthy time: recovered when a call started once the circuit could probe gets an answer
        probing = (opened_early or ep.fail_at) + open_s - TOLERANCE_S
        recovered = next((d.end for d in asked if d.success and probing <= d.start < next_fail), None)
    horizon = min(recovered if recovered is not None else next_fail, next_fail)
    result: dict[str, Any] = {
        "pep": ep.pep,
        "fault": ep.label,
        "fault_s": round(ep.healthy_at - ep.fail_at, 3) if ep.healthy_at is not None else None,
        "opened": opened is not None,
        "failures": sum(1 for d in asked if d.failure and d.start < horizon),
    }
    violations: list[str] = []
    if opened is not None:
        before = [d for d in asked if d.failure and d.start <= opened + TOLERANCE_S]
        later = sorted(
            (d for d in asked if d.failure and opened + TOLERANCE_S < d.start < horizon),
            key=lambda d: d.start,
        )
        assert opened_early is not None
        reopened = opened_early  # the earliest the circuit can have opened: its first probe may start open_s later
        probes = 0
        for d in later:
            if d.start >= reopened + open_s - TOLERANCE_S:
                probes += 1
                reopened = d.end
            else:
                violations.append(
                    f"{ep.pep} {ep.label}: {d.rid} asked the PDP {d.start - reopened:.3f} s after the breaker "
                    f"(re)opened ({d.reason})"
                )
        # A circuit_open denial is dated by its end: a call that waited and was refused once the circuit had
        # opened (attempts 0, pdp_ms the wait) began before the opening, and was denied after it.
        early = [d for d in decs if d.reason == "circuit_open" and ep.fail_at <= d.end < opened_early - TOLERANCE_S]
        violations += [
            f"{ep.pep} {ep.label}: {d.rid} denied circuit_open {opened_early - d.end:.3f} s before "
            f"{threshold} consecutive failures had completed"
            for d in early
        ]
        circuit_open = sum(1 for d in decs if d.reason == "circuit_open" and opened <= d.start < horizon)
        result.update(
            opened_after_s=round(opened - ep.fail_at, 3),
            failures_before_open=len(before),
            of_which_in_flight_when_it_opened=sum(1 for d in before if d.end > opened + TOLERANCE_S),
            failures_after_open_not_probes=len(violations),
            failed_probes=probes,
            circuit_open_denials=circuit_open,
        )
    bound = open_s + plan.PDP_TIMEOUT_MS / 1000 + RECOVERY_SLACK_S
    if recovered is None:
        violations.append(f"{ep.pep} {ep.label}: no PDP answer after it was healthy again")
        result["recovered_after_s"] = None
    elif ep.healthy_at is None:  # when the PDP was well again is not known: no bound to hold it to
        result["recovered_after_s"] = None
    else:
        result["recovered_after_s"] = round(recovered - ep.healthy_at, 3)
        if recovered - ep.healthy_at > bound:
            violations.append(
                f"{ep.pep} {ep.label}: recovered {recovered - ep.healthy_at:.3f} s after the PDP was healthy "
                f"(bound {bound:.3f} s)"
            )
    result["recovery_bound_s"] = round(bound, 3)
    result["fail_at"] = ep.fail_at
    result["recovered_at"] = recovered
    result["violations"] = violations
    return result


def unscheduled_outages(pep: str, decs: list[Decision], spans: list[tuple[float, float]]) -> list[Episode]:
    """Runs of `failure_threshold` consecutive PDP failures outside every outage the chaos caused (`spans`): on a
    busy machine a PDP can answer later than the deadline when nothing broke it. The breaker must behave there
    as in any outage; only the recovery bound does not apply, since nobody knows when the PDP was well again."""
    threshold = plan.FAILURE_THRESHOLD
    starts: list[float] = []
    for shift in _SHIFTS:  # ties within the log's precision, in any order the breaker may have seen them
        asked = sorted((d for d in decs if d.asked), key=lambda d: d.end + (shift if d.success else 0.0))
        run: list[Decision] = []
        for d in asked:
            if any(x - TOLERANCE_S <= d.end <= y + TOLERANCE_S for x, y in spans) or d.success:
                run = []
            elif d.failure:
                run.append(d)
                if len(run) == threshold:
                    starts.append(min(r.start for r in run))
    out: list[Episode] = []
    for start in sorted(starts):  # the same run found in several orders is one outage
        if not out or start - out[-1].fail_at > plan.OPEN_MS / 1000:
            out.append(Episode(pep, UNSCHEDULED, start, None))
    return out


def _analyse(pep: str, eps: list[Episode], decs: list[Decision]) -> list[dict[str, Any]]:
    """Each outage analysed up to the next. An unscheduled one still going when the next begins (the PDP was
    already failing when the chaos broke it) is one outage with the next, from the earlier start."""
    eps = sorted(eps, key=lambda e: e.fail_at)
    out = []
    while eps:
        ep, eps = eps[0], eps[1:]
        result = analyse_episode(ep, decs, eps[0].fail_at if eps else float("inf"))
        if eps and ep.healthy_at is None and result["recovered_at"] is None:
            nxt = eps[0]
            eps[0] = Episode(pep, nxt.label, ep.fail_at, nxt.healthy_at)
            continue
        out.append(result)
    return out


def check_breaker(data: RunData) -> tuple[Check, Check]:
    decs = {pep: decisions_of(lines) for pep, lines in data.logs.items()}
    eps = episodes(data)
    analysed = []
    for pep in plan.PEPS:
        scheduled = [e for e in eps if e.pep == pep]
        spans = [
            (a["fail_at"], a["recovered_at"] if a["recovered_at"] is not None else float("inf"))
            for a in _analyse(pep, scheduled, decs[pep])
        ]
        analysed += _analyse(pep, scheduled + unscheduled_outages(pep, decs[pep], spans), decs[pep])
    # A circuit_open denial outside every outage (from its start to its recovery) means the breaker opened
    # while the PDP was healthy.
    outside = []
    for pep in plan.PEPS:
        spans = [
            (a["fail_at"], a["recovered_at"] if a["recovered_at"] is not None else float("inf"))
            for a in analysed
            if a["pep"] == pep
        ]
        for d in decs[pep]:
            if d.reason == "circuit_open" and not any(x - TOLERANCE_S <= d.end <= y + TOLERANCE_S for x, y in spans):
                outside.append(f"{pep}: {d.rid} denied circuit_open at {d.start:.3f}, outside every PDP outage")
    for a in analysed:
        del a["fail_at"], a["recovered_at"]
    opening = ("after the breaker", "consecutive failures had completed", "outside every PDP outage")
    open_problems = [v for a in analysed for v in a["violations"] if any(o in v for o in opening)] + outside
    never_opened = [a for a in analysed if not a["opened"]]
    recover_problems = [v for a in analysed for v in a["violations"] if not any(o in v for o in opening)]
    opened = [a for a in analysed if a["opened"]]
    if not opened:
        open_problems.append("no outage opened the breaker: nothing was tested")
    open_figures = {
        "failure_threshold": plan.FAILURE_THRESHOLD,
        "open_ms": plan.OPEN_MS,
        "outages": len(analysed),
        "opened": len(opened),
        "not_opened": [f"{a['pep']} {a['fault']} ({a['failures']} failures)" for a in never_opened],
        "max_opened_after_s": max((a["opened_after_s"] for a in opened), default=None),
        "failures_admitted_after_open": sum(a["failures_after_open_not_probes"] for a in opened),
        "failed_probes": sum(a["failed_probes"] for a in opened),
        "circuit_open_denials": sum(a["circuit_open_denials"] for a in opened),
        "circuit_open_outside_outages": len(outside),
        "episodes": analysed,
    }
    recovered = [a["recovered_after_s"] for a in analysed if a["recovered_after_s"] is not None]
    from_chaos = [a for a in analysed if a["fault"] != UNSCHEDULED]
    rec_figures = {
        "bound_s": round(plan.OPEN_MS / 1000 + plan.PDP_TIMEOUT_MS / 1000 + RECOVERY_SLACK_S, 3),
        "outages": len(from_chaos),
        "unscheduled": len(analysed) - len(from_chaos),
        "recovered": len(recovered),
        "max_recovery_s": max(recovered, default=None),
        "median_recovery_s": _round(statistics.median(recovered)) if recovered else None,
    }
    unscheduled = len(analysed) - len(from_chaos)
    open_check = Check(
        "breaker_opens_within_threshold",
        not open_problems,
        f"{len(opened)}/{len(analysed)} outages opened the breaker at {plan.FAILURE_THRESHOLD} consecutive failures, "
        f"never earlier; {open_figures['failures_admitted_after_open']} PDP calls admitted while open (probes aside)"
        + (f"; {unscheduled} of the outages not caused by the chaos" if unscheduled else ""),
        open_figures,
        open_problems,
    )
    rec_check = Check(
        "breaker_recovers",
        not recover_problems and bool(from_chaos),
        f"{len(recovered)}/{len(from_chaos)} outages recovered, slowest {rec_figures['max_recovery_s']} s "
        f"after the PDP was healthy (bound {rec_figures['bound_s']} s)",
        rec_figures,
        recover_problems or ([] if from_chaos else ["no outage happened"]),
    )
    return open_check, rec_check


# Event loop tasks besides one per request being handled: the listener runs each request in a task of its own,
# so the raw count under load is its base plus however many requests were in flight at that instant (the same
# scrape reads both). A task that outlives its request, or any other that accumulates, still shows here.
TASKS_BESIDE_REQUESTS = "tasks_beside_requests"
# The base is about eight tasks, and a request's task exists a little before it counts as in flight (its head is
# read) and a little after (its answer is written), as does a streamed body's writer: a few such tasks caught by a
# sample are not growth. Tasks are judged as grown only beyond this many (a leak keeps climbing past it, and
# `no_leaked_connections_or_tasks` compares the counts exactly once the load is over).
TASKS_SLACK = 4


def _value(sample: dict[str, Any], key: str) -> float | None:
    if key == TASKS_BESIDE_REQUESTS:
        tasks, in_flight = sample.get("tasks"), sample.get("in_flight")
        return None if tasks is None or in_flight is None else tasks - in_flight
    value: float | None = sample.get(key)
    return value


def _window(data: RunData, pep: str, key: str, window: tuple[float, float]) -> list[float]:
    a, b = data.t0 + window[0], data.t0 + window[1]
    values = (_value(s, key) for s in data.samples if s["pep"] == pep and a <= s["t"] <= b)
    return [v for v in values if v is not None]


FLAT = (
    ("rss_kib", "VmRSS KiB"),
    ("fds_without_pools", "open fds (pooled idle connections to the PDP and upstream aside)"),
    ("non_socket_fds", "open fds other than sockets"),
    (TASKS_BESIDE_REQUESTS, "event loop tasks (one per request in flight aside)"),
)
# Shown, not judged: the keep-alive pools hold as many idle connections as the highest concurrency they served
# (both pools close them after 30 s idle, within a second of their time: pep/transport/pool.py).
SHOWN = (
    ("fds", "open fds, all"),
    ("tasks", "event loop tasks, all"),
    ("pdp_pool", "connections to the PDP"),
    ("upstream_pool", "connections to the upstream"),
)


def check_flat(data: RunData) -> Check:
    """Memory, descriptors and tasks: the median of the last window within 10% of an early one after warm-up."""
    problems = []
    figures: dict[str, Any] = {"early_window_s": data.profile.early, "last_window_s": data.profile.last}
    for pep in plan.PEPS:
        per: dict[str, Any] = {}
        for key, label in FLAT + SHOWN:
            early = _window(data, pep, key, data.profile.early)
            last = _window(data, pep, key, data.profile.last)
            if not early or not last:
                if (key, label) in FLAT:
                    missing = " (not exported)" if key == TASKS_BESIDE_REQUESTS else ""
                    problems.append(f"{pep}: {label}: no samples in a window{missing}")
                continue
            e, la = statistics.median(early), statistics.median(last)
            growth = (la - e) / e if e else 0.0
            per[key] = {
                "early_median": e,
                "last_median": la,
                "growth_pct": round(growth * 100, 2),
                "early_max": max(early),
                "last_max": max(last),
                "samples": [len(early), len(last)],
                "judged": (key, label) in FLAT,
            }
            slack = TASKS_SLACK if key == TASKS_BESIDE_REQUESTS else 0
            if (key, label) in FLAT and growth > 0.10 and la - e > slack:
                problems.append(f"{pep}: {label} grew {growth * 100:.1f}% ({e:g} -> {la:g})")
        figures[pep] = per
    summary = "; ".join(
        f"{pep}: RSS {figures[pep]['rss_kib']['growth_pct']:+.1f}%, "
        f"fds {figures[pep]['fds_without_pools']['growth_pct']:+.1f}% (pools aside; all: "
        f"{figures[pep]['fds']['growth_pct']:+.1f}%), tasks {figures[pep][TASKS_BESIDE_REQUESTS]['growth_pct']:+.1f}% "
        f"(requests in flight aside)"
        for pep in plan.PEPS
        if {"rss_kib", "fds_without_pools", "fds", TASKS_BESIDE_REQUESTS} <= figures[pep].keys()
    )
    return Check("memory_fds_tasks_flat", not problems, summary or "no samples", figures, problems)


def check_no_leaks(data: RunData) -> Check:
    """After the load, with every client connection closed: no client socket left, nothing in CLOSE_WAIT, tasks
    back to the baseline taken after the warm-up, descriptors other than pooled connections back to it too, both
    ends agree on every upstream connection, and (full run) the idle upstream connections all closed."""
    problems = []
    figures: dict[str, Any] = {}
    for pep in plan.PEPS:
        before, after = data.quiet_before[pep], data.quiet_after[pep]
        figures[pep] = {"before": before, "after": after}
        if after["client_sockets"]:
            problems.append(f"{pep}: {after['client_sockets']} client sockets still open after the load")
        if after["close_wait"]:
            problems.append(f"{pep}: {after['close_wait']} sockets in CLOSE_WAIT")
        if after["tasks"] is None or before["tasks"] is None:
            problems.append(f"{pep}: pep_event_loop_tasks not exported")
        elif after["tasks"] > before["tasks"]:
            problems.append(f"{pep}: {after['tasks']} tasks after the load, {before['tasks']} before")
        if after["fds_without_pools"] > before["fds_without_pools"]:
            problems.append(
                f"{pep}: {after['fds_without_pools']} descriptors (pooled connections aside) after, "
                f"{before['fds_without_pools']} before"
            )
        if after["upstream_sockets"] != after["upstream_peer_sockets"]:
            problems.append(
                f"{pep}: {after['upstream_sockets']} connections to the upstream, "
                f"the upstream holds {after['upstream_peer_sockets']}"
            )
    drain = data.pool_drain
    figures["pool_drain"] = drain
    if drain.get("waited_s"):
        for pep, left in drain["left"].items():
            if left:
                problems.append(f"{pep}: {left} upstream connections still open {drain['waited_s']} s after the load")
    summary = "; ".join(
        f"{pep}: tasks {figures[pep]['before']['tasks']} -> {figures[pep]['after']['tasks']}, fds (pools aside) "
        f"{figures[pep]['before']['fds_without_pools']} -> {figures[pep]['after']['fds_without_pools']}"
        for pep in plan.PEPS
    )
    return Check("no_leaked_connections_or_tasks", not problems, summary, figures, problems)


def check_upstream_failure_metrics(data: RunData, ix: Index) -> Check:
    """`pep_upstream_failures_total{route,kind}` counts exactly the failures the client saw."""
    seen: Counter[tuple[str, str]] = Counter()
    for r in data.results:
        kind = ix.kind[r["rid"]]
        if kind.pep != plan.FAULT:
            continue
        line = ix.line(kind.pep, r["rid"])
        if line is None or line["decision"] != "allow":
            continue
        if r["uerr"]:
            seen[(line["route"], r["uerr"])] += 1
        elif r["outcome"] == "truncated":
            seen[(line["route"], "reset")] += 1
    exported: Counter[tuple[str, str]] = Counter()
    for labels, value in metric_samples(data.metrics_final[plan.FAULT], "pep_upstream_failures_total"):
        if value:
            exported[(labels["route"], labels["kind"])] += int(value)
    problems = []
    for key in sorted(set(seen) | set(exported)):
        if seen[key] != exported[key]:
            problems.append(f"route={key[0]} kind={key[1]}: client saw {seen[key]}, the metric says {exported[key]}")
    figures = {
        "client_saw": {f"{r}/{k}": n for (r, k), n in sorted(seen.items())},
        "metric": {f"{r}/{k}": n for (r, k), n in sorted(exported.items())},
    }
    summary = "pep_upstream_failures_total matches the 502/504s and cut bodies the client saw"
    if problems:
        summary = "pep_upstream_failures_total differs from what the client saw"
    return Check("upstream_failures_counted", not problems, summary, figures, problems)


def check_sse_drops(data: RunData, ix: Index) -> Check:
    """A client that drops an allowed SSE stream makes the PEP let go of the upstream stream too."""
    problems = []
    delays = []
    cut = data.cut[plan.FAULT]
    count = 0
    for r in data.results:
        if r["kind"] != "up_sse_drop" or r["outcome"] != "client_drop":
            continue
        count += 1
        at = cut.get(r["rid"])
        if at is None:
            problems.append(f"{r['rid']}: the upstream stream ran on after the client dropped it")
        else:
            delays.append((at - r["done"]) * 1000)
    figures = {
        "dropped_streams": count,
        "upstream_streams_cut": count - len(problems),
        "ms_to_cut_upstream": {"p50": _round(_pct(delays, 0.5)), "max": _round(max(delays) if delays else None)},
    }
    if not count:
        problems.append("no SSE stream was dropped: nothing was tested")
    summary = f"{count} SSE streams dropped by the client, {figures['upstream_streams_cut']} cut at the upstream"
    return Check("sse_drops_reach_the_upstream", not problems, summary, figures, problems)


def check_metrics_match_log(data: RunData) -> Check:
    """`pep_decisions_total{decision,reason}` equals the decision log's lines, per PEP."""
    problems = []
    figures = {}
    for pep in plan.PEPS:
        logged: Counter[tuple[str, str]] = Counter((ln["decision"], ln["reason"]) for ln in data.logs[pep])
        exported: Counter[tuple[str, str]] = Counter()
        for labels, value in metric_samples(data.metrics_final[pep], "pep_decisions_total"):
            if value:
                exported[(labels["decision"], labels["reason"])] += int(value)
        for key in sorted(set(logged) | set(exported)):
            if logged[key] != exported[key]:
                problems.append(f"{pep} {key}: {logged[key]} log lines, metric {exported[key]}")
        figures[pep] = {"log_lines": len(data.logs[pep]), "metric_total": sum(exported.values())}
    summary = "; ".join(f"{p}: {f['log_lines']} log lines = {f['metric_total']} counted" for p, f in figures.items())
    return Check("metrics_match_decision_log", not problems, summary, figures, problems)


def check_clean_exit(data: RunData) -> Check:
    problems = []
    for pep, ex in data.exits.items():
        if ex["code"] != 0:
            problems.append(f"{pep}: exit code {ex['code']} after SIGTERM")
        if "Traceback" in data.stderr.get(pep, ""):
            problems.append(f"{pep}: a traceback on stderr")
        internal = sum(1 for ln in data.logs[pep] if ln["reason"] == "internal_error")
        if internal:
            problems.append(f"{pep}: {internal} internal_error decisions")
    summary = "; ".join(f"{p}: exit {e['code']} in {e['seconds']} s" for p, e in data.exits.items())
    return Check("clean_exit_no_internal_errors", not problems, summary, {"exits": data.exits}, problems)


def run_checks(data: RunData) -> list[Check]:
    ix = Index(data)
    opened, recovered = check_breaker(data)
    return [
        check_load_held(data, ix),
        check_all_answered(data, ix),
        check_upstream_allowed(data, ix),
        check_allow_only_on_allow(data, ix),
        check_denials(data, ix),
        check_answers(data, ix),
        opened,
        recovered,
        check_flat(data),
        check_no_leaks(data),
        check_upstream_failure_metrics(data, ix),
        check_sse_drops(data, ix),
        check_metrics_match_log(data),
        check_clean_exit(data),
    ]


def reason_histogram(lines: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(f"{ln['decision']}:{ln['reason']}" for ln in lines).most_common())
