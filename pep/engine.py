"""The decision engine: one deadline, budgeted retries, a bulkhead and a circuit breaker around a PDP.

This is the only module that can mint an `Allow`. Everything that is not an explicit, well-formed allow that
arrived before the deadline becomes a `Deny` with its reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pep.breaker import Breaker, Permit, State
from pep.config import PdpConfig
from pep.decision import Allow, Deny, Reason, claim_mint_key
from pep.headers import obligation_problem
from pep.ids import new_id
from pep.metrics import Metrics
from pep.pdp import BATCH_CONCURRENCY, ApprovalAsk, Failure, Pdp, Verdict

_MINT = claim_mint_key()

_NO_BREAKER = Permit(False, 0)
_TIMEOUT = Failure(Reason.PDP_TIMEOUT, "timeout", False, "decision deadline passed")

# A retry is tried only if at least this share of the whole deadline is left (and at least as long as the
# failed attempt took), so a retry is never started just to time out.
MIN_RETRY_SHARE = 0.1

# A decision about several documents (a JSON-RPC batch, a filtered tool list) has at most BATCH_CONCURRENCY PDP
# exchanges open at once, and never more than 1/BATCH_SHARE of `max_in_flight`: the slots it takes are counted
# against `max_in_flight`, so one caller's batch leaves the bulkhead and the PDP pool to the others.
BATCH_SHARE = 4


@dataclass(frozen=True, slots=True)
class Check:
    """What to decide: the document for the PDP, and the exact request an Allow would be bound to."""

    document: dict[str, Any]
    request_id: str
    route: str
    method: str
    upstream_url: str
    obligation_forbidden: frozenset[str]
    more: tuple[dict[str, Any], ...] = ()  # the other messages of a JSON-RPC batch: all must allow
    body: bytes | None = None  # an inspected body, bound into the Allow
    credential_narrowable: bool = False  # the route obtains a just-in-time credential the PDP may narrow

    @property
    def documents(self) -> tuple[dict[str, Any], ...]:
        return (self.document, *self.more)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A decision with the facts the decision log records about how it was reached."""

    decision: Allow | Deny
    attempts: int
    pdp_ms: float | None
    note: str | None = None
    reasons: tuple[Reason, ...] = ()  # per message, when several were decided together
    approval: ApprovalAsk | None = None  # with a `approval_required` Deny: who is asked, and what to tell them


