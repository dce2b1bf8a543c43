"""Proof that the checks can fail: each mutation below injects one violation into a copy of the run's real data
(an upstream request without an allow, an allow while the PDP was down, a lost answer, a breaker that lets a
call through, a leak...) and the check meant to catch it must then fail. A check that passes whatever happens
proves nothing; this runs after every reliability run and is reported as a check of its own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reliability import checks, plan
from reliability.checks import Check, Index, RunData
from reliability.stack import Delivery

CHECKS: dict[str, Callable[[RunData], Check]] = {
    "load_held": lambda d: checks.check_load_held(d, Index(d)),
    "all_answered": lambda d: checks.check_all_answered(d, Index(d)),
    "no_upstream_request_without_allow": lambda d: checks.check_upstream_allowed(d, Index(d)),
    "allow_only_on_pdp_allow": lambda d: checks.check_allow_only_on_allow(d, Index(d)),
    "every_denial_has_a_reason": lambda d: checks.check_denials(d, Index(d)),
    "answers_as_expected": lambda d: checks.check_answers(d, Index(d)),
    "breaker_opens_within_threshold": lambda d: checks.check_breaker(d)[0],
    "breaker_recovers": lambda d: checks.check_breaker(d)[1],
    "memory_fds_tasks_flat": checks.check_flat,
    "no_leaked_connections_or_tasks": checks.check_no_leaks,
    "upstream_failures_counted": lambda d: checks.check_upstream_failure_metrics(d, Index(d)),
    "sse_drops_reach_the_upstream": lambda d: checks.check_sse_drops(d, Index(d)),
    "metrics_match_decision_log": checks.check_metrics_match_log,
    "clean_exit_no_internal_errors": checks.check_clean_exit,
}


class NothingToMutate(Exception):
    """The run's data has nothing this mutation could change (then the mutation itself is reported)."""


def _first(items: Any, pred: Callable[[Any], bool]) -> Any:
    for item in items:
        if pred(item):
            return item
    raise NothingToMutate


def _with_log(data: RunData, pep: str, lines: list[dict[str, Any]]) -> RunData:
    return dataclasses.replace(data, logs={**data.logs, pep: lines})


def _replace_line(data: RunData, pep: str, old: dict[str, Any], new: dict[str, Any] | None) -> RunData:
    lines = (
        [ln for ln in data.logs[pep] if ln is not old]
        if new is None
        else [new if ln is old else ln for ln in data.logs[pep]]
    )
    return _with_log(data, pep, lines)


def _replace_result(data: RunData, old: dict[str, Any], new: dict[str, Any] | None) -> RunData:
    if new is None:
        return dataclasses.replace(data, results=[r for r in data.results if r is not old])
    return dataclasses.replace(data, results=[new if r is old else r for r in data.results])


def _denied_result(data: RunData) -> dict[str, Any]:
    result: dict[str, Any] = _first(data.results, lambda r: r["status"] == 403 and r["i"] >= 0)
    return result


def _log_of(data: RunData, rid: str) -> tuple[str, dict[str, Any]]:
    for pep, lines in data.logs.items():
        for ln in lines:
            if ln["request_id"] == rid:
                return pep, ln
    raise NothingToMutate


def denied_request_delivered(data: RunData) -> RunData:
    line = _first(data.logs[plan.FAULT], lambda ln: ln["decision"] == "deny" and ln["route"] == "tools")
    d = Delivery(line["method"], line["path"], line["request_id"], line["decision_id"])
    return dataclasses.replace(data, deliveries={**data.deliveries, plan.FAULT: [*data.deliveries[plan.FAULT], d]})


def delivery_without_decision(data: RunData) -> RunData:
    d = Delivery("GET", "/tools/item/1", "rel-x", None)
    return dataclasses.replace(data, deliveries={**data.deliveries, plan.CERBOS: [*data.deliveries[plan.CERBOS], d]})


def post_delivered_twice(data: RunData) -> RunData:
    post = _first(data.deliveries[plan.FAULT], lambda d: d.method == "POST")
    return dataclasses.replace(data, deliveries={**data.deliveries, plan.FAULT: [*data.deliveries[plan.FAULT], post]})


