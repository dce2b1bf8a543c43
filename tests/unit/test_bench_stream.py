"""The benchmark's streaming measurement as `make bench` reports it: medians, ratios, the table and the goals.

The harness itself runs in `make bench-smoke`; these check what its report says about given numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from bench import report, stream, targets
from bench.procs import BenchError, Proc
from bench.targets import Running, Stubs

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


class _FakeCurl:
    """Stands in for curl: answers with the given status and counts, and stores `stored` bytes as nginx would."""

    def __init__(self, stubs: Stubs, status: int, down: int, up: int, stored: int | None) -> None:
        self.stubs, self.status, self.down, self.up, self.stored = stubs, status, down, up, stored

    def __call__(self, argv: list[str], timeout: float) -> dict[str, Any]:
        if self.stored is not None:
            (self.stubs.stream_dir / stream.UPLOAD_NAME).write_bytes(b"x" * self.stored)
        return {"status": self.status, "size_download": self.down, "size_upload": self.up, "seconds": 0.5}


def _stubs(tmp_path: Path) -> Stubs:
    (tmp_path / "upload").mkdir()
    # transfer() reads only the stream port and directory of the stubs; no nginx runs here.
    return Stubs(cast(Proc, None), 1, 2, 3, 4, tmp_path, tmp_path / "stream.log")


SIZE = 4 * MIB


@pytest.mark.parametrize(
    ("direction", "status", "down", "up", "stored"),
    [
        ("download", 200, SIZE - 1, 0, None),  # a short download
        ("download", 206, SIZE, 0, None),  # not the whole file's answer
        ("upload", 201, 0, SIZE, SIZE - 1),  # nginx stored less than was sent
        ("upload", 201, 0, SIZE - 1, SIZE - 1),  # curl sent less
        ("upload", 500, 0, SIZE, None),  # nginx stored nothing
        ("upload", 413, 0, 1 << 20, None),  # a refusal counts as one only from Envoy
    ],
)
def test_a_short_or_failed_transfer_fails_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str, status: int, down: int, up: int, stored: int | None
) -> None:
    stubs = _stubs(tmp_path)
    monkeypatch.setattr(stream, "curl", _FakeCurl(stubs, status, down, up, stored))
    with pytest.raises(BenchError, match=f"stream {direction} through direct"):
        stream.transfer(Running(targets.DIRECT, 1, None), stubs, direction, tmp_path / "blob", SIZE)


def test_a_whole_transfer_is_measured_and_its_upload_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stubs = _stubs(tmp_path)
    monkeypatch.setattr(stream, "curl", _FakeCurl(stubs, 201, 0, SIZE, SIZE))
    run = stream.transfer(Running(targets.DIRECT, 1, None), stubs, "upload", tmp_path / "blob", SIZE)
    assert run["bytes"] == SIZE
    assert run["mib_s"] == 8.0  # 4 MiB in 0.5 s
    assert run["rss_growth_kib"] is None  # direct: no proxy to sample
    assert not (tmp_path / stream.UPLOAD_NAME).exists()


def test_envoys_413_on_an_upload_is_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stubs = _stubs(tmp_path)
    monkeypatch.setattr(stream, "curl", _FakeCurl(stubs, 413, 17, 1 << 20, None))
    envoy = Running(targets.ENVOY, 1, cast(Proc, _Alive()))
    assert stream.transfer(envoy, stubs, "upload", tmp_path / "blob", SIZE) == {
        "refused": f"413: {stream.ENVOY_REFUSAL}"
    }


class _Alive:
    """A stand-in proxy process: this test process, which is alive and has a VmRSS."""

    pid = os.getpid()

    def alive(self) -> bool:
        return True
