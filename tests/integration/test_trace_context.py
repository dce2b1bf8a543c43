"""Trace context through the PEP: the caller's `traceparent`/`tracestate` reach the PDP and the upstream (or a
new trace is started for both), the decision log names the trace, and with `tracing` the PEP's own span (the
OpenTelemetry SDK, an in-memory exporter here) sits between the caller's and what the PEP sends on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pep.app import Server
from pep.config import load
from pep.trace import parse_traceparent
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


async def get(url: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def test_the_callers_trace_reaches_the_pdp_the_upstream_and_the_log(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    assert await get(pep.url + "/tools/x", traceparent=CALLER, tracestate="vendor=1") == 200
    assert fault_pdp.requests[0].headers["traceparent"] == CALLER
    assert fault_pdp.requests[0].headers["tracestate"] == "vendor=1"
    assert upstream.seen[0].headers.getall("traceparent") == [CALLER]
    assert upstream.seen[0].headers["tracestate"] == "vendor=1"
    (entry,) = await pep.log_entries()
    assert entry["trace_id"] == TRACE_ID
    # Trace headers are the PEP's to set: the policy never decides on them.
    assert "traceparent" not in fault_pdp.requests[0].body["input"]["request"]["headers"]


async def test_without_a_valid_traceparent_one_trace_is_started_for_pdp_and_upstream(
    pep: RunningPep, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    assert await get(pep.url + "/tools/x", traceparent="00-garbage", tracestate="dropped=1") == 200
    started = fault_pdp.requests[0].headers["traceparent"]
    parsed = parse_traceparent(started)
    assert parsed is not None
    assert upstream.seen[0].headers["traceparent"] == started
    assert "tracestate" not in upstream.seen[0].headers  # an invalid parent's state goes with it
    assert "tracestate" not in fault_pdp.requests[0].headers
    (entry,) = await pep.log_entries()
    assert entry["trace_id"] == parsed[0]


async def test_a_denial_is_logged_with_its_trace(pep: RunningPep, fault_pdp: FaultPdp) -> None:
    fault_pdp.set("deny")
    assert await get(pep.url + "/tools/x", traceparent=CALLER) == 403
    (entry,) = await pep.log_entries()
    assert entry["trace_id"] == TRACE_ID


EXPORTER = InMemorySpanExporter()


def traced_config(tmp_path: Path, pdp: FaultPdp, upstream: RecordingUpstream) -> Path:
    raw: dict[str, Any] = base_config(pdp.url, upstream.url, tmp_path / "log.jsonl")
    raw["tracing"] = {"exporter": "console", "service_name": "pep-test"}
    path = tmp_path / "traced.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def add_tracing(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["tracing"] = {"exporter": "console"}
    path.write_text(yaml.safe_dump(raw))


async def test_with_tracing_the_peps_span_is_the_parent_of_what_it_sends_on(
    tmp_path: Path, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    EXPORTER.clear()
    server = Server(load(traced_config(tmp_path, fault_pdp, upstream)), span_exporter=EXPORTER)
    await server.start()
    try:
        assert server.proxy_address is not None
        url = f"http://127.0.0.1:{server.proxy_address.port}/tools/x"
        assert await get(url, traceparent=CALLER) == 200
        fault_pdp.set("deny")
        assert await get(url) == 403
        assert server.tracing is not None
        server.tracing.flush()
    finally:
        await server.stop()
    allowed, denied = EXPORTER.get_finished_spans()
    for span in (allowed, denied):
        assert span.name == "pep.request"
        assert span.kind is SpanKind.SERVER
        assert span.resource.attributes["service.name"] == "pep-test"
    ctx = allowed.get_span_context()
    assert ctx is not None
    assert format(ctx.trace_id, "032x") == TRACE_ID
    assert allowed.parent is not None
    assert format(allowed.parent.span_id, "016x") == "b7ad6b7169203331"  # the caller's span
    own = f"00-{TRACE_ID}-{ctx.span_id:016x}-01"
    assert fault_pdp.requests[0].headers["traceparent"] == own  # the PDP's span hangs under the PEP's
    assert upstream.seen[0].headers["traceparent"] == own
    attributes = dict(allowed.attributes or {})
    assert {k: attributes.get(k) for k in ("pep.route", "pep.decision", "pep.reason", "http.response.status_code")} == {
        "pep.route": "tools",
        "pep.decision": "allow",
        "pep.reason": "allowed",
        "http.response.status_code": 200,
    }
    assert (denied.attributes or {})["pep.reason"] == "policy_denied"
    assert denied.parent is None  # no caller trace: the PEP's span is the root


async def test_tracing_is_refused_by_reload(make_pep: PepStarter) -> None:
    pep: RunningPep = await make_pep()
    add_tracing(Path(pep.server.config.source))
    assert not await pep.server.reload_config()  # tracing: a restart-only key
