"""Medians, ratios against Envoy, the goals of issue 15, and the Markdown table."""

from __future__ import annotations

import statistics
from typing import Any

from bench.openloop import percentile

# Per-run numbers whose median over the repetitions is reported.
MEDIAN_KEYS = (
    "closed_rps",
    "closed_p50_us",
    "closed_p99_us",
    "c1_p50_us",
    "c1_p99_us",
    "open_p50_us",
    "open_p99_us",
    "open_p999_us",
    "open_achieved_rate",
    "open_send_lag_p99_us",
    "cpu_us_per_request",
    "kernel_cpu_us_per_request",
    "load_core_wakeups_per_request",
    "requests_per_cpu_s",
    "peak_rss_kib",
    "foreign_cpu_cores",
    "load_side_cpu_us_per_request",
    "stub_connections_per_1k",
)
# pep/Envoy ratios: for throughput higher is better, for everything else lower is better.
RATIO_KEYS = (
    "closed_rps",
    "requests_per_cpu_s",
    "closed_p99_us",
    "c1_p50_us",
    "open_p50_us",
    "open_p99_us",
    "open_p999_us",
    "cpu_us_per_request",
    "peak_rss_kib",
)
THROUGHPUT_GOAL = 1.0
THROUGHPUT_AIM = 1.5
RSS_FLAT_MIB = 4.0  # issue 15: RSS "flat (within a few MiB)" while a large body streams through


