"""Caller data the PEP cannot turn into a PDP request is that request's problem, never the breaker's.

Before, a `tracestate` with a character outside Latin-1 made framing the PDP request fail, counted as a PDP
failure: five such requests opened the circuit for everyone although the PDP never saw them. A header byte that is
not UTF-8 (a lone surrogate in the policy input, which JSON cannot carry) raised while the input was serialised:
harmless while closed, but a failure of the probe while half-open, so one such request per `open_ms` kept the
circuit open; an AuthZEN mapping that resolved to nothing was a success and closed a half-open circuit on a dead
PDP. Each path from caller data into the PDP request is driven here through a running PEP against a real PDP
server: `N` (more than `failure_threshold`) such requests leave the circuit closed and the next good request is
allowed; while half-open, such a request neither reopens nor closes the circuit and leaves the probe to the next
request. A request that cannot be built reaches neither the PDP nor the upstream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningPep
from tests.support.authzen_pdp import AuthzenTestPdp
from tests.support.fault_pdp import FaultPdp
from tests.support.observe import metric
from tests.support.raw_client import raw_get
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]

THRESHOLD = 2
N = 5
OPEN_MS = 60_000
TRACEPARENT = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"


class FakeClock:
    """Monotonic time plus an offset the test bumps: `open_ms` is skipped at once, deadlines still pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def breaker(raw: dict[str, Any]) -> None:
    raw["pdp"]["retries"] = 0
    raw["pdp"]["breaker"] = {"failure_threshold": THRESHOLD, "open_ms": OPEN_MS, "half_open_probes": 1}


def authzen(url: str, route: dict[str, Any] | None = None) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"] = {"kind": "authzen", "url": url, "timeout_ms": 1000}
        breaker(raw)
        raw["routes"][0].update(route or {})

    return mutate


@pytest.fixture
async def az() -> AsyncIterator[AuthzenTestPdp]:
    pdp = AuthzenTestPdp()
    await pdp.start()
    yield pdp
    await pdp.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def send(pep: RunningPep, extra: bytes = b"", target: bytes = b"/tools/x") -> tuple[int, str | None]:
    return await raw_get(pep.port, target, extra)


async def circuit(pep: RunningPep) -> tuple[float, float]:
    """The circuit gauge, and how often it opened."""
    async with aiohttp.ClientSession() as s, s.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    return metric(text, "pep_circuit_state"), metric(text, "pep_circuit_transitions_total", to="open")


# What each path's request looks like, and its outcome: allowed (the caller data is dropped or replaced: nothing
# in it needs carrying), or denied with its own reason before the PDP is asked.
OPA_CASES = [
    pytest.param(TRACEPARENT + b"tracestate: a=\xe2\x82\xac\r\n", None, id="tracestate-outside-latin1"),
    pytest.param(TRACEPARENT + b"tracestate: a=\xff\r\n", None, id="tracestate-not-utf8"),
    pytest.param(TRACEPARENT + b"tracestate: a=1,a=2\r\n", None, id="tracestate-invalid"),
    pytest.param(b"x-request-id: \xe2\x82\xac\r\n", None, id="request-id-outside-ascii"),
    pytest.param(b"x-note: caf\xff\r\n", "request_ambiguous", id="header-not-utf8"),
]


@pytest.mark.parametrize(("extra", "reason"), OPA_CASES)
async def test_opa_requests_from_caller_data_never_open_the_circuit(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, extra: bytes, reason: str | None
) -> None:
    pep: RunningPep = await make_pep(breaker)
    for _ in range(N):
        assert await send(pep, extra) == ((200, None) if reason is None else (403, reason))
    if reason is None:
        assert len(fault_pdp.requests) == N
        assert all("tracestate" not in r.headers for r in fault_pdp.requests)  # dropped, never sent on
        assert len(upstream.seen) == N
        assert all("tracestate" not in r.headers for r in upstream.seen)
    else:
        assert fault_pdp.requests == []  # the PDP was never asked
        assert upstream.seen == []
    assert await circuit(pep) == (0, 0)
    assert await send(pep) == (200, None)


async def test_opa_a_request_that_cannot_be_built_leaves_a_half_open_circuit_to_its_probe(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, clock: FakeClock
) -> None:
    pep: RunningPep = await make_pep(breaker, clock=clock)
    fault_pdp.set("status_500")
    for _ in range(THRESHOLD):
        assert await send(pep) == (403, "pdp_error_status")
    assert await send(pep) == (403, "circuit_open")
    clock.offset += OPEN_MS / 1000
    fault_pdp.set("allow")
    asked = len(fault_pdp.requests)
    for _ in range(N):  # one per half-open period used to be enough to keep it open
        assert await send(pep, b"x-note: caf\xff\r\n") == (403, "request_ambiguous")
        assert (await circuit(pep))[0] == 1  # still half-open: not a failure, not a success
    assert len(fault_pdp.requests) == asked
    assert await send(pep) == (200, None)  # the probe
    assert await circuit(pep) == (0, 1)
    assert len(upstream.seen) == 1


