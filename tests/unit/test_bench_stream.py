"""The benchmark's streaming measurement as `make bench` reports it: medians, ratios, the table and the goals.

The harness itself runs in `make bench-smoke`; these check what its report says about given numbers.
"""

from __future__ import annotations

import os
from typing import Any

from bench import report, stream

MIB = 1 << 20


def _run(mib_s: float, growth_kib: int | None = None, baseline_kib: int = 60 * 1024) -> dict[str, Any]:
    proxied = growth_kib is not None
    return {
        "bytes": 256 * MIB,
        "seconds": 256 / mib_s,
        "mib_s": mib_s,
        "proxy_cpu_s": 1.0 if proxied else None,
        "rss_baseline_kib": baseline_kib if proxied else None,
        "rss_max_kib": baseline_kib + growth_kib if growth_kib is not None else None,
        "rss_growth_kib": growth_kib,
        "rss_samples": 30 if proxied else 0,
    }


def _streamed(pep_upload_growth_kib: int) -> dict[str, Any]:
    cases: dict[str, dict[str, dict[str, Any]]] = {
        "download": {
            "direct": {"status": "ok", "runs": [_run(1000.0), _run(1200.0), _run(1100.0)]},
            "pep": {"status": "ok", "runs": [_run(330.0, 1024), _run(300.0, 2048), _run(310.0, 512)]},
            "envoy": {"status": "ok", "runs": [_run(600.0, 2048), _run(620.0, 2048), _run(640.0, 2048)]},
        },
        "upload": {
            "direct": {"status": "ok", "runs": [_run(700.0)]},
            "pep": {"status": "ok", "runs": [_run(350.0, pep_upload_growth_kib)]},
            "envoy": {"status": f"refused: 413: {stream.ENVOY_REFUSAL}", "runs": []},
        },
    }
    for per_target in cases.values():
        for case in per_target.values():
            stream.summarize(case)
    out: dict[str, Any] = {"size_bytes": 256 * MIB, "repetitions": 3, "sample_interval_ms": 20.0, **cases}
    out["ratios"] = {d: stream.ratios(cases[d]) for d in stream.DIRECTIONS}
    return out


def _report(streamed: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": "full",
        "started": "2026-01-01T00:00:00+00:00",
        "elapsed_s": 600.0,
        "machine": {
            "cpu_model": "cpu",
            "cpus": 2,
            "kernel": "6.1",
            "python": "3.11",
            "nginx": "1.22",
            "envoy": "1.40.0",
            "wrk": "4.1",
            "aiohttp": "3",
            "pep": "0",
            "commit": "abc",
        },
        "settings": {
            "repetitions": 3,
            "connections": 16,
            "closed_s": 6,
            "single_s": 4,
            "open_rate": 1000.0,
            "open_s": 6.0,
            "proxy_cores": "0",
            "load_cores": "1",
        },
        "results": {},
        "added_latency": {},
        "ratios": {},
        "goals": report.stream_goals(streamed),
        "workers": {"status": "ok", "rps_1": 1.0, "rps_2": 1.5, "scaling": 1.5},
        "stream": streamed,
    }


def test_medians_and_ratios_against_direct_and_envoy() -> None:
    streamed = _streamed(1024)
    pep = streamed["download"]["pep"]["median"]
    assert pep["mib_s"] == 310.0
    assert pep["rss_growth_kib_max"] == 2048  # the worst run, not the median
    assert streamed["download"]["direct"]["median"]["rss_growth_kib_max"] is None
    ratio = streamed["ratios"]["download"]["pep"]
    assert ratio["vs_direct"] == 310.0 / 1100.0
    assert ratio["vs_envoy"] == 310.0 / 620.0
    assert streamed["ratios"]["download"]["envoy"]["vs_envoy"] is None
    # Envoy refused the upload: there is no Envoy figure to compare with.
    assert streamed["ratios"]["upload"]["pep"] == {"vs_direct": 0.5, "vs_envoy": None}
    assert "median" not in streamed["upload"]["envoy"]


def test_the_table_shows_every_direction_and_target() -> None:
    text = report.markdown(_report(_streamed(1024)))
    assert "## Streaming (256 MiB, 3 repetition(s)" in text
    assert "| download | direct | 1,100 | - | - |" in text
    assert "| download | pep | 310 | 0.28x | 0.50x |" in text
    assert "| download | envoy | 620 | 0.56x | - |" in text
    assert "| upload | pep | 350 | 0.50x | n/a |" in text
    assert "| upload | envoy | **REFUSED**: 413: ext_authz `with_request_body`" in text


def test_goals_report_throughput_and_judge_rss_growth() -> None:
    flat = report.stream_goals(_streamed(1024))
    throughput = [g for g in flat if g["goal"].startswith("streaming throughput")]
    assert [g["workload"] for g in throughput] == ["stream_download", "stream_upload"]
    assert all(g["met"] is None for g in throughput)  # reported against direct, no bar
    assert [g["met"] for g in flat if g["goal"].startswith("RSS flat")] == [True, True]

    grown = report.stream_goals(_streamed(64 * 1024))
    upload_rss = next(g for g in grown if g["workload"] == "stream_upload" and g["goal"].startswith("RSS"))
    assert upload_rss["met"] is False
    assert upload_rss["value"] == 64.0
    text = report.markdown(_report(_streamed(64 * 1024)))
    assert "- **reported**: streaming throughput against direct, 256 MiB download: stream_download/pep: 0.28x" in text
    assert "- **NOT MET**: RSS flat during a 256 MiB upload (growth <= 4 MiB): stream_upload/pep: +64.0 MiB" in text
    assert "- **met**: RSS flat during a 256 MiB download (growth <= 4 MiB): stream_download/pep: +2.0 MiB" in text


def test_no_stream_section_without_a_stream_result() -> None:
    assert report.stream_goals(None) == []
    without = _report(_streamed(1024))
    del without["stream"]
    without["goals"] = []
    assert "## Streaming" not in report.markdown(without)


def test_rss_sampler_reads_a_live_process() -> None:
    with stream.RssSampler([os.getpid()], interval=0.001) as sampler:
        pass
    assert sampler.samples >= 1
    assert sampler.max_kib > 0
    assert stream.rss_kib([os.getpid()]) is not None
    assert stream.rss_kib([]) is None
