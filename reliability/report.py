"""The figures of a run as Markdown (reliability/results/<mode>.md): what docs/reliability.md quotes."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any


def _check(result: dict[str, Any], name: str) -> dict[str, Any]:
    for c in result["checks"]:
        if c["name"] == name:
            figures: dict[str, Any] = c["figures"]
            return figures
    raise KeyError(name)


def _n(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.3f}".rstrip("0").rstrip(".")


def _runner_lag(result: dict[str, Any]) -> list[str]:
    lag = result.get("runner_loop_lag_ms")
    if not lag or not lag["ticks"]:
        return []
    return [
        f"- The run's own event loop (the upstreams and the fault PDP live in it) ran late by at most "
        f"{_n(lag['max'])} ms (p99 {_n(lag['p99'])} ms; {lag['over_100_ms']} times over 100 ms), measured every "
        "10 ms: a busy machine shows here."
    ]


def _outages(result: dict[str, Any]) -> list[str]:
    episodes = _check(result, "breaker_opens_within_threshold")["episodes"]
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in episodes:
        by[f"{e['fault']}"].append(e)
    rows = [
        "| outage | times | PDP failures before it opened (max; of which in flight) | opened after (max s) "
        "| PDP calls admitted while open | failed probes | recovered after healthy (max s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, eps in by.items():
        opened = [e for e in eps if e["opened"]]
        worst = max(opened, key=lambda e: e["failures_before_open"], default=None)
        before = f"{worst['failures_before_open']} ({worst['of_which_in_flight_when_it_opened']})" if worst else "-"
        rows.append(
            f"| {label} | {len(eps)} | {before} | {_n(max((e['opened_after_s'] for e in opened), default=None))} "
            f"| {sum(e.get('failures_after_open_not_probes', 0) for e in eps)} "
            f"| {sum(e.get('failed_probes', 0) for e in eps)} "
            f"| {_n(max((e['recovered_after_s'] or 0 for e in eps), default=None))} |"
        )
    return rows


def _decisions_by_fault(result: dict[str, Any]) -> list[str]:
    by: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: Counter[str] = Counter()
    for row in result["chaos"]:
        by[row["what"]].update(row["decisions"])
        seconds[row["what"]] += row["for_s"]
    lines = ["| PDP state (until the next change) | seconds | decisions made meanwhile |", "|---|---:|---|"]
    for what, counts in sorted(by.items()):
        shown = ", ".join(f"{k} {v:,}" for k, v in counts.most_common())
        lines.append(f"| {what} | {seconds[what]:.1f} | {shown} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    load = _check(result, "load_held")
    answered = _check(result, "all_answered")
    upstream = _check(result, "no_upstream_request_without_allow")
    denials = _check(result, "every_denial_has_a_reason")
    answers = _check(result, "answers_as_expected")
    opening = _check(result, "breaker_opens_within_threshold")
    recovery = _check(result, "breaker_recovers")
    flat = _check(result, "memory_fds_tasks_flat")
    leaks = _check(result, "no_leaked_connections_or_tasks")
    failures = _check(result, "upstream_failures_counted")
    sse = _check(result, "sse_drops_reach_the_upstream")
    inputs = result["inputs"]
    verdict = "passed" if result["passed"] else "FAILED"
    out = [
        f"Run `{result['profile']}` of {result['started']} ({result['wall_s']} s in all, seed {result['seed']}): "
        f"**{verdict}** ({sum(c['passed'] for c in result['checks'])}/{len(result['checks'])} checks).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']} ({m['os']}), Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"failclosed-pep {m['failclosed_pep']}, Cerbos {s['cerbos']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.",
        "",
        "### Checks",
        "",
        "| check | verdict | figures |",
        "|---|---|---|",
        *(f"| `{c['name']}` | {'ok' if c['passed'] else '**FAILED**'} | {c['summary']} |" for c in result["checks"]),
        "",
        "### Load held",
        "",
        f"- {_n(load['intended'])} requests intended at {_n(load['target_rate_per_s'])}/s for "
        f"{_n(load['duration_s'])} s, open loop; {_n(load['sent'])} sent, at {_n(load['achieved_rate_per_s'])}/s. "
        f"Send lag behind the schedule: p50 {_n(load['send_lag_ms']['p50'])} ms, p99 "
        f"{_n(load['send_lag_ms']['p99'])} ms, max {_n(load['send_lag_ms']['max'])} ms.",
        *_runner_lag(result),
        f"- Two PEPs, {s['client_connections_per_pep']} keep-alive client connections each; PDP deadline "
        f"{s['pdp_timeout_ms']} ms with {s['retries']} retry; breaker {s['breaker'][0]} failures / "
        f"{s['breaker'][1]} ms open / {s['breaker'][2]} probe; the `faults` routes' timeout "
        f"{s['fault_route_timeout_ms']} ms.",
        "",
        "Latency from each request's due time to its last byte (ms):",
        "",
        "| requests | count | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {_n(v['count'])} | {_n(v['p50'])} | {_n(v['p99'])} | {_n(v['max'])} |"
            for name, v in load["latency_ms_by_class"].items()
        ),
        "",
        "### Inputs counted, nothing lost",
        "",
        f"- Requests: {_n(inputs['requests'])} ({_n(answered['warm_up_requests'])} of them the warm-up): "
        + ", ".join(f"{pep} PEP {_n(n)}" for pep, n in inputs["per_pep"].items())
        + ". Decision log lines: "
        + ", ".join(f"{pep} {_n(n)}" for pep, n in inputs["decision_log_lines"].items())
        + " (one per request, and equal to `pep_decisions_total`).",
        f"- Answers: {_n(answered['outcomes'].get('complete', 0))} complete; "
        + "; ".join(f"{n:,} {why}" for why, n in answered["explained_connection_ends"].items())
        + f"; **{answered['unexplained']} unexplained, {answered['unanswered']} unanswered**.",
        "- Upstream requests: "
        + ", ".join(
            f"{pep} {_n(f['upstream_requests'])} ({_n(f['post_requests'])} POST), all matched to an allow"
            for pep, f in upstream.items()
        )
        + "; each request id and decision id delivered at most once (no retries).",
        f"- Denials: {_n(denials['denials'])}, each with `x-pep-reason` from the closed set and its log line: "
        + "; ".join(
            f"{pep}: " + ", ".join(f"{r} {_n(n)}" for r, n in by.items()) for pep, by in denials["by_reason"].items()
        )
        + ".",
        f"- Faults injected: Cerbos {len(inputs['cerbos_actions'])} actions ("
        + ", ".join(f"{a} {n}" for a, n in Counter(inputs["cerbos_actions"]).most_common())
        + f"); fault PDP {len(inputs['fault_pdp_modes'])} mode switches ("
        + ", ".join(f"{a} {n}" for a, n in Counter(inputs["fault_pdp_modes"]).most_common())
        + f"); {_n(inputs['fault_pdp_requests'])} requests reached the fault PDP.",
        "",
        "### PDP outages and the breaker",
        "",
        f"{opening['opened']} of {opening['outages']} outages opened the breaker, each at exactly "
        f"{opening['failure_threshold']} consecutive failures; {opening['failures_admitted_after_open']} PDP calls "
        f"were admitted while it was open apart from the probes ({opening['failed_probes']} failed probes, one per "
        f"{opening['open_ms']} ms); {_n(opening['circuit_open_denials'])} `circuit_open` denials during the outages, "
        f"{opening['circuit_open_outside_outages']} outside them. All "
        f"{recovery['recovered']} recovered, at most {_n(recovery['max_recovery_s'])} s after the PDP was healthy "
        f"(median {_n(recovery['median_recovery_s'])} s; bound {_n(recovery['bound_s'])} s).",
        "",
        *_outages(result),
        "",
        *_decisions_by_fault(result),
        "",
        "### Upstream faults (allowed requests)",
        "",
        "| kind | allowed | answers | denied |",
        "|---|---:|---|---:|",
        *(
            f"| `{k}` | {_n(v['allowed'])} | "
            + ", ".join(f"{a} {_n(n)}" for a, n in v.items() if a not in ("allowed", "denied"))
            + f" | {_n(v.get('denied', 0))} |"
            for k, v in answers["upstream_faults_allowed"].items()
        ),
        "",
        "`pep_upstream_failures_total`: "
        + ", ".join(f"{k} {_n(v)}" for k, v in failures["metric"].items())
        + "; seen by the client: "
        + ", ".join(f"{k} {_n(v)}" for k, v in failures["client_saw"].items())
        + f". SSE streams dropped by the client: {_n(sse['dropped_streams'])}, "
        f"{_n(sse['upstream_streams_cut'])} cut at the upstream (p50 {_n(sse['ms_to_cut_upstream']['p50'])} ms, "
        f"max {_n(sse['ms_to_cut_upstream']['max'])} ms after the drop).",
        "",
        "### Memory, descriptors, tasks",
        "",
        f"Medians of the samples (every 0.5 s) in the early window {flat['early_window_s']} s and the last window "
        f"{flat['last_window_s']} s after the load's start:",
        "",
        "| PEP | VmRSS KiB | fds, pools aside | fds other than sockets | event loop tasks (requests in flight aside) "
        "| all fds (shown) | "
        "PDP / upstream pool (shown) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pep in ("cerbos", "fault"):
        f = flat[pep]

        def cell(key: str, f: dict[str, Any] = f) -> str:
            v = f[key]
            return f"{_n(v['early_median'])} → {_n(v['last_median'])} ({v['growth_pct']:+.1f}%)"

        out.append(
            f"| {pep} | {cell('rss_kib')} | {cell('fds_without_pools')} | {cell('non_socket_fds')} | "
            f"{cell('tasks_beside_requests')} | {cell('fds')} | {_n(f['pdp_pool']['last_median'])} / "
            f"{_n(f['upstream_pool']['last_median'])} |"
        )
    out += ["", "After the load, every client connection closed (before → after):", ""]
    out += ["| PEP | tasks | fds, pools aside | CLOSE_WAIT | upstream connections (PEP side = upstream side) |"]
    out += ["|---|---:|---:|---:|---:|"]
    for pep in ("cerbos", "fault"):
        b, a = leaks[pep]["before"], leaks[pep]["after"]
        out.append(
            f"| {pep} | {b['tasks']} → {a['tasks']} | {b['fds_without_pools']} → {a['fds_without_pools']} | "
            f"{a['close_wait']} | {a['upstream_sockets']} = {a['upstream_peer_sockets']} |"
        )
    drain = leaks["pool_drain"]
    if drain.get("waited_s"):
        out += [
            "",
            f"The PEPs' idle upstream connections were all closed {drain['waited_s']} s after the load "
            f"(left: {drain['left']}); connections to the PDP then: {drain.get('pdp_pool_then', '-')}.",
        ]
    problems = [(c["name"], p) for c in result["checks"] for p in c["problems"]]
    if problems:
        out += ["", "### Problems", "", *(f"- `{name}`: {p}" for name, p in problems)]
    return "\n".join(out) + "\n"
