"""The PDP circuit breaker on a running PEP: every transition visible in /metrics and /readyz, no PDP or upstream
traffic while open, exactly the configured probes while half-open, and recovery when the PDP comes back.

Time is a fake clock (`time.monotonic()` plus an offset the test bumps), so `open_ms` can be long and skipped at
once; the engine also uses the clock for deadlines, which stay consistent because only the offset jumps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]

THRESHOLD = 3
OPEN_MS = 60_000
SKIP_OPEN_S = OPEN_MS / 1000 + 1


class FakeClock:
    """Monotonic time plus a manual offset: deadlines still pass in real time, `open_ms` is skipped by `advance`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def breaker_config(retries: int = 0, timeout_ms: int = 250) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"]["retries"] = retries
        raw["pdp"]["timeout_ms"] = timeout_ms
        raw["pdp"]["breaker"] = {"failure_threshold": THRESHOLD, "open_ms": OPEN_MS, "half_open_probes": 1}

    return mutate


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def bpep(make_pep: PepFactory, clock: FakeClock) -> RunningPep:
    running: RunningPep = await make_pep(breaker_config(), clock=clock)
    return running


class View:
    """What an operator sees: the circuit gauge, transition counters and readiness."""

    def __init__(self, state: float, transitions: dict[str, float], ready: int, reasons: list[str]) -> None:
        self.state = state
        self.transitions = transitions
        self.ready = ready
        self.reasons = reasons