TENANT = b"/tools/x?tenant=acme"  # what the route's mapping needs (TENANT_MAPPING)
AUTHZEN_CASES = [
    pytest.param(TRACEPARENT + b"tracestate: a=\xe2\x82\xac\r\n", TENANT, None, id="tracestate-outside-latin1"),
    # A header the route's mapping reads (a Host that is not host[:port] never gets this far: the listener's
    # reader refuses it with a 400, test_a_host_that_is_not_an_authority_is_refused_before_anything_is_decided).
    pytest.param(b"x-note: caf\xff\r\n", TENANT, "request_ambiguous", id="mapped-header-not-utf8"),
    pytest.param(b"", b"/tools/x?other=1", "pdp_undefined", id="mapping-resolves-to-nothing"),
]
TENANT_MAPPING = {
    "mapping": {"resource": {"id": "$request.query.tenant.0", "properties": {"note": "$request.headers.x-note"}}}
}


@pytest.mark.parametrize(("extra", "target", "reason"), AUTHZEN_CASES)
async def test_authzen_requests_from_caller_data_never_open_the_circuit(
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    extra: bytes,
    target: bytes,
    reason: str | None,
) -> None:
    pep: RunningPep = await make_pep(authzen(az.url, TENANT_MAPPING))
    for _ in range(N):
        assert await send(pep, extra, target) == ((200, None) if reason is None else (403, reason))
    if reason is None:
        assert len(az.evaluations) == N
        assert all("tracestate" not in s.headers for s in az.seen)
    else:
        assert az.evaluations == []
        assert upstream.seen == []
    assert await circuit(pep) == (0, 0)
    assert await send(pep, b"", TENANT) == (200, None)


@pytest.mark.parametrize(("extra", "target", "reason"), [p for p in AUTHZEN_CASES if p.values[2] is not None])
async def test_authzen_a_request_that_cannot_be_built_neither_reopens_nor_closes_a_half_open_circuit(
    make_pep: PepFactory,
    az: AuthzenTestPdp,
    upstream: RecordingUpstream,
    clock: FakeClock,
    extra: bytes,
    target: bytes,
    reason: str,
) -> None:
    pep: RunningPep = await make_pep(authzen(az.url, TENANT_MAPPING), clock=clock)
    az.evaluation_status = 500
    for _ in range(THRESHOLD):
        assert await send(pep, b"", TENANT) == (403, "pdp_error_status")
    clock.offset += OPEN_MS / 1000
    for _ in range(N):
        assert await send(pep, extra, target) == (403, reason)
        assert (await circuit(pep))[0] == 1  # neither reopened (a failure) nor closed on a failing PDP (a success)
    assert await send(pep, b"", TENANT) == (403, "pdp_error_status")  # the probe, still failing
    assert await circuit(pep) == (2, 2)
    az.evaluation_status = 200
    clock.offset += OPEN_MS / 1000
    assert await send(pep, b"", TENANT) == (200, None)
    assert await circuit(pep) == (0, 2)
    assert len(upstream.seen) == 1


async def test_cedar_caller_data_it_cannot_take_denies_that_request_alone(
    make_pep: PepFactory, upstream: RecordingUpstream, tmp_path: Any
) -> None:
    """Cedar has no breaker; a header that is not UTF-8 reaches its entities through the route's mapping: that
    request is denied `request_ambiguous`, the next is decided as usual."""
    policies = tmp_path / "p.cedar"
    policies.write_text("permit(principal, action, resource);\n")

    def cedar(raw: dict[str, Any]) -> None:
        raw["pdp"] = {"kind": "cedar", "policies": str(policies)}
        raw["routes"][0]["mapping"] = {"resource": {"properties": {"note": "$request.headers.x-note"}}}

    pep: RunningPep = await make_pep(cedar)
    for _ in range(N):
        assert await send(pep, b"x-note: caf\xff\r\n") == (403, "request_ambiguous")
    assert upstream.seen == []
    assert await send(pep) == (200, None)


async def test_a_host_that_is_not_an_authority_is_refused_before_anything_is_decided(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """The listener's reader refuses a Host value that is not host[:port] (here: not UTF-8) with a 400: no
    handler runs, the PDP is not asked, the circuit is not touched."""
    pep: RunningPep = await make_pep(breaker)
    for _ in range(N):
        assert await send(pep, b"Host: caf\xff\r\n") == (400, None)
    assert fault_pdp.requests == []
    assert upstream.seen == []
    assert await circuit(pep) == (0, 0)
    assert await send(pep) == (200, None)
