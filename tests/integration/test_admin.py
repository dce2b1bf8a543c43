"""The admin listener: liveness, readiness (circuit and shutdown), and Prometheus metrics whose labels never
carry a value from a request. Admin paths are never served on the proxy port, and the admin port never proxies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from pep import __version__
from pep.decision import Reason
from pep.metrics import (
    APPROVAL_RESULTS,
    CODE_CLASSES,
    CREDENTIAL_FETCH_RESULTS,
    PDP_OUTCOMES,
    UNMATCHED,
    UPSTREAM_FAILURES,
)
from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.upstream import RecordingUpstream

MakePep = Callable[..., Any]

DOCUMENTED_METRICS = (
    "pep_decisions_total",
    "pep_decision_duration_seconds",
    "pep_pdp_request_duration_seconds",
    "pep_pdp_in_flight",
    "pep_circuit_state",
    "pep_circuit_transitions_total",
    "pep_upstream_request_duration_seconds",
    "pep_upstream_responses_total",
    "pep_requests_in_flight",
    "pep_decision_log_dropped_total",
    "pep_config_reloads_total",
    "pep_build_info",
)


async def get(url: str) -> tuple[int, str, dict[str, Any] | None, str]:
    """Status, body text, parsed JSON body (when JSON) and Content-Type of a GET."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, text, body, r.headers.get("Content-Type", "")


def sample_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def sample_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def test_healthz_and_readyz(pep: RunningPep) -> None:
    status, _, body, ctype = await get(pep.admin_url + "/healthz")
    assert status == 200
    assert ctype.startswith("application/json")
    status, _, body, _ = await get(pep.admin_url + "/readyz")
    assert status == 200
    assert body == {"ready": True, "reasons": []}


