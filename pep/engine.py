"""The decision engine: one deadline, budgeted retries, a bulkhead and a circuit breaker around a PDP.

This is the only module that can mint an `Allow`. Everything that is not an explicit, well-formed allow that
arrived before the deadline becomes a `Deny` with its reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

from pep.breaker import Breaker, Permit, State
from pep.config import PdpConfig
from pep.decision import Allow, Deny, Reason, claim_mint_key
from pep.headers import obligation_problem
from pep.ids import new_id
from pep.integrity import alias_problem
from pep.metrics import Metrics
from pep.pdp import BATCH_CONCURRENCY, GATE, NOT_ADMITTED, PDP_FAILURES, UNSENT, ApprovalAsk, Failure, Pdp, Verdict

_MINT: Final = claim_mint_key()

_NO_BREAKER: Final = Permit(False, 0)
_TIMEOUT: Final = Failure(Reason.PDP_TIMEOUT, "timeout", False, "decision deadline passed")
# The deadline noticed this much of the whole deadline late (or later): the PEP itself was not running (a stalled
# process or event loop), so what the PDP sent meanwhile may be unread. Still a denial (`pdp_timeout`: nothing
# arrived in time that the PEP could read), but no failure of the PDP: the breaker is not told.
STALL_SHARE: Final = 0.5
_STALLED: Final = Failure(Reason.PDP_TIMEOUT, "timeout", False, "decision deadline passed while the PEP was held up")

# A retry is tried only if at least this share of the whole deadline is left (and at least as long as the
# failed attempt took), so a retry is never started just to time out.
MIN_RETRY_SHARE: Final = 0.1

# A decision about several documents (a JSON-RPC batch, a filtered tool list) has at most BATCH_CONCURRENCY PDP
# exchanges open at once, and never more than 1/BATCH_SHARE of `max_in_flight`: the slots it takes are counted
# against `max_in_flight`, so one caller's batch leaves the bulkhead and the PDP pool to the others.
BATCH_SHARE: Final = 4


class Check:
    """What to decide: the document for the PDP, and the exact request an Allow would be bound to."""

    document: Final[dict[str, Any]]
    request_id: Final[str]
    route: Final[str]
    method: Final[str]
    upstream_url: Final[str]
    obligation_forbidden: Final[frozenset[str]]
    more: Final[tuple[dict[str, Any], ...]]  # the other messages of a JSON-RPC batch: all must allow
    body: Final[bytes | None]  # an inspected body, bound into the Allow
    credential_narrowable: Final[bool]  # the route obtains a just-in-time credential the PDP may narrow

    def __init__(
        self,
        document: dict[str, Any],
        request_id: str,
        route: str,
        method: str,
        upstream_url: str,
        obligation_forbidden: frozenset[str],
        more: tuple[dict[str, Any], ...] = (),
        body: bytes | None = None,
        credential_narrowable: bool = False,
    ) -> None:
        self.document = document
        self.request_id = request_id
        self.route = route
        self.method = method
        self.upstream_url = upstream_url
        self.obligation_forbidden = obligation_forbidden
        self.more = more
        self.body = body
        self.credential_narrowable = credential_narrowable

    @property
    def documents(self) -> tuple[dict[str, Any], ...]:
        return (self.document, *self.more)

    def with_documents(self, document: dict[str, Any], more: tuple[dict[str, Any], ...]) -> Check:
        """The same request asked about with other documents (an approval added to each)."""
        return Check(
            document,
            self.request_id,
            self.route,
            self.method,
            self.upstream_url,
            self.obligation_forbidden,
            more,
            self.body,
            self.credential_narrowable,
        )


def _obligation_alias(headers: tuple[tuple[str, str], ...], document: dict[str, Any]) -> str | None:
    """A caller field spelled with `_` for `-` of a header the PDP sets (`X_User` for an obligation's `x-user`): a
    CGI-style upstream reads both as one variable, so the caller's value would join or override the PDP's. The
    route's fixed names are refused at admission (`integrity.alias_problem`); obligation names are known now."""
    sent = document.get("request", {}).get("headers")
    if not sent:
        return None
    return alias_problem(sent, frozenset(name.lower() for name, _ in headers))


class Outcome:
    """A decision with the facts the decision log records about how it was reached."""

    decision: Final[Allow | Deny]
    attempts: Final[int]
    pdp_ms: Final[float | None]
    note: Final[str | None]
    reasons: Final[tuple[Reason, ...]]  # per message, when several were decided together
    approval: Final[ApprovalAsk | None]  # with a `approval_required` Deny: who is asked, and what to tell them
    # When the engine took the decision up (wall clock): the decision log's `time`. `pdp_ms` counts from the same
    # instant, so that the log shows when each PDP call could start and when its result was known.
    started: Final[float | None]

    def __init__(
        self,
        decision: Allow | Deny,
        attempts: int,
        pdp_ms: float | None,
        note: str | None = None,
        reasons: tuple[Reason, ...] = (),
        approval: ApprovalAsk | None = None,
        started: float | None = None,
    ) -> None:
        self.decision = decision
        self.attempts = attempts
        self.pdp_ms = pdp_ms
        self.note = note
        self.reasons = reasons
        self.approval = approval
        self.started = started

    def overruled(self, decision: Allow | Deny, note: str | None, reasons: tuple[Reason, ...] = ()) -> Outcome:
        """This outcome with another decision (a refusal after the PDP answered: a credential, an audit, a tunnel's
        obligations, an approval refused), its PDP facts kept."""
        return Outcome(decision, self.attempts, self.pdp_ms, note, reasons, self.approval, self.started)


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
        self._stall_s = self._timeout_s * STALL_SHARE
        self._max_in_flight = config.max_in_flight
        self._retries = config.retries
        b = config.breaker
        # In-process PDPs (Cedar) cannot be unreachable or slow in the breaker's sense: no breaker for them.
        # `remote` through Python's own lookup: compiled code reads a compiled class's slot, which a PDP class of
        # Python (the tests', explain's) that sets `remote` in its class body leaves undefined.
        remote: bool = getattr(pdp, "remote")  # noqa: B009
        self.breaker: Breaker | None = (
            Breaker(b.failure_threshold, b.open_ms / 1000, b.half_open_probes, clock, metrics.circuit_transition)
            if remote
            else None
        )
        self.in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop decisions last ran on
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
        """The decision on `check`: its attempts inside one deadline, then what their result means.

        `attempts` counts those that reached the PDP. The permit ends once per check (a batch that times out is
        one failure, not one per message). The breaker hears only about calls it admitted as they went out
        (pep/pdp `GATE`, asked before connecting and again right before each request is written, so also for
        every exchange of a batch that waited for one of its slots): a failure if any message met a PDP failure,
        a success if any got a well-formed answer. Anything else (a request that could not be built, a 4xx
        refusal of this one request (`Failure.refused`), a call refused because the circuit opened while it
        waited, a deadline the PEP itself was too held up to notice in time, an exception in the PEP, a caller
        gone) releases the permit: a caller can neither open the circuit nor hold a probe.

        One coroutine, the attempts included: each level between the caller and the PDP's wait is resumed on
        every wake-up.
        """
        clock = self._clock
        started, start = time.time(), clock()
        decision_id = new_id()
        more = check.more
        slots = self.slots(check) if more else 1
        if self.in_flight + slots > self._max_in_flight:
            deny = Deny(Reason.PDP_OVERLOADED, decision_id, "max_in_flight reached")
            return Outcome(deny, 0, None, started=started)
        breaker = self.breaker
        permit = breaker.acquire() if breaker is not None else _NO_BREAKER
        if permit is None:
            return Outcome(Deny(Reason.CIRCUIT_OPEN, decision_id), 0, None, started=started)
        # The task each attempt's deadline cancels, and its loop. asyncio.get_running_loop() makes a system call
        # (getpid) each time, and current_task() without a loop calls it: the loop is kept, and a current task
        # of the kept loop can only be this one (an engine is used from one thread, where one loop runs at a
        # time); none means first use or another loop, looked up then.
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None
        self.in_flight += slots
        pdp = self.pdp
        observe = self._metrics.pdp_duration
        sent = 0  # how often the breaker admitted a call (or its connection) in the current attempt

        def gate() -> bool:
            nonlocal sent
            if breaker is None or breaker.admit(permit):
                sent += 1
                return True
            return False

        token = GATE.set(gate) if breaker is not None else None
        deadline = start + self._timeout_s
        attempts = tries = 0
        result: Verdict | Failure | None = None
        results: list[Verdict | Failure] = []
        each: tuple[Reason, ...] = ()
        try:
            while True:
                tries += 1
                began = clock()
                t0 = time.perf_counter()
                sent = 0
                timed_out = False
                # The attempt's deadline: `asyncio.timeout` without its per-use machinery (a Timeout, a reschedule,
                # a context manager's calls, an object per attempt): one timer that cancels this task. The
                # cancellation it caused is told from any other (the caller gone) as `asyncio.timeout` tells it,
                # by the task's cancel count; `fired` says that the timer ran.
                fired = [False]
                cancelling = task.cancelling()
                timer = loop.call_later(deadline - began, _expire, task, fired)
                try:  # one attempt: one result per message of the check (several: at most `slots` exchanges)
                    if more:
                        answers = await pdp.ask_many(check.documents, check.request_id, slots)
                    else:
                        answers = [await pdp.ask(check.document, check.request_id)]
                except asyncio.CancelledError:
                    if not fired[0]:
                        raise
                    fired[0] = False  # counted once: the finally must not take the cancel back again
                    if task.uncancel() > cancelling:  # the caller's cancellation too
                        raise
                    late = clock() - deadline >= self._stall_s
                    answers, timed_out = [_STALLED if late else _TIMEOUT], True
                finally:
                    timer.cancel()
                    if fired[0]:  # it fired as the answer arrived: its cancel is taken back, as asyncio.timeout does
                        fired[0] = False
                        task.uncancel()
                answer = combine(answers) if more else answers[0]
                # A call the breaker admitted may still never have gone out (`unsent`: refused by the circuit as it
                # was about to be written, or a failure its client passes on before the first byte): not asked.
                asked = (breaker is None or sent > 0) and not (isinstance(answer, Failure) and answer.outcome == UNSENT)
                if answer is NOT_ADMITTED and result is not None:
                    break  # a retry the circuit no longer admits: the previous attempt's failure stands
                results, result = answers, answer
                each = tuple(r.reason for r in answers) if more and not timed_out else ()
                if isinstance(result, Verdict) and (now := clock()) > deadline:
                    # An in-process answer cannot be interrupted, and a remote one read late (the PEP was held up
                    # when the deadline passed): a late answer is not used, and the stall is not the PDP's.
                    result = _STALLED if now - deadline >= self._stall_s else _TIMEOUT
                    results = [result]
                if asked:
                    attempts += 1
                    outcome = result.outcome if isinstance(result, Failure) else "ok"
                    observe[outcome].observe(time.perf_counter() - t0)
                if isinstance(result, Verdict) or not result.retryable or tries > self._retries:
                    break
                now = clock()
                left = deadline - now
                if left <= 0 or left < self._min_retry_s or left < now - began:
                    break
        finally:
            self.in_flight -= slots
            if token is not None:
                GATE.reset(token)
            if breaker is not None:
                _report(breaker, permit, results)  # [] until an attempt ended: `results` and `result` go together
        assert result is not None
        pdp_s = clock() - start
        # The PDP not asked: no PDP time, except for a call that waited and was then refused by the breaker
        # (the time it waited, so that its denial is seen to come after the circuit opened).
        pdp_ms = round(pdp_s * 1000, 3) if attempts or result is NOT_ADMITTED else None
        if isinstance(result, Failure):
            deny = Deny(result.reason, decision_id, result.detail)
            return Outcome(deny, attempts, pdp_ms, result.detail, each, started=started)
        if not result.allow:
            note = result.note
            deny = Deny(result.reason, decision_id, note or "")
            return Outcome(deny, attempts, pdp_ms, note, each, result.approval, started)
        if result.headers and (problem := obligation_problem(result.headers, check.obligation_forbidden)):
            deny = Deny(Reason.OBLIGATION_UNSUPPORTED, decision_id, problem)
            return Outcome(deny, attempts, pdp_ms, problem, each, started=started)
        if result.headers and (problem := _obligation_alias(result.headers, check.document)):
            deny = Deny(Reason.REQUEST_AMBIGUOUS, decision_id, problem)
            return Outcome(deny, attempts, pdp_ms, problem, each, started=started)
        if result.credential is not None and not check.credential_narrowable:
            problem = "a credential narrowing on a route without a just-in-time credential"
            deny = Deny(Reason.OBLIGATION_UNSUPPORTED, decision_id, problem)
            return Outcome(deny, attempts, pdp_ms, problem, each, started=started)
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
        return Outcome(allow, attempts, pdp_ms, result.note, each, started=started)


def _expire(task: asyncio.Task[Any], fired: list[bool]) -> None:
    """An attempt's deadline came: the asking task is cancelled, and the attempt learns that it was this."""
    fired[0] = True
    task.cancel()


def _report(breaker: Breaker, permit: Permit, results: list[Verdict | Failure]) -> None:
    """Tell the breaker what the PDP did, and only that (see `Engine.decide`)."""
    if permit.admitted and len(results) == 1:  # one message: the same rules, without a generator per rule
        r = results[0]
        if r is not _STALLED and not (isinstance(r, Failure) and r.outcome == UNSENT):
            if isinstance(r, Verdict):
                breaker.success(permit)
                return
            if r.reason in PDP_FAILURES and not r.refused:
                breaker.failure(permit)
                return
    elif permit.admitted and not any(r is _STALLED for r in results):
        if any(
            isinstance(r, Failure) and r.reason in PDP_FAILURES and r.outcome != UNSENT and not r.refused
            for r in results
        ):
            breaker.failure(permit)
            return
        if any(isinstance(r, Verdict) for r in results):
            breaker.success(permit)
            return
    breaker.release(permit)


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