def allow_while_pdp_down(data: RunData) -> RunData:
    end = max(r["done"] for r in data.results) + 60
    down = [(a, b) for a, b, m in checks._periods(data.fault_timeline, end) if m not in plan.ALLOW_MODES]

    def inside(ln: dict[str, Any]) -> bool:
        t = checks.log_time(ln["time"])
        return ln["reason"] == "circuit_open" and any(a + 0.1 < t < b - 0.1 for a, b in down)

    line = _first(data.logs[plan.FAULT], inside)
    return _replace_line(data, plan.FAULT, line, {**line, "decision": "allow", "reason": "allowed"})


def shell_allowed(data: RunData) -> RunData:
    rid = _first(data.results, lambda r: r["kind"] == "cerbos_shell")["rid"]
    pep, line = _log_of(data, rid)
    return _replace_line(data, pep, line, {**line, "decision": "allow", "reason": "allowed"})


def denial_without_reason(data: RunData) -> RunData:
    r = _denied_result(data)
    return _replace_result(data, r, {**r, "reason": None})


def reason_outside_closed_set(data: RunData) -> RunData:
    r = _denied_result(data)
    return _replace_result(data, r, {**r, "reason": "pdp_down"})


def log_disagrees_with_answer(data: RunData) -> RunData:
    r = _denied_result(data)
    pep, line = _log_of(data, r["rid"])
    return _replace_line(
        data, pep, line, {**line, "reason": "policy_denied" if r["reason"] != "policy_denied" else "no_route"}
    )


def log_line_missing(data: RunData) -> RunData:
    r = _denied_result(data)
    pep, line = _log_of(data, r["rid"])
    return _replace_line(data, pep, line, None)


def answer_lost(data: RunData) -> RunData:
    return _replace_result(data, _first(data.results, lambda r: r["i"] >= 0), None)


def answer_timed_out(data: RunData) -> RunData:
    r = _first(data.results, lambda r: r["i"] >= 0)
    return _replace_result(data, r, {**r, "outcome": "timeout", "detail": "injected"})


def connection_error(data: RunData) -> RunData:
    r = _first(data.results, lambda r: r["i"] >= 0 and r["kind"] == "fault_get")
    return _replace_result(data, r, {**r, "outcome": "conn_error", "detail": "injected"})


def hang_answered_502(data: RunData) -> RunData:
    r = _first(data.results, lambda r: r["kind"] == "up_hang" and r["status"] == 504)
    return _replace_result(data, r, {**r, "status": 502, "uerr": "reset"})


def breaker_admits_while_open(data: RunData) -> RunData:
    ep = _first(
        (e for e in checks.episodes(data) if e.pep == plan.FAULT),
        lambda e: e.healthy_at - e.fail_at > 1.0,
    )
    decs = checks.decisions_of(data.logs[plan.FAULT])
    analysed = checks.analyse_episode(ep, decs, float("inf"))
    if not analysed["opened"]:
        raise NothingToMutate
    at = ep.fail_at + analysed["opened_after_s"] + 0.1
    template = _first(data.logs[plan.FAULT], lambda ln: ln["reason"] in checks.BREAKER_FAILURES)
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    extra = {**template, "time": stamp, "pdp_ms": 1.0, "attempts": 1, "request_id": template["request_id"]}
    return _with_log(data, plan.FAULT, [*data.logs[plan.FAULT], extra])


