"""The core guarantee under chaos: thousands of mixed requests while the PDP flips between behaviours every few ms.

Invariant: no request reaches the upstream unless the decision log holds an allow for that exact request (same
request id, decision id, method, target and body bytes); every caller gets an answer; every deny carries a reason
from the closed set; and the counts of upstream requests, allow decisions and 200 answers agree.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from pep.decision import DENY_REASONS
from tests.conftest import RunningPep
from tests.support.fault_pdp import MODES, FaultPdp, Mode
from tests.support.observe import LOG_KEYS, metric
from tests.support.upstream import RecordingUpstream

PepFactory = Callable[..., Any]

TOTAL = 2000
WORKERS = 20
TIMEOUT_MS = 50
RUN_BOUND_S = 45.0

DENY_VALUES = frozenset(r.value for r in DENY_REASONS)

# Allows are weighted up so that plenty of traffic reaches the upstream while everything else goes on.
CHAOS: list[tuple[Mode, int]] = [
    (MODES["allow"], 6),
    (MODES["allow_object"], 3),
    (MODES["allow_with_header"], 2),
    (Mode(delay=0.01), 2),  # slow but in time
    (MODES["slow_allow"], 2),  # 50 ms: right at the deadline, allows racing the timeout
    (MODES["deny"], 2),
    (MODES["undefined"], 1),
    (MODES["status_503"], 1),
    (MODES["status_500"], 1),
    (MODES["status_500_allow"], 1),
    (MODES["not_json"], 1),
    (MODES["truncated"], 1),
    (MODES["duplicate_keys"], 1),
    (MODES["string_true"], 1),
    (MODES["close"], 1),
    (MODES["reset"], 1),
    (MODES["short_body"], 1),
    (MODES["hang"], 1),
]

PATHS = (
    "/tools/a",
    "/tools/b/c?x=1&y=2",
    "/tools",
    "/tools/search?q=%20z&q=2",
    "/tools/deep/er/path/",
    "/other/x",  # no route
    "/toolsx",  # not a whole-segment match: no route
)
METHODS = ("GET", "GET", "POST", "POST", "PUT", "DELETE", "PATCH")


@dataclass(frozen=True)
class Spec:
    rid: str
    method: str
    path: str
    body: bytes | None
    forge: bool  # also send a caller x-pep-decision-id, which must never reach the upstream


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def make_specs(rng: random.Random) -> list[Spec]:
    specs = []
    for i in range(TOTAL):
        method = rng.choice(METHODS)
        body = rng.randbytes(rng.choice((0, 1, 100, 5000, 40000))) if method in {"POST", "PUT", "PATCH"} else None
        specs.append(Spec(f"inv-{i:05d}", method, rng.choice(PATHS), body, rng.random() < 0.1))
    return specs


async def run_chaos(
    pep: RunningPep, fault_pdp: FaultPdp, specs: list[Spec], rng: random.Random
) -> tuple[dict[str, Answer], collections.Counter[int]]:
    answers: dict[str, Answer] = {}
    modes_used: collections.Counter[int] = collections.Counter()
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    stop = asyncio.Event()
    population = list(range(len(CHAOS)))
    weights = [w for _, w in CHAOS]

    async def flipper() -> None:
        while not stop.is_set():
            index = rng.choices(population, weights)[0]
            modes_used[index] += 1
            fault_pdp.set(CHAOS[index][0])
            await asyncio.sleep(rng.uniform(0.001, 0.008))

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                spec = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            headers = {"x-request-id": spec.rid}
            if spec.forge:
                headers["x-pep-decision-id"] = "forged-by-caller"
            async with session.request(spec.method, pep.url + spec.path, data=spec.body, headers=headers) as r:
                answers[spec.rid] = Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())

    connector = aiohttp.TCPConnector(limit=WORKERS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        flip = asyncio.ensure_future(flipper())
        try:
            async with asyncio.timeout(RUN_BOUND_S):
                # Any exception in a worker (a connection error, a hang) fails the test here.
                await asyncio.gather(*(worker(session) for _ in range(WORKERS)))
        finally:
            stop.set()
            await flip
    return answers, modes_used


async def test_no_upstream_byte_without_a_logged_in_time_allow(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"]["timeout_ms"] = TIMEOUT_MS
        raw["pdp"]["retries"] = 1
        # A low threshold and a short open period: the run goes through closed, open and half-open many times.
        raw["pdp"]["breaker"] = {"failure_threshold": 10, "open_ms": 20, "half_open_probes": 1}

    pep: RunningPep = await make_pep(mutate)
    fault_pdp.hang_limit = 1.0
    rng = random.Random(20240601)
    specs = make_specs(rng)
    by_rid = {s.rid: s for s in specs}

    answers, modes_used = await run_chaos(pep, fault_pdp, specs, rng)

    # Every request got an HTTP answer: an allow relayed from the upstream, or a deny.
    assert set(answers) == set(by_rid)
    statuses = collections.Counter(a.status for a in answers.values())
    assert set(statuses) <= {200, 403}, statuses

    entries = await pep.log_entries()
    for e in entries:
        assert set(e) >= LOG_KEYS, sorted(LOG_KEYS - set(e))
        assert e["decision"] in {"allow", "deny"}
        assert e["circuit"] in {"closed", "open", "half_open"}
    # One decision per request, under the caller's request id.
    log_by_rid = {e["request_id"]: e for e in entries}
    assert len(entries) == TOTAL
    assert set(log_by_rid) == set(by_rid)
    log_by_did = {e["decision_id"]: e for e in entries}
    assert len(log_by_did) == TOTAL

    # Every upstream request is backed by a logged allow for that same request, bytes and all.
    seen_dids: list[str] = []
    for got in upstream.seen:
        assert got.headers.getall("x-pep-decision-id", []) == [got.headers["x-pep-decision-id"]]
        did = got.headers["x-pep-decision-id"]
        assert did != "forged-by-caller"
        entry = log_by_did.get(did)
        assert entry is not None, f"upstream saw decision id {did!r} that the log never recorded"
        assert entry["decision"] == "allow"
        assert entry["reason"] == "allowed"
        rid = got.headers["x-request-id"]
        assert entry["request_id"] == rid
        spec = by_rid[rid]
        assert got.method == spec.method == entry["method"]
        assert got.target == spec.path
        assert got.body == (spec.body or b"")
        seen_dids.append(did)
    assert len(seen_dids) == len(set(seen_dids)), "one allow reached the upstream twice"

    allows = [e for e in entries if e["decision"] == "allow"]
    assert len(upstream.seen) == len(allows) == statuses[200]

    for rid, answer in answers.items():
        entry = log_by_rid[rid]
        if answer.status == 200:
            assert entry["decision"] == "allow"
            echo = orjson.loads(answer.body)
            assert {k.lower(): v for k, v in echo["headers"].items()}["x-pep-decision-id"] == entry["decision_id"]
            assert entry["decision_id"] in seen_dids
        else:
            assert answer.headers["x-pep-decision"] == "deny"
            reason = answer.headers["x-pep-reason"]
            assert reason in DENY_VALUES
            assert answer.headers["x-request-id"] == rid
            body = orjson.loads(answer.body)
            assert body["error"]["reason"] == reason
            assert body["error"]["request_id"] == rid
            assert entry["decision"] == "deny"
            assert entry["reason"] == reason
            assert entry["decision_id"] not in seen_dids

    reasons = collections.Counter(e["reason"] for e in entries)
    circuits = collections.Counter(e["circuit"] for e in entries)
    print(f"statuses={dict(statuses)} reasons={dict(reasons)} circuits={dict(circuits)} modes={len(modes_used)}")
    # The run was a real mix, not one long allow or one long outage.
    assert reasons["allowed"] > 0
    assert reasons["no_route"] > 0
    assert len(reasons) >= 5

    # Metrics agree with the log, and nothing is left counted as in flight.
    async with aiohttp.ClientSession() as session:
        async with session.get(pep.admin_url + "/metrics") as r:
            text = await r.text()
        assert metric(text, "pep_decisions_total") == TOTAL
        assert metric(text, "pep_decisions_total", decision="allow") == len(allows)
        for reason, count in reasons.items():
            if reason != "allowed":
                assert metric(text, "pep_decisions_total", decision="deny", reason=reason) == count
        assert metric(text, "pep_requests_in_flight") == 0
        assert metric(text, "pep_pdp_in_flight") == 0

        # After the storm, a healthy PDP gets traffic flowing again.
        fault_pdp.set("allow")
        before = len(upstream.seen)
        async with asyncio.timeout(5):
            while True:
                async with session.get(pep.url + "/tools/recovered") as r:
                    await r.read()
                    if r.status == 200:
                        break
                await asyncio.sleep(0.02)
        assert len(upstream.seen) == before + 1


async def test_callers_that_give_up_never_cause_an_unlogged_forward(
    make_pep: PepFactory, fault_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    """Callers abandon requests at random moments (while the PDP is asked, while forwarding): whatever the
    upstream still sees is backed by a logged allow, nothing stays counted in flight, and the breaker is never
    left stuck half-open by an abandoned probe."""

    def mutate(raw: dict[str, Any]) -> None:
        raw["pdp"]["timeout_ms"] = 80
        raw["pdp"]["retries"] = 1
        raw["pdp"]["breaker"] = {"failure_threshold": 5, "open_ms": 20, "half_open_probes": 1}
        raw["routes"][0]["strip_prefix"] = True  # /tools/slow?ms=30 reaches the upstream as /slow?ms=30

    pep: RunningPep = await make_pep(mutate)
    fault_pdp.hang_limit = 1.0
    rng = random.Random(7)
    in_time = Mode(delay=0.03)
    modes = [
        *[MODES["allow"]] * 4,
        in_time,
        in_time,
        MODES["slow_allow"],
        MODES["hang"],
        MODES["status_503"],
        MODES["close"],
    ]
    stop = asyncio.Event()
    abandoned = 0
    answered: dict[str, int] = {}

    async def flipper() -> None:
        while not stop.is_set():
            fault_pdp.set(rng.choice(modes))
            await asyncio.sleep(rng.uniform(0.002, 0.01))

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal abandoned
        rid = f"abandon-{i:04d}"
        path = rng.choice(("/tools/a", "/tools/slow?ms=30", "/tools/b"))
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.1)):
                async with session.get(pep.url + path, headers={"x-request-id": rid}) as r:
                    await r.read()
                    answered[rid] = r.status
        except TimeoutError:
            abandoned += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=30)) as session:
        flip = asyncio.ensure_future(flipper())
        try:
            async with asyncio.timeout(RUN_BOUND_S):
                sem = asyncio.Semaphore(30)

                async def bounded(i: int) -> None:
                    async with sem:
                        await one(session, i)

                await asyncio.gather(*(bounded(i) for i in range(600)))
        finally:
            stop.set()
            await flip

        print(f"abandoned={abandoned} answered={collections.Counter(answered.values())} seen={len(upstream.seen)}")
        assert abandoned > 0
        assert answered
        assert set(answered.values()) <= {200, 403}

        # Abandoned handlers wind down; nothing stays counted as in flight.
        async with asyncio.timeout(5):
            while True:
                async with session.get(pep.admin_url + "/metrics") as r:
                    text = await r.text()
                if metric(text, "pep_requests_in_flight") == 0 and metric(text, "pep_pdp_in_flight") == 0:
                    break
                await asyncio.sleep(0.02)

        entries = await pep.log_entries()
        by_did = {e["decision_id"]: e for e in entries}
        for got in upstream.seen:
            entry = by_did.get(got.headers["x-pep-decision-id"])
            assert entry is not None
            assert entry["decision"] == "allow"
            assert entry["request_id"] == got.headers["x-request-id"]
        for rid, status in answered.items():
            matching = [e for e in entries if e["request_id"] == rid]
            assert len(matching) == 1
            assert (matching[0]["decision"] == "allow") == (status == 200)

        # The PDP is healthy again: traffic flows (an abandoned probe must not leave the circuit stuck).
        fault_pdp.set("allow")
        async with asyncio.timeout(5):
            while True:
                async with session.get(pep.url + "/tools/recovered") as r:
                    await r.read()
                    if r.status == 200:
                        break
                await asyncio.sleep(0.03)
