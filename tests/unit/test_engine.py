"""pep.engine.Engine against a scripted fake PDP: deadline, retries, bulkhead, breaker, and the Allow mint."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import pep
from pep import decision
from pep.breaker import Breaker, State
from pep.config import BreakerConfig, PdpConfig
from pep.decision import Allow, Deny, Reason
from pep.engine import Check, Engine, Outcome
from pep.headers import obligation_forbidden
from pep.metrics import Metrics
from pep.pdp import ALLOWED, DENIED, NOT_ADMITTED, UNDEFINED, Failure, Pdp, Verdict, admitted
from pep.pdp.answer import malformed, status_failure

Answer = Verdict | Failure
Step = Answer | Callable[[], Awaitable[Answer]]

UNREACHABLE = Failure(Reason.PDP_UNREACHABLE, "unreachable", True, "ConnectionRefusedError")
DOCUMENT: dict[str, Any] = {"version": "pep/v1", "request": {"method": "GET", "path": "/tools/search"}}


def breaker_of(engine: Engine) -> Breaker:
    assert engine.breaker is not None
    return engine.breaker


class FakePdp(Pdp):
    """Answers from a script, one step per call; the last step repeats. Records every call that goes out: like a
    remote PDP, it asks the breaker (`admitted`) right before, and makes no call when it says no."""

    remote = True

    def __init__(self, *script: Step) -> None:
        assert script
        self.script = script
        self.calls: list[tuple[dict[str, Any], str]] = []
        self.closed = False

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        if not admitted():
            return NOT_ADMITTED
        self.calls.append((document, request_id))
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        if isinstance(step, Verdict | Failure):
            return step
        return await step()

    async def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hang() -> Callable[[], Awaitable[Answer]]:
    async def step() -> Answer:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return step


def after(seconds: float, answer: Answer) -> Callable[[], Awaitable[Answer]]:
    async def step() -> Answer:
        await asyncio.sleep(seconds)
        return answer

    return step


def gated(gate: asyncio.Event, answer: Answer) -> Callable[[], Awaitable[Answer]]:
    async def step() -> Answer:
        await gate.wait()
        return answer

    return step


def raising(exc: Exception) -> Callable[[], Awaitable[Answer]]:
    async def step() -> Answer:
        raise exc

    return step


def make_engine(
    pdp: Pdp,
    *,
    timeout_ms: int = 250,
    retries: int = 1,
    max_in_flight: int = 512,
    threshold: int = 5,
    open_ms: int = 5000,
    probes: int = 1,
    clock: Callable[[], float] | None = None,
) -> Engine:
    config = PdpConfig(
        kind="opa",
        url="http://127.0.0.1:8181/v1/data/pep/authz",
        timeout_ms=timeout_ms,
        retries=retries,
        max_in_flight=max_in_flight,
        breaker=BreakerConfig(threshold, open_ms, probes),
    )
    metrics = Metrics(("tools",))
    if clock is None:
        return Engine(pdp, config, metrics)
    return Engine(pdp, config, metrics, clock=clock)


def check(request_id: str = "req-1", method: str = "POST", url: str = "http://up:9000/tools/search?q=1") -> Check:
    return Check(
        document=DOCUMENT,
        request_id=request_id,
        route="tools",
        method=method,
        upstream_url=url,
        obligation_forbidden=obligation_forbidden(None),
    )


def circuit(engine: Engine) -> State:
    """The circuit state, read through a call so that mypy does not narrow the property between reads."""
    return engine.circuit


def denied(outcome: Outcome) -> Deny:
    assert isinstance(outcome.decision, Deny), outcome
    return outcome.decision


def sample(engine: Engine, name: str, labels: dict[str, str] | None = None) -> float:
    value = engine._metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def wait_for_calls(pdp: FakePdp, n: int) -> None:
    for _ in range(1000):
        if len(pdp.calls) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the PDP was called {len(pdp.calls)} times, expected {n}")


async def open_circuit(engine: Engine, pdp_calls: FakePdp) -> None:
    for _ in range(engine.config.breaker.failure_threshold):
        denied(await engine.decide(check()))
    assert circuit(engine) is State.OPEN
    assert pdp_calls.calls


# --- allow and deny -------------------------------------------------------------------------------------------


async def test_allow_is_bound_to_the_exact_request() -> None:
    pdp = FakePdp(ALLOWED)
    engine = make_engine(pdp)
    outcome = await engine.decide(check("req-42", "DELETE", "http://up:9000/tools/x?y=%41"))
    allow = outcome.decision
    assert isinstance(allow, Allow)
    assert allow.request_id == "req-42"
    assert allow.method == "DELETE"
    assert allow.upstream_url == "http://up:9000/tools/x?y=%41"
    assert allow.route == "tools"
    assert allow.headers == ()
    assert re.fullmatch(r"[0-9a-f]{32}", allow.decision_id)
    assert outcome.attempts == 1
    assert outcome.pdp_ms is not None
    assert outcome.pdp_ms >= 0
    assert pdp.calls == [(DOCUMENT, "req-42")]
    assert engine.in_flight == 0


async def test_each_decision_has_its_own_id() -> None:
    engine = make_engine(FakePdp(ALLOWED, DENIED))
    first, second = await engine.decide(check()), await engine.decide(check())
    assert first.decision.decision_id != second.decision.decision_id


async def test_allow_carries_vetted_obligation_headers_and_note() -> None:
    headers = (("x-tenant", "acme"), ("X-Policy", "v7"))
    engine = make_engine(FakePdp(Verdict(True, Reason.ALLOWED, headers, "rule 7")))
    outcome = await engine.decide(check())
    assert isinstance(outcome.decision, Allow)
    assert outcome.decision.headers == headers
    assert outcome.note == "rule 7"


async def test_policy_deny() -> None:
    pdp = FakePdp(Verdict(False, Reason.POLICY_DENIED, note="no email tools"))
    outcome = await make_engine(pdp).decide(check())
    deny = denied(outcome)
    assert deny.reason is Reason.POLICY_DENIED
    assert deny.detail == "no email tools"
    assert outcome.note == "no email tools"
    assert outcome.attempts == 1


async def test_undefined_is_a_deny() -> None:
    outcome = await make_engine(FakePdp(UNDEFINED)).decide(check())
    assert denied(outcome).reason is Reason.PDP_UNDEFINED


@pytest.mark.parametrize(
    "failure",
    [
        UNREACHABLE,
        status_failure(500),
        status_failure(503),
        status_failure(404),
        status_failure(302),
        malformed("result is a str"),
        Failure(Reason.PDP_TIMEOUT, "timeout", False, "slow"),
    ],
)
async def test_failure_is_a_deny_with_its_reason(failure: Failure) -> None:
    outcome = await make_engine(FakePdp(failure), retries=0).decide(check())
    deny = denied(outcome)
    assert deny.reason is failure.reason
    assert deny.detail == failure.detail
    assert outcome.attempts == 1


@pytest.mark.parametrize(
    "headers",
    [
        (("x-ok", "1"), ("Host", "evil.example")),
        (("Content-Length", "0"),),
        (("transfer-encoding", "chunked"),),
        (("connection", "close"),),
        (("x-request-id", "forged"),),
        (("x-pep-decision-id", "forged"),),
        (("x-forwarded-for", "10.0.0.1"),),
        (("x-ok", "a\r\nx-injected: 1"),),
        (("bad name", "1"),),
    ],
)
async def test_forbidden_obligations_deny(headers: tuple[tuple[str, str], ...]) -> None:
    outcome = await make_engine(FakePdp(Verdict(True, Reason.ALLOWED, headers))).decide(check())
    deny = denied(outcome)
    assert deny.reason is Reason.OBLIGATION_UNSUPPORTED
    assert deny.detail


async def test_route_credential_header_is_a_forbidden_obligation() -> None:
    engine = make_engine(FakePdp(Verdict(True, Reason.ALLOWED, (("x-api-key", "k"),))))
    c = check()
    guarded = Check(c.document, c.request_id, c.route, c.method, c.upstream_url, obligation_forbidden("X-Api-Key"))
    assert denied(await engine.decide(guarded)).reason is Reason.OBLIGATION_UNSUPPORTED


# --- retries --------------------------------------------------------------------------------------------------


async def test_retryable_failure_is_retried_once_by_default() -> None:
    pdp = FakePdp(UNREACHABLE, ALLOWED)
    outcome = await make_engine(pdp).decide(check())
    assert isinstance(outcome.decision, Allow)
    assert outcome.attempts == 2
    assert len(pdp.calls) == 2


@pytest.mark.parametrize("retries", [0, 1, 3])
async def test_retries_stop_after_the_configured_count(retries: int) -> None:
    pdp = FakePdp(status_failure(503))
    outcome = await make_engine(pdp, retries=retries, timeout_ms=1000).decide(check())
    assert denied(outcome).reason is Reason.PDP_ERROR_STATUS
    assert outcome.attempts == retries + 1
    assert len(pdp.calls) == retries + 1


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_retryable_statuses(status: int) -> None:
    pdp = FakePdp(status_failure(status), DENIED)
    outcome = await make_engine(pdp).decide(check())
    assert denied(outcome).reason is Reason.POLICY_DENIED
    assert outcome.attempts == 2


@pytest.mark.parametrize(
    "first",
    [DENIED, UNDEFINED, status_failure(400), status_failure(500), status_failure(404), malformed("duplicate key")],
)
async def test_no_retry_after_a_well_formed_answer_or_a_non_retryable_failure(first: Answer) -> None:
    pdp = FakePdp(first, ALLOWED)
    outcome = await make_engine(pdp, retries=3).decide(check())
    assert isinstance(outcome.decision, Deny)
    assert outcome.attempts == 1
    assert len(pdp.calls) == 1


async def test_no_retry_when_the_remaining_budget_is_too_small() -> None:
    pdp = FakePdp(after(0.12, UNREACHABLE), ALLOWED)
    outcome = await make_engine(pdp, timeout_ms=200, retries=3).decide(check())
    assert denied(outcome).reason is Reason.PDP_UNREACHABLE
    assert outcome.attempts == 1
    assert len(pdp.calls) == 1


async def test_a_slow_retry_is_cut_by_the_one_deadline() -> None:
    pdp = FakePdp(UNREACHABLE, hang())
    started = time.monotonic()
    outcome = await make_engine(pdp, timeout_ms=50, retries=1).decide(check())
    assert denied(outcome).reason is Reason.PDP_TIMEOUT
    assert outcome.attempts == 2
    assert time.monotonic() - started < 1.0


async def test_a_hung_pdp_times_out() -> None:
    pdp = FakePdp(hang())
    engine = make_engine(pdp, timeout_ms=50)
    started = time.monotonic()
    outcome = await engine.decide(check())
    elapsed = time.monotonic() - started
    assert denied(outcome).reason is Reason.PDP_TIMEOUT
    assert outcome.attempts == 1  # a timeout leaves no budget to retry in
    assert 0.04 <= elapsed < 1.0
    assert breaker_of(engine).failures == 1
    assert engine.in_flight == 0
    assert sample(engine, "pep_pdp_request_duration_seconds_count", {"outcome": "timeout"}) == 1


def test_an_engine_moved_to_another_loop_keeps_its_deadline() -> None:
    """The engine keeps the loop its decisions ran on: on another loop (a new one, or uvloop after asyncio) it
    must find the new one, or a hung PDP would never be cut off there."""
    import uvloop

    engine = make_engine(FakePdp(hang()), timeout_ms=50, retries=0)
    for runner in (asyncio.run, asyncio.run, uvloop.run):
        outcome = runner(engine.decide(check()))
        assert denied(outcome).reason is Reason.PDP_TIMEOUT
        assert engine.in_flight == 0


async def test_a_late_allow_is_a_timeout() -> None:
    pdp = FakePdp(after(0.2, ALLOWED))
    outcome = await make_engine(pdp, timeout_ms=50).decide(check())
    assert denied(outcome).reason is Reason.PDP_TIMEOUT


async def test_pdp_outcomes_are_observed() -> None:
    engine = make_engine(FakePdp(UNREACHABLE, status_failure(503), DENIED, ALLOWED), retries=1, timeout_ms=1000)
    await engine.decide(check())  # unreachable, then 503
    await engine.decide(check())  # deny
    await engine.decide(check())  # allow
    count = "pep_pdp_request_duration_seconds_count"
    assert sample(engine, count, {"outcome": "unreachable"}) == 1
    assert sample(engine, count, {"outcome": "error"}) == 1
    assert sample(engine, count, {"outcome": "ok"}) == 2
    assert sample(engine, count, {"outcome": "timeout"}) == 0


# --- bulkhead -------------------------------------------------------------------------------------------------


async def test_bulkhead_denies_at_once_without_calling_the_pdp() -> None:
    gate = asyncio.Event()
    pdp = FakePdp(gated(gate, ALLOWED))
    engine = make_engine(pdp, max_in_flight=2, timeout_ms=5000)
    blocked = [asyncio.create_task(engine.decide(check())) for _ in range(2)]
    await wait_for_calls(pdp, 2)
    assert engine.in_flight == 2
    assert sample(engine, "pep_pdp_in_flight") == 2
    outcome = await asyncio.wait_for(engine.decide(check()), timeout=0.05)
    assert denied(outcome).reason is Reason.PDP_OVERLOADED
    assert outcome.attempts == 0
    assert outcome.pdp_ms is None
    assert len(pdp.calls) == 2
    gate.set()
    for task in blocked:
        assert isinstance((await task).decision, Allow)
    assert engine.in_flight == 0
    assert isinstance((await engine.decide(check())).decision, Allow)


async def test_overload_does_not_use_up_a_probe() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    pdp = FakePdp(UNREACHABLE, gated(gate, ALLOWED))
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, max_in_flight=1, clock=clock)
    denied(await engine.decide(check()))
    assert circuit(engine) is State.OPEN
    clock.now += 1.0
    probe = asyncio.create_task(engine.decide(check()))
    await wait_for_calls(pdp, 2)
    assert denied(await engine.decide(check())).reason is Reason.PDP_OVERLOADED
    gate.set()
    assert isinstance((await probe).decision, Allow)
    assert circuit(engine) is State.CLOSED


# --- circuit breaker ------------------------------------------------------------------------------------------


async def test_circuit_opens_after_the_threshold_and_denies_without_calling_the_pdp() -> None:
    clock = FakeClock()
    pdp = FakePdp(status_failure(500))
    engine = make_engine(pdp, retries=0, threshold=3, open_ms=5000, clock=clock)
    for _ in range(2):
        assert denied(await engine.decide(check())).reason is Reason.PDP_ERROR_STATUS
    assert circuit(engine) is State.CLOSED
    assert denied(await engine.decide(check())).reason is Reason.PDP_ERROR_STATUS
    assert circuit(engine) is State.OPEN
    assert sample(engine, "pep_circuit_state") == 2
    assert sample(engine, "pep_circuit_transitions_total", {"to": "open"}) == 1
    for _ in range(5):
        outcome = await engine.decide(check())
        assert denied(outcome).reason is Reason.CIRCUIT_OPEN
        assert outcome.attempts == 0
    assert len(pdp.calls) == 3


async def test_retries_of_one_decision_are_one_breaker_failure() -> None:
    pdp = FakePdp(UNREACHABLE)
    engine = make_engine(pdp, retries=2, threshold=2, timeout_ms=1000)
    await engine.decide(check())
    assert len(pdp.calls) == 3
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 1


async def test_well_formed_answers_are_breaker_successes() -> None:
    pdp = FakePdp(UNREACHABLE, DENIED, malformed("x"), UNDEFINED, status_failure(500), ALLOWED)
    engine = make_engine(pdp, retries=0, threshold=2)
    for _ in range(10):
        await engine.decide(check())
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 0


async def test_malformed_answers_are_breaker_failures() -> None:
    pdp = FakePdp(malformed("result is a str"))
    engine = make_engine(pdp, retries=0, threshold=2)
    await engine.decide(check())
    await engine.decide(check())
    assert circuit(engine) is State.OPEN


async def test_probe_success_closes_the_circuit() -> None:
    clock = FakeClock()
    pdp = FakePdp(UNREACHABLE, UNREACHABLE, ALLOWED)
    engine = make_engine(pdp, retries=0, threshold=2, open_ms=1000, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 0.999
    assert denied(await engine.decide(check())).reason is Reason.CIRCUIT_OPEN
    clock.now += 0.001
    assert circuit(engine) is State.HALF_OPEN
    assert sample(engine, "pep_circuit_state") == 1
    assert isinstance((await engine.decide(check())).decision, Allow)
    assert circuit(engine) is State.CLOSED
    assert sample(engine, "pep_circuit_state") == 0
    for to in ("open", "half_open", "closed"):
        assert sample(engine, "pep_circuit_transitions_total", {"to": to}) == 1


async def test_half_open_denies_beyond_the_probes_at_once() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    pdp = FakePdp(UNREACHABLE, gated(gate, DENIED))
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, probes=1, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    probe = asyncio.create_task(engine.decide(check()))
    await wait_for_calls(pdp, 2)
    for _ in range(3):
        outcome = await asyncio.wait_for(engine.decide(check()), timeout=0.05)
        assert denied(outcome).reason is Reason.CIRCUIT_OPEN
    assert len(pdp.calls) == 2
    gate.set()
    assert denied(await probe).reason is Reason.POLICY_DENIED  # a deny is a well-formed answer: success
    assert circuit(engine) is State.CLOSED


async def test_failed_probe_reopens() -> None:
    clock = FakeClock()
    pdp = FakePdp(status_failure(503))
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    assert denied(await engine.decide(check())).reason is Reason.PDP_ERROR_STATUS
    assert circuit(engine) is State.OPEN
    assert denied(await engine.decide(check())).reason is Reason.CIRCUIT_OPEN
    assert len(pdp.calls) == 2


async def test_timed_out_probe_reopens() -> None:
    clock = FakeClock()
    pdp = FakePdp(UNREACHABLE, hang())
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, timeout_ms=30, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    assert denied(await engine.decide(check())).reason is Reason.PDP_TIMEOUT
    assert circuit(engine) is State.OPEN


async def test_a_cancelled_probe_gives_its_place_to_the_next_request() -> None:
    """Its caller went away: that says nothing about the PDP, so it neither reopens the circuit (any caller could
    keep it open by hanging up on every probe) nor leaves it stuck half-open with its only probe gone."""
    clock = FakeClock()
    pdp = FakePdp(UNREACHABLE, hang(), ALLOWED)
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, timeout_ms=10_000, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    probe = asyncio.create_task(engine.decide(check()))
    await wait_for_calls(pdp, 2)
    assert circuit(engine) is State.HALF_OPEN
    assert denied(await engine.decide(check())).reason is Reason.CIRCUIT_OPEN  # the one probe is out
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert circuit(engine) is State.HALF_OPEN
    assert engine.in_flight == 0
    assert isinstance((await engine.decide(check())).decision, Allow)  # the next request is the probe
    assert circuit(engine) is State.CLOSED


async def test_cancelled_call_while_closed_is_not_a_pdp_failure() -> None:
    pdp = FakePdp(hang())
    engine = make_engine(pdp, threshold=1, timeout_ms=10_000)
    task = asyncio.create_task(engine.decide(check()))
    await wait_for_calls(pdp, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert circuit(engine) is State.CLOSED
    assert engine.in_flight == 0


async def test_a_caller_cancelled_as_the_deadline_passes_stays_cancelled() -> None:
    """The deadline and the caller's cancellation land together: the caller's wins (as with asyncio.timeout),
    the request is not turned into a `pdp_timeout` answer nobody reads, and the PDP is not blamed."""

    async def cancelled_then_late() -> Answer:
        task = asyncio.current_task()
        assert task is not None
        time.sleep(0.03)  # noqa: ASYNC251 - the PEP held up past the 10 ms deadline: its timer is due...
        await asyncio.sleep(0)  # ...and runs right after this step
        task.cancel()  # the caller goes away in the same turn of the loop
        await asyncio.sleep(0)
        raise AssertionError("unreachable")

    pdp = FakePdp(cancelled_then_late)
    engine = make_engine(pdp, retries=0, threshold=1, timeout_ms=10)
    with pytest.raises(asyncio.CancelledError):
        await engine.decide(check())
    assert circuit(engine) is State.CLOSED
    assert engine.in_flight == 0


async def test_a_deadline_swallowed_by_the_pdp_client_leaves_no_cancel_behind() -> None:
    """A client that catches the deadline's cancellation and answers anyway: the late answer is a denial, and the
    request's task carries no leftover cancel request into what it does next."""

    async def swallowing() -> Answer:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return ALLOWED
        raise AssertionError("unreachable")

    engine = make_engine(FakePdp(swallowing), retries=0, timeout_ms=10)
    assert denied(await engine.decide(check())).reason is Reason.PDP_TIMEOUT
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # would raise CancelledError if the deadline's cancel were still pending