async def observe(client: aiohttp.ClientSession, pep: RunningPep) -> View:
    async with client.get(pep.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    async with client.get(pep.admin_url + "/readyz") as r:
        ready = r.status
        body = orjson.loads(await r.read())
    assert body["ready"] is (ready == 200)
    transitions = {to: metric(text, "pep_circuit_transitions_total", to=to) for to in ("closed", "open", "half_open")}
    return View(metric(text, "pep_circuit_state"), transitions, ready, list(body["reasons"]))


async def call(client: aiohttp.ClientSession, pep: RunningPep, path: str = "/tools/x") -> tuple[int, str | None]:
    async with client.get(pep.url + path) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason")


async def trip(client: aiohttp.ClientSession, pep: RunningPep, fault_pdp: FaultPdp, mode: str) -> None:
    """THRESHOLD consecutive failures open the circuit."""
    await fault_pdp.apply(mode)
    for _ in range(THRESHOLD):
        status, reason = await call(client, pep)
        assert status == 403
        assert reason != "circuit_open"


def assert_closed(view: View) -> None:
    assert view.state == 0
    assert view.ready == 200
    assert view.reasons == []


def assert_open(view: View) -> None:
    assert view.state == 2
    assert view.ready == 503
    assert view.reasons == ["circuit_open"]


async def test_full_cycle_closed_open_half_open_closed(
    bpep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    view = await observe(client, bpep)
    assert_closed(view)
    assert view.transitions == {"closed": 0, "open": 0, "half_open": 0}

    # Fewer failures than the threshold, then a success: the count starts again, the circuit stays closed.
    fault_pdp.set("status_500")
    for _ in range(THRESHOLD - 1):
        assert await call(client, bpep) == (403, "pdp_error_status")
    fault_pdp.set("deny")  # a well-formed deny is a success for the breaker
    assert await call(client, bpep) == (403, "policy_denied")
    fault_pdp.set("status_500")
    for _ in range(THRESHOLD - 1):
        assert await call(client, bpep) == (403, "pdp_error_status")
    assert_closed(await observe(client, bpep))

    # The threshold-th consecutive failure opens it.
    assert await call(client, bpep) == (403, "pdp_error_status")
    view = await observe(client, bpep)
    assert_open(view)
    assert view.transitions == {"closed": 0, "open": 1, "half_open": 0}

    # Open: denied at once, neither the PDP nor the upstream sees anything, even with the PDP healthy again.
    fault_pdp.set("allow")
    asked = len(fault_pdp.requests)
    for _ in range(10):
        assert await call(client, bpep) == (403, "circuit_open")
    async with client.post(bpep.url + "/tools/y", data=b"body") as r:
        assert r.status == 403
        assert r.headers["x-pep-reason"] == "circuit_open"
    assert len(fault_pdp.requests) == asked
    assert upstream.seen == []
    entries = await bpep.log_entries()
    opened = [e for e in entries if e["reason"] == "circuit_open"]
    assert len(opened) == 11
    assert all(e["attempts"] == 0 and e["pdp_ms"] is None and e["circuit"] == "open" for e in opened)

    # Still open just before open_ms has passed.
    clock.advance(OPEN_MS / 1000 - 1)
    assert await call(client, bpep) == (403, "circuit_open")
    assert len(fault_pdp.requests) == asked

    # open_ms passed: half-open (gauge 1) without a request yet; the next request is the probe.
    clock.advance(2)
    view = await observe(client, bpep)
    assert view.state == 1
    assert view.ready == 200

    status, _ = await call(client, bpep)
    assert status == 200
    assert len(fault_pdp.requests) == asked + 1
    assert len(upstream.seen) == 1
    view = await observe(client, bpep)
    assert_closed(view)
    assert view.transitions == {"closed": 1, "open": 1, "half_open": 1}

    # Closed again: requests flow.
    for _ in range(5):
        assert (await call(client, bpep))[0] == 200
    assert len(upstream.seen) == 6
    entries = await bpep.log_entries()
    allows = [e for e in entries if e["decision"] == "allow"]
    assert {e["decision_id"] for e in allows} == {u.headers["x-pep-decision-id"] for u in upstream.seen}
    assert allows[0]["circuit"] == "closed"


@pytest.mark.parametrize("probe_mode", ["hang", "status_500", "not_json", "close", "refuse"])
async def test_probe_failure_reopens(
    probe_mode: str,
    bpep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    await trip(client, bpep, fault_pdp, "status_500")
    assert_open(await observe(client, bpep))
    clock.advance(SKIP_OPEN_S)
    await fault_pdp.apply(probe_mode)
    asked = len(fault_pdp.requests)

    status, reason = await call(client, bpep)
    assert status == 403
    assert reason not in {None, "circuit_open"}
    assert len(fault_pdp.requests) == asked + (0 if probe_mode == "refuse" else 1)
    view = await observe(client, bpep)
    assert_open(view)
    assert view.transitions == {"closed": 0, "open": 2, "half_open": 1}

    # Reopened for a full open_ms: nothing reaches the PDP even once it is healthy.
    await fault_pdp.apply("allow")
    asked = len(fault_pdp.requests)
    assert await call(client, bpep) == (403, "circuit_open")
    clock.advance(OPEN_MS / 1000 - 1)
    assert await call(client, bpep) == (403, "circuit_open")
    assert len(fault_pdp.requests) == asked
    clock.advance(2)
    assert (await call(client, bpep))[0] == 200
    view = await observe(client, bpep)
    assert_closed(view)
    assert view.transitions == {"closed": 1, "open": 2, "half_open": 2}
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("probe_mode", ["deny", "undefined"])
async def test_probe_well_formed_deny_closes(
    probe_mode: str,
    bpep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    """A deny or an undefined answer is a working PDP: the probe closes the circuit, and the request is denied."""
    await trip(client, bpep, fault_pdp, "close")
    clock.advance(SKIP_OPEN_S)
    fault_pdp.set(probe_mode)
    status, reason = await call(client, bpep)
    assert status == 403
    assert reason in {"policy_denied", "pdp_undefined"}
    assert_closed(await observe(client, bpep))
    assert upstream.seen == []


async def test_recovery_after_pdp_comes_back(
    bpep: RunningPep,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    await fault_pdp.apply("refuse")
    for _ in range(THRESHOLD):
        assert await call(client, bpep) == (403, "pdp_unreachable")
    assert_open(await observe(client, bpep))
    for _ in range(3):
        assert await call(client, bpep) == (403, "circuit_open")

    # Still down when the first probe goes out: reopened.
    clock.advance(SKIP_OPEN_S)
    assert await call(client, bpep) == (403, "pdp_unreachable")
    assert_open(await observe(client, bpep))

    # Back on the same port: the next probe closes the circuit and traffic flows.
    await fault_pdp.apply("allow")
    assert await call(client, bpep) == (403, "circuit_open")
    clock.advance(SKIP_OPEN_S)
    for _ in range(4):
        assert (await call(client, bpep))[0] == 200
    view = await observe(client, bpep)
    assert_closed(view)
    assert view.transitions == {"closed": 1, "open": 2, "half_open": 2}
    assert len(upstream.seen) == 4
    assert len(fault_pdp.requests) == 4


async def test_half_open_admits_exactly_one_probe_among_50(
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    clock: FakeClock,
) -> None:
    delay = 0.4
    bpep: RunningPep = await make_pep(breaker_config(timeout_ms=2000), clock=clock)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as client:
        await trip(client, bpep, fault_pdp, "status_500")
        assert_open(await observe(client, bpep))
        # Warm 50 connections so every request arrives at once, not after a connect.
        warm = await asyncio.gather(*(call(client, bpep) for _ in range(50)))
        assert set(warm) == {(403, "circuit_open")}
        asked = len(fault_pdp.requests)

        clock.advance(SKIP_OPEN_S)
        fault_pdp.set(Mode(delay=delay))  # a slow allow

        async def timed() -> tuple[int, str | None, float]:
            t0 = time.perf_counter()
            status, reason = await call(client, bpep)
            return status, reason, time.perf_counter() - t0

        async with asyncio.timeout(10):
            results = await asyncio.gather(*(timed() for _ in range(50)))

        allowed = [r for r in results if r[0] == 200]
        denied = [r for r in results if r[0] == 403]
        assert len(allowed) == 1
        assert len(denied) == 49
        assert {r[1] for r in denied} == {"circuit_open"}
        assert len(fault_pdp.requests) == asked + 1
        assert len(upstream.seen) == 1
        # The 49 were not kept waiting for the probe: each was answered before the slow PDP could answer.
        assert max(r[2] for r in denied) < delay
        assert allowed[0][2] >= delay
        view = await observe(client, bpep)
        assert_closed(view)
        assert view.transitions == {"closed": 1, "open": 1, "half_open": 1}


async def test_half_open_probes_setting_is_honoured(
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    def mutate(raw: dict[str, Any]) -> None:
        breaker_config(timeout_ms=2000)(raw)
        raw["pdp"]["breaker"]["half_open_probes"] = 3

    pep: RunningPep = await make_pep(mutate, clock=clock)
    await trip(client, pep, fault_pdp, "status_500")
    clock.advance(SKIP_OPEN_S)
    fault_pdp.set(Mode(delay=0.3))
    asked = len(fault_pdp.requests)
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(call(client, pep) for _ in range(20)))
    assert sorted(r[0] for r in results).count(200) == 3
    assert [r for r in results if r[0] != 200] == [(403, "circuit_open")] * 17
    assert len(fault_pdp.requests) == asked + 3
    assert len(upstream.seen) == 3
    assert_closed(await observe(client, pep))


async def test_concurrent_failures_open_once_and_late_results_do_not_flip_state(
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    clock: FakeClock,
) -> None:
    """Many failures in flight when the circuit opens count once; a slow allow started while closed and
    finishing while open does not close the circuit."""
    pep: RunningPep = await make_pep(breaker_config(timeout_ms=2000), clock=clock)
    async with aiohttp.ClientSession() as client:
        # One slow allow in flight, then failures trip the breaker while it is still waiting.
        fault_pdp.set(Mode(delay=0.5))
        slow = asyncio.ensure_future(call(client, pep))
        for _ in range(400):
            if fault_pdp.requests:
                break
            await asyncio.sleep(0.005)
        assert fault_pdp.requests
        fault_pdp.set("status_500")
        results = await asyncio.gather(*(call(client, pep) for _ in range(20)))
        assert all(r[0] == 403 for r in results)
        assert await slow == (200, None)
        view = await observe(client, pep)
        assert_open(view)
        assert view.transitions == {"closed": 0, "open": 1, "half_open": 0}
    assert len(upstream.seen) == 1