def summarize(case: dict[str, Any]) -> None:
    """Adds `median` (and pooled open-loop percentiles) to a case with runs; drops the raw latencies."""
    for discarded in case.get("discarded_noisy_runs", []):
        discarded.pop("_open_latencies_us", None)
    runs = case.get("runs", [])
    if not runs:
        return
    median: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        median[key] = statistics.median(values) if values else None
    busy = [r["core_busy"] for r in runs]
    median["core_busy"] = [round(statistics.median(c), 3) for c in zip(*busy, strict=True)]
    pooled = sorted(v for r in runs for v in r.pop("_open_latencies_us", []))
    median["open_pooled"] = {
        "n": len(pooled),
        "p50_us": percentile(pooled, 50),
        "p99_us": percentile(pooled, 99),
        "p999_us": percentile(pooled, 99.9),
    }
    case["median"] = median


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def added_latency(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """p50 at 1 connection minus the direct p50, per proxy target, and each one's ratio to Envoy's."""
    direct = cases.get("direct", {}).get("median", {}).get("c1_p50_us")
    envoy = cases.get("envoy", {}).get("median", {}).get("c1_p50_us")
    out: dict[str, Any] = {}
    envoy_added = envoy - direct if envoy is not None and direct is not None else None
    for key, case in cases.items():
        value = case.get("median", {}).get("c1_p50_us")
        if key == "direct" or value is None or direct is None:
            continue
        added = value - direct
        out[key] = {
            "added_p50_us": added,
            "vs_envoy": _ratio(added, envoy_added) if key != "envoy" and envoy_added and envoy_added > 0 else None,
        }
    return out


def ratios(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """pep-variant / Envoy for each ratio key (medians)."""
    envoy = cases.get("envoy", {}).get("median")
    if not envoy:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for key, case in cases.items():
        median = case.get("median")
        if key in ("direct", "envoy") or not median:
            continue
        out[key] = {k: _ratio(median.get(k), envoy.get(k)) for k in RATIO_KEYS}
    return out


def _at_most(workload: str, target: str, goal: str, value: float | None, detail: str) -> dict[str, Any]:
    """A goal met when the PEP's figure is at most Envoy's (a ratio of 1.0x or less)."""
    return {
        "goal": goal,
        "workload": workload,
        "target": target,
        "value": value,
        "met": value is not None and value <= 1.0,
        "detail": detail,
    }


def goals(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The goals of issue 15 (issue 7's, raised to Envoy's own figures) for every PEP variant that has an Envoy to
    compare with: throughput per core at least Envoy's (aim 1.5x); CPU per request, added p50 at one connection,
    p99 at 16 and the open loop's p99 and p99.9 at most Envoy's. Reported, not asserted."""
    out: list[dict[str, Any]] = []
    for workload, cases in results.items():
        envoy = cases.get("envoy", {}).get("median")
        if not envoy:
            continue
        added = added_latency(cases)
        for key, case in cases.items():
            median = case.get("median")
            if not key.startswith("pep") or not median or key in ("pep_workers2", "pep_audit"):
                continue

            rps = _ratio(median["closed_rps"], envoy["closed_rps"])
            per_cpu = _ratio(median["requests_per_cpu_s"], envoy["requests_per_cpu_s"])
            out.append(
                {
                    "goal": f"throughput per core at 16 connections >= {THROUGHPUT_GOAL:g}x Envoy's "
                    f"(aim {THROUGHPUT_AIM:g}x)",
                    "workload": workload,
                    "target": key,
                    "value": rps,
                    "met": rps is not None and rps >= THROUGHPUT_GOAL,
                    "aim_met": rps is not None and rps >= THROUGHPUT_AIM,
                    "per_cpu_second": per_cpu,
                    "detail": f"{median['closed_rps']:.0f} vs {envoy['closed_rps']:.0f} req/s on one core; "
                    f"per CPU-second of the proxy: {_x(per_cpu)}",
                }
            )
            pep_added = added.get(key, {}).get("added_p50_us")
            envoy_added = added.get("envoy", {}).get("added_p50_us")
            cpu, envoy_cpu = median.get("cpu_us_per_request"), envoy.get("cpu_us_per_request")
            checks: list[tuple[str, float | None, str]] = [
                ("CPU per request <= Envoy's", _ratio(cpu, envoy_cpu), f"{_num(cpu)} vs {_num(envoy_cpu)} CPU µs"),
                (
                    "added p50 latency at 1 connection <= Envoy's",
                    added.get(key, {}).get("vs_envoy"),
                    f"{_ms(pep_added)} vs {_ms(envoy_added)} ms added over direct",
                ),
                (
                    "p99 at 16 connections <= Envoy's",
                    _ratio(median["closed_p99_us"], envoy["closed_p99_us"]),
                    f"{_ms(median['closed_p99_us'])} vs {_ms(envoy['closed_p99_us'])} ms",
                ),
            ]
            for pct, field in (("p99", "open_p99_us"), ("p99.9", "open_p999_us")):
                checks.append(
                    (
                        f"open loop at 1000 req/s, {pct} <= Envoy's",
                        _ratio(median.get(field), envoy.get(field)),
                        f"{_ms(median.get(field))} vs {_ms(envoy.get(field))} ms",
                    )
                )
            out.extend(_at_most(workload, key, goal, value, detail) for goal, value, detail in checks)
    return out


def stream_goals(streamed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 15's streaming goal for `pep`, per direction: its throughput against direct (and Envoy's), reported
    without a bar (`met` None), and its RSS growth during the transfer within RSS_FLAT_MIB (met or not)."""
    out: list[dict[str, Any]] = []
    if not streamed:
        return out
    size_mib = streamed["size_bytes"] / (1 << 20)
    for direction in ("download", "upload"):
        cases = streamed.get(direction) or {}
        median = (cases.get("pep") or {}).get("median")
        if not median:
            continue
        ratio = streamed["ratios"][direction].get("pep", {})
        direct = (cases.get("direct") or {}).get("median") or {}
        envoy = cases.get("envoy") or {}
        if envoy.get("median"):
            versus = f"; {_x(ratio.get('vs_envoy'))} Envoy's {_num(envoy['median']['mib_s'])} MiB/s"
        else:
            versus = f"; Envoy: {envoy.get('status', 'not run')}"
        workload = f"stream_{direction}"
        out.append(
            {
                "goal": f"streaming throughput against direct, {size_mib:g} MiB {direction}",
                "workload": workload,
                "target": "pep",
                "value": ratio.get("vs_direct"),
                "met": None,
                "detail": f"{_num(median['mib_s'])} vs {_num(direct.get('mib_s'))} MiB/s direct{versus}",
            }
        )
        growth = median["rss_growth_kib_max"]
        growth_mib = growth / 1024 if growth is not None else None
        out.append(
            {
                "goal": f"RSS flat during a {size_mib:g} MiB {direction} (growth <= {RSS_FLAT_MIB:g} MiB)",
                "workload": workload,
                "target": "pep",
                "value": growth_mib,
                "met": growth_mib is not None and growth_mib <= RSS_FLAT_MIB,
                "detail": f"VmRSS {_num(_mib(median['rss_baseline_kib']), 1)} MiB before the transfer; the largest "
                f"sample during it minus that, worst of {len(cases['pep']['runs'])} run(s)",
            }
        )
    return out


def audit(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What `decision_log: {sink: file, required: true}` costs: `pep_audit` against `pep` (no log), medians."""
    base = cases.get("pep", {}).get("median")
    logged = cases.get("pep_audit", {}).get("median")
    runs = cases.get("pep_audit", {}).get("runs", [])
    per_write = [r["decision_log"]["lines_per_write"] for r in runs if r.get("decision_log")]
    if not base or not logged or not per_write:
        return {"status": "not measured"}

    def delta(key: str) -> float | None:
        a, b = logged.get(key), base.get(key)
        return a - b if a is not None and b is not None else None

    return {
        "status": "ok",
        "rps_ratio": _ratio(logged["closed_rps"], base["closed_rps"]),
        "c1_p50_added_us": delta("c1_p50_us"),
        "closed_p99_added_us": delta("closed_p99_us"),
        "open_p99_added_us": delta("open_p99_us"),
        "cpu_us_per_request_added": delta("cpu_us_per_request"),
        "lines_per_write": statistics.median(per_write),
    }


def _ms(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us / 1000:.3f}" if abs(us) < 10000 else f"{us / 1000:.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _stream_lines(streamed: dict[str, Any] | None) -> list[str]:
    """The Streaming table: one row per (direction, target), medians; RSS growth is the worst run's."""
    if not streamed:
        return []
    lines = [
        "",
        f"## Streaming ({streamed['size_bytes'] / (1 << 20):g} MiB, {streamed['repetitions']} repetition(s), "
        "curl on the load core, a plain http route)",
        "",
        "MiB/s is bytes over curl's time from connect to last byte. RSS is the proxy's VmRSS sampled every "
        f"{streamed['sample_interval_ms']:g} ms: before the transfer, the largest sample during it, and the growth "
        "(largest minus before; the worst run).",
        "",
        "| direction | target | MiB/s | vs direct | vs Envoy | seconds | proxy CPU s | RSS before MiB "
        "| RSS max MiB | RSS growth MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for direction in ("download", "upload"):
        ratios = streamed["ratios"].get(direction, {})
        for key, case in (streamed.get(direction) or {}).items():
            med = case.get("median")
            if not med:
                what, _, why = case["status"].partition(": ")
                lines.append(f"| {direction} | {key} | **{what.upper()}**: {why} | | | | | | | |")
                continue
            r = ratios.get(key, {})
            lines.append(
                f"| {direction} | {key} | {_num(med['mib_s'])} | {'-' if key == 'direct' else _x(r.get('vs_direct'))} "
                f"| {_x(r.get('vs_envoy')) if key not in ('direct', 'envoy') else '-'} "
                f"| {_num(med['seconds'], 3)} | {_num(med['proxy_cpu_s'], 2)} "
                f"| {_num(_mib(med['rss_baseline_kib']), 1)} | {_num(_mib(med['rss_max_kib']), 1)} "
                f"| {_num(_mib(med['rss_growth_kib_max']), 1)} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"# failclosed-pep benchmark ({report['mode']})",
        "",
        f"- Machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']} "
        f"({m.get('python_executable', 'n/a')})",
        f"- Versions: nginx {m['nginx']}, Envoy {m['envoy']}, wrk {m['wrk']}, curl {m.get('curl', 'n/a')}, "
        f"aiohttp {m['aiohttp']}, "
        f"failclosed-pep {m['pep']} (commit {m['commit']})",
        f"- {s['repetitions']} repetition(s), targets interleaved; medians. Closed loop: wrk -t1 -c{s['connections']} "
        f"{s['closed_s']} s (`--latency`); 1 connection: wrk -t1 -c1 {s['single_s']} s; open loop: "
        f"{s['open_rate']:g} req/s for {s['open_s']:g} s, latency from the intended send time (bench/openloop.py).",
        f"- Proxy on core {s['proxy_cores']} (workers: 2 on cores 0,1); nginx stubs and load generators on core "
        f"{s['load_cores']}; loopback only. CPU/req and peak RSS are the proxy process's (direct: n/a); "
        "`other work`: CPU used by anything but the benchmark during the closed-loop run (should be ~0). "
        "`kernel µs/req`: the system's part of CPU/req (stime): system calls, and on loopback the receiving side "
        "of every send (the peer's TCP input and its wake-up run in the sender's call). `wake-ups/req`: "
        "interrupts the load core took per request to wake a sleeping peer (/proc/interrupts CAL + RES; each is "
        "kernel time in the proxy's send).",
        f"- Started {report['started']}, took {report['elapsed_s']:.0f} s.",
        "",
        "| workload | target | req/s c16 | p50 / p99 c16 ms | p50 / p99 c1 ms | added p50 c1 ms "
        f"| open {s['open_rate']:g}/s p50 / p99 / p99.9 ms | CPU µs/req | kernel µs/req | wake-ups/req "
        "| peak RSS MiB | other work, cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, cases in report["results"].items():
        added = report["added_latency"].get(workload, {})
        for key, case in cases.items():
            med = case.get("median")
            if not med:
                what, _, why = case["status"].partition(": ")
                lines.append(f"| {workload} | {key} | **{what.upper()}**: {why} | | | | | | | | | |")
                continue
            rss = med["peak_rss_kib"] / 1024 if med["peak_rss_kib"] is not None else None
            add = added.get(key, {}).get("added_p50_us")
            lines.append(
                f"| {workload} | {key} | {_num(med['closed_rps'])} "
                f"| {_ms(med['closed_p50_us'])} / {_ms(med['closed_p99_us'])} "
                f"| {_ms(med['c1_p50_us'])} / {_ms(med['c1_p99_us'])} | {_ms(add) if key != 'direct' else '-'} "
                f"| {_ms(med['open_p50_us'])} / {_ms(med['open_p99_us'])} / {_ms(med['open_p999_us'])} "
                f"| {_num(med['cpu_us_per_request'])} | {_num(med.get('kernel_cpu_us_per_request'))} "
                f"| {_num(med.get('load_core_wakeups_per_request'), 2)} "
                f"| {_num(rss, 1)} | {_num(med['foreign_cpu_cores'], 2)} |"
            )
    lines += [
        "",
        "## PEP / Envoy (ratio of medians; throughput: higher is better, the rest: lower is better)",
        "",
        "| workload | target | req/s c16 | req per CPU-s | p99 c16 | p50 c1 | added p50 c1 | open p50 | open p99 "
        "| open p99.9 | CPU/req | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, per_target in report["ratios"].items():
        added = report["added_latency"].get(workload, {})
        for key, r in per_target.items():
            lines.append(
                f"| {workload} | {key} | {_x(r['closed_rps'])} | {_x(r['requests_per_cpu_s'])} "
                f"| {_x(r['closed_p99_us'])} | {_x(r['c1_p50_us'])} "
                f"| {_x(added.get(key, {}).get('vs_envoy'))} | {_x(r['open_p50_us'])} | {_x(r['open_p99_us'])} "
                f"| {_x(r['open_p999_us'])} | {_x(r['cpu_us_per_request'])} | {_x(r['peak_rss_kib'])} |"
            )
    lines += _stream_lines(report.get("stream"))
    lines += ["", "## Goals (issue 15; reported, never asserted)", ""]
    for g in report["goals"]:
        verdict = "reported" if g["met"] is None else "met" if g["met"] else "NOT MET"
        aim = f" (aim {THROUGHPUT_AIM:g}x met)" if g.get("aim_met") else ""
        value = f"+{_num(g['value'], 1)} MiB" if g["goal"].startswith("RSS") else _x(g["value"])
        lines.append(f"- **{verdict}**{aim}: {g['goal']}: {g['workload']}/{g['target']}: {value} ({g['detail']})")
    w = report["workers"]
    lines += ["", "## Workers (1 -> 2)", ""]
    if w["status"] == "ok":
        lines.append(
            f"- `workers: 2` on cores 0,1: {_num(w['rps_2'])} req/s vs {_num(w['rps_1'])} req/s with one worker: "
            f"scaling {_x(w['scaling'])} (core 1 also runs nginx and wrk, so 2.0x is out of reach here)."
        )
    else:
        what, _, why = w["status"].partition(": ")
        lines.append(f"- **{what.upper()}**: {why}")
    a = report.get("audit") or {"status": "not measured"}
    lines += ["", "## Decision log `required: true` (pep_audit against pep, get)", ""]
    if a["status"] == "ok":
        lines.append(
            f"- Every allow waits for the write of its line to a file before it is forwarded: "
            f"{_x(a['rps_ratio'])} the throughput of `pep` without a log; added p50 at 1 connection "
            f"{_ms(a['c1_p50_added_us'])} ms, p99 at 16 connections {_ms(a['closed_p99_added_us'])} ms, open-loop "
            f"p99 {_ms(a['open_p99_added_us'])} ms; {_num(a['cpu_us_per_request_added'])} CPU µs more per request. "
            f"Group commit: {a['lines_per_write']:.1f} lines per write (median over the runs)."
        )
    else:
        lines.append(f"- **{a['status'].upper()}**")
    alloc = report.get("allocation")
    if alloc:
        lines += [
            "",
            f"## Memory allocated per request (tracemalloc, {alloc.get('requests', '?')} sequential requests)",
            "",
            "Peak traced memory above the live memory at the start of each window: a lower bound of the bytes "
            "allocated per request (bench/alloc.py explains the windows).",
            "",
            "| workload | PEP handler | end to end (client + PEP) | client only (no PEP) | PEP share estimate "
            "| retained/request |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for workload in report["results"]:
            a = alloc.get(workload)
            if not a:
                continue
            cells = [
                a["handler_bytes"].get("median"),
                a["end_to_end_bytes"]["median"],
                a["client_only_bytes"]["median"],
                a["pep_share_bytes_estimate"],
            ]
            row = " | ".join(f"{_num(c)} B" for c in cells)
            lines.append(f"| {workload} | {row} | {_num(a['retained_bytes_per_request'], 1)} B |")
    lines += _layers(report)
    for prof in report.get("profiles", []):
        lines += [
            "",
            f"## Profile: pep, {prof['workload']} (py-spy, {prof['samples']} samples under wrk -c16; "
            "not part of the numbers above)",
            "",
            "| self | function | | inclusive | function |",
            "|---:|---|---|---:|---|",
        ]
        for own, inc in zip(prof["self"][:12], prof["inclusive"][:12], strict=False):
            own_share, inc_share = own["share"] * 100, inc["share"] * 100
            lines.append(f"| {own_share:.1f}% | `{own['function']}` | | {inc_share:.1f}% | `{inc['function']}` |")
    for warning in report.get("warnings", []):
        lines += ["", f"**WARNING: {warning}**"]
    return "\n".join(lines) + "\n"


def _layers(report: dict[str, Any]) -> list[str]:
    """perf's shares by layer (bench/layers.py), each also as CPU µs per request (the share of the median
    CPU/req of that target and workload)."""
    rows = report.get("layers") or []
    if not rows:
        return []
    names = [n for n in dict.fromkeys(k for r in rows for k in r["layers"])]
    heads = [f"{r['target']} {r['workload']}" for r in rows]
    cpu = [
        ((report["results"].get(r["workload"], {}).get(r["target"]) or {}).get("median") or {}).get(
            "cpu_us_per_request"
        )
        for r in rows
    ]

    def cell(share: float | None, total: float | None) -> str:
        if not share:
            return "-"
        return f"{share:.1f}% ({share * total / 100:.0f} µs)" if total else f"{share:.1f}%"

    lines = [
        "",
        "## Where the CPU goes, by layer (perf, cpu-clock under wrk -c16; % of the proxy's samples and µs of its "
        "median CPU/req)",
        "",
        "| layer | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(cell(r["layers"].get(name), c) for r, c in zip(rows, cpu, strict=True)) + " |"
        )
    lines.append(
        "| of which the kernel waking a peer (`sock_def_readable`) | "
        + " | ".join(cell(r["wakeups"], c) for r, c in zip(rows, cpu, strict=True))
        + " |"
    )
    return lines