async def test_an_exception_in_a_probe_propagates_and_gives_the_probe_back() -> None:
    """A bug in the PEP is the PEP's problem (`internal_error` for that request), not the PDP's."""
    clock = FakeClock()
    pdp = FakePdp(UNREACHABLE, raising(RuntimeError("bug")), ALLOWED)
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    with pytest.raises(RuntimeError, match="bug"):
        await engine.decide(check())
    assert circuit(engine) is State.HALF_OPEN
    assert engine.in_flight == 0
    assert isinstance((await engine.decide(check())).decision, Allow)
    assert circuit(engine) is State.CLOSED


# --- only the PDP's own failures count ---------------------------------------------------------------------------

AMBIGUOUS = Failure(Reason.REQUEST_AMBIGUOUS, "unsent", False, "the policy input cannot be sent")
UNFRAMED = Failure(Reason.INTERNAL_ERROR, "unsent", False, "the PDP request cannot be framed")
MAPPED_TO_NOTHING = Verdict(False, Reason.PDP_UNDEFINED, note="mapping: resource.id maps to nothing usable")


class UnbuildablePdp(FakePdp):
    """Requests whose `request_id` starts with `bad` cannot be built: refused before anything is sent, as the real
    PDP clients do (pep/pdp `encode`, a mapping that resolves to nothing, a header that cannot be framed)."""

    def __init__(self, refusal: Verdict | Failure, *script: Step) -> None:
        super().__init__(*script)
        self.refusal = refusal

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        if request_id.startswith("bad"):
            return self.refusal
        return await super().ask(document, request_id)