class Engine:
    """Asks the PDP under `pdp.timeout_ms`, `retries`, `max_in_flight` and the breaker settings."""

    def __init__(
        self,
        pdp: Pdp,
        config: PdpConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pdp = pdp
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._timeout_s = config.timeout_ms / 1000
        self._min_retry_s = self._timeout_s * MIN_RETRY_SHARE
        self._max_in_flight = config.max_in_flight
        self._retries = config.retries
        b = config.breaker
        # In-process PDPs (Cedar) cannot be unreachable or slow in the breaker's sense: no breaker for them.
        self.breaker: Breaker | None = (
            Breaker(b.failure_threshold, b.open_ms / 1000, b.half_open_probes, clock, metrics.circuit_transition)
            if pdp.remote
            else None
        )
        self.in_flight = 0
        metrics.bind_engine(self)

    @property
    def circuit(self) -> State:
        return self.breaker.state if self.breaker is not None else State.CLOSED

    def slots(self, check: Check) -> int:
        """How many of `max_in_flight` the check takes: 1, or for several documents the exchanges it may have
        open at once (at most BATCH_CONCURRENCY, and 1/BATCH_SHARE of `max_in_flight`)."""
        if not check.more:
            return 1
        return max(1, min(len(check.more) + 1, BATCH_CONCURRENCY, self._max_in_flight // BATCH_SHARE))

    async def decide(self, check: Check) -> Outcome:
        decision_id = new_id()
        slots = self.slots(check)
        if self.in_flight + slots > self._max_in_flight:
            return Outcome(Deny(Reason.PDP_OVERLOADED, decision_id, "max_in_flight reached"), 0, None)
        permit = self.breaker.acquire() if self.breaker is not None else _NO_BREAKER
        if permit is None:
            return Outcome(Deny(Reason.CIRCUIT_OPEN, decision_id), 0, None)
        self.in_flight += slots
        try:
            result, attempts, pdp_s, each = await self._ask(check, permit, slots)
        finally:
            self.in_flight -= slots
        pdp_ms = round(pdp_s * 1000, 3)
        if isinstance(result, Failure):
            return Outcome(Deny(result.reason, decision_id, result.detail), attempts, pdp_ms, result.detail, each)
        if not result.allow:
            note = result.note
            deny = Deny(result.reason, decision_id, note or "")
            return Outcome(deny, attempts, pdp_ms, note, each, result.approval)
        if result.headers and (problem := obligation_problem(result.headers, check.obligation_forbidden)):
            deny = Deny(Reason.OBLIGATION_UNSUPPORTED, decision_id, problem)
            return Outcome(deny, attempts, pdp_ms, problem, each)
        if result.credential is not None and not check.credential_narrowable:
            problem = "a credential narrowing on a route without a just-in-time credential"
            return Outcome(Deny(Reason.OBLIGATION_UNSUPPORTED, decision_id, problem), attempts, pdp_ms, problem, each)
        allow = Allow(
            _MINT,
            decision_id=decision_id,
            request_id=check.request_id,
            route=check.route,
            method=check.method,
            upstream_url=check.upstream_url,
            headers=result.headers,
            body=check.body,
            credential=result.credential,
        )
        return Outcome(allow, attempts, pdp_ms, result.note, each)

    async def _ask_once(self, check: Check, slots: int) -> tuple[Verdict | Failure, tuple[Reason, ...]]:
        """One attempt for every message of the check; several are combined so that all must allow."""
        if not check.more:
            return await self.pdp.ask(check.document, check.request_id), ()
        results = await self.pdp.ask_many(check.documents, check.request_id, slots)
        return combine(results), tuple(r.reason for r in results)

    async def _ask(
        self, check: Check, permit: Permit, slots: int
    ) -> tuple[Verdict | Failure, int, float, tuple[Reason, ...]]:
        """Attempts inside one deadline. Always reports to the breaker, also when cancelled: once per check, so
        a batch that times out is one failure, not one per message."""
        clock = self._clock
        observe = self._metrics.pdp_duration
        start = clock()
        deadline = start + self._timeout_s
        attempts = 0
        result: Verdict | Failure | None = None
        each: tuple[Reason, ...] = ()
        try:
            while True:
                attempts += 1
                began = clock()
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(deadline - began):
                        result, each = await self._ask_once(check, slots)
                except TimeoutError:
                    result = _TIMEOUT
                if isinstance(result, Verdict) and clock() > deadline:
                    result = _TIMEOUT  # an in-process answer cannot be interrupted, but a late one is not used
                observe[result.outcome if isinstance(result, Failure) else "ok"].observe(time.perf_counter() - t0)
                if isinstance(result, Verdict) or not result.retryable or attempts > self._retries:
                    break
                now = clock()
                left = deadline - now
                if left <= 0 or left < self._min_retry_s or left < now - began:
                    break
        finally:
            breaker = self.breaker
            if breaker is None:
                pass
            elif isinstance(result, Verdict):
                breaker.success(permit)
            elif result is not None or permit.probe:
                # A failed answer, or a probe that was cancelled (the breaker must not stay half-open).
                breaker.failure(permit)
        return result, attempts, clock() - start, each


def combine(results: list[Verdict | Failure]) -> Verdict | Failure:
    """Several answers as one: the first failure, else the first refusal, else an allow with every obligation.

    Approvals: a refusal that no approval can lift comes first (nobody is asked to approve what is denied anyway);
    messages asking one approver become one approval of the whole batch (the first message; its binding covers
    the whole body); approvals by different people cannot be asked in one CIBA request: that batch is denied."""
    verdicts: list[Verdict] = []
    for r in results:
        if isinstance(r, Failure):
            return r
        verdicts.append(r)
    for v in verdicts:
        if not v.allow and v.approval is None:
            return v
    asks = [v for v in verdicts if v.approval is not None]
    if asks:
        approvers = {v.approval.approver for v in asks if v.approval is not None}
        if len(approvers) > 1:
            return Verdict(False, Reason.POLICY_DENIED, note="a batch needs approvals by different approvers")
        return asks[0]
    headers = tuple(h for v in verdicts for h in v.headers)
    notes = "; ".join(v.note for v in verdicts if v.note)
    narrowings = {v.credential for v in verdicts if v.credential is not None}
    if len(narrowings) > 1:  # one request gets one credential: messages that narrow it differently cannot all hold
        return Verdict(False, Reason.OBLIGATION_UNSUPPORTED, note="the batch narrows the credential differently")
    return Verdict(True, Reason.ALLOWED, headers, notes or None, credential=narrowings.pop() if narrowings else None)
