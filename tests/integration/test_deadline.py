"""One decision deadline for all attempts together, and a bulkhead that denies instead of queueing.

Elapsed-time bounds here are correctness bounds (a deny must not wait for a hung PDP), kept generous so they hold
on a loaded machine; they are not benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningPep
from tests.support.fault_pdp import FaultPdp, Mode
from tests.support.observe import metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]


class TricklingPdp(FaultPdp):
    """Sends the status line and headers of an allow at once, then the body slowly (or never)."""

    def __init__(self, gap: float | None) -> None:
        super().__init__()
        self.gap = gap  # seconds between body bytes; None: stall after the headers

    async def _act(self, writer: asyncio.StreamWriter) -> bool:
        body = b'{"result":true}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        if self.gap is None:
            await asyncio.sleep(self.hang_limit)
            return False
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.gap)
        return True


BOUND_S = 1.0  # a deny for a 100 ms deadline must come well within this


def pdp_config(timeout_ms: int, retries: int = 1, max_in_flight: int | None = None) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"]["timeout_ms"] = timeout_ms
        raw["pdp"]["retries"] = retries
        if max_in_flight is not None:
            raw["pdp"]["max_in_flight"] = max_in_flight
        # Deadline behaviour is under test, not the breaker: keep it closed throughout.
        raw["pdp"]["breaker"] = {"failure_threshold": 1000, "open_ms": 1000, "half_open_probes": 1}

    return mutate


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        yield session


async def timed_get(client: aiohttp.ClientSession, url: str) -> tuple[int, str | None, float]:
    t0 = time.perf_counter()
    async with client.get(url) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason"), time.perf_counter() - t0


async def test_hung_pdp_is_a_timeout_within_the_deadline(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep: RunningPep = await make_pep(pdp_config(100))
    fault_pdp.set("hang")
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/hang")
    assert (status, reason) == (403, "pdp_timeout")
    assert elapsed < BOUND_S
    assert len(fault_pdp.requests) == 1
    (entry,) = await pep.log_entries()
    assert entry["attempts"] == 1
    # The deadline was used, not cut short, and not overrun by more than scheduling noise.
    assert 90 <= entry["pdp_ms"] < BOUND_S * 1000
    assert upstream.seen == []

    # The proxy stays responsive while the PDP hangs: a second request is also answered in time.
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/hang2")
    assert (status, reason, elapsed < BOUND_S) == (403, "pdp_timeout", True)
    async with client.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "pep_pdp_request_duration_seconds_count", outcome="timeout") == 2
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason="pdp_timeout") == 2
    assert upstream.seen == []


@pytest.mark.parametrize("retries", [3, 10])
async def test_retries_never_extend_past_the_deadline_when_hung(
    retries: int,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    pep: RunningPep = await make_pep(pdp_config(100, retries=retries))
    fault_pdp.set("hang")
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/hang")
    assert (status, reason) == (403, "pdp_timeout")
    assert elapsed < BOUND_S
    (entry,) = await pep.log_entries()
    assert 1 <= entry["attempts"] <= retries + 1
    assert entry["pdp_ms"] < BOUND_S * 1000
    assert len(fault_pdp.requests) == entry["attempts"]
    assert upstream.seen == []


# Slow retryable failures: each attempt eats part of the deadline; the retries must stop inside it.
SLOW_FAILURES: dict[str, Mode] = {
    "slow_503_30ms": Mode(status=503, body=b"busy", content_type="text/plain", delay=0.03),
    "slow_503_45ms": Mode(status=503, body=b"busy", content_type="text/plain", delay=0.045),
    "slow_503_70ms": Mode(status=503, body=b"busy", content_type="text/plain", delay=0.07),
    "slow_close_20ms": Mode(action="close", delay=0.02),
    "slow_close_60ms": Mode(action="close", delay=0.06),
    "fast_503": Mode(status=503, body=b"busy", content_type="text/plain"),
    "fast_close": Mode(action="close"),
}


@pytest.mark.parametrize("case", sorted(SLOW_FAILURES))
async def test_retries_stay_inside_one_deadline(
    case: str,
    make_pep: PepFactory,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    timeout_ms, retries = 100, 10
    pep: RunningPep = await make_pep(pdp_config(timeout_ms, retries=retries))
    fault_pdp.set(SLOW_FAILURES[case])
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/retry")
    assert status == 403
    assert reason in {"pdp_error_status", "pdp_unreachable", "pdp_timeout"}
    assert elapsed < BOUND_S
    (entry,) = await pep.log_entries()
    assert 1 <= entry["attempts"] <= retries + 1
    # All attempts together stay within the deadline (plus scheduling slack), never deadline x attempts.
    assert entry["pdp_ms"] <= timeout_ms + 50
    if entry["attempts"] < retries + 1:
        # Retrying stopped early: only because the deadline (or what is left of it) was too short.
        assert entry["pdp_ms"] >= timeout_ms * 0.3
    assert upstream.seen == []


async def test_slow_but_in_time_pdp_is_allowed(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    pep: RunningPep = await make_pep(pdp_config(250))
    fault_pdp.set(Mode(delay=0.05))
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/slow")
    assert (status, reason) == (200, None)
    assert elapsed >= 0.05
    (entry,) = await pep.log_entries()
    assert entry["decision"] == "allow"
    assert entry["pdp_ms"] >= 45
    assert len(upstream.seen) == 1
    assert upstream.seen[0].headers["x-pep-decision-id"] == entry["decision_id"]


async def test_allow_after_the_deadline_is_a_deny(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """An allow that arrives late is not an allow: the request is denied and never forwarded, not even later."""
    pep: RunningPep = await make_pep(pdp_config(100, retries=0))
    fault_pdp.set(Mode(delay=0.3))
    status, reason, elapsed = await timed_get(client, pep.url + "/tools/late")
    assert (status, reason) == (403, "pdp_timeout")
    assert elapsed < 0.3
    await asyncio.sleep(0.4)  # the late allow has now been sent by the PDP
    assert upstream.seen == []
    (entry,) = await pep.log_entries()
    assert entry["decision"] == "deny"


async def test_bulkhead_denies_overload_instead_of_queueing(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    timeout_ms = 600
    pep: RunningPep = await make_pep(pdp_config(timeout_ms, retries=1, max_in_flight=2))
    fault_pdp.set("hang")
    async with asyncio.timeout(5):
        first = [asyncio.ensure_future(timed_get(client, pep.url + f"/tools/b{i}")) for i in range(2)]
        for _ in range(400):
            if len(fault_pdp.requests) >= 2:
                break
            await asyncio.sleep(0.005)
        assert len(fault_pdp.requests) == 2
        async with client.get(pep.admin_url + "/metrics") as r:
            assert metric(await r.text(), "pep_pdp_in_flight") == 2
        rest = await asyncio.gather(*(timed_get(client, pep.url + f"/tools/c{i}") for i in range(3)))
        done = await asyncio.gather(*first)

    assert [(s, r) for s, r, _ in done] == [(403, "pdp_timeout")] * 2
    assert [(s, r) for s, r, _ in rest] == [(403, "pdp_overloaded")] * 3
    # Overload is answered at once, not after waiting for a slot.
    assert all(e < timeout_ms / 1000 / 2 for _, _, e in rest)
    assert len(fault_pdp.requests) == 2
    assert upstream.seen == []
    entries = await pep.log_entries()
    overloaded = [e for e in entries if e["reason"] == "pdp_overloaded"]
    assert len(overloaded) == 3
    assert all(e["attempts"] == 0 for e in overloaded)

    # Slots free again once the deadline passed: the next request is asked.
    fault_pdp.set("allow")
    status, reason, _ = await timed_get(client, pep.url + "/tools/after")
    assert (status, reason) == (200, None)
    async with client.get(pep.admin_url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "pep_pdp_in_flight") == 0
    assert metric(text, "pep_decisions_total", route="tools", decision="deny", reason="pdp_overloaded") == 3


async def test_bulkhead_five_concurrent_against_two_slots(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream, client: aiohttp.ClientSession
) -> None:
    """Five at once (no ordering help from the test): exactly two are asked, three are overloaded."""
    pep: RunningPep = await make_pep(pdp_config(500, retries=1, max_in_flight=2))
    fault_pdp.set("hang")
    async with asyncio.timeout(5):
        results = await asyncio.gather(*(timed_get(client, pep.url + f"/tools/{i}") for i in range(5)))
    reasons = sorted(str(r) for _, r, _ in results)
    assert reasons == ["pdp_overloaded"] * 3 + ["pdp_timeout"] * 2
    assert all(s == 403 and e < BOUND_S for s, _, e in results)
    assert len(fault_pdp.requests) == 2
    assert upstream.seen == []


@pytest.mark.parametrize("gap", [None, 0.02])
async def test_deadline_covers_a_body_that_trickles_or_stalls(
    gap: float | None,
    make_pep: PepFactory,
    upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """Headers of a 200 arrive at once, the allow body too slowly (15 bytes x 20 ms) or never: a timeout."""
    slow = TricklingPdp(gap)
    slow.hang_limit = 2.0
    await slow.start()
    try:

        def mutate(raw: dict[str, Any]) -> None:
            pdp_config(100, retries=3)(raw)
            raw["pdp"]["url"] = slow.url

        pep: RunningPep = await make_pep(mutate)
        status, reason, elapsed = await timed_get(client, pep.url + "/tools/trickle")
        assert (status, reason) == (403, "pdp_timeout")
        assert elapsed < BOUND_S
        (entry,) = await pep.log_entries()
        assert entry["attempts"] == 1
        assert len(slow.requests) == 1
        await asyncio.sleep(0.35)  # the trickled allow is complete by now: still nothing forwarded
        assert upstream.seen == []
    finally:
        await slow.stop()