async def test_metrics_expose_every_design_metric(pep: RunningPep) -> None:
    async with aiohttp.ClientSession() as s, s.get(pep.url + "/tools/x") as r:
        assert r.status == 200
    status, text, _, ctype = await get(pep.admin_url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    names = sample_names(text)
    for metric in DOCUMENTED_METRICS:
        present = metric in names or any(n.startswith(metric + "_") for n in names)
        assert present, f"{metric} missing from /metrics"
        assert f"# TYPE {metric} " in text, metric
    assert sample_value(text, "pep_build_info", version=__version__) == 1
    assert sample_value(text, "pep_circuit_state") == 0
    assert sample_value(text, "pep_pdp_in_flight") == 0
    assert sample_value(text, "pep_decisions_total", route="tools", decision="allow", reason="allowed") == 1
    assert sample_value(text, "pep_decision_duration_seconds_count", route="tools") == 1
    assert sample_value(text, "pep_pdp_request_duration_seconds_count", outcome="ok") == 1
    assert sample_value(text, "pep_upstream_responses_total", route="tools", code_class="2xx") == 1
    assert sample_value(text, "pep_decision_log_dropped_total") == 0


WEIRD = "zq9weird"


async def test_no_metric_label_takes_a_value_from_the_request(
    make_pep: MakePep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    pep: RunningPep = await make_pep()
    headers = {
        "X-Agent-ID": f"agent-{WEIRD}-1",
        "X-Request-ID": f"rid-{WEIRD}-2",
        "User-Agent": f"ua-{WEIRD}-3",
        "X-Anything": f"hdr-{WEIRD}-4",
    }
    async with aiohttp.ClientSession() as s:
        for path in (f"/{WEIRD}-5", f"/tools/{WEIRD}-6?{WEIRD}-7=1", f"/tools/../{WEIRD}-8", f"/tools/{WEIRD}-9"):
            async with s.get(URL(pep.url + path, encoded=True), headers=headers) as r:
                await r.read()
        async with s.patch(pep.url + f"/tools/{WEIRD}-10", data=b"x", headers=headers) as r:
            await r.read()
        fault_pdp.set(Mode(body=b'{"result":{"allow":false,"reason":"reason-' + WEIRD.encode() + b'-11"}}'))
        async with s.get(pep.url + "/tools/denied", headers=headers) as r:
            assert r.status == 403
        fault_pdp.set(Mode(body=b'{"result":{"allow":true,"headers":{"x-' + WEIRD.encode() + b'-12":"v"}}}'))
        async with s.get(pep.url + "/tools/obligation", headers=headers) as r:
            assert r.status == 200
    assert len(upstream.seen) >= 3
    _, text, _, _ = await get(pep.admin_url + "/metrics")
    assert WEIRD not in text
    allowed: dict[str, set[str]] = {
        "route": {"tools", UNMATCHED},
        "decision": {"allow", "deny"},
        "reason": {r.value for r in Reason},
        "outcome": set(PDP_OUTCOMES),
        "to": {"closed", "open", "half_open"},
        "code_class": set(CODE_CLASSES),
        "kind": set(UPSTREAM_FAILURES),
        "result": {"success", "error", *APPROVAL_RESULTS, *CREDENTIAL_FETCH_RESULTS},
        "version": {__version__},
    }
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("pep_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    float(value)  # histogram bucket bounds are numbers from the code
                    continue
                assert label in allowed, f"{sample.name} has an unexpected label {label!r}"
                assert value in allowed[label], f"{sample.name}{{{label}={value!r}}}"
    assert sample_value(text, "pep_decisions_total", route="tools", decision="deny", reason="policy_denied") == 1
    assert sample_value(text, "pep_decisions_total", route=UNMATCHED, decision="deny", reason="no_route") == 1
    assert sample_value(text, "pep_decisions_total", route=UNMATCHED, decision="deny", reason="request_ambiguous") == 1


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_admin_paths_are_not_served_on_the_proxy_port(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream, path: str
) -> None:
    async with aiohttp.ClientSession() as s, s.get(pep.url + path) as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == "no_route"
        assert "pep_decisions_total" not in await r.text()
    assert upstream.seen == []
    assert fault_pdp.requests == []


async def test_the_admin_port_never_proxies(pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/tools/x"), ("POST", "/tools/x"), ("GET", "/")):
            async with s.request(method, pep.admin_url + path) as r:
                assert r.status in (404, 405)
                assert "x-pep-decision" not in r.headers
    assert upstream.seen == []
    assert fault_pdp.requests == []


async def test_readyz_reports_shutting_down(pep: RunningPep) -> None:
    pep.server.shutting_down = True
    status, _, body, _ = await get(pep.admin_url + "/readyz")
    assert status == 503
    assert body == {"ready": False, "reasons": ["shutting_down"]}
    status, _, _, _ = await get(pep.admin_url + "/healthz")
    assert status == 200  # still alive while it drains
    pep.server.shutting_down = False
    status, _, body, _ = await get(pep.admin_url + "/readyz")
    assert status == 200


async def test_readyz_reports_shutting_down_while_stop_drains_requests(
    make_pep: MakePep, upstream: RecordingUpstream
) -> None:
    def strip(cfg: dict[str, Any]) -> None:
        cfg["routes"][0]["strip_prefix"] = True

    pep: RunningPep = await make_pep(mutate=strip)
    admin = pep.admin_url
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(pep.url + "/tools/slow?ms=1500"))
        for _ in range(500):
            if upstream.seen:
                break
            await asyncio.sleep(0.01)
        assert upstream.seen, "the slow request did not reach the upstream"
        stopping = asyncio.ensure_future(pep.server.stop())
        seen: list[tuple[int, Any]] = []
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not stopping.done():
                try:
                    async with s.get(admin + "/readyz") as r:
                        seen.append((r.status, await r.json()))
                        if r.status == 503:
                            break
                except aiohttp.ClientConnectionError:
                    seen.append((0, None))
                await asyncio.sleep(0.02)
            response = await asyncio.wait_for(slow, 10)
            assert response.status == 200  # the in-flight request is drained, not cut
            response.release()
        finally:
            await asyncio.wait_for(stopping, 15)
    assert (503, {"ready": False, "reasons": ["shutting_down"]}) in seen, seen


async def test_readyz_reports_an_open_circuit(pep: RunningPep, fault_pdp: FaultPdp) -> None:
    fault_pdp.set("status_500")
    async with aiohttp.ClientSession() as s:
        for _ in range(5):  # failure_threshold in the test config
            async with s.get(pep.url + "/tools/x") as r:
                assert r.status == 403
                assert r.headers["x-pep-reason"] == "pdp_error_status"
        async with s.get(pep.url + "/tools/x") as r:
            assert r.headers["x-pep-reason"] == "circuit_open"
    status, _, body, _ = await get(pep.admin_url + "/readyz")
    assert status == 503
    assert body == {"ready": False, "reasons": ["circuit_open"]}
    _, text, _, _ = await get(pep.admin_url + "/metrics")
    assert sample_value(text, "pep_circuit_state") == 2
    assert sample_value(text, "pep_circuit_transitions_total", to="open") == 1
    status, _, _, _ = await get(pep.admin_url + "/healthz")
    assert status == 200  # not ready, but alive: it keeps answering (with denials)