def breaker_opens_early(data: RunData) -> RunData:
    """The breaker opening at the first failure: a circuit_open denial right after the fault began (in an outage
    the circuit entered closed: on a busy machine an earlier one may still have been going)."""
    denied_open = [checks.log_time(ln["time"]) for ln in data.logs[plan.CERBOS] if ln["reason"] == "circuit_open"]

    def entered_closed(e: checks.Episode) -> bool:
        return not any(e.fail_at - 2 * plan.OPEN_MS / 1000 <= t <= e.fail_at for t in denied_open)

    ep = _first((e for e in checks.episodes(data) if e.pep == plan.CERBOS), entered_closed)
    template = _first(data.logs[plan.CERBOS], lambda ln: ln["reason"] == "circuit_open")
    stamp = datetime.fromtimestamp(ep.fail_at + 0.002, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    early = {**template, "time": stamp, "pdp_ms": None, "attempts": 0}
    return _with_log(data, plan.CERBOS, [*data.logs[plan.CERBOS], early])


def breaker_open_while_healthy(data: RunData) -> RunData:
    """A circuit_open denial in the warm-up, long before any outage."""
    line = _first(data.logs[plan.FAULT], lambda ln: ln["request_id"].startswith("warm-") and ln["reason"] == "allowed")
    denied = {**line, "decision": "deny", "reason": "circuit_open", "pdp_ms": None, "attempts": 0}
    return _replace_line(data, plan.FAULT, line, denied)


def breaker_recovers_late(data: RunData) -> RunData:
    ep = _first(checks.episodes(data), lambda e: True)
    bound = plan.OPEN_MS / 1000 + plan.PDP_TIMEOUT_MS / 1000 + checks.RECOVERY_SLACK_S

    def keep(ln: dict[str, Any]) -> bool:
        t = checks.log_time(ln["time"])
        late = ep.healthy_at - 1 <= t <= ep.healthy_at + bound + 0.2
        return not (late and ln["reason"] in checks.BREAKER_SUCCESSES and (ln.get("attempts") or 0) > 0)

    return _with_log(data, ep.pep, [ln for ln in data.logs[ep.pep] if keep(ln)])


def _scale_last_window(data: RunData, pep: str, key: str, factor: float) -> RunData:
    a, b = data.t0 + data.profile.last[0], data.t0 + data.profile.last[1]
    samples = [
        {**s, key: s[key] * factor} if s["pep"] == pep and a <= s["t"] <= b and s.get(key) is not None else s
        for s in data.samples
    ]
    return dataclasses.replace(data, samples=samples)


def memory_grows(data: RunData) -> RunData:
    return _scale_last_window(data, plan.CERBOS, "rss_kib", 1.15)


def fds_leak(data: RunData) -> RunData:
    return _scale_last_window(data, plan.FAULT, "non_socket_fds", 1.5)


def sockets_leak(data: RunData) -> RunData:
    return _scale_last_window(data, plan.CERBOS, "fds_without_pools", 1.12)


def tasks_grow(data: RunData) -> RunData:
    """A leak of a few tasks a second: the last window holds 20% more tasks and at least checks.TASKS_SLACK more."""
    a, b = data.t0 + data.profile.last[0], data.t0 + data.profile.last[1]
    samples = [
        {**s, "tasks": max(s["tasks"] * 1.2, s["tasks"] + checks.TASKS_SLACK + 1)}
        if s["pep"] == plan.FAULT and a <= s["t"] <= b and s.get("tasks") is not None
        else s
        for s in data.samples
    ]
    return dataclasses.replace(data, samples=samples)


def task_left_after_load(data: RunData) -> RunData:
    after = data.quiet_after[plan.FAULT]
    if after["tasks"] is None:
        raise NothingToMutate
    return dataclasses.replace(
        data, quiet_after={**data.quiet_after, plan.FAULT: {**after, "tasks": after["tasks"] + 1}}
    )


def client_socket_left(data: RunData) -> RunData:
    after = data.quiet_after[plan.CERBOS]
    return dataclasses.replace(data, quiet_after={**data.quiet_after, plan.CERBOS: {**after, "client_sockets": 1}})


def upstream_failure_miscounted(data: RunData) -> RunData:
    text = data.metrics_final[plan.FAULT]
    pattern = re.compile(r'^(pep_upstream_failures_total\{[^}]*kind="timeout"[^}]*\}) (\S+)$', re.M)
    if not pattern.search(text):
        raise NothingToMutate
    bumped = pattern.sub(lambda m: f"{m.group(1)} {float(m.group(2)) + 1}", text, count=1)
    return dataclasses.replace(data, metrics_final={**data.metrics_final, plan.FAULT: bumped})


def sse_stream_not_cut(data: RunData) -> RunData:
    rid = _first(data.results, lambda r: r["outcome"] == "client_drop")["rid"]
    cut = {k: v for k, v in data.cut[plan.FAULT].items() if k != rid}
    return dataclasses.replace(data, cut={**data.cut, plan.FAULT: cut})


def decision_not_counted(data: RunData) -> RunData:
    return _with_log(data, plan.CERBOS, data.logs[plan.CERBOS][1:])


def unclean_exit(data: RunData) -> RunData:
    return dataclasses.replace(data, exits={**data.exits, plan.CERBOS: {"code": 1, "seconds": 0.1}})


def requests_not_sent(data: RunData) -> RunData:
    return dataclasses.replace(data, load={**data.load, "sent": data.load["sent"] - 1})


@dataclass(frozen=True, slots=True)
class Mutation:
    what: str
    check: str
    apply: Callable[[RunData], RunData]


MUTATIONS = (
    Mutation("the upstream received a denied request", "no_upstream_request_without_allow", denied_request_delivered),
    Mutation(
        "the upstream received a request with no decision id",
        "no_upstream_request_without_allow",
        delivery_without_decision,
    ),
    Mutation("the upstream received a POST twice", "no_upstream_request_without_allow", post_delivered_twice),
    Mutation("an allow while the fault PDP was failing", "allow_only_on_pdp_allow", allow_while_pdp_down),
    Mutation("Cerbos's PEP allowed shell", "allow_only_on_pdp_allow", shell_allowed),
    Mutation("a denial without x-pep-reason", "every_denial_has_a_reason", denial_without_reason),
    Mutation("a reason outside the closed set", "every_denial_has_a_reason", reason_outside_closed_set),
    Mutation("the log's reason differs from the answer's", "every_denial_has_a_reason", log_disagrees_with_answer),
    Mutation("a denial with no log line", "every_denial_has_a_reason", log_line_missing),
    Mutation("a request without any result", "all_answered", answer_lost),
    Mutation("a request never answered", "all_answered", answer_timed_out),
    Mutation("an unexplained connection error", "all_answered", connection_error),
    Mutation("a hung upstream answered 502 reset", "answers_as_expected", hang_answered_502),
    Mutation(
        "a PDP call admitted 0.1 s after the breaker opened",
        "breaker_opens_within_threshold",
        breaker_admits_while_open,
    ),
    Mutation("circuit_open before any failure", "breaker_opens_within_threshold", breaker_opens_early),
    Mutation("circuit_open while the PDP was healthy", "breaker_opens_within_threshold", breaker_open_while_healthy),
    Mutation("no PDP answer within the recovery bound", "breaker_recovers", breaker_recovers_late),
    Mutation("VmRSS 15% higher in the last window", "memory_fds_tasks_flat", memory_grows),
    Mutation("50% more non-socket fds in the last window", "memory_fds_tasks_flat", fds_leak),
    Mutation("12% more fds (pools aside) in the last window", "memory_fds_tasks_flat", sockets_leak),
    Mutation("20% (and over 4) more tasks in the last window", "memory_fds_tasks_flat", tasks_grow),
    Mutation("one task more after the load", "no_leaked_connections_or_tasks", task_left_after_load),
    Mutation("a client socket left after the load", "no_leaked_connections_or_tasks", client_socket_left),
    Mutation("an upstream timeout counted twice", "upstream_failures_counted", upstream_failure_miscounted),
    Mutation("a dropped SSE stream ran on upstream", "sse_drops_reach_the_upstream", sse_stream_not_cut),
    Mutation("a decision counted but not logged", "metrics_match_decision_log", decision_not_counted),
    Mutation("a PEP exited 1", "clean_exit_no_internal_errors", unclean_exit),
    Mutation("a request never sent", "load_held", requests_not_sent),
)


def check_sensitivity(data: RunData, failing: set[str]) -> Check:
    """`failing`: the checks that already failed on the real data (a mutation cannot show anything for them)."""
    problems = []
    not_shown = []
    caught = 0
    for m in MUTATIONS:
        if m.check in failing:
            not_shown.append(f"{m.what} ({m.check} already fails on the run's own data)")
            continue
        try:
            mutated = m.apply(data)
        except NothingToMutate:
            problems.append(f"could not inject: {m.what} (the run has nothing to change for it)")
            continue
        verdict = CHECKS[m.check](mutated)
        if verdict.passed:
            problems.append(f"{m.check} still passed with: {m.what}")
        else:
            caught += 1
    summary = f"{caught}/{len(MUTATIONS) - len(not_shown)} injected violations caught by their checks"
    if not_shown:
        summary += f" ({len(not_shown)} not tried: their check already fails)"
    figures = {"mutations": len(MUTATIONS), "caught": caught, "not_tried": not_shown}
    return Check("checks_catch_injected_violations", not problems, summary, figures, problems)