@pytest.mark.parametrize("refusal", [AMBIGUOUS, UNFRAMED, MAPPED_TO_NOTHING], ids=lambda r: r.reason.value)
async def test_requests_that_cannot_be_built_never_open_the_circuit(refusal: Verdict | Failure) -> None:
    pdp = UnbuildablePdp(refusal, ALLOWED)
    engine = make_engine(pdp, retries=1, threshold=2)
    for _ in range(10):
        outcome = await engine.decide(check("bad-1"))
        assert denied(outcome).reason is refusal.reason
        assert (outcome.attempts, outcome.pdp_ms) == (0, None)  # the PDP was not asked
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 0
    assert pdp.calls == []
    assert sample(engine, "pep_pdp_request_duration_seconds_count", {"outcome": "error"}) == 0
    assert isinstance((await engine.decide(check("good-1"))).decision, Allow)


# A call the breaker admitted that then never went out: the AuthZEN client admits a decision before it waits for
# a shared discovery, whose own failure it passes on; a connection the server closed before the first byte.
UNSENT_AFTER_ADMISSION = [
    UNFRAMED,
    Failure(Reason.PDP_UNREACHABLE, "unsent", False, "discovery: the circuit opened before the call went out"),
]


class AdmittedThenUnsentPdp(FakePdp):
    """Asks the breaker (`admitted`) as a call is about to go out, then sends nothing and fails."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(ALLOWED)
        self.failure = failure

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        if request_id.startswith("bad"):
            return self.failure if admitted() else NOT_ADMITTED
        return await super().ask(document, request_id)


@pytest.mark.parametrize("failure", UNSENT_AFTER_ADMISSION, ids=lambda f: f.reason.value)
async def test_a_call_admitted_but_never_sent_is_denied_alone_and_not_the_breakers(failure: Failure) -> None:
    """It used to raise (no `unsent` series to observe the PDP's time in): an internal error for each caller."""
    pdp = AdmittedThenUnsentPdp(failure)
    engine = make_engine(pdp, retries=1, threshold=2)
    for _ in range(5):
        outcome = await engine.decide(check("bad-1"))
        assert denied(outcome).reason is failure.reason
        assert (outcome.attempts, outcome.pdp_ms) == (0, None)  # the PDP was not asked
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 0
    assert sample(engine, "pep_pdp_request_duration_seconds_count", {"outcome": "error"}) == 0
    assert isinstance((await engine.decide(check("good-1"))).decision, Allow)


async def _half_open_left_to_the_next_request(pdp: FakePdp, reason: Reason) -> None:
    """`pdp` answers the requests named `bad-*` with what denies them `reason` and counts for neither side of the
    breaker, then fails, then allows: requests named `bad-*` in a half-open period deny alone and leave the probe
    to the next request, which decides whether the circuit closes or opens again."""
    clock = FakeClock()
    engine = make_engine(pdp, retries=0, threshold=1, open_ms=1000, clock=clock)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    for _ in range(5):
        assert denied(await engine.decide(check("bad-1"))).reason is reason
        assert circuit(engine) is State.HALF_OPEN  # the probe's place goes to the next request
    assert denied(await engine.decide(check("good-1"))).reason is Reason.PDP_UNREACHABLE  # a real probe fails
    assert circuit(engine) is State.OPEN
    clock.now += 1.0
    assert denied(await engine.decide(check("bad-2"))).reason is reason
    assert isinstance((await engine.decide(check("good-2"))).decision, Allow)
    assert circuit(engine) is State.CLOSED


@pytest.mark.parametrize("refusal", [AMBIGUOUS, UNFRAMED, MAPPED_TO_NOTHING], ids=lambda r: r.reason.value)
async def test_requests_that_cannot_be_built_neither_close_nor_reopen_a_half_open_circuit(
    refusal: Verdict | Failure,
) -> None:
    """One per half-open period used to keep the circuit open (a failure) or close it on a dead PDP (a success):
    now such a request is denied alone and leaves the probe to the next request."""
    await _half_open_left_to_the_next_request(
        UnbuildablePdp(refusal, UNREACHABLE, UNREACHABLE, ALLOWED), refusal.reason
    )


def waiting(gate: asyncio.Event, answer: Answer) -> Callable[[], Awaitable[Answer]]:
    """A step that waits before its call goes out (as for a pool connection or a discovery), then asks the breaker."""

    async def step() -> Answer:
        await gate.wait()
        if not admitted():
            return NOT_ADMITTED
        return answer

    return step


def in_flight(gate: asyncio.Event, answer: Answer) -> Callable[[], Awaitable[Answer]]:
    """A step whose call goes out at once (the breaker is asked first) and is answered when `gate` is set."""

    async def step() -> Answer:
        if not admitted():
            return NOT_ADMITTED
        await gate.wait()
        return answer

    return step


class WaitingPdp(FakePdp):
    """Like FakePdp, but a step may wait before the breaker is asked (`waiting`): no call is recorded for it."""

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        self.calls.append((document, request_id))
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        if isinstance(step, Verdict | Failure):
            return step if admitted() else NOT_ADMITTED
        return await step()


async def test_a_call_that_waited_while_the_circuit_opened_is_not_made() -> None:
    """Admitted while closed, the call waits; meanwhile other calls fail and open the circuit. When it could go out,
    it is refused (`circuit_open`, no PDP call), and it is not counted either way."""
    clock = FakeClock()
    gate = asyncio.Event()
    sent: list[str] = []

    async def refused_or_sent() -> Answer:
        await gate.wait()
        if not admitted():
            return NOT_ADMITTED
        sent.append("call")
        return ALLOWED

    pdp = WaitingPdp(refused_or_sent, UNREACHABLE)
    engine = make_engine(pdp, retries=0, threshold=2, open_ms=1000, clock=clock)
    slow = asyncio.create_task(engine.decide(check("waits")))
    await wait_for_calls(pdp, 1)
    for _ in range(2):
        assert denied(await engine.decide(check())).reason is Reason.PDP_UNREACHABLE
    assert circuit(engine) is State.OPEN
    clock.now += 0.25
    gate.set()
    outcome = await slow
    assert denied(outcome).reason is Reason.CIRCUIT_OPEN
    assert outcome.attempts == 0
    assert outcome.pdp_ms == 250.0  # how long it waited: the denial came after the circuit opened
    assert sent == []
    assert circuit(engine) is State.OPEN


async def test_a_waiting_call_does_not_take_or_spoil_the_probe() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    pdp = WaitingPdp(waiting(gate, ALLOWED), UNREACHABLE, UNREACHABLE, in_flight(gate, ALLOWED))
    engine = make_engine(pdp, retries=0, threshold=2, open_ms=1000, clock=clock)
    slow = asyncio.create_task(engine.decide(check("waits")))
    await wait_for_calls(pdp, 1)
    await open_circuit(engine, pdp)
    clock.now += 1.0
    probe = asyncio.create_task(engine.decide(check("probe")))
    await wait_for_calls(pdp, 4)
    assert denied(await engine.decide(check())).reason is Reason.CIRCUIT_OPEN  # the probe is out
    gate.set()
    assert denied(await slow).reason is Reason.CIRCUIT_OPEN  # half-open, and it is no probe
    assert isinstance((await probe).decision, Allow)
    assert circuit(engine) is State.CLOSED


async def test_no_retry_once_the_circuit_has_opened() -> None:
    """The retry of a failed call is a new call: after the circuit opened it is not made, and the first failure
    stands (the decision began before the opening)."""
    clock = FakeClock()
    gate = asyncio.Event()
    pdp = WaitingPdp(in_flight(gate, UNREACHABLE), UNREACHABLE, UNREACHABLE, ALLOWED)
    engine = make_engine(pdp, retries=1, threshold=2, open_ms=1000, timeout_ms=10_000, clock=clock)
    first = asyncio.create_task(engine.decide(check("first")))
    await wait_for_calls(pdp, 1)
    engine._retries = 0  # the other decisions fail at once
    for _ in range(2):
        denied(await engine.decide(check()))
    assert circuit(engine) is State.OPEN
    engine._retries = 1
    calls = len(pdp.calls)
    gate.set()
    outcome = await first
    assert denied(outcome).reason is Reason.PDP_UNREACHABLE
    assert outcome.attempts == 1
    assert len(pdp.calls) == calls + 1  # the retry reached the gate and went no further


async def test_a_deadline_the_pep_was_too_held_up_to_notice_is_no_pdp_failure() -> None:
    """The PEP's own process stalled past the deadline (its timer fired half a deadline late or more): denied
    `pdp_timeout` all the same, but not counted against the PDP, whose answer may be sitting unread. A deadline
    noticed on time still is a failure."""
    clock = FakeClock()

    def stalled() -> Callable[[], Awaitable[Answer]]:
        async def step() -> Answer:
            if not admitted():
                return NOT_ADMITTED
            clock.now += 1.0  # the process was not running for a second
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        return step

    async def answered_while_stalled() -> Answer:
        clock.now += 1.0  # the answer was there, but read a second late
        return ALLOWED

    for step in (stalled(), answered_while_stalled):
        engine = make_engine(FakePdp(step), retries=0, threshold=1, timeout_ms=30, clock=clock)
        for _ in range(3):
            outcome = await engine.decide(check())
            assert denied(outcome).reason is Reason.PDP_TIMEOUT
            assert denied(outcome).detail == "decision deadline passed while the PEP was held up"
            assert outcome.attempts == 1
        assert circuit(engine) is State.CLOSED
    on_time = FakePdp(hang())
    engine = make_engine(on_time, retries=0, threshold=1, timeout_ms=30, clock=clock)
    assert denied(await engine.decide(check())).reason is Reason.PDP_TIMEOUT
    assert circuit(engine) is State.OPEN


async def test_a_decision_is_dated_when_the_engine_takes_it_up_and_pdp_ms_counts_from_then() -> None:
    """The decision log's `time` and `pdp_ms` come from one instant, so the log shows when a PDP call could
    start and when its result was known (the soak judges the breaker by them)."""
    clock = FakeClock()

    async def takes_a_while() -> Answer:
        clock.now += 0.04
        return ALLOWED

    engine = make_engine(FakePdp(takes_a_while), clock=clock)
    before = time.time()
    outcome = await engine.decide(check())
    assert outcome.started is not None
    assert before <= outcome.started <= time.time()
    assert outcome.pdp_ms == 40.0
    overloaded = await make_engine(FakePdp(ALLOWED), max_in_flight=0).decide(check())
    assert overloaded.started is not None


# --- batches: bounded exchanges, counted against max_in_flight, one breaker report ---------------------------


class GatePdp(Pdp):
    """Holds the documents marked `hold` until `gate` opens (counting them while open), fails those marked `fail`,
    answers the others at once. Like a remote PDP, it asks the breaker (`admitted`) as each call goes out."""

    def __init__(self, remote: bool = True) -> None:
        self.remote = remote
        self.gate = asyncio.Event()
        self.open = 0
        self.most_open = 0
        self.asked: list[str] = []

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        if not admitted():
            return NOT_ADMITTED
        self.asked.append(request_id)
        if document.get("fail"):
            return UNREACHABLE
        if not document.get("hold"):
            return ALLOWED
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.gate.wait()
            return ALLOWED
        finally:
            self.open -= 1

    async def close(self) -> None:
        return None


def batch(count: int, hold: bool = True, request_id: str = "batch-1") -> Check:
    docs = [{**DOCUMENT, "hold": hold, "index": i} for i in range(count)]
    return check(request_id).with_documents(docs[0], tuple(docs[1:]))


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (bounded: a test that waits forever is a failure)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.mark.parametrize(
    ("max_in_flight", "documents", "slots"),
    [(512, 1, 1), (512, 3, 3), (512, 16, 16), (512, 1000, 16), (8, 16, 2), (8, 2, 2), (3, 16, 1), (1, 16, 1)],
)
def test_a_batch_takes_at_most_its_share_of_max_in_flight(max_in_flight: int, documents: int, slots: int) -> None:
    engine = make_engine(FakePdp(ALLOWED), max_in_flight=max_in_flight)
    assert engine.slots(batch(documents)) == slots


async def test_a_batch_keeps_only_its_slots_open_and_others_are_served_meanwhile() -> None:
    pdp = GatePdp()
    engine = make_engine(pdp, max_in_flight=8, timeout_ms=5000)
    pending = asyncio.create_task(engine.decide(batch(16)))
    await until(lambda: pdp.open == 2)
    assert engine.in_flight == 2  # the batch counts the exchanges it may have open
    for i in range(6):  # the rest of the bulkhead is the others'
        other = await engine.decide(check(f"other-{i}"))
        assert isinstance(other.decision, Allow)
    assert not pending.done()
    pdp.gate.set()
    outcome = await pending
    assert isinstance(outcome.decision, Allow)
    assert outcome.reasons == (Reason.ALLOWED,) * 16
    assert pdp.most_open == 2
    assert sorted(r for r in pdp.asked if r.startswith("batch-1-")) == sorted(f"batch-1-{i}" for i in range(16))
    assert engine.in_flight == 0


async def test_a_batch_over_the_free_slots_is_overloaded_at_once() -> None:
    pdp = GatePdp()
    engine = make_engine(pdp, max_in_flight=8, timeout_ms=5000)
    held = [asyncio.create_task(engine.decide(check(f"h{i}").with_documents({"hold": True}, ()))) for i in range(7)]
    await until(lambda: pdp.open == 7)
    outcome = await engine.decide(batch(4, hold=False))  # needs 2 slots, 1 is free
    assert isinstance(outcome.decision, Deny)
    assert outcome.decision.reason is Reason.PDP_OVERLOADED
    assert isinstance((await engine.decide(check("single"))).decision, Allow)  # 1 slot still fits
    pdp.gate.set()
    for task in held:
        assert isinstance((await task).decision, Allow)


async def test_a_batch_that_times_out_is_one_breaker_failure() -> None:
    pdp = GatePdp()
    engine = make_engine(pdp, timeout_ms=20, retries=0, threshold=2)
    outcome = await engine.decide(batch(16))
    assert isinstance(outcome.decision, Deny)
    assert outcome.decision.reason is Reason.PDP_TIMEOUT
    assert breaker_of(engine).failures == 1
    assert circuit(engine) is State.CLOSED
    assert pdp.open == 0  # every exchange of the batch was cancelled with it


async def test_a_batch_exchange_that_waited_for_its_slot_while_the_circuit_opened_is_not_made() -> None:
    """A batch keeps only its slots open: its later documents wait for one. Each exchange is admitted as it goes
    out, so once the circuit has opened meanwhile, the waiting ones are never sent (no call reaches a PDP the
    breaker has given up on), and the batch is denied `circuit_open` without counting for or against the PDP."""
    pdp = GatePdp()
    engine = make_engine(pdp, max_in_flight=8, timeout_ms=5000, retries=0, threshold=2)
    pending = asyncio.create_task(engine.decide(batch(6)))  # 2 slots: documents 2-5 wait
    await until(lambda: pdp.open == 2)
    for i in range(2):
        failing = check(f"other-{i}").with_documents({"fail": True}, ())
        assert denied(await engine.decide(failing)).reason is Reason.PDP_UNREACHABLE
    assert circuit(engine) is State.OPEN
    pdp.gate.set()
    outcome = await pending
    assert denied(outcome).reason is Reason.CIRCUIT_OPEN
    assert sorted(r for r in pdp.asked if r.startswith("batch-1-")) == ["batch-1-0", "batch-1-1"]
    assert circuit(engine) is State.OPEN
    assert engine.in_flight == 0


async def test_an_in_process_batch_lets_other_requests_run_between_evaluations() -> None:
    events: list[str] = []

    class InProcess(Pdp):
        remote = False

        async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
            events.append("evaluated")  # never suspends, like Cedar
            return ALLOWED

        async def close(self) -> None:
            return None

    engine = make_engine(InProcess(), max_in_flight=8)  # two evaluations at a time
    decided = asyncio.create_task(engine.decide(batch(16, hold=False)))

    async def other_request() -> None:
        while not decided.done():
            events.append("other")
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    assert isinstance((await decided).decision, Allow)
    await other
    evaluations = [i for i, e in enumerate(events) if e == "evaluated"]
    assert len(evaluations) == 16
    assert "other" in events[evaluations[0] : evaluations[-1]]


# --- the Allow mint -------------------------------------------------------------------------------------------


def test_allow_cannot_be_made_outside_the_engine() -> None:
    fields: dict[str, Any] = {
        "decision_id": "d",
        "request_id": "r",
        "route": "tools",
        "method": "GET",
        "upstream_url": "http://up/",
        "headers": (),
    }
    with pytest.raises(TypeError, match="only be created by the decision engine"):
        Allow(object(), **fields)
    with pytest.raises(TypeError):
        Allow(None, **fields)
    with pytest.raises(TypeError):
        Allow(decision._MintKey(), **fields)


def test_the_mint_key_is_already_claimed_by_the_engine() -> None:
    with pytest.raises(RuntimeError, match="already been claimed"):
        decision.claim_mint_key()


async def test_allow_is_immutable() -> None:
    outcome = await make_engine(FakePdp(ALLOWED)).decide(check())
    allow = outcome.decision
    assert isinstance(allow, Allow)
    with pytest.raises(AttributeError):
        allow.upstream_url = "http://evil/"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        allow.method = "DELETE"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        allow.extra = 1
    with pytest.raises(AttributeError):
        del allow.upstream_url
    if pep.COMPILED:  # a native class's Final fields have no setter at all: not even object.__setattr__ reaches one
        with pytest.raises((AttributeError, TypeError)):
            object.__setattr__(allow, "upstream_url", "http://evil/")
    assert allow.upstream_url == "http://up:9000/tools/search?q=1"
    assert "decision_id" in repr(allow)


class RefusingPdp(FakePdp):
    """Requests whose `request_id` starts with `bad` go out (the breaker admits them) and get `status` back: the
    PDP refused that one request, as Cerbos refuses an input over its size limit or a value its schema rejects."""

    def __init__(self, status: int, *script: Step) -> None:
        super().__init__(*script)
        self.status = status

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        if request_id.startswith("bad"):
            return status_failure(self.status) if admitted() else NOT_ADMITTED
        return await super().ask(document, request_id)


REFUSALS = [400, 401, 404, 413, 422, 429, 431]


@pytest.mark.parametrize("status", REFUSALS)
async def test_a_4xx_refusal_of_one_request_never_opens_the_circuit(status: int) -> None:
    """It counted as a PDP failure: `failure_threshold` requests whose data the PDP refuses opened the circuit
    for every caller. It is still that request's denial, and still observed as the PDP's error answer."""
    pdp = RefusingPdp(status, ALLOWED)
    engine = make_engine(pdp, retries=1, threshold=2)
    for _ in range(5):
        outcome = await engine.decide(check("bad-1"))
        assert (denied(outcome).reason, outcome.attempts) == (Reason.PDP_ERROR_STATUS, 1)
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 0
    assert sample(engine, "pep_pdp_request_duration_seconds_count", {"outcome": "error"}) == 5
    assert isinstance((await engine.decide(check("good-1"))).decision, Allow)


@pytest.mark.parametrize("status", [408, 500])
async def test_a_timeout_or_server_error_status_still_counts(status: int) -> None:
    engine = make_engine(RefusingPdp(status, ALLOWED), retries=0, threshold=2)
    for _ in range(2):
        await engine.decide(check("bad-1"))
    assert circuit(engine) is State.OPEN


@pytest.mark.parametrize("status", [400, 429])
async def test_a_4xx_refusal_neither_closes_nor_reopens_a_half_open_circuit(status: int) -> None:
    await _half_open_left_to_the_next_request(
        RefusingPdp(status, UNREACHABLE, UNREACHABLE, ALLOWED), Reason.PDP_ERROR_STATUS
    )


async def test_a_refused_batch_is_not_a_breaker_failure() -> None:
    """Each message asked on its own (`ask_each`), each refused: as for one message, the breaker is not told."""
    pdp = RefusingPdp(400, ALLOWED)
    engine = make_engine(pdp, retries=0, threshold=1)
    batch = Check(
        document={"doc": 0},
        request_id="bad-batch",
        route="r",
        method="POST",
        upstream_url="http://u/",
        obligation_forbidden=frozenset(),
        more=({"doc": 1},),
    )
    assert denied(await engine.decide(batch)).reason is Reason.PDP_ERROR_STATUS
    assert circuit(engine) is State.CLOSED
    assert breaker_of(engine).failures == 0
